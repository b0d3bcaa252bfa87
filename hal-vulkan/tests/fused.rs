//! The fused ops and the activation quantizer against the reference, bit for bit (the full
//! matrix lives in `conformance`; this is the backend's own quick check).

use half::f16;
use purehw_hal::KvType;
use purehw_hal::{
    ActLayout, ActQuant, Backend, Format, Gate, HostBytes, HostWeight, MatIn, Op, QuantOut, RopeMode, RopeSpec,
    SeqSpan, Step, View,
};
use purehw_hal_cpu_ref::CpuRef;
use purehw_hal_vulkan::{Vulkan, VulkanOptions};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.unit()).collect()
    }
}

fn weight(rng: &mut Rng, fmt: Format, rows: usize, cols: usize) -> HostWeight {
    let rb = fmt.bytes_for(cols).unwrap();
    let mut b: Vec<u8> = (0..rows * rb).map(|_| rng.next() as u8).collect();
    match fmt {
        Format::F32 => b = (0..rows * cols).flat_map(|_| rng.unit().to_le_bytes()).collect(),
        _ => {
            let offs: &[usize] = match fmt {
                Format::Q4_1 | Format::Q5_1 | Format::Q4_K | Format::Q5_K => &[0, 2],
                Format::Q6_K => &[208],
                _ => &[0],
            };
            for blk in b.chunks_exact_mut(fmt.block_bytes()) {
                for &o in offs {
                    blk[o..o + 2].copy_from_slice(&f16::from_f32(0.01 + 0.03 * rng.unit().abs()).to_le_bytes());
                }
            }
        }
    }
    HostWeight::new(fmt, rows, cols, HostBytes::from_vec(b)).unwrap()
}

fn vulkan() -> Vulkan {
    Vulkan::new(&VulkanOptions::from_env()).unwrap_or_else(|e| panic!("{e}"))
}

/// A case: given a buffer allocator (length, data) and a weight loader, the ops (on buffer and
/// weight indices) and the (buffer, length) outputs to compare.
type Setup<'a> = &'a dyn Fn(&mut dyn FnMut(usize, &[f32]) -> usize, &mut dyn FnMut(&HostWeight) -> usize) -> Case;
type Case = (Vec<Op<usize, usize>>, Vec<(usize, usize)>);

/// Run `setup`'s ops on both backends; compare every listed buffer bit for bit.
fn compare(name: &str, step: &Step<'_>, setup: Setup<'_>) {
    fn run<B: Backend>(mut b: B, step: &Step<'_>, setup: Setup<'_>) -> Vec<Vec<f32>> {
        let mut bufs = Vec::new();
        let mut ws = Vec::new();
        let (ops, outs) = {
            let bufs = std::cell::RefCell::new(&mut bufs);
            let mut alloc = |len: usize, data: &[f32]| {
                let id = b.alloc(len).unwrap();
                if !data.is_empty() {
                    b.write(View::new(id, 0), data).unwrap();
                }
                bufs.borrow_mut().push(id);
                bufs.borrow().len() - 1
            };
            let _ = &mut alloc;
            // Two closures cannot both borrow `b`; load weights after buffers through a queue.
            let mut pending: Vec<HostWeight> = Vec::new();
            let mut load = |w: &HostWeight| {
                pending.push(w.clone());
                pending.len() - 1
            };
            let r = setup(&mut alloc, &mut load);
            for w in &pending {
                ws.push(b.load_weight(w).unwrap());
            }
            r
        };
        let real: Vec<Op<B::Buffer, B::Weight>> = ops.iter().map(|op| op.map(|i| bufs[i], |w| ws[w])).collect();
        b.submit(step, &real).unwrap_or_else(|e| panic!("{e}"));
        outs.iter()
            .map(|&(buf, len)| {
                let mut v = vec![0f32; len];
                b.read(View::new(bufs[buf], 0), &mut v).unwrap();
                v
            })
            .collect()
    }
    let a = run(CpuRef::new(), step, setup);
    let b = run(vulkan(), step, setup);
    for (k, (x, y)) in a.iter().zip(&b).enumerate() {
        if let Some(i) = (0..x.len()).find(|&i| x[i].to_bits() != y[i].to_bits()) {
            panic!(
                "{name}: output {k} differs first at {i}: {} vs {} (bits {:08x} vs {:08x})",
                x[i],
                y[i],
                x[i].to_bits(),
                y[i].to_bits()
            );
        }
    }
    assert!(purehw_hal_vulkan::validation_messages().is_empty(), "{:?}", purehw_hal_vulkan::validation_messages());
}

fn words(layout: ActLayout, rows: usize, cols: usize) -> usize {
    rows * cols / purehw_hal::act_block(layout) * purehw_hal::act_words(layout)
}

#[test]
fn fused_ops_equal_reference() {
    let seqs = [
        SeqSpan { row: 0, len: 1, cache_row: 0, pos0: 5, ring_row: 0 },
        SeqSpan { row: 1, len: 3, cache_row: 16, pos0: 0, ring_row: 0 },
    ];
    let positions = [5u32, 0, 1, 2];
    let tokens = [0u32; 4];
    let step = Step { tokens: &tokens, positions: &positions, seqs: &seqs };
    let n = 4;
    for layout in [ActLayout::Q8A, ActLayout::Q8K] {
        let dim = 512;
        compare(&format!("AddRmsNorm {layout:?}"), &step, &|alloc, load| {
            let mut rng = Rng(7);
            let x = alloc(n * dim, &rng.vec(n * dim));
            let x2 = alloc(n * dim, &[]);
            let b = alloc(n * dim, &rng.vec(n * dim));
            let out = alloc(n * dim, &[]);
            let q = alloc(words(layout, n, dim), &[]);
            let w = load(&weight(&mut rng, Format::F32, 1, dim));
            let p = load(&weight(&mut rng, Format::F32, 1, dim));
            let ops = vec![Op::AddRmsNorm {
                x: View::new(x, 0),
                x_out: View::new(x2, 0),
                branch: Some(View::new(b, 0)),
                post: Some(p),
                out: View::new(out, 0),
                w,
                quant: Some(QuantOut { out: View::new(q, 0), layout }),
                rows: n,
                dim,
                eps: 1e-6,
            }];
            (ops, vec![(x, n * dim), (x2, n * dim), (b, n * dim), (out, n * dim), (q, words(layout, n, dim))])
        });
        let (fmt, cols) = if layout == ActLayout::Q8A { (Format::Q5_0, 640) } else { (Format::Q4_K, 512) };
        let ffn = 512;
        for kind in [Gate::GeluTanh, Gate::Silu] {
            compare(&format!("GatedFfn {layout:?} {kind:?}"), &step, &|alloc, load| {
                let mut rng = Rng(11);
                let xq = alloc(words(layout, n, cols), &[]);
                let x = alloc(n * cols, &rng.vec(n * cols));
                let gate = alloc(n * ffn, &[]);
                let up = alloc(n * ffn, &[]);
                let act = alloc(n * ffn, &[]);
                let q = alloc(words(layout, n, ffn), &[]);
                let wg = load(&weight(&mut rng, fmt, ffn, cols));
                let wu = load(&weight(&mut rng, fmt, ffn, cols));
                let ops = vec![
                    Op::QuantizeAct { out: View::new(xq, 0), x: View::new(x, 0), rows: n, cols, layout },
                    Op::GatedFfn {
                        x: MatIn::Q8(View::new(xq, 0)),
                        w_gate: wg,
                        w_up: wu,
                        gate: View::new(gate, 0),
                        up: View::new(up, 0),
                        out: View::new(act, 0),
                        n,
                        ffn,
                        kind,
                        quant: Some(QuantOut { out: View::new(q, 0), layout }),
                    },
                ];
                (
                    ops,
                    vec![
                        (xq, words(layout, n, cols)),
                        (gate, n * ffn),
                        (up, n * ffn),
                        (act, n * ffn),
                        (q, words(layout, n, ffn)),
                    ],
                )
            });
        }
        for (heads, kv, hd) in [(4usize, 1usize, 256usize), (8, 2, 64)] {
            compare(&format!("Qkv {layout:?} {heads}/{kv}x{hd}"), &step, &|alloc, load| {
                let mut rng = Rng(13);
                let x = alloc(n * cols, &rng.vec(n * cols));
                let xq = alloc(words(layout, n, cols), &[]);
                let (qd, kvd) = (heads * hd, kv * hd);
                let q = alloc(n * qd, &[]);
                let k = alloc(n * kvd, &[]);
                let v = alloc(n * kvd, &[]);
                let kc = alloc(32 * kvd, &rng.vec(32 * kvd));
                let vc = alloc(32 * kvd, &rng.vec(32 * kvd));
                let wq = load(&weight(&mut rng, fmt, qd, cols));
                let wk = load(&weight(&mut rng, fmt, kvd, cols));
                let wv = load(&weight(&mut rng, fmt, kvd, cols));
                let qn = load(&weight(&mut rng, Format::F32, 1, hd));
                let kn = load(&weight(&mut rng, Format::F32, 1, hd));
                let ops = vec![
                    Op::QuantizeAct { out: View::new(xq, 0), x: View::new(x, 0), rows: n, cols, layout },
                    Op::Qkv {
                        x: MatIn::Q8(View::new(xq, 0)),
                        wq,
                        wk,
                        wv,
                        q: View::new(q, 0),
                        k: View::new(k, 0),
                        v: View::new(v, 0),
                        n,
                        heads,
                        kv_heads: kv,
                        head_dim: hd,
                        q_norm: Some(qn),
                        k_norm: Some(kn),
                        eps: 1e-6,
                        rope: Some(RopeSpec { theta: 10000.0, scale: 1.0, mode: RopeMode::Neox }),
                        k_cache: Some(View::new(kc, 0)),
                        v_cache: Some(View::new(vc, 0)),
                        ring: 0,
                        kv: KvType::F32,
                    },
                ];
                (ops, vec![(q, n * qd), (k, n * kvd), (v, n * kvd), (kc, 32 * kvd), (vc, 32 * kvd)])
            });
        }
    }
    let _ = ActQuant::Int8;
    // One-token steps whose ops run as prologues of the next matmuls on a GPU (PUREHW_VK_SPLIT=1
    // forces the split kernel elsewhere): a junction then the q/k/v projections, a junction
    // then the MLP then the down projection, a junction then an LM head.
    let one = [SeqSpan { row: 0, len: 1, cache_row: 0, pos0: 3, ring_row: 0 }];
    let step1 = Step { tokens: &[0], positions: &[3], seqs: &one };
    for (layout, fmt, dfmt, dim, ffn) in [
        (ActLayout::Q8A, Format::Q5_0, Format::Q6_K, 640usize, 512usize),
        (ActLayout::Q8K, Format::Q4_K, Format::Q4_K, 512, 768),
    ] {
        compare(&format!("prologues {layout:?}"), &step1, &|alloc, load| {
            let mut rng = Rng(23);
            let (heads, kv, hd) = (4usize, 1usize, 128usize);
            let x = alloc(dim, &rng.vec(dim));
            let x2 = alloc(dim, &[]);
            let x3 = alloc(dim, &[]);
            let br = alloc(dim, &rng.vec(dim));
            let xn = alloc(dim, &[]);
            let xq = alloc(words(layout, 1, dim), &[]);
            let q = alloc(heads * hd, &[]);
            let k = alloc(kv * hd, &[]);
            let v = alloc(kv * hd, &[]);
            let kc = alloc(8 * kv * hd, &[]);
            let vc = alloc(8 * kv * hd, &[]);
            let gate = alloc(ffn, &[]);
            let up = alloc(ffn, &[]);
            let act = alloc(ffn, &[]);
            let dl = dfmt.act_layout().unwrap();
            let aq = alloc(words(dl, 1, ffn), &[]);
            let down = alloc(dim, &[]);
            let head = alloc(300, &[]);
            let nw = load(&weight(&mut rng, Format::F32, 1, dim));
            let pw = load(&weight(&mut rng, Format::F32, 1, dim));
            let wq = load(&weight(&mut rng, fmt, heads * hd, dim));
            let wk = load(&weight(&mut rng, fmt, kv * hd, dim));
            let wv = load(&weight(&mut rng, fmt, kv * hd, dim));
            let wg = load(&weight(&mut rng, fmt, ffn, dim));
            let wu = load(&weight(&mut rng, fmt, ffn, dim));
            let wd = load(&weight(&mut rng, dfmt, dim, ffn));
            let wh = load(&weight(&mut rng, fmt, 300, dim));
            let qo = |b| Some(QuantOut { out: View::new(b, 0), layout });
            let junction = |x_in, x_out| Op::AddRmsNorm {
                x: View::new(x_in, 0),
                x_out: View::new(x_out, 0),
                branch: Some(View::new(br, 0)),
                post: Some(pw),
                out: View::new(xn, 0),
                w: nw,
                quant: qo(xq),
                rows: 1,
                dim,
                eps: 1e-6,
            };
            let ops = vec![
                junction(x, x2),
                Op::Qkv {
                    x: MatIn::Q8(View::new(xq, 0)),
                    wq,
                    wk,
                    wv,
                    q: View::new(q, 0),
                    k: View::new(k, 0),
                    v: View::new(v, 0),
                    n: 1,
                    heads,
                    kv_heads: kv,
                    head_dim: hd,
                    q_norm: None,
                    k_norm: None,
                    eps: 1e-6,
                    rope: Some(RopeSpec { theta: 10000.0, scale: 1.0, mode: RopeMode::Neox }),
                    k_cache: Some(View::new(kc, 0)),
                    v_cache: Some(View::new(vc, 0)),
                    ring: 0,
                    kv: KvType::F32,
                },
                junction(x2, x3),
                Op::GatedFfn {
                    x: MatIn::Q8(View::new(xq, 0)),
                    w_gate: wg,
                    w_up: wu,
                    gate: View::new(gate, 0),
                    up: View::new(up, 0),
                    out: View::new(act, 0),
                    n: 1,
                    ffn,
                    kind: Gate::GeluTanh,
                    quant: Some(QuantOut { out: View::new(aq, 0), layout: dl }),
                },
                Op::MatMulQ8 { out: View::new(down, 0), xq: View::new(aq, 0), w: wd, n: 1 },
                junction(x3, x),
                Op::MatMulQ8 { out: View::new(head, 0), xq: View::new(xq, 0), w: wh, n: 1 },
            ];
            let outs = vec![
                (x, dim),
                (x2, dim),
                (x3, dim),
                (xn, dim),
                (xq, words(layout, 1, dim)),
                (q, heads * hd),
                (k, kv * hd),
                (v, kv * hd),
                (kc, 8 * kv * hd),
                (vc, 8 * kv * hd),
                (gate, ffn),
                (up, ffn),
                (act, ffn),
                (aq, words(dl, 1, ffn)),
                (down, dim),
                (head, 300),
            ];
            (ops, outs)
        });
    }
    // Attention then the quantization of its output (one kernel on the GPU).
    for (layout, heads, kv, hd) in
        [(ActLayout::Q8A, 4usize, 1usize, 256usize), (ActLayout::Q8K, 4, 1, 256), (ActLayout::Q8A, 8, 2, 64)]
    {
        compare(&format!("Attention+QuantizeAct {layout:?} {heads}/{kv}x{hd}"), &step, &|alloc, _load| {
            let mut rng = Rng(17);
            let (qd, kvd) = (heads * hd, kv * hd);
            let q = alloc(n * qd, &rng.vec(n * qd));
            let kc = alloc(32 * kvd, &rng.vec(32 * kvd));
            let vc = alloc(32 * kvd, &rng.vec(32 * kvd));
            let att = alloc(n * qd, &[]);
            let xq = alloc(words(layout, n, qd), &[]);
            let ops = vec![
                Op::Attention {
                    out: View::new(att, 0),
                    q: View::new(q, 0),
                    k: View::new(kc, 0),
                    v: View::new(vc, 0),
                    heads,
                    kv_heads: kv,
                    head_dim: hd,
                    scale: 0.0625,
                    window: 0,
                    softcap: 0.0,
                    ring: 0,
                    kv: KvType::F32,
                },
                Op::QuantizeAct { out: View::new(xq, 0), x: View::new(att, 0), rows: n, cols: qd, layout },
            ];
            (ops, vec![(att, n * qd), (xq, words(layout, n, qd))])
        });
    }
}

/// The bandwidth probe's kernel (what `bench` measures a discrete GPU with) runs, validation
/// layer silent, and gives a rate.
#[test]
fn read_bandwidth_probe() {
    let mut vk = vulkan();
    let rate = vk.read_bandwidth(16 << 20, 1).unwrap_or_else(|e| panic!("{e}"));
    if vk.info().timestamps {
        assert!(rate.is_some_and(|r| r > 1e6), "{rate:?}");
    }
    let msgs = purehw_hal_vulkan::validation_messages();
    assert!(msgs.is_empty(), "{msgs:?}");
}

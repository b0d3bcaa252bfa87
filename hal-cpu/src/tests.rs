//! The backend's own checks: a broken contract is an error, the primitive ops equal their
//! `purehw_kernels` definitions bit for bit (split across threads or not), neither the thread
//! count nor the SIMD set changes a bit, and a repeated step allocates nothing. The comparison
//! with `cpu-ref` over every op lives in `conformance`.

use purehw_hal::KvType;
use purehw_hal::check::CheckError;
use purehw_hal::{
    ActLayout, ActQuant, Backend, ErrorKind, Format, Gate, HostBytes, HostWeight, MatIn, Op, QuantOut, RopeMode,
    RopeSpec, SeqSpan, Step, View, act_block, act_words,
};
use purehw_kernels::ops as k;
use purehw_kernels::quant as q;
use purehw_kernels::testing::{Rng, random_row};

use crate::simd::scalar_kernels;
use crate::{BufId, Cpu, CpuError, WeightId};

fn load(cpu: &mut Cpu, rng: &mut Rng, fmt: Format, rows: usize, cols: usize) -> (WeightId, Vec<u8>) {
    let bytes: Vec<u8> = (0..rows).flat_map(|_| random_row(rng, fmt, cols)).collect();
    let w = HostWeight::new(fmt, rows, cols, HostBytes::from_vec(bytes.clone())).unwrap();
    (cpu.load_weight(&w).unwrap(), bytes)
}

fn buf(cpu: &mut Cpu, data: &[f32]) -> BufId {
    let b = cpu.alloc(data.len()).unwrap();
    cpu.write(View::new(b, 0), data).unwrap();
    b
}

fn at(b: BufId) -> View<BufId> {
    View::new(b, 0)
}

/// Bit-for-bit equality (NaN payloads included); the first differing element on failure.
#[track_caller]
fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a.to_bits() != b.to_bits()) {
        panic!("{what}: element {i} is {} but should be {}", got[i], want[i]);
    }
}

/// One sequence of `tokens` at positions `pos0..`.
struct OneSeq {
    tokens: Vec<u32>,
    positions: Vec<u32>,
    seqs: [SeqSpan; 1],
}

impl OneSeq {
    fn new(tokens: &[u32], pos0: u32) -> Self {
        let n = tokens.len() as u32;
        OneSeq {
            tokens: tokens.to_vec(),
            positions: (pos0..pos0 + n).collect(),
            seqs: [SeqSpan { row: 0, len: n, cache_row: 0, pos0, ring_row: 0 }],
        }
    }
    fn step(&self) -> Step<'_> {
        Step { tokens: &self.tokens, positions: &self.positions, seqs: &self.seqs }
    }
}

#[test]
fn a_broken_contract_is_an_error_not_a_panic() {
    let mut cpu = Cpu::new(2).unwrap();
    let mut rng = Rng(1);
    let (w, _) = load(&mut cpu, &mut rng, Format::Q8_0, 8, 64);
    let (norm, _) = load(&mut cpu, &mut rng, Format::F32, 1, 64);
    let x = cpu.alloc(64).unwrap();
    let out = cpu.alloc(8).unwrap();
    let b = cpu.alloc(16).unwrap();
    let one = OneSeq::new(&[3], 0);
    let step = one.step();
    let contract = |r: Result<(), CpuError>| match r {
        Err(CpuError::Contract(e)) => e,
        other => panic!("expected a contract error, got {other:?}"),
    };

    let matmul = Op::MatMul { out: View::new(out, 1), x: at(x), w, n: 1, act: ActQuant::Int8 };
    let e = contract(cpu.submit(&step, &[matmul]));
    assert!(matches!(e, CheckError::OutOfRange { .. }), "{e:?}");

    let add = Op::Add { out: View::new(b, 0), a: View::new(b, 4), b: View::new(b, 8), len: 8 };
    assert!(matches!(contract(cpu.submit(&step, &[add])), CheckError::Overlap { .. }));

    let embed = Op::Embed { out: at(x), table: w, scale: 1.0 };
    let far = OneSeq::new(&[8], 0);
    assert!(matches!(contract(cpu.submit(&far.step(), &[embed])), CheckError::TokenOutOfRange { .. }));

    let unknown = Op::Softcap { x: at(BufId(99)), len: 1, cap: 1.0 };
    assert!(matches!(contract(cpu.submit(&step, &[unknown])), CheckError::UnknownBuffer { .. }));

    // A float weight has no integer matmul.
    let q8 = Op::MatMulQ8 { out: at(out), xq: at(x), w: norm, n: 1 };
    assert!(matches!(contract(cpu.submit(&step, &[q8])), CheckError::Invalid { .. }));

    // A fused op is checked as a whole: its norm output overlapping its residual.
    let fused = Op::AddRmsNorm {
        x: at(x),
        x_out: at(x),
        branch: None,
        post: None,
        out: View::new(x, 0),
        w: norm,
        quant: Some(QuantOut { out: View::new(x, 32), layout: ActLayout::Q8A }),
        rows: 1,
        dim: 64,
        eps: 1e-6,
    };
    let e = cpu.submit(&step, &[fused]).unwrap_err();
    assert!(matches!(e, CpuError::Contract(_)), "{e:?}");
    assert_eq!(purehw_hal::Error::kind(&e), ErrorKind::Other);
}

#[test]
fn quantize_act_then_matmul_q8_is_matmul_int8_bit_for_bit() {
    let mut rng = Rng(0x5EED);
    for fmt in [Format::Q8_0, Format::Q4_K] {
        for n in [1, 5] {
            let (rows, cols) = (256, 512);
            let layout = fmt.act_layout().unwrap();
            let mut cpu = Cpu::new(2).unwrap();
            let (w, wb) = load(&mut cpu, &mut rng, fmt, rows, cols);
            let xs = rng.vec(n * cols, 3.0);
            let x = buf(&mut cpu, &xs);
            let (a, b) = (cpu.alloc(n * rows).unwrap(), cpu.alloc(n * rows).unwrap());
            let per = cols / act_block(layout);
            let xq = cpu.alloc(n * per * act_words(layout)).unwrap();
            let one = OneSeq::new(&vec![0; n], 0);
            let ops = [
                Op::MatMul { out: at(a), x: at(x), w, n, act: ActQuant::Int8 },
                Op::QuantizeAct { out: at(xq), x: at(x), rows: n, cols, layout },
                Op::MatMulQ8 { out: at(b), xq: at(xq), w, n },
            ];
            cpu.submit(&one.step(), &ops).unwrap();
            let what = format!("{fmt:?} n={n}");
            assert_bits(cpu.buffer(b).unwrap(), cpu.buffer(a).unwrap(), &what);

            // Both are the definition: the kernels' quantization, then `dot_row_q8a/q8k`.
            let rb = fmt.bytes_for(cols).unwrap();
            let words = cpu.buffer(xq).unwrap();
            let mut want = vec![0f32; n * rows];
            for t in 0..n {
                let xr = &xs[t * cols..(t + 1) * cols];
                let wq = &words[t * per * act_words(layout)..(t + 1) * per * act_words(layout)];
                for r in 0..rows {
                    let row = &wb[r * rb..(r + 1) * rb];
                    want[t * rows + r] = match layout {
                        ActLayout::Q8A => {
                            let mut blocks = vec![q::BlockQ8A::default(); per];
                            q::quantize_q8a(xr, &mut blocks);
                            assert!(bytemuck::cast_slice::<_, u8>(&blocks) == bytemuck::cast_slice::<_, u8>(wq));
                            q::dot_row_q8a(fmt, row, &blocks)
                        }
                        ActLayout::Q8K => {
                            let mut blocks = vec![q::BlockQ8K::default(); per];
                            q::quantize_q8k(xr, &mut blocks);
                            assert!(bytemuck::cast_slice::<_, u8>(&blocks) == bytemuck::cast_slice::<_, u8>(wq));
                            q::dot_row_q8k(fmt, row, &blocks)
                        }
                    };
                }
            }
            assert_bits(cpu.buffer(a).unwrap(), &want, &what);
        }
    }
}

#[test]
fn argmax_ranks_nan_low_inf_as_max_and_takes_the_first_tie() {
    let nan = f32::NAN;
    let inf = f32::INFINITY;
    let rows: [[f32; 5]; 6] = [
        [nan, 1.0, inf, 3.0, inf],        // +inf wins, the first of two
        [2.0, 5.0, 5.0, 1.0, nan],        // a tie: the first
        [nan, nan, nan, nan, nan],        // nothing ranks: 0
        [f32::MAX, inf, 0.0, 0.0, 0.0],   // +inf ranks as f32::MAX: a tie, the first
        [-inf, nan, -inf, -1e30, -inf],   // the only finite value
        [-0.0, 0.0, -1.0, nan, f32::MIN], // -0 == 0: the first
    ];
    let want = [2.0, 1.0, 0.0, 0.0, 3.0, 0.0];
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let mut cpu = Cpu::new(2).unwrap();
    let x = buf(&mut cpu, &flat);
    let out = cpu.alloc(rows.len()).unwrap();
    let one = OneSeq::new(&[0], 0);
    cpu.submit(&one.step(), &[Op::Argmax { out: at(out), x: at(x), rows: rows.len(), cols: 5 }]).unwrap();
    assert_bits(cpu.buffer(out).unwrap(), &want, "argmax");
    for (r, &w) in rows.iter().zip(&want) {
        assert_eq!(k::argmax(r) as f32, w);
    }
}

/// Quantized activations are reused by matmuls reading the same rows, never after those rows
/// change: by another op, or by a matmul writing into their buffer.
#[test]
fn held_activations_are_dropped_when_their_rows_change() {
    let mut rng = Rng(11);
    let (rows, cols) = (64, 64);
    let fresh = |w: &[u8], xs: &[f32]| {
        let mut cpu = Cpu::new(2).unwrap();
        let wt = HostWeight::new(Format::Q8_0, rows, cols, HostBytes::from_vec(w.to_vec())).unwrap();
        let w = cpu.load_weight(&wt).unwrap();
        let x = buf(&mut cpu, xs);
        let out = cpu.alloc(rows).unwrap();
        let one = OneSeq::new(&[0], 0);
        cpu.submit(&one.step(), &[Op::MatMul { out: at(out), x: at(x), w, n: 1, act: ActQuant::Int8 }]).unwrap();
        cpu.buffer(out).unwrap().to_vec()
    };
    let mut cpu = Cpu::new(2).unwrap();
    let (w, wb) = load(&mut cpu, &mut rng, Format::Q8_0, rows, cols);
    let xs = rng.vec(2 * cols, 1.0);
    let x = buf(&mut cpu, &xs[..cols]);
    let y = buf(&mut cpu, &xs[cols..]);
    let o = cpu.alloc(3 * rows).unwrap();
    let one = OneSeq::new(&[0], 0);
    let mm = |i: usize| Op::MatMul { out: View::new(o, i * rows), x: at(x), w, n: 1, act: ActQuant::Int8 };
    let ops = [
        mm(0),
        Op::Add { out: at(x), a: at(x), b: at(y), len: cols },
        mm(1),
        // A float matmul (no quantized activations of its own) overwriting x.
        Op::MatMul { out: at(x), x: at(y), w, n: 1, act: ActQuant::F32 },
        mm(2),
    ];
    cpu.submit(&one.step(), &ops).unwrap();
    let got = cpu.buffer(o).unwrap();
    let mut x1 = xs[..cols].to_vec();
    assert_bits(&got[..rows], &fresh(&wb, &x1), "first matmul");
    k::add_inplace(&mut x1, &xs[cols..]);
    assert_bits(&got[rows..2 * rows], &fresh(&wb, &x1), "after an Add wrote x");
    assert_bits(&got[2 * rows..], &fresh(&wb, cpu.buffer(x).unwrap()), "after a matmul wrote x");
}

/// The ops that used to run on the reference, now split across threads here: each equals its
/// kernel applied row by row (or element by element).
#[test]
fn parallel_cold_ops_equal_their_kernels() {
    let mut rng = Rng(7);
    let mut cpu = Cpu::new(2).unwrap();
    let (rows, dim, vocab) = (37, 384, 50);
    let tokens: Vec<u32> = (0..rows as u32).map(|t| (t * 7) % vocab as u32).collect();
    let one = OneSeq::new(&tokens, 5);
    let step = one.step();
    let (table, tb) = load(&mut cpu, &mut rng, Format::Q5_1, vocab, dim);
    let (norm, nb) = load(&mut cpu, &mut rng, Format::F16, 1, dim);
    let xs = rng.vec(rows * dim, 2.0);
    let ys = rng.vec(rows * dim, 2.0);
    let x = buf(&mut cpu, &xs);
    let y = buf(&mut cpu, &ys);
    let out = cpu.alloc(rows * dim).unwrap();
    let len = rows * dim;

    let mut wv = vec![0f32; dim];
    q::dequantize_row(Format::F16, &nb, &mut wv);
    let rb = Format::Q5_1.bytes_for(dim).unwrap();
    let ops = [
        Op::Embed { out: at(out), table, scale: 3.5 },
        Op::RmsNorm { out: at(x), x: at(x), w: norm, rows, dim, eps: 1e-6 },
        Op::RmsNorm { out: at(y), x: at(out), w: norm, rows, dim, eps: 1e-5 },
    ];
    cpu.submit(&step, &ops).unwrap();
    let mut embed = vec![0f32; len];
    let mut normed_x = xs.clone();
    let mut normed_e = vec![0f32; len];
    for r in 0..rows {
        let e = &mut embed[r * dim..(r + 1) * dim];
        let t = tokens[r] as usize;
        q::dequantize_row(Format::Q5_1, &tb[t * rb..(t + 1) * rb], e);
        k::scale_inplace(e, 3.5);
        k::rmsnorm_inplace(&mut normed_x[r * dim..(r + 1) * dim], &wv, 1e-6);
        k::rmsnorm(&mut normed_e[r * dim..(r + 1) * dim], &embed[r * dim..(r + 1) * dim], &wv, 1e-5);
    }
    assert_bits(cpu.buffer(out).unwrap(), &embed, "Embed");
    assert_bits(cpu.buffer(x).unwrap(), &normed_x, "RmsNorm in place");
    assert_bits(cpu.buffer(y).unwrap(), &normed_e, "RmsNorm");

    // Add (apart, in place, x + x), Softcap, Rope.
    let ops = [
        Op::Add { out: at(out), a: at(x), b: at(y), len },
        Op::Add { out: at(x), a: at(x), b: at(out), len },
        Op::Add { out: at(y), a: at(y), b: at(y), len },
        Op::Softcap { x: at(out), len, cap: 1.5 },
        Op::Rope { x: at(x), rows, heads: 6, head_dim: 64, theta: 1e4, scale: 2.0, mode: RopeMode::Neox },
        Op::Rope { x: at(y), rows, heads: 3, head_dim: 128, theta: 5e5, scale: 1.0, mode: RopeMode::Interleaved },
    ];
    cpu.submit(&step, &ops).unwrap();
    let mut sum = vec![0f32; len];
    k::add(&mut sum, &normed_x, &normed_e);
    let mut xx = normed_x.clone();
    k::add_inplace(&mut xx, &sum);
    let mut yy: Vec<f32> = normed_e.iter().map(|v| v + v).collect();
    k::softcap_inplace(&mut sum, 1.5);
    for r in 0..rows {
        let p = one.positions[r];
        k::rope(&mut xx[r * dim..(r + 1) * dim], 64, p, 1e4, 2.0, RopeMode::Neox);
        k::rope(&mut yy[r * dim..(r + 1) * dim], 128, p, 5e5, 1.0, RopeMode::Interleaved);
    }
    assert_bits(cpu.buffer(out).unwrap(), &sum, "Add, Softcap");
    assert_bits(cpu.buffer(x).unwrap(), &xx, "Add in place, Rope Neox");
    assert_bits(cpu.buffer(y).unwrap(), &yy, "x + x, Rope interleaved");
}

/// A small transformer layer and head: weights and KV caches.
struct Layer {
    w: [WeightId; 10],
    kc: BufId,
    vc: BufId,
}

const DIM: usize = 256;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;
const FFN: usize = 512;
const VOCAB: usize = 300;
const CTX: usize = 32;

impl Layer {
    fn new(cpu: &mut Cpu) -> Layer {
        let mut rng = Rng(0xA11C);
        let (qd, kvd) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
        let w = [
            (Format::Q8_0, VOCAB, DIM),  // embedding and head
            (Format::F32, 1, DIM),       // norm
            (Format::BF16, 1, HEAD_DIM), // q and k norm
            (Format::Q4_K, qd, DIM),
            (Format::Q5_K, kvd, DIM),
            (Format::Q4_K, kvd, DIM),
            (Format::F16, DIM, qd),
            (Format::Q5_0, FFN, DIM),
            (Format::Q4_1, FFN, DIM),
            (Format::Q6_K, DIM, FFN),
        ]
        .map(|(fmt, rows, cols)| load(cpu, &mut rng, fmt, rows, cols).0);
        Layer { w, kc: cpu.alloc(CTX * kvd).unwrap(), vc: cpu.alloc(CTX * kvd).unwrap() }
    }
}

/// A step of `n` rows through the layer and head, over every op kind (fused ones included), and
/// the buffers it writes.
struct Model {
    bufs: Vec<BufId>,
    ops: Vec<Op<BufId, WeightId>>,
}

impl Model {
    fn new(cpu: &mut Cpu, l: &Layer, n: usize) -> Model {
        let [emb, norm, qn, wq, wk, wv, wo, wg, wu, wd] = l.w;
        let (kc, vc) = (l.kc, l.vc);
        let mut a = |len: usize| cpu.alloc(len).unwrap();
        let (qd, kvd) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
        let [x, xn, qb, kb, vb, att, o, gate, up, down, logits, am] =
            [DIM, DIM, qd, kvd, kvd, qd, DIM, FFN, FFN, DIM, VOCAB, 1].map(|w| a(n * w));
        let xq = a(n * DIM / 32 * act_words(ActLayout::Q8A));
        let gq = a(n * FFN / 256 * act_words(ActLayout::Q8K));
        let eps = 1e-6;
        let rope = RopeSpec { theta: 1e4, scale: 1.0, mode: RopeMode::Neox };
        let ops = vec![
            Op::Embed { out: at(x), table: emb, scale: 16.0 },
            Op::AddRmsNorm {
                x: at(x),
                x_out: at(x),
                branch: None,
                post: None,
                out: at(xn),
                w: norm,
                quant: None,
                rows: n,
                dim: DIM,
                eps,
            },
            Op::Qkv {
                x: MatIn::F32 { x: at(xn), act: ActQuant::Int8 },
                wq,
                wk,
                wv,
                q: at(qb),
                k: at(kb),
                v: at(vb),
                n,
                heads: HEADS,
                kv_heads: KV_HEADS,
                head_dim: HEAD_DIM,
                q_norm: Some(qn),
                k_norm: Some(qn),
                eps,
                rope: Some(rope),
                k_cache: Some(at(kc)),
                v_cache: Some(at(vc)),
                ring: 0,
                kv: KvType::F32,
            },
            Op::Attention {
                out: at(att),
                q: at(qb),
                k: at(kc),
                v: at(vc),
                heads: HEADS,
                kv_heads: KV_HEADS,
                head_dim: HEAD_DIM,
                scale: 0.125,
                window: 6,
                softcap: 20.0,
                ring: 0,
                kv: KvType::F32,
            },
            Op::MatMul { out: at(o), x: at(att), w: wo, n, act: ActQuant::F32 },
            Op::AddRmsNorm {
                x: at(x),
                x_out: at(x),
                branch: Some(at(o)),
                post: Some(norm),
                out: at(xn),
                w: norm,
                quant: Some(QuantOut { out: at(xq), layout: ActLayout::Q8A }),
                rows: n,
                dim: DIM,
                eps,
            },
            Op::GatedFfn {
                x: MatIn::Q8(at(xq)),
                w_gate: wg,
                w_up: wu,
                gate: at(gate),
                up: at(up),
                out: at(gate),
                n,
                ffn: FFN,
                kind: Gate::GeluTanh,
                quant: Some(QuantOut { out: at(gq), layout: ActLayout::Q8K }),
            },
            Op::SiluMul { out: at(up), gate: at(up), up: at(gate), len: n * FFN },
            Op::MatMulQ8 { out: at(down), xq: at(gq), w: wd, n },
            Op::Add { out: at(x), a: at(x), b: at(down), len: n * DIM },
            Op::RmsNorm { out: at(xn), x: at(x), w: norm, rows: n, dim: DIM, eps },
            Op::MatMul { out: at(logits), x: at(xn), w: emb, n, act: ActQuant::Int8 },
            Op::Softcap { x: at(logits), len: n * VOCAB, cap: 30.0 },
            Op::Argmax { out: at(am), x: at(logits), rows: n, cols: VOCAB },
        ];
        let bufs = vec![x, xn, qb, kb, vb, att, o, gate, up, down, logits, am, kc, vc, xq, gq];
        Model { bufs, ops }
    }

    /// Submit the step; every buffer it wrote.
    fn run(&self, cpu: &mut Cpu, seq: &OneSeq) -> Vec<Vec<f32>> {
        cpu.submit(&seq.step(), &self.ops).unwrap();
        self.bufs.iter().map(|&b| cpu.buffer(b).unwrap().to_vec()).collect()
    }
}

/// Neither the thread count nor the SIMD set changes a bit: 1 thread on the scalar kernels (the
/// `purehw_kernels` functions themselves) against 2 threads on the best kernels, over a prefill
/// and decode steps.
#[test]
fn threads_and_simd_change_no_bit() {
    let prompt = OneSeq::new(&[1, 5, 9, 200, 17, 299, 3, 0, 42, 8, 8, 100], 0);
    let decode: Vec<OneSeq> = (0..3).map(|i| OneSeq::new(&[7 + i], 12 + i)).collect();
    let mut all = Vec::new();
    for mut cpu in [Cpu::with_kernels(1, scalar_kernels()).unwrap(), Cpu::new(2).unwrap()] {
        let l = Layer::new(&mut cpu);
        let (pre, dec) = (Model::new(&mut cpu, &l, prompt.tokens.len()), Model::new(&mut cpu, &l, 1));
        let mut seen = pre.run(&mut cpu, &prompt);
        decode.iter().for_each(|s| seen.extend(dec.run(&mut cpu, s)));
        all.push(seen);
    }
    for (i, (a, b)) in all[0].iter().zip(&all[1]).enumerate() {
        // The last two of each step hold quantized blocks, whose words need not be finite floats.
        assert!(i % 16 >= 14 || a.iter().all(|v| v.is_finite()), "buffer {i} is not finite");
        assert_bits(b, a, &format!("buffer {i}"));
    }
}

/// After the first step of a size, another step of that size allocates nothing.
#[test]
fn a_repeated_step_allocates_nothing() {
    let mut cpu = Cpu::new(2).unwrap();
    let l = Layer::new(&mut cpu);
    let prompt = OneSeq::new(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 0);
    let (pre, dec) = (Model::new(&mut cpu, &l, prompt.tokens.len()), Model::new(&mut cpu, &l, 1));
    pre.run(&mut cpu, &prompt);
    dec.run(&mut cpu, &OneSeq::new(&[10], 9));
    let steps: Vec<OneSeq> = (0..4).map(|i| OneSeq::new(&[11 + i], 10 + i)).collect();
    let info = allocation_counter::measure(|| {
        for s in &steps {
            cpu.submit(&s.step(), &dec.ops).unwrap();
        }
    });
    assert_eq!(info.count_total, 0, "decode steps allocated: {info:?}");
    // Nor does a failing step.
    let bad = [Op::Softcap { x: View::new(dec.bufs[0], DIM), len: 1, cap: 1.0 }];
    let info = allocation_counter::measure(|| assert!(cpu.submit(&steps[0].step(), &bad).is_err()));
    assert_eq!(info.count_total, 0, "a failing step allocated: {info:?}");
}

/// `Op::HeadArgmax`'s estimate bound holds: for random rows, rows built to cancel (codes ±127 and
/// −128 whose products nearly sum to zero, with large and tiny scales) and activations with
/// huge, tiny and zero blocks, every reference logit (`dot_row_q8a`) lies within the bounds of
/// its row's estimate; on the random rows the bounds are narrow enough to prune (0.1% of the
/// logits' largest magnitude).
#[test]
fn head_estimate_bounds_hold() {
    let k = crate::simd::Kernels::detect();
    let Some(est) = k.head_est_q8_0 else {
        eprintln!("head_estimate_bounds_hold: no estimate kernel on this CPU, skipped");
        return;
    };
    let mut rng = Rng(0x5EED_4EAD);
    let f16 = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
    for (rows, cols, n) in [(37, 640, 8), (512, 256, 16), (100, 2048, 3), (16, 32, 1)] {
        let ab = cols / 32;
        let rb = ab * 34;
        let mut w: Vec<u8> = (0..rows).flat_map(|_| random_row(&mut rng, Format::Q8_0, cols)).collect();
        for r in (0..rows).step_by(3) {
            // Cancelling codes: +127 and −128 alternating, one scale large, one tiny.
            for (b, blk) in w[r * rb..(r + 1) * rb].chunks_exact_mut(34).enumerate() {
                for (i, c) in blk[2..].iter_mut().enumerate() {
                    *c = if i % 2 == 0 { 127 } else { 0x80 };
                }
                let s = match (r + b) % 3 {
                    0 => 60000.0,
                    1 => 1e-7,
                    _ => 0.01,
                };
                blk[..2].copy_from_slice(&f16(s));
            }
        }
        let mut x: Vec<f32> = (0..n * cols).map(|_| rng.unit() * 2.0).collect();
        for (t, row) in x.chunks_exact_mut(cols).enumerate() {
            match t % 4 {
                0 => row.iter_mut().for_each(|v| *v = 1.0 + *v * 1e-3), // nearly equal codes
                1 => row.iter_mut().for_each(|v| *v *= 1e15),
                2 => row[..32].fill(0.0),
                _ => row.iter_mut().for_each(|v| *v *= 1e-20),
            }
        }
        let mut a = vec![q::BlockQ8A::default(); n * ab];
        for (x, a) in x.chunks_exact(cols).zip(a.chunks_exact_mut(ab)) {
            q::quantize_q8a(x, a);
        }
        let (mut e, mut dw) = (vec![0f32; n * rows], vec![0f32; rows]);
        est(&w, rows, &a, n, &mut e, &mut dw);
        for t in 0..n {
            let at = &a[t * ab..(t + 1) * ab];
            let tk = crate::exec::head_tk(at);
            let logits: Vec<f32> = (0..rows).map(|r| q::dot_row_q8a(Format::Q8_0, &w[r * rb..][..rb], at)).collect();
            let spread = logits.iter().fold(0f32, |m, l| m.max(l.abs()));
            for r in 0..rows {
                let (lo, hi) = crate::exec::head_bounds(e[t * rows + r], dw[r], tk);
                let l = logits[r];
                assert!(lo <= l && l <= hi, "rows {rows} cols {cols} t {t} r {r}: {l} outside [{lo}, {hi}]");
                if r % 3 != 0 && spread > 0.0 && spread.is_finite() {
                    assert!(hi - lo <= spread * 1e-3, "t {t} r {r}: bounds [{lo}, {hi}] too loose (spread {spread})");
                }
            }
        }
    }
}

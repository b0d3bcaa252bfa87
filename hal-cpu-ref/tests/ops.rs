//! Every op of `CpuRef` against a straightforward f64 computation, plus in-place forms,
//! aliasing, bitwise agreement with `dot_row`, and errors.

mod common;

use common::*;
use purehw_hal::KvType;
use purehw_hal::check::CheckError;
use purehw_hal::{ActQuant, Backend, Error as _, ErrorKind, Format, Op, OpKind, RopeMode, SeqSpan, Step, View};
use purehw_hal_cpu_ref::{BufId, CpuRef, CpuRefError, WeightId};
use purehw_kernels::quant::{dequantize_row, dot_row};

fn v(b: BufId) -> View<BufId> {
    View::new(b, 0)
}

/// A step of `rows` rows with no sequences (for ops that ignore them).
fn plain_step<'a>(tokens: &'a [u32], positions: &'a [u32]) -> Step<'a> {
    Step { tokens, positions, seqs: &[] }
}

const NO_STEP: Step<'static> = Step { tokens: &[], positions: &[], seqs: &[] };

/// The weight's rows as f32 (through the quant kernels), for f64 references.
fn dequantized(b: &CpuRef, w: WeightId) -> Vec<f32> {
    let hw = b.weight(w).unwrap();
    let mut out = vec![0f32; hw.rows * hw.cols];
    for r in 0..hw.rows {
        dequantize_row(hw.format, hw.row(r), &mut out[r * hw.cols..(r + 1) * hw.cols]);
    }
    out
}

#[test]
fn name_supports_alloc_write_read() {
    let mut b = CpuRef::new();
    assert_eq!(b.name(), "cpu-ref");
    for f in Format::ALL {
        assert!(b.supports(OpKind::Embed(f)) && b.supports(OpKind::MatMul(f)), "{f:?}");
    }
    for k in [
        OpKind::RmsNorm,
        OpKind::Rope(RopeMode::Neox),
        OpKind::Rope(RopeMode::Interleaved),
        OpKind::StoreKv,
        OpKind::Attention,
        OpKind::Add,
        OpKind::GeluTanhMul,
        OpKind::SiluMul,
        OpKind::Softcap,
        OpKind::Copy,
    ] {
        assert!(b.supports(k), "{k:?}");
    }
    let id = b.alloc(10).unwrap();
    assert_eq!(read_all(&mut b, id, 10), vec![0.0; 10]);
    b.write(View::new(id, 3), &[1.0, 2.0]).unwrap();
    let mut two = [0f32; 3];
    b.read(View::new(id, 2), &mut two).unwrap();
    assert_eq!(two, [0.0, 1.0, 2.0]);
}

#[test]
fn embed_f32_and_f16() {
    let mut rng = Rng(1);
    let (rows, cols) = (10, 16);
    let table = rng.vec(rows * cols, 1.0);
    let mut b = CpuRef::new();
    let w32 = b.load_weight(&weight_f32(rows, cols, &table)).unwrap();
    let w16 = b.load_weight(&weight_f16(rows, cols, &table)).unwrap();
    let tokens = [3u32, 0, 9, 3];
    let step = plain_step(&tokens, &[0, 1, 2, 3]);
    let out = b.alloc(tokens.len() * cols).unwrap();
    for w in [w32, w16] {
        b.submit(&step, &[Op::Embed { out: v(out), table: w, scale: 1.5 }]).unwrap();
        let got = read_all(&mut b, out, tokens.len() * cols);
        let t = dequantized(&b, w);
        let want: Vec<f32> =
            tokens.iter().flat_map(|&tok| t[tok as usize * cols..][..cols].iter().map(|x| x * 1.5)).collect();
        assert_eq!(bits(&got), bits(&want));
        let want64: Vec<f64> = tokens
            .iter()
            .flat_map(|&tok| table[tok as usize * cols..][..cols].iter().map(|&x| x as f64 * 1.5))
            .collect();
        let e = nmse(&got, &want64);
        assert!(e < if w == w32 { 1e-14 } else { 1e-6 }, "{e:e}");
    }
}

#[test]
fn rmsnorm_out_of_place_and_in_place() {
    let mut rng = Rng(2);
    let (rows, dim, eps) = (3, 64, 1e-6f32);
    let x = rng.vec(rows * dim, 1.0);
    let w: Vec<f32> = rng.vec(dim, 1.0).iter().map(|v| 1.0 + 0.5 * v).collect();
    let mut want = vec![0f64; rows * dim];
    for r in 0..rows {
        let xr = &x[r * dim..(r + 1) * dim];
        let ms = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / dim as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for i in 0..dim {
            want[r * dim + i] = xr[i] as f64 * inv * w[i] as f64;
        }
    }
    let mut b = CpuRef::new();
    let wn = b.load_weight(&weight_f32(1, dim, &w)).unwrap();
    let xb = buf_with(&mut b, &x);
    let out = b.alloc(rows * dim).unwrap();
    b.submit(&NO_STEP, &[Op::RmsNorm { out: v(out), x: v(xb), w: wn, rows, dim, eps }]).unwrap();
    let got = read_all(&mut b, out, rows * dim);
    assert_close(&got, &want, "rmsnorm");

    b.submit(&NO_STEP, &[Op::RmsNorm { out: v(xb), x: v(xb), w: wn, rows, dim, eps }]).unwrap();
    assert_eq!(bits(&read_all(&mut b, xb, rows * dim)), bits(&got), "in place differs");

    // A weight of the wrong shape is an error, not a panic.
    let e = b.submit(&NO_STEP, &[Op::RmsNorm { out: v(out), x: v(xb), w: wn, rows: 1, dim: 32, eps }]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Other);
}

#[test]
fn matmul_f32_against_f64_and_aliasing_in_one_buffer() {
    let mut rng = Rng(3);
    let (rows, cols, n) = (7, 40, 3);
    let w = rng.vec(rows * cols, 1.0);
    let x = rng.vec(n * cols, 1.0);
    let want: Vec<f64> = (0..n)
        .flat_map(|t| {
            let (w, x) = (&w, &x);
            (0..rows).map(move |r| (0..cols).map(|c| w[r * cols + c] as f64 * x[t * cols + c] as f64).sum())
        })
        .collect();
    let mut b = CpuRef::new();
    let wid = b.load_weight(&weight_f32(rows, cols, &w)).unwrap();
    let xb = buf_with(&mut b, &x);
    let out = b.alloc(n * rows).unwrap();
    b.submit(&NO_STEP, &[Op::MatMul { out: v(out), x: v(xb), w: wid, n, act: ActQuant::F32 }]).unwrap();
    let got = read_all(&mut b, out, n * rows);
    assert_close(&got, &want, "matmul");

    // x and out in one buffer, out after x and out before x.
    let one = b.alloc(n * cols + n * rows).unwrap();
    b.write(View::new(one, 0), &x).unwrap();
    b.submit(
        &NO_STEP,
        &[Op::MatMul { out: View::new(one, n * cols), x: View::new(one, 0), w: wid, n, act: ActQuant::F32 }],
    )
    .unwrap();
    let mut r = vec![0f32; n * rows];
    b.read(View::new(one, n * cols), &mut r).unwrap();
    assert_eq!(bits(&r), bits(&got));
    b.write(View::new(one, n * rows), &x).unwrap();
    b.submit(
        &NO_STEP,
        &[Op::MatMul { out: View::new(one, 0), x: View::new(one, n * rows), w: wid, n, act: ActQuant::F32 }],
    )
    .unwrap();
    b.read(View::new(one, 0), &mut r).unwrap();
    assert_eq!(bits(&r), bits(&got));

    // Overlapping x and out is refused.
    let e = b
        .submit(&NO_STEP, &[Op::MatMul { out: View::new(one, 5), x: View::new(one, 0), w: wid, n, act: ActQuant::F32 }])
        .unwrap_err();
    assert!(matches!(e, CpuRefError::Contract(CheckError::Overlap { .. })), "{e}");
}

#[test]
fn matmul_equals_dot_row_bitwise_for_every_format() {
    let mut rng = Rng(4);
    let n = 3;
    for fmt in Format::ALL {
        let (rows, cols) = if fmt.block_elems() == 1 { (9, 77) } else { (5, 512) };
        let hw = match fmt {
            Format::F32 => weight_f32(rows, cols, &rng.vec(rows * cols, 1.0)),
            Format::F16 => weight_f16(rows, cols, &rng.vec(rows * cols, 1.0)),
            Format::BF16 => weight_bf16(rows, cols, &rng.vec(rows * cols, 1.0)),
            _ => weight_random_quant(&mut rng, fmt, rows, cols),
        };
        let x = rng.vec(n * cols, 1.0);
        let mut b = CpuRef::new();
        let w = b.load_weight(&hw).unwrap();
        let xb = buf_with(&mut b, &x);
        let out = b.alloc(n * rows).unwrap();
        b.submit(&NO_STEP, &[Op::MatMul { out: v(out), x: v(xb), w, n, act: ActQuant::F32 }]).unwrap();
        let got = read_all(&mut b, out, n * rows);
        for t in 0..n {
            for r in 0..rows {
                let want = dot_row(fmt, hw.row(r), &x[t * cols..(t + 1) * cols]);
                assert!(want.is_finite(), "{fmt:?}");
                assert_eq!(got[t * rows + r].to_bits(), want.to_bits(), "{fmt:?} t={t} r={r}");
            }
        }
    }
}

fn rope_ref(x: &[f32], heads: usize, hd: usize, pos: &[u32], theta: f64, scale: f64, mode: RopeMode) -> Vec<f64> {
    let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for (t, &p) in pos.iter().enumerate() {
        for h in 0..heads {
            let base = (t * heads + h) * hd;
            for i in 0..hd / 2 {
                let f = 1.0 / theta.powf(2.0 * i as f64 / hd as f64) / scale;
                let (s, c) = (p as f64 * f).sin_cos();
                let (ia, ib) = match mode {
                    RopeMode::Neox => (i, i + hd / 2),
                    RopeMode::Interleaved => (2 * i, 2 * i + 1),
                };
                let (a, b) = (x[base + ia] as f64, x[base + ib] as f64);
                out[base + ia] = a * c - b * s;
                out[base + ib] = b * c + a * s;
            }
        }
    }
    out
}

#[test]
fn rope_both_modes() {
    let mut rng = Rng(5);
    let (heads, hd) = (3, 32);
    let pos = [0u32, 1, 7, 31];
    let x = rng.vec(pos.len() * heads * hd, 1.0);
    for mode in [RopeMode::Neox, RopeMode::Interleaved] {
        for (theta, scale) in [(10000.0f32, 1.0f32), (1_000_000.0, 8.0)] {
            let mut b = CpuRef::new();
            let xb = buf_with(&mut b, &x);
            let step = plain_step(&[0, 0, 0, 0], &pos);
            let op = Op::Rope { x: v(xb), rows: pos.len(), heads, head_dim: hd, theta, scale, mode };
            b.submit(&step, &[op]).unwrap();
            let got = read_all(&mut b, xb, x.len());
            let want = rope_ref(&x, heads, hd, &pos, theta as f64, scale as f64, mode);
            let e = nmse(&got, &want);
            assert!(e < 1e-11, "{mode:?} theta={theta} scale={scale}: nmse {e:e}");
            // Position 0 is the identity.
            assert_eq!(bits(&got[..heads * hd]), bits(&x[..heads * hd]));
        }
    }
}

#[test]
fn elementwise_ops_and_in_place_forms() {
    let mut rng = Rng(6);
    let len = 100;
    let a: Vec<f32> = rng.vec(len, 1.0).iter().map(|x| x * 4.0).collect();
    let c: Vec<f32> = rng.vec(len, 1.0).iter().map(|x| x * 4.0).collect();
    let gelu = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
    let silu = |x: f64| x / (1.0 + (-x).exp());
    let cap = 3.0f32;

    let mut b = CpuRef::new();
    let ab = buf_with(&mut b, &a);
    let cb = buf_with(&mut b, &c);
    let out = b.alloc(len).unwrap();
    let want_add: Vec<f64> = a.iter().zip(&c).map(|(&x, &y)| x as f64 + y as f64).collect();
    let want_gelu: Vec<f64> = a.iter().zip(&c).map(|(&x, &y)| gelu(x as f64) * y as f64).collect();
    let want_silu: Vec<f64> = a.iter().zip(&c).map(|(&x, &y)| silu(x as f64) * y as f64).collect();
    let want_cap: Vec<f64> = a.iter().map(|&x| cap as f64 * (x as f64 / cap as f64).tanh()).collect();

    type MakeOp = fn(View<BufId>, View<BufId>, View<BufId>, usize) -> Op<BufId, WeightId>;
    let cases: [(&str, MakeOp, &Vec<f64>); 3] = [
        ("add", |out, a, b, len| Op::Add { out, a, b, len }, &want_add),
        ("gelu", |out, gate, up, len| Op::GeluTanhMul { out, gate, up, len }, &want_gelu),
        ("silu", |out, gate, up, len| Op::SiluMul { out, gate, up, len }, &want_silu),
    ];
    for (name, make, want) in cases {
        b.write(v(ab), &a).unwrap();
        b.submit(&NO_STEP, &[make(v(out), v(ab), v(cb), len)]).unwrap();
        let got = read_all(&mut b, out, len);
        assert_close(&got, want, name);
        // In place: out == first input.
        b.submit(&NO_STEP, &[make(v(ab), v(ab), v(cb), len)]).unwrap();
        assert_eq!(bits(&read_all(&mut b, ab, len)), bits(&got), "{name} in place");
    }

    // Add in place on the second operand, and on both.
    b.write(v(ab), &a).unwrap();
    b.write(v(out), &c).unwrap();
    b.submit(&NO_STEP, &[Op::Add { out: v(out), a: v(ab), b: v(out), len }]).unwrap();
    assert_close(&read_all(&mut b, out, len), &want_add, "add out==b");
    b.submit(&NO_STEP, &[Op::Add { out: v(ab), a: v(ab), b: v(ab), len }]).unwrap();
    let twice: Vec<f64> = a.iter().map(|&x| 2.0 * x as f64).collect();
    assert_close(&read_all(&mut b, ab, len), &twice, "add out==a==b");

    // Softcap in place.
    b.write(v(ab), &a).unwrap();
    b.submit(&NO_STEP, &[Op::Softcap { x: v(ab), len, cap }]).unwrap();
    assert_close(&read_all(&mut b, ab, len), &want_cap, "softcap");
    let e = b.submit(&NO_STEP, &[Op::Softcap { x: v(ab), len, cap: 0.0 }]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Other);

    // out == up is not an in-place form hal allows.
    let e = b.submit(&NO_STEP, &[Op::SiluMul { out: v(cb), gate: v(ab), up: v(cb), len }]).unwrap_err();
    assert!(matches!(e, CpuRefError::Contract(CheckError::Overlap { .. })), "{e}");
}

/// Attention reference: one f64 softmax per query row and head over the visible cache rows.
#[allow(clippy::too_many_arguments)]
fn attention_ref(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    seqs: &[SeqSpan],
    heads: usize,
    kv_heads: usize,
    hd: usize,
    scale: f64,
    window: usize,
    softcap: f64,
    rows: usize,
) -> Vec<f64> {
    let (qw, kvw) = (heads * hd, kv_heads * hd);
    let mut out = vec![0f64; rows * qw];
    for s in seqs {
        for i in 0..s.len as usize {
            let (t, p) = (s.row as usize + i, s.pos0 as usize + i);
            for h in 0..heads {
                let kh = h / (heads / kv_heads);
                let qv = &q[t * qw + h * hd..][..hd];
                let visible: Vec<usize> = (0..=p).filter(|&j| window == 0 || p - j < window).collect();
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        let kv = &kc[(s.cache_row as usize + j) * kvw + kh * hd..][..hd];
                        let d: f64 = qv.iter().zip(kv).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale;
                        if softcap > 0.0 { softcap * (d / softcap).tanh() } else { d }
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (&j, &w) in visible.iter().zip(&e) {
                    let vv = &vc[(s.cache_row as usize + j) * kvw + kh * hd..][..hd];
                    for d in 0..hd {
                        out[t * qw + h * hd + d] += w / sum * vv[d] as f64;
                    }
                }
            }
        }
    }
    out
}

#[test]
fn store_kv_and_attention_gqa_window_softcap_two_seqs() {
    let mut rng = Rng(7);
    let (heads, kv_heads, hd) = (4, 2, 16);
    let (qw, kvw) = (heads * hd, kv_heads * hd);
    let ctx = 16;
    // Seq A: a 3-token prefill in slot 0. Seq B: 2 tokens at positions 6, 7 in slot 1, whose
    // positions 0..6 are already cached.
    let seqs = [
        SeqSpan { row: 0, len: 3, cache_row: 0, pos0: 0, ring_row: 0 },
        SeqSpan { row: 3, len: 2, cache_row: ctx as u32, pos0: 6, ring_row: 0 },
    ];
    let tokens = [0u32; 5];
    let positions = [0u32, 1, 2, 6, 7];
    let step = Step { tokens: &tokens, positions: &positions, seqs: &seqs };
    let rows = tokens.len();

    let q = rng.vec(rows * qw, 1.0);
    let new_k = rng.vec(rows * kvw, 1.0);
    let new_v = rng.vec(rows * kvw, 1.0);
    let mut kc: Vec<f32> = vec![0.0; 2 * ctx * kvw];
    let mut vc = kc.clone();
    for p in 0..6 {
        let r = (ctx + p) * kvw;
        kc[r..r + kvw].copy_from_slice(&rng.vec(kvw, 1.0));
        vc[r..r + kvw].copy_from_slice(&rng.vec(kvw, 1.0));
    }

    let mut b = CpuRef::new();
    let (qb, kb, vb) = (buf_with(&mut b, &q), buf_with(&mut b, &new_k), buf_with(&mut b, &new_v));
    let (kcb, vcb) = (buf_with(&mut b, &kc), buf_with(&mut b, &vc));
    let out = b.alloc(rows * qw).unwrap();
    b.submit(
        &step,
        &[
            Op::StoreKv { cache: v(kcb), src: v(kb), width: kvw, ring: 0, kv: KvType::F32 },
            Op::StoreKv { cache: v(vcb), src: v(vb), width: kvw, ring: 0, kv: KvType::F32 },
        ],
    )
    .unwrap();
    // The expected cache: each seq's new rows at cache_row + pos0 + i.
    for s in &seqs {
        for i in 0..s.len as usize {
            let (src, dst) = ((s.row as usize + i) * kvw, (s.cache_row + s.pos0) as usize * kvw + i * kvw);
            kc[dst..dst + kvw].copy_from_slice(&new_k[src..src + kvw]);
            vc[dst..dst + kvw].copy_from_slice(&new_v[src..src + kvw]);
        }
    }
    assert_eq!(bits(&read_all(&mut b, kcb, kc.len())), bits(&kc));
    assert_eq!(bits(&read_all(&mut b, vcb, vc.len())), bits(&vc));

    let scale = 1.0 / (hd as f32).sqrt();
    for (window, softcap, sc) in [(0usize, 0.0f32, scale), (3, 0.0, scale), (2, 0.0, 4.0), (0, 2.0, 4.0), (4, 1.5, 3.0)]
    {
        let op = Op::Attention {
            out: v(out),
            q: v(qb),
            k: v(kcb),
            v: v(vcb),
            heads,
            kv_heads,
            head_dim: hd,
            scale: sc,
            window,
            softcap,
            ring: 0,
            kv: KvType::F32,
        };
        b.submit(&step, &[op]).unwrap();
        let got = read_all(&mut b, out, rows * qw);
        let want = attention_ref(&q, &kc, &vc, &seqs, heads, kv_heads, hd, sc as f64, window, softcap as f64, rows);
        let e = nmse(&got, &want);
        assert!(e < 1e-11, "window={window} softcap={softcap}: nmse {e:e}");
    }

    // Position 0 sees only itself: its output is its own value row.
    let op = Op::Attention {
        out: v(out),
        q: v(qb),
        k: v(kcb),
        v: v(vcb),
        heads,
        kv_heads,
        head_dim: hd,
        scale,
        window: 0,
        softcap: 0.0,
        ring: 0,
        kv: KvType::F32,
    };
    b.submit(&step, &[op]).unwrap();
    let got = read_all(&mut b, out, qw);
    for h in 0..heads {
        let kh = h / 2;
        assert_eq!(bits(&got[h * hd..][..hd]), bits(&vc[kh * hd..][..hd]), "head {h}");
    }

    // kv_heads must divide heads.
    let bad = Op::Attention {
        out: v(out),
        q: v(qb),
        k: v(kcb),
        v: v(vcb),
        heads: 4,
        kv_heads: 3,
        head_dim: hd,
        scale,
        window: 0,
        softcap: 0.0,
        ring: 0,
        kv: KvType::F32,
    };
    assert_eq!(b.submit(&step, &[bad]).unwrap_err().kind(), ErrorKind::Other);
}

#[test]
fn errors_for_bad_views_tokens_handles() {
    let mut b = CpuRef::new();
    let a = b.alloc(10).unwrap();
    let c = b.alloc(10).unwrap();

    // A view plus its length past the end.
    let e = b.submit(&NO_STEP, &[Op::Add { out: View::new(a, 5), a: v(a), b: v(c), len: 6 }]).unwrap_err();
    assert!(matches!(e, CpuRefError::Contract(CheckError::OutOfRange { end: 11, len: 10, .. })), "{e}");
    assert_eq!(e.kind(), ErrorKind::Other);
    let e = b.submit(&NO_STEP, &[Op::Add { out: v(a), a: v(a), b: View::new(c, 1), len: 10 }]).unwrap_err();
    assert!(matches!(e, CpuRefError::Contract(CheckError::OutOfRange { .. })), "{e}");
    // An input in the output's own buffer, past its end.
    let e = b.submit(&NO_STEP, &[Op::Add { out: v(a), a: View::new(a, 5), b: v(c), len: 5 }]);
    assert!(e.is_ok(), "disjoint halves of one buffer are fine");
    let e = b.submit(&NO_STEP, &[Op::Add { out: v(a), a: View::new(a, 6), b: v(c), len: 5 }]).unwrap_err();
    assert!(matches!(e, CpuRefError::Contract(CheckError::OutOfRange { .. })), "{e}");
    // Offsets that overflow are errors too.
    let e = b.submit(&NO_STEP, &[Op::Softcap { x: View::new(a, usize::MAX), len: 2, cap: 1.0 }]).unwrap_err();
    assert!(matches!(e, CpuRefError::Contract(CheckError::OutOfRange { .. })), "{e}");
    assert!(b.write(View::new(a, 9), &[1.0, 2.0]).is_err());
    assert!(b.read(View::new(a, 9), &mut [0.0; 2]).is_err());
    // Partial overlap between out and an input.
    let e = b.submit(&NO_STEP, &[Op::Add { out: View::new(a, 0), a: View::new(a, 3), b: v(c), len: 5 }]).unwrap_err();
    assert!(matches!(e, CpuRefError::Contract(CheckError::Overlap { .. })), "{e}");
    // Copy: within one buffer apart is fine; overlapping (even exactly: no in-place copy) or
    // past the end is not.
    b.write(v(a), &(0..10).map(|i| i as f32).collect::<Vec<_>>()).unwrap();
    b.submit(&NO_STEP, &[Op::Copy { out: View::new(a, 6), src: View::new(a, 1), len: 4 }]).unwrap();
    assert_eq!(b.buffer(a).unwrap(), [0., 1., 2., 3., 4., 5., 1., 2., 3., 4.]);
    for (out, src) in [(4, 1), (1, 1), (0, 3)] {
        let op = Op::Copy { out: View::new(a, out), src: View::new(a, src), len: 4 };
        let e = b.submit(&NO_STEP, &[op]).unwrap_err();
        assert!(matches!(e, CpuRefError::Contract(CheckError::Overlap { .. })), "{out} {src}: {e}");
    }
    let e = b.submit(&NO_STEP, &[Op::Copy { out: View::new(a, 7), src: v(c), len: 4 }]).unwrap_err();
    assert!(matches!(e, CpuRefError::Contract(CheckError::OutOfRange { .. })), "{e}");
    let e = b.submit(&NO_STEP, &[Op::Copy { out: v(a), src: View::new(a, 7), len: 4 }]).unwrap_err();
    assert!(matches!(e, CpuRefError::Contract(CheckError::OutOfRange { .. })), "{e}");

    // An unknown handle (from another backend with more buffers).
    let mut other = CpuRef::new();
    let _ = (other.alloc(1).unwrap(), other.alloc(1).unwrap());
    let stray = other.alloc(1).unwrap();
    let e = b.submit(&NO_STEP, &[Op::Softcap { x: v(stray), len: 1, cap: 1.0 }]).unwrap_err();
    assert!(matches!(e, CpuRefError::Contract(CheckError::UnknownBuffer { .. })), "{e}");

    // Token ids past the embedding table.
    let w = b.load_weight(&weight_f32(4, 2, &[0.0; 8])).unwrap();
    let out = b.alloc(4).unwrap();
    let step = plain_step(&[1, 4], &[0, 1]);
    let e = b.submit(&step, &[Op::Embed { out: v(out), table: w, scale: 1.0 }]).unwrap_err();
    assert!(matches!(e, CpuRefError::Contract(CheckError::TokenOutOfRange { token: 4, row: 1, rows: 4 })), "{e}");
    assert_eq!(e.kind(), ErrorKind::Other);
    // The embedding output too small for the step.
    let step = plain_step(&[1, 2, 3], &[0, 1, 2]);
    let e = b.submit(&step, &[Op::Embed { out: v(out), table: w, scale: 1.0 }]).unwrap_err();
    assert!(matches!(e, CpuRefError::Contract(CheckError::OutOfRange { .. })), "{e}");

    // StoreKv past the cache's end.
    let seqs = [SeqSpan { row: 0, len: 1, cache_row: 4, pos0: 1, ring_row: 0 }];
    let step = Step { tokens: &[0], positions: &[0], seqs: &seqs };
    let e = b.submit(&step, &[Op::StoreKv { cache: v(a), src: v(c), width: 2, ring: 0, kv: KvType::F32 }]).unwrap_err();
    assert!(matches!(e, CpuRefError::Contract(CheckError::OutOfRange { .. })), "{e}");
    // A sequence whose rows run past the step's rows.
    let seqs = [SeqSpan { row: 0, len: 2, cache_row: 0, pos0: 0, ring_row: 0 }];
    let step = Step { tokens: &[0], positions: &[0], seqs: &seqs };
    let e = b.submit(&step, &[Op::StoreKv { cache: v(a), src: v(c), width: 2, ring: 0, kv: KvType::F32 }]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Other);

    // Rope with more rows than positions.
    let e = b
        .submit(
            &plain_step(&[0], &[0]),
            &[Op::Rope { x: v(a), rows: 2, heads: 1, head_dim: 4, theta: 1e4, scale: 1.0, mode: RopeMode::Neox }],
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Other);
}

#[test]
fn bad_weights_are_rejected() {
    use purehw_hal::{HostBytes, HostWeight};
    let mut b = CpuRef::new();
    let hw = HostWeight {
        format: Format::F32,
        rows: 2,
        cols: 3,
        data: HostBytes::from_vec(vec![0; 20]),
        parts: Default::default(),
    };
    assert!(matches!(b.load_weight(&hw).unwrap_err(), CpuRefError::BadWeight { .. }));
    let hw = HostWeight {
        format: Format::Q8_0,
        rows: 1,
        cols: 31,
        data: HostBytes::from_vec(vec![0; 34]),
        parts: Default::default(),
    };
    assert!(matches!(b.load_weight(&hw).unwrap_err(), CpuRefError::BadWeight { .. }));
}

/// Two sequences fed in steps of several rows through a sliding window: ring caches of
/// `window + most rows - 1` rows give bit for bit what linear caches give, every step, after
/// the ring has wrapped several times.
#[test]
fn ring_caches_give_the_linear_caches_numbers() {
    let mut rng = Rng(11);
    let (heads, kv_heads, hd, window, ctx) = (4, 2, 16, 5, 40);
    let (qw, kvw) = (heads * hd, kv_heads * hd);
    let chunks: [&[usize]; 2] = [&[4, 1, 3, 4, 1, 1, 4, 2, 4, 1, 4], &[1, 4, 4, 2, 1, 3, 4, 4, 1, 1, 2]];
    let most = 4;
    let ring = window + most - 1;
    let mut b = CpuRef::new();
    let (lk, lv) = (b.alloc(2 * ctx * kvw).unwrap(), b.alloc(2 * ctx * kvw).unwrap());
    let (rk, rv) = (b.alloc(2 * ring * kvw).unwrap(), b.alloc(2 * ring * kvw).unwrap());
    let (qb, kb, vb) =
        (b.alloc(2 * most * qw).unwrap(), b.alloc(2 * most * kvw).unwrap(), b.alloc(2 * most * kvw).unwrap());
    let (lo, ro) = (b.alloc(2 * most * qw).unwrap(), b.alloc(2 * most * qw).unwrap());
    let mut pos = [0usize; 2];
    for (step_i, (&a, &b_len)) in chunks[0].iter().zip(chunks[1]).enumerate() {
        let lens = [a, b_len];
        let mut seqs = Vec::new();
        let mut positions = Vec::new();
        for (slot, &len) in lens.iter().enumerate() {
            seqs.push(SeqSpan {
                row: positions.len() as u32,
                len: len as u32,
                cache_row: (slot * ctx) as u32,
                pos0: pos[slot] as u32,
                ring_row: (slot * ring) as u32,
            });
            positions.extend((pos[slot]..pos[slot] + len).map(|p| p as u32));
            pos[slot] += len;
        }
        let rows = positions.len();
        let tokens = vec![0u32; rows];
        let step = Step { tokens: &tokens, positions: &positions, seqs: &seqs };
        b.write(v(qb), &rng.vec(rows * qw, 1.0)).unwrap();
        b.write(v(kb), &rng.vec(rows * kvw, 1.0)).unwrap();
        b.write(v(vb), &rng.vec(rows * kvw, 1.0)).unwrap();
        let attn = |out, k, v_, ring| Op::Attention {
            out: v(out),
            q: v(qb),
            k: v(k),
            v: v(v_),
            heads,
            kv_heads,
            head_dim: hd,
            scale: 0.7,
            window,
            softcap: 20.0,
            ring,
            kv: KvType::F32,
        };
        let ops = [
            Op::StoreKv { cache: v(lk), src: v(kb), width: kvw, ring: 0, kv: KvType::F32 },
            Op::StoreKv { cache: v(lv), src: v(vb), width: kvw, ring: 0, kv: KvType::F32 },
            attn(lo, lk, lv, 0),
            Op::StoreKv { cache: v(rk), src: v(kb), width: kvw, ring, kv: KvType::F32 },
            Op::StoreKv { cache: v(rv), src: v(vb), width: kvw, ring, kv: KvType::F32 },
            attn(ro, rk, rv, ring),
        ];
        b.submit(&step, &ops).unwrap();
        let (want, got) = (read_all(&mut b, lo, rows * qw), read_all(&mut b, ro, rows * qw));
        assert_eq!(bits(&got), bits(&want), "step {step_i} (positions {positions:?})");
        assert!(want.iter().all(|x| x.is_finite()) && want.iter().any(|&x| x != 0.0));
        // The ring holds each slot's last `ring` positions at rows p % ring.
        let (lin, rng_) = (read_all(&mut b, lk, 2 * ctx * kvw), read_all(&mut b, rk, 2 * ring * kvw));
        for (slot, &end) in pos.iter().enumerate() {
            for p in end.saturating_sub(ring)..end {
                let l = &lin[(slot * ctx + p) * kvw..][..kvw];
                let r = &rng_[(slot * ring + p % ring) * kvw..][..kvw];
                assert_eq!(bits(l), bits(r), "slot {slot} position {p}");
            }
        }
    }
    assert!(pos.iter().all(|&p| p > 3 * ring), "the rings wrapped several times: {pos:?}");
}

/// A ring that cannot hold what a step's queries see is a clear contract error, never a panic.
#[test]
fn a_short_ring_is_an_error() {
    let mut b = CpuRef::new();
    let (hd, window) = (8, 5);
    let big = b.alloc(4096).unwrap();
    let seqs = [SeqSpan { row: 0, len: 4, cache_row: 0, pos0: 30, ring_row: 0 }];
    let (tokens, positions) = ([0u32; 4], [30u32, 31, 32, 33]);
    let step = Step { tokens: &tokens, positions: &positions, seqs: &seqs };
    let attn = |window, ring| Op::Attention {
        out: View::new(big, 0),
        q: View::new(big, 100),
        k: View::new(big, 200),
        v: View::new(big, 400),
        heads: 1,
        kv_heads: 1,
        head_dim: hd,
        scale: 1.0,
        window,
        softcap: 0.0,
        ring,
        kv: KvType::F32,
    };
    let mut msg = |op| match b.submit(&step, &[op]) {
        Err(CpuRefError::Contract(e @ CheckError::Invalid { .. })) => e.to_string(),
        r => panic!("expected a contract error, got {r:?}"),
    };
    // window + rows - 1 = 8 rows are needed.
    let m = msg(attn(window, 7));
    assert!(m.contains("ring too short"), "{m}");
    let m = msg(attn(0, 16));
    assert!(m.contains("sliding window"), "{m}");
    let m =
        msg(Op::StoreKv { cache: View::new(big, 0), src: View::new(big, 100), width: hd, ring: 3, kv: KvType::F32 });
    assert!(m.contains("more rows in one step than its ring"), "{m}");
    b.submit(&step, &[attn(window, 8)]).unwrap();
}

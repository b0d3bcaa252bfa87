//! Whole steps through the backend: `cargo bench -p purehw-hal-cpu --bench step`.
//!
//! A synthetic model of Gemma 3 270M's shapes (random weights, 4 layers, a 32k vocabulary) runs
//! a prefill of 64 tokens and decode steps, in both activation modes, as primitive ops only, so
//! that any backend revision can run it. Reported: the best wall time per step.
//! `BENCH_THREADS` sets the pool size (default: one per core).

use purehw_hal::KvType;
use std::time::{Duration, Instant};

use purehw_hal::{ActQuant, Backend, Format, HostBytes, HostWeight, Op, RopeMode, SeqSpan, Step, View};
use purehw_hal_cpu::{BufId, Cpu, WeightId};
use purehw_kernels::testing::Rng;

const DIM: usize = 640;
const HEADS: usize = 4;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 256;
const FFN: usize = 2048;
const VOCAB: usize = 32768;
const LAYERS: usize = 4;
const CTX: usize = 512;
const PREFILL: usize = 64;

fn weight(cpu: &mut Cpu, rng: &mut Rng, fmt: Format, rows: usize, cols: usize) -> WeightId {
    let mut w = vec![0u8; fmt.bytes_for(cols).unwrap() * rows];
    for c in w.chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    match fmt {
        Format::F32 => w.chunks_exact_mut(4).for_each(|c| c.copy_from_slice(&(1.0 + 0.1 * rng.unit()).to_le_bytes())),
        Format::Q6_K => w.chunks_exact_mut(fmt.block_bytes()).for_each(|c| c[208..210].copy_from_slice(&f16(0.01))),
        Format::Q4_K => w.chunks_exact_mut(fmt.block_bytes()).for_each(|c| {
            c[0..2].copy_from_slice(&f16(0.005));
            c[2..4].copy_from_slice(&f16(0.002));
        }),
        _ => w.chunks_exact_mut(fmt.block_bytes()).for_each(|c| c[0..2].copy_from_slice(&f16(0.005))),
    }
    let hw = HostWeight::new(fmt, rows, cols, HostBytes::from_vec(w)).unwrap();
    cpu.load_weight(&hw).unwrap()
}

struct LayerW {
    norm: [WeightId; 4],
    qk_norm: WeightId,
    wq: WeightId,
    wk: WeightId,
    wv: WeightId,
    wo: WeightId,
    gate: WeightId,
    up: WeightId,
    down: WeightId,
    kc: BufId,
    vc: BufId,
}

struct Model {
    emb: WeightId,
    final_norm: WeightId,
    layers: Vec<LayerW>,
}

fn model(cpu: &mut Cpu) -> Model {
    let mut rng = Rng(0x5EED_1234);
    let (qd, kvd) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let emb = weight(cpu, &mut rng, Format::Q8_0, VOCAB, DIM);
    let final_norm = weight(cpu, &mut rng, Format::F32, 1, DIM);
    let layers = (0..LAYERS)
        .map(|_| LayerW {
            norm: [(); 4].map(|_| weight(cpu, &mut rng, Format::F32, 1, DIM)),
            qk_norm: weight(cpu, &mut rng, Format::F32, 1, HEAD_DIM),
            wq: weight(cpu, &mut rng, Format::Q8_0, qd, DIM),
            wk: weight(cpu, &mut rng, Format::Q8_0, kvd, DIM),
            wv: weight(cpu, &mut rng, Format::Q8_0, kvd, DIM),
            wo: weight(cpu, &mut rng, Format::Q8_0, DIM, qd),
            gate: weight(cpu, &mut rng, Format::Q5_0, FFN, DIM),
            up: weight(cpu, &mut rng, Format::Q4_0, FFN, DIM),
            down: weight(cpu, &mut rng, Format::Q6_K, DIM, FFN),
            kc: cpu.alloc(CTX * kvd).unwrap(),
            vc: cpu.alloc(CTX * kvd).unwrap(),
        })
        .collect();
    Model { emb, final_norm, layers }
}

/// The ops of a step of `n` rows, Gemma 3's order, primitive ops only.
fn ops(cpu: &mut Cpu, m: &Model, n: usize, act: ActQuant) -> Vec<Op<BufId, WeightId>> {
    let (qd, kvd) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut a = |len: usize| View::new(cpu.alloc(len).unwrap(), 0);
    let [x, xn, q, k, v, att, o, gate, up, logits] =
        [DIM, DIM, qd, kvd, kvd, qd, DIM, FFN, FFN, VOCAB].map(|w| a(n * w));
    let eps = 1e-6;
    let mut ops = vec![Op::Embed { out: x, table: m.emb, scale: (DIM as f32).sqrt() }];
    for l in &m.layers {
        let rope =
            |x, heads| Op::Rope { x, rows: n, heads, head_dim: HEAD_DIM, theta: 1e4, scale: 1.0, mode: RopeMode::Neox };
        ops.extend([
            Op::RmsNorm { out: xn, x, w: l.norm[0], rows: n, dim: DIM, eps },
            Op::MatMul { out: q, x: xn, w: l.wq, n, act },
            Op::MatMul { out: k, x: xn, w: l.wk, n, act },
            Op::MatMul { out: v, x: xn, w: l.wv, n, act },
            Op::RmsNorm { out: q, x: q, w: l.qk_norm, rows: n * HEADS, dim: HEAD_DIM, eps },
            Op::RmsNorm { out: k, x: k, w: l.qk_norm, rows: n * KV_HEADS, dim: HEAD_DIM, eps },
            rope(q, HEADS),
            rope(k, KV_HEADS),
            Op::StoreKv { cache: View::new(l.kc, 0), src: k, width: kvd, ring: 0, kv: KvType::F32 },
            Op::StoreKv { cache: View::new(l.vc, 0), src: v, width: kvd, ring: 0, kv: KvType::F32 },
            Op::Attention {
                out: att,
                q,
                k: View::new(l.kc, 0),
                v: View::new(l.vc, 0),
                heads: HEADS,
                kv_heads: KV_HEADS,
                head_dim: HEAD_DIM,
                scale: 1.0 / (HEAD_DIM as f32).sqrt(),
                window: 0,
                softcap: 0.0,
                ring: 0,
                kv: KvType::F32,
            },
            Op::MatMul { out: o, x: att, w: l.wo, n, act },
            Op::RmsNorm { out: o, x: o, w: l.norm[1], rows: n, dim: DIM, eps },
            Op::Add { out: x, a: x, b: o, len: n * DIM },
            Op::RmsNorm { out: xn, x, w: l.norm[2], rows: n, dim: DIM, eps },
            Op::MatMul { out: gate, x: xn, w: l.gate, n, act },
            Op::MatMul { out: up, x: xn, w: l.up, n, act },
            Op::GeluTanhMul { out: gate, gate, up, len: n * FFN },
            Op::MatMul { out: o, x: gate, w: l.down, n, act },
            Op::RmsNorm { out: o, x: o, w: l.norm[3], rows: n, dim: DIM, eps },
            Op::Add { out: x, a: x, b: o, len: n * DIM },
        ]);
    }
    ops.extend([
        Op::RmsNorm { out: xn, x, w: m.final_norm, rows: n, dim: DIM, eps },
        Op::MatMul { out: logits, x: xn, w: m.emb, n, act },
        Op::Softcap { x: logits, len: n * VOCAB, cap: 30.0 },
    ]);
    ops
}

/// Best wall time of `f` over at least `min` seconds and 5 runs.
fn time(min: f64, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut runs = 0;
    while runs < 5 || start.elapsed() < Duration::from_secs_f64(min) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        runs += 1;
    }
    best
}

fn main() {
    let threads = std::env::var("BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut cpu = Cpu::new(threads).unwrap();
    println!("cpu: {cpu:?}");
    let m = model(&mut cpu);
    let tokens: Vec<u32> = (0..PREFILL as u32).map(|t| (t * 997) % VOCAB as u32).collect();
    let positions: Vec<u32> = (0..PREFILL as u32).collect();
    let pre_seq = [SeqSpan { row: 0, len: PREFILL as u32, cache_row: 0, pos0: 0, ring_row: 0 }];
    let pre = Step { tokens: &tokens, positions: &positions, seqs: &pre_seq };
    let pos = [PREFILL as u32];
    let dec_seq = [SeqSpan { row: 0, len: 1, cache_row: 0, pos0: PREFILL as u32, ring_row: 0 }];
    let dec = Step { tokens: &tokens[..1], positions: &pos, seqs: &dec_seq };
    for act in [ActQuant::Int8, ActQuant::F32] {
        let pre_ops = ops(&mut cpu, &m, PREFILL, act);
        let dec_ops = ops(&mut cpu, &m, 1, act);
        let s = time(1.0, || cpu.submit(&pre, &pre_ops).unwrap());
        println!("prefill n={PREFILL} {act:?}: {:8.3} ms ({:.0} tok/s)", s * 1e3, PREFILL as f64 / s);
        let s = time(1.0, || cpu.submit(&dec, &dec_ops).unwrap());
        println!("decode  n=1  {act:?}: {:8.3} ms ({:.0} tok/s)", s * 1e3, 1.0 / s);
    }
}

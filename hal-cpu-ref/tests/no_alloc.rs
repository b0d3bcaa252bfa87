//! `submit` allocates nothing in steady state: a second submit of the same op list (every op
//! kind, prefill and decode shapes, quantized and float weights) makes no heap allocation.

mod common;

use common::*;
use purehw_hal::KvType;
use purehw_hal::{ActQuant, Backend, Format, Op, RopeMode, SeqSpan, Step, View};
use purehw_hal_cpu_ref::{BufId, CpuRef};

#[test]
fn second_submit_allocates_nothing() {
    // The counter is live: an allocation is seen.
    let live = allocation_counter::measure(|| drop(std::hint::black_box(vec![1u8; 10])));
    assert!(live.count_total > 0);

    let mut rng = Rng(11);
    let (vocab, hidden, ffn, heads, kv_heads, hd, ctx) = (32, 256, 512, 4, 2, 64, 16);
    let (qw, kvw) = (heads * hd, kv_heads * hd);
    let max_rows = 4;

    let mut b = CpuRef::new();
    let embed = b.load_weight(&weight_random_quant(&mut rng, Format::Q8_0, vocab, hidden)).unwrap();
    let norm = b.load_weight(&weight_f32(1, hidden, &rng.vec(hidden, 1.0))).unwrap();
    let wq = b.load_weight(&weight_f16(qw, hidden, &rng.vec(qw * hidden, 1.0))).unwrap();
    let wk = b.load_weight(&weight_bf16(kvw, hidden, &rng.vec(kvw * hidden, 1.0))).unwrap();
    let wv = b.load_weight(&weight_random_quant(&mut rng, Format::Q4_K, kvw, hidden)).unwrap();
    let wo = b.load_weight(&weight_f32(hidden, qw, &rng.vec(hidden * qw, 1.0))).unwrap();
    let gate = b.load_weight(&weight_random_quant(&mut rng, Format::Q6_K, ffn, hidden)).unwrap();
    let up = b.load_weight(&weight_random_quant(&mut rng, Format::Q5_K, ffn, hidden)).unwrap();
    let down = b.load_weight(&weight_random_quant(&mut rng, Format::Q4_0, hidden, ffn)).unwrap();

    let mut a = |len: usize| b.alloc(len).unwrap();
    let (x, xb, q, k, v, att) = (
        a(max_rows * hidden),
        a(max_rows * hidden),
        a(max_rows * qw),
        a(max_rows * kvw),
        a(max_rows * kvw),
        a(max_rows * qw),
    );
    let (g, u, kc, vc) = (a(max_rows * ffn), a(max_rows * ffn), a(2 * ctx * kvw), a(2 * ctx * kvw));
    let view = |b: BufId| View::new(b, 0);

    let ops_for = |n: usize| -> Vec<Op<BufId, purehw_hal_cpu_ref::WeightId>> {
        vec![
            Op::Embed { out: view(x), table: embed, scale: 16.0 },
            Op::RmsNorm { out: view(xb), x: view(x), w: norm, rows: n, dim: hidden, eps: 1e-6 },
            Op::MatMul { out: view(q), x: view(xb), w: wq, n, act: ActQuant::F32 },
            Op::MatMul { out: view(k), x: view(xb), w: wk, n, act: ActQuant::F32 },
            Op::MatMul { out: view(v), x: view(xb), w: wv, n, act: ActQuant::F32 },
            Op::Rope { x: view(q), rows: n, heads, head_dim: hd, theta: 1e4, scale: 1.0, mode: RopeMode::Neox },
            Op::Rope {
                x: view(k),
                rows: n,
                heads: kv_heads,
                head_dim: hd,
                theta: 1e4,
                scale: 1.0,
                mode: RopeMode::Interleaved,
            },
            Op::StoreKv { cache: view(kc), src: view(k), width: kvw, ring: 0, kv: KvType::F32 },
            Op::StoreKv { cache: view(vc), src: view(v), width: kvw, ring: 0, kv: KvType::F32 },
            Op::Attention {
                out: view(att),
                q: view(q),
                k: view(kc),
                v: view(vc),
                heads,
                kv_heads,
                head_dim: hd,
                scale: 0.125,
                window: 3,
                softcap: 50.0,
                ring: 0,
                kv: KvType::F32,
            },
            Op::MatMul { out: view(xb), x: view(att), w: wo, n, act: ActQuant::F32 },
            Op::RmsNorm { out: view(xb), x: view(xb), w: norm, rows: n, dim: hidden, eps: 1e-6 },
            Op::Add { out: view(x), a: view(x), b: view(xb), len: n * hidden },
            Op::MatMul { out: view(g), x: view(x), w: gate, n, act: ActQuant::F32 },
            Op::MatMul { out: view(u), x: view(x), w: up, n, act: ActQuant::F32 },
            Op::GeluTanhMul { out: view(g), gate: view(g), up: view(u), len: n * ffn },
            Op::SiluMul { out: view(u), gate: view(u), up: view(g), len: n * ffn },
            Op::MatMul { out: view(xb), x: view(g), w: down, n, act: ActQuant::F32 },
            Op::Add { out: view(x), a: view(x), b: view(xb), len: n * hidden },
            Op::Softcap { x: view(x), len: n * hidden, cap: 30.0 },
        ]
    };

    // Prefill: two sequences of 2 rows each.
    let seqs = [
        SeqSpan { row: 0, len: 2, cache_row: 0, pos0: 0, ring_row: 0 },
        SeqSpan { row: 2, len: 2, cache_row: ctx as u32, pos0: 0, ring_row: 0 },
    ];
    let prefill = Step { tokens: &[1, 2, 3, 4], positions: &[0, 1, 0, 1], seqs: &seqs };
    let ops = ops_for(4);
    b.submit(&prefill, &ops).unwrap();

    // Decode: one row per sequence; the same op list submitted twice, measuring the second.
    let ops = ops_for(2);
    let dec = |p: u32| {
        [
            SeqSpan { row: 0, len: 1, cache_row: 0, pos0: p, ring_row: 0 },
            SeqSpan { row: 1, len: 1, cache_row: ctx as u32, pos0: p, ring_row: 0 },
        ]
    };
    let seqs = dec(2);
    b.submit(&Step { tokens: &[5, 6], positions: &[2, 2], seqs: &seqs }, &ops).unwrap();
    let seqs = dec(3);
    let step = Step { tokens: &[7, 8], positions: &[3, 3], seqs: &seqs };
    let info = allocation_counter::measure(|| b.submit(&step, &ops).unwrap());
    assert_eq!(info.count_total, 0, "decode submit allocated: {info:?}");

    // A prefill-shaped submit after warm-up allocates nothing either.
    let ops = ops_for(4);
    let seqs = [SeqSpan { row: 0, len: 4, cache_row: 0, pos0: 4, ring_row: 0 }];
    let step = Step { tokens: &[1, 2, 3, 4], positions: &[4, 5, 6, 7], seqs: &seqs };
    let info = allocation_counter::measure(|| b.submit(&step, &ops).unwrap());
    assert_eq!(info.count_total, 0, "prefill submit allocated: {info:?}");

    let mut out = vec![0f32; 4 * hidden];
    b.read(View::new(x, 0), &mut out).unwrap();
    assert!(out.iter().all(|v| v.is_finite()));

    // Reporting an error does not allocate either.
    let bad = [Op::Softcap { x: View::new(x, 4 * hidden), len: 1, cap: 1.0 }];
    let info = allocation_counter::measure(|| assert!(b.submit(&step, &bad).is_err()));
    assert_eq!(info.count_total, 0, "failing submit allocated: {info:?}");
}

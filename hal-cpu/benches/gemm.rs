//! Single-thread micro-benchmark of the integer GEMMs: `cargo bench -p purehw-hal-cpu --bench gemm`.
//!
//! Decode (n = 1) is reported as GB/s of weight bytes next to a streaming-read bandwidth
//! measured here; prefill (n = 64, row chunks of 64) as GOPS = 2·rows·cols·n / s. "scalar" is the
//! reference (`purehw_kernels::quant::dot_row_q8a/q8k` per output, what the scalar kernels run).
//! `BENCH_ONLY=simd` skips the slow scalar runs.

use std::hint::black_box;
use std::time::{Duration, Instant};

use purehw_hal_cpu::simd::Kernels;
use purehw_kernels::Format;
use purehw_kernels::quant::{self as q, BlockQ8A, BlockQ8K};
use purehw_kernels::testing::Rng;

/// Best wall time of `f` over at least `min` seconds and 3 runs (the best run is the one least
/// disturbed by other processes on a shared machine).
fn time(min: f64, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut runs = 0;
    while runs < 3 || start.elapsed() < Duration::from_secs_f64(min) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        runs += 1;
    }
    best
}

fn weights(rng: &mut Rng, fmt: Format, rows: usize, cols: usize) -> Vec<u8> {
    let bytes = fmt.bytes_for(cols).unwrap() * rows;
    let mut w = vec![0u8; bytes];
    for c in w.chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    for c in w.chunks_exact_mut(fmt.block_bytes()) {
        match fmt {
            Format::Q6_K => c[208..210].copy_from_slice(&f16(0.01)),
            Format::Q4_1 | Format::Q5_1 | Format::Q4_K | Format::Q5_K => {
                c[0..2].copy_from_slice(&f16(0.05));
                c[2..4].copy_from_slice(&f16(0.02));
            }
            _ => c[0..2].copy_from_slice(&f16(0.05)),
        }
    }
    w
}

fn scalar_a(fmt: Format, w: &[u8], rows: usize, cols: usize, act: &[BlockQ8A], n: usize, out: &mut [f32]) {
    let (rb, ab) = (fmt.bytes_for(cols).unwrap(), cols / 32);
    for t in 0..n {
        for r in 0..rows {
            out[t * rows + r] = q::dot_row_q8a(fmt, &w[r * rb..][..rb], &act[t * ab..][..ab]);
        }
    }
}

fn scalar_k(fmt: Format, w: &[u8], rows: usize, cols: usize, act: &[BlockQ8K], n: usize, out: &mut [f32]) {
    let (rb, ab) = (fmt.bytes_for(cols).unwrap(), cols / 256);
    for t in 0..n {
        for r in 0..rows {
            out[t * rows + r] = q::dot_row_q8k(fmt, &w[r * rb..][..rb], &act[t * ab..][..ab]);
        }
    }
}

/// One activation set for `n` tokens of `cols` values, in the layout `fmt` reads.
enum Act {
    A(Vec<BlockQ8A>),
    K(Vec<BlockQ8K>),
}

fn act_for(k: &Kernels, rng: &mut Rng, fmt: Format, n: usize, cols: usize) -> Act {
    let x: Vec<f32> = (0..n * cols).map(|_| rng.unit()).collect();
    match fmt.act_layout().unwrap() {
        q::ActLayout::Q8A => {
            let mut a = vec![BlockQ8A::default(); n * cols / 32];
            (k.quantize_q8a)(&x, &mut a);
            Act::A(a)
        }
        q::ActLayout::Q8K => {
            let mut a = vec![BlockQ8K::default(); n * cols / 256];
            (k.quantize_q8k)(&x, &mut a);
            Act::K(a)
        }
    }
}

/// The GEMM of `fmt` over all rows, `chunk` rows per call (as the engine's workers do).
#[allow(clippy::too_many_arguments)]
fn run(
    k: &Kernels,
    simd: bool,
    fmt: Format,
    w: &[u8],
    rows: usize,
    cols: usize,
    act: &Act,
    n: usize,
    chunk: usize,
    out: &mut [f32],
) {
    let rb = fmt.bytes_for(cols).unwrap();
    let mut tmp = vec![0f32; chunk * n];
    for r0 in (0..rows).step_by(chunk) {
        let nr = chunk.min(rows - r0);
        let wc = &w[r0 * rb..(r0 + nr) * rb];
        let o = &mut tmp[..nr * n];
        match (act, simd) {
            (Act::A(a), true) => (k.gemm_q8a)(fmt, wc, nr, cols, a, n, o),
            (Act::A(a), false) => scalar_a(fmt, wc, nr, cols, a, n, o),
            (Act::K(a), true) => (k.gemm_q8k)(fmt, wc, nr, cols, a, n, o),
            (Act::K(a), false) => scalar_k(fmt, wc, nr, cols, a, n, o),
        }
        for t in 0..n {
            out[t * rows + r0..][..nr].copy_from_slice(&o[t * nr..][..nr]);
        }
    }
}

fn main() {
    let k = Kernels::detect();
    let scalar = std::env::var("BENCH_ONLY").map_or(true, |v| v != "simd");
    // `BENCH_CASES=stream,decode,decode-all,prefill,quantize` (default: all) picks the sections.
    let cases = std::env::var("BENCH_CASES").unwrap_or_default();
    let want = |c: &str| cases.is_empty() || cases.split(',').any(|x| x == c);
    println!("kernels: {}", k.name);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);

    // Streaming read bandwidth, one thread: sum of a 512 MiB buffer.
    let mut bw = f64::NAN;
    if want("stream") {
        let buf: Vec<u64> = (0..(512usize << 20) / 8).map(|i| i as u64 * 0x9E37_79B9).collect();
        let secs = time(1.0, || {
            let s = black_box(&buf).iter().fold(0u64, |a, &b| a.wrapping_add(b));
            black_box(s);
        });
        bw = (buf.len() * 8) as f64 / secs / 1e9;
        println!("stream-sum 512 MiB: {bw:.1} GB/s");
    }

    // Decode: the Gemma 3 270M LM head, Q8_0 262144 x 640, n = 1.
    if want("decode") {
        let (fmt, rows, cols) = (Format::Q8_0, 262_144, 640);
        let w = weights(&mut rng, fmt, rows, cols);
        let act = act_for(&k, &mut rng, fmt, 1, cols);
        let mut out = vec![0f32; rows];
        let mut report = |simd: bool| {
            let s = time(1.0, || run(&k, simd, fmt, &w, rows, cols, &act, 1, 64, &mut out));
            let gbs = w.len() as f64 / s / 1e9;
            let name = if simd { k.name } else { "scalar" };
            println!(
                "decode {fmt:?} {rows}x{cols} n=1 {name:>6}: {:8.2} ms  {gbs:6.2} GB/s ({:.0}% of stream)",
                s * 1e3,
                100.0 * gbs / bw
            );
        };
        report(true);
        if scalar {
            report(false);
        }
    }

    // Decode from cache (L2/L3-resident weights): the compute ceiling of the n = 1 path.
    if want("decode-cache") {
        for (fmt, rows, cols) in [
            (Format::Q8_0, 2048, 640),
            (Format::Q5_0, 2048, 640),
            (Format::Q4_K, 1024, 1024),
            (Format::Q6_K, 1024, 1024),
        ] {
            let w = weights(&mut rng, fmt, rows, cols);
            let act = act_for(&k, &mut rng, fmt, 1, cols);
            let mut out = vec![0f32; rows];
            let s = time(0.5, || run(&k, true, fmt, &w, rows, cols, &act, 1, 64, &mut out));
            let gbs = w.len() as f64 / s / 1e9;
            println!("decode (cached) {fmt:?} {rows}x{cols} n=1 {:>6}: {:8.3} ms  {gbs:6.2} GB/s", k.name, s * 1e3);
        }
    }

    // Decode, other formats (2048 x 2048 rows, n = 1).
    for fmt in [Format::Q5_0, Format::Q4_1, Format::Q4_0, Format::Q5_1, Format::Q4_K, Format::Q5_K, Format::Q6_K] {
        if !want("decode-all") {
            break;
        }
        let (rows, cols) = (32768, 2048);
        let w = weights(&mut rng, fmt, rows, cols);
        let act = act_for(&k, &mut rng, fmt, 1, cols);
        let mut out = vec![0f32; rows];
        let s = time(0.5, || run(&k, true, fmt, &w, rows, cols, &act, 1, 64, &mut out));
        let gbs = w.len() as f64 / s / 1e9;
        println!("decode {fmt:?} {rows}x{cols} n=1 {:>6}: {:8.2} ms  {gbs:6.2} GB/s", k.name, s * 1e3);
    }

    // Batched decode (the server's continuous batching): n = 2..16 tokens, 64-row chunks; the
    // LM head shape from cache-sized slices and the layer shapes.
    let batch = [
        (Format::Q8_0, 512, 640),
        (Format::Q8_0, 8192, 640),
        (Format::Q8_0, 262144, 640),
        (Format::Q5_0, 2048, 640),
        (Format::Q4_K, 2048, 2048),
        (Format::Q6_K, 640, 2048),
    ];
    for (fmt, rows, cols) in batch {
        if !want("batch") {
            break;
        }
        let w = weights(&mut rng, fmt, rows, cols);
        for n in [2, 4, 8, 16] {
            let act = act_for(&k, &mut rng, fmt, n, cols);
            let mut out = vec![0f32; rows * n];
            let s = time(0.3, || run(&k, true, fmt, &w, rows, cols, &act, n, 64, &mut out));
            let gops = 2.0 * (rows * cols * n) as f64 / s / 1e9;
            println!("batch {fmt:?} {rows}x{cols} n={n:<2} {:>6}: {:8.3} ms  {gops:7.2} GOPS", k.name, s * 1e3);
        }
    }

    // The LM head at n = 8 on two threads (each half the rows): the machine's 2-core scaling.
    if want("batch2") {
        let (fmt, rows, cols, n) = (Format::Q8_0, 262_144, 640, 8);
        let w = weights(&mut rng, fmt, rows, cols);
        let act = act_for(&k, &mut rng, fmt, n, cols);
        let rb = fmt.bytes_for(cols).unwrap();
        let (w0, w1) = w.split_at(rows / 2 * rb);
        let mut o0 = vec![0f32; rows / 2 * n];
        let mut o1 = vec![0f32; rows / 2 * n];
        let s = time(1.0, || {
            std::thread::scope(|sc| {
                sc.spawn(|| run(&k, true, fmt, w0, rows / 2, cols, &act, n, 64, &mut o0));
                run(&k, true, fmt, w1, rows / 2, cols, &act, n, 64, &mut o1);
            })
        });
        let gops = 2.0 * (rows * cols * n) as f64 / s / 1e9;
        println!("batch2 {fmt:?} {rows}x{cols} n={n} 2 threads {:>6}: {:8.3} ms  {gops:7.2} GOPS", k.name, s * 1e3);
    }

    // Prefill: n = 64 tokens, 64-row chunks.
    let prefill = [
        (Format::Q8_0, 2048, 640),
        (Format::Q5_0, 2048, 640),
        (Format::Q4_1, 2048, 640),
        // SmolLM2-135M's MLP (gate/up, down).
        (Format::Q4_1, 1536, 576),
        (Format::Q4_1, 576, 1536),
        (Format::Q4_0, 2048, 640),
        (Format::Q5_1, 2048, 640),
        (Format::Q4_K, 2048, 2048),
        (Format::Q5_K, 2048, 2048),
        (Format::Q6_K, 640, 2048),
    ];
    for (fmt, rows, cols) in prefill {
        if !want("prefill") {
            break;
        }
        let n = 64;
        let w = weights(&mut rng, fmt, rows, cols);
        let act = act_for(&k, &mut rng, fmt, n, cols);
        let mut out = vec![0f32; rows * n];
        let mut report = |simd: bool| {
            let s = time(0.5, || run(&k, simd, fmt, &w, rows, cols, &act, n, 64, &mut out));
            let gops = 2.0 * (rows * cols * n) as f64 / s / 1e9;
            let name = if simd { k.name } else { "scalar" };
            println!("prefill {fmt:?} {rows}x{cols} n={n} {name:>6}: {:8.3} ms  {gops:7.2} GOPS", s * 1e3);
        };
        report(true);
        if scalar && matches!(fmt, Format::Q5_0 | Format::Q6_K | Format::Q8_0) {
            report(false);
        }
    }

    // Quantization of 64 tokens x 2048.
    if !want("quantize") {
        return;
    }
    let x: Vec<f32> = (0..64 * 2048).map(|_| rng.unit()).collect();
    let mut a = vec![BlockQ8A::default(); x.len() / 32];
    let mut kq = vec![BlockQ8K::default(); x.len() / 256];
    let s = time(0.3, || (k.quantize_q8a)(&x, &mut a));
    println!("quantize_q8a 64x2048: {:.1} us ({:.2} GB/s of f32)", s * 1e6, (x.len() * 4) as f64 / s / 1e9);
    let s = time(0.3, || (k.quantize_q8k)(&x, &mut kq));
    println!("quantize_q8k 64x2048: {:.1} us ({:.2} GB/s of f32)", s * 1e6, (x.len() * 4) as f64 / s / 1e9);
    if scalar {
        let s = time(0.3, || q::quantize_q8a(&x, &mut a));
        println!("quantize_q8a 64x2048 scalar: {:.1} us", s * 1e6);
    }
}

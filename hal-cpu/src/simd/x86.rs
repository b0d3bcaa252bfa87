//! AVX2 + FMA twins of the integer ("Int8 activation") kernels (x86-64), bit-exact with
//! `purehw_kernels::quant::{quantize_q8a, quantize_q8k, dot_row_q8a, dot_row_q8k}`.
//!
//! This module needs `unsafe` for two things only: calling the `#[target_feature]` functions
//! (sound because they are reachable only through [`kernels`], which checked the CPU features
//! first) and raw SIMD loads/stores (each one's bounds are argued at the site).
//!
//! How the reference maps onto AVX2: lane `k` of `pmaddwd(pmaddubsw(w, a), 1)` over a 32-byte
//! chunk is exactly `Σ_{i in 4k..4k+4} w[i]·a[i]`, the reference's lane `k`. Signed weights use
//! `pmaddubsw(|w|, sign(a, w))`, exact because activation codes are in `[-127, 127]`. The float
//! steps (`d_w·d_a`, `d·lane`, `acc + …`, the offset/min accumulator, the final lane reduction)
//! are the reference's, one IEEE operation each, in its order (no fused multiply-add).
//!
//! Layout of the GEMMs: tokens are taken in tiles of [`TT`]; per tile, the activation scales
//! (and `d·Σq` for the minimum formats, the bsums for the k-quant minimums) are gathered once into
//! token-major vectors, so the per-(row, block) scale products are one vector operation for the
//! whole tile. Each weight block is unpacked once per tile (into a small stack buffer) and then
//! dotted with every token of the tile.
#![allow(unsafe_code)]

use core::arch::x86_64::*;
use core::mem::MaybeUninit;

use purehw_kernels::Format;
use purehw_kernels::quant::{BlockQ8A, BlockQ8K, act_scale};

use super::Kernels;

/// The AVX2 kernels when the CPU has AVX2 and FMA (and F16C, which every AVX2 CPU has: the block
/// scales are converted with `vcvtph2ps`, as the `half` crate itself does).
pub(super) fn kernels() -> Option<Kernels> {
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
        Some(Kernels {
            name: "avx2",
            quantize_q8a,
            quantize_q8k,
            gemm_q8a,
            gemm_q8k,
            gemm_f32: super::x86_f32::gemm_f32,
            dot_f32: super::x86_f32::dot_f32,
            dot_keys: super::x86_f32::dot_keys,
            axpy_keys: super::x86_f32::axpy_keys,
            dequant_int: super::x86_int::dequant_int,
            dot_int: super::x86_int::dot_int,
            gelu_mul: super::x86_act::gelu_mul,
            silu_mul: super::x86_act::silu_mul,
            exp_sub: super::x86_act::exp_sub,
            widen_f16: super::x86_f32::widen_f16,
            head_est_q8_0: None,
        })
    } else {
        None
    }
}

/// Tokens per tile (one f32 lane each in the per-tile scale vectors).
const TT: usize = 8;
/// How far ahead (bytes) the weight stream is prefetched.
const PREFETCH: usize = 2048;
/// Most 32-element blocks per row the per-tile scratch holds (larger rows use the scalar path).
const MAXB: usize = 1024;
/// Most 256-element super-blocks per row the per-tile scratch holds.
const MAXSB: usize = 128;

// ---------------------------------------------------------------------------------------------
// Safe entry points (the `Kernels` fn pointers).

fn quantize_q8a(x: &[f32], out: &mut [BlockQ8A]) {
    // SAFETY: only reachable through `kernels()`, which checked avx2+fma+f16c.
    unsafe { quantize_q8a_avx2(x, out) }
}

fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    // SAFETY: only reachable through `kernels()`, which checked avx2+fma+f16c.
    unsafe { quantize_q8k_avx2(x, out) }
}

fn gemm_q8a(fmt: Format, w: &[u8], rows: usize, cols: usize, act: &[BlockQ8A], n: usize, out: &mut [f32]) {
    let ab = cols / 32;
    let (Some(rb), true) = (fmt.bytes_for(cols), ab <= MAXB) else {
        return super::scalar::gemm_q8a(fmt, w, rows, cols, act, n, out);
    };
    // The same panics as the scalar fallback's slicing, checked once up front.
    assert!(w.len() >= rows * rb, "gemm_q8a: weights too short");
    assert!(act.len() >= n * ab, "gemm_q8a: activations too short");
    assert!(out.len() >= n * rows, "gemm_q8a: output too short");
    if rows == 0 || n == 0 {
        return;
    }
    // SAFETY: only reachable through `kernels()`, which checked avx2+fma+f16c; the slice
    // lengths the kernels rely on were asserted above.
    unsafe {
        match fmt {
            Format::Q4_0 => gemm_a::<Q4_0>(w, rows, ab, act, n, out),
            Format::Q4_1 => gemm_a::<Q4_1>(w, rows, ab, act, n, out),
            Format::Q5_0 => gemm_a::<Q5_0>(w, rows, ab, act, n, out),
            Format::Q5_1 => gemm_a::<Q5_1>(w, rows, ab, act, n, out),
            Format::Q8_0 => gemm_a::<Q8_0>(w, rows, ab, act, n, out),
            _ => super::scalar::gemm_q8a(fmt, w, rows, cols, act, n, out),
        }
    }
}

fn gemm_q8k(fmt: Format, w: &[u8], rows: usize, cols: usize, act: &[BlockQ8K], n: usize, out: &mut [f32]) {
    let nsb = cols / 256;
    let (Some(rb), true) = (fmt.bytes_for(cols), nsb <= MAXSB) else {
        return super::scalar::gemm_q8k(fmt, w, rows, cols, act, n, out);
    };
    assert!(w.len() >= rows * rb, "gemm_q8k: weights too short");
    assert!(act.len() >= n * nsb, "gemm_q8k: activations too short");
    assert!(out.len() >= n * rows, "gemm_q8k: output too short");
    if rows == 0 || n == 0 {
        return;
    }
    // SAFETY: only reachable through `kernels()`, which checked avx2+fma+f16c; the slice
    // lengths the kernels rely on were asserted above.
    unsafe {
        match fmt {
            Format::Q4_K => gemm_k::<Q4_K>(w, rows, nsb, act, n, out),
            Format::Q5_K => gemm_k::<Q5_K>(w, rows, nsb, act, n, out),
            Format::Q6_K => gemm_k::<Q6_K>(w, rows, nsb, act, n, out),
            _ => super::scalar::gemm_q8k(fmt, w, rows, cols, act, n, out),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

/// `((l0+l4)+(l2+l6))+((l1+l5)+(l3+l7))`, as `purehw_kernels::quant::reduce_lanes`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn reduce_lanes(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v)); // l0+l4, l1+l5, l2+l6, l3+l7
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s)); // (l0+l4)+(l2+l6), (l1+l5)+(l3+l7)
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// The f16 at `p` (little-endian), widened exactly (`vcvtph2ps`, as `half` does) and broadcast.
/// (Broadcasting the half first keeps the conversion free of false register dependencies.)
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16x8_at(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees two readable bytes at `p`.
    let h = unsafe { p.cast::<u16>().read_unaligned() };
    _mm256_cvtph_ps(_mm_set1_epi16(h as i16))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load32(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes at `p`.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load16(p: *const u8) -> __m128i {
    // SAFETY: the caller guarantees 16 readable bytes at `p`.
    unsafe { _mm_loadu_si128(p.cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

// ---------------------------------------------------------------------------------------------
// Quantization.

/// Running `max(|x|, m)` per lane; `max_ps(|x|, m)` returns `m` when `x` is NaN, as
/// `f32::max(m, |x|)` does in the reference, so NaNs are ignored identically.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn absmax(m: __m256, x: __m256) -> __m256 {
    _mm256_max_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0), x), m)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hmax(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
}

/// `act_code` on 8 values: `round_ties_even(x·id)` clamped to ±127, NaN → 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn codes8(x: __m256, id: __m256) -> __m256i {
    let v = _mm256_mul_ps(x, id);
    let v = _mm256_and_ps(v, _mm256_cmp_ps::<_CMP_ORD_Q>(v, v));
    let v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0)), _mm256_set1_ps(127.0));
    _mm256_cvtps_epi32(v)
}

/// Four i32 vectors (elements 0..8, 8..16, 16..24, 24..32) packed to 32 i8 in element order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pack32(q: &[__m256i; 4]) -> __m256i {
    let p01 = _mm256_packs_epi32(q[0], q[1]); // q0[0..4] q1[0..4] | q0[4..8] q1[4..8]
    let p23 = _mm256_packs_epi32(q[2], q[3]);
    let b = _mm256_packs_epi16(p01, p23); // dwords: q0a q1a q2a q3a | q0b q1b q2b q3b
    _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// Load 32 floats and return them with their running abs max folded into `m`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_f32x32(p: *const f32) -> [__m256; 4] {
    // SAFETY: the caller guarantees 32 readable f32 at `p`.
    unsafe { [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))] }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8a_avx2(x: &[f32], out: &mut [BlockQ8A]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(32)) {
        // SAFETY: in bounds: `xs` holds exactly 32 floats.
        let v = unsafe { load_f32x32(xs.as_ptr()) };
        let mut m = _mm256_setzero_ps();
        for &v in &v {
            m = absmax(m, v);
        }
        let (d, id) = act_scale(hmax(m));
        let id = _mm256_set1_ps(id);
        let q = [codes8(v[0], id), codes8(v[1], id), codes8(v[2], id), codes8(v[3], id)];
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        // SAFETY: in bounds: `b.qs` is 32 bytes.
        unsafe { _mm256_storeu_si256(b.qs.as_mut_ptr().cast(), pack32(&q)) };
        b.d = d;
        b.sum = hsum_epi32(s);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8k_avx2(x: &[f32], out: &mut [BlockQ8K]) {
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(256)) {
        let p = xs.as_ptr();
        let mut m = _mm256_setzero_ps();
        for i in 0..32 {
            // SAFETY: in bounds: `xs` holds 256 floats, `8i + 8 <= 256`.
            m = absmax(m, unsafe { _mm256_loadu_ps(p.add(8 * i)) });
        }
        let (d, id) = act_scale(hmax(m));
        let id = _mm256_set1_ps(id);
        b.d = d;
        // Group sums of 16 codes, four groups (two chunks) at a time.
        let mut sums = [_mm_setzero_si128(); 4];
        for (c2, s) in sums.iter_mut().enumerate() {
            let mut h = [_mm256_setzero_si256(); 2];
            for (k, h) in h.iter_mut().enumerate() {
                let c = 2 * c2 + k;
                // SAFETY: in bounds: chunk `c < 8` covers floats `32c..32c+32` of 256.
                let v = unsafe { load_f32x32(p.add(32 * c)) };
                let q = [codes8(v[0], id), codes8(v[1], id), codes8(v[2], id), codes8(v[3], id)];
                // SAFETY: in bounds: `b.qs` is 256 bytes, chunk `c` is `32c..32c+32`.
                unsafe { _mm256_storeu_si256(b.qs.as_mut_ptr().add(32 * c).cast(), pack32(&q)) };
                // [g(2c) partial sums of pairs, g(2c+1) …] per 128-bit lane.
                *h = _mm256_hadd_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            }
            let hh = _mm256_hadd_epi32(h[0], h[1]);
            *s = _mm_add_epi32(_mm256_castsi256_si128(hh), _mm256_extracti128_si256::<1>(hh));
        }
        let lo = _mm_packs_epi32(sums[0], sums[1]);
        let hi = _mm_packs_epi32(sums[2], sums[3]);
        // SAFETY: in bounds: `b.bsums` is 16 i16 = 32 bytes.
        unsafe {
            _mm_storeu_si128(b.bsums.as_mut_ptr().cast(), lo);
            _mm_storeu_si128(b.bsums.as_mut_ptr().add(8).cast(), hi);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 32-element formats.

pub(super) const Q4_0: u8 = 0;
pub(super) const Q4_1: u8 = 1;
pub(super) const Q5_0: u8 = 2;
pub(super) const Q5_1: u8 = 3;
pub(super) const Q8_0: u8 = 4;

pub(super) const fn block_bytes_a(f: u8) -> usize {
    match f {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        Q5_1 => 24,
        _ => 34,
    }
}

/// Symmetric formats (codes minus an offset, or signed): dotted as `maddubs(|w|, sign(a, w))`.
const fn signed_a(f: u8) -> bool {
    matches!(f, Q4_0 | Q5_0 | Q8_0)
}

/// Formats with a minimum (`d·q + m`).
pub(super) const fn has_min_a(f: u8) -> bool {
    matches!(f, Q4_1 | Q5_1)
}

/// 32 bytes, `0xFF` where bit `i` of `qh` is set (byte `i` ↔ element `i`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn bits_to_bytes(qh: u32) -> __m256i {
    let v = _mm256_set1_epi32(qh as i32);
    let shuf = _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303);
    let v = _mm256_shuffle_epi8(v, shuf);
    let v = _mm256_or_si256(v, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64));
    _mm256_cmpeq_epi8(v, _mm256_set1_epi8(-1))
}

/// 16 bytes of nibbles → 32 codes: element `j` the low nibble of byte `j`, `j + 16` the high one.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn nibbles(x: __m128i) -> __m256i {
    let v = _mm256_srlv_epi64(_mm256_broadcastsi128_si256(x), _mm256_setr_epi64x(0, 0, 4, 4));
    _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
}

/// The block at `p`: `(codes, d, m)` (`d`, `m` broadcast). Codes are signed (offset removed) for the symmetric
/// formats and unsigned for the minimum formats; `m` is 0 for the symmetric ones.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_a<const F: u8>(p: *const u8) -> (__m256i, __m256, __m256) {
    // SAFETY (all reads below): the caller guarantees a whole block of format `F` at `p`; each
    // read lies inside that block's layout (d, m, qh, qs offsets of ggml's block_*).
    unsafe {
        match F {
            Q4_0 => (_mm256_sub_epi8(nibbles(load16(p.add(2))), _mm256_set1_epi8(8)), f16x8_at(p), _mm256_setzero_ps()),
            Q4_1 => (nibbles(load16(p.add(4))), f16x8_at(p), f16x8_at(p.add(2))),
            Q5_0 => {
                // `q − 16` is the nibble when bit 4 is set, else the nibble with 0xF0 on top.
                let qh = p.add(2).cast::<u32>().read_unaligned();
                let hi = _mm256_andnot_si256(bits_to_bytes(qh), _mm256_set1_epi8(0xF0u8 as i8));
                (_mm256_or_si256(nibbles(load16(p.add(6))), hi), f16x8_at(p), _mm256_setzero_ps())
            }
            Q5_1 => {
                let qh = p.add(4).cast::<u32>().read_unaligned();
                let hi = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
                (_mm256_or_si256(nibbles(load16(p.add(8))), hi), f16x8_at(p), f16x8_at(p.add(2)))
            }
            _ => (load32(p.add(2)), f16x8_at(p), _mm256_setzero_ps()),
        }
    }
}

/// `out[t·rows + r] = dot_row_q8a(F, row r, token t)` for `ab` blocks per row.
///
/// Safety: avx2+fma+f16c present; `w.len() >= rows·ab·block_bytes(F)`, `act.len() >= n·ab`,
/// `out.len() >= n·rows`, `1 <= ab <= MAXB`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_a<const F: u8>(w: &[u8], rows: usize, ab: usize, act: &[BlockQ8A], n: usize, out: &mut [f32]) {
    // Per token tile: `da[b]` = the tile's activation scales of block `b` (lane = token), `sa[b]`
    // = `d·Σq` (the reference's `a.d * a.sum as f32`), for the minimum formats.
    let mut da: MaybeUninit<[[f32; TT]; MAXB]> = MaybeUninit::uninit();
    let mut sa: MaybeUninit<[[f32; TT]; MAXB]> = MaybeUninit::uninit();
    let mut dd: MaybeUninit<[[f32; TT]; MAXB]> = MaybeUninit::uninit();
    let da = da.as_mut_ptr().cast::<[f32; TT]>();
    let sa = sa.as_mut_ptr().cast::<[f32; TT]>();
    let dd = dd.as_mut_ptr().cast::<[f32; TT]>();
    let c = CtxA {
        w: w.as_ptr(),
        rb: ab * block_bytes_a(F),
        ab,
        act: act.as_ptr(),
        da,
        sa,
        out: out.as_mut_ptr(),
        dd,
        rows,
    };
    for t0 in (0..n).step_by(TT) {
        let tt = TT.min(n - t0);
        for b in 0..ab {
            let (mut dv, mut sv) = ([0f32; TT], [0f32; TT]);
            for t in 0..tt {
                let a = &act[(t0 + t) * ab + b];
                dv[t] = a.d;
                sv[t] = a.d * a.sum as f32;
            }
            // SAFETY: in bounds: `b < ab <= MAXB` entries.
            unsafe {
                da.add(b).write(dv);
                if has_min_a(F) {
                    sa.add(b).write(sv);
                }
            }
        }
        // Sub-tiles of 8, 4, 2, 1 tokens (lane offset `l0` in the tile's scale vectors).
        let mut l0 = 0;
        while l0 < tt {
            let left = tt - l0;
            // SAFETY: the tile's tokens `t0 + l0 ..` are `< n`; `c` describes the checked slices.
            unsafe {
                if left >= 8 {
                    rows_a::<F, 1, 8>(&c, t0 + l0, l0);
                    l0 += 8;
                } else if left >= 4 {
                    rows_a::<F, 1, 4>(&c, t0 + l0, l0);
                    l0 += 4;
                } else if left >= 2 {
                    rows_a::<F, 2, 2>(&c, t0 + l0, l0);
                    l0 += 2;
                } else {
                    rows_a::<F, 2, 1>(&c, t0 + l0, l0);
                    l0 += 1;
                }
            }
        }
    }
}

/// The operands of one 32-element-format GEMM call, as raw pointers (checked by the caller).
struct CtxA {
    w: *const u8,
    /// Bytes per row.
    rb: usize,
    /// Blocks per row.
    ab: usize,
    act: *const BlockQ8A,
    da: *const [f32; TT],
    sa: *const [f32; TT],
    /// Scratch for one row's `d_w·d_a` (lane = token), `ab` entries.
    dd: *mut [f32; TT],
    out: *mut f32,
    rows: usize,
}

/// All rows (in tiles of `R`, the rest one by one) for tokens `t0..t0 + T`, lanes `l0..l0 + T`.
///
/// Safety: as [`gemm_a`], with `da`/`sa` filled for this tile and `t0 + T <= n`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_a<const F: u8, const R: usize, const T: usize>(c: &CtxA, t0: usize, l0: usize) {
    row_tiles::<R>(c.rows, |r, full| {
        // SAFETY: rows `r..r + R` (`full`) or row `r` exist.
        unsafe { if full { tile_a::<F, R, T>(c, r, t0, l0) } else { tile_a::<F, 1, T>(c, r, t0, l0) } }
    });
}

/// The GEMMs' row loop: `tile(r, true)` for rows `r..r + R` while `R` rows remain, then
/// `tile(r, false)` for each row left.
#[inline(always)]
pub(super) fn row_tiles<const R: usize>(rows: usize, mut tile: impl FnMut(usize, bool)) {
    let mut r = 0;
    while r + R <= rows {
        tile(r, true);
        r += R;
    }
    while r < rows {
        tile(r, false);
        r += 1;
    }
}

/// Rows `r0..r0 + R` × tokens `t0..t0 + T`, accumulators in registers.
///
/// Safety: as [`rows_a`], with `r0 + R <= rows`.
#[inline]
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_a<const F: u8, const R: usize, const T: usize>(c: &CtxA, r0: usize, t0: usize, l0: usize) {
    let bsz = block_bytes_a(F);
    let ones = _mm256_set1_epi16(1);
    // Few tokens: `d_w·d_a` straight from broadcasts. Otherwise (one row) a first pass over the
    // row computes the products for the whole tile (and the minimum term), read back per token.
    let direct = T <= 2 || R > 1;
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut offv = [_mm256_setzero_ps(); R];
    if !direct {
        for b in 0..c.ab {
            // SAFETY: in bounds: block `b < ab` of row `r0 < rows` (`d` at offset 0, `m` at 2);
            // `da`/`sa` entries `< ab` were written for this tile; `dd` holds `MAXB >= ab`.
            unsafe {
                let p = c.w.add(r0 * c.rb + b * bsz);
                _mm256_storeu_ps(c.dd.add(b).cast(), _mm256_mul_ps(f16x8_at(p), _mm256_loadu_ps(c.da.add(b).cast())));
                if has_min_a(F) {
                    let s = _mm256_loadu_ps(c.sa.add(b).cast());
                    offv[0] = _mm256_add_ps(offv[0], _mm256_mul_ps(f16x8_at(p.add(2)), s));
                }
            }
        }
    }
    for b in 0..c.ab {
        // The tile's rows are consecutive in memory: prefetch the stream `PREFETCH` bytes ahead
        // (a hint; it may point past `w` and never faults).
        let p = c.w.wrapping_add(r0 * c.rb + b * bsz * R + PREFETCH);
        for k in 0..(R * bsz).div_ceil(64) {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * k).cast());
        }
        let mut wq = [_mm256_setzero_si256(); R];
        let mut wa = [_mm256_setzero_si256(); R];
        let mut dw = [_mm256_setzero_ps(); R];
        for r in 0..R {
            // SAFETY: in bounds: block `b < ab` of row `r0 + r < rows`, inside `w`; `da`/`sa`
            // entries `< ab` were written for this tile.
            unsafe {
                let (q, d, m) = unpack_a::<F>(c.w.add((r0 + r) * c.rb + b * bsz));
                wq[r] = q;
                if signed_a(F) {
                    wa[r] = _mm256_abs_epi8(q);
                }
                dw[r] = d;
                if has_min_a(F) && direct {
                    let s = _mm256_loadu_ps(c.sa.add(b).cast());
                    offv[r] = _mm256_add_ps(offv[r], _mm256_mul_ps(m, s));
                }
            }
        }
        for t in 0..T {
            // SAFETY: in bounds: token `t0 + t < n`, block `b < ab`; lane `l0 + t < TT`; `dd[b]`
            // was written by the first pass when `!direct`.
            let (a, ds) = unsafe {
                let a = load32((*c.act.add((t0 + t) * c.ab + b)).qs.as_ptr().cast());
                (a, if direct { (*c.da.add(b))[l0 + t] } else { (*c.dd.add(b))[l0 + t] })
            };
            for r in 0..R {
                let p = if signed_a(F) {
                    _mm256_maddubs_epi16(wa[r], _mm256_sign_epi8(a, wq[r]))
                } else {
                    _mm256_maddubs_epi16(wq[r], a)
                };
                let l = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
                let d = if direct { _mm256_mul_ps(dw[r], _mm256_set1_ps(ds)) } else { _mm256_set1_ps(ds) };
                acc[r][t] = _mm256_add_ps(acc[r][t], _mm256_mul_ps(d, l));
            }
        }
    }
    for r in 0..R {
        let mut offs = [0f32; 8];
        // SAFETY: in bounds: `offs` is 8 floats.
        unsafe { _mm256_storeu_ps(offs.as_mut_ptr(), offv[r]) };
        for t in 0..T {
            // SAFETY: in bounds: `(t0 + t)·rows + r0 + r < n·rows <= out.len()`.
            unsafe { *c.out.add((t0 + t) * c.rows + r0 + r) = reduce_lanes(acc[r][t]) + offs[l0 + t] };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// k-quants.

#[allow(non_upper_case_globals)]
pub(super) const Q4_K: u8 = 0;
#[allow(non_upper_case_globals)]
pub(super) const Q5_K: u8 = 1;
#[allow(non_upper_case_globals)]
pub(super) const Q6_K: u8 = 2;

pub(super) const fn block_bytes_k(f: u8) -> usize {
    match f {
        Q4_K => 144,
        Q5_K => 176,
        _ => 210,
    }
}

/// The 8 (scale, min) pairs of a Q4_K/Q5_K block as two u64 (bytes = scales 0..8, mins 0..8),
/// as `scale_min_k4`.
#[inline]
pub(super) fn scale_min_k4(s: &[u8; 12]) -> (u64, u64) {
    const K1: u32 = 0x3f3f_3f3f;
    const K2: u32 = 0x0f0f_0f0f;
    const K3: u32 = 0x0303_0303;
    let u0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let u1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let u2 = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    let sc_lo = u0 & K1;
    let sc_hi = (u2 & K2) | (((u0 >> 6) & K3) << 4);
    let mn_lo = u1 & K1;
    let mn_hi = ((u2 >> 4) & K2) | (((u1 >> 6) & K3) << 4);
    (sc_lo as u64 | (sc_hi as u64) << 32, mn_lo as u64 | (mn_hi as u64) << 32)
}

/// `shuffle_epi8` pattern repeating 16-bit word `g` over the whole vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn word_bcast(v: __m256i, g: usize) -> __m256i {
    let g = g as i16;
    _mm256_shuffle_epi8(v, _mm256_set1_epi16((2 * g) | ((2 * g + 1) << 8)))
}

/// `out[t·rows + r] = dot_row_q8k(F, row r, token t)` for `nsb` super-blocks per row.
///
/// Safety: avx2+fma+f16c present; `w.len() >= rows·nsb·block_bytes(F)`, `act.len() >= n·nsb`,
/// `out.len() >= n·rows`, `1 <= nsb <= MAXSB`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_k<const F: u8>(w: &[u8], rows: usize, nsb: usize, act: &[BlockQ8K], n: usize, out: &mut [f32]) {
    // Per token tile: activation scales (lane = token) and, for the minimums, the bsum pairs
    // `(bsums[2g], bsums[2g+1])` of sub-block `g` as one u32 per token.
    let mut da: MaybeUninit<[[f32; TT]; MAXSB]> = MaybeUninit::uninit();
    let mut bs: MaybeUninit<[[[u32; TT]; 8]; MAXSB]> = MaybeUninit::uninit();
    let da = da.as_mut_ptr().cast::<[f32; TT]>();
    let bs = bs.as_mut_ptr().cast::<[[u32; TT]; 8]>();
    let c =
        CtxK { w: w.as_ptr(), rb: nsb * block_bytes_k(F), nsb, act: act.as_ptr(), da, bs, out: out.as_mut_ptr(), rows };
    for t0 in (0..n).step_by(TT) {
        let tt = TT.min(n - t0);
        for s in 0..nsb {
            let mut dv = [0f32; TT];
            let mut bv = [[0u32; TT]; 8];
            for t in 0..tt {
                let a = &act[(t0 + t) * nsb + s];
                dv[t] = a.d;
                for (g, bv) in bv.iter_mut().enumerate() {
                    bv[t] = (a.bsums[2 * g] as u16 as u32) | ((a.bsums[2 * g + 1] as u16 as u32) << 16);
                }
            }
            // SAFETY: in bounds: `s < nsb <= MAXSB` entries.
            unsafe {
                da.add(s).write(dv);
                if F != Q6_K {
                    bs.add(s).write(bv);
                }
            }
        }
        let mut l0 = 0;
        while l0 < tt {
            let left = tt - l0;
            // SAFETY: the tile's tokens `t0 + l0 ..` are `< n`; `c` describes the checked slices.
            unsafe {
                if left >= 8 {
                    rows_k::<F, 8>(&c, t0 + l0, l0);
                    l0 += 8;
                } else if left >= 4 {
                    rows_k::<F, 4>(&c, t0 + l0, l0);
                    l0 += 4;
                } else if left >= 2 {
                    rows_k::<F, 2>(&c, t0 + l0, l0);
                    l0 += 2;
                } else {
                    rows_k::<F, 1>(&c, t0 + l0, l0);
                    l0 += 1;
                }
            }
        }
    }
}

/// The operands of one k-quant GEMM call, as raw pointers (checked by the caller).
struct CtxK {
    w: *const u8,
    rb: usize,
    nsb: usize,
    act: *const BlockQ8K,
    da: *const [f32; TT],
    bs: *const [[u32; TT]; 8],
    out: *mut f32,
    rows: usize,
}

/// Every row for tokens `t0..t0 + T` (lanes `l0..l0 + T` of the tile's vectors).
///
/// Safety: as [`gemm_k`], with `da`/`bs` filled for this tile and `t0 + T <= n`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_k<const F: u8, const T: usize>(c: &CtxK, t0: usize, l0: usize) {
    let bsz = block_bytes_k(F);
    // One unpacked super-block: codes (unsigned; signed for Q6_K), |codes| (Q6_K) and the i16
    // scale vector of each chunk.
    let mut wq = [_mm256_setzero_si256(); 8];
    let mut wa = [_mm256_setzero_si256(); 8];
    let mut sc = [_mm256_setzero_si256(); 8];
    for r in 0..c.rows {
        let mut acc = [_mm256_setzero_ps(); T];
        let mut minsv = _mm256_setzero_ps();
        for s in 0..c.nsb {
            // SAFETY: in bounds: super-block `s < nsb` of row `r < rows` is inside `w`; every
            // read below is inside that block's layout (ggml's block_q*_K).
            let p = unsafe { c.w.add(r * c.rb + s * bsz) };
            for k in 0..bsz.div_ceil(64) {
                // A hint: it may point past `w` and never faults.
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 64 * k).cast());
            }
            // SAFETY: in bounds: entry `s < nsb` was written for this tile.
            let dav = unsafe { _mm256_loadu_ps(c.da.add(s).cast()) };
            let dvec;
            if F == Q6_K {
                // SAFETY: see `p`.
                let (d, scales) = unsafe { (f16x8_at(p.add(208)), load16(p.add(192))) };
                // i16 scales, even ones in the low 128-bit lane and odd ones in the high one.
                let ev_od =
                    _mm_shuffle_epi8(scales, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
                let s16 = _mm256_cvtepi8_epi16(ev_od);
                for h in 0..2 {
                    // SAFETY: see `p`.
                    let (ql0, ql1, qh) =
                        unsafe { (load32(p.add(64 * h)), load32(p.add(64 * h + 32)), load32(p.add(128 + 32 * h))) };
                    let m4 = _mm256_set1_epi8(0x0F);
                    let m2 = _mm256_set1_epi8(0x03);
                    let lo = [
                        _mm256_and_si256(ql0, m4),
                        _mm256_and_si256(ql1, m4),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                    ];
                    let hi = [
                        _mm256_and_si256(qh, m2),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(qh), m2),
                        _mm256_and_si256(_mm256_srli_epi16::<6>(qh), m2),
                    ];
                    for k in 0..4 {
                        let c = 4 * h + k;
                        let q = _mm256_or_si256(lo[k], _mm256_slli_epi16::<4>(hi[k]));
                        let q = _mm256_sub_epi8(q, _mm256_set1_epi8(32));
                        wq[c] = q;
                        wa[c] = _mm256_abs_epi8(q);
                        sc[c] = word_bcast(s16, c);
                    }
                }
                dvec = _mm256_mul_ps(d, dav);
            } else {
                // SAFETY: see `p`.
                let (d, dmin, scales) = unsafe { (f16x8_at(p), f16x8_at(p.add(2)), &*p.add(4).cast::<[u8; 12]>()) };
                let (scs, mns) = scale_min_k4(scales);
                let sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(scs as i64)));
                let mn16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(mns as i64)));
                let qs = if F == Q5_K { 48 } else { 16 };
                let m4 = _mm256_set1_epi8(0x0F);
                for c in 0..4 {
                    // SAFETY: see `p`.
                    let x = unsafe { load32(p.add(qs + 32 * c)) };
                    wq[2 * c] = _mm256_and_si256(x, m4);
                    wq[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(x), m4);
                }
                if F == Q5_K {
                    // SAFETY: see `p`.
                    let mut hb = unsafe { load32(p.add(16)) };
                    for q in wq.iter_mut() {
                        let h = _mm256_and_si256(_mm256_slli_epi16::<4>(hb), _mm256_set1_epi8(0x10));
                        *q = _mm256_or_si256(*q, h);
                        hb = _mm256_srli_epi16::<1>(hb);
                    }
                }
                for (g, sc) in sc.iter_mut().enumerate() {
                    *sc = word_bcast(sc16, g);
                }
                dvec = _mm256_mul_ps(d, dav);
                // The minimum term of every token of the tile at once (lane = token).
                let mut isum = _mm256_setzero_si256();
                for g in 0..8 {
                    // SAFETY: in bounds: entry `s < nsb` was written for this tile.
                    let b = unsafe { _mm256_loadu_si256(c.bs.add(s).cast::<[u32; TT]>().add(g).cast()) };
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(b, word_bcast(mn16, g)));
                }
                let dm = _mm256_mul_ps(dmin, dav);
                minsv = _mm256_add_ps(minsv, _mm256_mul_ps(dm, _mm256_cvtepi32_ps(isum)));
            }
            let mut dd = [0f32; TT];
            // SAFETY: in bounds: `dd` is 8 floats.
            unsafe { _mm256_storeu_ps(dd.as_mut_ptr(), dvec) };
            let mut isum = [_mm256_setzero_si256(); T];
            for ch in 0..8 {
                for (t, isum) in isum.iter_mut().enumerate() {
                    // SAFETY: in bounds: token `t0 + t < n`, super-block `s < nsb`, chunk `ch < 8`
                    // of the 256 codes.
                    let av = unsafe { load32((*c.act.add((t0 + t) * c.nsb + s)).qs.as_ptr().add(32 * ch).cast()) };
                    let p = if F == Q6_K {
                        _mm256_maddubs_epi16(wa[ch], _mm256_sign_epi8(av, wq[ch]))
                    } else {
                        _mm256_maddubs_epi16(wq[ch], av)
                    };
                    *isum = _mm256_add_epi32(*isum, _mm256_madd_epi16(p, sc[ch]));
                }
            }
            for t in 0..T {
                let l = _mm256_cvtepi32_ps(isum[t]);
                acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(_mm256_set1_ps(dd[l0 + t]), l));
            }
        }
        let mut mins = [0f32; 8];
        // SAFETY: in bounds: `mins` is 8 floats.
        unsafe { _mm256_storeu_ps(mins.as_mut_ptr(), minsv) };
        for t in 0..T {
            // SAFETY: in bounds: `(t0 + t)·rows + r < n·rows <= out.len()`.
            unsafe { *c.out.add((t0 + t) * c.rows + r) = reduce_lanes(acc[t]) - mins[l0 + t] };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use purehw_kernels::quant as q;

    use purehw_kernels::testing::Rng;

    fn have() -> Option<Kernels> {
        kernels()
    }

    fn f16(v: f32) -> [u8; 2] {
        half::f16::from_f32(v).to_le_bytes()
    }

    fn weights(rng: &mut Rng, fmt: Format, rows: usize, cols: usize) -> Vec<u8> {
        let mut w: Vec<u8> = (0..fmt.bytes_for(cols).unwrap() * rows).map(|_| (rng.next_u64() >> 56) as u8).collect();
        for (i, c) in w.chunks_exact_mut(fmt.block_bytes()).enumerate() {
            let s = 0.01 + 0.1 * (i % 7) as f32;
            match fmt {
                Format::Q6_K => c[208..210].copy_from_slice(&f16(s)),
                Format::Q4_1 | Format::Q5_1 | Format::Q4_K | Format::Q5_K => {
                    c[0..2].copy_from_slice(&f16(s));
                    c[2..4].copy_from_slice(&f16(if i % 3 == 0 { -0.02 } else { 0.05 }));
                }
                Format::Q8_0 => {
                    c[0..2].copy_from_slice(&f16(s));
                    if i % 2 == 0 {
                        c[2 + i % 32] = 0x80; // a -128 weight
                    }
                    if i % 5 == 0 {
                        c[2..34].fill(0x80);
                    }
                }
                _ => c[0..2].copy_from_slice(&f16(s)),
            }
        }
        w
    }

    /// `n` activation rows of `cols` values, with a zero block, huge and tiny magnitudes.
    fn activations(rng: &mut Rng, n: usize, cols: usize) -> Vec<f32> {
        let mut x: Vec<f32> = (0..n * cols).map(|_| rng.unit() * 2.0).collect();
        for (t, row) in x.chunks_exact_mut(cols).enumerate() {
            let blk = 32 * (t % (cols / 32));
            match t % 4 {
                0 => row[blk..blk + 32].fill(0.0),
                1 => row.iter_mut().for_each(|v| *v *= 1e20),
                2 => row[blk..blk + 32].iter_mut().for_each(|v| *v *= 1e-30),
                _ => row[blk] = 3.0e3,
            }
        }
        x
    }

    #[test]
    fn quantize_is_bit_exact() {
        let Some(k) = have() else { return };
        let mut rng = Rng(0x1234_5678);
        for blocks in [1, 2, 3, 8, 20] {
            let x = activations(&mut rng, 5, 256 * blocks);
            for xs in x.chunks_exact(256 * blocks) {
                let mut want = vec![BlockQ8A::default(); 8 * blocks];
                let mut got = want.clone();
                q::quantize_q8a(xs, &mut want);
                (k.quantize_q8a)(xs, &mut got);
                for (a, b) in want.iter().zip(&got) {
                    assert_eq!((a.d.to_bits(), a.sum, a.qs), (b.d.to_bits(), b.sum, b.qs));
                }
                let mut want = vec![BlockQ8K::default(); blocks];
                let mut got = want.clone();
                q::quantize_q8k(xs, &mut want);
                (k.quantize_q8k)(xs, &mut got);
                for (a, b) in want.iter().zip(&got) {
                    assert_eq!((a.d.to_bits(), a.qs, a.bsums), (b.d.to_bits(), b.qs, b.bsums));
                }
            }
        }
        // Special values: ±0, infinities, NaN, subnormal scales.
        let mut xs = vec![0f32; 256];
        xs[3] = -0.0;
        xs[40] = f32::INFINITY;
        xs[41] = 1.0;
        xs[70] = f32::NAN;
        xs[71] = -2.0;
        xs[100] = 1e-45;
        xs[101] = -1e-45;
        xs[130] = f32::MIN_POSITIVE;
        xs[131] = -3.0e38;
        let mut want = vec![BlockQ8A::default(); 8];
        let mut got = want.clone();
        q::quantize_q8a(&xs, &mut want);
        (k.quantize_q8a)(&xs, &mut got);
        for (a, b) in want.iter().zip(&got) {
            assert_eq!((a.d.to_bits(), a.sum, a.qs), (b.d.to_bits(), b.sum, b.qs));
        }
    }

    fn check(k: &Kernels, fmt: Format, rows: usize, n: usize, cols: usize, rng: &mut Rng) {
        let w = weights(rng, fmt, rows, cols);
        let x = activations(rng, n, cols);
        let rb = fmt.bytes_for(cols).unwrap();
        let mut got = vec![f32::NAN; n * rows];
        match fmt.act_layout().unwrap() {
            q::ActLayout::Q8A => {
                let ab = cols / 32;
                let mut a = vec![BlockQ8A::default(); n * ab];
                for (x, a) in x.chunks_exact(cols).zip(a.chunks_exact_mut(ab)) {
                    q::quantize_q8a(x, a);
                }
                (k.gemm_q8a)(fmt, &w, rows, cols, &a, n, &mut got);
                for t in 0..n {
                    for r in 0..rows {
                        let want = q::dot_row_q8a(fmt, &w[r * rb..][..rb], &a[t * ab..][..ab]);
                        let g = got[t * rows + r];
                        assert_eq!(
                            g.to_bits(),
                            want.to_bits(),
                            "{fmt:?} rows {rows} n {n} cols {cols} t {t} r {r}: {g} vs {want}"
                        );
                    }
                }
            }
            q::ActLayout::Q8K => {
                let ab = cols / 256;
                let mut a = vec![BlockQ8K::default(); n * ab];
                for (x, a) in x.chunks_exact(cols).zip(a.chunks_exact_mut(ab)) {
                    q::quantize_q8k(x, a);
                }
                (k.gemm_q8k)(fmt, &w, rows, cols, &a, n, &mut got);
                for t in 0..n {
                    for r in 0..rows {
                        let want = q::dot_row_q8k(fmt, &w[r * rb..][..rb], &a[t * ab..][..ab]);
                        let g = got[t * rows + r];
                        assert_eq!(
                            g.to_bits(),
                            want.to_bits(),
                            "{fmt:?} rows {rows} n {n} cols {cols} t {t} r {r}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_is_bit_exact() {
        let Some(k) = have() else { return };
        let mut rng = Rng(0xDEAD_BEEF);
        for fmt in Format::ALL {
            let Some(layout) = fmt.act_layout() else { continue };
            let blocks: &[usize] = match layout {
                q::ActLayout::Q8A => &[1, 2, 3, 20],
                q::ActLayout::Q8K => &[1, 2, 3, 8],
            };
            for &nb in blocks {
                let cols = nb * fmt.block_elems();
                for rows in [1, 2, 3, 5, 17] {
                    for n in [1, 2, 3, 4, 5, 7, 9, 17] {
                        check(&k, fmt, rows, n, cols, &mut rng);
                    }
                }
            }
        }
    }
}

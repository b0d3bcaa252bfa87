//! AVX2 twins of the float kernels (x86-64), bit-exact with `purehw_kernels::quant`.
//!
//! `unsafe` is allowed in this module because the `core::arch` loads take raw pointers and the
//! `#[target_feature]` entry points may only run once [`available`] has confirmed AVX2, FMA and
//! F16C; every `unsafe` block says why it is sound.
//!
//! Exactness: each block is dequantized into 8-wide vectors in element order with the reference's
//! float operations (one rounding per product or sum, never fused), and each token accumulates
//! `acc = acc + w·x` in one 8-lane vector, so lane `l` sees exactly the `i % 8 == l` terms in the
//! order `dot_f32_acc` adds them; the lanes are then combined by `reduce_lanes`.
#![allow(unsafe_code)]

use core::arch::x86_64::*;
use std::sync::OnceLock;

use purehw_kernels::Format;
use purehw_kernels::quant::{LANES, reduce_lanes};

/// Whether this CPU runs the kernels below (AVX2, FMA and F16C). Cached after the first call.
pub(super) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    })
}

/// `out[t·rows + r] = dot_row(fmt, row r, x[t·cols..][..cols])`, bit-exact.
pub(super) fn gemm_f32(fmt: Format, w: &[u8], rows: usize, cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
    let Some(rb) = fmt.bytes_for(cols) else {
        return super::scalar::gemm_f32(fmt, w, rows, cols, x, n, out);
    };
    let fits = rows.checked_mul(rb).is_some_and(|b| b <= w.len())
        && n.checked_mul(cols).is_some_and(|e| e <= x.len())
        && n.checked_mul(rows).is_some_and(|o| o <= out.len());
    if !available() || !fits {
        // The scalar path is the definition (and reports a caller error the way it always has).
        return super::scalar::gemm_f32(fmt, w, rows, cols, x, n, out);
    }
    if rows == 0 || n == 0 {
        return;
    }
    // SAFETY: `available()` confirmed AVX2, FMA and F16C on this CPU; every slice access inside
    // is bounds-checked (the sizes were validated just above).
    unsafe { gemm_avx2(fmt, w, rows, cols, rb, x, n, out) }
}

/// `purehw_kernels::quant::dot_f32`, bit for bit (any lengths: the shorter one counts).
pub(super) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    if !available() {
        return purehw_kernels::quant::dot_f32(a, b);
    }
    // SAFETY: `available()` confirmed AVX2, FMA and F16C on this CPU.
    unsafe { dot_avx2(a, b) }
}

/// Whether `n` rows of `d` at `stride` lie inside `len` elements.
fn rows_fit(n: usize, d: usize, stride: usize, len: usize) -> bool {
    n == 0 || (n - 1).checked_mul(stride).and_then(|o| o.checked_add(d)).is_some_and(|e| e <= len)
}

/// Whether `dot_keys`/`axpy_keys` arguments fit their slices: a group of `group_len / d` queries
/// (or outputs), their `n` scores (or weights) at `ld` inside `scores_len`, and `n` keys (or
/// values) of `d` at `stride` inside `kv_len`.
pub(super) fn keys_fit(
    group_len: usize,
    d: usize,
    n: usize,
    ld: usize,
    scores_len: usize,
    stride: usize,
    kv_len: usize,
) -> bool {
    d > 0 && group_len.is_multiple_of(d) && rows_fit(group_len / d, n, ld, scores_len) && rows_fit(n, d, stride, kv_len)
}

/// A group of queries' `dot_f32` against `n` keys (see `Kernels::dot_keys`).
pub(super) fn dot_keys(q: &[f32], d: usize, k: &[f32], stride: usize, n: usize, out: &mut [f32], ld: usize) {
    if !available() || !keys_fit(q.len(), d, n, ld, out.len(), stride, k.len()) {
        return super::scalar::dot_keys(q, d, k, stride, n, out, ld);
    }
    // SAFETY: `available()` confirmed AVX2, FMA and F16C; every key lies inside `k` (checked).
    unsafe { dot_keys_avx2(q, d, k, stride, n, out, ld) }
}

/// A group of queries' `e·v` over `n` keys, in key order (see `Kernels::axpy_keys`).
pub(super) fn axpy_keys(y: &mut [f32], d: usize, e: &[f32], ld: usize, n: usize, v: &[f32], stride: usize) {
    if !available() || !keys_fit(y.len(), d, n, ld, e.len(), stride, v.len()) {
        return super::scalar::axpy_keys(y, d, e, ld, n, v, stride);
    }
    // SAFETY: as above; every value row lies inside `v` (checked).
    unsafe { axpy_keys_avx2(y, d, e, ld, n, v, stride) }
}

// ---------------------------------------------------------------------------------------------
// Loads and small helpers (safe to call from code compiled with the same features).

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn ld_ps(x: &[f32; 8]) -> __m256 {
    // SAFETY: `x` is 8 readable f32s (32 bytes); `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_ps(x.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn st_ps(out: &mut [f32; 8], v: __m256) {
    // SAFETY: `out` is 8 writable f32s (32 bytes); `storeu` has no alignment requirement.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) }
}

/// 16 bytes at `b[o..o + 16]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn ld128(b: &[u8], o: usize) -> __m128i {
    let s: &[u8; 16] = b[o..o + 16].try_into().unwrap();
    // SAFETY: `s` is 16 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm_loadu_si128(s.as_ptr().cast()) }
}

/// 8 bytes at `b[o..o + 8]` in the low half of a vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn ld64(b: &[u8], o: usize) -> __m128i {
    let s: &[u8; 8] = b[o..o + 8].try_into().unwrap();
    // SAFETY: `s` is 8 readable bytes; `loadl_epi64` reads exactly 8 bytes, unaligned.
    unsafe { _mm_loadl_epi64(s.as_ptr().cast()) }
}

/// The f16 at `b[o..o + 2]`, widened exactly (as `half::f16::to_f32` does for finite values).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_at(b: &[u8], o: usize) -> f32 {
    let h = u16::from_le_bytes([b[o], b[o + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

/// Bytes `b[o..o + 8]` zero-extended to 8 × i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn u8x8(b: &[u8], o: usize) -> __m256i {
    _mm256_cvtepu8_epi32(ld64(b, o))
}

/// `i32 → f32` per lane (exact for the small integers used here).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn cvt(v: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(v)
}

/// The 32 4-bit values of a 16-byte `qs` at `b[o..]` as bytes in element order (element `j`: low
/// nibble of byte `j`; element `j + 16`: its high nibble).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn nibble_bytes(b: &[u8], o: usize) -> __m256i {
    let v = ld128(b, o);
    let m = _mm_set1_epi8(0x0F);
    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(v), m), _mm_and_si128(v, m))
}

/// Bit 4 of the 32 elements of a Q5_0/Q5_1 block as bytes (0 or 0x10): bit `i` of the
/// little-endian u32 at `b[o..]` for element `i`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q5_high_bytes(b: &[u8], o: usize) -> __m256i {
    let qh = _mm256_set1_epi32(u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) as i32);
    // Byte i takes qh byte i / 8; every bit but bit i % 8 is then forced to one.
    let spread = _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303);
    let others = _mm256_set1_epi64x(0x7FBF_DFEF_F7FB_FDFEu64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_or_si256(_mm256_shuffle_epi8(qh, spread), others), _mm256_set1_epi8(-1));
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// 32 signed bytes (element order) widened to 4 × 8 f32, exactly.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn i8x32_to_f32(q: __m256i) -> [__m256; 4] {
    let (lo, hi) = (_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
    [
        cvt(_mm256_cvtepi8_epi32(lo)),
        cvt(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo))),
        cvt(_mm256_cvtepi8_epi32(hi)),
        cvt(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi))),
    ]
}

// ---------------------------------------------------------------------------------------------
// Formats as const-generic ids, their geometry and their dequantization, 32 elements at a time.

const F_F32: u8 = 0;
const F_F16: u8 = 1;
const F_BF16: u8 = 2;
const F_Q4_0: u8 = 3;
const F_Q4_1: u8 = 4;
const F_Q5_0: u8 = 5;
const F_Q5_1: u8 = 6;
const F_Q8_0: u8 = 7;
const F_Q4_K: u8 = 8;
const F_Q5_K: u8 = 9;
const F_Q6_K: u8 = 10;

/// Plain floats (any length; handled in pseudo-blocks of 32 plus an exact scalar tail).
const fn is_plain(f: u8) -> bool {
    f <= F_BF16
}

/// Elements per block; plain formats use pseudo-blocks of 32.
const fn block_elems(f: u8) -> usize {
    if f >= F_Q4_K { 256 } else { 32 }
}

/// Per-block constants: the broadcast scales of a 32-block or the sub-block scales of a k-quant.
#[derive(Copy, Clone)]
struct Scales {
    d: __m256,
    m: __m256,
    /// Q4_K/Q5_K: `d·sc[g]` (8); Q6_K: `d·sc[s]` (16).
    dl: [f32; 16],
    /// Q4_K/Q5_K: `dmin·m[g]`.
    ml: [f32; 8],
}

/// The per-block scales of block `blk`, computed exactly as the reference does (scalar f32).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scales<const F: u8>(blk: &[u8]) -> Scales {
    let mut s = Scales { d: _mm256_setzero_ps(), m: _mm256_setzero_ps(), dl: [0.0; 16], ml: [0.0; 8] };
    match F {
        F_Q4_0 | F_Q5_0 | F_Q8_0 => s.d = _mm256_set1_ps(f16_at(blk, 0)),
        F_Q4_1 | F_Q5_1 => {
            s.d = _mm256_set1_ps(f16_at(blk, 0));
            s.m = _mm256_set1_ps(f16_at(blk, 2));
        }
        F_Q4_K | F_Q5_K => {
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let q: &[u8; 12] = blk[4..16].try_into().unwrap();
            // `scale_min_k4`: pairs 0..4 in the low 6 bits of bytes 0..4 / 4..8, pairs 4..8 from
            // the nibbles of bytes 8..12 and the top 2 bits of bytes 0..4 / 4..8.
            for j in 0..4 {
                let (sc, mn) = (q[j] & 0x3F, q[j + 4] & 0x3F);
                let sc4 = (q[j + 8] & 0x0F) | ((q[j] >> 6) << 4);
                let mn4 = (q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4);
                s.dl[j] = d * sc as f32;
                s.ml[j] = dmin * mn as f32;
                s.dl[j + 4] = d * sc4 as f32;
                s.ml[j + 4] = dmin * mn4 as f32;
            }
        }
        F_Q6_K => {
            let d = f16_at(blk, 208);
            for (i, dl) in s.dl.iter_mut().enumerate() {
                *dl = d * (blk[192 + i] as i8) as f32;
            }
        }
        _ => {}
    }
    s
}

/// Elements `32c..32c + 32` of block `blk`, as 4 vectors in element order, bit-exact with the
/// reference dequantization.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dequant<const F: u8>(blk: &[u8], c: usize, s: &Scales) -> [__m256; 4] {
    let mut w = [_mm256_setzero_ps(); 4];
    match F {
        F_F32 => {
            for (k, w) in w.iter_mut().enumerate() {
                let b: &[u8; 32] = blk[32 * k..32 * k + 32].try_into().unwrap();
                // SAFETY: `b` is 32 readable bytes (8 f32, little-endian like x86); unaligned load.
                *w = unsafe { _mm256_loadu_ps(b.as_ptr().cast()) };
            }
        }
        F_F16 => {
            for (k, w) in w.iter_mut().enumerate() {
                *w = _mm256_cvtph_ps(ld128(blk, 16 * k));
            }
        }
        F_BF16 => {
            for (k, w) in w.iter_mut().enumerate() {
                let v = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(ld128(blk, 16 * k)));
                *w = _mm256_castsi256_ps(v);
            }
        }
        F_Q4_0 => {
            let q = i8x32_to_f32(_mm256_sub_epi8(nibble_bytes(blk, 2), _mm256_set1_epi8(8)));
            for k in 0..4 {
                w[k] = _mm256_mul_ps(s.d, q[k]);
            }
        }
        F_Q4_1 => {
            let q = i8x32_to_f32(nibble_bytes(blk, 4));
            for k in 0..4 {
                w[k] = _mm256_add_ps(_mm256_mul_ps(s.d, q[k]), s.m);
            }
        }
        F_Q5_0 => {
            let q = _mm256_or_si256(nibble_bytes(blk, 6), q5_high_bytes(blk, 2));
            let q = i8x32_to_f32(_mm256_sub_epi8(q, _mm256_set1_epi8(16)));
            for k in 0..4 {
                w[k] = _mm256_mul_ps(s.d, q[k]);
            }
        }
        F_Q5_1 => {
            let q = i8x32_to_f32(_mm256_or_si256(nibble_bytes(blk, 8), q5_high_bytes(blk, 4)));
            for k in 0..4 {
                w[k] = _mm256_add_ps(_mm256_mul_ps(s.d, q[k]), s.m);
            }
        }
        F_Q8_0 => {
            for (k, w) in w.iter_mut().enumerate() {
                *w = _mm256_mul_ps(cvt(_mm256_cvtepi8_epi32(ld64(blk, 2 + 8 * k))), s.d);
            }
        }
        F_Q4_K | F_Q5_K => {
            // Sub-block `c`: nibble `c % 2` of qs chunk `c / 2`; Q5_K adds bit `c` of qh[i] as bit 4.
            let qs = if F == F_Q4_K { 16 } else { 48 } + 32 * (c / 2);
            let shift = _mm_cvtsi32_si128(4 * (c % 2) as i32);
            let hshift = _mm_cvtsi32_si128(c as i32);
            let (dl, ml) = (_mm256_set1_ps(s.dl[c]), _mm256_set1_ps(s.ml[c]));
            let (m4, one) = (_mm256_set1_epi32(0x0F), _mm256_set1_epi32(1));
            for (k, w) in w.iter_mut().enumerate() {
                let mut q = _mm256_and_si256(_mm256_srl_epi32(u8x8(blk, qs + 8 * k), shift), m4);
                if F == F_Q5_K {
                    let h = _mm256_and_si256(_mm256_srl_epi32(u8x8(blk, 16 + 8 * k), hshift), one);
                    q = _mm256_or_si256(q, _mm256_slli_epi32::<4>(h));
                }
                *w = _mm256_sub_ps(_mm256_mul_ps(dl, cvt(q)), ml);
            }
        }
        F_Q6_K => {
            // Elements 32c.. lie in half `c / 4`, quarter `j = c % 4`: low nibbles from
            // ql[64h + 32(j % 2)..] (shifted by 4(j / 2)), 2 high bits from qh[32h..] >> 2j.
            let (half, j) = (c / 4, c % 4);
            let (ql, lo_shift) = (64 * half + 32 * (j % 2), _mm_cvtsi32_si128(4 * (j / 2) as i32));
            let (qh, hi_shift) = (128 + 32 * half, _mm_cvtsi32_si128(2 * j as i32));
            let (m4, m2, off) = (_mm256_set1_epi32(0x0F), _mm256_set1_epi32(0x03), _mm256_set1_epi32(32));
            let dl = [_mm256_set1_ps(s.dl[2 * c]), _mm256_set1_ps(s.dl[2 * c + 1])];
            for (k, w) in w.iter_mut().enumerate() {
                let lo = _mm256_and_si256(_mm256_srl_epi32(u8x8(blk, ql + 8 * k), lo_shift), m4);
                let hi = _mm256_and_si256(_mm256_srl_epi32(u8x8(blk, qh + 8 * k), hi_shift), m2);
                let q = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32::<4>(hi)), off);
                *w = _mm256_mul_ps(dl[k / 2], cvt(q));
            }
        }
        _ => {}
    }
    w
}

/// Plain element `i` of a row, widened exactly as the reference does.
#[inline]
fn plain_at<const F: u8>(row: &[u8], i: usize) -> f32 {
    match F {
        F_F32 => f32::from_le_bytes(row[4 * i..4 * i + 4].try_into().unwrap()),
        F_F16 => half::f16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32(),
        _ => f32::from_bits((u16::from_le_bytes([row[2 * i], row[2 * i + 1]]) as u32) << 16),
    }
}

// ---------------------------------------------------------------------------------------------
// The GEMM: tiles of R rows × T tokens; each 32-element chunk of each row is dequantized once
// into registers and used for all T tokens.

/// Accumulate the whole blocks of `R` rows (`rows[i]`: `nb·BB` bytes) against `T` tokens
/// (`xs[j]`: at least `nb·block_elems` values) into `acc[i][j]` (8 lanes each).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // block `b` of every row of the tile: indices read clearer
fn tile<const F: u8, const BB: usize, const R: usize, const T: usize>(
    rows: &[&[u8]; R],
    xs: &[&[f32]; T],
    acc_out: &mut [[[f32; LANES]; T]; R],
) {
    let cpb = block_elems(F) / 32;
    let mut blocks: [&[[u8; BB]]; R] = [&[]; R];
    for (b, row) in blocks.iter_mut().zip(rows) {
        *b = row.as_chunks::<BB>().0;
    }
    let mut xc: [&[[f32; 32]]; T] = [&[]; T];
    for (c, x) in xc.iter_mut().zip(xs) {
        *c = x.as_chunks::<32>().0;
    }
    let nb = blocks[0].len();
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for b in 0..nb {
        let mut sc = [Scales { d: _mm256_setzero_ps(), m: _mm256_setzero_ps(), dl: [0.0; 16], ml: [0.0; 8] }; R];
        for i in 0..R {
            sc[i] = scales::<F>(&blocks[i][b]);
        }
        for c in 0..cpb {
            let xi = b * cpb + c;
            for i in 0..R {
                let wv = dequant::<F>(&blocks[i][b], c, &sc[i]);
                for j in 0..T {
                    let x: &[f32; 32] = &xc[j][xi];
                    for (k, w) in wv.iter().enumerate() {
                        let xk: &[f32; 8] = x[8 * k..8 * k + 8].try_into().unwrap();
                        acc[i][j] = _mm256_add_ps(acc[i][j], _mm256_mul_ps(*w, ld_ps(xk)));
                    }
                }
            }
        }
    }
    for i in 0..R {
        for j in 0..T {
            st_ps(&mut acc_out[i][j], acc[i][j]);
        }
    }
}

/// Rows `r0..r0 + R` (past `rows`: the last row again, result dropped) × tokens `t0..t0 + T`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn run_tile<const F: u8, const BB: usize, const R: usize, const T: usize>(
    w: &[u8],
    (rows, cols, rb): (usize, usize, usize),
    x: &[f32],
    r0: usize,
    t0: usize,
    out: &mut [f32],
) {
    let nb = cols / block_elems(F);
    let main = nb * BB;
    let mut rws: [&[u8]; R] = [&[]; R];
    for (i, rw) in rws.iter_mut().enumerate() {
        let r = (r0 + i).min(rows - 1);
        *rw = &w[r * rb..r * rb + main];
    }
    let mut xs: [&[f32]; T] = [&[]; T];
    for (j, xj) in xs.iter_mut().enumerate() {
        *xj = &x[(t0 + j) * cols..(t0 + j + 1) * cols];
    }
    let mut acc = [[[0f32; LANES]; T]; R];
    tile::<F, BB, R, T>(&rws, &xs, &mut acc);
    for (i, acc) in acc.iter_mut().enumerate().take(rows - r0) {
        let r = r0 + i;
        for (j, lanes) in acc.iter_mut().enumerate() {
            if is_plain(F) {
                // The tail (< 32 elements) exactly as `dot_f32_acc` does it: lane = index % 8.
                let row = &w[r * rb..(r + 1) * rb];
                for e in nb * 32..cols {
                    lanes[e % LANES] += plain_at::<F>(row, e) * xs[j][e];
                }
            }
            out[(t0 + j) * rows + r] = reduce_lanes(lanes);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn gemm_fmt<const F: u8, const BB: usize>(
    w: &[u8],
    rows: usize,
    cols: usize,
    rb: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) {
    let g = (rows, cols, rb);
    if n == 1 {
        // One token: 4 rows at a time keep 4 independent accumulator chains in flight.
        let mut r = 0;
        while r + 4 <= rows {
            run_tile::<F, BB, 4, 1>(w, g, x, r, 0, out);
            r += 4;
        }
        while r < rows {
            run_tile::<F, BB, 1, 1>(w, g, x, r, 0, out);
            r += 1;
        }
        return;
    }
    // Several tokens: 2 rows × up to 4 tokens; a row pair's blocks stay in L1 across token tiles.
    for r in (0..rows).step_by(2) {
        let mut t = 0;
        while t < n {
            match n - t {
                1 => run_tile::<F, BB, 2, 1>(w, g, x, r, t, out),
                2 => run_tile::<F, BB, 2, 2>(w, g, x, r, t, out),
                3 => run_tile::<F, BB, 2, 3>(w, g, x, r, t, out),
                _ => run_tile::<F, BB, 2, 4>(w, g, x, r, t, out),
            }
            t += 4;
        }
    }
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C. Sizes: `w` holds `rows·rb` bytes, `x` `n·cols`
/// values, `out` `n·rows` (checked again by slice indexing).
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_avx2(fmt: Format, w: &[u8], rows: usize, cols: usize, rb: usize, x: &[f32], n: usize, out: &mut [f32]) {
    match fmt {
        Format::F32 => gemm_fmt::<F_F32, 128>(w, rows, cols, rb, x, n, out),
        Format::F16 => gemm_fmt::<F_F16, 64>(w, rows, cols, rb, x, n, out),
        Format::BF16 => gemm_fmt::<F_BF16, 64>(w, rows, cols, rb, x, n, out),
        Format::Q4_0 => gemm_fmt::<F_Q4_0, 18>(w, rows, cols, rb, x, n, out),
        Format::Q4_1 => gemm_fmt::<F_Q4_1, 20>(w, rows, cols, rb, x, n, out),
        Format::Q5_0 => gemm_fmt::<F_Q5_0, 22>(w, rows, cols, rb, x, n, out),
        Format::Q5_1 => gemm_fmt::<F_Q5_1, 24>(w, rows, cols, rb, x, n, out),
        Format::Q8_0 => gemm_fmt::<F_Q8_0, 34>(w, rows, cols, rb, x, n, out),
        Format::Q4_K => gemm_fmt::<F_Q4_K, 144>(w, rows, cols, rb, x, n, out),
        Format::Q5_K => gemm_fmt::<F_Q5_K, 176>(w, rows, cols, rb, x, n, out),
        Format::Q6_K => gemm_fmt::<F_Q6_K, 210>(w, rows, cols, rb, x, n, out),
        _ => super::scalar::gemm_f32(fmt, w, rows, cols, x, n, out),
    }
}

// Block sizes above must agree with the reference layouts.
const _: () = {
    assert!(Format::Q4_0.block_bytes() == 18 && Format::Q4_1.block_bytes() == 20);
    assert!(Format::Q5_0.block_bytes() == 22 && Format::Q5_1.block_bytes() == 24);
    assert!(Format::Q8_0.block_bytes() == 34 && Format::Q4_K.block_bytes() == 144);
    assert!(Format::Q5_K.block_bytes() == 176 && Format::Q6_K.block_bytes() == 210);
};

// ---------------------------------------------------------------------------------------------
// dot_f32 and axpy.

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (ac, at) = a[..n].as_chunks::<LANES>();
    let (bc, bt) = b[..n].as_chunks::<LANES>();
    let mut acc = _mm256_setzero_ps();
    for (x, y) in ac.iter().zip(bc) {
        acc = _mm256_add_ps(acc, _mm256_mul_ps(ld_ps(x), ld_ps(y)));
    }
    let mut lanes = [0f32; LANES];
    st_ps(&mut lanes, acc);
    for (l, (x, y)) in at.iter().zip(bt).enumerate() {
        lanes[l] += x * y;
    }
    reduce_lanes(&lanes)
}

/// Four keys at a time for every query of the group: four independent 8-lane chains per query
/// (one chain alone waits on each add), the four keys read from L1 by all queries. Each chain is
/// `dot_avx2`'s, bit for bit.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_keys_avx2(q: &[f32], d: usize, k: &[f32], stride: usize, n: usize, out: &mut [f32], ld: usize) {
    let key = |j: usize| &k[j * stride..j * stride + d];
    let mut j = 0;
    while j + 4 <= n {
        let ks = [
            key(j).as_chunks::<LANES>(),
            key(j + 1).as_chunks::<LANES>(),
            key(j + 2).as_chunks::<LANES>(),
            key(j + 3).as_chunks::<LANES>(),
        ];
        for (h, qh) in q.chunks_exact(d).enumerate() {
            let (qc, qt) = qh.as_chunks::<LANES>();
            let mut acc = [_mm256_setzero_ps(); 4];
            for (i, x) in qc.iter().enumerate() {
                let xv = ld_ps(x);
                for (a, kc) in acc.iter_mut().zip(&ks) {
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(xv, ld_ps(&kc.0[i])));
                }
            }
            for (c, (a, kc)) in acc.iter().zip(&ks).enumerate() {
                let mut lanes = [0f32; LANES];
                st_ps(&mut lanes, *a);
                for (l, (x, y)) in qt.iter().zip(kc.1).enumerate() {
                    lanes[l] += x * y;
                }
                out[h * ld + j + c] = reduce_lanes(&lanes);
            }
        }
        j += 4;
    }
    for j in j..n {
        for (h, qh) in q.chunks_exact(d).enumerate() {
            // SAFETY: this function's own contract (AVX2, FMA, F16C).
            out[h * ld + j] = unsafe { dot_avx2(qh, key(j)) };
        }
    }
}

/// Keys in blocks whose values stay in L1 while every query of the group takes them; within a
/// block, 64 outputs at a time held in eight vectors while each key's `e·v` is added in key order
/// (a product, then a sum: `axpy`'s operations, element by element).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_keys_avx2(y: &mut [f32], d: usize, e: &[f32], ld: usize, n: usize, v: &[f32], stride: usize) {
    const KB: usize = 32;
    const W: usize = 8 * LANES;
    let mut j0 = 0;
    while j0 < n {
        let j1 = (j0 + KB).min(n);
        for (h, yh) in y.chunks_exact_mut(d).enumerate() {
            let eh = &e[h * ld + j0..h * ld + j1];
            let mut c0 = 0;
            while c0 + W <= d {
                let (yc, _) = yh[c0..c0 + W].as_chunks_mut::<LANES>();
                let mut acc = [_mm256_setzero_ps(); 8];
                for (a, yv) in acc.iter_mut().zip(yc.iter()) {
                    *a = ld_ps(yv);
                }
                for (jj, &ej) in eh.iter().enumerate() {
                    let ev = _mm256_set1_ps(ej);
                    let at = (j0 + jj) * stride + c0;
                    let (vc, _) = v[at..at + W].as_chunks::<LANES>();
                    for (a, x) in acc.iter_mut().zip(vc) {
                        *a = _mm256_add_ps(*a, _mm256_mul_ps(ev, ld_ps(x)));
                    }
                }
                for (a, yv) in acc.iter().zip(yc.iter_mut()) {
                    st_ps(yv, *a);
                }
                c0 += W;
            }
            if c0 < d {
                for (jj, &ej) in eh.iter().enumerate() {
                    let at = (j0 + jj) * stride;
                    // SAFETY: this function's own contract (AVX2, FMA, F16C).
                    unsafe { axpy_avx2(&mut yh[c0..], ej, &v[at + c0..at + d]) };
                }
            }
        }
        j0 = j1;
    }
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_avx2(y: &mut [f32], a: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    let (yc, yt) = y[..n].as_chunks_mut::<LANES>();
    let (xc, xt) = x[..n].as_chunks::<LANES>();
    let av = _mm256_set1_ps(a);
    for (y, x) in yc.iter_mut().zip(xc) {
        let v = _mm256_add_ps(ld_ps(y), _mm256_mul_ps(av, ld_ps(x)));
        st_ps(y, v);
    }
    for (y, &x) in yt.iter_mut().zip(xt) {
        *y += a * x;
    }
}

/// `scalar::widen_f16`, 8 at a time with `vcvtph2ps` (exact, as `half` converts).
pub(super) fn widen_f16(h: &[u16], out: &mut [f32]) {
    assert!(out.len() >= h.len(), "widen_f16: output too short");
    // SAFETY: only reachable through `x86::kernels()`, which checked avx2+fma+f16c; lengths above.
    unsafe { widen_f16_avx(h, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen_f16_avx(h: &[u16], out: &mut [f32]) {
    let whole = h.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        // SAFETY: `i + 8 <= h.len() <= out.len()`; unaligned loads and stores.
        unsafe {
            let v = _mm_loadu_si128(h.as_ptr().add(i).cast());
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(v));
        }
    }
    super::scalar::widen_f16(&h[whole..], &mut out[whole..]);
}

#[cfg(test)]
mod tests {
    use purehw_kernels::Format;
    use purehw_kernels::quant::{dot_f32 as ref_dot, dot_row};

    use super::*;
    use purehw_kernels::testing::{Rng, random_row};

    /// `rows` random rows of `cols` elements: random bytes, finite scales / values.
    fn random_rows(rng: &mut Rng, fmt: Format, rows: usize, cols: usize) -> Vec<u8> {
        (0..rows).flat_map(|_| random_row(rng, fmt, cols)).collect()
    }

    fn col_counts(fmt: Format) -> Vec<usize> {
        match fmt.block_elems() {
            1 => vec![0, 1, 7, 8, 9, 64, 259],
            32 => vec![0, 32, 64, 96, 640],
            _ => vec![0, 256, 512, 768],
        }
    }

    #[test]
    fn gemm_f32_matches_dot_row_bitwise() {
        if !available() {
            return;
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for fmt in Format::ALL {
            for cols in col_counts(fmt) {
                for rows in [1usize, 2, 3, 5] {
                    let w = random_rows(&mut rng, fmt, rows, cols);
                    let rb = fmt.bytes_for(cols).unwrap();
                    for n in [1usize, 2, 3, 4, 5, 9] {
                        let x: Vec<f32> = (0..n * cols).map(|_| rng.unit() * 2.0).collect();
                        let mut out = vec![f32::NAN; n * rows];
                        gemm_f32(fmt, &w, rows, cols, &x, n, &mut out);
                        for t in 0..n {
                            for r in 0..rows {
                                let want = dot_row(fmt, &w[r * rb..(r + 1) * rb], &x[t * cols..(t + 1) * cols]);
                                let got = out[t * rows + r];
                                assert_eq!(
                                    got.to_bits(),
                                    want.to_bits(),
                                    "{fmt:?} rows={rows} cols={cols} n={n} t={t} r={r}: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dot_f32_matches_reference_bitwise() {
        if !available() {
            return;
        }
        let mut rng = Rng(0x1234_5678_9ABC_DEF1);
        for len in (0..=70).chain([1000]) {
            let a: Vec<f32> = (0..len).map(|_| rng.unit() * 3.0).collect();
            let b: Vec<f32> = (0..len).map(|_| rng.unit() * 3.0).collect();
            assert_eq!(dot_f32(&a, &b).to_bits(), ref_dot(&a, &b).to_bits(), "len={len}");
        }
    }

    #[test]
    fn dot_keys_and_axpy_keys_match_scalar_bitwise() {
        if !available() {
            return;
        }
        let mut rng = Rng(0x5151_2323_7777_0101);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (d, g, n, stride) in
            [(64, 3, 9, 192), (256, 4, 77, 256), (70, 2, 5, 75), (8, 1, 4, 8), (130, 1, 1, 130), (64, 3, 0, 64)]
        {
            let q: Vec<f32> = (0..g * d).map(|_| rng.unit() * 3.0).collect();
            let k: Vec<f32> = (0..n * stride + d).map(|_| rng.unit() * 3.0).collect();
            let ld = n + 3;
            let (mut got, mut want) = (vec![0f32; g * ld], vec![0f32; g * ld]);
            dot_keys(&q, d, &k, stride, n, &mut got, ld);
            super::super::scalar::dot_keys(&q, d, &k, stride, n, &mut want, ld);
            assert_eq!(bits(&got), bits(&want), "dot d={d} g={g} n={n}");
            let e: Vec<f32> = (0..g * ld).map(|_| rng.unit()).collect();
            let y0: Vec<f32> = (0..g * d).map(|_| rng.unit() * 3.0).collect();
            let (mut got, mut want) = (y0.clone(), y0.clone());
            axpy_keys(&mut got, d, &e, ld, n, &k, stride);
            super::super::scalar::axpy_keys(&mut want, d, &e, ld, n, &k, stride);
            assert_eq!(bits(&got), bits(&want), "axpy d={d} g={g} n={n}");
        }
    }

    #[test]
    fn axpy_matches_scalar_bitwise() {
        if !available() {
            return;
        }
        let mut rng = Rng(0x0F0F_1234_5555_AAAA);
        for len in (0..=70).chain([1000]) {
            let x: Vec<f32> = (0..len).map(|_| rng.unit() * 3.0).collect();
            let y0: Vec<f32> = (0..len).map(|_| rng.unit() * 3.0).collect();
            let a = rng.unit() * 1.7;
            let mut want = y0.clone();
            for (y, &x) in want.iter_mut().zip(&x) {
                *y += a * x;
            }
            let mut got = y0.clone();
            // SAFETY: `available()` confirmed AVX2, FMA and F16C above.
            unsafe { axpy_avx2(&mut got, a, &x) };
            let (gb, wb): (Vec<u32>, Vec<u32>) =
                (got.iter().map(|v| v.to_bits()).collect(), want.iter().map(|v| v.to_bits()).collect());
            assert_eq!(gb, wb, "len={len}");
        }
    }
}

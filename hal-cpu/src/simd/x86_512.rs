//! AVX-512 (F+BW+VL) + VNNI twins of the integer GEMMs (x86-64), bit-exact with
//! `purehw_kernels::quant::{dot_row_q8a, dot_row_q8k}`, and of attention's two float kernels
//! (`dot_keys`, `axpy_keys`). Everything else (quantization, the other float kernels) is the AVX2
//! set of [`super::x86`].
//!
//! This module needs `unsafe` for two things only: calling the `#[target_feature]` functions
//! (sound because they are reachable only through [`kernels`], which checked the CPU features
//! first) and raw SIMD loads/stores (each one's bounds are argued at the site).
//!
//! How the reference maps onto AVX-512: a 512-bit register holds two 32-byte chunks; its i32
//! lanes 0..8 are the reference lanes of the first chunk and 8..16 those of the second.
//!
//! * 32-element formats (one block = one chunk): weight codes are made unsigned (`u = w + off`:
//!   Q4_0 `off = 8`, Q5_0 16, Q8_0 128 by flipping the sign bit, 0 for Q4_1/Q5_1) and
//!   `vpdpbusd(base, u, a)` with `base = −off·Σ_{4 lane bytes} a` (itself a `vpdpbusd`) gives lane
//!   `k` = `Σ_{i in 4k..4k+4} w[i]·a[i]` exactly in i32. The float steps stay per block:
//!   `d = d_w·d_a`, then `acc += d·lane`, lane-wise. With several tokens (prefill, batched decode)
//!   a register holds one block of two tokens, against the weight block repeated in both halves,
//!   and one 16-lane accumulator serves both tokens, one block at a time as the reference adds.
//!   With one token it holds two consecutive blocks of that token, and the 8-lane accumulator
//!   takes the first block's products and, after that, the second block's — two separate adds, in
//!   the reference's block order. The minimum term is the AVX2 one.
//! * k-quants: register `j` holds chunks (sub-blocks) `2j`, `2j + 1`; `pmaddubsw` (exact: codes
//!   are at most 31, or `|w| ≤ 32` with the activation's sign flipped for Q6_K) then `vpdpwssd`
//!   with each lane's sub-block scale accumulates `sc·lane` in i32. The reference sums these
//!   integers over the super-block, so the two halves are added as integers, then one
//!   `acc += d·lane` per super-block. The minimum term is the AVX2 one.
//!
//! No fused multiply-add anywhere; the final lane reduction is `reduce_lanes`'s order.
#![allow(unsafe_code)]

use core::arch::x86_64::*;
use core::mem::MaybeUninit;

// Shared with the AVX2 kernels (called from here with a superset of their features).
use super::x86::{
    Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, block_bytes_a, block_bytes_k, has_min_a, load16, load32, nibbles,
    reduce_lanes, row_tiles, scale_min_k4, word_bcast,
};

use purehw_kernels::Format;
use purehw_kernels::quant::{BlockQ8A, BlockQ8K};

use super::Kernels;

/// The AVX-512 VNNI kernels when the CPU has AVX-512 F, BW, VL and VNNI (plus the AVX2 set's
/// AVX2, FMA and F16C, whose kernels fill the other fields).
pub(super) fn kernels() -> Option<Kernels> {
    let have = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    if !have {
        return None;
    }
    let base = super::x86::kernels()?;
    // The attention kernels' key pairs need AVX-512 DQ (every VNNI CPU has it; checked anyway).
    let dq = is_x86_feature_detected!("avx512dq");
    Some(Kernels {
        name: "avx512vnni",
        gemm_q8a,
        gemm_q8k,
        dot_keys: if dq { dot_keys } else { base.dot_keys },
        axpy_keys,
        head_est_q8_0: Some(head_est_q8_0),
        ..base
    })
}

// ---------------------------------------------------------------------------------------------
// Greedy decoding's LM head estimate (`Kernels::head_est_q8_0`): 16 rows a register, lane = row.
// The 16 rows' block codes are transposed in registers into one register per four-byte (VNNI)
// group, so one `vpdpbusd` per group adds that group of all 16 rows for a token, and a block's
// integer sum is whole before its one fused multiply-add: a few operations per row, block and
// token instead of the exact matmul's 8-lane float chains.

/// `Kernels::head_est_q8_0`.
fn head_est_q8_0(w: &[u8], rows: usize, act: &[BlockQ8A], n: usize, est: &mut [f32], maxdw: &mut [f32]) {
    assert!(n <= 16, "head_est: at most 16 tokens");
    let ab = act.len().checked_div(n).unwrap_or(0);
    assert!(w.len() >= rows * ab * 34, "head_est: weights too short");
    assert!(act.len() >= n * ab && est.len() >= n * rows && maxdw.len() >= rows, "head_est: buffers too short");
    assert!(ab * 34 * 16 <= i32::MAX as usize, "head_est: rows too long");
    // SAFETY: only reachable through `kernels()`, which checked avx512f/bw/vl/vnni+avx2+fma+f16c;
    // the lengths the kernel relies on were asserted above.
    unsafe { head_est_avx512(w.as_ptr(), rows, ab, act.as_ptr(), n, est.as_mut_ptr(), maxdw.as_mut_ptr()) }
}

/// Safety: features as [`gemm_a`]; `w` holds `rows·ab` Q8_0 blocks, `act` `n·ab` blocks, `est`
/// `n·rows` floats, `maxdw` `rows`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn head_est_avx512(
    w: *const u8,
    rows: usize,
    ab: usize,
    act: *const BlockQ8A,
    n: usize,
    est: *mut f32,
    maxdw: *mut f32,
) {
    let rb = ab * 34;
    // Lane l holds row PERM[l] of a group of 16 (the order the transposition below leaves).
    let perm = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let flip = _mm512_set1_epi8(0x80u8 as i8);
    let mut acc = [_mm512_setzero_ps(); 16];
    for r0 in (0..rows).step_by(16) {
        let whole = rows - r0 >= 16;
        let m: __mmask16 = if whole { 0xFFFF } else { (1u16 << (rows - r0)) - 1 };
        // A whole group in transposition order; the last, partial one row by row (gathers).
        let order = if whole { perm } else { lanes };
        let rowoff = _mm512_mullo_epi32(order, _mm512_set1_epi32(rb as i32));
        // SAFETY: row `r0 < rows`.
        let base = unsafe { w.add(r0 * rb) };
        acc[..n].iter_mut().for_each(|a| *a = _mm512_setzero_ps());
        let mut mx = _mm512_setzero_ps();
        // The next group's bytes, a share of them each block (a hint: it never faults).
        let (next, lines) = (base.wrapping_add(16 * rb), (16 * rb).div_ceil(64 * ab.max(1)));
        for b in 0..ab {
            for l in 0..lines {
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64 * (b * lines + l)).cast());
            }
            // SAFETY: block `b < ab` of each of the group's rows (masked to `rows`): its d (a
            // dword's low half, the high half the block's first codes) and its 32 codes.
            let (dw, wq) = unsafe {
                let bp = base.add(b * 34);
                let d = _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), m, rowoff, bp.cast());
                let dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(d));
                let wq = if whole { codes_t(bp.add(2), rb) } else { codes_g(bp.add(2), rowoff, m) };
                (dw, wq.map(|q| _mm512_xor_si512(q, flip)))
            };
            mx = _mm512_max_ps(mx, _mm512_abs_ps(dw));
            for (t, acc) in acc.iter_mut().enumerate().take(n) {
                // SAFETY: token `t < n`, block `b < ab`.
                let a = unsafe { &*act.add(t * ab + b) };
                let qs = a.qs.as_ptr().cast::<i32>();
                // `w + 128` dotted; `−128·Σa` takes the offset back.
                let mut s = _mm512_set1_epi32(-128 * a.sum);
                for (k, wq) in wq.iter().enumerate() {
                    // SAFETY: `qs` is 32 bytes: group `k < 8`.
                    s = _mm512_dpbusd_epi32(s, *wq, _mm512_set1_epi32(unsafe { qs.add(k).read_unaligned() }));
                }
                let d = _mm512_mul_ps(dw, _mm512_set1_ps(a.d));
                *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), *acc);
            }
        }
        // Lanes back to row order (the permutation is its own inverse).
        for (t, acc) in acc.iter().enumerate().take(n) {
            // SAFETY: rows `r0..` of token `t`, masked to `rows`.
            unsafe { _mm512_mask_storeu_ps(est.add(t * rows + r0), m, _mm512_permutexvar_ps(order, *acc)) };
        }
        // SAFETY: as above.
        unsafe { _mm512_mask_storeu_ps(maxdw.add(r0), m, _mm512_permutexvar_ps(order, mx)) };
    }
}

/// The 32 codes at `p + i·rb` of 16 rows as 8 registers, register k holding 4-byte group k of
/// every row, row PERM[l] in lane l: each pair of rows (i, i + 8) loaded into one register, then
/// an 8×8 transposition of dwords in each 256-bit half (unpacks within 128-bit lanes, then
/// 128-bit lanes gathered by `vshufi32x4`).
///
/// Safety: features as [`gemm_a`]; 32 readable bytes at each `p + i·rb`, `i < 16`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn codes_t(p: *const u8, rb: usize) -> [__m512i; 8] {
    // SAFETY: rows `j` and `j + 8` of the caller's 16.
    let z: [__m512i; 8] = core::array::from_fn(|j| unsafe { join(load32(p.add(j * rb)), load32(p.add((j + 8) * rb))) });
    let lo = |a, b| _mm512_unpacklo_epi32(a, b);
    let hi = |a, b| _mm512_unpackhi_epi32(a, b);
    let (a01l, a01h, a23l, a23h) = (lo(z[0], z[1]), hi(z[0], z[1]), lo(z[2], z[3]), hi(z[2], z[3]));
    let (a45l, a45h, a67l, a67h) = (lo(z[4], z[5]), hi(z[4], z[5]), lo(z[6], z[7]), hi(z[6], z[7]));
    // b[c] (rows 0–3 and 8–11), e[c] (rows 4–7 and 12–15): group c in 128-bit lanes 0 and 2,
    // group c + 4 in lanes 1 and 3.
    let b = [
        _mm512_unpacklo_epi64(a01l, a23l),
        _mm512_unpackhi_epi64(a01l, a23l),
        _mm512_unpacklo_epi64(a01h, a23h),
        _mm512_unpackhi_epi64(a01h, a23h),
    ];
    let e = [
        _mm512_unpacklo_epi64(a45l, a67l),
        _mm512_unpackhi_epi64(a45l, a67l),
        _mm512_unpacklo_epi64(a45h, a67h),
        _mm512_unpackhi_epi64(a45h, a67h),
    ];
    core::array::from_fn(|k| {
        let c = k % 4;
        if k < 4 {
            _mm512_shuffle_i32x4::<0b10_00_10_00>(b[c], e[c])
        } else {
            _mm512_shuffle_i32x4::<0b11_01_11_01>(b[c], e[c])
        }
    })
}

/// [`codes_t`] for the rows `m` selects, by gathers (row l in lane l; the others zero).
///
/// Safety: features as [`gemm_a`]; 32 readable bytes at `p + rowoff[l]` for each lane in `m`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn codes_g(p: *const u8, rowoff: __m512i, m: __mmask16) -> [__m512i; 8] {
    // SAFETY: as this function's contract.
    core::array::from_fn(|k| unsafe {
        _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), m, rowoff, p.add(4 * k).cast())
    })
}

// ---------------------------------------------------------------------------------------------
// Attention's float kernels: `dot_keys` with two keys per 16-lane register (lanes 0..8 one key's
// 8-lane chain, 8..16 the next key's: `dot_f32`'s chains, bit for bit), `axpy_keys` 16 outputs a
// register (elementwise: the lanes are independent).

/// `Kernels::dot_keys`. Head sizes that are not a multiple of 8 take the AVX2 kernel.
fn dot_keys(q: &[f32], d: usize, k: &[f32], stride: usize, n: usize, out: &mut [f32], ld: usize) {
    if !d.is_multiple_of(8) || !super::x86_f32::keys_fit(q.len(), d, n, ld, out.len(), stride, k.len()) {
        return super::x86_f32::dot_keys(q, d, k, stride, n, out, ld);
    }
    let g = q.len() / d;
    let mut j = 0;
    while j + 4 <= n {
        let mut h = 0;
        while h < g {
            // SAFETY: reachable only through `kernels()`, which checked AVX-512 F and DQ and the
            // AVX2 set; every access is a checked slice index.
            unsafe {
                match g - h {
                    1 => dot4::<1>(q, d, h, k, stride, j, out, ld),
                    2 => dot4::<2>(q, d, h, k, stride, j, out, ld),
                    3 => dot4::<3>(q, d, h, k, stride, j, out, ld),
                    _ => dot4::<4>(q, d, h, k, stride, j, out, ld),
                }
            }
            h += 4;
        }
        j += 4;
    }
    if j < n {
        // The last keys, fewer than four.
        let ks = &k[j * stride..];
        for (hq, qh) in q.chunks_exact(d).enumerate() {
            super::x86_f32::dot_keys(qh, d, ks, stride, n - j, &mut out[hq * ld + j..], ld);
        }
    }
}

/// 8 floats of `s` at `o`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512dq")]
fn ld8(s: &[f32], o: usize) -> __m256 {
    let a: &[f32; 8] = s[o..o + 8].try_into().unwrap();
    // SAFETY: `a` is 8 readable f32s; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_ps(a.as_ptr()) }
}

/// Keys `j..j + 4` (as two pairs) for queries `h0..h0 + H`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512dq")]
unsafe fn dot4<const H: usize>(
    q: &[f32],
    d: usize,
    h0: usize,
    k: &[f32],
    stride: usize,
    j: usize,
    out: &mut [f32],
    ld: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; H];
    let kb = j * stride;
    for i in (0..d).step_by(8) {
        let p0 = _mm512_insertf32x8::<1>(_mm512_castps256_ps512(ld8(k, kb + i)), ld8(k, kb + stride + i));
        let p1 =
            _mm512_insertf32x8::<1>(_mm512_castps256_ps512(ld8(k, kb + 2 * stride + i)), ld8(k, kb + 3 * stride + i));
        for (hh, a) in acc.iter_mut().enumerate() {
            let qb = _mm512_broadcast_f32x8(ld8(q, (h0 + hh) * d + i));
            a[0] = _mm512_add_ps(a[0], _mm512_mul_ps(qb, p0));
            a[1] = _mm512_add_ps(a[1], _mm512_mul_ps(qb, p1));
        }
    }
    for (hh, a) in acc.iter().enumerate() {
        let o = (h0 + hh) * ld + j;
        out[o] = reduce_lanes(_mm512_castps512_ps256(a[0]));
        out[o + 1] = reduce_lanes(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a[0]))));
        out[o + 2] = reduce_lanes(_mm512_castps512_ps256(a[1]));
        out[o + 3] = reduce_lanes(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a[1]))));
    }
}

/// `Kernels::axpy_keys`: 128 outputs at a time in eight registers, every key added in order.
fn axpy_keys(y: &mut [f32], d: usize, e: &[f32], ld: usize, n: usize, v: &[f32], stride: usize) {
    if !super::x86_f32::keys_fit(y.len(), d, n, ld, e.len(), stride, v.len()) {
        return super::x86_f32::axpy_keys(y, d, e, ld, n, v, stride);
    }
    const W: usize = 128;
    for (h, yh) in y.chunks_exact_mut(d).enumerate() {
        let eh = &e[h * ld..h * ld + n];
        let mut c0 = 0;
        while c0 + W <= d {
            // SAFETY: reachable only through `kernels()`, which checked AVX-512 F and the AVX2
            // set; every access is a checked slice index.
            unsafe { axpy128(&mut yh[c0..c0 + W], eh, v, stride, c0) };
            c0 += W;
        }
        if c0 < d {
            super::x86_f32::axpy_keys(&mut yh[c0..], d - c0, eh, n, n, &v[c0..], stride);
        }
    }
}

/// `y[i] += e[j]·v[j·stride + c0 + i]` for `i < 128`, keys in order.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn axpy128(y: &mut [f32], e: &[f32], v: &[f32], stride: usize, c0: usize) {
    let ld16 = |s: &[f32], o: usize| -> __m512 {
        let a: &[f32; 16] = s[o..o + 16].try_into().unwrap();
        // SAFETY: `a` is 16 readable f32s; `loadu` has no alignment requirement.
        unsafe { _mm512_loadu_ps(a.as_ptr()) }
    };
    let mut acc = [_mm512_setzero_ps(); 8];
    for (r, a) in acc.iter_mut().enumerate() {
        *a = ld16(y, 16 * r);
    }
    for (j, &ej) in e.iter().enumerate() {
        let ev = _mm512_set1_ps(ej);
        let at = j * stride + c0;
        for (r, a) in acc.iter_mut().enumerate() {
            *a = _mm512_add_ps(*a, _mm512_mul_ps(ev, ld16(v, at + 16 * r)));
        }
    }
    for (r, a) in acc.iter().enumerate() {
        let o: &mut [f32; 16] = (&mut y[16 * r..16 * r + 16]).try_into().unwrap();
        // SAFETY: `o` is 16 writable f32s; `storeu` has no alignment requirement.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), *a) };
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
/// Most 32-element blocks per row for the token-pair path (its scratch holds each tile's pairs'
/// operands, `TT/2` per block).
const PAIR_MAXB: usize = 128;

// ---------------------------------------------------------------------------------------------
// Safe entry points (the `Kernels` fn pointers).

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
    // SAFETY: only reachable through `kernels()`, which checked avx512f/bw/vl/vnni+avx2+fma+f16c;
    // the slice lengths the kernels rely on were asserted above.
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
    // SAFETY: only reachable through `kernels()`, which checked avx512f/bw/vl/vnni+avx2+fma+f16c;
    // the slice lengths the kernels rely on were asserted above.
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

/// The raw f16 bits at `p` (little-endian).
#[inline]
unsafe fn f16_bits(p: *const u8) -> u16 {
    // SAFETY: the caller guarantees two readable bytes at `p`.
    unsafe { p.cast::<u16>().read_unaligned() }
}

/// The f16 at `p`, widened exactly (`vcvtph2ps`, as `half` does) and broadcast to 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn f16x8_at(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees two readable bytes at `p`.
    let h = unsafe { f16_bits(p) };
    _mm256_cvtph_ps(_mm_set1_epi16(h as i16))
}

/// Two f16 values widened exactly: `h0` in lanes 0..8, `h1` in lanes 8..16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn f16x16_pair(h0: u16, h1: u16) -> __m512 {
    _mm512_cvtph_ps(_mm256_set_m128i(_mm_set1_epi16(h1 as i16), _mm_set1_epi16(h0 as i16)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn load64(p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees 64 readable bytes at `p`.
    unsafe { _mm512_loadu_si512(p.cast()) }
}

/// Lanes 0..8 of a 16-lane float vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn lo8(v: __m512) -> __m256 {
    _mm512_castps512_ps256(v)
}

/// Lanes 8..16 of a 16-lane float vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn hi8(v: __m512) -> __m256 {
    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
}

/// `lo ‖ hi` (lanes 0..8 from `lo`, 8..16 from `hi`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn join(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

// ---------------------------------------------------------------------------------------------
// 32-element formats.

/// The offset `off` with `w = u − off`, `u` the unsigned code [`codes_a`] returns.
const fn offset_a(f: u8) -> u8 {
    match f {
        Q4_0 => 8,
        Q5_0 => 16,
        Q8_0 => 128,
        _ => 0,
    }
}

/// The 32 unsigned codes `u = w + offset_a(F)` of the block at `p`, in element order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn codes_a<const F: u8>(p: *const u8) -> __m256i {
    // SAFETY (all reads below): the caller guarantees a whole block of format `F` at `p`; each
    // read lies inside that block's layout (d, m, qh, qs offsets of ggml's block_*).
    unsafe {
        match F {
            Q4_0 => nibbles(load16(p.add(2))),
            Q4_1 => nibbles(load16(p.add(4))),
            Q5_0 | Q5_1 => {
                let (qh_at, qs_at) = if F == Q5_0 { (2, 6) } else { (4, 8) };
                // Bit `j` of `qh` is element `j`'s fifth bit: a byte mask selects 0x10 per element.
                let qh = p.add(qh_at).cast::<u32>().read_unaligned();
                let hi = _mm256_maskz_mov_epi8(qh, _mm256_set1_epi8(0x10));
                _mm256_or_si256(nibbles(load16(p.add(qs_at))), hi)
            }
            // Q8_0: `w + 128` is `w` with its sign bit flipped, read as unsigned.
            _ => _mm256_xor_si256(load32(p.add(2)), _mm256_set1_epi8(0x80u8 as i8)),
        }
    }
}

/// `out[t·rows + r] = dot_row_q8a(F, row r, token t)` for `ab` blocks per row.
///
/// Safety: avx512f/bw/vl/vnni+avx2+fma+f16c present; `w.len() >= rows·ab·block_bytes(F)`,
/// `act.len() >= n·ab`, `out.len() >= n·rows`, `ab <= MAXB`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn gemm_a<const F: u8>(w: &[u8], rows: usize, ab: usize, act: &[BlockQ8A], n: usize, out: &mut [f32]) {
    // Per token tile, for the minimum formats: `sa[b]` = `d·Σq` of block `b` (the reference's
    // `a.d * a.sum as f32`), lane = token.
    let mut sa: MaybeUninit<[[f32; TT]; MAXB]> = MaybeUninit::uninit();
    let c = CtxA {
        w: w.as_ptr(),
        rb: ab * block_bytes_a(F),
        ab,
        act: act.as_ptr(),
        sa: sa.as_mut_ptr().cast::<[f32; TT]>(),
        out: out.as_mut_ptr(),
        rows,
    };
    if n >= 2 && ab <= PAIR_MAXB && rows >= 8 {
        // Several tokens over many rows: token pairs' operands are prepared once per tile.
        let mut prep: MaybeUninit<[Ops; TT / 2 * PAIR_MAXB]> = MaybeUninit::uninit();
        // SAFETY: as this function's contract; `prep` holds `(TT/2)·PAIR_MAXB >= (TT/2)·ab` entries.
        return unsafe { gemm_pairs::<F>(&c, prep.as_mut_ptr().cast::<Ops>(), n) };
    }
    for t0 in (0..n).step_by(TT) {
        let tt = TT.min(n - t0);
        // SAFETY: tokens `t0 .. t0 + tt` are `< n`.
        unsafe { fill_sa::<F>(&c, t0, tt) };
        // Sub-tiles of 4, 2, 1 tokens (lane offset `l0` in the tile's scale vectors).
        let mut l0 = 0;
        while l0 < tt {
            let left = tt - l0;
            // SAFETY: the tile's tokens `t0 + l0 ..` are `< n`; `c` describes the checked slices.
            unsafe {
                if left >= 4 {
                    rows_a::<F, 2, 4>(&c, t0 + l0, l0);
                    l0 += 4;
                } else if left >= 2 {
                    rows_a::<F, 4, 2>(&c, t0 + l0, l0);
                    l0 += 2;
                } else {
                    rows_a::<F, 4, 1>(&c, t0 + l0, l0);
                    l0 += 1;
                }
            }
        }
    }
}

/// For the minimum formats, `sa[b]` lane `t` = `d·Σq` of token `t0 + t`'s block `b`, `t < tt`.
///
/// Safety: tokens `t0 .. t0 + tt` exist in `c`'s activations; `tt <= TT`.
#[inline]
unsafe fn fill_sa<const F: u8>(c: &CtxA, t0: usize, tt: usize) {
    if !has_min_a(F) {
        return;
    }
    for b in 0..c.ab {
        let mut sv = [0f32; TT];
        for (t, sv) in sv.iter_mut().enumerate().take(tt) {
            // SAFETY: token `t0 + t < n`, block `b < ab`.
            let a = unsafe { &*c.act.add((t0 + t) * c.ab + b) };
            *sv = a.d * a.sum as f32;
        }
        // SAFETY: in bounds: `b < ab <= MAXB` entries of the caller's scratch.
        unsafe { c.sa.cast_mut().add(b).write(sv) };
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
    sa: *const [f32; TT],
    out: *mut f32,
    rows: usize,
}

/// All rows (in tiles of `R`, the rest one by one) for tokens `t0..t0 + T`, lanes `l0..l0 + T`.
///
/// Safety: as [`gemm_a`], with `sa` filled for this tile (minimum formats) and `t0 + T <= n`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows_a<const F: u8, const R: usize, const T: usize>(c: &CtxA, t0: usize, l0: usize) {
    row_tiles::<R>(c.rows, |r, full| {
        // SAFETY: rows `r..r + R` (`full`) or row `r` exist.
        unsafe { if full { tile_a::<F, R, T>(c, r, t0, l0) } else { tile_a::<F, 1, T>(c, r, t0, l0) } }
    });
}

/// Rows `r0..r0 + R` × tokens `t0..t0 + T`, accumulators in registers.
///
/// Safety: as [`rows_a`], with `r0 + R <= rows`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_a<const F: u8, const R: usize, const T: usize>(c: &CtxA, r0: usize, t0: usize, l0: usize) {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut offv = [_mm256_setzero_ps(); R];
    let mut b = 0;
    while b + 2 <= c.ab {
        // SAFETY: blocks `b, b + 1 < ab`; the rest as this function's contract.
        unsafe { step_a::<F, R, T, true>(c, r0, t0, b, &mut acc, &mut offv) };
        b += 2;
    }
    if b < c.ab {
        // SAFETY: block `b < ab`; the rest as this function's contract.
        unsafe { step_a::<F, R, T, false>(c, r0, t0, b, &mut acc, &mut offv) };
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

/// Token `t`'s operands for blocks `b` and (when `TWO`) `b + 1`: see [`operands`].
///
/// Safety: features as [`gemm_a`]; token `t < n` and blocks `b (+ 1) < ab` of `c`'s activations.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn token_a<const F: u8, const TWO: bool>(c: &CtxA, t: usize, b: usize) -> Ops {
    // SAFETY: in bounds by the caller's contract.
    unsafe {
        let a0 = &*c.act.add(t * c.ab + b);
        operands::<F>(a0, if TWO { Some(&*c.act.add(t * c.ab + b + 1)) } else { None })
    }
}

/// One register's activation operands, two 32-element activation blocks side by side (`a0` in
/// bytes and lanes 0..8, `a1` in the upper half; zero codes when `a1` is `None`): their codes,
/// `d_a` per lane, and `−off·Σ a` over each lane's four bytes (exact: `off·|Σ a| ≤ 128·508`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn operands<const F: u8>(a0: &BlockQ8A, a1: Option<&BlockQ8A>) -> Ops {
    // SAFETY: `qs` is 32 bytes.
    let v0 = unsafe { load32(a0.qs.as_ptr().cast()) };
    let (av, da) = match a1 {
        Some(a1) => {
            // SAFETY: `qs` is 32 bytes.
            let v1 = unsafe { load32(a1.qs.as_ptr().cast()) };
            (join(v0, v1), _mm512_mask_mov_ps(_mm512_set1_ps(a0.d), 0xFF00, _mm512_set1_ps(a1.d)))
        }
        None => (_mm512_zextsi256_si512(v0), _mm512_set1_ps(a0.d)),
    };
    let base = if offset_a(F) != 0 {
        let off = _mm512_set1_epi8(offset_a(F) as i8);
        _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), off, av))
    } else {
        _mm512_setzero_si512()
    };
    (av, da, base)
}

/// Blocks `b` and (when `TWO`) `b + 1` of rows `r0..r0 + R` against tokens `t0..t0 + T`: block `b`
/// in 512-bit lanes 0..8, block `b + 1` in lanes 8..16 (zero codes when not `TWO`).
///
/// Safety: as [`tile_a`], with `b + TWO < ab`.
#[inline]
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn step_a<const F: u8, const R: usize, const T: usize, const TWO: bool>(
    c: &CtxA,
    r0: usize,
    t0: usize,
    b: usize,
    acc: &mut [[__m256; T]; R],
    offv: &mut [__m256; R],
) {
    let bsz = block_bytes_a(F);
    let nb = if TWO { 2 } else { 1 };
    prefetch_ahead(c, r0 * c.rb + b * bsz * R, R * nb * bsz);
    let mut wu = [_mm512_setzero_si512(); R];
    let mut dw = [_mm512_setzero_ps(); R];
    for r in 0..R {
        // SAFETY: in bounds: blocks `b` (and `b + 1` when `TWO`) `< ab` of row `r0 + r < rows`
        // lie inside `w`; `sa` entries `< ab` were written for this tile (minimum formats).
        unsafe {
            let p0 = c.w.add((r0 + r) * c.rb + b * bsz);
            let u0 = codes_a::<F>(p0);
            if TWO {
                let p1 = p0.add(bsz);
                wu[r] = join(u0, codes_a::<F>(p1));
                dw[r] = f16x16_pair(f16_bits(p0), f16_bits(p1));
            } else {
                wu[r] = _mm512_zextsi256_si512(u0);
                dw[r] = f16x16_pair(f16_bits(p0), 0);
            }
            if has_min_a(F) {
                // The reference's `offset += m·(d_a·Σq)`, block `b` then block `b + 1`.
                offv[r] =
                    _mm256_add_ps(offv[r], _mm256_mul_ps(f16x8_at(p0.add(2)), _mm256_loadu_ps(c.sa.add(b).cast())));
                if TWO {
                    let m1 = f16x8_at(p0.add(bsz + 2));
                    offv[r] = _mm256_add_ps(offv[r], _mm256_mul_ps(m1, _mm256_loadu_ps(c.sa.add(b + 1).cast())));
                }
            }
        }
    }
    for t in 0..T {
        // SAFETY: in bounds: token `t0 + t < n`, blocks `b` (and `b + 1`) `< ab`.
        let (av, da, base) = unsafe { token_a::<F, TWO>(c, t0 + t, b) };
        for r in 0..R {
            // Lane k (of either block) = Σ (u − off)·a = Σ w·a over its four elements, exactly.
            let l = _mm512_dpbusd_epi32(base, wu[r], av);
            // `d = d_w·d_a` per block, then `d·lane`, lane-wise.
            let p = _mm512_mul_ps(_mm512_mul_ps(dw[r], da), _mm512_cvtepi32_ps(l));
            acc[r][t] = _mm256_add_ps(acc[r][t], lo8(p));
            if TWO {
                acc[r][t] = _mm256_add_ps(acc[r][t], hi8(p));
            }
        }
    }
}

/// A tile's rows are consecutive in memory, so its blocks are one stream: prefetch the `bytes`
/// that a tile reads at offset `at` of the weights, `PREFETCH` bytes ahead (a hint; it may point
/// past `w` and never faults).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn prefetch_ahead(c: &CtxA, at: usize, bytes: usize) {
    let pf = c.w.wrapping_add(at + PREFETCH);
    for k in 0..bytes.div_ceil(64) {
        _mm_prefetch::<_MM_HINT_T0>(pf.wrapping_add(64 * k).cast());
    }
}

/// Activation operands of one register (see [`operands`]).
type Ops = (__m512i, __m512, __m512i);

/// Rows per pair tile.
const PR: usize = 4;

/// [`gemm_a`] for `n >= 2` with prepared operands: tokens go in pairs, one pair per register
/// (token `t` in lanes 0..8, `t + 1` in 8..16) against one weight block repeated in both halves.
/// Each accumulator then takes one block at a time for both tokens — the reference's block order
/// with half the adds, converts and multiplies of two blocks per register and one token — and a
/// weight block is decoded once per 8 tokens. An odd last token takes the one-token path.
///
/// Safety: as [`gemm_a`], with `ab <= PAIR_MAXB` and room for `(TT/2)·ab` entries at `prep`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn gemm_pairs<const F: u8>(c: &CtxA, prep: *mut Ops, n: usize) {
    for t0 in (0..n).step_by(TT) {
        let tt = TT.min(n - t0);
        // SAFETY (writes): entry `p·ab + b < (TT/2)·ab`; reads: tokens
        // `t0 + 2p + 1 < n`, block `b < ab`.
        unsafe {
            for p in 0..tt / 2 {
                for b in 0..c.ab {
                    let t = t0 + 2 * p;
                    let v = operands::<F>(&*c.act.add(t * c.ab + b), Some(&*c.act.add((t + 1) * c.ab + b)));
                    prep.add(p * c.ab + b).write(v);
                }
            }
        }
        // SAFETY: tokens `t0 .. t0 + tt` are `< n`.
        unsafe { fill_sa::<F>(c, t0, tt) };
        // SAFETY: the pairs' operands were written above; tokens `t0 .. t0 + tt` are `< n`.
        unsafe {
            match tt / 2 {
                4 => rows_p::<F, 4>(c, prep, t0),
                3 => rows_p::<F, 3>(c, prep, t0),
                2 => rows_p::<F, 2>(c, prep, t0),
                1 => rows_p::<F, 1>(c, prep, t0),
                _ => {}
            }
            if tt % 2 == 1 {
                rows_a::<F, 4, 1>(c, t0 + tt - 1, tt - 1);
            }
        }
    }
}

/// All rows (tiles of [`PR`], the rest one by one) for the `P` token pairs from `t0`.
///
/// Safety: as [`gemm_pairs`], with the pairs' operands at `pp` and `sa` filled for this tile.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows_p<const F: u8, const P: usize>(c: &CtxA, pp: *const Ops, t0: usize) {
    row_tiles::<PR>(c.rows, |r, full| {
        // SAFETY: rows `r..r + PR` (`full`) or row `r` exist.
        unsafe { if full { tile_p::<F, PR, P>(c, pp, r, t0) } else { tile_p::<F, 1, P>(c, pp, r, t0) } }
    });
}

/// Rows `r0..r0 + R` × token pairs `0..P` of the tile at `t0`, accumulators in registers.
///
/// Safety: as [`rows_p`], with `r0 + R <= rows`.
#[inline]
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_p<const F: u8, const R: usize, const P: usize>(c: &CtxA, pp: *const Ops, r0: usize, t0: usize) {
    let bsz = block_bytes_a(F);
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    let mut offv = [_mm256_setzero_ps(); R];
    for b in 0..c.ab {
        prefetch_ahead(c, r0 * c.rb + b * bsz * R, R * bsz);
        let mut wu = [_mm512_setzero_si512(); R];
        let mut dw = [_mm512_setzero_ps(); R];
        for r in 0..R {
            // SAFETY: in bounds: block `b < ab` of row `r0 + r < rows` lies inside `w`; `sa`
            // entries `< ab` were written for this tile (minimum formats).
            unsafe {
                let p0 = c.w.add((r0 + r) * c.rb + b * bsz);
                wu[r] = _mm512_broadcast_i64x4(codes_a::<F>(p0));
                dw[r] = _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(f16_bits(p0) as i32)));
                if has_min_a(F) {
                    offv[r] =
                        _mm256_add_ps(offv[r], _mm256_mul_ps(f16x8_at(p0.add(2)), _mm256_loadu_ps(c.sa.add(b).cast())));
                }
            }
        }
        for p in 0..P {
            // SAFETY: entry `p·ab + b` was written for this tile.
            let (av, da, base) = unsafe { *pp.add(p * c.ab + b) };
            for r in 0..R {
                // Lane k of either token = Σ (u − off)·a = Σ w·a over its four elements, exactly.
                let l = _mm512_dpbusd_epi32(base, wu[r], av);
                // `d = d_w·d_a`, then `acc += d·lane`, lane-wise for both tokens.
                let d = _mm512_mul_ps(dw[r], da);
                acc[r][p] = _mm512_add_ps(acc[r][p], _mm512_mul_ps(d, _mm512_cvtepi32_ps(l)));
            }
        }
    }
    for r in 0..R {
        let mut offs = [0f32; 8];
        // SAFETY: in bounds: `offs` is 8 floats.
        unsafe { _mm256_storeu_ps(offs.as_mut_ptr(), offv[r]) };
        for p in 0..P {
            let (t, v) = (2 * p, acc[r][p]);
            // SAFETY: in bounds: tokens `t0 + t (+ 1) < n`, so `(t0 + t + 1)·rows + r0 + r < out.len()`.
            unsafe {
                *c.out.add((t0 + t) * c.rows + r0 + r) = reduce_lanes(lo8(v)) + offs[t];
                *c.out.add((t0 + t + 1) * c.rows + r0 + r) = reduce_lanes(hi8(v)) + offs[t + 1];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// k-quants.

/// `vpermw` indices: for register `j` of a Q4_K/Q5_K super-block, word `i` takes scale `2j + i/16`
/// (the scale of sub-block `2j` in the low 256 bits, `2j + 1` in the high ones).
const K4_IDX: [[i16; 32]; 4] = {
    let mut t = [[0i16; 32]; 4];
    let mut j = 0;
    while j < 4 {
        let mut i = 0;
        while i < 32 {
            t[j][i] = (2 * j + i / 16) as i16;
            i += 1;
        }
        j += 1;
    }
    t
};

/// `vpermw` indices: for register `j` of a Q6_K super-block (chunks `2j`, `2j + 1`), word `i`
/// (half of i32 lane `i/2`) takes scale `4j + i/8`: lanes 0..4 of chunk `c` use `scales[2c]`,
/// lanes 4..8 `scales[2c + 1]`.
const Q6_IDX: [[i16; 32]; 4] = {
    let mut t = [[0i16; 32]; 4];
    let mut j = 0;
    while j < 4 {
        let mut i = 0;
        while i < 32 {
            t[j][i] = (4 * j + i / 8) as i16;
            i += 1;
        }
        j += 1;
    }
    t
};

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn idx(t: &[i16; 32]) -> __m512i {
    // SAFETY: in bounds: `t` is 64 bytes.
    unsafe { _mm512_loadu_si512(t.as_ptr().cast()) }
}

/// `out[t·rows + r] = dot_row_q8k(F, row r, token t)` for `nsb` super-blocks per row.
///
/// Safety: avx512f/bw/vl/vnni+avx2+fma+f16c present; `w.len() >= rows·nsb·block_bytes(F)`,
/// `act.len() >= n·nsb`, `out.len() >= n·rows`, `nsb <= MAXSB`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
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
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows_k<const F: u8, const T: usize>(c: &CtxK, t0: usize, l0: usize) {
    let bsz = block_bytes_k(F);
    // One unpacked super-block, register `j` = chunks `2j` (low 256 bits) and `2j + 1`: codes
    // (unsigned; |w| for Q6_K), the negative-weight masks (Q6_K) and the i16 scale of each lane.
    let mut wq = [_mm512_setzero_si512(); 4];
    let mut neg: [__mmask64; 4] = [0; 4];
    let mut sc = [_mm512_setzero_si512(); 4];
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
                let s16 = _mm512_zextsi256_si512(_mm256_cvtepi8_epi16(scales));
                let m4 = _mm512_set1_epi8(0x0F);
                let m2 = _mm512_set1_epi8(0x03);
                for h in 0..2 {
                    // ql[64h..64h+64]: chunks 4h+0/4h+1 (low nibbles), 4h+2/4h+3 (high nibbles);
                    // qh[32h..32h+32]: bits 2k..2k+2 for chunk 4h+k.
                    // SAFETY: see `p`.
                    let (ql, qh) =
                        unsafe { (load64(p.add(64 * h)), _mm512_broadcast_i64x4(load32(p.add(128 + 32 * h)))) };
                    let lo = [_mm512_and_si512(ql, m4), _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4)];
                    let hi = [
                        _mm512_and_si512(_mm512_srlv_epi64(qh, _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2)), m2),
                        _mm512_and_si512(_mm512_srlv_epi64(qh, _mm512_setr_epi64(4, 4, 4, 4, 6, 6, 6, 6)), m2),
                    ];
                    for k in 0..2 {
                        let j = 2 * h + k;
                        let q = _mm512_or_si512(lo[k], _mm512_slli_epi16::<4>(hi[k]));
                        let q = _mm512_sub_epi8(q, _mm512_set1_epi8(32));
                        wq[j] = _mm512_abs_epi8(q);
                        neg[j] = _mm512_movepi8_mask(q);
                        sc[j] = _mm512_permutexvar_epi16(idx(&Q6_IDX[j]), s16);
                    }
                }
                dvec = _mm256_mul_ps(d, dav);
            } else {
                // SAFETY: see `p`.
                let (d, dmin, scales) = unsafe { (f16x8_at(p), f16x8_at(p.add(2)), &*p.add(4).cast::<[u8; 12]>()) };
                let (scs, mns) = scale_min_k4(scales);
                let sc16 = _mm512_zextsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(scs as i64)));
                let mn16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(mns as i64)));
                let qs = if F == Q5_K { 48 } else { 16 };
                let m4 = _mm512_set1_epi8(0x0F);
                // SAFETY: see `p` (Q5_K's qh at 16..48).
                let hb = if F == Q5_K { unsafe { _mm512_broadcast_i64x4(load32(p.add(16))) } } else { m4 };
                for j in 0..4 {
                    // qs[32j..32j+32]: sub-block 2j in the low nibbles, 2j + 1 in the high ones.
                    // SAFETY: see `p`.
                    let x = unsafe { _mm512_broadcast_i64x4(load32(p.add(qs + 32 * j))) };
                    let x = _mm512_srlv_epi64(x, _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4));
                    let mut q = _mm512_and_si512(x, m4);
                    if F == Q5_K {
                        // Bit 4 of sub-block g's element i is bit g of qh[i].
                        let lo = _mm512_set1_epi8((1u8 << (2 * j)) as i8);
                        let hi = _mm512_set1_epi8((1u8 << (2 * j + 1)) as i8);
                        let sel = _mm512_mask_mov_epi8(lo, 0xFFFF_FFFF_0000_0000, hi);
                        let k = _mm512_test_epi8_mask(hb, sel);
                        q = _mm512_mask_add_epi8(q, k, q, _mm512_set1_epi8(0x10));
                    }
                    wq[j] = q;
                    sc[j] = _mm512_permutexvar_epi16(idx(&K4_IDX[j]), sc16);
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
            for t in 0..T {
                let mut isum = _mm512_setzero_si512();
                // SAFETY: in bounds: token `t0 + t < n`, super-block `s < nsb`.
                let qs = unsafe { (*c.act.add((t0 + t) * c.nsb + s)).qs.as_ptr().cast::<u8>() };
                for j in 0..4 {
                    // SAFETY: in bounds: bytes `64j..64j+64` of the 256 codes.
                    let av = unsafe { load64(qs.add(64 * j)) };
                    let pr = if F == Q6_K {
                        // |w|·(a with w's sign): `a` ∈ [−127, 127], so negating is exact.
                        let sa = _mm512_mask_sub_epi8(av, neg[j], _mm512_setzero_si512(), av);
                        _mm512_maddubs_epi16(wq[j], sa)
                    } else {
                        _mm512_maddubs_epi16(wq[j], av)
                    };
                    // Pairs of i16 (elements 4k..4k+2, 4k+2..4k+4) times the lane's scale.
                    isum = _mm512_dpwssd_epi32(isum, pr, sc[j]);
                }
                // The two chunks of each register summed as integers, as the reference does.
                let lane = _mm256_add_epi32(_mm512_castsi512_si256(isum), _mm512_extracti64x4_epi64::<1>(isum));
                let l = _mm256_cvtepi32_ps(lane);
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

    /// The kernels, saying on stderr whether AVX-512 VNNI is really exercised.
    fn have(test: &str) -> Option<Kernels> {
        let k = kernels();
        match k {
            Some(k) => eprintln!("x86_512::{test}: AVX-512 VNNI present, kernels {:?} exercised", k),
            None => eprintln!("x86_512::{test}: no AVX-512 F/BW/VL/VNNI on this CPU, NOT exercised (skipped)"),
        }
        k
    }

    #[test]
    fn attention_kernels_match_scalar_bitwise() {
        let Some(k) = have("attention_kernels_match_scalar_bitwise") else {
            return;
        };
        let mut rng = Rng(0x7A7A_0101_3C3C_5E5E);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (d, g, n, stride) in [
            (64, 3, 9, 192),
            (256, 4, 77, 256),
            (128, 5, 6, 256),
            (72, 2, 5, 75),
            (8, 1, 4, 8),
            (136, 1, 3, 136),
            (64, 3, 0, 64),
        ] {
            let ld = n + 2;
            let q: Vec<f32> = (0..g * d).map(|_| rng.unit() * 3.0).collect();
            let kc: Vec<f32> = (0..n * stride + d).map(|_| rng.unit() * 3.0).collect();
            let (mut got, mut want) = (vec![0f32; g * ld], vec![0f32; g * ld]);
            (k.dot_keys)(&q, d, &kc, stride, n, &mut got, ld);
            crate::simd::scalar::dot_keys(&q, d, &kc, stride, n, &mut want, ld);
            assert_eq!(bits(&got), bits(&want), "dot_keys d={d} g={g} n={n}");
            let e: Vec<f32> = (0..g * ld).map(|_| rng.unit()).collect();
            let y0: Vec<f32> = (0..g * d).map(|_| rng.unit() * 3.0).collect();
            let (mut got, mut want) = (y0.clone(), y0.clone());
            (k.axpy_keys)(&mut got, d, &e, ld, n, &kc, stride);
            crate::simd::scalar::axpy_keys(&mut want, d, &e, ld, n, &kc, stride);
            assert_eq!(bits(&got), bits(&want), "axpy_keys d={d} g={g} n={n}");
        }
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
        let Some(k) = have("gemm_is_bit_exact") else { return };
        assert_eq!(k.name, "avx512vnni");
        let mut rng = Rng(0x5EED_0512);
        for fmt in Format::ALL {
            let Some(layout) = fmt.act_layout() else { continue };
            let blocks: &[usize] = match layout {
                q::ActLayout::Q8A => &[1, 2, 3, 20],
                q::ActLayout::Q8K => &[1, 2, 3, 8],
            };
            for &nb in blocks {
                let cols = nb * fmt.block_elems();
                for rows in [1, 2, 3, 5, 17] {
                    for n in [1, 2, 3, 4, 5, 6, 7, 8, 9, 17] {
                        check(&k, fmt, rows, n, cols, &mut rng);
                    }
                }
            }
        }
    }

    /// The token-pair path over many tiles and wide rows: an odd last token, leftover rows.
    #[test]
    fn gemm_pair_tiles_are_bit_exact() {
        let Some(k) = have("gemm_pair_tiles_are_bit_exact") else { return };
        let mut rng = Rng(0x5EED_0513);
        for fmt in Format::ALL {
            if fmt.act_layout() != Some(q::ActLayout::Q8A) {
                continue;
            }
            for (nb, n) in [(40, 53), (100, 17), (128, 9), (20, 64), (7, 150)] {
                for rows in [9, 18] {
                    check(&k, fmt, rows, n, nb * fmt.block_elems(), &mut rng);
                }
            }
        }
    }

    /// Extreme codes: every weight at its most negative / most positive code, activations at ±127,
    /// so the offset trick's and `pmaddubsw`'s ranges are hit at their ends.
    #[test]
    fn gemm_extreme_codes_are_bit_exact() {
        let Some(k) = have("gemm_extreme_codes_are_bit_exact") else { return };
        for fmt in Format::ALL {
            let Some(layout) = fmt.act_layout() else { continue };
            let nb = if layout == q::ActLayout::Q8A { 5 } else { 2 };
            let cols = nb * fmt.block_elems();
            let rb = fmt.bytes_for(cols).unwrap();
            for fill in [0x00u8, 0xFF, 0x80, 0x7F, 0x88] {
                let rows = 9; // ≥ 8: the token-pair path, with a one-row tail
                let mut w = vec![fill; rb * rows];
                for c in w.chunks_exact_mut(fmt.block_bytes()) {
                    match fmt {
                        Format::Q6_K => c[208..210].copy_from_slice(&f16(0.5)),
                        Format::Q4_K | Format::Q5_K => c[0..2].copy_from_slice(&f16(0.25)),
                        _ => c[0..2].copy_from_slice(&f16(0.75)),
                    }
                }
                let mut got = vec![f32::NAN; 2 * rows];
                for sign in [1f32, -1.0] {
                    let x: Vec<f32> =
                        (0..2 * cols).map(|i| if i % 3 == 0 { sign } else { -sign * (i % 2) as f32 }).collect();
                    match layout {
                        q::ActLayout::Q8A => {
                            let mut a = vec![BlockQ8A::default(); 2 * nb];
                            for (x, a) in x.chunks_exact(cols).zip(a.chunks_exact_mut(nb)) {
                                q::quantize_q8a(x, a);
                            }
                            (k.gemm_q8a)(fmt, &w, rows, cols, &a, 2, &mut got);
                            for t in 0..2 {
                                for r in 0..rows {
                                    let want = q::dot_row_q8a(fmt, &w[r * rb..][..rb], &a[t * nb..][..nb]);
                                    assert_eq!(got[t * rows + r].to_bits(), want.to_bits(), "{fmt:?} {fill:#x}");
                                }
                            }
                        }
                        q::ActLayout::Q8K => {
                            let mut a = vec![BlockQ8K::default(); 2 * nb];
                            for (x, a) in x.chunks_exact(cols).zip(a.chunks_exact_mut(nb)) {
                                q::quantize_q8k(x, a);
                            }
                            (k.gemm_q8k)(fmt, &w, rows, cols, &a, 2, &mut got);
                            for t in 0..2 {
                                for r in 0..rows {
                                    let want = q::dot_row_q8k(fmt, &w[r * rb..][..rb], &a[t * nb..][..nb]);
                                    assert_eq!(got[t * rows + r].to_bits(), want.to_bits(), "{fmt:?} {fill:#x}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

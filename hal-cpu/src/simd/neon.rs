//! NEON twins (aarch64) of every [`Kernels`] function, bit-exact with `purehw_kernels::quant`.
//!
//! `unsafe` is allowed in this module because the NEON intrinsics are `#[target_feature]`
//! functions (NEON itself is enabled at compile time for this module: see its `cfg` in `mod.rs`),
//! the loads and stores take raw pointers (each from a fixed-size array, so in bounds), and the
//! `dotprod` code (the `sdot` instruction, as inline assembly because `vdotq_s32` is not stable)
//! may only run once [`kernels`] has detected that feature. Every `unsafe` block says why it is
//! sound.
//!
//! How the references map onto NEON:
//!
//! * Integer lanes: lane `k` of a 32-element chunk (elements `4k..4k+4`) is lane `k % 4` of
//!   `sdot(w[0..16], a[0..16])` (`k < 4`) or `sdot(w[16..32], a[16..32])`; without `dotprod` the
//!   same sums come from `smull` + `saddlp` + `addp`. Both are exact in `i32`. The two halves of the
//!   8 reference lanes live in two `float32x4_t` accumulators.
//! * Floats: `d = d_w·d_a` in scalar, then `acc = acc + d·lane` as `fmul` then `fadd` (never
//!   `fmla`), the offset / minimum term in one scalar accumulator in block order, and the
//!   reference's lane reduction `((l0+l4)+(l2+l6))+((l1+l5)+(l3+l7))`.
//! * Quantization: `amax` with `fmaxnm` (ignores NaN as `f32::max` does), `(d, id)` from
//!   `act_scale` in scalar, codes by `fcvtns` (round to nearest, ties to even; NaN gives 0) of
//!   `x·id`, clamped to ±127 in integers.
//! * Float GEMM: each block is dequantized to f32 vectors in element order with the reference's
//!   operations (e.g. `d·q + m`, `(d·sc)·q − dmin·m`), f16 widened exactly; lane = element % 8.
//!   (Stored bytes are read as little-endian lanes, as on every aarch64 Linux/macOS target.)
//!
//! The GEMMs take tokens in tiles of up to [`TT`]: each weight block is decoded once per tile
//! and dotted with every token of the tile.
#![allow(unsafe_code)]

use core::arch::aarch64::*;
use core::arch::asm;

use half::f16;
use purehw_kernels::Format;
use purehw_kernels::quant::{BlockQ8A, BlockQ8K, LANES, act_scale, reduce_lanes};

use super::Kernels;

/// The NEON kernels (NEON is mandatory on aarch64, so always `Some`); the integer GEMMs use
/// `sdot` when the CPU has `dotprod`.
pub(super) fn kernels() -> Option<Kernels> {
    let sdot = std::arch::is_aarch64_feature_detected!("dotprod");
    Some(Kernels {
        name: "neon",
        quantize_q8a,
        quantize_q8k,
        gemm_q8a: if sdot { gemm_q8a_sdot } else { gemm_q8a_mull },
        gemm_q8k: if sdot { gemm_q8k_sdot } else { gemm_q8k_mull },
        gemm_f32,
        dot_f32,
        dot_keys: |q, d, k, stride, n, out, ld| {
            for (h, qh) in q.chunks_exact(d.max(1)).enumerate() {
                for j in 0..n {
                    out[h * ld + j] = dot_f32(qh, &k[j * stride..j * stride + d]);
                }
            }
        },
        axpy_keys: |y, d, e, ld, n, v, stride| {
            for (h, yh) in y.chunks_exact_mut(d.max(1)).enumerate() {
                for j in 0..n {
                    axpy(yh, e[h * ld + j], &v[j * stride..j * stride + d]);
                }
            }
        },
        // No NEON twins yet: the reference functions.
        dequant_int: purehw_kernels::quant::dequantize_int_row,
        dot_int: super::scalar::dot_int,
        gelu_mul: super::scalar::gelu_mul,
        silu_mul: super::scalar::silu_mul,
        exp_sub: super::scalar::exp_sub,
        widen_f16: super::scalar::widen_f16,
        head_est_q8_0: None,
    })
}

/// Tokens per tile: one decoded weight block is reused this many times.
const TT: usize = 4;

// ---------------------------------------------------------------------------------------------
// Safe entry points (the `Kernels` fn pointers).

fn quantize_q8a(x: &[f32], out: &mut [BlockQ8A]) {
    // SAFETY: NEON is enabled at compile time for this module.
    unsafe { quantize_q8a_neon(x, out) }
}

fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    // SAFETY: NEON is enabled at compile time for this module.
    unsafe { quantize_q8k_neon(x, out) }
}

fn gemm_q8a_mull(fmt: Format, w: &[u8], rows: usize, cols: usize, act: &[BlockQ8A], n: usize, out: &mut [f32]) {
    gemm_q8a_with::<false>(fmt, w, rows, cols, act, n, out)
}

/// Only handed out by [`kernels`] when the CPU has `dotprod`.
fn gemm_q8a_sdot(fmt: Format, w: &[u8], rows: usize, cols: usize, act: &[BlockQ8A], n: usize, out: &mut [f32]) {
    gemm_q8a_with::<true>(fmt, w, rows, cols, act, n, out)
}

fn gemm_q8k_mull(fmt: Format, w: &[u8], rows: usize, cols: usize, act: &[BlockQ8K], n: usize, out: &mut [f32]) {
    gemm_q8k_with::<false>(fmt, w, rows, cols, act, n, out)
}

/// Only handed out by [`kernels`] when the CPU has `dotprod`.
fn gemm_q8k_sdot(fmt: Format, w: &[u8], rows: usize, cols: usize, act: &[BlockQ8K], n: usize, out: &mut [f32]) {
    gemm_q8k_with::<true>(fmt, w, rows, cols, act, n, out)
}

/// Whether the operands hold `rows` rows of `rb` bytes, `n` tokens of `per_token` activation items
/// and `n·rows` outputs. When they do not, the scalar path runs (and panics as it always has).
fn fits(w: usize, rows: usize, rb: usize, act: usize, n: usize, per_token: usize, out: usize) -> bool {
    rows.checked_mul(rb).is_some_and(|b| b <= w)
        && n.checked_mul(per_token).is_some_and(|a| a <= act)
        && n.checked_mul(rows).is_some_and(|o| o <= out)
}

/// `SDOT` only from [`gemm_q8a_sdot`], i.e. with `dotprod` detected.
fn gemm_q8a_with<const SDOT: bool>(
    fmt: Format,
    w: &[u8],
    rows: usize,
    cols: usize,
    act: &[BlockQ8A],
    n: usize,
    out: &mut [f32],
) {
    let ab = cols / 32;
    let Some(rb) = fmt.bytes_for(cols) else {
        return super::scalar::gemm_q8a(fmt, w, rows, cols, act, n, out);
    };
    if !fits(w.len(), rows, rb, act.len(), n, ab, out.len()) {
        return super::scalar::gemm_q8a(fmt, w, rows, cols, act, n, out);
    }
    // SAFETY: `SDOT` is true only when `kernels()` detected `dotprod`.
    unsafe {
        match fmt {
            Format::Q4_0 => gemm_a_any::<Q4_0, SDOT>(w, rows, ab, act, n, out),
            Format::Q4_1 => gemm_a_any::<Q4_1, SDOT>(w, rows, ab, act, n, out),
            Format::Q5_0 => gemm_a_any::<Q5_0, SDOT>(w, rows, ab, act, n, out),
            Format::Q5_1 => gemm_a_any::<Q5_1, SDOT>(w, rows, ab, act, n, out),
            Format::Q8_0 => gemm_a_any::<Q8_0, SDOT>(w, rows, ab, act, n, out),
            _ => super::scalar::gemm_q8a(fmt, w, rows, cols, act, n, out),
        }
    }
}

/// `SDOT` only from [`gemm_q8k_sdot`], i.e. with `dotprod` detected.
fn gemm_q8k_with<const SDOT: bool>(
    fmt: Format,
    w: &[u8],
    rows: usize,
    cols: usize,
    act: &[BlockQ8K],
    n: usize,
    out: &mut [f32],
) {
    let nsb = cols / 256;
    let Some(rb) = fmt.bytes_for(cols) else {
        return super::scalar::gemm_q8k(fmt, w, rows, cols, act, n, out);
    };
    if !fits(w.len(), rows, rb, act.len(), n, nsb, out.len()) {
        return super::scalar::gemm_q8k(fmt, w, rows, cols, act, n, out);
    }
    // SAFETY: `SDOT` is true only when `kernels()` detected `dotprod`.
    unsafe {
        match fmt {
            Format::Q4_K => gemm_k_any::<Q4_K, SDOT>(w, rows, nsb, act, n, out),
            Format::Q5_K => gemm_k_any::<Q5_K, SDOT>(w, rows, nsb, act, n, out),
            Format::Q6_K => gemm_k_any::<Q6_K, SDOT>(w, rows, nsb, act, n, out),
            _ => super::scalar::gemm_q8k(fmt, w, rows, cols, act, n, out),
        }
    }
}

/// [`mull::gemm_a`] or, with `SDOT`, [`dotprod::gemm_a`].
///
/// # Safety
/// With `SDOT`, the CPU must have `dotprod`.
#[inline]
unsafe fn gemm_a_any<const F: u8, const SDOT: bool>(
    w: &[u8],
    rows: usize,
    ab: usize,
    act: &[BlockQ8A],
    n: usize,
    out: &mut [f32],
) {
    if SDOT {
        // SAFETY: the caller guarantees `dotprod`; NEON is enabled at compile time. All slice
        // accesses inside are bounds-checked.
        unsafe { dotprod::gemm_a::<F>(w, rows, ab, act, n, out) }
    } else {
        // SAFETY: NEON is enabled at compile time; all slice accesses inside are bounds-checked.
        unsafe { mull::gemm_a::<F>(w, rows, ab, act, n, out) }
    }
}

/// [`mull::gemm_k`] or, with `SDOT`, [`dotprod::gemm_k`].
///
/// # Safety
/// With `SDOT`, the CPU must have `dotprod`.
#[inline]
unsafe fn gemm_k_any<const F: u8, const SDOT: bool>(
    w: &[u8],
    rows: usize,
    nsb: usize,
    act: &[BlockQ8K],
    n: usize,
    out: &mut [f32],
) {
    if SDOT {
        // SAFETY: the caller guarantees `dotprod`; NEON is enabled at compile time. All slice
        // accesses inside are bounds-checked.
        unsafe { dotprod::gemm_k::<F>(w, rows, nsb, act, n, out) }
    } else {
        // SAFETY: NEON is enabled at compile time; all slice accesses inside are bounds-checked.
        unsafe { mull::gemm_k::<F>(w, rows, nsb, act, n, out) }
    }
}

/// `out[t·rows + r] = dot_row(fmt, row r, x[t·cols..][..cols])`, bit-exact.
fn gemm_f32(fmt: Format, w: &[u8], rows: usize, cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
    let Some(rb) = fmt.bytes_for(cols) else {
        return super::scalar::gemm_f32(fmt, w, rows, cols, x, n, out);
    };
    if !fits(w.len(), rows, rb, x.len(), n, cols, out.len()) {
        return super::scalar::gemm_f32(fmt, w, rows, cols, x, n, out);
    }
    // SAFETY: NEON is enabled at compile time; all slice accesses inside are bounds-checked.
    unsafe {
        match fmt {
            Format::F32 => gemm_f::<F32>(w, rows, rb, cols, x, n, out),
            Format::F16 => gemm_f::<F16>(w, rows, rb, cols, x, n, out),
            Format::BF16 => gemm_f::<BF16>(w, rows, rb, cols, x, n, out),
            Format::Q4_0 => gemm_f::<Q4_0>(w, rows, rb, cols, x, n, out),
            Format::Q4_1 => gemm_f::<Q4_1>(w, rows, rb, cols, x, n, out),
            Format::Q5_0 => gemm_f::<Q5_0>(w, rows, rb, cols, x, n, out),
            Format::Q5_1 => gemm_f::<Q5_1>(w, rows, rb, cols, x, n, out),
            Format::Q8_0 => gemm_f::<Q8_0>(w, rows, rb, cols, x, n, out),
            Format::Q4_K => gemm_f::<Q4_K>(w, rows, rb, cols, x, n, out),
            Format::Q5_K => gemm_f::<Q5_K>(w, rows, rb, cols, x, n, out),
            Format::Q6_K => gemm_f::<Q6_K>(w, rows, rb, cols, x, n, out),
            _ => super::scalar::gemm_f32(fmt, w, rows, cols, x, n, out),
        }
    }
}

/// `purehw_kernels::quant::dot_f32`, bit for bit (the shorter length counts).
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: NEON is enabled at compile time for this module.
    unsafe { dot_f32_neon(a, b) }
}

/// `y[i] += a · x[i]` (a product, then a sum), over the shorter of the two.
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    // SAFETY: NEON is enabled at compile time for this module.
    unsafe { axpy_neon(y, a, x) }
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

#[inline]
fn f16at(b: &[u8], o: usize) -> f32 {
    f16::from_le_bytes([b[o], b[o + 1]]).to_f32()
}

/// `b[o..o + N]` as an array (the offsets are constants, so the checks fold away).
#[inline]
fn at<const N: usize>(b: &[u8], o: usize) -> &[u8; N] {
    b[o..o + N].try_into().expect("inside the block")
}

#[inline]
#[target_feature(enable = "neon")]
fn ld_u8(p: &[u8; 16]) -> uint8x16_t {
    // SAFETY: `p` is 16 readable bytes; `ld1` has no alignment requirement.
    unsafe { vld1q_u8(p.as_ptr()) }
}

#[inline]
#[target_feature(enable = "neon")]
fn ld_s8x2(p: &[i8; 32]) -> [int8x16_t; 2] {
    // SAFETY: `p` is 32 readable bytes.
    unsafe { [vld1q_s8(p.as_ptr()), vld1q_s8(p.as_ptr().add(16))] }
}

#[inline]
#[target_feature(enable = "neon")]
fn ld_f32(p: &[f32; 4]) -> float32x4_t {
    // SAFETY: `p` is 4 readable floats.
    unsafe { vld1q_f32(p.as_ptr()) }
}

#[inline]
#[target_feature(enable = "neon")]
fn st_f32(p: &mut [f32; 4], v: float32x4_t) {
    // SAFETY: `p` is 4 writable floats.
    unsafe { vst1q_f32(p.as_mut_ptr(), v) }
}

/// 32 floats as 8 vectors in element order.
#[inline(always)]
fn ld_f32x8(p: &[f32; 32]) -> [float32x4_t; 8] {
    let p = p.as_ptr();
    // SAFETY: `p` points to 32 readable floats (the last load reads floats 28..32); NEON is
    // enabled at compile time.
    unsafe {
        [
            vld1q_f32(p),
            vld1q_f32(p.add(4)),
            vld1q_f32(p.add(8)),
            vld1q_f32(p.add(12)),
            vld1q_f32(p.add(16)),
            vld1q_f32(p.add(20)),
            vld1q_f32(p.add(24)),
            vld1q_f32(p.add(28)),
        ]
    }
}

/// `purehw_kernels::quant::reduce_lanes` of the lanes `acc[0] ++ acc[1]`.
#[inline]
#[target_feature(enable = "neon")]
fn reduce(acc: [float32x4_t; 2]) -> f32 {
    let s = vaddq_f32(acc[0], acc[1]); // l0+l4, l1+l5, l2+l6, l3+l7
    let t = vadd_f32(vget_low_f32(s), vget_high_f32(s)); // (l0+l4)+(l2+l6), (l1+l5)+(l3+l7)
    vget_lane_f32::<0>(t) + vget_lane_f32::<1>(t)
}

/// The 8 lanes as an array, for scalar tails.
#[inline]
#[target_feature(enable = "neon")]
fn lanes_of(acc: [float32x4_t; 2]) -> [f32; LANES] {
    let mut l = [0f32; LANES];
    let (c, _) = l.as_chunks_mut::<4>();
    st_f32(&mut c[0], acc[0]);
    st_f32(&mut c[1], acc[1]);
    l
}

/// `acc[k] = acc[k] + d·lane[k]` (a product, then a sum).
#[inline]
#[target_feature(enable = "neon")]
fn add_lanes(acc: &mut [float32x4_t; 2], d: f32, lane: [int32x4_t; 2]) {
    let d = vdupq_n_f32(d);
    acc[0] = vaddq_f32(acc[0], vmulq_f32(d, vcvtq_f32_s32(lane[0])));
    acc[1] = vaddq_f32(acc[1], vmulq_f32(d, vcvtq_f32_s32(lane[1])));
}

/// 16 signed bytes widened exactly to 4 float vectors (element order).
#[inline]
#[target_feature(enable = "neon")]
fn widen(q: int8x16_t) -> [float32x4_t; 4] {
    let lo = vmovl_s8(vget_low_s8(q));
    let hi = vmovl_high_s8(q);
    [
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))),
        vcvtq_f32_s32(vmovl_high_s16(lo)),
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))),
        vcvtq_f32_s32(vmovl_high_s16(hi)),
    ]
}

/// Four f16 (the low 16 bits of each lane) widened exactly, as `half` does: normal numbers by
/// rebiasing, subnormals as `m·2⁻²⁴`, infinities kept and NaNs quieted with their payload.
#[inline]
#[target_feature(enable = "neon")]
fn f16x4(h: uint32x4_t) -> float32x4_t {
    let sign = vshlq_n_u32::<16>(vandq_u32(h, vdupq_n_u32(0x8000)));
    let em = vandq_u32(h, vdupq_n_u32(0x7FFF));
    let e = vshrq_n_u32::<10>(em);
    let m = vandq_u32(h, vdupq_n_u32(0x3FF));
    let normal = vaddq_u32(vshlq_n_u32::<13>(em), vdupq_n_u32(112 << 23));
    let quiet = vandq_u32(vtstq_u32(m, m), vdupq_n_u32(0x0040_0000));
    let special = vorrq_u32(vaddq_u32(vshlq_n_u32::<13>(em), vdupq_n_u32(224 << 23)), quiet);
    let sub = vreinterpretq_u32_f32(vmulq_f32(vcvtq_f32_u32(m), vdupq_n_f32(1.0 / 16_777_216.0)));
    let r = vbslq_u32(vceqq_u32(e, vdupq_n_u32(0)), sub, vbslq_u32(vceqq_u32(e, vdupq_n_u32(31)), special, normal));
    vreinterpretq_f32_u32(vorrq_u32(r, sign))
}

// ---------------------------------------------------------------------------------------------
// Quantization.

/// `act_code` on 16 values (4 vectors): `round_ties_even(x·id)` clamped to ±127, NaN → 0.
#[inline]
#[target_feature(enable = "neon")]
fn codes16(x: &[float32x4_t], id: float32x4_t) -> int8x16_t {
    let (lo, hi) = (vdupq_n_s32(-127), vdupq_n_s32(127));
    let mut q = [vdupq_n_s32(0); 4];
    for (q, &x) in q.iter_mut().zip(x) {
        *q = vmaxq_s32(vminq_s32(vcvtnq_s32_f32(vmulq_f32(x, id)), hi), lo);
    }
    let a = vcombine_s16(vmovn_s32(q[0]), vmovn_s32(q[1]));
    let b = vcombine_s16(vmovn_s32(q[2]), vmovn_s32(q[3]));
    vcombine_s8(vmovn_s16(a), vmovn_s16(b))
}

#[inline]
#[target_feature(enable = "neon")]
fn st_s8(p: &mut [i8; 16], v: int8x16_t) {
    // SAFETY: `p` is 16 writable bytes.
    unsafe { vst1q_s8(p.as_mut_ptr(), v) }
}

#[target_feature(enable = "neon")]
fn quantize_q8a_neon(x: &[f32], out: &mut [BlockQ8A]) {
    let (xs, _) = x.as_chunks::<32>();
    for (b, xs) in out.iter_mut().zip(xs) {
        let v = ld_f32x8(xs);
        let mut m = vdupq_n_f32(0.0);
        for &v in &v {
            m = vmaxnmq_f32(m, vabsq_f32(v));
        }
        let (d, id) = act_scale(vmaxnmvq_f32(m));
        let id = vdupq_n_f32(id);
        let q0 = codes16(&v[..4], id);
        let q1 = codes16(&v[4..], id);
        let (qs, _) = b.qs.as_chunks_mut::<16>();
        st_s8(&mut qs[0], q0);
        st_s8(&mut qs[1], q1);
        b.d = d;
        b.sum = vaddlvq_s8(q0) as i32 + vaddlvq_s8(q1) as i32;
    }
}

#[target_feature(enable = "neon")]
fn quantize_q8k_neon(x: &[f32], out: &mut [BlockQ8K]) {
    let (xs, _) = x.as_chunks::<256>();
    for (b, xs) in out.iter_mut().zip(xs) {
        let (c32, _) = xs.as_chunks::<32>();
        let mut m = vdupq_n_f32(0.0);
        for c in c32 {
            for v in ld_f32x8(c) {
                m = vmaxnmq_f32(m, vabsq_f32(v));
            }
        }
        let (d, id) = act_scale(vmaxnmvq_f32(m));
        let id = vdupq_n_f32(id);
        b.d = d;
        let (qs, _) = b.qs.as_chunks_mut::<16>();
        for (c, xc) in c32.iter().enumerate() {
            let v = ld_f32x8(xc);
            for h in 0..2 {
                let q = codes16(&v[4 * h..4 * h + 4], id);
                st_s8(&mut qs[2 * c + h], q);
                b.bsums[2 * c + h] = vaddlvq_s8(q);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Format tags and block decoding.

const F32: u8 = 0;
const F16: u8 = 1;
const BF16: u8 = 2;
const Q4_0: u8 = 3;
const Q4_1: u8 = 4;
const Q5_0: u8 = 5;
const Q5_1: u8 = 6;
const Q8_0: u8 = 7;
const Q4_K: u8 = 8;
const Q5_K: u8 = 9;
const Q6_K: u8 = 10;

/// Bytes per block (ggml's `block_*` sizes).
const fn block_bytes(f: u8) -> usize {
    match f {
        F32 => 4,
        F16 | BF16 => 2,
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        Q5_1 => 24,
        Q8_0 => 34,
        Q4_K => 144,
        Q5_K => 176,
        _ => 210,
    }
}

/// Legacy formats with a minimum (`d·q + m`).
const fn has_min(f: u8) -> bool {
    matches!(f, Q4_1 | Q5_1)
}

/// 16 bytes, `0x10` where bit `i` of the little-endian `qh` is set (byte `i` ↔ bit `i`).
#[inline]
#[target_feature(enable = "neon")]
fn high_bits(qh: [u8; 2]) -> uint8x16_t {
    let v = vcombine_u8(vdup_n_u8(qh[0]), vdup_n_u8(qh[1]));
    let bit = vreinterpretq_u8_u64(vdupq_n_u64(0x8040_2010_0804_0201));
    vandq_u8(vtstq_u8(v, bit), vdupq_n_u8(0x10))
}

/// A 32-element block `b` (exactly `block_bytes(F)` bytes): codes of elements 0..16 and 16..32
/// (offset removed for the symmetric formats, unsigned for the minimum ones), `d`, `m` (0 for the
/// symmetric formats).
#[inline(always)]
fn decode_a<const F: u8>(b: &[u8]) -> ([int8x16_t; 2], f32, f32) {
    // SAFETY: NEON is enabled at compile time for this module (`#[inline(always)]`, which excludes
    // `#[target_feature]`, keeps this helper inside its callers' loops); loads go through the
    // checked array helpers.
    unsafe {
        let s8 = vreinterpretq_s8_u8;
        let nib = |q: uint8x16_t| (vandq_u8(q, vdupq_n_u8(0x0F)), vshrq_n_u8::<4>(q));
        let d = f16at(b, 0);
        match F {
            Q4_0 => {
                let (lo, hi) = nib(ld_u8(at(b, 2)));
                let o = vdupq_n_s8(8);
                ([vsubq_s8(s8(lo), o), vsubq_s8(s8(hi), o)], d, 0.0)
            }
            Q4_1 => {
                let (lo, hi) = nib(ld_u8(at(b, 4)));
                ([s8(lo), s8(hi)], d, f16at(b, 2))
            }
            Q5_0 => {
                let qh = at::<4>(b, 2);
                let (lo, hi) = nib(ld_u8(at(b, 6)));
                let (lo, hi) = (vorrq_u8(lo, high_bits([qh[0], qh[1]])), vorrq_u8(hi, high_bits([qh[2], qh[3]])));
                let o = vdupq_n_s8(16);
                ([vsubq_s8(s8(lo), o), vsubq_s8(s8(hi), o)], d, 0.0)
            }
            Q5_1 => {
                let qh = at::<4>(b, 4);
                let (lo, hi) = nib(ld_u8(at(b, 8)));
                let (lo, hi) = (vorrq_u8(lo, high_bits([qh[0], qh[1]])), vorrq_u8(hi, high_bits([qh[2], qh[3]])));
                ([s8(lo), s8(hi)], d, f16at(b, 2))
            }
            _ => ([s8(ld_u8(at(b, 2))), s8(ld_u8(at(b, 18)))], d, 0.0),
        }
    }
}

/// The 32 floats of a legacy block, in element order, with the reference's operations.
#[inline(always)]
fn dequantize_a<const F: u8>(b: &[u8]) -> [float32x4_t; 8] {
    // SAFETY: NEON is enabled at compile time for this module (`#[inline(always)]`, which excludes
    // `#[target_feature]`, keeps this helper inside its callers' loops); loads go through the
    // checked array helpers.
    unsafe {
        let (q, d, m) = decode_a::<F>(b);
        let (dv, mv) = (vdupq_n_f32(d), vdupq_n_f32(m));
        let mut w = [vdupq_n_f32(0.0); 8];
        for h in 0..2 {
            for (k, f) in widen(q[h]).into_iter().enumerate() {
                // `d·q + m` (Q4_1, Q5_1), `d·(q − o)` (Q4_0, Q5_0), `q·d` (Q8_0).
                w[4 * h + k] = if has_min(F) { vaddq_f32(vmulq_f32(dv, f), mv) } else { vmulq_f32(dv, f) };
            }
        }
        w
    }
}

/// The 8 (scale, min) pairs of a Q4_K/Q5_K super-block (`scale_min_k4` of the reference).
#[inline]
fn scale_min_k4(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// A decoded k-quant super-block.
struct KBlock {
    /// Codes of elements `16j..16j+16` (Q4_K 0..16, Q5_K 0..32, Q6_K −32..32).
    q: [int8x16_t; 16],
    /// Integer scale of elements `16j..16j+16`.
    sc: [i32; 16],
    /// Q4_K/Q5_K: the 6-bit minimum of sub-block `g` (32 elements).
    mn: [u8; 8],
    d: f32,
    dmin: f32,
}

/// A k-quant super-block `b` (exactly `block_bytes(F)` bytes), layouts of `BlockQ4K`, `BlockQ5K`,
/// `BlockQ6K`.
#[inline(always)]
fn decode_k<const F: u8>(b: &[u8]) -> KBlock {
    // SAFETY: NEON is enabled at compile time for this module (`#[inline(always)]`, which excludes
    // `#[target_feature]`, keeps this helper inside its callers' loops); loads go through the
    // checked array helpers.
    unsafe {
        let s8 = vreinterpretq_s8_u8;
        let mut q = [vdupq_n_s8(0); 16];
        let mut sc = [0i32; 16];
        let m4 = vdupq_n_u8(0x0F);
        if F == Q6_K {
            let ql = at::<128>(b, 0);
            let qh = at::<64>(b, 128);
            let m2 = vdupq_n_u8(0x30);
            let o = vdupq_n_s8(32);
            for h in 0..2 {
                let (l, _) = ql[64 * h..64 * h + 64].as_chunks::<16>();
                let (hh, _) = qh[32 * h..32 * h + 32].as_chunks::<16>();
                let l = [ld_u8(&l[0]), ld_u8(&l[1]), ld_u8(&l[2]), ld_u8(&l[3])];
                let hb = [ld_u8(&hh[0]), ld_u8(&hh[1])];
                for k in 0..2 {
                    // Elements 128h + 16k + (0, 32, 64, 96) ..: bits 0-1, 2-3, 4-5, 6-7 of `qh` on top.
                    let v = [
                        vorrq_u8(vandq_u8(l[k], m4), vandq_u8(vshlq_n_u8::<4>(hb[k]), m2)),
                        vorrq_u8(vandq_u8(l[k + 2], m4), vandq_u8(vshlq_n_u8::<2>(hb[k]), m2)),
                        vorrq_u8(vshrq_n_u8::<4>(l[k]), vandq_u8(hb[k], m2)),
                        vorrq_u8(vshrq_n_u8::<4>(l[k + 2]), vandq_u8(vshrq_n_u8::<2>(hb[k]), m2)),
                    ];
                    for (s, v) in v.into_iter().enumerate() {
                        q[8 * h + 2 * s + k] = vsubq_s8(s8(v), o);
                    }
                }
            }
            for (j, s) in sc.iter_mut().enumerate() {
                *s = b[192 + j] as i8 as i32;
            }
            return KBlock { q, sc, mn: [0; 8], d: f16at(b, 208), dmin: 0.0 };
        }
        let (scs, mn) = scale_min_k4(at(b, 4));
        for (j, s) in sc.iter_mut().enumerate() {
            *s = scs[j / 2] as i32;
        }
        let qs_at = if F == Q5_K { 48 } else { 16 };
        for c in 0..4 {
            let v = [ld_u8(at(b, qs_at + 32 * c)), ld_u8(at(b, qs_at + 32 * c + 16))];
            for k in 0..2 {
                q[4 * c + k] = s8(vandq_u8(v[k], m4)); // sub-block 2c
                q[4 * c + 2 + k] = s8(vshrq_n_u8::<4>(v[k])); // sub-block 2c + 1
            }
        }
        if F == Q5_K {
            let qh = [ld_u8(at(b, 16)), ld_u8(at(b, 32))];
            let top = vdupq_n_u8(0x10);
            for g in 0..8 {
                let bit = vdupq_n_u8(1 << g);
                for k in 0..2 {
                    let hi = vandq_u8(vtstq_u8(qh[k], bit), top);
                    q[2 * g + k] = vorrq_s8(q[2 * g + k], s8(hi));
                }
            }
        }
        KBlock { q, sc, mn, d: f16at(b, 0), dmin: f16at(b, 2) }
    }
}

/// The 32 floats of sub-block `g` of a decoded k-quant block: `(d·sc)·q − dmin·m` (Q4_K, Q5_K),
/// `(d·sc)·q` (Q6_K), each product rounded as the reference does.
#[inline(always)]
fn dequantize_k<const F: u8>(kb: &KBlock, g: usize) -> [float32x4_t; 8] {
    // SAFETY: NEON is enabled at compile time for this module (`#[inline(always)]`, which excludes
    // `#[target_feature]`, keeps this helper inside its callers' loops); loads go through the
    // checked array helpers.
    unsafe {
        let mut w = [vdupq_n_f32(0.0); 8];
        for h in 0..2 {
            let j = 2 * g + h;
            let dl = vdupq_n_f32(kb.d * kb.sc[j] as f32);
            let ml = vdupq_n_f32(kb.dmin * kb.mn[g] as f32);
            for (k, f) in widen(kb.q[j]).into_iter().enumerate() {
                let p = vmulq_f32(dl, f);
                w[4 * h + k] = if F == Q6_K { p } else { vsubq_f32(p, ml) };
            }
        }
        w
    }
}

/// `Σ_g m[g] · Σ a_q` over sub-block `g`: the k-quant minimum term, exactly.
#[inline]
fn min_sum(mn: &[u8; 8], bsums: &[i16; 16]) -> i32 {
    (0..8).map(|g| mn[g] as i32 * (bsums[2 * g] as i32 + bsums[2 * g + 1] as i32)).sum()
}

// ---------------------------------------------------------------------------------------------
// Integer GEMMs.

/// Runs `tile::<T>(t0)` over `0..n` in tiles of 4, then 2, then 1 tokens.
macro_rules! tiles {
    ($n:expr, |$t0:ident, $T:ident| $body:expr) => {{
        let mut $t0 = 0;
        while $t0 < $n {
            let left = $n - $t0;
            if left >= TT {
                const $T: usize = TT;
                $body;
                $t0 += TT;
            } else if left >= 2 {
                const $T: usize = 2;
                $body;
                $t0 += 2;
            } else {
                const $T: usize = 1;
                $body;
                $t0 += 1;
            }
        }
    }};
}

/// The integer GEMMs, compiled once per instruction set: every function of module `$m` has the
/// target features `$feat`, and `$lanes` defines its `lanes(w, a)`: `lane[k] = Σ_{i in 4k..4k+4}
/// w[i]·a[i]` over 16 bytes, exactly.
macro_rules! int_gemms {
    ($(#[$doc:meta])* mod $m:ident, $feat:literal, $lanes:item) => {
        $(#[$doc])*
        mod $m {
            use super::*;

            $lanes

            /// `out[t·rows + r] = dot_row_q8a(F, row r, token t)` for `ab` blocks per row.
            #[target_feature(enable = $feat)]
            pub(super) fn gemm_a<const F: u8>(
                w: &[u8],
                rows: usize,
                ab: usize,
                act: &[BlockQ8A],
                n: usize,
                out: &mut [f32],
            ) {
                let rb = ab * block_bytes(F);
                tiles!(n, |t0, T| {
                    let acts = &act[t0 * ab..(t0 + T) * ab];
                    for r in 0..rows {
                        let res = row_a::<F, T>(&w[r * rb..(r + 1) * rb], acts, ab);
                        for (t, v) in res.into_iter().enumerate() {
                            out[(t0 + t) * rows + r] = v;
                        }
                    }
                });
            }

            /// One row against `T` tokens (`act` = their blocks, token-major).
            #[inline]
            #[target_feature(enable = $feat)]
            fn row_a<const F: u8, const T: usize>(row: &[u8], act: &[BlockQ8A], ab: usize) -> [f32; T] {
                let mut acc = [[vdupq_n_f32(0.0); 2]; T];
                let mut offset = [0f32; T];
                for (b, blk) in row.chunks_exact(block_bytes(F)).enumerate() {
                    let (wq, dw, mw) = decode_a::<F>(blk);
                    for t in 0..T {
                        let a = &act[t * ab + b];
                        let aq = ld_s8x2(&a.qs);
                        add_lanes(&mut acc[t], dw * a.d, [lanes(wq[0], aq[0]), lanes(wq[1], aq[1])]);
                        // As the reference, also for the symmetric formats (`mw = 0`).
                        offset[t] += mw * (a.d * a.sum as f32);
                    }
                }
                let mut res = [0f32; T];
                for t in 0..T {
                    res[t] = reduce(acc[t]) + offset[t];
                }
                res
            }

            /// `out[t·rows + r] = dot_row_q8k(F, row r, token t)` for `nsb` super-blocks per row.
            #[target_feature(enable = $feat)]
            pub(super) fn gemm_k<const F: u8>(
                w: &[u8],
                rows: usize,
                nsb: usize,
                act: &[BlockQ8K],
                n: usize,
                out: &mut [f32],
            ) {
                let rb = nsb * block_bytes(F);
                tiles!(n, |t0, T| {
                    let acts = &act[t0 * nsb..(t0 + T) * nsb];
                    for r in 0..rows {
                        let res = row_k::<F, T>(&w[r * rb..(r + 1) * rb], acts, nsb);
                        for (t, v) in res.into_iter().enumerate() {
                            out[(t0 + t) * rows + r] = v;
                        }
                    }
                });
            }

            /// One k-quant row against `T` tokens: per 16 elements, the lane sums times that
            /// group's integer scale, summed in `i32` over the super-block.
            #[inline]
            #[target_feature(enable = $feat)]
            fn row_k<const F: u8, const T: usize>(row: &[u8], act: &[BlockQ8K], nsb: usize) -> [f32; T] {
                let mut acc = [[vdupq_n_f32(0.0); 2]; T];
                let mut mins = [0f32; T];
                for (b, blk) in row.chunks_exact(block_bytes(F)).enumerate() {
                    let kb = decode_k::<F>(blk);
                    for t in 0..T {
                        let a = &act[t * nsb + b];
                        let (aq, _) = a.qs.as_chunks::<32>();
                        let mut lane = [vdupq_n_s32(0); 2];
                        for (c, aq) in aq.iter().enumerate() {
                            let aq = ld_s8x2(aq);
                            for h in 0..2 {
                                let l = lanes(kb.q[2 * c + h], aq[h]);
                                lane[h] = vmlaq_n_s32(lane[h], l, kb.sc[2 * c + h]);
                            }
                        }
                        add_lanes(&mut acc[t], kb.d * a.d, lane);
                        if F != Q6_K {
                            mins[t] += (kb.dmin * a.d) * min_sum(&kb.mn, &a.bsums) as f32;
                        }
                    }
                }
                let mut res = [0f32; T];
                for t in 0..T {
                    res[t] = reduce(acc[t]) - mins[t];
                }
                res
            }
        }
    };
}

int_gemms! {
    /// The integer GEMMs with NEON only: lane sums by `smull` + `saddlp` + `addp`.
    mod mull,
    "neon",
    /// The 16-bit products (`|w·a| <= 128·127`) summed pairwise twice.
    #[inline]
    #[target_feature(enable = "neon")]
    fn lanes(w: int8x16_t, a: int8x16_t) -> int32x4_t {
        let lo = vmull_s8(vget_low_s8(w), vget_low_s8(a));
        let hi = vmull_high_s8(w, a);
        vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi))
    }
}

int_gemms! {
    /// The integer GEMMs with `dotprod`: lane sums by `sdot`. Only called once [`kernels`]
    /// detected the feature.
    mod dotprod,
    "neon,dotprod",
    /// `sdot` into zero (inline assembly: `vdotq_s32` is not stable yet).
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    fn lanes(w: int8x16_t, a: int8x16_t) -> int32x4_t {
        let mut acc = vdupq_n_s32(0);
        // SAFETY: `sdot` reads and writes only these vector registers (no memory, no flags), and
        // this function is compiled with `dotprod`, so it only runs where `kernels()` found it.
        unsafe {
            asm!(
                "sdot {acc:v}.4s, {w:v}.16b, {a:v}.16b",
                acc = inout(vreg) acc,
                w = in(vreg) w,
                a = in(vreg) a,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        acc
    }
}

// ---------------------------------------------------------------------------------------------
// Float GEMM, dot, axpy.

/// `acc = acc + w·x` for 32 elements (vector `k` into `acc[k % 2]`, in order).
#[inline]
#[target_feature(enable = "neon")]
fn acc32(acc: &mut [float32x4_t; 2], w: &[float32x4_t; 8], x: &[f32; 32]) {
    let x = ld_f32x8(x);
    for k in 0..8 {
        acc[k % 2] = vaddq_f32(acc[k % 2], vmulq_f32(w[k], x[k]));
    }
}

/// `out[t·rows + r] = dot_row(F, row r, x[t·cols..][..cols])`; rows of `rb` bytes.
#[target_feature(enable = "neon")]
fn gemm_f<const F: u8>(w: &[u8], rows: usize, rb: usize, cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
    tiles!(n, |t0, T| {
        let xs = &x[t0 * cols..(t0 + T) * cols];
        for r in 0..rows {
            let res = row_f::<F, T>(&w[r * rb..(r + 1) * rb], xs, cols);
            for (t, v) in res.into_iter().enumerate() {
                out[(t0 + t) * rows + r] = v;
            }
        }
    });
}

/// 8 plain-format elements (`8·block_bytes(F)` bytes) as f32 vectors.
#[inline]
#[target_feature(enable = "neon")]
fn plain8<const F: u8>(b: &[u8]) -> [float32x4_t; 2] {
    match F {
        F32 => {
            let (v0, v1) = (ld_u8(at(b, 0)), ld_u8(at(b, 16)));
            [vreinterpretq_f32_u8(v0), vreinterpretq_f32_u8(v1)]
        }
        F16 => {
            let h = vreinterpretq_u16_u8(ld_u8(at(b, 0)));
            [f16x4(vmovl_u16(vget_low_u16(h))), f16x4(vmovl_high_u16(h))]
        }
        _ => {
            let h = vreinterpretq_u16_u8(ld_u8(at(b, 0)));
            [
                vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
                vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)),
            ]
        }
    }
}

/// One plain-format element, as the reference widens it.
#[inline]
fn plain1<const F: u8>(b: &[u8]) -> f32 {
    match F {
        F32 => f32::from_le_bytes(*at(b, 0)),
        F16 => f16at(b, 0),
        _ => f32::from_bits((u16::from_le_bytes(*at(b, 0)) as u32) << 16),
    }
}

/// `x[o..o + 32]` as an array.
#[inline]
fn x32(x: &[f32], o: usize) -> &[f32; 32] {
    x[o..o + 32].try_into().expect("32 floats")
}

/// One row (`cols` elements) against `T` tokens (`x` = their rows, `cols` each).
#[inline]
#[target_feature(enable = "neon")]
fn row_f<const F: u8, const T: usize>(row: &[u8], x: &[f32], cols: usize) -> [f32; T] {
    let mut acc = [[vdupq_n_f32(0.0); 2]; T];
    let mut res = [0f32; T];
    match F {
        F32 | F16 | BF16 => {
            let s = block_bytes(F);
            let full = cols / 8;
            for (i, b) in row.chunks_exact(8 * s).take(full).enumerate() {
                let wv = plain8::<F>(b);
                for t in 0..T {
                    let (xc, _) = x[t * cols + 8 * i..t * cols + 8 * i + 8].as_chunks::<4>();
                    for h in 0..2 {
                        acc[t][h] = vaddq_f32(acc[t][h], vmulq_f32(wv[h], ld_f32(&xc[h])));
                    }
                }
            }
            // The tail (`cols % 8` elements) goes to lanes 0.., as `dot_f32_acc` does.
            for t in 0..T {
                let mut l = lanes_of(acc[t]);
                for (k, e) in (8 * full..cols).enumerate() {
                    l[k] += plain1::<F>(&row[e * s..]) * x[t * cols + e];
                }
                res[t] = reduce_lanes(&l);
            }
            return res;
        }
        Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 => {
            for (b, blk) in row.chunks_exact(block_bytes(F)).enumerate() {
                let wv = dequantize_a::<F>(blk);
                for (t, acc) in acc.iter_mut().enumerate() {
                    acc32(acc, &wv, x32(x, t * cols + 32 * b));
                }
            }
        }
        _ => {
            for (b, blk) in row.chunks_exact(block_bytes(F)).enumerate() {
                let kb = decode_k::<F>(blk);
                for g in 0..8 {
                    let wv = dequantize_k::<F>(&kb, g);
                    for (t, acc) in acc.iter_mut().enumerate() {
                        acc32(acc, &wv, x32(x, t * cols + 256 * b + 32 * g));
                    }
                }
            }
        }
    }
    for t in 0..T {
        res[t] = reduce(acc[t]);
    }
    res
}

#[target_feature(enable = "neon")]
fn dot_f32_neon(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (ac, at) = a[..n].as_chunks::<8>();
    let (bc, bt) = b[..n].as_chunks::<8>();
    let mut acc = [vdupq_n_f32(0.0); 2];
    for (x, y) in ac.iter().zip(bc) {
        let (x, _) = x.as_chunks::<4>();
        let (y, _) = y.as_chunks::<4>();
        for h in 0..2 {
            acc[h] = vaddq_f32(acc[h], vmulq_f32(ld_f32(&x[h]), ld_f32(&y[h])));
        }
    }
    let mut l = lanes_of(acc);
    for (k, (x, y)) in at.iter().zip(bt).enumerate() {
        l[k] += x * y;
    }
    reduce_lanes(&l)
}

#[target_feature(enable = "neon")]
fn axpy_neon(y: &mut [f32], a: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    let (yc, yt) = y[..n].as_chunks_mut::<4>();
    let (xc, xt) = x[..n].as_chunks::<4>();
    let av = vdupq_n_f32(a);
    for (y, x) in yc.iter_mut().zip(xc) {
        let v = vaddq_f32(ld_f32(y), vmulq_f32(av, ld_f32(x)));
        st_f32(y, v);
    }
    for (y, &x) in yt.iter_mut().zip(xt) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use purehw_kernels::quant as q;

    use purehw_kernels::testing::Rng;

    fn f16b(v: f32) -> [u8; 2] {
        half::f16::from_f32(v).to_le_bytes()
    }

    /// Both integer variants this CPU runs: `(name, gemm_q8a, gemm_q8k)`.
    fn variants() -> Vec<(&'static str, super::super::GemmA, super::super::GemmK)> {
        let mut v: Vec<(&'static str, super::super::GemmA, super::super::GemmK)> =
            vec![("mull", gemm_q8a_mull, gemm_q8k_mull)];
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            v.push(("sdot", gemm_q8a_sdot, gemm_q8k_sdot));
        }
        v
    }

    fn weights(rng: &mut Rng, fmt: Format, rows: usize, cols: usize) -> Vec<u8> {
        let mut w: Vec<u8> = (0..fmt.bytes_for(cols).unwrap() * rows).map(|_| rng.byte()).collect();
        match fmt {
            Format::F32 => {
                for c in w.chunks_exact_mut(4) {
                    c.copy_from_slice(&(rng.unit() * 4.0).to_le_bytes());
                }
            }
            Format::F16 => {
                for c in w.chunks_exact_mut(2) {
                    c.copy_from_slice(&f16b(rng.unit() * 4.0));
                }
            }
            Format::BF16 => {
                for c in w.chunks_exact_mut(2) {
                    c.copy_from_slice(&half::bf16::from_f32(rng.unit() * 4.0).to_le_bytes());
                }
            }
            _ => {
                for (i, c) in w.chunks_exact_mut(fmt.block_bytes()).enumerate() {
                    let s = 0.01 + 0.05 * (i % 5) as f32;
                    match fmt {
                        Format::Q6_K => c[208..210].copy_from_slice(&f16b(s)),
                        Format::Q4_1 | Format::Q5_1 | Format::Q4_K | Format::Q5_K => {
                            c[0..2].copy_from_slice(&f16b(if i % 4 == 3 { -s } else { s }));
                            c[2..4].copy_from_slice(&f16b(if i % 3 == 0 { -0.02 } else { 0.05 }));
                        }
                        Format::Q8_0 => {
                            c[0..2].copy_from_slice(&f16b(s));
                            c[2 + i % 32] = 0x80; // a -128 weight
                            if i % 5 == 0 {
                                c[2..34].fill(0x80);
                            }
                        }
                        _ => c[0..2].copy_from_slice(&f16b(if i % 4 == 3 { -s } else { s })),
                    }
                }
            }
        }
        w
    }

    /// `n` activation rows of `cols` values, with a zero block, huge and tiny magnitudes.
    fn activations(rng: &mut Rng, n: usize, cols: usize) -> Vec<f32> {
        let mut x: Vec<f32> = (0..n * cols).map(|_| rng.unit() * 2.0).collect();
        for (t, row) in x.chunks_exact_mut(cols).enumerate() {
            let blk = 32 * (t % (cols / 32).max(1));
            let end = (blk + 32).min(cols);
            match t % 5 {
                0 => row[blk..end].fill(0.0),
                1 => row.iter_mut().for_each(|v| *v *= 1e20),
                2 => row[blk..end].iter_mut().for_each(|v| *v *= 1e-30),
                3 => row[blk] = 3.0e3,
                _ => row[end - 1] = -5.0e4,
            }
        }
        x
    }

    #[test]
    fn name_is_neon() {
        assert_eq!(kernels().unwrap().name, "neon");
    }

    #[test]
    fn f16_widening_is_exact_for_every_half() {
        for base in (0..=u16::MAX).step_by(4) {
            let h: [u32; 4] = core::array::from_fn(|i| (base + i as u16) as u32);
            // SAFETY: NEON is enabled at compile time; `h` and `got` are 4 elements.
            let got = unsafe {
                let v = f16x4(vld1q_u32(h.as_ptr()));
                let mut got = [0f32; 4];
                vst1q_f32(got.as_mut_ptr(), v);
                got
            };
            for (i, &h) in h.iter().enumerate() {
                let want = half::f16::from_bits(h as u16).to_f32();
                assert_eq!(got[i].to_bits(), want.to_bits(), "{h:#06x}");
            }
        }
    }

    #[test]
    fn quantize_is_bit_exact() {
        let k = kernels().unwrap();
        let mut rng = Rng(0x1234_5678);
        for blocks in [1, 2, 3, 8] {
            let mut x = activations(&mut rng, 6, 256 * blocks);
            x[5] = f32::NAN;
            x[256 * blocks + 40] = f32::INFINITY;
            x[2 * 256 * blocks + 7] = 1e-42; // subnormal
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
        // A lone subnormal block: `127 / amax` is infinite.
        let mut x = [0f32; 32];
        x[3] = -1e-44;
        let (mut want, mut got) = ([BlockQ8A::default()], [BlockQ8A::default()]);
        q::quantize_q8a(&x, &mut want);
        (k.quantize_q8a)(&x, &mut got);
        assert_eq!(want, got);
    }

    #[test]
    fn integer_gemms_are_bit_exact() {
        let mut rng = Rng(0xDEAD_BEEF);
        for fmt in Format::ALL {
            let Some(layout) = fmt.act_layout() else { continue };
            let be = fmt.block_elems();
            let mut blocks = vec![1, 2, 3];
            if be == 32 {
                blocks.push(20);
            }
            for nb in blocks {
                let cols = nb * be;
                for rows in [1, 2, 3, 5] {
                    let w = weights(&mut rng, fmt, rows, cols);
                    for n in [1, 2, 3, 4, 5, 9] {
                        let x = activations(&mut rng, n, cols);
                        let rb = fmt.bytes_for(cols).unwrap();
                        let mut want = vec![0f32; n * rows];
                        for (name, ga, gk) in variants() {
                            let mut got = vec![f32::NAN; n * rows];
                            match layout {
                                q::ActLayout::Q8A => {
                                    let mut a = vec![BlockQ8A::default(); n * cols / 32];
                                    q::quantize_q8a(&x, &mut a);
                                    for t in 0..n {
                                        for r in 0..rows {
                                            let at = &a[t * nb..(t + 1) * nb];
                                            want[t * rows + r] = q::dot_row_q8a(fmt, &w[r * rb..(r + 1) * rb], at);
                                        }
                                    }
                                    ga(fmt, &w, rows, cols, &a, n, &mut got);
                                }
                                q::ActLayout::Q8K => {
                                    let mut a = vec![BlockQ8K::default(); n * cols / 256];
                                    q::quantize_q8k(&x, &mut a);
                                    for t in 0..n {
                                        for r in 0..rows {
                                            let at = &a[t * nb..(t + 1) * nb];
                                            want[t * rows + r] = q::dot_row_q8k(fmt, &w[r * rb..(r + 1) * rb], at);
                                        }
                                    }
                                    gk(fmt, &w, rows, cols, &a, n, &mut got);
                                }
                            }
                            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                                assert_eq!(
                                    g.to_bits(),
                                    e.to_bits(),
                                    "{name} {fmt:?} cols={cols} rows={rows} n={n} out[{i}]: {g} vs {e}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn float_gemm_is_bit_exact() {
        let k = kernels().unwrap();
        let mut rng = Rng(0x0BAD_F00D);
        for fmt in Format::ALL {
            let be = fmt.block_elems();
            let all: Vec<usize> = if be == 1 {
                vec![1, 5, 8, 13, 64, 67, 259]
            } else if be == 32 {
                vec![32, 64, 96, 640]
            } else {
                vec![256, 512, 768]
            };
            for cols in all {
                for rows in [1, 2, 3, 5] {
                    let w = weights(&mut rng, fmt, rows, cols);
                    let rb = fmt.bytes_for(cols).unwrap();
                    for n in [1, 2, 3, 4, 5, 9] {
                        let x = activations(&mut rng, n, cols);
                        let mut got = vec![f32::NAN; n * rows];
                        (k.gemm_f32)(fmt, &w, rows, cols, &x, n, &mut got);
                        for t in 0..n {
                            for r in 0..rows {
                                let e = q::dot_row(fmt, &w[r * rb..(r + 1) * rb], &x[t * cols..(t + 1) * cols]);
                                let g = got[t * rows + r];
                                assert_eq!(
                                    g.to_bits(),
                                    e.to_bits(),
                                    "{fmt:?} cols={cols} rows={rows} n={n} t={t} r={r}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dot_and_axpy_are_bit_exact() {
        let k = kernels().unwrap();
        let mut rng = Rng(42);
        for len in (0..40).chain([255, 256, 1000, 1003]) {
            let a: Vec<f32> = (0..len).map(|_| rng.unit() * 3.0).collect();
            let b: Vec<f32> = (0..len).map(|_| rng.unit() * 1e3).collect();
            assert_eq!((k.dot_f32)(&a, &b).to_bits(), q::dot_f32(&a, &b).to_bits(), "len={len}");
            let mut want = b.clone();
            super::super::scalar::axpy(&mut want, 0.3, &a);
            let mut got = b.clone();
            axpy(&mut got, 0.3, &a);
            assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()), "len={len}");
        }
    }

    #[test]
    fn bad_formats_fall_back() {
        let k = kernels().unwrap();
        let w = vec![0u8; Format::Q4_K.bytes_for(256).unwrap()];
        let a = vec![BlockQ8A::default(); 8];
        let mut out = [1f32];
        (k.gemm_q8a)(Format::Q4_K, &w, 1, 256, &a, 1, &mut out);
        assert_eq!(out[0], 0.0);
    }
}

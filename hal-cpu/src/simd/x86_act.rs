//! AVX2 twins of the activation math that uses `exp` (GELU-tanh, SiLU, softmax weights),
//! bit-exact with `purehw_kernels::ops::{exp, tanh, gelu_tanh, silu}`: the same f32 operations in
//! the same order, eight lanes at a time, never fused.
//!
//! `unsafe` is allowed because the `#[target_feature]` entry points may only run once
//! `x86_f32::available()` has confirmed AVX2/FMA/F16C; every `unsafe` block says why it holds.
#![allow(unsafe_code)]

use core::arch::x86_64::*;

use purehw_kernels::ops::{self as k, EXP_HI, EXP_LO, EXP_P, GELU_COEF, LN2_HI, LN2_LO, SQRT_2_OVER_PI, TANH_SMALL};

use super::x86_f32::available;

/// `out[i] = gelu_tanh(gate[i]) · up[i]`; `gate == None`: `out` holds the gate (in place).
pub(super) fn gelu_mul(out: &mut [f32], gate: Option<&[f32]>, up: &[f32]) {
    if !available() {
        return super::scalar::gelu_mul(out, gate, up);
    }
    // SAFETY: `available()` confirmed AVX2 and FMA on this CPU.
    unsafe { map2::<true>(out, gate, up) }
}

/// `out[i] = silu(gate[i]) · up[i]`; `gate == None`: in place.
pub(super) fn silu_mul(out: &mut [f32], gate: Option<&[f32]>, up: &[f32]) {
    if !available() {
        return super::scalar::silu_mul(out, gate, up);
    }
    // SAFETY: as above.
    unsafe { map2::<false>(out, gate, up) }
}

/// `x[i] = exp(x[i] − m)`.
pub(super) fn exp_sub(x: &mut [f32], m: f32) {
    if !available() {
        return super::scalar::exp_sub(x, m);
    }
    // SAFETY: as above.
    unsafe { exp_sub_avx2(x, m) }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn ld(x: &[f32]) -> __m256 {
    let x: &[f32; 8] = x.try_into().expect("8 floats");
    // SAFETY: `x` is exactly 8 readable f32; unaligned load.
    unsafe { _mm256_loadu_ps(x.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn st(out: &mut [f32], v: __m256) {
    let out: &mut [f32; 8] = out.try_into().expect("8 floats");
    // SAFETY: `out` is exactly 8 writable f32; unaligned store.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn splat(v: f32) -> __m256 {
    _mm256_set1_ps(v)
}

/// `purehw_kernels::ops::exp`, lane by lane.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, splat(EXP_LO)), splat(EXP_HI));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        splat(core::f32::consts::LOG2_E),
    ));
    let r = _mm256_sub_ps(_mm256_sub_ps(x, _mm256_mul_ps(n, splat(LN2_HI))), _mm256_mul_ps(n, splat(LN2_LO)));
    let mut p = splat(EXP_P[0]);
    for &c in &EXP_P[1..] {
        p = _mm256_add_ps(_mm256_mul_ps(p, r), splat(c));
    }
    let y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r), splat(1.0));
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
    _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
}

/// `purehw_kernels::ops::tanh`, lane by lane (both branches computed, then blended).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn tanh8(x: __m256) -> __m256 {
    let sign = splat(-0.0);
    let a = _mm256_andnot_ps(sign, x);
    let x2 = _mm256_mul_ps(x, x);
    let p = _mm256_mul_ps(_mm256_add_ps(_mm256_mul_ps(splat(2.0 / 15.0), x2), splat(-1.0 / 3.0)), x2);
    let small = _mm256_add_ps(x, _mm256_mul_ps(x, p));
    let e = exp8(_mm256_mul_ps(splat(-2.0), a));
    let t = _mm256_div_ps(_mm256_sub_ps(splat(1.0), e), _mm256_add_ps(splat(1.0), e));
    let big = _mm256_or_ps(_mm256_andnot_ps(sign, t), _mm256_and_ps(sign, x));
    _mm256_blendv_ps(big, small, _mm256_cmp_ps::<_CMP_LT_OQ>(a, splat(TANH_SMALL)))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn gelu8(x: __m256) -> __m256 {
    let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    let inner = _mm256_mul_ps(splat(SQRT_2_OVER_PI), _mm256_add_ps(x, _mm256_mul_ps(splat(GELU_COEF), x3)));
    _mm256_mul_ps(_mm256_mul_ps(splat(0.5), x), _mm256_add_ps(splat(1.0), tanh8(inner)))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn silu8(x: __m256) -> __m256 {
    let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
    _mm256_div_ps(x, _mm256_add_ps(splat(1.0), e))
}

#[target_feature(enable = "avx2,fma")]
fn map2<const GELU: bool>(out: &mut [f32], gate: Option<&[f32]>, up: &[f32]) {
    let n = out.len().min(up.len()).min(gate.map_or(usize::MAX, <[f32]>::len));
    let body = n - n % 8;
    for i in (0..body).step_by(8) {
        let g = match gate {
            Some(g) => ld(&g[i..i + 8]),
            None => ld(&out[i..i + 8]),
        };
        let a = if GELU { gelu8(g) } else { silu8(g) };
        st(&mut out[i..i + 8], _mm256_mul_ps(a, ld(&up[i..i + 8])));
    }
    for i in body..n {
        let g = gate.map_or(out[i], |g| g[i]);
        out[i] = if GELU { k::gelu_tanh(g) } else { k::silu(g) } * up[i];
    }
}

#[target_feature(enable = "avx2,fma")]
fn exp_sub_avx2(x: &mut [f32], m: f32) {
    let body = x.len() - x.len() % 8;
    let mv = splat(m);
    for i in (0..body).step_by(8) {
        let v = exp8(_mm256_sub_ps(ld(&x[i..i + 8]), mv));
        st(&mut x[i..i + 8], v);
    }
    for v in &mut x[body..] {
        *v = k::exp(*v - m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_match_reference_bitwise() {
        if !available() {
            return;
        }
        let mut xs: Vec<f32> = Vec::new();
        let mut v = -120.0f32;
        while v < 120.0 {
            xs.push(v);
            v += 0.0037;
        }
        xs.extend([0.0, -0.0, 0.0624, -0.0625, 0.0625, 1e-30, -1e-30, f32::MAX, f32::MIN, 88.3, -87.3, 1e-3]);
        let up: Vec<f32> = xs.iter().map(|x| (x * 0.37).sin()).collect();
        for n in [xs.len(), 7, 1, 0] {
            let (g, u) = (&xs[..n], &up[..n]);
            let mut got = vec![0f32; n];
            gelu_mul(&mut got, Some(g), u);
            let want: Vec<f32> = g.iter().zip(u).map(|(&g, &u)| k::gelu_tanh(g) * u).collect();
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "gelu");
            let mut inplace = g.to_vec();
            silu_mul(&mut inplace, None, u);
            let want: Vec<f32> = g.iter().zip(u).map(|(&g, &u)| k::silu(g) * u).collect();
            assert!(inplace.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "silu");
            let mut e = g.to_vec();
            exp_sub(&mut e, 1.5);
            assert!(e.iter().zip(g).all(|(a, &x)| a.to_bits() == k::exp(x - 1.5).to_bits()), "exp");
        }
    }
}

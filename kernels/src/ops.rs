//! Activation ops: the scalar definition of every op in hal's `Op` enum except the weight ops
//! (`Embed` and `MatMul` are `quant::dequantize_row` / `quant::dot_f32` applied row by row).
//!
//! Everything is f32, in a fixed order, so results are deterministic and a SIMD or shader twin can
//! be tested against these bit for bit. Output comes first; `*_inplace` variants exist for the
//! ops hal allows in place (`out == input`). Nothing here allocates.

use core::ops::Range;

use crate::quant::dot_f32;

/// How RoPE pairs the dimensions of a head (hal re-exports it for `Op::Rope`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum RopeMode {
    /// Pairs `(i, i + d/2)`: HF's `rotate_half` (Gemma, Llama in HF layout, GGUF gemma3).
    Neox,
    /// Pairs `(2i, 2i + 1)`: ggml's default mode, matching the Q/K rows llama.cpp permutes in llama GGUFs.
    Interleaved,
}

/// What a KV cache stores (hal re-exports it for the cache ops): `F32` keeps the computed keys and
/// values exactly; `F16` rounds each to the nearest `f16` (ties to even, as `half` and the x86
/// `vcvtps2ph` do) when it is stored, and attention widens it back exactly. Half the bytes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum KvType {
    #[default]
    F32,
    F16,
}

impl KvType {
    /// Buffer words (f32-sized) a cache row of `width` elements takes: `F16` packs two elements
    /// a word (element `2i` in the low half), so `width` must be even.
    pub const fn row_words(self, width: usize) -> usize {
        match self {
            KvType::F32 => width,
            KvType::F16 => width / 2,
        }
    }
}

/// Store one cache row: `src` (a row of `src.len()` elements) into row `row` of a cache of `kv`
/// elements held in f32 words, rounding to f16 (ties to even) for `F16`.
pub fn store_kv_row(cache: &mut [f32], row: usize, src: &[f32], kv: KvType) {
    let w = src.len();
    match kv {
        KvType::F32 => cache[row * w..(row + 1) * w].copy_from_slice(src),
        KvType::F16 => {
            let h: &mut [half::f16] = bytemuck::cast_slice_mut(cache);
            for (d, &x) in h[row * w..(row + 1) * w].iter_mut().zip(src) {
                *d = half::f16::from_f32(x);
            }
        }
    }
}

/// A KV-cache element as [`attend`] reads it.
pub trait KvElem: Copy {
    fn load(self) -> f32;
}

impl KvElem for f32 {
    #[inline]
    fn load(self) -> f32 {
        self
    }
}

impl KvElem for half::f16 {
    /// Exact: every f16 is an f32.
    #[inline]
    fn load(self) -> f32 {
        self.to_f32()
    }
}

/// Most elements of a head [`attend`] takes (its key row is widened into a buffer this long).
pub const MAX_HEAD_DIM: usize = 512;

/// `sqrt(2/π)` rounded once to f32, as torch's `kBeta` (computed in double, stored as float).
pub const SQRT_2_OVER_PI: f32 = (core::f64::consts::SQRT_2 * core::f64::consts::FRAC_2_SQRT_PI * 0.5) as f32;
pub const GELU_COEF: f32 = 0.044715;

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// `1 / sqrt(mean(x²) + eps)`; the sum of squares uses the canonical `dot_f32` order.
#[inline]
pub fn rms_inv(x: &[f32], eps: f32) -> f32 {
    let ms = dot_f32(x, x) / x.len() as f32;
    1.0 / libm::sqrtf(ms + eps)
}

/// One row: `out[i] = x[i] * inv * w[i]`, `inv = 1/sqrt(mean(x²) + eps)` (HF's f32 order).
pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    debug_assert!(out.len() == x.len() && w.len() == x.len());
    let inv = rms_inv(x, eps);
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * inv * wi;
    }
}

/// [`rmsnorm`] with `out == x`.
pub fn rmsnorm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    debug_assert_eq!(w.len(), x.len());
    let inv = rms_inv(x, eps);
    for (xi, &wi) in x.iter_mut().zip(w) {
        *xi = *xi * inv * wi;
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// Frequency `i` of a head of `head_dim`: `(1 / theta^(2i/d)) / scale`, in f32 as HF computes
/// `inv_freq` (then divides by the linear scaling factor).
#[inline]
pub fn rope_inv_freq(i: usize, head_dim: usize, theta: f32, scale: f32) -> f32 {
    let e = (2 * i) as f32 / head_dim as f32;
    (1.0 / libm::powf(theta, e)) / scale
}

/// `(cos, sin)` of frequency `i` at position `pos`; the angle is `pos as f32 * inv_freq` in f32.
#[inline]
pub fn rope_cos_sin(i: usize, pos: u32, head_dim: usize, theta: f32, scale: f32) -> (f32, f32) {
    rope_cos_sin_at(rope_inv_freq(i, head_dim, theta, scale), pos)
}

/// [`rope_cos_sin`] with the frequency already computed (a table per step reuses it).
#[inline]
pub fn rope_cos_sin_at(inv_freq: f32, pos: u32) -> (f32, f32) {
    let angle = pos as f32 * inv_freq;
    (libm::cosf(angle), libm::sinf(angle))
}

/// Rotate one rotation pair: `(a·cos − b·sin, b·cos + a·sin)`.
#[inline]
fn rotate(a: f32, b: f32, cos: f32, sin: f32) -> (f32, f32) {
    (a * cos - b * sin, b * cos + a * sin)
}

/// Rotary embedding in place on every head of one row: `x` is `(heads, head_dim)` at position
/// `pos`. Each frequency's cos/sin is computed once and applied to all heads (same values as
/// computing them per head). `head_dim` must be even and divide `x.len()`.
pub fn rope(x: &mut [f32], head_dim: usize, pos: u32, theta: f32, scale: f32, mode: RopeMode) {
    debug_assert!(head_dim > 0 && head_dim.is_multiple_of(2) && x.len().is_multiple_of(head_dim));
    let half = head_dim / 2;
    for i in 0..half {
        let (cos, sin) = rope_cos_sin(i, pos, head_dim, theta, scale);
        let (ia, ib) = match mode {
            RopeMode::Neox => (i, i + half),
            RopeMode::Interleaved => (2 * i, 2 * i + 1),
        };
        for head in x.chunks_exact_mut(head_dim) {
            let (a, b) = rotate(head[ia], head[ib], cos, sin);
            head[ia] = a;
            head[ib] = b;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// exp and tanh, defined as fixed sequences of f32 operations

// Cephes `expf`: e^x = 2^n · e^r with n = round(x·log2 e), r = x − n·ln 2 (ln 2 split in two so
// n·LN2_HI is exact), e^r by a degree-7 polynomial.
pub const EXP_LO: f32 = -87.3; // e^x is normal down to here (n ≥ −126)
pub const EXP_HI: f32 = 88.3; // n ≤ 127, so 2^n is finite
pub const LN2_HI: f32 = 0.693_359_4;
pub const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5·2^23`: `(v + M) − M` is `v` rounded to the nearest integer (ties to even) for |v| < 2^22.
const ROUND_MAGIC: f32 = 12_582_912.0;
pub const EXP_P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

/// `e^x` (≤ 2 ulp from the true value; tested), as this exact sequence of f32 operations — no
/// fused multiply-add — so SIMD twins reproduce it bit for bit:
/// `x = min(max(x, −87.3), 88.3)`, `n = round_ties_even(x·log2e)`, `r = (x − n·LN2_HI) − n·LN2_LO`,
/// `p = (((((P0·r + P1)·r + P2)·r + P3)·r + P4)·r + P5)`, `y = ((p·(r·r)) + r) + 1`, `y · 2^n`.
/// A NaN becomes `e^−87.3` (the max/min order of x86 `maxps`), never a panic.
#[inline]
pub fn exp(x: f32) -> f32 {
    // Not `clamp`: max-then-min maps NaN to EXP_LO, as x86 `maxps` does.
    #[allow(clippy::manual_clamp)]
    let x = x.max(EXP_LO).min(EXP_HI);
    // Round to nearest, ties to even, without a call or branch (so loops over `exp` vectorise):
    // |x·log2e| < 2^7, and adding 1.5·2^23 leaves a spacing of exactly 1.
    let n = (x * core::f32::consts::LOG2_E + ROUND_MAGIC) - ROUND_MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = EXP_P[0];
    for c in &EXP_P[1..] {
        p = p * r + c;
    }
    let y = (p * (r * r) + r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Below this magnitude [`tanh`] uses its odd polynomial (no cancellation).
pub const TANH_SMALL: f32 = 0.0625;

/// `tanh(x)` from [`exp`]: for `|x| < 1/16`, `x + x·((C5·x² + C3)·x²)` (Taylor, error < 1e-9
/// relative); otherwise `(1 − e)/(1 + e)` with `e = exp(−2|x|)`, sign copied from x.
#[inline]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    if a < TANH_SMALL {
        let x2 = x * x;
        x + x * ((2.0 / 15.0 * x2 + (-1.0 / 3.0)) * x2)
    } else {
        let e = exp(-2.0 * a);
        ((1.0 - e) / (1.0 + e)).copysign(x)
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise

/// `0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))` in f32 (torch's `gelu(approximate='tanh')`).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    let x3 = x * x * x;
    let inner = SQRT_2_OVER_PI * (x + GELU_COEF * x3);
    0.5 * x * (1.0 + tanh(inner))
}

/// `x / (1 + exp(-x))`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `cap · tanh(x / cap)`; `cap > 0`.
#[inline]
pub fn softcap(x: f32, cap: f32) -> f32 {
    cap * tanh(x / cap)
}

/// `out = a + b`.
pub fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
    debug_assert!(out.len() == a.len() && out.len() == b.len());
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}

/// `a += b` (also `out == b`: f32 addition commutes exactly).
pub fn add_inplace(a: &mut [f32], b: &[f32]) {
    debug_assert_eq!(a.len(), b.len());
    for (x, &y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// `out = gelu_tanh(gate) * up`.
pub fn gelu_tanh_mul(out: &mut [f32], gate: &[f32], up: &[f32]) {
    debug_assert!(out.len() == gate.len() && out.len() == up.len());
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = gelu_tanh(g) * u;
    }
}

/// [`gelu_tanh_mul`] with `out == gate`.
pub fn gelu_tanh_mul_inplace(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = gelu_tanh(*g) * u;
    }
}

/// `out = silu(gate) * up`.
pub fn silu_mul(out: &mut [f32], gate: &[f32], up: &[f32]) {
    debug_assert!(out.len() == gate.len() && out.len() == up.len());
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}

/// [`silu_mul`] with `out == gate`.
pub fn silu_mul_inplace(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// `x = cap · tanh(x / cap)` in place; `cap > 0`.
pub fn softcap_inplace(x: &mut [f32], cap: f32) {
    for v in x {
        *v = softcap(*v, cap);
    }
}

/// `x *= s` in place (the embedding scale).
pub fn scale_inplace(x: &mut [f32], s: f32) {
    for v in x {
        *v *= s;
    }
}

// ---------------------------------------------------------------------------------------------
// Argmax

/// The table row an `EmbedIds` id (an index held in f32, as argmax writes it) selects:
/// truncated, NaN and negatives to 0, clamped to the last of `rows` (at least 1).
#[inline]
pub fn token_of(id: f32, rows: usize) -> usize {
    (id as usize).min(rows.saturating_sub(1))
}

/// A value as argmax ranks it: NaN counts as `-inf` and `+inf` as `f32::MAX` (the sampler's rule,
/// so a device argmax picks the token greedy sampling would).
#[inline]
pub fn argmax_key(x: f32) -> f32 {
    if x.is_nan() { f32::NEG_INFINITY } else { x.min(f32::MAX) }
}

/// Index of the largest [`argmax_key`], the first one on ties; 0 for an empty slice. The result
/// does not depend on the order values are compared in, so a parallel reduction reproduces it.
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut max = f32::NEG_INFINITY;
    for (i, &v) in x.iter().enumerate() {
        let k = argmax_key(v);
        if k > max {
            max = k;
            best = i;
        }
    }
    best as u32
}

// ---------------------------------------------------------------------------------------------
// Attention

/// Score of one key: `q·k · scale`, then `softcap·tanh(s/softcap)` when `softcap > 0`.
#[inline]
pub fn attn_score(q: &[f32], k: &[f32], scale: f32, softcap_: f32) -> f32 {
    let s = dot_f32(q, k) * scale;
    if softcap_ > 0.0 { softcap(s, softcap_) } else { s }
}

/// Attention of one query head over the keys `keys` (indices, not positions).
///
/// Key `j` is `k[r*stride ..][..d]` and its value `v[r*stride ..][..d]`, `d = q.len() = out.len()`,
/// at row `r = j` (`ring == 0`) or `r = j % ring` (a ring cache of `ring` rows); so `k`, `v` start
/// at the head's first element of row 0 and `stride` is the cache row width. Both must reach
/// every key's row. Only the addressing depends on `ring`: the keys are taken in the same order.
/// Plain two-pass softmax without scratch: pass 1 finds the max score; pass 2 recomputes each
/// score (identically), accumulates `Σ exp(s − max)` and `Σ exp(s − max)·v` in f32 in key order,
/// then divides. An empty `keys` gives zeros.
#[allow(clippy::too_many_arguments)] // mirrors the op's parameters; a struct would only rename them
pub fn attend<T: KvElem>(
    out: &mut [f32],
    q: &[f32],
    k: &[T],
    v: &[T],
    stride: usize,
    keys: Range<usize>,
    ring: usize,
    scale: f32,
    softcap_: f32,
) {
    let d = q.len();
    debug_assert_eq!(out.len(), d);
    assert!(d <= MAX_HEAD_DIM, "head_dim {d} > {MAX_HEAD_DIM}");
    out.fill(0.0);
    if keys.is_empty() {
        return;
    }
    let row = |j: usize| if ring == 0 { j } else { j % ring };
    debug_assert!(keys.clone().all(|j| row(j) * stride + d <= k.len().min(v.len())), "keys {keys:?} past the cache");
    // Key `j` widened to f32 (exactly), then scored as f32 keys are.
    let mut kb = [0f32; MAX_HEAD_DIM];
    let mut score = |j: usize| {
        for (x, e) in kb.iter_mut().zip(&k[row(j) * stride..row(j) * stride + d]) {
            *x = e.load();
        }
        attn_score(q, &kb[..d], scale, softcap_)
    };

    let mut max = f32::NEG_INFINITY;
    for j in keys.clone() {
        max = max.max(score(j));
    }

    let mut sum = 0.0f32;
    for j in keys {
        let e = exp(score(j) - max);
        sum += e;
        for (o, vi) in out.iter_mut().zip(&v[row(j) * stride..row(j) * stride + d]) {
            *o += e * vi.load();
        }
    }
    for o in out {
        *o /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_tanh_are_accurate() {
        let mut worst_exp = 0f64;
        let mut worst_tanh = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = libm::exp(x as f64);
            let got = exp(x) as f64;
            worst_exp = worst_exp.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        let mut x = -12.0f32;
        while x < 12.0 {
            let want = libm::tanh(x as f64);
            let got = tanh(x) as f64;
            let err = (got - want).abs() / want.abs().max(1e-30);
            worst_tanh = worst_tanh.max(err);
            x += 0.000_091_7;
        }
        assert!(worst_exp < 2.5e-7, "exp worst relative error {worst_exp:e}");
        assert!(worst_tanh < 1e-6, "tanh worst relative error {worst_tanh:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(tanh(0.0), 0.0);
        assert_eq!(exp(-1000.0), exp(-87.3));
        assert!(exp(1000.0).is_finite() && tanh(1000.0) == 1.0 && tanh(-1000.0) == -1.0);
        assert!(exp(f32::NAN).is_finite());
    }

    #[test]
    fn gelu_silu_softcap_values() {
        // Reference values from the f64 formulas.
        for &x in &[-6.0f32, -1.5, -0.1, 0.0, 0.3, 1.0, 2.5, 8.0] {
            let xd = x as f64;
            let g =
                0.5 * xd * (1.0 + libm::tanh(libm::sqrt(2.0 / core::f64::consts::PI) * (xd + 0.044715 * xd * xd * xd)));
            assert!((gelu_tanh(x) as f64 - g).abs() <= 1e-6 * (1.0 + g.abs()), "gelu {x}");
            let s = xd / (1.0 + libm::exp(-xd));
            assert!((silu(x) as f64 - s).abs() <= 1e-6 * (1.0 + s.abs()), "silu {x}");
            let c = 5.0 * libm::tanh(xd / 5.0);
            assert!((softcap(x, 5.0) as f64 - c).abs() <= 1e-6 * (1.0 + c.abs()), "softcap {x}");
        }
        assert_eq!(gelu_tanh(0.0), 0.0);
        assert_eq!(silu(0.0), 0.0);
    }

    #[test]
    fn rmsnorm_inplace_matches() {
        let x: [f32; 11] = core::array::from_fn(|i| (i as f32 - 4.0) * 0.37);
        let w: [f32; 11] = core::array::from_fn(|i| 1.0 + i as f32 * 0.1);
        let mut a = [0f32; 11];
        rmsnorm(&mut a, &x, &w, 1e-6);
        let mut b = x;
        rmsnorm_inplace(&mut b, &w, 1e-6);
        assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits));
        let ms: f64 = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / 11.0;
        for i in 0..11 {
            let r = x[i] as f64 / libm::sqrt(ms + 1e-6) * w[i] as f64;
            assert!((a[i] as f64 - r).abs() < 1e-5);
        }
    }

    #[test]
    fn rope_pos0_is_identity_and_modes_rotate_pairs() {
        let x: [f32; 16] = core::array::from_fn(|i| i as f32 + 1.0);
        for mode in [RopeMode::Neox, RopeMode::Interleaved] {
            let mut y = x;
            rope(&mut y, 8, 0, 10000.0, 1.0, mode);
            assert_eq!(x, y);
        }
        // Frequency 0 rotates by exactly `pos` radians.
        let mut y = [1.0f32, 0.0, 0.0, 0.0];
        rope(&mut y, 4, 1, 10000.0, 1.0, RopeMode::Interleaved);
        assert_eq!(y[0], libm::cosf(1.0));
        assert_eq!(y[1], libm::sinf(1.0));
        let mut y = [1.0f32, 0.0, 0.0, 0.0];
        rope(&mut y, 4, 1, 10000.0, 1.0, RopeMode::Neox);
        assert_eq!(y[0], libm::cosf(1.0));
        assert_eq!(y[2], libm::sinf(1.0));
    }

    #[test]
    fn attend_single_key_returns_value() {
        let q = [1.0f32, 2.0];
        let k = [0.5f32, 0.5, 9.0, 9.0];
        let v = [3.0f32, 4.0, 7.0, 7.0];
        let mut out = [0f32; 2];
        attend(&mut out, &q, &k, &v, 2, 0..1, 0, 0.7, 0.0);
        assert_eq!(out, [3.0, 4.0]);
        attend(&mut out, &q, &k, &v, 2, 1..1, 0, 0.7, 0.0);
        assert_eq!(out, [0.0, 0.0]);
    }

    #[test]
    fn attend_ring_reads_the_same_keys_in_the_same_order() {
        // Positions 0..7 linear; a ring of 4 rows holds positions 3..7 at rows p % 4.
        let q = [0.3f32, -1.1];
        let lin_k: [f32; 14] = core::array::from_fn(|i| (i as f32 * 0.37).sin());
        let lin_v: [f32; 14] = core::array::from_fn(|i| (i as f32 * 0.91).cos());
        let (mut ring_k, mut ring_v) = ([0f32; 8], [0f32; 8]);
        for p in 3..7 {
            ring_k[(p % 4) * 2..][..2].copy_from_slice(&lin_k[p * 2..][..2]);
            ring_v[(p % 4) * 2..][..2].copy_from_slice(&lin_v[p * 2..][..2]);
        }
        let (mut a, mut b) = ([0f32; 2], [0f32; 2]);
        attend(&mut a, &q, &lin_k, &lin_v, 2, 3..7, 0, 0.7, 30.0);
        attend(&mut b, &q, &ring_k, &ring_v, 2, 3..7, 4, 0.7, 30.0);
        assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits));
        assert!(a.iter().all(|x| x.is_finite() && *x != 0.0));
    }
}

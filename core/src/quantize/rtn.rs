//! The quantizer's numerics: one group of weights to integer codes, a scale and a zero point, in
//! compressed-tensors' convention (FORMAT.md §4: `W = (q − zp) · scale`), and the packing of
//! codes and zero points into the int32 words `pack-quantized` stores (§2, §3).
//!
//! Codes are kept *unsigned* here: `u = q + 2^(bits−1)` in `0 ..= 2^bits − 1`, which is exactly
//! the field the packed words hold, and likewise `z = zp + 2^(bits−1)`. The value is
//! `(u − z) · scale`; a symmetric group has `z = 2^(bits−1)` (zp = 0).
//!
//! Round-to-nearest with compressed-tensors' min-max scale (absmax/(2^(bits−1) − ½) symmetric,
//! (max − min)/(2^bits − 1) with an integer zero point asymmetric) is the first candidate; a
//! search then tries nearby scales and refits the scale to the codes by least squares, keeping
//! whichever gives the smallest squared error (llama.cpp's `make_qx_quants` / `make_qkx2_quants`
//! do the same for the GGUF formats). Every candidate is scored with the scale as it will be
//! stored (rounded to bf16/f16), so the error measured is the error loaded.

use purehw_hal::ScaleType;

/// Round a scale to what `ty` stores (round to nearest even), back as f32.
pub fn store_scale(ty: ScaleType, s: f32) -> f32 {
    match ty {
        ScaleType::F32 => s,
        ScaleType::F16 => half::f16::from_f32(s).to_f32(),
        ScaleType::BF16 => half::bf16::from_f32(s).to_f32(),
    }
}

/// The scale compressed-tensors writes for an all-zero group: the dtype's epsilon.
fn eps(ty: ScaleType) -> f32 {
    match ty {
        ScaleType::F32 => f32::EPSILON,
        ScaleType::F16 => half::f16::EPSILON.to_f32(),
        ScaleType::BF16 => half::bf16::EPSILON.to_f32(),
    }
}

/// A positive, finite, storable scale near `s` (`None` when `s` is not usable).
fn storable(ty: ScaleType, s: f32) -> Option<f32> {
    if !(s.is_finite() && s > 0.0) {
        return None;
    }
    let r = store_scale(ty, s);
    (r.is_finite() && r > 0.0).then_some(r)
}

/// How to quantize one group.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct GroupSpec {
    /// 4 or 8.
    pub bits: u8,
    pub symmetric: bool,
    pub scale: ScaleType,
    /// Try scales beyond plain min-max RTN.
    pub search: bool,
}

/// Weight `j` of the error (1 without importances).
#[inline]
fn wt(w: Option<&[f32]>, j: usize) -> f64 {
    w.map_or(1.0, |w| w[j] as f64)
}

/// Codes `u` of `x` for scale `s` and zero point `z` (unsigned domain), and the (weighted)
/// squared error.
fn codes_for(x: &[f32], w: Option<&[f32]>, s: f32, z: i32, nmax: i32, u: &mut [u8]) -> f64 {
    let mut err = 0f64;
    for (j, (u, &x)) in u.iter_mut().zip(x).enumerate() {
        // Divided, as compressed-tensors does (a product by 1/s rounds differently at ties).
        let q = (libm::rintf(x / s) as i32 + z).clamp(0, nmax);
        *u = q as u8;
        let d = x - (q - z) as f32 * s;
        err += wt(w, j) * (d as f64) * (d as f64);
    }
    err
}

/// The (weighted) least-squares scale for fixed codes: `Σ w·x·(u − z) / Σ w·(u − z)²`.
fn refit(x: &[f32], w: Option<&[f32]>, u: &[u8], z: i32) -> Option<f32> {
    let (mut num, mut den) = (0f64, 0f64);
    for (j, (&x, &u)) in x.iter().zip(u).enumerate() {
        let c = (u as i32 - z) as f64;
        num += wt(w, j) * x as f64 * c;
        den += wt(w, j) * c * c;
    }
    (den > 0.0).then(|| (num / den) as f32)
}

/// Quantize one group `x` into `u` (unsigned codes); returns the stored scale and the unsigned
/// zero point `z`. `x` must be finite (the caller checks the tensor). `importance` (one
/// non-negative weight per element, e.g. the mean square of the activation it multiplies)
/// weights the squared error the search minimises; `None` weighs every element alike.
pub fn quantize_group(spec: GroupSpec, x: &[f32], importance: Option<&[f32]>, u: &mut [u8]) -> (f32, i32) {
    let nmax = (1i32 << spec.bits) - 1;
    let half = 1i32 << (spec.bits - 1);
    // compressed-tensors forces the range to include 0, so that 0 is exact.
    let (mut lo, mut hi) = (0f32, 0f32);
    for &v in x {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo == 0.0 && hi == 0.0 {
        u.fill(half as u8);
        return (eps(spec.scale), half);
    }
    let zero_for = |s: f32| libm::rintf(-lo / s) as i32;
    if !spec.search {
        // One candidate: it wins when storable, so it is not scored (the same codes, less work).
        let (s, z) = if spec.symmetric {
            (hi.max(-lo) / (half as f32 - 0.5), half)
        } else {
            let s = (hi - lo) / nmax as f32;
            (s, zero_for(s))
        };
        if let Some(s) = storable(spec.scale, s) {
            let z = z.clamp(0, nmax);
            codes_for(x, None, s, z, nmax, u);
            return (s, z);
        }
    }
    let mut c = Search { x, w: importance, nmax, ty: spec.scale, tmp: [0u8; 256], best: None };
    if spec.symmetric {
        let amax = hi.max(-lo);
        // compressed-tensors' RTN: absmax / ((qmax − qmin)/2), e.g. /7.5 for int4.
        c.try_one(amax / (half as f32 - 0.5), half, u);
        if spec.search {
            for i in 0..=25 {
                let d = half as f32 - 2.0 + 0.1 * i as f32;
                c.try_one(amax / d, half, u);
            }
        }
    } else {
        let s = (hi - lo) / nmax as f32;
        c.try_one(s, zero_for(s), u);
        if spec.search {
            for i in 0..=20 {
                let s = (hi - lo) / (nmax as f32 - 1.0 + 0.1 * i as f32);
                c.try_one(s, zero_for(s), u);
                // The neighbouring zero points, for groups whose range is lopsided.
                c.try_one(s, zero_for(s) + 1, u);
                c.try_one(s, zero_for(s) - 1, u);
            }
        }
    }
    // Least-squares refits of the winner's scale (its codes fixed), re-quantizing each time.
    if spec.search {
        for _ in 0..3 {
            let Some((_, s0, z)) = c.best else { break };
            let Some(s) = refit(x, importance, u, z) else { break };
            c.try_one(s, z, u);
            if c.best.is_some_and(|b| b.1 == s0) {
                break;
            }
        }
    }
    let best = c.best;
    match best {
        Some((_, s, z)) => (s, z),
        None => {
            // Only when no candidate was storable (a range beyond the scale dtype).
            let s = eps(spec.scale);
            codes_for(x, None, s, half, nmax, u);
            (s, half)
        }
    }
}

/// The search's state: the best `(squared error, stored scale, z)` so far, whose codes are in
/// the caller's `u`.
struct Search<'a> {
    x: &'a [f32],
    w: Option<&'a [f32]>,
    nmax: i32,
    ty: ScaleType,
    tmp: [u8; 256],
    best: Option<(f64, f32, i32)>,
}

impl Search<'_> {
    /// Score `(s, z)` with `s` as stored; when it is the best so far, its codes go to `u`.
    fn try_one(&mut self, s: f32, z: i32, u: &mut [u8]) {
        let Some(s) = storable(self.ty, s) else { return };
        let (x, w, nmax) = (self.x, self.w, self.nmax);
        let z = z.clamp(0, nmax);
        let better = |e: f64, best: Option<(f64, f32, i32)>| best.is_none_or(|b| e < b.0);
        if x.len() <= self.tmp.len() {
            let t = &mut self.tmp[..x.len()];
            let e = codes_for(x, w, s, z, nmax, t);
            if better(e, self.best) {
                u.copy_from_slice(t);
                self.best = Some((e, s, z));
            }
        } else {
            // Long groups (per channel): score first, write the codes of a winner only.
            let e = score(x, w, s, z, nmax);
            if better(e, self.best) {
                codes_for(x, w, s, z, nmax, u);
                self.best = Some((e, s, z));
            }
        }
    }
}

/// Squared error of `x` quantized with `(s, z)`, codes not kept.
fn score(x: &[f32], w: Option<&[f32]>, s: f32, z: i32, nmax: i32) -> f64 {
    x.iter()
        .enumerate()
        .map(|(j, &x)| {
            let q = (libm::rintf(x / s) as i32 + z).clamp(0, nmax);
            let d = (x - (q - z) as f32 * s) as f64;
            wt(w, j) * d * d
        })
        .sum()
}

/// Pack one row's unsigned codes into little-endian 32-bit words, `32/bits` per word, lowest
/// column in the lowest bits (FORMAT.md §2). `u.len()` must be a whole number of words.
pub fn pack_row(bits: u8, u: &[u8], out: &mut [u32]) {
    let k = 32 / bits as usize;
    for (w, chunk) in out.iter_mut().zip(u.chunks(k)) {
        *w = chunk.iter().enumerate().fold(0u32, |acc, (i, &c)| acc | (c as u32) << (bits as usize * i));
    }
}

/// Pack unsigned zero points `z[r][g]` (`rows × groups`, row-major) down the columns into
/// `[ceil(rows / k), groups]` words (FORMAT.md §3): word `(r / k, g)` holds row `r` at bits
/// `bits · (r % k)`.
pub fn pack_zeros(bits: u8, z: &[u8], rows: usize, groups: usize) -> alloc::vec::Vec<u32> {
    let k = 32 / bits as usize;
    let mut out = alloc::vec![0u32; rows.div_ceil(k) * groups];
    for r in 0..rows {
        for g in 0..groups {
            out[(r / k) * groups + g] |= (z[r * groups + g] as u32) << (bits as usize * (r % k));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    fn dequant(u: &[u8], s: f32, z: i32) -> Vec<f32> {
        u.iter().map(|&u| (u as i32 - z) as f32 * s).collect()
    }

    fn sse(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(a, b)| ((a - b) as f64).powi(2)).sum()
    }

    fn sample(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.45
            })
            .collect()
    }

    #[test]
    fn search_never_worse_than_rtn_and_zero_is_exact() {
        for symmetric in [true, false] {
            for bits in [4u8, 8] {
                for seed in 0..20 {
                    let mut x = sample(32, seed);
                    x[3] = 0.0;
                    let spec = GroupSpec { bits, symmetric, scale: ScaleType::BF16, search: false };
                    let (mut u0, mut u1) = (vec![0u8; 32], vec![0u8; 32]);
                    let (s0, z0) = quantize_group(spec, &x, None, &mut u0);
                    let (s1, z1) = quantize_group(GroupSpec { search: true, ..spec }, &x, None, &mut u1);
                    let (d0, d1) = (dequant(&u0, s0, z0), dequant(&u1, s1, z1));
                    assert!(sse(&x, &d1) <= sse(&x, &d0), "{spec:?} seed {seed}");
                    assert_eq!(d1[3], 0.0);
                    assert_eq!(s1, store_scale(ScaleType::BF16, s1));
                    if symmetric {
                        assert_eq!((z0, z1), (1 << (bits - 1), 1 << (bits - 1)));
                    }
                    let worst = x.iter().zip(&d1).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(worst <= s1 * 1.5, "{worst} vs scale {s1}");
                }
            }
        }
    }

    /// Plain RTN reproduces compressed-tensors' own choice (FORMAT.md §5) where f32 and bf16
    /// division agree: absmax/7.5, and +absmax clamps to code 7.
    #[test]
    fn rtn_is_the_library_rule() {
        let x = [0.75f32, -0.25, 0.0, 0.53];
        let mut u = [0u8; 4];
        let (s, z) = quantize_group(
            GroupSpec { bits: 4, symmetric: true, scale: ScaleType::F32, search: false },
            &x,
            None,
            &mut u,
        );
        assert_eq!((s, z), (0.1, 8));
        assert_eq!(u.map(|u| u as i32 - 8), [7, -2, 0, 5]);
        let (s, z) = quantize_group(
            GroupSpec { bits: 4, symmetric: false, scale: ScaleType::F32, search: false },
            &x,
            None,
            &mut u,
        );
        assert_eq!((s, z), (1.0 / 15.0, 4));
        assert_eq!(u, [15, 0, 4, 12]);
    }

    /// An element weighted far above the others is reproduced more closely than unweighted.
    #[test]
    fn importance_weights_the_error() {
        let x = sample(32, 7);
        let spec = GroupSpec { bits: 4, symmetric: true, scale: ScaleType::F32, search: true };
        let mut w = vec![1e-3f32; 32];
        w[5] = 1.0;
        let (mut u0, mut u1) = (vec![0u8; 32], vec![0u8; 32]);
        let (s0, z0) = quantize_group(spec, &x, None, &mut u0);
        let (s1, z1) = quantize_group(spec, &x, Some(&w), &mut u1);
        let e = |u: &[u8], s: f32, z: i32| (x[5] - (u[5] as i32 - z) as f32 * s).abs();
        assert!(e(&u1, s1, z1) <= e(&u0, s0, z0));
    }

    #[test]
    fn all_zero_group() {
        let mut u = [1u8; 8];
        let (s, z) = quantize_group(
            GroupSpec { bits: 4, symmetric: false, scale: ScaleType::BF16, search: true },
            &[0.0; 8],
            None,
            &mut u,
        );
        assert!(s > 0.0 && dequant(&u, s, z).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn packing_matches_format_md() {
        // FORMAT.md §2: q = 6,-5,1,-6,4,3,2,-4 is the word 0x4abc293e.
        let u: Vec<u8> = [6i32, -5, 1, -6, 4, 3, 2, -4].iter().map(|q| (q + 8) as u8).collect();
        let mut w = [0u32];
        pack_row(4, &u, &mut w);
        assert_eq!(w[0], 0x4abc_293e);
        // §3: zp rows 0..8 of group 0 = -1,0,-1,-1,-2,0,0,-2 is 0x68867787 (2 groups, group 1 zeros).
        let z: Vec<u8> = [-1i32, 0, -1, -1, -2, 0, 0, -2].iter().flat_map(|q| [(q + 8) as u8, 8]).collect();
        assert_eq!(pack_zeros(4, &z, 8, 2), [0x6886_7787, 0x8888_8888]);
    }
}

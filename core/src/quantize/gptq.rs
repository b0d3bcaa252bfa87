//! GPTQ (Frantar et al., 2022): quantize a row column by column and spread each column's
//! rounding error over the columns not yet quantized, through the inverse of the layer's input
//! Hessian `H = Σ x·xᵀ` (from calibration tokens), so that the layer's *outputs* on such inputs
//! move least, not each weight. Rows are independent given the factor, so they run in parallel
//! like plain rounding, and the codes, scales and zero points are the same compressed-tensors
//! fields: a reader cannot tell, except by the smaller error.
//!
//! The factor is `U` upper-triangular with `Uᵀ·U = (H + λ·I)⁻¹` (the Cholesky factor of the
//! inverse the paper walks), computed in f64 as the inverse of the "reversed" Cholesky factor
//! `R` of `H = R·Rᵀ` (`R` upper), which needs no explicit inverse of `H`.

use alloc::vec;
use alloc::vec::Vec;

use super::rtn::{self, GroupSpec};

/// `Σ x·xᵀ` over the calibration rows one linear layer saw (its input columns).
#[derive(Clone, Debug)]
pub struct Hessian {
    pub cols: usize,
    /// Rows added.
    pub tokens: usize,
    /// Upper triangle, row-major `cols × cols` (the lower half is unused).
    h: Vec<f32>,
}

impl Hessian {
    pub fn new(cols: usize) -> Hessian {
        Hessian { cols, tokens: 0, h: vec![0.0; cols * cols] }
    }

    /// Add rows of `cols` values each (`x.len()` a multiple of `cols`).
    pub fn add(&mut self, x: &[f32]) {
        let n = self.cols;
        for row in x.chunks_exact(n) {
            for (i, &xi) in row.iter().enumerate() {
                if xi == 0.0 {
                    continue;
                }
                let hr = &mut self.h[i * n + i..(i + 1) * n];
                hr.iter_mut().zip(&row[i..]).for_each(|(h, &xj)| *h += xi * xj);
            }
            self.tokens += 1;
        }
    }

    /// The diagonal: each column's summed squared activation (an importance matrix).
    pub fn diag(&self) -> Vec<f32> {
        (0..self.cols).map(|i| self.h[i * self.cols + i]).collect()
    }

    /// Columns in decreasing order of their diagonal (GPTQ's "activation order").
    pub fn act_order(&self) -> Vec<usize> {
        let d = self.diag();
        let mut p: Vec<usize> = (0..self.cols).collect();
        p.sort_by(|&a, &b| d[b].total_cmp(&d[a]).then(a.cmp(&b)));
        p
    }

    /// `U` (row-major `cols × cols`, upper) with `Uᵀ·U = (H + λ·I)⁻¹`, `λ = damp · mean(diag)`,
    /// `H`'s rows and columns taken in `order` (`order[i]` is the original column at position
    /// `i`); a column no token reached gets `H_ii = 1`. `None` when `H + λ·I` is not positive
    /// definite (a larger `damp` helps).
    pub fn factor(&self, damp: f64, order: &[usize]) -> Option<Vec<f32>> {
        let n = self.cols;
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in i..n {
                let (p, q) = (order[i], order[j]);
                let v = self.h[p.min(q) * n + p.max(q)] as f64;
                a[i * n + j] = v;
                a[j * n + i] = v;
            }
        }
        let mean = (0..n).map(|i| a[i * n + i]).sum::<f64>() / n.max(1) as f64;
        let lambda = damp * if mean > 0.0 { mean } else { 1.0 };
        for i in 0..n {
            if a[i * n + i] == 0.0 {
                a[i * n + i] = 1.0;
            }
            a[i * n + i] += lambda;
        }
        // R upper with A = R·Rᵀ: columns from the last, R[i][j] for i <= j, in place of A's
        // upper half (A's lower half still holds A).
        let mut r = vec![0f64; n * n];
        for j in (0..n).rev() {
            let tail_j = &r[j * n + j + 1..(j + 1) * n];
            let s = a[j * n + j] - tail_j.iter().map(|v| v * v).sum::<f64>();
            if !(s > 0.0 && s.is_finite()) {
                return None;
            }
            let d = s.sqrt();
            let (before, from_j) = r.split_at_mut(j * n);
            let tail_j = &from_j[j + 1..n];
            for i in 0..j {
                let row_i = &before[i * n..(i + 1) * n];
                let dot: f64 = row_i[j + 1..].iter().zip(tail_j).map(|(a, b)| a * b).sum();
                before[i * n + j] = (a[j * n + i] - dot) / d;
            }
            from_j[j] = d;
        }
        // U = R⁻¹ (upper), rows from the last: U[i] = −(Σ_{k>i} R[i][k]·U[k]) / R[i][i], U[i][i] = 1/R[i][i].
        let mut u = vec![0f64; n * n];
        let mut acc = vec![0f64; n];
        for i in (0..n).rev() {
            acc[i..].iter_mut().for_each(|v| *v = 0.0);
            for k in i + 1..n {
                let rik = r[i * n + k];
                if rik != 0.0 {
                    let uk = &u[k * n + k..(k + 1) * n];
                    acc[k..].iter_mut().zip(uk).for_each(|(a, &b)| *a += rik * b);
                }
            }
            let rii = r[i * n + i];
            u[i * n + i] = 1.0 / rii;
            for j in i + 1..n {
                u[i * n + j] = -acc[j] / rii;
            }
        }
        let out: Vec<f32> = u.iter().map(|&v| v as f32).collect();
        out.iter().all(|v| v.is_finite()).then_some(out)
    }
}

/// Quantize one row `w` (`cols` values) in groups of `group` columns with the factor `u` of
/// [`Hessian::factor`] in `order`. Static groups: every group's scale (and zero point) is
/// chosen first by [`rtn::quantize_group`] on the values as given (with `importance` weighting
/// its search), so groups stay contiguous in the file; then the columns are walked in `order`,
/// each rounded with its group's scale and its error, divided by `U[i][i]`, taken off the later
/// columns along `U[i]`. Writes the unsigned codes to `codes` and each group's scale and
/// unsigned zero point.
#[allow(clippy::too_many_arguments)]
pub fn quantize_row(
    spec: GroupSpec,
    group: usize,
    u: &[f32],
    w: &[f32],
    importance: Option<&[f32]>,
    codes: &mut [u8],
    scales: &mut [f32],
    zeros: &mut [u8],
    order: &[usize],
) {
    let n = w.len();
    let nmax = (1i32 << spec.bits) - 1;
    for (g, (s_out, z_out)) in scales.iter_mut().zip(zeros.iter_mut()).enumerate() {
        let cols = g * group..(g + 1) * group;
        let imp = importance.map(|i| &i[cols.clone()]);
        let (s, z) = rtn::quantize_group(spec, &w[cols.clone()], imp, &mut codes[cols]);
        *s_out = s;
        *z_out = z as u8;
    }
    // The row in walking order, updated as the walk goes.
    let mut wp: Vec<f32> = order.iter().map(|&j| w[j]).collect();
    for (i, &j) in order.iter().enumerate() {
        let (s, z) = (scales[j / group], zeros[j / group] as i32);
        // The same rounding as `rtn` (division by the stored scale), on the updated value.
        let q = (libm::rintf(wp[i] / s) as i32 + z).clamp(0, nmax);
        codes[j] = q as u8;
        let e = (wp[i] - (q - z) as f32 * s) / u[i * n + i];
        if e != 0.0 {
            wp[i + 1..].iter_mut().zip(&u[i * n + i + 1..(i + 1) * n]).for_each(|(v, &ui)| *v -= e * ui);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use purehw_hal::ScaleType;

    fn rng(seed: &mut u32) -> f32 {
        *seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (*seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    }

    /// `Uᵀ·U` is the inverse of `H + λI`: `(H + λI)·Uᵀ·U = I`.
    #[test]
    fn factor_inverts_the_damped_hessian() {
        let (n, mut seed) = (13, 5u32);
        let mut h = Hessian::new(n);
        let x: Vec<f32> = (0..40 * n).map(|_| rng(&mut seed)).collect();
        h.add(&x);
        assert_eq!(h.tokens, 40);
        let order: Vec<usize> = (0..n).collect();
        let u = h.factor(0.01, &order).unwrap();
        let mean = h.diag().iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let full = |i: usize, j: usize| {
            let v = h.h[i.min(j) * n + i.max(j)] as f64;
            v + if i == j { 0.01 * mean } else { 0.0 }
        };
        for i in 0..n {
            for j in 0..i {
                assert_eq!(u[i * n + j], 0.0);
            }
        }
        for i in 0..n {
            for j in 0..n {
                // (H·Uᵀ·U)[i][j]
                let mut v = 0f64;
                for k in 0..n {
                    let utu: f64 = (0..n).map(|m| u[m * n + k] as f64 * u[m * n + j] as f64).sum();
                    v += full(i, k) * utu;
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-4, "[{i}][{j}] = {v}");
            }
        }
    }

    /// On correlated inputs GPTQ's output error `Σ (x·(w − ŵ))²` is below plain rounding's.
    #[test]
    fn output_error_below_round_to_nearest() {
        let (n, rows, mut seed) = (64, 16, 9u32);
        let mut h = Hessian::new(n);
        let mut xs = Vec::new();
        for _ in 0..400 {
            let base = rng(&mut seed);
            let x: Vec<f32> = (0..n).map(|_| base + 0.3 * rng(&mut seed)).collect();
            h.add(&x);
            xs.push(x);
        }
        let order = h.act_order();
        let u = h.factor(0.01, &order).unwrap();
        let spec = GroupSpec { bits: 4, symmetric: true, scale: ScaleType::F32, search: false };
        let (mut e_rtn, mut e_gptq) = (0f64, 0f64);
        for _ in 0..rows {
            let w: Vec<f32> = (0..n).map(|_| rng(&mut seed)).collect();
            let deq = |c: &[u8], s: &[f32], z: &[u8]| -> Vec<f32> {
                (0..n).map(|j| (c[j] as i32 - z[j / 32] as i32) as f32 * s[j / 32]).collect()
            };
            let (mut c, mut s, mut z) = (vec![0u8; n], vec![0f32; 2], vec![0u8; 2]);
            for g in 0..2 {
                let (sg, zg) = rtn::quantize_group(spec, &w[g * 32..(g + 1) * 32], None, &mut c[g * 32..(g + 1) * 32]);
                s[g] = sg;
                z[g] = zg as u8;
            }
            let d_rtn = deq(&c, &s, &z);
            quantize_row(spec, 32, &u, &w, None, &mut c, &mut s, &mut z, &order);
            let d_gptq = deq(&c, &s, &z);
            for x in &xs {
                let err = |d: &[f32]| x.iter().zip(&w).zip(d).map(|((x, w), d)| (x * (w - d)) as f64).sum::<f64>();
                e_rtn += err(&d_rtn).powi(2);
                e_gptq += err(&d_gptq).powi(2);
            }
        }
        assert!(e_gptq < 0.7 * e_rtn, "gptq {e_gptq} vs rtn {e_rtn}");
    }
}

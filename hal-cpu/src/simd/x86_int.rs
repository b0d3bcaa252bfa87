//! AVX2 twin of `purehw_kernels::quant::dequantize_int_row` (the compressed-tensors formats),
//! bit-exact: each element is the same exact integer `code − zp`, converted exactly and
//! multiplied by the same widened scale (one rounding), 8 elements a vector.
//!
//! `unsafe` is allowed in this module because the `core::arch` loads take raw pointers and the
//! `#[target_feature]` entry point may only run once AVX2 is confirmed; every `unsafe` block says
//! why it is sound.
#![allow(unsafe_code)]

use core::arch::x86_64::*;

use purehw_kernels::quant::{
    Codes, IntRow, LANES, PackedInt, code, dequantize_int_row, dot_int_row, reduce_lanes, zero_point,
};

/// `dequantize_int_row(p, w, out)`, bit for bit (8 elements at a time through `eight`).
pub(super) fn dequant_int(p: PackedInt, w: IntRow<'_>, out: &mut [f32]) {
    let cols = out.len();
    let groups = p.groups(cols);
    let code_bytes = match (p.codes, p.bits) {
        (Codes::Packed, 4) => cols.div_ceil(2),
        _ => cols,
    };
    let fits = p.is_valid()
        && groups.is_some_and(|g| g.checked_mul(p.scale.bytes()).is_some_and(|b| b <= w.scales.len()))
        && code_bytes <= w.codes.len();
    if !super::x86_f32::available() || !fits {
        // The reference is the definition (and treats short input its own way).
        return dequantize_int_row(p, w, out);
    }
    // SAFETY: `available()` confirmed AVX2 on this CPU; the code bytes the vector loads read were
    // checked to lie inside `w.codes` just above, and every other access is bounds-checked.
    unsafe { dequant_avx2(p, w, groups.unwrap_or(1), out) }
}

/// `out[i] = dot_int_row(p, rows[i], x)` for every row, bit for bit: four rows at a time, each
/// row's 8-lane chain `dot_f32`'s (`acc = acc + w·x`, no fused multiply-add) on its elements as
/// `dequant_int` makes them, four independent chains in flight.
pub(super) fn dot_int(p: PackedInt, rows: &[IntRow<'_>], x: &[f32], out: &mut [f32]) {
    let cols = x.len();
    let group = p.group.unwrap_or(cols);
    let code_bytes = match (p.codes, p.bits) {
        (Codes::Packed, 4) => cols / 2,
        _ => cols,
    };
    let sb = p.groups(cols).and_then(|g| g.checked_mul(p.scale.bytes()));
    let fits = p.is_valid()
        && cols.is_multiple_of(LANES)
        && group > 0
        && group.is_multiple_of(LANES)
        && sb.is_some_and(|sb| rows.iter().all(|r| r.codes.len() >= code_bytes && r.scales.len() >= sb))
        && out.len() >= rows.len();
    if !super::x86_f32::available() || !fits {
        for (o, r) in out.iter_mut().zip(rows) {
            *o = dot_int_row(p, *r, x);
        }
        return;
    }
    let mut i = 0;
    while i + 4 <= rows.len() {
        // SAFETY: `available()` confirmed AVX2, FMA and F16C; the rows' code and scale lengths
        // were checked above for every vector load.
        unsafe { dot4_avx2(p, [rows[i], rows[i + 1], rows[i + 2], rows[i + 3]], x, &mut out[i..i + 4]) };
        i += 4;
    }
    for (o, r) in out[i..rows.len()].iter_mut().zip(&rows[i..]) {
        *o = dot_int_row(p, *r, x);
    }
}

/// Elements `j..j + 8` of a row's codes (`j` even at 4 bits), each `(code − zp)·scale` with
/// `off` from [`offset`]: `dequantize_int_row`'s values. Out-of-range codes panic (sliced).
///
/// # Safety
/// The CPU must support AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn eight(p: PackedInt, codes: &[u8], j: usize, off: __m256i, scale: __m256) -> __m256 {
    let u = match (p.codes, p.bits) {
        (Codes::Packed, 4) => {
            let b = &codes[j / 2..j / 2 + 4];
            let word = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i32;
            let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
            _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), _mm256_set1_epi32(0x0F))
        }
        (codes_kind, _) => {
            let b = &codes[j..j + 8];
            // SAFETY: `b` is 8 readable bytes (sliced just above).
            let raw = unsafe { _mm_loadl_epi64(b.as_ptr().cast()) };
            if codes_kind == Codes::I8 { _mm256_cvtepi8_epi32(raw) } else { _mm256_cvtepu8_epi32(raw) }
        }
    };
    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(u, off)), scale)
}

/// The code offset (`8 + zp`, `128 + zp` or `zp`) `eight` subtracts.
fn offset(p: PackedInt, zp: i32) -> i32 {
    match (p.codes, p.bits) {
        (Codes::Packed, 4) => 8 + zp,
        (Codes::Packed, _) => 128 + zp,
        (Codes::I8, _) => zp,
    }
}

/// # Safety
/// AVX2, FMA and F16C; `cols` and the group a multiple of 8; every row's codes and scales long
/// enough (checked by `dot_int`).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_avx2(p: PackedInt, rows: [IntRow<'_>; 4], x: &[f32], out: &mut [f32]) {
    let cols = x.len();
    let group = p.group.unwrap_or(cols);
    let groups = cols / group;
    let mut acc = [_mm256_setzero_ps(); 4];
    for g in 0..groups {
        let mut off = [_mm256_setzero_si256(); 4];
        let mut sc = [_mm256_setzero_ps(); 4];
        for (r, row) in rows.iter().enumerate() {
            sc[r] = _mm256_set1_ps(p.scale.read(row.scales, g));
            off[r] = _mm256_set1_epi32(offset(p, zero_point(p, row.zeros, groups, row.row, g)));
        }
        for j in (g * group..(g + 1) * group).step_by(LANES) {
            let xs = &x[j..j + LANES];
            // SAFETY: `xs` is 8 readable f32.
            let xv = unsafe { _mm256_loadu_ps(xs.as_ptr()) };
            for r in 0..4 {
                // SAFETY: AVX2 confirmed; `j + 8 <= cols` codes lie inside the row (checked).
                let w = unsafe { eight(p, rows[r].codes, j, off[r], sc[r]) };
                acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(w, xv));
            }
        }
    }
    for r in 0..4 {
        let mut lanes = [0f32; LANES];
        // SAFETY: `lanes` is 8 writable f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]) };
        out[r] = reduce_lanes(&lanes);
    }
}

#[target_feature(enable = "avx2")]
unsafe fn dequant_avx2(p: PackedInt, w: IntRow<'_>, groups: usize, out: &mut [f32]) {
    let cols = out.len();
    let group = p.group.unwrap_or(cols).max(1);
    for g in 0..groups {
        let scale = p.scale.read(w.scales, g);
        let zp = zero_point(p, w.zeros, groups, w.row, g);
        let (vs, off, end) = (_mm256_set1_ps(scale), _mm256_set1_epi32(offset(p, zp)), (g + 1) * group);
        // Groups start on whole words (8 codes at 4 bits), so `j` is even where `eight` needs it.
        let mut j = g * group;
        while j + 8 <= end {
            // SAFETY: AVX2 confirmed by the caller; `eight` and the store slice their ranges.
            unsafe { _mm256_storeu_ps(out[j..j + 8].as_mut_ptr(), eight(p, w.codes, j, off, vs)) };
            j += 8;
        }
        // A group's last few columns (not a whole vector), as the reference computes them.
        for (i, o) in out[j..end].iter_mut().enumerate() {
            *o = (code(p, w.codes, j + i) - zp) as f32 * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use purehw_kernels::quant::ScaleType;
    use purehw_kernels::testing::{Rng, random_int_weight};

    use super::*;

    /// The rows of a weight made by `random_int_weight`.
    fn int_rows<'a>(
        p: PackedInt,
        (c, s, z): (&'a [u8], &'a [u8], &'a [u8]),
        rows: usize,
        cols: usize,
    ) -> Vec<IntRow<'a>> {
        let (rb, sb) = (c.len() / rows, p.scale_bytes(1, cols).unwrap());
        (0..rows)
            .map(|r| IntRow { codes: &c[r * rb..(r + 1) * rb], scales: &s[r * sb..(r + 1) * sb], zeros: z, row: r })
            .collect()
    }

    #[test]
    fn dot_matches_the_reference_bitwise() {
        if !super::super::x86_f32::available() {
            return;
        }
        let mut rng = Rng(12);
        for (bits, codes) in [(4u8, Codes::Packed), (8, Codes::Packed), (8, Codes::I8)] {
            for group in [None, Some(8), Some(32), Some(128), Some(4)] {
                for symmetric in [true, false] {
                    let p = PackedInt { bits, codes, group, symmetric, scale: ScaleType::BF16 };
                    for cols in [8usize, 40, 256, 264, 1000, 12] {
                        if !p.is_valid() || p.groups(cols).is_none() {
                            continue;
                        }
                        let rows = 11;
                        let (c, s, z) = random_int_weight(&mut rng, p, rows, cols);
                        let x: Vec<f32> = (0..cols).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
                        let rs = int_rows(p, (&c, &s, &z), rows, cols);
                        let mut got = vec![0f32; rows];
                        dot_int(p, &rs, &x, &mut got);
                        for (r, g) in got.iter().enumerate() {
                            assert_eq!(g.to_bits(), dot_int_row(p, rs[r], &x).to_bits(), "{p:?} cols {cols} row {r}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matches_the_reference_bitwise() {
        if !super::super::x86_f32::available() {
            return;
        }
        let mut rng = Rng(11);
        for (bits, codes) in [(4u8, Codes::Packed), (8, Codes::Packed), (8, Codes::I8)] {
            for group in [None, Some(8), Some(32), Some(128)] {
                for symmetric in [true, false] {
                    for scale in [ScaleType::F32, ScaleType::F16, ScaleType::BF16] {
                        let p = PackedInt { bits, codes, group, symmetric, scale };
                        for cols in [8usize, 40, 72, 256, 264, 1000] {
                            if !p.is_valid() || p.groups(cols).is_none() {
                                continue;
                            }
                            let rows = 9;
                            let (c, s, z) = random_int_weight(&mut rng, p, rows, cols);
                            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
                            for w in int_rows(p, (&c, &s, &z), rows, cols) {
                                let r = w.row;
                                dequantize_int_row(p, w, &mut a);
                                dequant_int(p, w, &mut b);
                                let (ab, bb): (Vec<u32>, Vec<u32>) =
                                    (a.iter().map(|v| v.to_bits()).collect(), b.iter().map(|v| v.to_bits()).collect());
                                assert_eq!(ab, bb, "{p:?} cols {cols} row {r}");
                            }
                        }
                    }
                }
            }
        }
    }
}

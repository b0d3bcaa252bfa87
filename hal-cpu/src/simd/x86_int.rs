//! AVX2 twin of `purehw_kernels::quant::dequantize_int_row` (the compressed-tensors formats),
//! bit-exact: each element is the same exact integer `code − zp`, converted exactly and
//! multiplied by the same widened scale (one rounding), 8 elements a vector.
//!
//! `unsafe` is allowed in this module because the `core::arch` loads take raw pointers and the
//! `#[target_feature]` entry point may only run once AVX2 is confirmed; every `unsafe` block says
//! why it is sound.
#![allow(unsafe_code)]

use core::arch::x86_64::*;

use purehw_kernels::quant::{Codes, IntRow, PackedInt, code, dequantize_int_row, zero_point};

/// `dequantize_int_row(p, w, out)`, bit for bit.
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

#[target_feature(enable = "avx2")]
unsafe fn dequant_avx2(p: PackedInt, w: IntRow<'_>, groups: usize, out: &mut [f32]) {
    let cols = out.len();
    let group = p.group.unwrap_or(cols).max(1);
    let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    let nib = _mm256_set1_epi32(0x0F);
    for g in 0..groups {
        let scale = p.scale.read(w.scales, g);
        let zp = zero_point(p, w.zeros, groups, w.row, g);
        let (vs, start, end) = (_mm256_set1_ps(scale), g * group, (g + 1) * group);
        let mut j = start;
        match (p.codes, p.bits) {
            (Codes::Packed, 4) => {
                // Groups start on whole words (8 codes), so `j` is always even here.
                let off = _mm256_set1_epi32(8 + zp);
                while j + 8 <= end {
                    let b = &w.codes[j / 2..j / 2 + 4];
                    let word = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i32;
                    let u = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), nib);
                    let v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(u, off)), vs);
                    // SAFETY: `out[j..j + 8]` is 8 writable f32 (sliced, so bounds-checked).
                    unsafe { _mm256_storeu_ps(out[j..j + 8].as_mut_ptr(), v) };
                    j += 8;
                }
            }
            (codes, _) => {
                let signed = codes == Codes::I8;
                let off = _mm256_set1_epi32(if signed { zp } else { 128 + zp });
                while j + 8 <= end {
                    let b = &w.codes[j..j + 8];
                    // SAFETY: `b` is 8 readable bytes (sliced just above).
                    let raw = unsafe { _mm_loadl_epi64(b.as_ptr().cast()) };
                    let u = if signed { _mm256_cvtepi8_epi32(raw) } else { _mm256_cvtepu8_epi32(raw) };
                    let v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(u, off)), vs);
                    // SAFETY: `out[j..j + 8]` is 8 writable f32 (sliced, so bounds-checked).
                    unsafe { _mm256_storeu_ps(out[j..j + 8].as_mut_ptr(), v) };
                    j += 8;
                }
            }
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
                            let sb = p.scale_bytes(1, cols).unwrap();
                            let rb = c.len() / rows;
                            for r in 0..rows {
                                let w = IntRow {
                                    codes: &c[r * rb..(r + 1) * rb],
                                    scales: &s[r * sb..(r + 1) * sb],
                                    zeros: &z,
                                    row: r,
                                };
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

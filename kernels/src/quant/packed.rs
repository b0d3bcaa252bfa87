//! Integer weights whose codes, scales and zero points are separate tensors, as the
//! compressed-tensors library writes them (`pack-quantized`, `int-quantized`; layout as observed in
//! `shared/fixtures/compressed-tensors/FORMAT.md`, packer `compressed_tensors.compressors.
//! pack_quantized` / `unpack_from_int32`).
//!
//! A `[rows, cols]` weight is three byte ranges:
//!
//! * **codes**, row-major, one row after the other:
//!   * [`Codes::Packed`]: `32/bits` codes per little-endian 32-bit word, the lowest bits holding
//!     the lowest column; each field holds `q + 2^(bits-1)` (int4: `q+8` in 0..16, int8: `q+128`).
//!     In bytes: int4 byte `i` holds column `2i` (low nibble) and `2i+1` (high nibble); int8
//!     byte `i` is column `i`.
//!   * [`Codes::I8`]: one two's-complement `i8` per column (`int-quantized`).
//! * **scales**, `[rows, groups]` in [`ScaleType`] (`groups = cols / group`, 1 per channel).
//! * **zero points** (asymmetric only), `[ceil(rows / k), groups]` 32-bit words with `k = 32/bits`,
//!   packed *down the columns*: word `(r / k, g)` holds row `r` at bits `bits·(r % k)`, stored as
//!   `zp + 2^(bits-1)`.
//!
//! The value is `W[r, c] = (q − zp) · scale` with `q − zp` an exact integer, converted to f32, and
//! the scale widened to f32 (FORMAT.md §4's exact form; for bf16/f16 scales the product is exact
//! in f32). The library itself multiplies in the scale's dtype (rounding each product to bf16);
//! the reference logits, and so this definition, use the exact form.

use half::f16;

use super::{LANES, dot_f32_acc, reduce_lanes};

/// The element type of the scales.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ScaleType {
    F32,
    F16,
    BF16,
}

impl ScaleType {
    /// Bytes per scale.
    pub const fn bytes(self) -> usize {
        match self {
            ScaleType::F32 => 4,
            ScaleType::F16 | ScaleType::BF16 => 2,
        }
    }

    /// Scale `i` of `s` widened to f32 (0 past the end: a caller error, never a panic).
    #[inline]
    pub fn read(self, s: &[u8], i: usize) -> f32 {
        let n = self.bytes();
        let Some(b) = s.get(i * n..i * n + n) else { return 0.0 };
        match self {
            ScaleType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            ScaleType::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
            // bf16 is the top half of an f32.
            ScaleType::BF16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
        }
    }
}

/// How the codes are stored.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Codes {
    /// `pack-quantized`: offset codes in little-endian 32-bit words, lowest column in the lowest bits.
    Packed,
    /// `int-quantized`: one two's-complement `i8` per column (`bits == 8`).
    I8,
}

/// A compressed-tensors integer weight format.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct PackedInt {
    /// 4 or 8.
    pub bits: u8,
    pub codes: Codes,
    /// Columns sharing one scale (and zero point); `None`: one per row (channel).
    pub group: Option<usize>,
    /// `false`: a zero-point tensor comes with the scales.
    pub symmetric: bool,
    pub scale: ScaleType,
}

impl PackedInt {
    /// Whether the parameters describe a layout this module defines: 4 or 8 bits (`I8` codes:
    /// 8), a group that is a whole number of code words.
    pub const fn is_valid(self) -> bool {
        let bits_ok = match self.codes {
            Codes::Packed => self.bits == 4 || self.bits == 8,
            Codes::I8 => self.bits == 8,
        };
        let group_ok = match self.group {
            Some(g) => g > 0 && g.is_multiple_of(self.word_elems()),
            None => true,
        };
        bits_ok && group_ok
    }

    /// Codes per stored unit: a 32-bit word (`Packed`) or a byte (`I8`).
    pub const fn word_elems(self) -> usize {
        match self.codes {
            Codes::Packed if self.bits > 0 && self.bits <= 32 => 32 / self.bits as usize,
            Codes::Packed => 1,
            Codes::I8 => 1,
        }
    }

    /// Zero points per 32-bit word (they are always packed, down the columns).
    pub const fn zero_elems(self) -> usize {
        if self.bits > 0 && self.bits <= 32 { 32 / self.bits as usize } else { 1 }
    }

    /// Scale groups in a row of `cols`; `None` when `cols` is not a whole number of groups.
    pub const fn groups(self, cols: usize) -> Option<usize> {
        match self.group {
            None => Some(1),
            Some(0) => None,
            Some(g) if cols.is_multiple_of(g) => Some(cols / g),
            Some(_) => None,
        }
    }

    /// Bytes of the scales of a `[rows, cols]` weight.
    pub fn scale_bytes(self, rows: usize, cols: usize) -> Option<usize> {
        self.groups(cols)?.checked_mul(rows)?.checked_mul(self.scale.bytes())
    }

    /// Bytes of the zero points of a `[rows, cols]` weight (0 when symmetric).
    pub fn zero_bytes(self, rows: usize, cols: usize) -> Option<usize> {
        if self.symmetric {
            return Some(0);
        }
        self.groups(cols)?.checked_mul(rows.div_ceil(self.zero_elems()))?.checked_mul(4)
    }
}

/// One row of a [`PackedInt`] weight: its codes and scales, and the whole zero-point tensor
/// (a row's zero points are not contiguous).
#[derive(Copy, Clone, Debug)]
pub struct IntRow<'a> {
    /// This row's codes.
    pub codes: &'a [u8],
    /// This row's scales.
    pub scales: &'a [u8],
    /// The weight's whole zero-point tensor (empty when symmetric).
    pub zeros: &'a [u8],
    /// The row's index, to find its zero points.
    pub row: usize,
}

/// Code `j` of a row (0 past the end: a caller error, never a panic).
#[inline]
pub fn code(p: PackedInt, codes: &[u8], j: usize) -> i32 {
    match (p.codes, p.bits) {
        (Codes::Packed, 4) => codes.get(j / 2).map_or(0, |&b| ((b >> (4 * (j % 2))) & 0x0F) as i32 - 8),
        (Codes::Packed, _) => codes.get(j).map_or(0, |&b| b as i32 - 128),
        (Codes::I8, _) => codes.get(j).map_or(0, |&b| b as i8 as i32),
    }
}

/// Zero point of `row`, group `g` (0 when symmetric or past the end).
#[inline]
pub fn zero_point(p: PackedInt, zeros: &[u8], groups: usize, row: usize, g: usize) -> i32 {
    if p.symmetric {
        return 0;
    }
    let k = p.zero_elems();
    let field = row % k;
    let byte = ((row / k) * groups + g) * 4 + field * p.bits as usize / 8;
    let Some(&b) = zeros.get(byte) else { return 0 };
    let half = 1i32 << (p.bits - 1);
    match p.bits {
        4 => ((b >> (4 * (field % 2))) & 0x0F) as i32 - half,
        _ => b as i32 - half,
    }
}

/// Elements `start .. start + out.len()` of the row, dequantized.
fn dequantize_range(p: PackedInt, w: IntRow<'_>, cols: usize, start: usize, out: &mut [f32]) {
    let group = p.group.unwrap_or(cols).max(1);
    let groups = p.groups(cols).unwrap_or(1);
    let mut j = start;
    let mut rest = out;
    while !rest.is_empty() {
        let g = j / group;
        let n = (group - j % group).min(rest.len());
        let (o, tail) = rest.split_at_mut(n);
        let scale = p.scale.read(w.scales, g);
        let zp = zero_point(p, w.zeros, groups, w.row, g);
        for (i, o) in o.iter_mut().enumerate() {
            // An exact integer times the widened scale: FORMAT.md §4's exact form.
            *o = (code(p, w.codes, j + i) - zp) as f32 * scale;
        }
        j += n;
        rest = tail;
    }
}

/// Dequantize one row of `out.len()` columns.
pub fn dequantize_int_row(p: PackedInt, w: IntRow<'_>, out: &mut [f32]) {
    let cols = out.len();
    dequantize_range(p, w, cols, 0, out);
}

/// Columns dequantized at a time by [`dot_int_row`]: a multiple of [`LANES`], so every chunk
/// starts on lane 0 as the canonical order requires.
const CHUNK: usize = 256;

/// `Σ w[i]·x[i]` over a row of `x.len()` columns, bit-identical to
/// `dot_f32(dequantize_int_row(row), x)` (chunks are expanded on the stack).
pub fn dot_int_row(p: PackedInt, w: IntRow<'_>, x: &[f32]) -> f32 {
    let cols = x.len();
    let mut acc = [0f32; LANES];
    let mut buf = [0f32; CHUNK];
    for (c, xc) in x.chunks(CHUNK).enumerate() {
        let b = &mut buf[..xc.len()];
        dequantize_range(p, w, cols, c * CHUNK, b);
        dot_f32_acc(&mut acc, b, xc);
    }
    reduce_lanes(&acc)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::quant::dot_f32;
    use crate::testing::{Rng, random_int_weight};

    const INT4: PackedInt =
        PackedInt { bits: 4, codes: Codes::Packed, group: Some(32), symmetric: false, scale: ScaleType::BF16 };

    /// FORMAT.md §2: `packed[0,0] = 0x4abc293e` of the int4 q_proj holds q = 6,-5,1,-6,4,3,2,-4.
    #[test]
    fn int4_bit_order() {
        let codes = 0x4abc_293eu32.to_le_bytes();
        let q: Vec<i32> = (0..8).map(|j| code(INT4, &codes, j)).collect();
        assert_eq!(q, [6, -5, 1, -6, 4, 3, 2, -4]);
    }

    /// FORMAT.md §3: `zp_packed[0,0] = 0x68867787` holds rows 0..8 of group 0: -1,0,-1,-1,-2,0,0,-2.
    #[test]
    fn int4_zero_points_down_the_columns() {
        // Two groups: word (0, 1) is the second word.
        let mut zeros = 0x6886_7787u32.to_le_bytes().to_vec();
        zeros.extend(0x8888_8888u32.to_le_bytes());
        let zp: Vec<i32> = (0..8).map(|r| zero_point(INT4, &zeros, 2, r, 0)).collect();
        assert_eq!(zp, [-1, 0, -1, -1, -2, 0, 0, -2]);
        assert!((0..8).all(|r| zero_point(INT4, &zeros, 2, r, 1) == 0));
    }

    #[test]
    fn int8_codes() {
        let p = PackedInt { bits: 8, codes: Codes::Packed, group: None, symmetric: true, scale: ScaleType::F16 };
        assert_eq!([0u8, 128, 255].map(|b| code(p, &[b], 0)), [-128, 0, 127]);
        let p = PackedInt { codes: Codes::I8, ..p };
        assert_eq!([0u8, 128, 255].map(|b| code(p, &[b], 0)), [0, -128, -1]);
    }

    #[test]
    fn dequantize_by_hand() {
        // Row 1, 16 columns in groups of 8: q = j − 8, scales 0.5 and 2.0, zero points 3 and -1
        // (row 1 is the high nibble of each group's first zero-point byte).
        let p = PackedInt { group: Some(8), ..INT4 };
        let codes: Vec<u8> = (0..8u8).map(|i| (2 * i) | ((2 * i + 1) << 4)).collect(); // u = 0..16
        let scales = [0x3F00u16.to_le_bytes(), 0x4000u16.to_le_bytes()].concat(); // 0.5, 2.0
        let zeros: Vec<u8> = [(3 + 8) << 4, (-1i32 + 8) << 4].iter().flat_map(|w| (*w as u32).to_le_bytes()).collect();
        let w = IntRow { codes: &codes, scales: &scales, zeros: &zeros, row: 1 };
        let mut out = [0f32; 16];
        dequantize_int_row(p, w, &mut out);
        for (j, &v) in out.iter().enumerate() {
            let (s, zp) = if j < 8 { (0.5, 3) } else { (2.0, -1) };
            assert_eq!(v, (j as i32 - 8 - zp) as f32 * s, "column {j}");
        }
    }

    #[test]
    fn dot_matches_dot_of_dequantized_bitwise() {
        let mut rng = Rng(0x1234_5678_9ABC_DEF0);
        for bits in [4u8, 8] {
            for codes in [Codes::Packed, Codes::I8] {
                for group in [None, Some(32), Some(64), Some(128)] {
                    for symmetric in [true, false] {
                        for scale in [ScaleType::BF16, ScaleType::F16, ScaleType::F32] {
                            let p = PackedInt { bits, codes, group, symmetric, scale };
                            if !p.is_valid() {
                                continue;
                            }
                            let (rows, cols) = (3, 384);
                            let (c, s, z) = random_int_weight(&mut rng, p, rows, cols);
                            let rb = cols * bits as usize / 8;
                            let sb = p.scale_bytes(1, cols).unwrap();
                            let x: Vec<f32> = (0..cols).map(|_| rng.unit()).collect();
                            for r in 0..rows {
                                let w = IntRow {
                                    codes: &c[r * rb..(r + 1) * rb],
                                    scales: &s[r * sb..(r + 1) * sb],
                                    zeros: &z,
                                    row: r,
                                };
                                let mut d = vec![0f32; cols];
                                dequantize_int_row(p, w, &mut d);
                                assert!(d.iter().all(|v| v.is_finite()));
                                let want = dot_f32(&d, &x);
                                assert_eq!(dot_int_row(p, w, &x).to_bits(), want.to_bits(), "{p:?}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn short_input_never_panics() {
        let w = IntRow { codes: &[1, 2], scales: &[1], zeros: &[], row: 9 };
        let mut out = [1f32; 70];
        dequantize_int_row(INT4, w, &mut out);
        let _ = dot_int_row(INT4, w, &[1.0; 300]);
    }
}

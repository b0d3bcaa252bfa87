//! Block layouts and their scalar math.
//!
//! Layouts are ggml's (`ggml/src/ggml-common.h`); every field is a byte array, so each struct has
//! alignment 1 and can be cast straight out of a file's bytes. Dequantization repeats gguf-py's
//! `gguf.quants.dequantize` operation by operation in f32 (e.g. Q4_K: `(d·sc)·q − dmin·m`, each
//! product rounded to f32, no fused multiply-add), so results are bit-exact with it.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::{Format, LANES, dot_f32_acc, reduce_lanes};

/// A quantized block of `N` elements.
pub trait Block<const N: usize>: Pod {
    /// The format whose rows are made of these blocks.
    const FORMAT: Format;
    /// Expand the block to f32, bit-exact with gguf-py.
    fn dequantize(&self, out: &mut [f32; N]);

    /// Accumulate `Σ w[i]·x[i]` into `acc` (lane `i % 8`), as [`dot_f32_acc`] would on the
    /// dequantized block.
    #[inline]
    fn dot_acc(&self, acc: &mut [f32; LANES], x: &[f32; N]) {
        let mut w = [0f32; N];
        self.dequantize(&mut w);
        dot_f32_acc(acc, &w, x);
    }
}

#[inline]
fn f16le(b: [u8; 2]) -> f32 {
    f16::from_le_bytes(b).to_f32()
}

/// Elements `j` and `j + 16` of a 5-bit block: the low and high nibble of `b` with bits `j` and
/// `j + 16` of `qh` on top.
#[inline]
fn q5_pair(b: u8, qh: u32, j: usize) -> (u32, u32) {
    let lo = (b & 0x0F) as u32 | ((qh >> j) & 1) << 4;
    let hi = (b >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
    (lo, hi)
}

/// `block_q4_0` (ggml-common.h): 32 weights `d·(q − 8)`, q 4-bit. Byte `j` of `qs` holds
/// element `j` (low nibble) and element `j + 16` (high nibble).
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ4_0 {
    /// Scale, f16.
    pub d: [u8; 2],
    pub qs: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<BlockQ4_0>() == 18);

impl BlockQ4_0 {
    pub fn dequantize(&self, out: &mut [f32; 32]) {
        let d = f16le(self.d);
        for (j, &b) in self.qs.iter().enumerate() {
            out[j] = d * ((b & 0x0F) as i32 - 8) as f32;
            out[j + 16] = d * ((b >> 4) as i32 - 8) as f32;
        }
    }
}

/// `block_q4_1` (ggml-common.h): 32 weights `d·q + m`, q 4-bit, nibbles as in [`BlockQ4_0`].
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ4_1 {
    /// Scale, f16.
    pub d: [u8; 2],
    /// Minimum, f16.
    pub m: [u8; 2],
    pub qs: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<BlockQ4_1>() == 20);

impl BlockQ4_1 {
    pub fn dequantize(&self, out: &mut [f32; 32]) {
        let (d, m) = (f16le(self.d), f16le(self.m));
        for (j, &b) in self.qs.iter().enumerate() {
            out[j] = d * (b & 0x0F) as f32 + m;
            out[j + 16] = d * (b >> 4) as f32 + m;
        }
    }
}

/// `block_q5_0` (ggml-common.h): 32 weights `d·(q − 16)`, q 5-bit: low 4 bits as in
/// [`BlockQ4_0`], bit 4 of element `i` is bit `i` of `qh` (a little-endian u32).
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ5_0 {
    /// Scale, f16.
    pub d: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<BlockQ5_0>() == 22);

impl BlockQ5_0 {
    pub fn dequantize(&self, out: &mut [f32; 32]) {
        let d = f16le(self.d);
        let qh = u32::from_le_bytes(self.qh);
        for (j, &b) in self.qs.iter().enumerate() {
            let (lo, hi) = q5_pair(b, qh, j);
            out[j] = d * (lo as i32 - 16) as f32;
            out[j + 16] = d * (hi as i32 - 16) as f32;
        }
    }
}

/// `block_q5_1` (ggml-common.h): 32 weights `d·q + m`, q 5-bit laid out as in [`BlockQ5_0`].
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ5_1 {
    /// Scale, f16.
    pub d: [u8; 2],
    /// Minimum, f16.
    pub m: [u8; 2],
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<BlockQ5_1>() == 24);

impl BlockQ5_1 {
    pub fn dequantize(&self, out: &mut [f32; 32]) {
        let (d, m) = (f16le(self.d), f16le(self.m));
        let qh = u32::from_le_bytes(self.qh);
        for (j, &b) in self.qs.iter().enumerate() {
            let (lo, hi) = q5_pair(b, qh, j);
            out[j] = d * lo as f32 + m;
            out[j + 16] = d * hi as f32 + m;
        }
    }
}

/// `block_q8_0` (ggml-common.h): 32 weights `q·d`, q signed 8-bit.
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ8_0 {
    /// Scale, f16.
    pub d: [u8; 2],
    pub qs: [i8; 32],
}
const _: () = assert!(core::mem::size_of::<BlockQ8_0>() == 34);

impl BlockQ8_0 {
    pub fn dequantize(&self, out: &mut [f32; 32]) {
        let d = f16le(self.d);
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = q as f32 * d;
        }
    }
}

/// The 8 six-bit (scale, min) pairs of a Q4_K/Q5_K super-block, packed in 12 bytes:
/// pairs 0..4 are the low 6 bits of bytes 0..4 / 4..8; pairs 4..8 take their low 4 bits from
/// bytes 8..12 (scale: low nibble, min: high nibble) and their top 2 bits from the spare top bits
/// of bytes 0..4 / 4..8.
#[inline]
pub(crate) fn scale_min_k4(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// The Q4_K/Q5_K expansion: element `i` of sub-block `g` is `(d·sc[g])·q − dmin·m[g]`, with `q`
/// the nibble of `qs` described at [`BlockQ4K`] plus `high(g, i)` (bit 4; always 0 for Q4_K).
#[inline]
fn dequantize_k4(
    (d, dmin): (f32, f32),
    scales: &[u8; 12],
    qs: &[u8; 128],
    out: &mut [f32; 256],
    high: impl Fn(usize, usize) -> u8,
) {
    let (sc, mn) = scale_min_k4(scales);
    for (g, o) in out.chunks_exact_mut(32).enumerate() {
        let dl = d * sc[g] as f32;
        let ml = dmin * mn[g] as f32;
        let shift = 4 * (g % 2);
        let qs = &qs[32 * (g / 2)..32 * (g / 2) + 32];
        for (i, (o, &b)) in o.iter_mut().zip(qs).enumerate() {
            let q = ((b >> shift) & 0x0F) | high(g, i);
            *o = dl * q as f32 - ml;
        }
    }
}

/// `block_q4_K` (ggml-common.h): 256 weights in 8 sub-blocks of 32, `(d·sc)·q − dmin·m` with
/// 6-bit `sc`, `m` per sub-block and q 4-bit. `qs` is 4 chunks of 32 bytes; chunk `c` holds
/// sub-block `2c` in its low nibbles and `2c + 1` in its high nibbles.
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ4K {
    /// Super-block scale for the sub-block scales, f16.
    pub d: [u8; 2],
    /// Super-block scale for the sub-block mins, f16.
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qs: [u8; 128],
}
const _: () = assert!(core::mem::size_of::<BlockQ4K>() == 144);

impl BlockQ4K {
    pub fn dequantize(&self, out: &mut [f32; 256]) {
        dequantize_k4((f16le(self.d), f16le(self.dmin)), &self.scales, &self.qs, out, |_, _| 0);
    }
}

/// `block_q5_K` (ggml-common.h): as [`BlockQ4K`] with q 5-bit; bit 4 of element `i` of
/// sub-block `g` is bit `g` of `qh[i]`.
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ5K {
    /// Super-block scale for the sub-block scales, f16.
    pub d: [u8; 2],
    /// Super-block scale for the sub-block mins, f16.
    pub dmin: [u8; 2],
    pub scales: [u8; 12],
    pub qh: [u8; 32],
    pub qs: [u8; 128],
}
const _: () = assert!(core::mem::size_of::<BlockQ5K>() == 176);

impl BlockQ5K {
    pub fn dequantize(&self, out: &mut [f32; 256]) {
        let high = |g: usize, i: usize| ((self.qh[i] >> g) & 1) << 4;
        dequantize_k4((f16le(self.d), f16le(self.dmin)), &self.scales, &self.qs, out, high);
    }
}

/// `block_q6_K` (ggml-common.h): 256 weights `(d·sc)·(q − 32)` with a signed 8-bit `sc` per 16
/// weights and q 6-bit. Each half `c` of 128 weights uses `ql[64c..64c+64]` (low nibbles for
/// weights 0..64, high nibbles for 64..128) and `qh[32c..32c+32]` (bits `2s..2s+2` for weights
/// `32s..32s+32`).
#[derive(Copy, Clone, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; 128],
    pub qh: [u8; 64],
    pub scales: [i8; 16],
    /// Super-block scale, f16.
    pub d: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<BlockQ6K>() == 210);

impl BlockQ6K {
    pub fn dequantize(&self, out: &mut [f32; 256]) {
        let d = f16le(self.d);
        // One scale per 16 weights: `dl` is computed once per group.
        for (s, o) in out.chunks_exact_mut(16).enumerate() {
            let dl = d * self.scales[s] as f32;
            for (k, o) in o.iter_mut().enumerate() {
                let e = 16 * s + k;
                let (c, r) = (e / 128, e % 128);
                let lo = (self.ql[64 * c + r % 64] >> (4 * (r / 64))) & 0x0F;
                let hi = (self.qh[32 * c + r % 32] >> (2 * (r / 32))) & 0x03;
                let q = (lo | (hi << 4)) as i32 - 32;
                *o = dl * q as f32;
            }
        }
    }
}

macro_rules! impl_block {
    ($($t:ty => $fmt:ident, $n:literal;)*) => {$(
        impl Block<$n> for $t {
            const FORMAT: Format = Format::$fmt;
            #[inline]
            fn dequantize(&self, out: &mut [f32; $n]) {
                <$t>::dequantize(self, out)
            }
        }
    )*};
}

impl_block! {
    BlockQ4_0 => Q4_0, 32;
    BlockQ4_1 => Q4_1, 32;
    BlockQ5_0 => Q5_0, 32;
    BlockQ5_1 => Q5_1, 32;
    BlockQ8_0 => Q8_0, 32;
    BlockQ4K => Q4_K, 256;
    BlockQ5K => Q5_K, 256;
    BlockQ6K => Q6_K, 256;
}

/// The whole blocks at the start of `row` (a trailing partial block is ignored).
#[inline]
fn blocks_of<B: Pod>(row: &[u8]) -> &[B] {
    let whole = row.len() - row.len() % core::mem::size_of::<B>();
    // Blocks have alignment 1 and `whole` is a multiple of their size: the cast cannot fail.
    bytemuck::try_cast_slice(&row[..whole]).unwrap_or(&[])
}

/// Elements of `out` from `done` on had no stored data (a caller error): they are defined as zero.
#[inline]
fn zero_from(out: &mut [f32], done: usize) {
    if let Some(rest) = out.get_mut(done..) {
        rest.fill(0.0);
    }
}

fn dequantize_blocks<B: Block<N>, const N: usize>(row: &[u8], out: &mut [f32]) {
    let blocks = blocks_of::<B>(row);
    let (chunks, _) = out.as_chunks_mut::<N>();
    let done = N * blocks.len().min(chunks.len());
    for (b, o) in blocks.iter().zip(chunks) {
        b.dequantize(o);
    }
    zero_from(out, done);
}

fn dot_blocks<B: Block<N>, const N: usize>(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (xs, _) = x.as_chunks::<N>();
    for (b, xb) in blocks_of::<B>(row).iter().zip(xs) {
        b.dot_acc(&mut acc, xb);
    }
    reduce_lanes(&acc)
}

/// bf16 is the top half of an f32: widening is a shift, NaN payloads included (as gguf-py does).
#[inline]
fn bf16le(b: [u8; 2]) -> f32 {
    f32::from_bits((u16::from_le_bytes(b) as u32) << 16)
}

fn dequantize_plain<const S: usize>(row: &[u8], out: &mut [f32], conv: fn([u8; S]) -> f32) {
    let (elems, _) = row.as_chunks::<S>();
    for (o, &e) in out.iter_mut().zip(elems) {
        *o = conv(e);
    }
    zero_from(out, elems.len());
}

/// Plain floats are widened 256 at a time into a stack buffer; 256 is a multiple of [`LANES`],
/// so every chunk starts on lane 0 as the canonical order requires.
const PLAIN_CHUNK: usize = 256;

fn dot_plain<const S: usize>(row: &[u8], x: &[f32], conv: fn([u8; S]) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut buf = [0f32; PLAIN_CHUNK];
    let (elems, _) = row.as_chunks::<S>();
    for (ec, xc) in elems.chunks(PLAIN_CHUNK).zip(x.chunks(PLAIN_CHUNK)) {
        let n = ec.len().min(xc.len());
        for (o, &e) in buf.iter_mut().zip(ec) {
            *o = conv(e);
        }
        dot_f32_acc(&mut acc, &buf[..n], &xc[..n]);
    }
    reduce_lanes(&acc)
}

pub(super) fn dequantize_row(fmt: Format, row: &[u8], out: &mut [f32]) {
    match fmt {
        Format::F32 => dequantize_plain(row, out, f32::from_le_bytes),
        Format::F16 => dequantize_plain(row, out, f16le),
        Format::BF16 => dequantize_plain(row, out, bf16le),
        Format::Q4_0 => dequantize_blocks::<BlockQ4_0, 32>(row, out),
        Format::Q4_1 => dequantize_blocks::<BlockQ4_1, 32>(row, out),
        Format::Q5_0 => dequantize_blocks::<BlockQ5_0, 32>(row, out),
        Format::Q5_1 => dequantize_blocks::<BlockQ5_1, 32>(row, out),
        Format::Q8_0 => dequantize_blocks::<BlockQ8_0, 32>(row, out),
        Format::Q4_K => dequantize_blocks::<BlockQ4K, 256>(row, out),
        Format::Q5_K => dequantize_blocks::<BlockQ5K, 256>(row, out),
        Format::Q6_K => dequantize_blocks::<BlockQ6K, 256>(row, out),
        // Codes without their scales: defined as zero (a caller error).
        Format::Int(_) => out.fill(0.0),
    }
}

pub(super) fn dot_row(fmt: Format, row: &[u8], x: &[f32]) -> f32 {
    match fmt {
        Format::F32 => dot_plain(row, x, f32::from_le_bytes),
        Format::F16 => dot_plain(row, x, f16le),
        Format::BF16 => dot_plain(row, x, bf16le),
        Format::Q4_0 => dot_blocks::<BlockQ4_0, 32>(row, x),
        Format::Q4_1 => dot_blocks::<BlockQ4_1, 32>(row, x),
        Format::Q5_0 => dot_blocks::<BlockQ5_0, 32>(row, x),
        Format::Q5_1 => dot_blocks::<BlockQ5_1, 32>(row, x),
        Format::Q8_0 => dot_blocks::<BlockQ8_0, 32>(row, x),
        Format::Q4_K => dot_blocks::<BlockQ4K, 256>(row, x),
        Format::Q5_K => dot_blocks::<BlockQ5K, 256>(row, x),
        Format::Q6_K => dot_blocks::<BlockQ6K, 256>(row, x),
        Format::Int(_) => 0.0,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::super::{Format, dequantize_row, dot_f32, dot_row};
    use super::*;
    use crate::testing::{Rng, random_row};

    #[test]
    fn dot_row_matches_dot_of_dequantized_bitwise() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for fmt in Format::ALL {
            for blocks in [1usize, 2, 3, 7] {
                let n = if fmt.block_elems() == 1 { blocks * 259 } else { blocks * fmt.block_elems() };
                let row = random_row(&mut rng, fmt, n);
                let x: Vec<f32> = (0..n).map(|_| rng.unit()).collect();
                let mut w = vec![0f32; n];
                dequantize_row(fmt, &row, &mut w);
                assert!(w.iter().all(|v| v.is_finite()), "{fmt:?}");
                let want = dot_f32(&w, &x);
                let got = dot_row(fmt, &row, &x);
                assert_eq!(got.to_bits(), want.to_bits(), "{fmt:?} n={n}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn short_or_mismatched_input_never_panics() {
        for fmt in Format::ALL {
            let row = vec![0x11u8; fmt.block_bytes() * 2 + 1];
            for n in [0usize, 1, 31, 32, 300, 600] {
                let mut out = vec![1f32; n];
                // Exercise release-mode behaviour: the debug_assert in mod.rs is the caller contract.
                super::dequantize_row(fmt, &row, &mut out);
                let x = vec![1f32; n];
                let _ = super::dot_row(fmt, &row, &x);
            }
        }
    }

    const H_HALF: [u8; 2] = 0x3800u16.to_le_bytes(); // 0.5
    const H_ONE: [u8; 2] = 0x3C00u16.to_le_bytes(); // 1.0
    const H_MINUS_ONE: [u8; 2] = 0xBC00u16.to_le_bytes(); // -1.0

    #[test]
    fn q4_0_by_hand() {
        let mut b = BlockQ4_0::zeroed();
        b.d = H_HALF;
        b.qs[0] = 0x1F;
        let mut o = [0f32; 32];
        b.dequantize(&mut o);
        assert_eq!(o[0], 3.5); // (15 - 8) / 2
        assert_eq!(o[16], -3.5); // (1 - 8) / 2
        assert_eq!(o[1], -4.0); // (0 - 8) / 2
    }

    #[test]
    fn q4_1_by_hand() {
        let mut b = BlockQ4_1::zeroed();
        b.d = H_HALF;
        b.m = H_MINUS_ONE;
        b.qs[15] = 0x1F;
        let mut o = [0f32; 32];
        b.dequantize(&mut o);
        assert_eq!(o[15], 6.5); // 15/2 - 1
        assert_eq!(o[31], -0.5); // 1/2 - 1
        assert_eq!(o[0], -1.0);
    }

    #[test]
    fn q5_0_by_hand() {
        let mut b = BlockQ5_0::zeroed();
        b.d = H_HALF;
        b.qh = (1u32 | 1 << 17).to_le_bytes();
        b.qs[0] = 0x1F;
        b.qs[1] = 0x20;
        let mut o = [0f32; 32];
        b.dequantize(&mut o);
        assert_eq!(o[0], 7.5); // (31 - 16) / 2
        assert_eq!(o[16], -7.5); // (1 - 16) / 2
        assert_eq!(o[17], 1.0); // (2 + 16 - 16) / 2
        assert_eq!(o[1], -8.0);
    }

    #[test]
    fn q5_1_by_hand() {
        let mut b = BlockQ5_1::zeroed();
        b.d = H_HALF;
        b.m = H_MINUS_ONE;
        b.qh = (1u32 << 31).to_le_bytes();
        b.qs[15] = 0xF3;
        let mut o = [0f32; 32];
        b.dequantize(&mut o);
        assert_eq!(o[15], 0.5); // 3/2 - 1
        assert_eq!(o[31], 14.5); // 31/2 - 1
    }

    #[test]
    fn q8_0_by_hand() {
        let mut b = BlockQ8_0::zeroed();
        b.d = 0x3400u16.to_le_bytes(); // 0.25
        b.qs[3] = -4;
        b.qs[31] = 127;
        let mut o = [0f32; 32];
        b.dequantize(&mut o);
        assert_eq!(o[3], -1.0);
        assert_eq!(o[31], 31.75);
        assert_eq!(o[0], 0.0);
    }

    /// Scales: sc = [2, 1, .., .., .., 51, ..], mins = [4, 7, .., .., .., 34, ..].
    fn k_scales() -> [u8; 12] {
        let mut s = [0u8; 12];
        s[0] = 2; // sc0
        s[4] = 4; // m0
        s[1] = 0xC1; // sc1 = 1; top bits 3 -> sc5 bits 4..6
        s[5] = 0x87; // m1 = 7; top bits 2 -> m5 bits 4..6
        s[9] = 0x23; // sc5 low = 3, m5 low = 2
        s
    }

    #[test]
    fn k_scale_unpacking() {
        let (sc, mn) = scale_min_k4(&k_scales());
        assert_eq!((sc[0], sc[1], sc[5]), (2, 1, 51));
        assert_eq!((mn[0], mn[1], mn[5]), (4, 7, 34));
    }

    #[test]
    fn q4_k_by_hand() {
        let mut b = BlockQ4K::zeroed();
        b.d = H_ONE;
        b.dmin = H_HALF;
        b.scales = k_scales();
        b.qs[0] = 0x5A;
        b.qs[67] = 0x90;
        let mut o = [0f32; 256];
        b.dequantize(&mut o);
        assert_eq!(o[0], 18.0); // 2·10 − 0.5·4
        assert_eq!(o[32], 1.5); // 1·5 − 0.5·7
        assert_eq!(o[163], 442.0); // 51·9 − 0.5·34  (sub-block 5 = high nibbles of chunk 2)
        assert_eq!(o[131], 0.0); // sub-block 4: sc 0, m 0
    }

    #[test]
    fn q5_k_by_hand() {
        let mut b = BlockQ5K::zeroed();
        b.d = H_ONE;
        b.dmin = H_HALF;
        b.scales = k_scales();
        b.qs[0] = 0x5A;
        b.qs[67] = 0x90;
        b.qh[0] = 1 << 0;
        b.qh[3] = 1 << 5;
        let mut o = [0f32; 256];
        b.dequantize(&mut o);
        assert_eq!(o[0], 50.0); // 2·26 − 2
        assert_eq!(o[32], 1.5); // bit 1 of qh[0] clear
        assert_eq!(o[163], 1258.0); // 51·25 − 17
    }

    #[test]
    fn q6_k_by_hand() {
        let mut b = BlockQ6K::zeroed();
        b.d = H_HALF;
        b.scales[0] = 3;
        b.scales[2] = 1;
        b.scales[4] = 5;
        b.scales[15] = -2;
        b.ql[0] = 0x21;
        b.ql[32] = 0x07;
        b.ql[127] = 0xF0;
        b.qh[0] = 0b1110_0100;
        b.qh[63] = 0xC0;
        let mut o = [0f32; 256];
        b.dequantize(&mut o);
        assert_eq!(o[0], -46.5); // 0.5·3 · (1 − 32)
        assert_eq!(o[32], -4.5); // 0.5·1 · (7 + 16 − 32)
        assert_eq!(o[64], 5.0); // 0.5·5 · (2 + 32 − 32)
        assert_eq!(o[255], -31.0); // 0.5·−2 · (15 + 48 − 32)
    }

    #[test]
    fn plain_formats_by_hand() {
        let mut o = [0f32; 2];
        let f32s: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        dequantize_row(Format::F32, &f32s, &mut o);
        assert_eq!(o, [1.5, -2.0]);
        dequantize_row(Format::F16, &[0x00, 0x3C, 0x00, 0xC0], &mut o);
        assert_eq!(o, [1.0, -2.0]);
        dequantize_row(Format::BF16, &[0x80, 0x3F, 0xC0, 0xBF], &mut o);
        assert_eq!(o, [1.0, -1.5]);
        // NaN payloads survive bf16 widening bit for bit.
        dequantize_row(Format::BF16, &[0x01, 0x7F, 0x00, 0x00], &mut o);
        assert_eq!(o[0].to_bits(), 0x7F01_0000);
    }
}

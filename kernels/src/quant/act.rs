//! Int8 activations and the integer dot products that read them: the reference semantics of
//! `ActQuant::Int8`.
//!
//! With `Int8`, a matmul first quantizes each activation row with [`quantize_q8a`] (blocks of 32,
//! for the 32-element weight formats) or [`quantize_q8k`] (blocks of 256, for the k-quants), then
//! dots every weight row with the integer codes. This trades a little accuracy (as llama.cpp does
//! with its `Q8_0`/`Q8_K` activations) for integer multiply-adds; the functions here define the
//! result bit for bit, so a SIMD twin is checked for equality, not closeness:
//!
//! * Quantization: `amax = max |x|`, `d = amax / 127`, `q = round_ties_even(x · (127 / amax))`
//!   (all zero when `amax == 0`). `round_ties_even` is what `cvtps2dq` / `fcvtns` do.
//! * Integer sums: a block is cut into 32-element chunks; lane `k` (0..8) of a chunk is its
//!   elements `4k..4k+4`. Each lane sums `w_q · a_q` exactly in `i32` (the weight's sub-block
//!   scale, for k-quants, multiplies that lane's chunk sum), which is what `pmaddubsw`+`pmaddwd`
//!   (x86) and `sdot` (NEON) produce per 32-bit lane. Every lane sum is below 2^24, so exact in f32.
//! * Floats, per block: `d = d_w · d_a` once, then `acc[k] += d · (lane[k] as f32)` (no fused
//!   multiply-add); the block's offset term (`Q4_1`/`Q5_1` minimums, k-quant `dmin`) goes into one
//!   scalar accumulator in block order. The row's result is
//!   [`reduce_lanes`](super::reduce_lanes)`(acc)` plus (or, for k-quant mins, minus) that scalar.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::blocks::{
    BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, scale_min_k4,
};
use super::{Format, LANES, reduce_lanes};

/// How a matmul treats its activations.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum ActQuant {
    /// f32 activations against the dequantized weights (`dot_row`).
    #[default]
    F32,
    /// Activations quantized to int8 per block, integer dot products (this module). Float weight
    /// formats ignore it.
    Int8,
}

/// Which quantized-activation layout a weight format's integer dot reads.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ActLayout {
    /// [`BlockQ8A`]: 32 values per block.
    Q8A,
    /// [`BlockQ8K`]: 256 values per block.
    Q8K,
}

impl Format {
    /// The activation layout of this format's integer dot, `None` for float formats.
    pub const fn act_layout(self) -> Option<ActLayout> {
        match self {
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 | Format::Q8_0 => Some(ActLayout::Q8A),
            Format::Q4_K | Format::Q5_K | Format::Q6_K => Some(ActLayout::Q8K),
            // No integer dot is defined for them yet: `Int8` matmuls use f32 activations.
            Format::F32 | Format::F16 | Format::BF16 | Format::Int(_) => None,
        }
    }
}

/// 32 activations as `d · q`.
#[derive(Copy, Clone, Debug, Pod, Zeroable, PartialEq)]
#[repr(C)]
pub struct BlockQ8A {
    pub d: f32,
    /// `Σ q`, for the minimum term of `Q4_1`/`Q5_1`.
    pub sum: i32,
    pub qs: [i8; 32],
}
const _: () = assert!(core::mem::size_of::<BlockQ8A>() == 40);

/// 256 activations as `d · q`.
#[derive(Copy, Clone, Debug, Pod, Zeroable, PartialEq)]
#[repr(C)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; 256],
    /// `Σ q` over each 16 values, for the k-quant minimums.
    pub bsums: [i16; 16],
}
const _: () = assert!(core::mem::size_of::<BlockQ8K>() == 292);

impl Default for BlockQ8A {
    fn default() -> Self {
        Zeroable::zeroed()
    }
}

impl Default for BlockQ8K {
    fn default() -> Self {
        Zeroable::zeroed()
    }
}

/// `(d, 127 / amax)` for a block whose largest magnitude is `amax`; `(0, 0)` for an all-zero block.
#[inline]
pub fn act_scale(amax: f32) -> (f32, f32) {
    if amax > 0.0 { (amax / 127.0, 127.0 / amax) } else { (0.0, 0.0) }
}

/// One code: `round_ties_even(x · id)`, saturated to ±127 (NaN gives 0).
#[inline]
pub fn act_code(x: f32, id: f32) -> i8 {
    libm::rintf(x * id).clamp(-127.0, 127.0) as i8 // rintf: ties to even, as cvtps2dq
}

/// Quantize `xs` into `q` with one scale, returning `d`.
#[inline]
fn quantize_block(xs: &[f32], q: &mut [i8]) -> f32 {
    let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
    let (d, id) = act_scale(amax);
    for (q, &x) in q.iter_mut().zip(xs) {
        *q = act_code(x, id);
    }
    d
}

/// Quantize a row (`x.len() == 32 · out.len()`) into [`BlockQ8A`]s.
pub fn quantize_q8a(x: &[f32], out: &mut [BlockQ8A]) {
    debug_assert_eq!(x.len(), 32 * out.len());
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(32)) {
        b.d = quantize_block(xs, &mut b.qs);
        b.sum = b.qs.iter().map(|&q| q as i32).sum();
    }
}

/// Quantize a row (`x.len() == 256 · out.len()`) into [`BlockQ8K`]s.
pub fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    debug_assert_eq!(x.len(), 256 * out.len());
    for (b, xs) in out.iter_mut().zip(x.chunks_exact(256)) {
        b.d = quantize_block(xs, &mut b.qs);
        for (s, q) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = q.iter().map(|&q| q as i16).sum();
        }
    }
}

#[inline]
fn f16le(b: [u8; 2]) -> f32 {
    f16::from_le_bytes(b).to_f32()
}

/// Lane sums of one 32-element chunk: `lane[k] = Σ_{i in 4k..4k+4} w[i]·a[i]`.
#[inline]
fn chunk_lanes(w: &[i8], a: &[i8]) -> [i32; LANES] {
    let (w, a): (&[i8; 32], &[i8; 32]) = (w.try_into().expect("32 codes"), a.try_into().expect("32 codes"));
    // Products first, then groups of four: the loops vectorize.
    let mut p = [0i32; 32];
    for i in 0..32 {
        p[i] = w[i] as i32 * a[i] as i32;
    }
    let mut lane = [0i32; LANES];
    for (k, l) in lane.iter_mut().enumerate() {
        *l = p[4 * k] + p[4 * k + 1] + p[4 * k + 2] + p[4 * k + 3];
    }
    lane
}

/// `acc[k] += d · lane[k]`.
#[inline]
fn add_lanes(acc: &mut [f32; LANES], d: f32, lane: &[i32; LANES]) {
    for (a, &l) in acc.iter_mut().zip(lane) {
        *a += d * l as f32;
    }
}

/// A 32-element weight block as the integer dot reads it: `w = d·q + m` (`m` 0 for the
/// symmetric formats, whose offset is folded into `q`).
#[derive(Copy, Clone, Debug, Default, PartialEq)]
pub struct Codes32 {
    pub d: f32,
    pub m: f32,
    pub q: [i8; 32],
}

/// The 32 codes of a 4/5-bit legacy block in element order (nibble layout of [`BlockQ4_0`], high
/// bit `j` of `qh` for element `j`), minus `offset`.
#[inline]
fn legacy_codes(qs: &[u8; 16], qh: u32, offset: i32) -> [i8; 32] {
    let mut w = [0i8; 32];
    for j in 0..16 {
        let lo = (qs[j] & 0x0F) as u32 | ((qh >> j) & 1) << 4;
        let hi = (qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        w[j] = (lo as i32 - offset) as i8;
        w[j + 16] = (hi as i32 - offset) as i8;
    }
    w
}

/// Decode a 32-element-block row into [`Codes32`] (`out.len()` = blocks; extra entries untouched).
pub fn decode_q8a_row(fmt: Format, row: &[u8], out: &mut [Codes32]) {
    let mut put = |i: usize, d: f32, m: f32, q: [i8; 32]| {
        if let Some(o) = out.get_mut(i) {
            *o = Codes32 { d, m, q };
        }
    };
    match fmt {
        Format::Q4_0 => blocks::<BlockQ4_0>(row).iter().enumerate().for_each(|(i, b)| {
            put(i, f16le(b.d), 0.0, legacy_codes(&b.qs, 0, 8));
        }),
        Format::Q4_1 => blocks::<BlockQ4_1>(row).iter().enumerate().for_each(|(i, b)| {
            put(i, f16le(b.d), f16le(b.m), legacy_codes(&b.qs, 0, 0));
        }),
        Format::Q5_0 => blocks::<BlockQ5_0>(row).iter().enumerate().for_each(|(i, b)| {
            put(i, f16le(b.d), 0.0, legacy_codes(&b.qs, u32::from_le_bytes(b.qh), 16));
        }),
        Format::Q5_1 => blocks::<BlockQ5_1>(row).iter().enumerate().for_each(|(i, b)| {
            put(i, f16le(b.d), f16le(b.m), legacy_codes(&b.qs, u32::from_le_bytes(b.qh), 0));
        }),
        Format::Q8_0 => blocks::<BlockQ8_0>(row).iter().enumerate().for_each(|(i, b)| {
            put(i, f16le(b.d), 0.0, b.qs);
        }),
        _ => {}
    }
}

/// The integer dot of decoded weight blocks with [`BlockQ8A`] activations (the semantics in
/// the module doc). Blocks pair up to the shorter of the two.
pub fn dot_codes_q8a(w: &[Codes32], act: &[BlockQ8A]) -> f32 {
    let (mut acc, mut offset) = ([0f32; LANES], 0f32);
    for (w, a) in w.iter().zip(act) {
        block_q8a(&mut acc, &mut offset, w, a);
    }
    reduce_lanes(&acc) + offset
}

/// One block of [`dot_codes_q8a`]: `acc[k] += (d_w·d_a)·lane[k]`, `offset += m_w·(d_a·Σa)`.
#[inline]
fn block_q8a(acc: &mut [f32; LANES], offset: &mut f32, w: &Codes32, a: &BlockQ8A) {
    add_lanes(acc, w.d * a.d, &chunk_lanes(&w.q, &a.qs));
    *offset += w.m * (a.d * a.sum as f32);
}

/// Integer dot of a 32-element-block weight row with [`BlockQ8A`] activations
/// (`act.len()` = blocks in the row): [`decode_q8a_row`] then [`dot_codes_q8a`].
/// `fmt.act_layout()` must be `Some(Q8A)`; otherwise 0.
pub fn dot_row_q8a(fmt: Format, row: &[u8], act: &[BlockQ8A]) -> f32 {
    if fmt.act_layout() != Some(ActLayout::Q8A) {
        return 0.0;
    }
    // Block by block (no scratch): the same operations as dot_codes_q8a over the decoded row.
    let bb = fmt.block_bytes();
    let (mut acc, mut offset) = ([0f32; LANES], 0f32);
    let mut c = [Codes32::default()];
    for (i, a) in act.iter().enumerate().take(row.len() / bb) {
        decode_q8a_row(fmt, &row[i * bb..(i + 1) * bb], &mut c);
        block_q8a(&mut acc, &mut offset, &c[0], a);
    }
    reduce_lanes(&acc) + offset
}

/// A k-quant super-block as the integer dot reads it: `w = d·sc[e/16]·q − dmin·mn[e/32]` (Q6_K:
/// `q` already minus 32, no minimums).
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct CodesK {
    pub d: f32,
    pub dmin: f32,
    pub q: [i8; 256],
    /// Scale of each 16 elements.
    pub sc: [i16; 16],
    /// Minimum of each 32 elements.
    pub mn: [i16; 8],
}

impl Default for CodesK {
    fn default() -> Self {
        CodesK { d: 0.0, dmin: 0.0, q: [0; 256], sc: [0; 16], mn: [0; 8] }
    }
}

/// Decode a k-quant row into [`CodesK`] (`out.len()` = super-blocks).
pub fn decode_q8k_row(fmt: Format, row: &[u8], out: &mut [CodesK]) {
    let k4 = |o: &mut CodesK, d: [u8; 2], dmin: [u8; 2], scales: &[u8; 12], qs: &[u8; 128], qh: &[u8; 32]| {
        let (sc, mn) = scale_min_k4(scales);
        o.d = f16le(d);
        o.dmin = f16le(dmin);
        for g in 0..8 {
            o.sc[2 * g] = sc[g] as i16;
            o.sc[2 * g + 1] = sc[g] as i16;
            o.mn[g] = mn[g] as i16;
            let shift = 4 * (g % 2);
            for i in 0..32 {
                let b = qs[32 * (g / 2) + i];
                o.q[32 * g + i] = (((b >> shift) & 0x0F) | (((qh[i] >> g) & 1) << 4)) as i8;
            }
        }
    };
    match fmt {
        Format::Q4_K => blocks::<BlockQ4K>(row).iter().zip(out.iter_mut()).for_each(|(b, o)| {
            k4(o, b.d, b.dmin, &b.scales, &b.qs, &[0; 32]);
        }),
        Format::Q5_K => blocks::<BlockQ5K>(row).iter().zip(out.iter_mut()).for_each(|(b, o)| {
            k4(o, b.d, b.dmin, &b.scales, &b.qs, &b.qh);
        }),
        Format::Q6_K => blocks::<BlockQ6K>(row).iter().zip(out.iter_mut()).for_each(|(b, o)| {
            o.d = f16le(b.d);
            o.dmin = 0.0;
            o.mn = [0; 8];
            for (s, &v) in o.sc.iter_mut().zip(&b.scales) {
                *s = v as i16;
            }
            for e in 0..256 {
                let (h, r) = (e / 128, e % 128);
                let lo = (b.ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0F;
                let hi = (b.qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
                o.q[e] = ((lo | (hi << 4)) as i32 - 32) as i8;
            }
        }),
        _ => {}
    }
}

/// The integer dot of decoded super-blocks with [`BlockQ8K`] activations (module doc): lane `k`
/// of chunk `c` is scaled by `sc[2c + k/4]`; minimums `Σ_g mn[g]·(bsum[2g] + bsum[2g+1])`.
pub fn dot_codes_q8k(w: &[CodesK], act: &[BlockQ8K]) -> f32 {
    let (mut acc, mut mins) = ([0f32; LANES], 0f32);
    for (w, a) in w.iter().zip(act) {
        block_q8k(&mut acc, &mut mins, w, a);
    }
    reduce_lanes(&acc) - mins
}

/// One super-block of [`dot_codes_q8k`].
#[inline]
fn block_q8k(acc: &mut [f32; LANES], mins: &mut f32, w: &CodesK, a: &BlockQ8K) {
    let mut lane = [0i32; LANES];
    for c in 0..8 {
        let l = chunk_lanes(&w.q[32 * c..32 * c + 32], &a.qs[32 * c..32 * c + 32]);
        for k in 0..LANES {
            lane[k] += w.sc[2 * c + k / 4] as i32 * l[k];
        }
    }
    add_lanes(acc, w.d * a.d, &lane);
    let m: i32 = (0..8).map(|g| w.mn[g] as i32 * (a.bsums[2 * g] as i32 + a.bsums[2 * g + 1] as i32)).sum();
    *mins += (w.dmin * a.d) * m as f32;
}

/// Integer dot of a k-quant weight row with [`BlockQ8K`] activations: [`decode_q8k_row`] then
/// [`dot_codes_q8k`]. `fmt.act_layout()` must be `Some(Q8K)`; otherwise 0.
pub fn dot_row_q8k(fmt: Format, row: &[u8], act: &[BlockQ8K]) -> f32 {
    if fmt.act_layout() != Some(ActLayout::Q8K) {
        return 0.0;
    }
    let bb = fmt.block_bytes();
    let (mut acc, mut mins) = ([0f32; LANES], 0f32);
    let mut c = [CodesK::default()];
    for (i, a) in act.iter().enumerate().take(row.len() / bb) {
        decode_q8k_row(fmt, &row[i * bb..(i + 1) * bb], &mut c);
        block_q8k(&mut acc, &mut mins, &c[0], a);
    }
    reduce_lanes(&acc) - mins
}

/// The whole blocks at the start of `row`.
#[inline]
fn blocks<B: Pod>(row: &[u8]) -> &[B] {
    let whole = row.len() - row.len() % core::mem::size_of::<B>();
    bytemuck::try_cast_slice(&row[..whole]).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::quant::{dequantize_row, dot_row};
    use crate::testing::{Rng, random_row};

    #[test]
    fn quantization_round_trips_within_half_a_step() {
        let mut rng = Rng(7);
        let x: Vec<f32> = (0..512).map(|_| rng.unit() * 3.0).collect();
        let mut a = vec![BlockQ8A::default(); 16];
        quantize_q8a(&x, &mut a);
        let mut k = vec![BlockQ8K::default(); 2];
        quantize_q8k(&x, &mut k);
        for (i, &v) in x.iter().enumerate() {
            let b = &a[i / 32];
            assert!((b.d * b.qs[i % 32] as f32 - v).abs() <= b.d * 0.5001);
            let b = &k[i / 256];
            assert!((b.d * b.qs[i % 256] as f32 - v).abs() <= b.d * 0.5001);
        }
        assert_eq!(a[0].sum, a[0].qs.iter().map(|&q| q as i32).sum::<i32>());
        assert_eq!(k[1].bsums[3], k[1].qs[48..64].iter().map(|&q| q as i16).sum::<i16>());
        // Zero blocks stay zero, and the largest magnitude maps to ±127.
        let mut z = [BlockQ8A::default()];
        quantize_q8a(&[0.0; 32], &mut z);
        assert_eq!((z[0].d, z[0].qs), (0.0, [0; 32]));
        assert!(a.iter().all(|b| b.qs.iter().any(|&q| q.abs() == 127)));
    }

    /// Decoding a row once and dotting the codes is the same function as `dot_row_*`.
    #[test]
    fn decoded_codes_give_the_same_bits() {
        let mut rng = Rng(0x77);
        for fmt in Format::ALL {
            let Some(layout) = fmt.act_layout() else { continue };
            let n = 768;
            let row = random_row(&mut rng, fmt, n);
            let x: Vec<f32> = (0..n).map(|_| rng.unit() * 2.0).collect();
            match layout {
                ActLayout::Q8A => {
                    let mut a = vec![BlockQ8A::default(); n / 32];
                    quantize_q8a(&x, &mut a);
                    let mut c = vec![Codes32::default(); n / 32];
                    decode_q8a_row(fmt, &row, &mut c);
                    assert_eq!(dot_codes_q8a(&c, &a).to_bits(), dot_row_q8a(fmt, &row, &a).to_bits(), "{fmt:?}");
                }
                ActLayout::Q8K => {
                    let mut a = vec![BlockQ8K::default(); n / 256];
                    quantize_q8k(&x, &mut a);
                    let mut c = vec![CodesK::default(); n / 256];
                    decode_q8k_row(fmt, &row, &mut c);
                    assert_eq!(dot_codes_q8k(&c, &a).to_bits(), dot_row_q8k(fmt, &row, &a).to_bits(), "{fmt:?}");
                }
            }
        }
    }

    /// The integer dot equals the float dot of the dequantized weights with the dequantized
    /// activations up to float rounding: the semantics above are the same sum, regrouped.
    #[test]
    fn integer_dot_agrees_with_dequantized_dot() {
        let mut rng = Rng(0xABCD);
        for fmt in Format::ALL {
            let Some(layout) = fmt.act_layout() else { continue };
            let n = 512;
            let row = random_row(&mut rng, fmt, n);
            let x: Vec<f32> = (0..n).map(|_| rng.unit()).collect();
            let (got, xq) = match layout {
                ActLayout::Q8A => {
                    let mut a = vec![BlockQ8A::default(); n / 32];
                    quantize_q8a(&x, &mut a);
                    let xq: Vec<f32> = (0..n).map(|i| a[i / 32].d * a[i / 32].qs[i % 32] as f32).collect();
                    (dot_row_q8a(fmt, &row, &a), xq)
                }
                ActLayout::Q8K => {
                    let mut a = vec![BlockQ8K::default(); n / 256];
                    quantize_q8k(&x, &mut a);
                    let xq: Vec<f32> = (0..n).map(|i| a[i / 256].d * a[i / 256].qs[i % 256] as f32).collect();
                    (dot_row_q8k(fmt, &row, &a), xq)
                }
            };
            let want = dot_row(fmt, &row, &xq);
            let mut w = vec![0f32; n];
            dequantize_row(fmt, &row, &mut w);
            let mag: f32 = w.iter().zip(&xq).map(|(a, b)| (a * b).abs()).sum();
            assert!((got - want).abs() <= 1e-5 * mag, "{fmt:?}: {got} vs {want}");
        }
    }
}

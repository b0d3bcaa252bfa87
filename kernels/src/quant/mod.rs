//! Weight storage formats: plain floats, the GGUF block quantizations, and compressed-tensors
//! integer weights ([`PackedInt`], whose scales and zero points are stored apart from the codes:
//! their row math is [`dequantize_int_row`] / [`dot_int_row`]).
//!
//! A matrix is stored row by row (`[rows, cols]`, one output feature per row); a row is a whole
//! number of blocks. For every format the math is:
//!
//! * `dequantize_row(fmt, row, out)` — the exact f32 values gguf-py's `dequantize` produces
//!   (same operation order, so bit-exact).
//! * `dot_row(fmt, row, x)` — `Σ w[i]·x[i]`, defined as `dot_f32(dequantize_row(row), x)`, bit for
//!   bit, without materialising the row (each block is expanded on the stack).
//!
//! `dot_f32` fixes the accumulation order (8 lanes, `i % 8`, combined pairwise) so that results are
//! reproducible and a SIMD twin can match them exactly.

mod act;
mod blocks;
mod packed;
pub use act::*;
pub use blocks::*;
pub use packed::*;

/// How a weight tensor is stored. Block sizes and byte sizes follow ggml (`ggml-common.h`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[allow(non_camel_case_types)]
pub enum Format {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
    /// compressed-tensors integer codes; the row holds the codes only, scales and zero points
    /// are further parts of the weight ([`packed`](self::dequantize_int_row)).
    Int(PackedInt),
}

impl Format {
    /// Every GGUF and float format, for tests and tables ([`Format::Int`] is parameterised and
    /// left out).
    pub const ALL: [Format; 11] = [
        Format::F32,
        Format::F16,
        Format::BF16,
        Format::Q4_0,
        Format::Q4_1,
        Format::Q5_0,
        Format::Q5_1,
        Format::Q8_0,
        Format::Q4_K,
        Format::Q5_K,
        Format::Q6_K,
    ];

    /// Elements per block.
    pub const fn block_elems(self) -> usize {
        match self {
            Format::F32 | Format::F16 | Format::BF16 => 1,
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 | Format::Q8_0 => 32,
            Format::Q4_K | Format::Q5_K | Format::Q6_K => 256,
            // A row is whole groups (of whole code words).
            Format::Int(p) => match p.group {
                Some(g) => g,
                None => p.word_elems(),
            },
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Format::F32 => 4,
            Format::F16 | Format::BF16 => 2,
            Format::Q4_0 => core::mem::size_of::<BlockQ4_0>(),
            Format::Q4_1 => core::mem::size_of::<BlockQ4_1>(),
            Format::Q5_0 => core::mem::size_of::<BlockQ5_0>(),
            Format::Q5_1 => core::mem::size_of::<BlockQ5_1>(),
            Format::Q8_0 => core::mem::size_of::<BlockQ8_0>(),
            Format::Q4_K => core::mem::size_of::<BlockQ4K>(),
            Format::Q5_K => core::mem::size_of::<BlockQ5K>(),
            Format::Q6_K => core::mem::size_of::<BlockQ6K>(),
            Format::Int(p) => self.block_elems() * p.bits as usize / 8,
        }
    }

    /// Bytes of `n` elements, or `None` when `n` is not a whole number of blocks (or overflows).
    pub const fn bytes_for(self, n: usize) -> Option<usize> {
        if let Format::Int(p) = self
            && !p.is_valid()
        {
            return None;
        }
        if self.block_elems() == 0 || !n.is_multiple_of(self.block_elems()) {
            return None;
        }
        (n / self.block_elems()).checked_mul(self.block_bytes())
    }

    /// The name ggml and gguf-py use (`"Q4_K"`, `"BF16"`, …).
    pub const fn name(self) -> &'static str {
        match self {
            Format::F32 => "F32",
            Format::F16 => "F16",
            Format::BF16 => "BF16",
            Format::Q4_0 => "Q4_0",
            Format::Q4_1 => "Q4_1",
            Format::Q5_0 => "Q5_0",
            Format::Q5_1 => "Q5_1",
            Format::Q8_0 => "Q8_0",
            Format::Q4_K => "Q4_K",
            Format::Q5_K => "Q5_K",
            Format::Q6_K => "Q6_K",
            Format::Int(p) => match p.bits {
                4 => "INT4",
                8 => "INT8",
                _ => "INT",
            },
        }
    }
}

/// Number of independent accumulators in [`dot_f32`].
pub const LANES: usize = 8;

/// `Σ a[i]·b[i]` in the canonical order: lane `i % 8` accumulates with `mul_add`-free `acc += a*b`,
/// then lanes combine as `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`. `a.len() == b.len()`.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    dot_f32_acc(&mut acc, a, b);
    reduce_lanes(&acc)
}

/// Accumulate `a·b` into `acc`, lane = index % 8 (index counted from the start of `a`, which must
/// therefore start at a multiple of 8 in the whole row).
#[inline]
pub fn dot_f32_acc(acc: &mut [f32; LANES], a: &[f32], b: &[f32]) {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] += x * y;
    }
}

/// The canonical combination of the 8 lanes.
#[inline]
pub fn reduce_lanes(acc: &[f32; LANES]) -> f32 {
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// Dequantize one row (`row.len() == fmt.bytes_for(out.len())`) into `out`. A [`Format::Int`]
/// row needs its scales: [`dequantize_int_row`]; here it reads as zeros.
pub fn dequantize_row(fmt: Format, row: &[u8], out: &mut [f32]) {
    debug_assert_eq!(Some(row.len()), fmt.bytes_for(out.len()));
    blocks::dequantize_row(fmt, row, out)
}

/// `Σ w[i]·x[i]` for one stored row, bit-identical to `dot_f32(&dequantize_row(row), x)`.
pub fn dot_row(fmt: Format, row: &[u8], x: &[f32]) -> f32 {
    debug_assert_eq!(Some(row.len()), fmt.bytes_for(x.len()));
    blocks::dot_row(fmt, row, x)
}

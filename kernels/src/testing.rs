//! Test data for every crate's tests, written once: one deterministic RNG and random rows of any
//! weight format. Built for this crate's own tests and, in other crates, behind the `testing`
//! feature (enable it in `[dev-dependencies]`). no_std + alloc.

use alloc::vec::Vec;

use half::{bf16, f16};

use crate::Format;
use crate::quant::{PackedInt, ScaleType};

/// xorshift64* (Vigna): reproducible test data without a dependency. The seed must be non-zero.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// One byte, from the high bits (the best ones of xorshift64*).
    pub fn byte(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }

    /// Uniform in [-1, 1): 24 random bits, so every value is exact in f32.
    pub fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }

    /// `n` values uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.unit() * scale).collect()
    }

    /// A random f16 in [-scale, scale), little-endian.
    fn f16(&mut self, scale: f32) -> [u8; 2] {
        f16::from_f32(self.unit() * scale).to_le_bytes()
    }
}

/// The bytes of one random row of `n` elements in `fmt` (`n` a whole number of blocks): floats
/// uniform in [-4, 4) for the float formats; random bytes with small finite f16 scales
/// (|d| < 0.1, Q6_K's < 0.01) for the block formats.
pub fn random_row(rng: &mut Rng, fmt: Format, n: usize) -> Vec<u8> {
    let bytes = fmt.bytes_for(n).expect("a whole number of blocks");
    let mut row: Vec<u8> = (0..bytes).map(|_| rng.byte()).collect();
    match fmt {
        Format::F32 => {
            for c in row.chunks_exact_mut(4) {
                c.copy_from_slice(&(rng.unit() * 4.0).to_le_bytes());
            }
        }
        Format::F16 => {
            for c in row.chunks_exact_mut(2) {
                c.copy_from_slice(&rng.f16(4.0));
            }
        }
        Format::BF16 => {
            for c in row.chunks_exact_mut(2) {
                c.copy_from_slice(&bf16::from_f32(rng.unit() * 4.0).to_le_bytes());
            }
        }
        Format::Q4_0 | Format::Q5_0 | Format::Q8_0 => {
            for c in row.chunks_exact_mut(fmt.block_bytes()) {
                c[0..2].copy_from_slice(&rng.f16(0.1));
            }
        }
        Format::Q4_1 | Format::Q5_1 | Format::Q4_K | Format::Q5_K => {
            for c in row.chunks_exact_mut(fmt.block_bytes()) {
                c[0..2].copy_from_slice(&rng.f16(0.1));
                c[2..4].copy_from_slice(&rng.f16(0.1));
            }
        }
        Format::Q6_K => {
            for c in row.chunks_exact_mut(fmt.block_bytes()) {
                c[208..210].copy_from_slice(&rng.f16(0.01));
            }
        }
        // Random codes (every byte is valid); the scales are apart: [`random_int_weight`].
        Format::Int(_) => {}
    }
    row
}

/// A random `[rows, cols]` weight in `p` as (codes, scales, zero points): random codes and zero
/// points (every bit pattern is valid), finite scales with |s| < 0.1.
pub fn random_int_weight(rng: &mut Rng, p: PackedInt, rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let codes = (0..rows * cols * p.bits as usize / 8).map(|_| rng.byte()).collect();
    let n = p.scale_bytes(rows, cols).expect("whole groups") / p.scale.bytes();
    let scales = (0..n)
        .flat_map(|_| {
            let s = rng.unit() * 0.1;
            match p.scale {
                ScaleType::F32 => s.to_le_bytes().to_vec(),
                ScaleType::F16 => f16::from_f32(s).to_le_bytes().to_vec(),
                ScaleType::BF16 => bf16::from_f32(s).to_le_bytes().to_vec(),
            }
        })
        .collect();
    let zeros = (0..p.zero_bytes(rows, cols).expect("whole groups")).map(|_| rng.byte()).collect();
    (codes, scales, zeros)
}

//! Test data shared by the quant tests: a deterministic RNG and random rows of any format.

extern crate std;
use std::vec::Vec;

use half::f16;

use super::Format;

/// xorshift64*: deterministic, no dependency.
pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(crate) fn byte(&mut self) -> u8 {
        (self.next() >> 56) as u8
    }
    /// Uniform in [-1, 1).
    pub(crate) fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
    pub(crate) fn f16(&mut self, scale: f32) -> [u8; 2] {
        f16::from_f32(self.unit() * scale).to_le_bytes()
    }
}

/// A random row of `n` elements with finite scales (random bytes elsewhere).
pub(crate) fn random_row(rng: &mut Rng, fmt: Format, n: usize) -> Vec<u8> {
    let mut row: Vec<u8> = (0..fmt.bytes_for(n).unwrap()).map(|_| rng.byte()).collect();
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
                c.copy_from_slice(&half::bf16::from_f32(rng.unit() * 4.0).to_le_bytes());
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
    }
    row
}

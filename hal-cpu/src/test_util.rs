//! Test data shared by the crate's tests: one deterministic RNG and random weights.

use purehw_kernels::Format;

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
        half::f16::from_f32(self.unit() * scale).to_le_bytes()
    }
}

/// `rows` random rows of `cols` in `fmt`: random bytes with finite, modest scales.
pub(crate) fn weight_bytes(rng: &mut Rng, fmt: Format, rows: usize, cols: usize) -> Vec<u8> {
    let mut w: Vec<u8> = (0..fmt.bytes_for(cols).unwrap() * rows).map(|_| rng.byte()).collect();
    match fmt {
        Format::F32 => w.chunks_exact_mut(4).for_each(|c| c.copy_from_slice(&rng.unit().to_le_bytes())),
        Format::F16 => w.chunks_exact_mut(2).for_each(|c| c.copy_from_slice(&rng.f16(1.0))),
        Format::BF16 => {
            w.chunks_exact_mut(2).for_each(|c| c.copy_from_slice(&half::bf16::from_f32(rng.unit()).to_le_bytes()))
        }
        Format::Q6_K => w.chunks_exact_mut(fmt.block_bytes()).for_each(|c| c[208..210].copy_from_slice(&rng.f16(0.01))),
        Format::Q4_1 | Format::Q5_1 | Format::Q4_K | Format::Q5_K => {
            for c in w.chunks_exact_mut(fmt.block_bytes()) {
                c[0..2].copy_from_slice(&rng.f16(0.05));
                c[2..4].copy_from_slice(&rng.f16(0.05));
            }
        }
        _ => w.chunks_exact_mut(fmt.block_bytes()).for_each(|c| c[0..2].copy_from_slice(&rng.f16(0.05))),
    }
    w
}

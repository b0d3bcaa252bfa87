//! Helpers shared by the integration tests: weights from f32 data, a tiny deterministic RNG,
//! and the normalised mean squared error against an f64 reference.
#![allow(dead_code)]

use half::{bf16, f16};
use purehw_hal::{Backend, Format, HostBytes, HostWeight, View};
use purehw_hal_cpu_ref::{BufId, CpuRef};

/// xorshift64*: reproducible test data without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.unit()).collect()
    }
}

pub fn weight_f32(rows: usize, cols: usize, data: &[f32]) -> HostWeight {
    assert_eq!(data.len(), rows * cols);
    let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    HostWeight::new(Format::F32, rows, cols, HostBytes::from_vec(bytes)).unwrap()
}

pub fn weight_f16(rows: usize, cols: usize, data: &[f32]) -> HostWeight {
    let bytes = data.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect();
    HostWeight::new(Format::F16, rows, cols, HostBytes::from_vec(bytes)).unwrap()
}

pub fn weight_bf16(rows: usize, cols: usize, data: &[f32]) -> HostWeight {
    let bytes = data.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect();
    HostWeight::new(Format::BF16, rows, cols, HostBytes::from_vec(bytes)).unwrap()
}

/// Byte offsets of the f16 scale fields inside one block of a quantized format.
fn scale_offsets(fmt: Format) -> &'static [usize] {
    match fmt {
        Format::Q4_0 | Format::Q5_0 | Format::Q8_0 => &[0],
        Format::Q4_1 | Format::Q5_1 | Format::Q4_K | Format::Q5_K => &[0, 2],
        Format::Q6_K => &[208],
        _ => &[],
    }
}

/// A quantized weight of random bytes whose f16 scales are set to small finite values.
pub fn weight_random_quant(rng: &mut Rng, fmt: Format, rows: usize, cols: usize) -> HostWeight {
    let row_bytes = fmt.bytes_for(cols).unwrap();
    let mut bytes: Vec<u8> = (0..rows * row_bytes).map(|_| rng.next_u64() as u8).collect();
    for block in bytes.chunks_exact_mut(fmt.block_bytes()) {
        for &o in scale_offsets(fmt) {
            let s = f16::from_f32(0.01 + 0.04 * rng.unit().abs());
            block[o..o + 2].copy_from_slice(&s.to_le_bytes());
        }
    }
    HostWeight::new(fmt, rows, cols, HostBytes::from_vec(bytes)).unwrap()
}

/// Σ(got − want)² / Σ want².
pub fn nmse(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let err: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    err / norm.max(f64::MIN_POSITIVE)
}

pub fn assert_close(got: &[f32], want: &[f64], what: &str) {
    let e = nmse(got, want);
    assert!(e < 1e-10, "{what}: nmse {e:e}");
}

/// A buffer holding `data`.
pub fn buf_with(b: &mut CpuRef, data: &[f32]) -> BufId {
    let id = b.alloc(data.len()).unwrap();
    b.write(View::new(id, 0), data).unwrap();
    id
}

pub fn read_all(b: &mut CpuRef, id: BufId, len: usize) -> Vec<f32> {
    let mut v = vec![0f32; len];
    b.read(View::new(id, 0), &mut v).unwrap();
    v
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

//! Helpers shared by the integration tests: weights from f32 data or random rows (the
//! workspace's one test RNG, `purehw_kernels::testing`), and the normalised mean squared error
//! against an f64 reference.
#![allow(dead_code)]

use half::{bf16, f16};
use purehw_hal::{Backend, Format, HostBytes, HostWeight, View};
use purehw_hal_cpu_ref::{BufId, CpuRef};
use purehw_kernels::testing::random_row;

pub use purehw_kernels::testing::Rng;

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

/// A quantized weight of random bytes with small finite f16 scales.
pub fn weight_random_quant(rng: &mut Rng, fmt: Format, rows: usize, cols: usize) -> HostWeight {
    let bytes = (0..rows).flat_map(|_| random_row(rng, fmt, cols)).collect();
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

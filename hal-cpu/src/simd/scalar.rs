//! The fallback: the reference functions themselves, so it is exact by definition.

use purehw_kernels::Format;
use purehw_kernels::ops;
use purehw_kernels::quant::{self as q, BlockQ8A, BlockQ8K};

use super::Kernels;

pub(crate) const KERNELS: Kernels = Kernels {
    name: "scalar",
    quantize_q8a: q::quantize_q8a,
    quantize_q8k: q::quantize_q8k,
    gemm_q8a,
    gemm_q8k,
    gemm_f32,
    dot_f32: q::dot_f32,
    dot_keys,
    axpy_keys,
    dequant_int: q::dequantize_int_row,
    dot_int,
    gelu_mul,
    silu_mul,
    exp_sub,
    widen_f16,
    head_est_q8_0: None,
};

pub(crate) fn widen_f16(h: &[u16], out: &mut [f32]) {
    for (o, &b) in out.iter_mut().zip(h) {
        *o = half::f16::from_bits(b).to_f32();
    }
}

pub(crate) fn dot_int(p: q::PackedInt, rows: &[q::IntRow<'_>], x: &[f32], out: &mut [f32]) {
    for (o, r) in out.iter_mut().zip(rows) {
        *o = q::dot_int_row(p, *r, x);
    }
}

pub(crate) fn gelu_mul(out: &mut [f32], gate: Option<&[f32]>, up: &[f32]) {
    match gate {
        Some(g) => ops::gelu_tanh_mul(out, g, up),
        None => ops::gelu_tanh_mul_inplace(out, up),
    }
}

pub(crate) fn silu_mul(out: &mut [f32], gate: Option<&[f32]>, up: &[f32]) {
    match gate {
        Some(g) => ops::silu_mul(out, g, up),
        None => ops::silu_mul_inplace(out, up),
    }
}

pub(crate) fn exp_sub(x: &mut [f32], m: f32) {
    for v in x {
        *v = ops::exp(*v - m);
    }
}

pub(crate) fn gemm_q8a(fmt: Format, w: &[u8], rows: usize, cols: usize, act: &[BlockQ8A], n: usize, out: &mut [f32]) {
    let (rb, ab) = (fmt.bytes_for(cols).unwrap_or(0), cols / 32);
    for t in 0..n {
        let a = &act[t * ab..(t + 1) * ab];
        for r in 0..rows {
            out[t * rows + r] = q::dot_row_q8a(fmt, &w[r * rb..(r + 1) * rb], a);
        }
    }
}

pub(crate) fn gemm_q8k(fmt: Format, w: &[u8], rows: usize, cols: usize, act: &[BlockQ8K], n: usize, out: &mut [f32]) {
    let (rb, ab) = (fmt.bytes_for(cols).unwrap_or(0), cols / 256);
    for t in 0..n {
        let a = &act[t * ab..(t + 1) * ab];
        for r in 0..rows {
            out[t * rows + r] = q::dot_row_q8k(fmt, &w[r * rb..(r + 1) * rb], a);
        }
    }
}

pub(crate) fn gemm_f32(fmt: Format, w: &[u8], rows: usize, cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
    let rb = fmt.bytes_for(cols).unwrap_or(0);
    for t in 0..n {
        let xt = &x[t * cols..(t + 1) * cols];
        for r in 0..rows {
            out[t * rows + r] = q::dot_row(fmt, &w[r * rb..(r + 1) * rb], xt);
        }
    }
}

pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

pub(crate) fn dot_keys(q: &[f32], d: usize, k: &[f32], stride: usize, n: usize, out: &mut [f32], ld: usize) {
    for (h, qh) in q.chunks_exact(d.max(1)).enumerate() {
        for j in 0..n {
            out[h * ld + j] = q::dot_f32(qh, &k[j * stride..j * stride + d]);
        }
    }
}

pub(crate) fn axpy_keys(y: &mut [f32], d: usize, e: &[f32], ld: usize, n: usize, v: &[f32], stride: usize) {
    for (h, yh) in y.chunks_exact_mut(d.max(1)).enumerate() {
        for j in 0..n {
            axpy(yh, e[h * ld + j], &v[j * stride..j * stride + d]);
        }
    }
}

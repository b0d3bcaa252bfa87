//! The SIMD twins of the `purehw-kernels` math, chosen once at run time.
//!
//! [`Kernels::detect`] picks the best set the CPU has (AVX2+FMA on x86-64, NEON on aarch64) and
//! falls back to [`scalar`], which calls the reference functions themselves. Every twin is
//! bit-exact with its reference (tests in each module compare them on random data):
//!
//! * `quantize_q8a` / `quantize_q8k` = `purehw_kernels::quant::quantize_q8a` / `quantize_q8k`;
//! * `gemm_q8a` / `gemm_q8k`: `out[t·rows + r] = dot_row_q8a/q8k(fmt, row r, act of token t)`;
//! * `gemm_f32`: `out[t·rows + r] = dot_row(fmt, row r, x[t·cols..][..cols])`;
//! * `dot_f32`, `dot_keys`, `axpy_keys` (`y[i] += e·v[i]` over keys, no fused multiply-add): the
//!   canonical float order of scores and attention outputs;
//! * `dequant_int` = `purehw_kernels::quant::dequantize_int_row` (compressed-tensors codes),
//!   `dot_int`: `dot_int_row` of several rows;
//! * `gelu_mul`, `silu_mul`, `exp_sub`: `purehw_kernels::ops` elementwise, through its own `exp`.

use purehw_kernels::Format;
use purehw_kernels::quant::{BlockQ8A, BlockQ8K, IntRow, PackedInt};

#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
mod neon;
pub(crate) mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_512;
#[cfg(target_arch = "x86_64")]
mod x86_act;
#[cfg(target_arch = "x86_64")]
mod x86_f32;
#[cfg(target_arch = "x86_64")]
mod x86_int;

/// Quantize a row of activations (`x.len() == block · out.len()`).
pub type QuantizeA = fn(x: &[f32], out: &mut [BlockQ8A]);
pub type QuantizeK = fn(x: &[f32], out: &mut [BlockQ8K]);
/// Integer GEMM over `rows` consecutive stored rows of `w` (each `fmt.bytes_for(cols)` bytes) and
/// `n` tokens of quantized activations (token `t` is `act[t·cols/B ..][..cols/B]`):
/// `out[t·rows + r] = dot_row_q8a(fmt, row r, token t)`. `fmt.act_layout()` is `Q8A` (resp. `Q8K`).
pub type GemmA = fn(fmt: Format, w: &[u8], rows: usize, cols: usize, act: &[BlockQ8A], n: usize, out: &mut [f32]);
pub type GemmK = fn(fmt: Format, w: &[u8], rows: usize, cols: usize, act: &[BlockQ8K], n: usize, out: &mut [f32]);
/// Float GEMM: `out[t·rows + r] = dot_row(fmt, row r, x[t·cols..][..cols])`, any format.
pub type GemmF = fn(fmt: Format, w: &[u8], rows: usize, cols: usize, x: &[f32], n: usize, out: &mut [f32]);

/// One set of kernels, all from the same instruction set.
#[derive(Copy, Clone)]
pub struct Kernels {
    /// `"avx2"`, `"neon"` or `"scalar"`.
    pub name: &'static str,
    pub quantize_q8a: QuantizeA,
    pub quantize_q8k: QuantizeK,
    pub gemm_q8a: GemmA,
    pub gemm_q8k: GemmK,
    pub gemm_f32: GemmF,
    /// `purehw_kernels::quant::dot_f32`, bit for bit.
    pub dot_f32: fn(&[f32], &[f32]) -> f32,
    /// Scores of a group of `q.len() / d` queries (query `h` at `q[h·d..][..d]`) against `n`
    /// consecutive keys (key `j` at `k[j·stride..][..d]`): `out[h·ld + j] = dot_f32(query h, key
    /// j)`. Keys are taken a few at a time for every query, so each is read once.
    pub dot_keys: DotKeys,
    /// `y[h·d + i] += e[h·ld + j] · v[j·stride + i]` for every query `h` of the group and every
    /// key `j < n` in order: each element's chain in key order, as repeated `axpy` computes it.
    pub axpy_keys: AxpyKeys,
    /// One row of a compressed-tensors weight expanded to f32 (`out.len()` columns).
    pub dequant_int: fn(PackedInt, IntRow<'_>, &mut [f32]),
    /// `out[i] = dot_int_row(p, rows[i], x)` (a one-token matmul over a few rows at once).
    pub dot_int: fn(PackedInt, &[IntRow<'_>], &[f32], &mut [f32]),
    /// `out[i] = gelu_tanh(gate[i]) · up[i]` (`gate` `None`: `out` holds the gate).
    pub gelu_mul: Gated,
    /// `out[i] = silu(gate[i]) · up[i]` (`gate` `None`: in place).
    pub silu_mul: Gated,
    /// `x[i] = exp(x[i] − m)` (`purehw_kernels::ops::exp`).
    pub exp_sub: fn(x: &mut [f32], m: f32),
    /// `out[i] = f16::from_bits(h[i]).to_f32()` (exact) for `i < h.len()`: an f16 KV cache's
    /// keys and values widened for the float kernels.
    pub widen_f16: fn(h: &[u16], out: &mut [f32]),
    /// Greedy decoding's LM head estimate over a Q8_0 weight (see [`HeadEst`]); `None` where no
    /// kernel makes it cheaper than the exact matmul.
    pub head_est_q8_0: Option<HeadEst>,
}

/// `(w, rows, act, n, est, maxdw)` over a Q8_0 weight of `rows` rows and `ab = act.len() / n`
/// blocks a row: `est[t·rows + r] = Σ_b fl(d_w·d_a)·S_b`, each block's integer sum `S_b` whole
/// and the sum over blocks fused multiply-adds (not the reference's rounding: an estimate, its
/// error bounded by the caller), and `maxdw[r] = max_b |d_w|` of row `r`.
pub type HeadEst = fn(&[u8], usize, &[BlockQ8A], usize, &mut [f32], &mut [f32]);

/// `(q, d, k, stride, n, out, ld)`; see [`Kernels::dot_keys`].
pub type DotKeys = fn(&[f32], usize, &[f32], usize, usize, &mut [f32], usize);
/// `(y, d, e, ld, n, v, stride)`; see [`Kernels::axpy_keys`].
pub type AxpyKeys = fn(&mut [f32], usize, &[f32], usize, usize, &[f32], usize);

/// A gated activation; see [`Kernels::gelu_mul`].
pub type Gated = fn(out: &mut [f32], gate: Option<&[f32]>, up: &[f32]);

impl core::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name)
    }
}

/// The scalar fallback (the reference functions), whatever the CPU has.
pub fn scalar_kernels() -> Kernels {
    scalar::KERNELS
}

impl Kernels {
    /// The best kernels this CPU runs. `PUREHW_SIMD=scalar` forces the fallback.
    pub fn detect() -> Kernels {
        if std::env::var("PUREHW_SIMD").is_ok_and(|v| v == "scalar") {
            return scalar::KERNELS;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = x86_512::kernels() {
            return k;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = x86::kernels() {
            return k;
        }
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        if let Some(k) = neon::kernels() {
            return k;
        }
        scalar::KERNELS
    }
}

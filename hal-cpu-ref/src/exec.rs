//! Running one op: resolve its views against the arena (with aliasing checked), then call the
//! kernel from `purehw_kernels`.

use core::ops::Range;

use purehw_hal::ActQuant;
use purehw_hal::{HostWeight, Op, Step, View};
use purehw_kernels::ops as k;
use purehw_kernels::quant::{
    ActLayout, decode_q8a_row, decode_q8k_row, dequantize_row, dot_codes_q8a, dot_codes_q8k, dot_f32, quantize_q8a,
    quantize_q8k,
};

use crate::error::invalid;
use crate::{BufId, CpuRef, CpuRefError, WeightId, checked_range, view_range};

type Result<T> = core::result::Result<T, CpuRefError>;

/// An input region as seen while the output buffer is taken out of the arena.
pub enum Src<'a> {
    /// A region that does not overlap the output.
    Slice(&'a [f32]),
    /// Exactly the output region (in place).
    Out,
}

/// The arena while one buffer's output region is borrowed mutably: inputs come from the other
/// buffers, or from the parts of the output buffer before (`head`) and after (`tail`) the region.
pub struct Inputs<'a> {
    bufs: &'a [Vec<f32>],
    out_idx: usize,
    out: Range<usize>,
    head: &'a [f32],
    tail: &'a [f32],
}

impl<'a> Inputs<'a> {
    pub fn src(&self, v: View<BufId>, len: usize, what: &'static str) -> Result<Src<'a>> {
        let idx = v.buf.0 as usize;
        if idx != self.out_idx {
            let (idx, r) = view_range(self.bufs, v, len, what)?;
            return Ok(Src::Slice(&self.bufs[idx][r]));
        }
        let r = checked_range(v, len, self.out.end + self.tail.len(), what)?;
        if r == self.out {
            Ok(Src::Out)
        } else if r.end <= self.out.start {
            Ok(Src::Slice(&self.head[r]))
        } else if r.start >= self.out.end {
            Ok(Src::Slice(&self.tail[r.start - self.out.end..r.end - self.out.end]))
        } else {
            Err(CpuRefError::Overlap { what, buf: v.buf })
        }
    }

    /// An input that must not alias the output at all.
    pub fn slice(&self, v: View<BufId>, len: usize, what: &'static str) -> Result<&'a [f32]> {
        match self.src(v, len, what)? {
            Src::Slice(s) => Ok(s),
            Src::Out => Err(CpuRefError::Overlap { what, buf: v.buf }),
        }
    }
}

/// Grow `v` to `n` elements: the quantized activations of the largest step seen (first use
/// only; a step of that size or smaller never allocates again).
pub fn grow<T: Clone + Default>(v: &mut Vec<T>, n: usize) -> Result<()> {
    if v.len() < n {
        v.try_reserve_exact(n - v.len()).map_err(|_| CpuRefError::OutOfMemory { elems: n })?;
        v.resize(n, T::default());
    }
    Ok(())
}

pub fn weight(weights: &[HostWeight], w: WeightId) -> Result<&HostWeight> {
    weights.get(w.0 as usize).ok_or(CpuRefError::UnknownWeight(w))
}

pub fn mul(a: usize, b: usize, op: &'static str) -> Result<usize> {
    a.checked_mul(b).ok_or(invalid(op, "size overflows usize"))
}

/// Rows of the KV cache the step's sequences reach (`max(cache_row + pos0 + len)`), after
/// checking that every sequence's rows lie inside the step.
pub fn cache_rows_needed(step: &Step<'_>, op: &'static str) -> Result<usize> {
    let mut n = 0usize;
    for s in step.seqs {
        if s.row as usize + s.len as usize > step.rows() {
            return Err(invalid(op, "a sequence's rows run past the step's rows"));
        }
        n = n.max(s.cache_row as usize + s.pos0 as usize + s.len as usize);
    }
    Ok(n)
}

/// Take the output buffer out of the arena, run `f` on its region and the rest of the arena, and
/// put it back (also on error). `mem::take` leaves an empty `Vec`: no allocation.
pub fn with_out<R>(
    bufs: &mut [Vec<f32>],
    out: View<BufId>,
    len: usize,
    what: &'static str,
    f: impl FnOnce(&mut [f32], &Inputs<'_>) -> Result<R>,
) -> Result<R> {
    let (idx, range) = view_range(bufs, out, len, what)?;
    let mut ob = core::mem::take(&mut bufs[idx]);
    let result = {
        let (head, rest) = ob.split_at_mut(range.start);
        let (o, tail) = rest.split_at_mut(range.len());
        f(o, &Inputs { bufs, out_idx: idx, out: range, head, tail })
    };
    bufs[idx] = ob;
    result
}

impl CpuRef {
    /// Run one op. Every weight passed `load_weight`: its format is supported and its bytes match
    /// its shape, so `HostWeight::row` cannot panic for `r < rows`.
    pub fn run(&mut self, step: &Step<'_>, op: &Op<BufId, WeightId>) -> Result<()> {
        let CpuRef { bufs, weights, row: scratch, act: qact } = self;
        let weights: &[HostWeight] = weights;
        match *op {
            Op::Embed { out, table, scale } => {
                const OP: &str = "Embed";
                let t = weight(weights, table)?;
                let cols = t.cols;
                let len = mul(step.rows(), cols, OP)?;
                with_out(bufs, out, len, OP, |o, _| {
                    for (row, &token) in step.tokens.iter().enumerate() {
                        if token as usize >= t.rows {
                            return Err(CpuRefError::TokenOutOfRange { token, row, rows: t.rows });
                        }
                        // Dequantize straight into the output row: no scratch needed.
                        let dst = &mut o[row * cols..(row + 1) * cols];
                        dequantize_row(t.format, t.row(token as usize), dst);
                        k::scale_inplace(dst, scale);
                    }
                    Ok(())
                })
            }

            Op::RmsNorm { out, x, w, rows, dim, eps } => {
                const OP: &str = "RmsNorm";
                let wt = weight(weights, w)?;
                if wt.rows != 1 || wt.cols != dim {
                    return Err(invalid(OP, "weight must be (1, dim)"));
                }
                if dim == 0 {
                    return Err(invalid(OP, "dim must be > 0"));
                }
                let len = mul(rows, dim, OP)?;
                // The scratch row is at least as wide as every loaded weight.
                let wv = &mut scratch[..dim];
                dequantize_row(wt.format, wt.row(0), wv);
                let wv = &*wv;
                with_out(bufs, out, len, OP, |o, inputs| {
                    match inputs.src(x, len, "RmsNorm x")? {
                        Src::Out => o.chunks_exact_mut(dim).for_each(|r| k::rmsnorm_inplace(r, wv, eps)),
                        Src::Slice(xs) => o
                            .chunks_exact_mut(dim)
                            .zip(xs.chunks_exact(dim))
                            .for_each(|(or, xr)| k::rmsnorm(or, xr, wv, eps)),
                    }
                    Ok(())
                })
            }

            Op::MatMul { out, x, w, n, act } => {
                const OP: &str = "MatMul";
                let wt = weight(weights, w)?;
                let (rows, cols) = (wt.rows, wt.cols);
                let out_len = mul(n, rows, OP)?;
                let x_len = mul(n, cols, OP)?;
                with_out(bufs, out, out_len, OP, |o, inputs| {
                    let xs = inputs.slice(x, x_len, "MatMul x")?;
                    // Int8: quantize every token once (the explicit activation op), decode each weight
                    // row once, then integer dots.
                    if act == ActQuant::Int8 {
                        match wt.format.act_layout() {
                            Some(ActLayout::Q8A) => {
                                let per = cols / 32;
                                grow(&mut qact.a, n * per)?;
                                for t in 0..n {
                                    quantize_q8a(&xs[t * cols..(t + 1) * cols], &mut qact.a[t * per..(t + 1) * per]);
                                }
                                let codes = &mut qact.codes_a[..per];
                                for r in 0..rows {
                                    decode_q8a_row(wt.format, wt.row(r), codes);
                                    for t in 0..n {
                                        o[t * rows + r] = dot_codes_q8a(codes, &qact.a[t * per..(t + 1) * per]);
                                    }
                                }
                                return Ok(());
                            }
                            Some(ActLayout::Q8K) => {
                                let per = cols / 256;
                                grow(&mut qact.k, n * per)?;
                                for t in 0..n {
                                    quantize_q8k(&xs[t * cols..(t + 1) * cols], &mut qact.k[t * per..(t + 1) * per]);
                                }
                                let codes = &mut qact.codes_k[..per];
                                for r in 0..rows {
                                    decode_q8k_row(wt.format, wt.row(r), codes);
                                    for t in 0..n {
                                        o[t * rows + r] = dot_codes_q8k(codes, &qact.k[t * per..(t + 1) * per]);
                                    }
                                }
                                return Ok(());
                            }
                            None => {}
                        }
                    }
                    let wrow = &mut scratch[..cols];
                    // Each weight row is dequantized once and reused for all n tokens;
                    // dot_f32 on the dequantized row is dot_row by definition.
                    for r in 0..rows {
                        dequantize_row(wt.format, wt.row(r), wrow);
                        for t in 0..n {
                            o[t * rows + r] = dot_f32(wrow, &xs[t * cols..(t + 1) * cols]);
                        }
                    }
                    Ok(())
                })
            }

            Op::Rope { x, rows, heads, head_dim, theta, scale, mode } => {
                const OP: &str = "Rope";
                if head_dim == 0 || !head_dim.is_multiple_of(2) {
                    return Err(invalid(OP, "head_dim must be even and > 0"));
                }
                if rows > step.positions.len() {
                    return Err(invalid(OP, "more rows than step.positions"));
                }
                let width = mul(heads, head_dim, OP)?;
                let len = mul(rows, width, OP)?;
                if len == 0 {
                    return Ok(());
                }
                with_out(bufs, x, len, OP, |o, _| {
                    for (row, &pos) in o.chunks_exact_mut(width).zip(step.positions) {
                        k::rope(row, head_dim, pos, theta, scale, mode);
                    }
                    Ok(())
                })
            }

            Op::StoreKv { cache, src, width } => {
                const OP: &str = "StoreKv";
                let cache_len = mul(cache_rows_needed(step, OP)?, width, OP)?;
                let src_len = mul(step.rows(), width, OP)?;
                with_out(bufs, cache, cache_len, OP, |o, inputs| {
                    let s = inputs.slice(src, src_len, "StoreKv src")?;
                    for seq in step.seqs {
                        let (row, dst) = (seq.row as usize, seq.cache_row as usize + seq.pos0 as usize);
                        let n = seq.len as usize * width;
                        o[dst * width..dst * width + n].copy_from_slice(&s[row * width..row * width + n]);
                    }
                    Ok(())
                })
            }

            Op::Attention { out, q, k: kc, v: vc, heads, kv_heads, head_dim, scale, window, softcap } => {
                const OP: &str = "Attention";
                if heads == 0 || kv_heads == 0 || head_dim == 0 || !heads.is_multiple_of(kv_heads) {
                    return Err(invalid(OP, "need heads, kv_heads, head_dim > 0 and kv_heads dividing heads"));
                }
                let group = heads / kv_heads;
                let qw = mul(heads, head_dim, OP)?;
                let kvw = mul(kv_heads, head_dim, OP)?;
                let q_len = mul(step.rows(), qw, OP)?;
                let kv_len = mul(cache_rows_needed(step, OP)?, kvw, OP)?;
                with_out(bufs, out, q_len, OP, |o, inputs| {
                    let qs = inputs.slice(q, q_len, "Attention q")?;
                    let ks = inputs.slice(kc, kv_len, "Attention k")?;
                    let vs = inputs.slice(vc, kv_len, "Attention v")?;
                    for seq in step.seqs {
                        let cache_base = seq.cache_row as usize * kvw;
                        for i in 0..seq.len as usize {
                            let t = seq.row as usize + i;
                            let p = seq.pos0 as usize + i;
                            let first = if window > 0 { (p + 1).saturating_sub(window) } else { 0 };
                            for h in 0..heads {
                                let base = cache_base + (h / group) * head_dim;
                                let qo = t * qw + h * head_dim;
                                k::attend(
                                    &mut o[qo..qo + head_dim],
                                    &qs[qo..qo + head_dim],
                                    &ks[base..],
                                    &vs[base..],
                                    kvw,
                                    first..p + 1,
                                    scale,
                                    softcap,
                                );
                            }
                        }
                    }
                    Ok(())
                })
            }

            Op::Add { out, a, b, len } => with_out(bufs, out, len, "Add", |o, inputs| {
                match (inputs.src(a, len, "Add a")?, inputs.src(b, len, "Add b")?) {
                    (Src::Slice(a), Src::Slice(b)) => k::add(o, a, b),
                    (Src::Out, Src::Slice(other)) | (Src::Slice(other), Src::Out) => k::add_inplace(o, other),
                    // out == a == b: x + x, elementwise.
                    (Src::Out, Src::Out) => o.iter_mut().for_each(|x| *x += *x),
                }
                Ok(())
            }),

            Op::GeluTanhMul { out, gate, up, len } => with_out(bufs, out, len, "GeluTanhMul", |o, inputs| {
                let up = inputs.slice(up, len, "GeluTanhMul up")?;
                match inputs.src(gate, len, "GeluTanhMul gate")? {
                    Src::Out => k::gelu_tanh_mul_inplace(o, up),
                    Src::Slice(g) => k::gelu_tanh_mul(o, g, up),
                }
                Ok(())
            }),

            Op::SiluMul { out, gate, up, len } => with_out(bufs, out, len, "SiluMul", |o, inputs| {
                let up = inputs.slice(up, len, "SiluMul up")?;
                match inputs.src(gate, len, "SiluMul gate")? {
                    Src::Out => k::silu_mul_inplace(o, up),
                    Src::Slice(g) => k::silu_mul(o, g, up),
                }
                Ok(())
            }),

            Op::Softcap { x, len, cap } => {
                if cap.is_nan() || cap <= 0.0 {
                    return Err(invalid("Softcap", "cap must be > 0"));
                }
                with_out(bufs, x, len, "Softcap", |o, _| {
                    k::softcap_inplace(o, cap);
                    Ok(())
                })
            }

            _ => Err(CpuRefError::UnsupportedOp),
        }
    }
}

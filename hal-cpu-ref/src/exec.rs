//! Running one checked primitive op: borrow its output region beside its inputs, then call the
//! kernel from `purehw_kernels`.

use half::f16;
use purehw_hal::{ActLayout, ActQuant, HostWeight, KvType, Op, Step, act_words};
use purehw_hal_host::{Src, q8a_blocks, q8a_blocks_mut, q8k_blocks, q8k_blocks_mut};
use purehw_kernels::ops as k;
use purehw_kernels::quant::{
    BlockQ8A, BlockQ8K, decode_q8a_row, decode_q8k_row, dot_codes_q8a, dot_codes_q8k, dot_f32, quantize_q8a,
    quantize_q8k,
};

use crate::{ActScratch, BufId, CpuRef, CpuRefError, WeightId};

type Result<T> = core::result::Result<T, CpuRefError>;

/// Grow `v` to `n` elements: the quantized activations of the largest step seen (first use
/// only; a step of that size or smaller never allocates again).
fn grow<T: Clone + Default>(v: &mut Vec<T>, n: usize) -> Result<()> {
    if v.len() < n {
        v.try_reserve_exact(n - v.len()).map_err(|_| CpuRefError::OutOfMemory { elems: n })?;
        v.resize(n, T::default());
    }
    Ok(())
}

/// The weight behind a checked handle.
fn weight(weights: &[HostWeight], w: WeightId) -> &HostWeight {
    &weights[w.0 as usize]
}

/// `out[t·rows + r] = dot_codes_q8a(row r, act of token t)` for `n` tokens of `per` blocks.
fn gemm_q8a(wt: &HostWeight, codes: &mut [purehw_kernels::quant::Codes32], act: &[BlockQ8A], n: usize, o: &mut [f32]) {
    let per = wt.cols / 32;
    let codes = &mut codes[..per];
    for r in 0..wt.rows {
        decode_q8a_row(wt.format, wt.row(r), codes);
        for t in 0..n {
            o[t * wt.rows + r] = dot_codes_q8a(codes, &act[t * per..(t + 1) * per]);
        }
    }
}

/// As [`gemm_q8a`] for the k-quants.
fn gemm_q8k(wt: &HostWeight, codes: &mut [purehw_kernels::quant::CodesK], act: &[BlockQ8K], n: usize, o: &mut [f32]) {
    let per = wt.cols / 256;
    let codes = &mut codes[..per];
    for r in 0..wt.rows {
        decode_q8k_row(wt.format, wt.row(r), codes);
        for t in 0..n {
            o[t * wt.rows + r] = dot_codes_q8k(codes, &act[t * per..(t + 1) * per]);
        }
    }
}

/// Quantize `rows` rows of `cols` into the scratch of `layout`.
fn quantize_into(qact: &mut ActScratch, xs: &[f32], rows: usize, cols: usize, layout: ActLayout) -> Result<()> {
    match layout {
        ActLayout::Q8A => {
            let per = cols / 32;
            grow(&mut qact.a, rows * per)?;
            for t in 0..rows {
                quantize_q8a(&xs[t * cols..(t + 1) * cols], &mut qact.a[t * per..(t + 1) * per]);
            }
        }
        ActLayout::Q8K => {
            let per = cols / 256;
            grow(&mut qact.k, rows * per)?;
            for t in 0..rows {
                quantize_q8k(&xs[t * cols..(t + 1) * cols], &mut qact.k[t * per..(t + 1) * per]);
            }
        }
    }
    Ok(())
}

impl CpuRef {
    /// Run one primitive op that passed `purehw_hal::check::op` (directly or as part of a fused
    /// op's expansion): its regions lie in their buffers, its shapes agree with its weights, and
    /// every loaded weight's format is supported, so `HostWeight::row` cannot panic.
    pub(crate) fn run(&mut self, step: &Step<'_>, op: &Op<BufId, WeightId>) -> Result<()> {
        let CpuRef { host, row: scratch, act: qact } = self;
        match *op {
            Op::Embed { out, table, scale } => {
                let cols = host.weight(table).map_or(0, |t| t.cols);
                host.with_out(out, step.rows() * cols, |o, _, weights| {
                    let t = weight(weights, table);
                    for (row, &token) in step.tokens.iter().enumerate() {
                        // Dequantize straight into the output row: no scratch needed.
                        let dst = &mut o[row * cols..(row + 1) * cols];
                        t.dequantize_row(token as usize, dst);
                        k::scale_inplace(dst, scale);
                    }
                })?;
            }

            Op::EmbedIds { out, table, scale, ids } => {
                let (cols, vocab) = host.weight(table).map_or((0, 0), |t| (t.cols, t.rows));
                host.with_out(out, step.rows() * cols, |o, inputs, weights| {
                    let t = weight(weights, table);
                    for (row, &id) in inputs.slice(ids, step.rows()).iter().enumerate() {
                        let dst = &mut o[row * cols..(row + 1) * cols];
                        t.dequantize_row(k::token_of(id, vocab), dst);
                        k::scale_inplace(dst, scale);
                    }
                })?;
            }

            Op::RmsNorm { out, x, w, rows, dim, eps } => {
                let len = rows * dim;
                host.with_out(out, len, |o, inputs, weights| {
                    // The scratch row is at least as wide as every loaded weight.
                    let wt = weight(weights, w);
                    let wv = &mut scratch[..dim];
                    wt.dequantize_row(0, wv);
                    let wv = &*wv;
                    match inputs.src(x, len) {
                        Src::Out => o.chunks_exact_mut(dim).for_each(|r| k::rmsnorm_inplace(r, wv, eps)),
                        Src::Slice(xs) => o
                            .chunks_exact_mut(dim)
                            .zip(xs.chunks_exact(dim))
                            .for_each(|(or, xr)| k::rmsnorm(or, xr, wv, eps)),
                    }
                })?;
            }

            Op::MatMul { out, x, w, n, act } => {
                let (rows, cols) = host.weight(w).map_or((0, 0), |t| (t.rows, t.cols));
                host.with_out(out, n * rows, |o, inputs, weights| -> Result<()> {
                    let wt = weight(weights, w);
                    let xs = inputs.slice(x, n * cols);
                    // Int8: quantize every token once (the activation op), decode each weight row
                    // once, then integer dots.
                    if act == ActQuant::Int8
                        && let Some(layout) = wt.format.act_layout()
                    {
                        quantize_into(qact, xs, n, cols, layout)?;
                        match layout {
                            ActLayout::Q8A => gemm_q8a(wt, &mut qact.codes_a, &qact.a, n, o),
                            ActLayout::Q8K => gemm_q8k(wt, &mut qact.codes_k, &qact.k, n, o),
                        }
                        return Ok(());
                    }
                    let wrow = &mut scratch[..cols];
                    // Each weight row is dequantized once and reused for all n tokens;
                    // dot_f32 on the dequantized row is dot_row by definition.
                    for r in 0..rows {
                        wt.dequantize_row(r, wrow);
                        for t in 0..n {
                            o[t * rows + r] = dot_f32(wrow, &xs[t * cols..(t + 1) * cols]);
                        }
                    }
                    Ok(())
                })??;
            }

            Op::QuantizeAct { out, x, rows, cols, layout } => {
                let blocks = rows * (cols / purehw_hal::act_block(layout));
                host.with_out(out, blocks * act_words(layout), |o, inputs, _| {
                    let xs = inputs.slice(x, rows * cols);
                    let per = cols / purehw_hal::act_block(layout);
                    for t in 0..rows {
                        let xr = &xs[t * cols..(t + 1) * cols];
                        let w = act_words(layout);
                        let dst = &mut o[t * per * w..(t + 1) * per * w];
                        match layout {
                            ActLayout::Q8A => quantize_q8a(xr, q8a_blocks_mut(dst)),
                            ActLayout::Q8K => quantize_q8k(xr, q8k_blocks_mut(dst)),
                        }
                    }
                })?;
            }

            Op::MatMulQ8 { out, xq, w, n } => {
                let (rows, cols, layout) =
                    host.weight(w).map_or((0, 0, None), |t| (t.rows, t.cols, t.format.act_layout()));
                let Some(layout) = layout else { return Err(CpuRefError::UnsupportedOp) };
                let words = n * (cols / purehw_hal::act_block(layout)) * act_words(layout);
                host.with_out(out, n * rows, |o, inputs, weights| {
                    let wt = weight(weights, w);
                    let xs = inputs.slice(xq, words);
                    match layout {
                        ActLayout::Q8A => gemm_q8a(wt, &mut qact.codes_a, q8a_blocks(xs), n, o),
                        ActLayout::Q8K => gemm_q8k(wt, &mut qact.codes_k, q8k_blocks(xs), n, o),
                    }
                })?;
            }

            Op::Rope { x, rows, heads, head_dim, theta, scale, mode } => {
                let width = heads * head_dim;
                host.with_out(x, rows * width, |o, _, _| {
                    if width > 0 {
                        for (row, &pos) in o.chunks_exact_mut(width).zip(step.positions) {
                            k::rope(row, head_dim, pos, theta, scale, mode);
                        }
                    }
                })?;
            }

            Op::StoreKv { cache, src, width, ring, kv } => {
                let rows = purehw_hal::check::cache_rows_needed(step, ring, "StoreKv")?;
                host.with_out(cache, rows * kv.row_words(width), |o, inputs, _| {
                    let s = inputs.slice(src, step.rows() * width);
                    for seq in step.seqs {
                        for i in 0..seq.len as usize {
                            let (row, dst) = (seq.row as usize + i, seq.row_of(seq.pos0 as usize + i, ring));
                            k::store_kv_row(o, dst, &s[row * width..(row + 1) * width], kv);
                        }
                    }
                })?;
            }

            Op::Attention { out, q, k: kc, v: vc, heads, kv_heads, head_dim, scale, window, softcap, ring, kv } => {
                let qw = heads * head_dim;
                let kv_len =
                    purehw_hal::check::cache_rows_needed(step, ring, "Attention")? * kv.row_words(kv_heads * head_dim);
                let shape = [heads, kv_heads, head_dim, window, ring];
                host.with_out(out, step.rows() * qw, |o, inputs, _| {
                    let qs = inputs.slice(q, step.rows() * qw);
                    let (kw, vw) = (inputs.slice(kc, kv_len), inputs.slice(vc, kv_len));
                    match kv {
                        KvType::F32 => attention(step, o, qs, kw, vw, shape, scale, softcap),
                        KvType::F16 => {
                            let (kh, vh): (&[f16], &[f16]) = (bytemuck::cast_slice(kw), bytemuck::cast_slice(vw));
                            attention(step, o, qs, kh, vh, shape, scale, softcap)
                        }
                    }
                })?;
            }

            Op::Add { out, a, b, len } => {
                host.with_out(out, len, |o, inputs, _| match (inputs.src(a, len), inputs.src(b, len)) {
                    (Src::Slice(a), Src::Slice(b)) => k::add(o, a, b),
                    (Src::Out, Src::Slice(other)) | (Src::Slice(other), Src::Out) => k::add_inplace(o, other),
                    // out == a == b: x + x, elementwise.
                    (Src::Out, Src::Out) => o.iter_mut().for_each(|x| *x += *x),
                })?;
            }

            Op::GeluTanhMul { out, gate, up, len } => {
                host.with_out(out, len, |o, inputs, _| {
                    let up = inputs.slice(up, len);
                    match inputs.src(gate, len) {
                        Src::Out => k::gelu_tanh_mul_inplace(o, up),
                        Src::Slice(g) => k::gelu_tanh_mul(o, g, up),
                    }
                })?;
            }

            Op::SiluMul { out, gate, up, len } => {
                host.with_out(out, len, |o, inputs, _| {
                    let up = inputs.slice(up, len);
                    match inputs.src(gate, len) {
                        Src::Out => k::silu_mul_inplace(o, up),
                        Src::Slice(g) => k::silu_mul(o, g, up),
                    }
                })?;
            }

            Op::Softcap { x, len, cap } => {
                host.with_out(x, len, |o, _, _| k::softcap_inplace(o, cap))?;
            }

            Op::Argmax { out, x, rows, cols } => {
                host.with_out(out, rows, |o, inputs, _| {
                    let xs = inputs.slice(x, rows * cols);
                    for (r, o) in o.iter_mut().enumerate() {
                        *o = k::argmax(&xs[r * cols..(r + 1) * cols]) as f32;
                    }
                })?;
            }

            Op::Copy { out, src, len } => {
                host.with_out(out, len, |o, inputs, _| o.copy_from_slice(inputs.slice(src, len)))?;
            }

            _ => return Err(CpuRefError::UnsupportedOp),
        }
        Ok(())
    }
}

/// `Op::Attention` over caches of `T` elements: `kernels::ops::attend` per row and query head.
#[allow(clippy::too_many_arguments)]
fn attention<T: k::KvElem>(
    step: &Step<'_>,
    o: &mut [f32],
    qs: &[f32],
    ks: &[T],
    vs: &[T],
    [heads, kv_heads, head_dim, window, ring]: [usize; 5],
    scale: f32,
    softcap: f32,
) {
    let group = heads / kv_heads;
    let (qw, kvw) = (heads * head_dim, kv_heads * head_dim);
    for seq in step.seqs {
        // The slot's first row: key position j is its row `j` (or `j % ring`).
        let cache_base = seq.row_of(0, ring) * kvw;
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
                    ring,
                    scale,
                    softcap,
                );
            }
        }
    }
}

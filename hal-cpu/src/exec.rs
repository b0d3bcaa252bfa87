//! Running one checked primitive op: borrow its output region beside its inputs from the
//! [`Host`](purehw_hal_host::Host), then split the work across the pool on the SIMD kernels (or
//! the `purehw_kernels` function itself where there is no twin). Work is split by rows or by
//! elements, each part computed exactly as the whole would be, so results never depend on the
//! number of threads.
#![allow(unsafe_code)] // only `Disjoint::part`, each call with a SAFETY line

use std::ops::Range;
use std::sync::Mutex;

use purehw_hal::check::{CheckError, cache_rows_needed};
use purehw_hal::{
    ActLayout, ActQuant, Format, Gate, HostWeight, KvType, MatIn, Op, QuantOut, RopeMode, Step, View, act_block,
    act_words,
};
use purehw_hal_host::{Src, q8a_blocks, q8a_blocks_mut, q8k_blocks, q8k_blocks_mut};
use purehw_kernels::ops as k;
use purehw_kernels::ops::softcap;
use purehw_kernels::quant::{BlockQ8A, PackedInt};

use crate::pool::{Chunks, Disjoint, Pool, lock};
use crate::simd::Kernels;
use crate::{ActKey, BufId, Cpu, CpuError, RopeTable, Scratch, WeightId};

type Result<T> = core::result::Result<T, CpuError>;

/// Elementwise ops with at least this many elements are split across the pool.
const PAR_ELEMS: usize = 4096;

/// Work below this many weight bytes × tokens runs on the calling thread alone.
const SERIAL_BYTES: usize = 64 << 10;

/// Grow `v` to `n` elements (first use of a size only; that size or smaller never allocates
/// again).
pub(crate) fn grow<T: Clone + Default>(v: &mut Vec<T>, n: usize) -> Result<()> {
    if v.len() < n {
        v.try_reserve_exact(n - v.len()).map_err(|_| CpuError::OutOfMemory { elems: n })?;
        v.resize(n, T::default());
    }
    Ok(())
}

/// The weight behind a handle that passed the contract check.
fn weight(weights: &[HostWeight], w: WeightId) -> &HostWeight {
    &weights[w.0 as usize]
}

impl Cpu {
    /// Run one primitive op that passed `purehw_hal::check::op` (directly or as part of a fused
    /// op's expansion): its regions lie in their buffers, its shapes agree with its weights, and
    /// every loaded weight's format is supported.
    pub(crate) fn run(&mut self, step: &Step<'_>, op: &Op<BufId, WeightId>) -> Result<()> {
        // The held quantized activations stay valid only across matmuls that do not write
        // their rows' buffer; any other op may write it.
        if !matches!(op, Op::MatMul { .. }) {
            self.held = None;
        }
        match *op {
            Op::Embed { out, table, scale } => self.embed(step, out, table, scale, None),
            Op::EmbedIds { out, table, scale, ids } => self.embed(step, out, table, scale, Some(ids)),
            Op::RmsNorm { out, x, w, rows, dim, eps } => self.rmsnorm(out, x, w, rows, dim, eps),
            Op::MatMul { out, x, w, n, act } => {
                let r = self.matmul(out, x, w, n, act);
                if self.held.is_some_and(|h| h.x.buf == out.buf) {
                    self.held = None;
                }
                r
            }
            Op::QuantizeAct { out, x, rows, cols, layout } => self.quantize_act(out, x, rows, cols, layout),
            Op::MatMulQ8 { out, xq, w, n } => self.matmul_q8(out, xq, w, n),
            Op::Rope { x, rows, heads, head_dim, theta, scale, mode } => {
                self.rope(step, x, rows, heads, head_dim, theta, scale, mode)
            }
            Op::StoreKv { cache, src, width, ring, kv } => self.store_kv(step, cache, src, width, ring, kv),
            Op::Attention { out, q, k, v, heads, kv_heads, head_dim, scale, window, softcap, ring, kv } => {
                self.attention(step, out, q, k, v, [heads, kv_heads, head_dim, window, ring], scale, softcap, kv)
            }
            Op::Add { out, a, b, len } => self.add(out, a, b, len),
            Op::GeluTanhMul { out, gate, up, len } => {
                let f = self.k.gelu_mul;
                self.gated(out, gate, up, len, f)
            }
            Op::SiluMul { out, gate, up, len } => {
                let f = self.k.silu_mul;
                self.gated(out, gate, up, len, f)
            }
            Op::Softcap { x, len, cap } => {
                let Cpu { host, pool, .. } = self;
                host.with_out(x, len, |o, _, _| par_elems(pool, o, |_, o| k::softcap_inplace(o, cap)))?;
                Ok(())
            }
            Op::Argmax { out, x, rows, cols } => {
                let Cpu { host, pool, .. } = self;
                host.with_out(out, rows, |o, inputs, _| {
                    let xs = inputs.slice(x, rows * cols);
                    if !par_argmax_rows(pool, xs, cols, o) {
                        for (r, o) in o.iter_mut().enumerate() {
                            *o = par_argmax(pool, &xs[r * cols..(r + 1) * cols]) as f32;
                        }
                    }
                })?;
                Ok(())
            }
            Op::Copy { out, src, len } => {
                let Cpu { host, pool, .. } = self;
                host.with_out(out, len, |o, inputs, _| {
                    let s = inputs.slice(src, len);
                    par_elems(pool, o, |r, o| o.copy_from_slice(&s[r]));
                })?;
                Ok(())
            }
            _ => Err(CpuError::UnsupportedOp),
        }
    }

    /// Each step row's table row, dequantized straight into the output and scaled; rows split
    /// across the pool.
    /// `Embed`, or `EmbedIds` with the token ids from `ids`.
    fn embed(
        &mut self,
        step: &Step<'_>,
        out: View<BufId>,
        table: WeightId,
        scale: f32,
        ids: Option<View<BufId>>,
    ) -> Result<()> {
        let Cpu { host, pool, .. } = self;
        let (cols, vocab) = host.weight(table).map_or((0, 0), |t| (t.cols, t.rows));
        let rows = step.rows();
        host.with_out(out, rows * cols, |o, inputs, weights| {
            let t = weight(weights, table);
            let ids = ids.map(|v| inputs.slice(v, rows));
            par_rows(pool, o, cols, rows, rows * cols, |r, dst| {
                let token = ids.map_or(step.tokens[r] as usize, |ids| k::token_of(ids[r], vocab));
                t.dequantize_row(token, dst);
                k::scale_inplace(dst, scale);
            });
        })?;
        Ok(())
    }

    /// `kernels::ops::rmsnorm` per row (in place when `out == x`), rows split across the pool.
    fn rmsnorm(
        &mut self,
        out: View<BufId>,
        x: View<BufId>,
        w: WeightId,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        let Cpu { host, pool, row, .. } = self;
        let len = rows * dim;
        host.with_out(out, len, |o, inputs, weights| {
            // `row` is at least as wide as every loaded weight.
            let wt = weight(weights, w);
            let wv = &mut row[..dim];
            wt.dequantize_row(0, wv);
            let wv = &*wv;
            match inputs.src(x, len) {
                Src::Out => par_rows(pool, o, dim, rows, len, |_, r| k::rmsnorm_inplace(r, wv, eps)),
                Src::Slice(xs) => {
                    par_rows(pool, o, dim, rows, len, |t, r| k::rmsnorm(r, &xs[t * dim..(t + 1) * dim], wv, eps))
                }
            }
        })?;
        Ok(())
    }

    /// Copy each sequence's new rows into its cache slot (a ring's rows where `ring > 0`).
    fn store_kv(
        &mut self,
        step: &Step<'_>,
        cache: View<BufId>,
        src: View<BufId>,
        width: usize,
        ring: usize,
        kv: KvType,
    ) -> Result<()> {
        let rows = cache_rows_needed(step, ring, "StoreKv")?;
        self.host.with_out(cache, rows * kv.row_words(width), |o, inputs, _| {
            let s = inputs.slice(src, step.rows() * width);
            for seq in step.seqs {
                for i in 0..seq.len as usize {
                    let (row, dst) = (seq.row as usize + i, seq.row_of(seq.pos0 as usize + i, ring));
                    k::store_kv_row(o, dst, &s[row * width..(row + 1) * width], kv);
                }
            }
        })?;
        Ok(())
    }

    /// `out = a + b` (either may be `out` itself), split across the pool by elements.
    fn add(&mut self, out: View<BufId>, a: View<BufId>, b: View<BufId>, len: usize) -> Result<()> {
        let Cpu { host, pool, .. } = self;
        host.with_out(out, len, |o, inputs, _| match (inputs.src(a, len), inputs.src(b, len)) {
            (Src::Slice(a), Src::Slice(b)) => par_elems(pool, o, |r, o| k::add(o, &a[r.clone()], &b[r])),
            (Src::Out, Src::Slice(other)) | (Src::Slice(other), Src::Out) => {
                par_elems(pool, o, |r, o| k::add_inplace(o, &other[r]))
            }
            // out == a == b: x + x, elementwise.
            (Src::Out, Src::Out) => par_elems(pool, o, |_, o| o.iter_mut().for_each(|x| *x += *x)),
        })?;
        Ok(())
    }

    /// A gated activation (`out = act(gate) · up`, elementwise) split across the pool: the
    /// SIMD twin on each part, so bit-identical.
    fn gated(
        &mut self,
        out: View<BufId>,
        gate: View<BufId>,
        up: View<BufId>,
        len: usize,
        f: crate::simd::Gated,
    ) -> Result<()> {
        let Cpu { host, pool, .. } = self;
        host.with_out(out, len, |o, inputs, _| {
            let up = inputs.slice(up, len);
            let gate = match inputs.src(gate, len) {
                Src::Out => None,
                Src::Slice(g) => Some(g),
            };
            par_elems(pool, o, |r, o| f(o, gate.map(|g| &g[r.clone()]), &up[r]));
        })?;
        Ok(())
    }

    /// RoPE from the step's table (the reference's `rope_cos_sin` values, computed once per step
    /// and frequency set), rows split across the pool: bit-identical to `kernels::ops::rope`.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &mut self,
        step: &Step<'_>,
        x: View<BufId>,
        rows: usize,
        heads: usize,
        head_dim: usize,
        theta: f32,
        scale: f32,
        mode: RopeMode,
    ) -> Result<()> {
        let width = heads * head_dim;
        let len = rows * width;
        if len == 0 {
            return Ok(());
        }
        let half = head_dim / 2;
        let ti = self.rope_table(step, theta, scale, head_dim)?;
        let Cpu { host, pool, rope, .. } = self;
        let cs = &rope[ti].cos_sin;
        host.with_out(x, len, |o, _, _| {
            par_rows(pool, o, width, rows, len, |t, row| {
                for head in row.chunks_exact_mut(head_dim) {
                    rope_head(head, &cs[t * half * 2..(t + 1) * half * 2], mode);
                }
            })
        })?;
        Ok(())
    }

    /// The index in `self.rope` of the step's cos/sin table for these frequencies (the
    /// reference's `rope_cos_sin`, `(t·half + i)·2 ..` for row `t`), computed once per step.
    fn rope_table(&mut self, step: &Step<'_>, theta: f32, scale: f32, head_dim: usize) -> Result<usize> {
        let half = head_dim / 2;
        let key = (theta.to_bits(), scale.to_bits(), head_dim);
        let rope = &mut self.rope;
        let ti = match rope.iter().position(|t| t.key == key) {
            Some(i) => i,
            None => {
                rope.push(RopeTable { key, ..Default::default() });
                rope.len() - 1
            }
        };
        let table = &mut rope[ti];
        if !table.valid {
            let n = step.positions.len();
            grow(&mut table.cos_sin, n * half * 2)?;
            for (t, &pos) in step.positions.iter().enumerate() {
                for i in 0..half {
                    let (c, s) = k::rope_cos_sin(i, pos, head_dim, theta, scale);
                    table.cos_sin[(t * half + i) * 2] = c;
                    table.cos_sin[(t * half + i) * 2 + 1] = s;
                }
            }
            table.valid = true;
        }
        Ok(ti)
    }

    /// `rows` rows of `cols` quantized into the output's words as blocks, rows split across the
    /// pool: the SIMD twins of `quantize_q8a`/`q8k`.
    fn quantize_act(
        &mut self,
        out: View<BufId>,
        x: View<BufId>,
        rows: usize,
        cols: usize,
        layout: ActLayout,
    ) -> Result<()> {
        let Cpu { host, pool, k, .. } = self;
        let k = *k;
        let per = cols / act_block(layout) * act_words(layout);
        host.with_out(out, rows * per, |o, inputs, _| {
            let xs = inputs.slice(x, rows * cols);
            par_rows(pool, o, per, rows, rows * cols, |t, dst| {
                let xr = &xs[t * cols..(t + 1) * cols];
                match layout {
                    ActLayout::Q8A => (k.quantize_q8a)(xr, q8a_blocks_mut(dst)),
                    ActLayout::Q8K => (k.quantize_q8k)(xr, q8k_blocks_mut(dst)),
                }
            })
        })?;
        Ok(())
    }

    /// The integer matmul on activations a `QuantizeAct` left in `xq`.
    fn matmul_q8(&mut self, out: View<BufId>, xq: View<BufId>, w: WeightId, n: usize) -> Result<()> {
        let Cpu { host, pool, k, scratch, .. } = self;
        let k = *k;
        let wt = host.weight(w).ok_or(CheckError::UnknownWeight { what: "MatMulQ8 weight" })?;
        let (rows, cols, fmt, rb) = (wt.rows, wt.cols, wt.format, wt.row_bytes());
        let layout = fmt.act_layout().ok_or(CheckError::Invalid { op: "MatMulQ8", msg: "a float weight" })?;
        let words = n * (cols / act_block(layout)) * act_words(layout);
        host.with_out(out, n * rows, |o, inputs, weights| {
            let wbytes = weight(weights, w).data.as_slice();
            let xs = inputs.slice(xq, words);
            match layout {
                ActLayout::Q8A => {
                    par_gemm(pool, scratch, fmt, wbytes, rows, cols, rb, q8a_blocks(xs), n, o, k.gemm_q8a)
                }
                ActLayout::Q8K => {
                    par_gemm(pool, scratch, fmt, wbytes, rows, cols, rb, q8k_blocks(xs), n, o, k.gemm_q8k)
                }
            }
        })??;
        Ok(())
    }

    fn matmul(&mut self, out: View<BufId>, x: View<BufId>, w: WeightId, n: usize, act: ActQuant) -> Result<()> {
        let Cpu { host, pool, k, qa, qk, held, scratch, .. } = self;
        let k = *k;
        let wt = host.weight(w).ok_or(CheckError::UnknownWeight { what: "MatMul weight" })?;
        let (rows, cols, fmt, rb) = (wt.rows, wt.cols, wt.format, wt.row_bytes());
        if let Format::Int(p) = fmt {
            // No integer dot for these yet: f32 activations whatever `act` says (as the reference).
            return self.matmul_int(out, x, w, n, p);
        }
        let layout = if act == ActQuant::Int8 { fmt.act_layout() } else { None };
        let key = layout.map(|l| ActKey { x, n, cols, k: l == ActLayout::Q8K });
        if let Some(key) = key
            && *held != Some(key)
        {
            *held = None;
            let per = cols / if key.k { 256 } else { 32 };
            if key.k { grow(qk, n * per)? } else { grow(qa, n * per)? }
        }
        host.with_out(out, n * rows, |o, inputs, weights| {
            let wbytes = weight(weights, w).data.as_slice();
            let xs = inputs.slice(x, n * cols);
            let Some(key) = key else {
                return par_gemm(pool, scratch, fmt, wbytes, rows, cols, rb, xs, n, o, k.gemm_f32);
            };
            // Quantize each token once; the next matmuls reading the same rows reuse it.
            if key.k {
                let per = cols / 256;
                if *held != Some(key) {
                    par_rows(pool, &mut qk[..n * per], per, n, n * cols, |t, dst| {
                        (k.quantize_q8k)(&xs[t * cols..(t + 1) * cols], dst)
                    });
                    *held = Some(key);
                }
                par_gemm(pool, scratch, fmt, wbytes, rows, cols, rb, &qk[..n * per], n, o, k.gemm_q8k)
            } else {
                let per = cols / 32;
                if *held != Some(key) {
                    par_rows(pool, &mut qa[..n * per], per, n, n * cols, |t, dst| {
                        (k.quantize_q8a)(&xs[t * cols..(t + 1) * cols], dst)
                    });
                    *held = Some(key);
                }
                par_gemm(pool, scratch, fmt, wbytes, rows, cols, rb, &qa[..n * per], n, o, k.gemm_q8a)
            }
        })??;
        Ok(())
    }

    /// A [`Format::Int`] weight times f32 rows: row chunks across the pool; each thread expands
    /// a weight row into its scratch once (`dequant_int`, the kernels' `dequantize_int_row`) and dots it with
    /// every token (`dot_f32`'s twin), exactly as the reference does.
    fn matmul_int(&mut self, out: View<BufId>, x: View<BufId>, w: WeightId, n: usize, p: PackedInt) -> Result<()> {
        let Cpu { host, pool, k, scratch, .. } = self;
        let (dot, expand, dot_rows) = (k.dot_f32, k.dequant_int, k.dot_int);
        let wt = host.weight(w).ok_or(CheckError::UnknownWeight { what: "MatMul weight" })?;
        let (rows, cols) = (wt.rows, wt.cols);
        if n == 0 || rows == 0 {
            return Ok(());
        }
        let threads = pool.threads();
        let serial = threads == 1 || rows * cols * n < SERIAL_BYTES;
        let chunk = if serial { rows } else { rows.div_ceil(threads * 4).max(4) };
        // Per thread: one expanded row, then the chunk's results for every token.
        for s in scratch.iter() {
            let mut sc = lock(s);
            grow(&mut sc.scores, cols)?;
            grow(&mut sc.tile, chunk * n)?;
        }
        host.with_out(out, n * rows, |o, inputs, weights| {
            let wt = weight(weights, w);
            let xs = inputs.slice(x, n * cols);
            let chunks = Chunks::new(rows, chunk);
            let d = Disjoint::new(o);
            let work = |i: usize| {
                let mut sc = lock(&scratch[i]);
                let Scratch { tile, scores: wrow, .. } = &mut *sc;
                let wrow = &mut wrow[..cols];
                for r in &chunks {
                    let len = r.len();
                    if n == 1 {
                        // One token: four rows' chains at once, each row read once, unexpanded,
                        // straight into the output.
                        // SAFETY: row range r is handed to exactly one thread.
                        let dst = unsafe { d.part(r.start, len) };
                        for (a, o) in r.clone().step_by(4).zip(dst.chunks_mut(4)) {
                            let rows: [_; 4] = core::array::from_fn(|i| wt.int_row((a + i).min(r.end - 1)));
                            dot_rows(p, &rows[..o.len()], &xs[..cols], o);
                        }
                        continue;
                    }
                    for (i, row) in r.clone().enumerate() {
                        expand(p, wt.int_row(row), wrow);
                        for t in 0..n {
                            tile[t * len + i] = dot(wrow, &xs[t * cols..(t + 1) * cols]);
                        }
                    }
                    for t in 0..n {
                        // SAFETY: row range r of every token row is handed to exactly one thread.
                        let dst = unsafe { d.part(t * rows + r.start, len) };
                        dst.copy_from_slice(&tile[t * len..(t + 1) * len]);
                    }
                }
            };
            if serial { work(0) } else { pool.run(&work) }
        })?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        step: &Step<'_>,
        out: View<BufId>,
        q: View<BufId>,
        kc: View<BufId>,
        vc: View<BufId>,
        [heads, kv_heads, head_dim, window, ring]: [usize; 5],
        scale: f32,
        cap: f32,
        kvt: KvType,
    ) -> Result<()> {
        let Cpu { host, pool, k, scratch, .. } = self;
        let k = *k;
        let group = heads / kv_heads;
        let (qw, kvw) = (heads * head_dim, kv_heads * head_dim);
        let cache_rows = host.buffer(kc.buf).map_or(0, <[f32]>::len) / kvt.row_words(kvw);
        let q_len = step.rows() * qw;
        let kv_len = cache_rows_needed(step, ring, "Attention")? * kvt.row_words(kvw);
        // Rows per task: consecutive rows of one sequence share every key and value read from the
        // cache (prefill); one row per task when there are few rows to spread (decode).
        let rows_total = step.seqs.iter().map(|s| s.len as usize).sum::<usize>();
        let per =
            (rows_total * kv_heads).div_ceil(pool.threads() * 4).clamp(1, BLOCK_ROWS).min((MAX_QUERIES / group).max(1));
        // Longest key range of any query, and the scores scratch sized once for the whole cache
        // (so a growing context never allocates).
        let longest = step.seqs.iter().map(|s| (s.pos0 + s.len) as usize).max().unwrap_or(0);
        let longest = if window > 0 { longest.min(window) } else { longest };
        let ld = longest.max(cache_rows);
        for s in scratch.iter() {
            let mut s = lock(s);
            grow(&mut s.scores, per * group * ld)?;
            if kvt == KvType::F16 {
                // A block of keys (or values), widened.
                grow(&mut s.kv, KEY_BLOCK * head_dim)?;
            }
        }
        host.with_out(out, q_len, |o, inputs, _| {
            let qs = inputs.slice(q, q_len);
            let ks = inputs.slice(kc, kv_len);
            let vs = inputs.slice(vc, kv_len);
            // One task per (block of rows, kv head): the group of query heads reading that kv
            // head, in every row of the block, shares each key and value load. Blocks are
            // numbered across the step's sequences. With fewer such tasks than threads (decode
            // with few kv heads: Gemma 3 270M has one), each group is split into `split` parts
            // of `sub` heads; every head's result is computed alone either way.
            let blocks = step.seqs.iter().map(|s| (s.len as usize).div_ceil(per)).sum::<usize>();
            let want = pool.threads().div_ceil(blocks * kv_heads);
            let split = (1..=group.min(want)).rev().find(|d| group % d == 0).unwrap_or(1);
            let sub = group / split;
            let tasks = blocks * kv_heads * split;
            let d = Disjoint::new(o);
            let run = |range: Range<usize>, sc: &mut Scratch| {
                for task in range {
                    let (mut blk, g, part) = (task / (kv_heads * split), task / split % kv_heads, task % split);
                    let Some(seq) = step.seqs.iter().find(|s| {
                        let nb = (s.len as usize).div_ceil(per);
                        let hit = blk < nb;
                        if !hit {
                            blk -= nb;
                        }
                        hit
                    }) else {
                        return;
                    };
                    let row0 = blk * per;
                    let m = per.min(seq.len as usize - row0);
                    let base = seq.row_of(0, ring) * kvw + g * head_dim;
                    let w = sub * head_dim;
                    let mut rows: [BlockRow<'_>; BLOCK_ROWS] = Default::default();
                    for (r, br) in rows.iter_mut().enumerate().take(m) {
                        let t = seq.row as usize + row0 + r;
                        let p = seq.pos0 as usize + row0 + r;
                        let first = if window > 0 { (p + 1).saturating_sub(window) } else { 0 };
                        let qo = t * qw + (g * group + part * sub) * head_dim;
                        // SAFETY: each (row, kv head, part) belongs to exactly one task, which
                        // owns its heads out[qo..qo + w].
                        br.out = unsafe { d.part(qo, w) };
                        br.q = &qs[qo..qo + w];
                        br.keys = first..p + 1;
                    }
                    let (k_at, v_at) = match kvt {
                        KvType::F32 => (Kv::F32(&ks[base..]), Kv::F32(&vs[base..])),
                        KvType::F16 => {
                            let (kh, vh): (&[u16], &[u16]) = (bytemuck::cast_slice(ks), bytemuck::cast_slice(vs));
                            (Kv::F16(&kh[base..]), Kv::F16(&vh[base..]))
                        }
                    };
                    let kv = Keys { k: k_at, v: v_at, stride: kvw, ring };
                    let Scratch { scores, kv: wide, .. } = &mut *sc;
                    attend_block(&k, &mut rows[..m], head_dim, &kv, scale, cap, scores, ld, wide);
                }
            };
            if blocks * kv_heads * group * per * longest * head_dim < SERIAL_BYTES {
                run(0..tasks, &mut lock(&scratch[0]));
            } else {
                let chunks = Chunks::new(tasks, (tasks / (pool.threads() * 8)).max(1));
                pool.run(&|i| {
                    let mut sc = lock(&scratch[i]);
                    for r in &chunks {
                        run(r, &mut sc);
                    }
                });
            }
        })?;
        Ok(())
    }
}

/// Most rows an attention task takes together.
const BLOCK_ROWS: usize = 8;
/// Most (row, query head) pairs an attention task holds statistics for.
const MAX_QUERIES: usize = 64;
/// Keys a task scores (or adds the values of) for all its rows before moving on: their keys and
/// values stay in the core's caches meanwhile.
const KEY_BLOCK: usize = 64;

/// RoPE of one head in place from its row's table (`cs[2i]`, `cs[2i + 1]` = cos, sin of pair
/// `i`): `rotate(a, b) = (a·cos − b·sin, b·cos + a·sin)`, as the reference.
fn rope_head(head: &mut [f32], cs: &[f32], mode: RopeMode) {
    let half = head.len() / 2;
    for i in 0..half {
        let (c, s) = (cs[2 * i], cs[2 * i + 1]);
        let (ia, ib) = match mode {
            RopeMode::Neox => (i, i + half),
            RopeMode::Interleaved => (2 * i, 2 * i + 1),
        };
        let (a, b) = (head[ia], head[ib]);
        head[ia] = a * c - b * s;
        head[ib] = b * c + a * s;
    }
}

/// `f(range, out[range])` over `out` in parts, split across the pool when it is long: for
/// elementwise ops, whose parts compute exactly what the whole would.
fn par_elems(pool: &Pool, out: &mut [f32], f: impl Fn(Range<usize>, &mut [f32]) + Sync) {
    let len = out.len();
    if len < PAR_ELEMS || pool.threads() == 1 {
        f(0..len, out);
        return;
    }
    let d = Disjoint::new(out);
    let chunks = Chunks::new(len, len.div_ceil(pool.threads() * 4).next_multiple_of(8));
    pool.run(&|_| {
        for r in &chunks {
            // SAFETY: each range is handed to exactly one thread.
            f(r.clone(), unsafe { d.part(r.start, r.len()) });
        }
    });
}

/// `kernels::ops::argmax` of a row: a vocabulary-long row (Gemma's 262,144 logits) is split
/// across the pool, each part giving its largest key and that key's first index, and the
/// largest of those wins, the first on ties. Argmax does not depend on the order in which values
/// are compared, so this is the reference's index.
fn par_argmax(pool: &Pool, x: &[f32]) -> u32 {
    const PART: usize = 16 << 10;
    if x.len() < 4 * PART || pool.threads() == 1 {
        let (key, i) = lanes_argmax(x);
        return if key == f32::NEG_INFINITY { 0 } else { i as u32 };
    }
    let best = Mutex::new((f32::NEG_INFINITY, usize::MAX));
    let chunks = Chunks::new(x.len(), PART);
    pool.run(&|_| {
        let mut mine = (f32::NEG_INFINITY, usize::MAX);
        for r in &chunks {
            let (key, i) = lanes_argmax(&x[r.clone()]);
            mine = first_max(mine, (key, r.start + i));
        }
        let mut b = lock(&best);
        *b = first_max(*b, mine);
    });
    let (key, i) = *lock(&best);
    // All keys −∞ (or NaN): the reference's 0.
    if key == f32::NEG_INFINITY { 0 } else { i as u32 }
}

/// The argmax of each of several rows (a batched step's logits) as one pool job over every
/// row's parts, `out[r]` = row `r`'s (as [`par_argmax`]: the pairs combine in any order).
/// `false`: one row, or more than this handles at once; the caller takes them one by one.
fn par_argmax_rows(pool: &Pool, x: &[f32], cols: usize, out: &mut [f32]) -> bool {
    const PART: usize = 16 << 10;
    const MAX_ROWS: usize = 64;
    let rows = out.len();
    if !(2..=MAX_ROWS).contains(&rows) || pool.threads() == 1 || cols == 0 {
        return false;
    }
    let per = cols.div_ceil(PART);
    let best = Mutex::new([(f32::NEG_INFINITY, usize::MAX); MAX_ROWS]);
    let chunks = Chunks::new(rows * per, 1);
    pool.run(&|_| {
        for c in &chunks {
            for t in c {
                let (r, p) = (t / per, t % per);
                let part = p * PART..((p + 1) * PART).min(cols);
                let (key, i) = lanes_argmax(&x[r * cols + part.start..r * cols + part.end]);
                let mut b = lock(&best);
                b[r] = first_max(b[r], (key, part.start + i));
            }
        }
    });
    let b = lock(&best);
    for (o, &(key, i)) in out.iter_mut().zip(b.iter()) {
        // All keys −∞ (or NaN): the reference's 0.
        *o = if key == f32::NEG_INFINITY { 0.0 } else { i as f32 };
    }
    true
}

/// The larger key of two (key, index) pairs, the smaller index on ties.
fn first_max(a: (f32, usize), b: (f32, usize)) -> (f32, usize) {
    if b.0 > a.0 || b.0 == a.0 && b.1 < a.1 { b } else { a }
}

/// The largest [`k::argmax_key`] of `x` and its first index, over 16 independent lanes so that
/// the compiler vectorises the selects (`v > MAX` maps +∞ to `f32::MAX`; a NaN is never greater,
/// as its key −∞ would not be), then the lanes combined by [`first_max`].
fn lanes_argmax(x: &[f32]) -> (f32, usize) {
    const L: usize = 16;
    let mut key = [f32::NEG_INFINITY; L];
    let mut idx = [u32::MAX; L];
    let whole = x.len() / L * L;
    for (c, vals) in x[..whole].chunks_exact(L).enumerate() {
        let base = (c * L) as u32;
        for j in 0..L {
            let v = if vals[j] > f32::MAX { f32::MAX } else { vals[j] };
            let gt = v > key[j];
            key[j] = if gt { v } else { key[j] };
            idx[j] = if gt { base + j as u32 } else { idx[j] };
        }
    }
    let mut best = (f32::NEG_INFINITY, usize::MAX);
    for j in 0..L {
        best = first_max(best, (key[j], idx[j] as usize));
    }
    for (i, &v) in x.iter().enumerate().skip(whole) {
        best = first_max(best, (k::argmax_key(v), i));
    }
    best
}

/// The keys a query sees: key `j` is `k[r·stride..][..d]`, its value `v[r·stride..][..d]`, at
/// row `r = j` (`ring == 0`) or `r = j % ring` (a ring cache).
struct Keys<'a> {
    k: Kv<'a>,
    v: Kv<'a>,
    stride: usize,
    ring: usize,
}

/// A cache's elements from a head's first one: f32, or f16 bits (widened a block at a time).
#[derive(Clone, Copy)]
enum Kv<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
}

impl Kv<'_> {
    /// Rows `row..row + n` (of `d` elements, `stride` apart) as f32: in place, or widened into
    /// `buf` (then `stride` apart becomes `d` apart). Returns the slice and its stride.
    fn rows<'b>(
        &'b self,
        k: &Kernels,
        row: usize,
        n: usize,
        d: usize,
        stride: usize,
        buf: &'b mut [f32],
    ) -> (&'b [f32], usize) {
        match *self {
            Kv::F32(x) => (&x[row * stride..], stride),
            Kv::F16(h) => {
                for j in 0..n {
                    (k.widen_f16)(&h[(row + j) * stride..][..d], &mut buf[j * d..(j + 1) * d]);
                }
                (&buf[..n * d], d)
            }
        }
    }
}

impl Keys<'_> {
    /// The row of key `j`: a block of keys that does not cross a multiple of `ring` lies in
    /// consecutive rows from there.
    fn row(&self, j: usize) -> usize {
        if self.ring == 0 { j } else { j % self.ring }
    }
}

/// One row of an attention task: its query heads (a group sharing one kv head), where they go,
/// and the keys the row sees.
#[derive(Default)]
struct BlockRow<'a> {
    out: &'a mut [f32],
    q: &'a [f32],
    keys: Range<usize>,
}

/// `purehw_kernels::ops::attend` for each query head of each row, bit for bit: each head's scores
/// once into scratch (the reference computes them twice, identically), `exp` in key order,
/// `out += e·v` as a product then a sum in key order, then divide. Keys go in blocks of
/// `KEY_BLOCK`, each block taken by every row that sees it. Row `r`'s scores for head `h` are
/// `scores[(r·group + h)·ld ..]`, key `j` of its range at offset `j − keys.start`.
#[allow(clippy::too_many_arguments)]
fn attend_block(
    k: &Kernels,
    rows: &mut [BlockRow<'_>],
    d: usize,
    kv: &Keys<'_>,
    scale: f32,
    cap: f32,
    scores: &mut [f32],
    ld: usize,
    wide: &mut [f32],
) {
    let Some(group) = rows.first().map(|r| r.q.len() / d) else {
        return;
    };
    if rows.len() * group > MAX_QUERIES {
        // Wider groups than any model has: one row and head at a time.
        for r in rows.iter_mut() {
            for h in 0..group {
                let mut one = [BlockRow {
                    out: &mut r.out[h * d..(h + 1) * d],
                    q: &r.q[h * d..(h + 1) * d],
                    keys: r.keys.clone(),
                }];
                attend_block(k, &mut one, d, kv, scale, cap, scores, ld, wide);
            }
        }
        return;
    }
    let stride = kv.stride;
    let mut ranges: [Range<usize>; BLOCK_ROWS] = Default::default();
    for (k, row) in ranges.iter_mut().zip(rows.iter()) {
        *k = row.keys.clone();
    }
    let ranges = &ranges[..rows.len()];
    let mut max = [f32::NEG_INFINITY; MAX_QUERIES];
    let mut sum = [0f32; MAX_QUERIES];
    for row in rows.iter_mut() {
        row.out.fill(0.0);
    }
    // Scores.
    each_key_block(ranges, kv.ring, |r, a, b| {
        let at = r * group * ld + (a - ranges[r].start);
        let (keys, ks) = kv.k.rows(k, kv.row(a), b - a, d, stride, wide);
        (k.dot_keys)(rows[r].q, d, keys, ks, b - a, &mut scores[at..], ld);
    });
    // Scale, softcap, max; exp(s − max) per head (elementwise, so vectorised exactly), summed in
    // key order.
    for (r, keys) in ranges.iter().enumerate() {
        let n = keys.len();
        for h in 0..group {
            let i = r * group + h;
            let sc = &mut scores[i * ld..i * ld + n];
            for s in sc.iter_mut() {
                let v = *s * scale;
                *s = if cap > 0.0 { softcap(v, cap) } else { v };
                max[i] = max[i].max(*s);
            }
            (k.exp_sub)(sc, max[i]);
            sum[i] = sc.iter().fold(0f32, |acc, &e| acc + e);
        }
    }
    // Values (each output element's chain stays in key order).
    each_key_block(ranges, kv.ring, |r, a, b| {
        let at = r * group * ld + (a - ranges[r].start);
        let (vals, vs) = kv.v.rows(k, kv.row(a), b - a, d, stride, wide);
        (k.axpy_keys)(rows[r].out, d, &scores[at..], ld, b - a, vals, vs);
    });
    for (r, row) in rows.iter_mut().enumerate() {
        if row.keys.is_empty() {
            continue;
        }
        for h in 0..group {
            for o in &mut row.out[h * d..(h + 1) * d] {
                *o /= sum[r * group + h];
            }
        }
    }
}

/// `f(r, a, b)` for each block of `KEY_BLOCK` keys, in key order, and each row `r` whose keys
/// (`ranges[r]`) meet the block: `a..b` is the part of the block that row sees. With a ring
/// (`ring > 0`) a block also ends at each multiple of `ring`, so its keys lie in consecutive rows.
fn each_key_block(ranges: &[Range<usize>], ring: usize, mut f: impl FnMut(usize, usize, usize)) {
    let lo = ranges.iter().map(|r| r.start).min().unwrap_or(0);
    let hi = ranges.iter().map(|r| r.end).max().unwrap_or(0);
    let mut jb = lo;
    while jb < hi {
        let mut je = (jb + KEY_BLOCK).min(hi);
        if let Some(wrap) = jb.checked_div(ring) {
            je = je.min((wrap + 1) * ring);
        }
        for (r, keys) in ranges.iter().enumerate() {
            let (a, b) = (jb.max(keys.start), je.min(keys.end));
            if a < b {
                f(r, a, b);
            }
        }
        jb = je;
    }
}

/// A GEMM kernel over activations of type `A` (see `simd::GemmA`).
type Gemm<A> = fn(Format, &[u8], usize, usize, &[A], usize, &mut [f32]);

/// Run `f(t, dst)` for each of `n` rows of `per` elements of `out`, split across the pool when
/// there are several rows and `work` (elements touched) is worth a dispatch.
fn par_rows<T: Send>(
    pool: &Pool,
    out: &mut [T],
    per: usize,
    n: usize,
    work: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    if n < 2 || work < PAR_ELEMS || pool.threads() == 1 || per == 0 {
        for (t, dst) in out.chunks_exact_mut(per.max(1)).enumerate().take(n) {
            f(t, dst);
        }
        return;
    }
    let d = Disjoint::new(out);
    let chunks = Chunks::new(n, n.div_ceil(pool.threads() * 4));
    pool.run(&|_| {
        for r in &chunks {
            for t in r {
                // SAFETY: row t is handed to exactly one thread by `chunks`.
                f(t, unsafe { d.part(t * per, per) });
            }
        }
    });
}

/// Rows per chunk of a one-token matmul over `threads`: about eight chunks a thread, but at
/// least 16 KiB of weights (enough to stream), whole 8-row groups (the SIMD dots' row tiles).
fn decode_chunk(rows: usize, row_bytes: usize, threads: usize) -> usize {
    let min = (16 << 10) / row_bytes.max(1);
    rows.div_ceil(threads * 8).max(min).max(1).next_multiple_of(8)
}

/// `out[t·rows + r] = gemm(row r, token t)` for all rows and tokens, rows split across the pool.
/// `act` holds `per` items per token (`f32` values or quantized blocks).
#[allow(clippy::too_many_arguments)]
fn par_gemm<A: Sync>(
    pool: &Pool,
    scratch: &[Mutex<Scratch>],
    fmt: Format,
    w: &[u8],
    rows: usize,
    cols: usize,
    row_bytes: usize,
    act: &[A],
    n: usize,
    out: &mut [f32],
    gemm: Gemm<A>,
) -> Result<()> {
    let threads = pool.threads();
    if n == 0 || rows == 0 {
        return Ok(());
    }
    let serial = threads == 1 || rows * row_bytes * n < SERIAL_BYTES;
    if n == 1 {
        // Decode: contiguous output, chunks large enough to stream (≥ 16 KiB of weights).
        if serial {
            gemm(fmt, w, rows, cols, act, 1, out);
            return Ok(());
        }
        let chunks = Chunks::new(rows, decode_chunk(rows, row_bytes, threads));
        let d = Disjoint::new(out);
        pool.run(&|_| {
            for r in &chunks {
                // SAFETY: each row range is handed to exactly one thread.
                let dst = unsafe { d.part(r.start, r.len()) };
                gemm(fmt, &w[r.start * row_bytes..r.end * row_bytes], r.len(), cols, act, 1, dst);
            }
        });
        return Ok(());
    }
    // Prefill and batched decode: row chunks × all tokens, through a per-thread tile, then
    // scattered. At least 8 rows a chunk, the SIMD GEMMs' token-pair tiles.
    let chunk = if serial { rows } else { rows.div_ceil(threads * 4).clamp(8, 64).next_multiple_of(4) };
    for s in scratch {
        grow(&mut lock(s).tile, chunk * n)?;
    }
    let chunks = Chunks::new(rows, chunk);
    let d = Disjoint::new(out);
    let work = |i: usize| {
        let mut sc = lock(&scratch[i]);
        for r in &chunks {
            let tile = &mut sc.tile[..r.len() * n];
            gemm(fmt, &w[r.start * row_bytes..r.end * row_bytes], r.len(), cols, act, n, tile);
            for t in 0..n {
                // SAFETY: row range r of every token row is handed to exactly one thread.
                let dst = unsafe { d.part(t * rows + r.start, r.len()) };
                dst.copy_from_slice(&tile[t * r.len()..(t + 1) * r.len()]);
            }
        }
    };
    if serial {
        work(0)
    } else {
        pool.run(&work)
    }
    Ok(())
}

/// One matmul of a fused decode group: its weight's rows and the output region they fill.
struct Mat<'a> {
    fmt: Format,
    w: &'a [u8],
    rows: usize,
    row_bytes: usize,
    out: Disjoint<'a, f32>,
    /// Rows per chunk handed out.
    chunk: usize,
}

/// The activation a fused gate/up pair applies on each chunk: into `out`, or in place into the
/// gate's rows (`None`).
struct Epilogue<'a> {
    out: Option<Disjoint<'a, f32>>,
    f: crate::simd::Gated,
}

impl Cpu {
    /// A fused op's own decode path where there is one (one token, or a batched decode step of
    /// up to [`FUSED_MAX_N`]): q/k/v, or gate/up and the activation, as one pool job; the rest of
    /// its expansion then runs op by op. `Ok(false)`: none here, the caller runs the whole
    /// expansion.
    pub(crate) fn fused(&mut self, step: &Step<'_>, op: &Op<BufId, WeightId>) -> Result<bool> {
        let done = match *op {
            Op::Qkv { x: MatIn::Q8(xq), wq, wk, wv, q, k, v, n: n @ 1..=FUSED_MAX_N, .. } => {
                let done = self.fused_q8(xq, n, &[(q, wq), (k, wk), (v, wv)], None)?;
                // Several rows: the epilogue (norms, RoPE, the caches) as one job too.
                if done && n >= 2 && self.fused_qkv_epilogue(step, op)? {
                    self.held = None;
                    return Ok(true);
                }
                done
            }
            Op::GatedFfn { x: MatIn::Q8(xq), w_gate, w_up, gate, up, out, n: n @ 1..=FUSED_MAX_N, kind, .. } => {
                let f = match kind {
                    Gate::GeluTanh => self.k.gelu_mul,
                    Gate::Silu => self.k.silu_mul,
                };
                self.fused_q8(xq, n, &[(gate, w_gate), (up, w_up)], Some((out, f)))?
            }
            Op::HeadArgmax { out, xq, w, n: n @ 2..=16, .. } => return self.head_argmax(out, xq, w, n),
            Op::AddRmsNorm { x, x_out, branch, post, out, w, quant, rows: rows @ 2.., dim, eps } => {
                // The whole junction done here: nothing of the expansion is left to run.
                let done = self.fused_norm(x, x_out, branch, post, out, w, quant, rows, dim, eps)?;
                if done {
                    self.held = None;
                }
                return Ok(done);
            }
            _ => false,
        };
        if done {
            self.held = None;
            op.expand(|o| match o {
                Op::MatMulQ8 { .. } | Op::GeluTanhMul { .. } | Op::SiluMul { .. } => Ok(()),
                o => self.run(step, &o),
            })?;
        }
        Ok(done)
    }

    /// Qkv's epilogue after its matmuls, for a step of several rows, as one pool job of a (row,
    /// head) a task: a q or k head's norm and RoPE in place, a k or v head's part of the row
    /// stored in its cache (`kernels::ops::store_kv_row` on that part). Each head is the
    /// expansion's RmsNorm / Rope / StoreKv on those elements, so the results are identical.
    /// `Ok(false)`: buffers shared in a way this does not cover; the caller expands the rest.
    fn fused_qkv_epilogue(&mut self, step: &Step<'_>, op: &Op<BufId, WeightId>) -> Result<bool> {
        let Op::Qkv {
            q,
            k: kb,
            v,
            n,
            heads,
            kv_heads,
            head_dim: hd,
            q_norm,
            k_norm,
            eps,
            rope,
            k_cache,
            v_cache,
            ring,
            kv,
            ..
        } = *op
        else {
            return Ok(false);
        };
        let mut ids = heapless::Vec::<BufId, 5>::new();
        for b in [Some(q), Some(kb), Some(v), k_cache, v_cache].into_iter().flatten() {
            let _ = ids.push(b.buf);
        }
        if !ids.iter().enumerate().all(|(i, b)| !ids[..i].contains(b)) || n > step.positions.len() {
            return Ok(false);
        }
        let table = match rope {
            Some(r) => Some((self.rope_table(step, r.theta, r.scale, hd)?, r.mode)),
            None => None,
        };
        let cache_rows = cache_rows_needed(step, ring, "Qkv")?;
        let Cpu { host, pool, row, rope: tables, .. } = self;
        host.with_lent(&ids, |taken, _, weights| {
            let (qn, kn) = row.split_at_mut(hd);
            if let Some(w) = q_norm {
                weight(weights, w).dequantize_row(0, qn);
            }
            if let Some(w) = k_norm {
                weight(weights, w).dequantize_row(0, &mut kn[..hd]);
            }
            let (qn, kn) = (&*qn, &kn[..hd]);
            let cs = table.map(|(ti, mode)| (&tables[ti].cos_sin[..], mode));
            let (qw, kvw) = (heads * hd, kv_heads * hd);
            {
                let [tq, tk, tv, rest @ ..] = taken else { unreachable!("q, k and v are lent") };
                let qd = Disjoint::new(&mut tq[q.offset..q.offset + n * qw]);
                let kd = Disjoint::new(&mut tk[kb.offset..kb.offset + n * kvw]);
                let vd = Disjoint::new(&mut tv[v.offset..v.offset + n * kvw]);
                let words = cache_rows * kv.row_words(kvw);
                let mut caches = rest.iter_mut();
                let kc =
                    k_cache.map(|c| Disjoint::new(&mut caches.next().expect("k cache")[c.offset..c.offset + words]));
                let vc =
                    v_cache.map(|c| Disjoint::new(&mut caches.next().expect("v cache")[c.offset..c.offset + words]));
                let half = hd / 2;
                // A row's sequence and its cache row.
                let place = |t: usize| {
                    step.seqs
                        .iter()
                        .find(|s| (s.row as usize..(s.row + s.len) as usize).contains(&t))
                        .map(|s| s.row_of(s.pos0 as usize + (t - s.row as usize), ring))
                };
                let per_row = heads + 2 * kv_heads;
                let chunks = Chunks::new(n * per_row, 1);
                let job = |_| {
                    for c in &chunks {
                        for task in c {
                            let (t, h) = (task / per_row, task % per_row);
                            // SAFETY: each (row, head) part of q, k, v and of the caches belongs to
                            // this task alone.
                            let (x, norm, cache, g) = unsafe {
                                if h < heads {
                                    (qd.part(t * qw + h * hd, hd), q_norm.map(|_| qn), None, 0)
                                } else if h < heads + kv_heads {
                                    let g = h - heads;
                                    (kd.part(t * kvw + g * hd, hd), k_norm.map(|_| kn), kc.as_ref(), g)
                                } else {
                                    let g = h - heads - kv_heads;
                                    (vd.part(t * kvw + g * hd, hd), None, vc.as_ref(), g)
                                }
                            };
                            let rotates = h < heads + kv_heads;
                            if let Some(w) = norm {
                                k::rmsnorm_inplace(x, w, eps);
                            }
                            if let (Some((cs, mode)), true) = (cs, rotates) {
                                rope_head(x, &cs[t * half * 2..(t + 1) * half * 2], mode);
                            }
                            if let (Some(cache), Some(r)) = (cache, place(t)) {
                                let at = kv.row_words(r * kvw + g * hd);
                                // SAFETY: as above: this head's part of row r.
                                let dst = unsafe { cache.part(at, kv.row_words(hd)) };
                                k::store_kv_row(dst, 0, x, kv);
                            }
                        }
                    }
                };
                if pool.threads() == 1 || n * (qw + 2 * kvw) < PAR_ELEMS { job(0) } else { pool.run(&job) }
            }
        });
        Ok(true)
    }

    /// The residual junction (`Op::AddRmsNorm`) of a step of several rows as one pool job, a row
    /// per task: each row's branch norm, add, norm and quantization, the expansion's own kernels
    /// on that row, so the results are identical. `Ok(false)`: buffers shared in a way this
    /// does not cover; the caller expands the op.
    #[allow(clippy::too_many_arguments)]
    fn fused_norm(
        &mut self,
        x: View<BufId>,
        x_out: View<BufId>,
        branch: Option<View<BufId>>,
        post: Option<WeightId>,
        out: View<BufId>,
        w: WeightId,
        quant: Option<QuantOut<BufId>>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<bool> {
        let Cpu { host, pool, k, row, .. } = self;
        let k = *k;
        // Outputs in buffers of their own; x in place or elsewhere; the branch apart from all.
        let outs = [Some(x_out.buf), Some(out.buf), quant.map(|q| q.out.buf)];
        let distinct = x_out.buf != out.buf && quant.is_none_or(|q| q.out.buf != x_out.buf && q.out.buf != out.buf);
        let reads_out = |v: View<BufId>| outs.contains(&Some(v.buf));
        if !distinct || branch.is_some_and(reads_out) || (x.buf != x_out.buf && reads_out(x)) {
            return Ok(false);
        }
        if x.buf == x_out.buf && x.offset != x_out.offset || (branch.is_none() && x != x_out) {
            return Ok(false);
        }
        let lent = [Some(x_out.buf), Some(out.buf), quant.map(|q| q.out.buf)];
        let ids: heapless::Vec<BufId, 3> = lent.into_iter().flatten().collect();
        host.with_lent(&ids, |taken, bufs, weights| {
            // The norm weights side by side in `row` (sized for two at load).
            let (wv, pv) = row.split_at_mut(dim);
            weight(weights, w).dequantize_row(0, wv);
            if let Some(p) = post {
                weight(weights, p).dequantize_row(0, &mut pv[..dim]);
            }
            let (wv, pv) = (&*wv, &pv[..dim]);
            let per = quant.map_or(0, |q| dim / act_block(q.layout) * act_words(q.layout));
            let [xo_buf, out_buf, q_buf @ ..] = taken else { unreachable!("x_out and out are lent") };
            {
                let xs = (x.buf != x_out.buf).then(|| &bufs[x.buf.0 as usize][x.offset..x.offset + rows * dim]);
                let br = branch.map(|b| &bufs[b.buf.0 as usize][b.offset..b.offset + rows * dim]);
                let xo = Disjoint::new(&mut xo_buf[x_out.offset..x_out.offset + rows * dim]);
                let o = Disjoint::new(&mut out_buf[out.offset..out.offset + rows * dim]);
                let qo = quant.map(|q| Disjoint::new(&mut q_buf[0][q.out.offset..q.out.offset + rows * per]));
                let chunks = Chunks::new(rows, 1);
                let job = |_| {
                    for r in &chunks {
                        for t in r {
                            // SAFETY: row t of each output belongs to this task alone.
                            let (xr, orow) = unsafe { (xo.part(t * dim, dim), o.part(t * dim, dim)) };
                            if let Some(b) = br {
                                let b = &b[t * dim..(t + 1) * dim];
                                // The normed branch passes through `out`, as the expansion does.
                                let add: &[f32] = match post {
                                    Some(_) => {
                                        k::rmsnorm(orow, b, pv, eps);
                                        orow
                                    }
                                    None => b,
                                };
                                match xs {
                                    Some(xs) => k::add(xr, &xs[t * dim..(t + 1) * dim], add),
                                    None => k::add_inplace(xr, add),
                                }
                            }
                            k::rmsnorm(orow, xr, wv, eps);
                            if let (Some(qo), Some(q)) = (&qo, quant) {
                                // SAFETY: as above.
                                let dst = unsafe { qo.part(t * per, per) };
                                match q.layout {
                                    ActLayout::Q8A => (k.quantize_q8a)(orow, q8a_blocks_mut(dst)),
                                    ActLayout::Q8K => (k.quantize_q8k)(orow, q8k_blocks_mut(dst)),
                                }
                            }
                        }
                    }
                };
                if pool.threads() == 1 || rows * dim < PAR_ELEMS { job(0) } else { pool.run(&job) }
            }
        });
        Ok(true)
    }

    /// Greedy decoding's LM head over a Q8_0 weight for a step of 2–16 rows, exactly as
    /// `Op::HeadArgmax`'s expansion (the reference's logits, then their argmax) answers, without
    /// most of the logits: an estimate of every logit (`Kernels::head_est_q8_0`: whole block sums,
    /// a few operations per row instead of the 8-lane float chains) with a proven bound `E` on
    /// its distance from the reference's logit; then only the rows whose estimate could still be
    /// the largest (`est + E ≥ max(est − E)`) get their exact logit, and the first largest of
    /// those is the answer. The bound: the reference and the estimate both sum the products
    /// `fl(d_w·d_a)·l` of the same integers `l`, the reference with at most `ab + 4` roundings a
    /// term and the estimate with `ab`, so each is within `γ·Σ|fl(d_w·d_a)·l|` of the exact sum,
    /// and `Σ|l| ≤ 128·Σ|a|` a block (|w| ≤ 128). `Ok(false)`: not this case (another format, no
    /// kernel, a non-finite estimate or bound); the caller runs the expansion.
    fn head_argmax(&mut self, out: View<BufId>, xq: View<BufId>, w: WeightId, n: usize) -> Result<bool> {
        use std::sync::atomic::{AtomicBool, Ordering};
        const CHUNK: usize = 512;
        let Cpu { host, pool, k, scratch, head, head_est, .. } = self;
        let (Some(est), Some(wt), true) = (k.head_est_q8_0, host.weight(w), *head_est) else { return Ok(false) };
        // (`hal::check` holds `vocab` to the weight's rows, above zero.)
        if wt.format != Format::Q8_0 {
            return Ok(false);
        }
        let (rows, ab, rb, gemm) = (wt.rows, wt.cols / 32, wt.row_bytes(), k.gemm_q8a);
        let chunks = rows.div_ceil(CHUNK);
        grow(head, chunks * 16 * 2)?;
        for s in scratch.iter() {
            grow(&mut lock(s).tile, 17 * CHUNK)?;
        }
        let xs = host.buffer(xq.buf).ok_or(CheckError::UnknownBuffer { what: "HeadArgmax xq" })?;
        let act = q8a_blocks(&xs[xq.offset..xq.offset + n * ab * act_words(ActLayout::Q8A)]);
        let mut tk = [0f32; 16];
        for (t, tk) in tk.iter_mut().enumerate().take(n) {
            *tk = head_tk(&act[t * ab..(t + 1) * ab]);
        }
        let w = wt.data.as_slice();
        // Pass 1: every chunk's estimates; per token, the largest lower and upper bounds.
        let stats = Disjoint::new(&mut head[..chunks * n * 2]);
        let ok = AtomicBool::new(true);
        let cks = Chunks::new(chunks, 1);
        let job = |i: usize| {
            let mut sc = lock(&scratch[i]);
            let (ev, dv) = sc.tile.split_at_mut(16 * CHUNK);
            for c in &cks {
                for c in c {
                    let r0 = c * CHUNK;
                    let len = CHUNK.min(rows - r0);
                    est(&w[r0 * rb..(r0 + len) * rb], len, act, n, &mut ev[..n * len], &mut dv[..len]);
                    // SAFETY: chunk c's stats belong to this task alone.
                    let st = unsafe { stats.part(c * n * 2, n * 2) };
                    for t in 0..n {
                        // Sixteen running maxima (vectorizes); non-finite values flagged apart.
                        let (mut lo, mut hi, mut bad) = ([f32::NEG_INFINITY; 16], [f32::NEG_INFINITY; 16], false);
                        for (e, dw) in ev[t * len..(t + 1) * len].chunks(16).zip(dv[..len].chunks(16)) {
                            for (i, (&e, &dw)) in e.iter().zip(dw).enumerate() {
                                let (l, h) = head_bounds(e, dw, tk[t]);
                                bad |= !(l - h).is_finite();
                                lo[i] = if l > lo[i] { l } else { lo[i] };
                                hi[i] = if h > hi[i] { h } else { hi[i] };
                            }
                        }
                        if bad {
                            ok.store(false, Ordering::Relaxed);
                        }
                        st[2 * t] = lo.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                        st[2 * t + 1] = hi.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    }
                }
            }
        };
        if pool.threads() == 1 {
            job(0)
        } else {
            pool.run(&job)
        }
        if !ok.load(Ordering::Relaxed) {
            return Ok(false);
        }
        // Pass 2: each token's threshold, then the exact logits of the chunks' rows above it
        // (their estimates made again: pass 1 keeps only each chunk's bounds).
        let st = &head[..chunks * n * 2];
        let mut ids = [0f32; 16];
        let mut sc = lock(&scratch[0]);
        let (ev, dv) = sc.tile.split_at_mut(16 * CHUNK);
        for (t, id) in ids.iter_mut().enumerate().take(n) {
            let m = (0..chunks).map(|c| st[c * n * 2 + 2 * t]).fold(f32::NEG_INFINITY, f32::max);
            let a = &act[t * ab..(t + 1) * ab];
            let mut best = (f32::NEG_INFINITY, usize::MAX);
            for c in (0..chunks).filter(|&c| st[c * n * 2 + 2 * t + 1] >= m) {
                let r0 = c * CHUNK;
                let len = CHUNK.min(rows - r0);
                est(&w[r0 * rb..(r0 + len) * rb], len, &a[..ab], 1, &mut ev[..len], &mut dv[..len]);
                for r in 0..len {
                    if head_bounds(ev[r], dv[r], tk[t]).1 >= m {
                        let mut l = [0f32];
                        gemm(Format::Q8_0, &w[(r0 + r) * rb..(r0 + r + 1) * rb], 1, wt.cols, a, 1, &mut l);
                        let key = k::argmax_key(l[0]);
                        if key > best.0 || best.1 == usize::MAX {
                            best = (key, r0 + r);
                        }
                    }
                }
            }
            if best.1 == usize::MAX {
                return Ok(false);
            }
            *id = best.1 as f32;
        }
        drop(sc);
        host.write(out, &ids[..n])?;
        Ok(true)
    }

    /// Decode (one token): the matmuls of `mats` all read the quantized activations in `xq`, and
    /// run as one pool job whose chunks cover every weight's rows, so a small k or v projection
    /// costs no dispatch and barrier of its own. With `gate` (`mats` = gate, up), each chunk
    /// takes the same rows of both and applies the activation to them. Each output row is the
    /// same `gemm` call on the same row as [`Self::matmul_q8`]'s, so the results are identical.
    /// `Ok(false)`: this case is not covered (outputs sharing a buffer, weights of two
    /// activation layouts); the caller expands the op instead.
    pub(crate) fn fused_q8(
        &mut self,
        xq: View<BufId>,
        n: usize,
        mats: &[(View<BufId>, WeightId)],
        gate: Option<(View<BufId>, crate::simd::Gated)>,
    ) -> Result<bool> {
        const MAX: usize = 3;
        let Cpu { host, pool, k, scratch, .. } = self;
        let (k, threads) = (*k, pool.threads());
        let Some(&(_, w0)) = mats.first() else { return Ok(true) };
        let cols = host.weight(w0).map_or(0, |w| w.cols);
        let layout = host.weight(w0).and_then(|w| w.format.act_layout());
        let Some(layout) = layout else { return Ok(false) };
        let mut bufs_out = heapless::Vec::<BufId, { MAX + 1 }>::new();
        let mut bytes = 0;
        for &(out, w) in mats {
            let Some(wt) = host.weight(w) else { return Ok(false) };
            if mats.len() > MAX || wt.format.act_layout() != Some(layout) || wt.cols != cols {
                return Ok(false);
            }
            bytes += wt.rows * wt.row_bytes() * n;
            let _ = bufs_out.push(out.buf);
        }
        // The activation goes to its own buffer, or in place over the gate's rows.
        let act_out = match gate {
            Some((out, _)) if out == mats[0].0 => None,
            Some((out, _)) => {
                let _ = bufs_out.push(out.buf);
                Some(out)
            }
            None => None,
        };
        let distinct = bufs_out.iter().enumerate().all(|(i, b)| !bufs_out[..i].contains(b));
        if !distinct || bufs_out.contains(&xq.buf) || gate.is_some() && mats.len() != 2 {
            return Ok(false);
        }
        let words = n * cols / act_block(layout) * act_words(layout);
        let serial = threads == 1 || bytes < SERIAL_BYTES;
        // Several tokens: each chunk's rows × tokens go through a thread's tile (gate and up:
        // two), then to their places.
        let max_chunk = if n == 1 { 0 } else { BATCH_CHUNK_MAX };
        for s in scratch.iter() {
            grow(&mut lock(s).tile, 2 * max_chunk * n)?;
        }

        // Each output buffer lent out of the arena for the job.
        host.with_lent(&bufs_out, |taken, bufs, weights| {
            let xs = &bufs[xq.buf.0 as usize][xq.offset..xq.offset + words];
            let mut outs = taken.iter_mut();
            let mut list = heapless::Vec::<Mat<'_>, MAX>::new();
            for &(out, w) in mats {
                let wt = weight(weights, w);
                let (rows, rb) = (wt.rows, wt.row_bytes());
                let o = outs.next().expect("one buffer per output");
                let chunk = if n == 1 { decode_chunk(rows, rb, threads) } else { batch_chunk(rows, threads) };
                let out = Disjoint::new(&mut o[out.offset..out.offset + n * rows]);
                let _ = list.push(Mat { fmt: wt.format, w: wt.data.as_slice(), rows, row_bytes: rb, out, chunk });
            }
            let epi = gate.map(|(_, f)| Epilogue {
                out: act_out.map(|v| {
                    let o = outs.next().expect("the activation's buffer");
                    Disjoint::new(&mut o[v.offset..v.offset + n * list[0].rows])
                }),
                f,
            });
            if gate.is_some() {
                // Gate and up share one chunk size, so a chunk's rows of both are its own.
                let c = list.iter().map(|m| m.chunk).max().unwrap_or(1);
                list.iter_mut().for_each(|m| m.chunk = c);
            }
            let job = Job { pool, scratch, serial, mats: &list, epi: epi.as_ref(), cols, n };
            match layout {
                ActLayout::Q8A => fused_job(&job, q8a_blocks(xs), k.gemm_q8a),
                ActLayout::Q8K => fused_job(&job, q8k_blocks(xs), k.gemm_q8k),
            }
        });
        Ok(true)
    }
}

/// `Op::HeadArgmax`'s bound factor for one token's blocks `a`: `E = tk·max_b |d_w|` bounds the
/// distance between a row's estimate and its reference logit (see `Cpu::head_argmax`):
/// `tk = γ_{2ab+4}·128·Σ_b |d_a|·Σ|a|`, summed in f64 and rounded up with slack.
pub(crate) fn head_tk(a: &[BlockQ8A]) -> f32 {
    let gamma = (2 * a.len() + 4) as f64 * f64::from(f32::EPSILON) / 2.0 * 1.01;
    let s: f64 =
        a.iter().map(|a| f64::from(a.d.abs()) * a.qs.iter().map(|&q| f64::from(q.unsigned_abs())).sum::<f64>()).sum();
    (s * 128.0 * gamma * (1.0 + 1e-6)) as f32
}

/// A row's estimate `e` widened to `(lo, hi)` with `lo ≤ reference logit ≤ hi`: `e ∓ E'`,
/// `E' = E·1.01 + |e|·2^-22 + 1e-36` so that the rounded sums stay outside `e ∓ E`
/// (`E = tk·dw`, `dw` the row's largest |d_w|).
pub(crate) fn head_bounds(e: f32, dw: f32, tk: f32) -> (f32, f32) {
    let ep = tk * dw * 1.01 + e.abs() * (1.0 / 4194304.0) + 1e-36;
    (e - ep, e + ep)
}

/// Most tokens a fused q/k/v or gate/up job takes (batched decode); longer steps (prefill) take
/// the matmuls one by one.
const FUSED_MAX_N: usize = 16;
/// Most rows of a batched fused job's chunk (its tile is rows × tokens).
const BATCH_CHUNK_MAX: usize = 64;

/// Rows per chunk of a matmul over several tokens (`par_gemm`'s): about four chunks a thread,
/// 8–64 rows, whole 4-row tiles.
fn batch_chunk(rows: usize, threads: usize) -> usize {
    rows.div_ceil(threads * 4).clamp(8, BATCH_CHUNK_MAX).next_multiple_of(4).min(BATCH_CHUNK_MAX)
}

/// A fused group's job: its matmuls, the epilogue, the activations' shape, where it runs.
struct Job<'a> {
    pool: &'a Pool,
    scratch: &'a [Mutex<Scratch>],
    serial: bool,
    mats: &'a [Mat<'a>],
    epi: Option<&'a Epilogue<'a>>,
    cols: usize,
    /// Tokens: each matmul's output is (n, rows).
    n: usize,
}

/// The chunks of every matmul in `j.mats` (with `j.epi`: of the gate/up pair, each chunk both
/// and then the activation) as one pool job, or on this thread when `serial`. One token: each
/// chunk straight into its output; several: through the thread's tile, then each token's row
/// segment to its place (as `par_gemm` does).
fn fused_job<A: Sync>(j: &Job<'_>, act: &[A], gemm: Gemm<A>) {
    let (mats, cols, n) = (j.mats, j.cols, j.n);
    let rows = |m: &Mat<'_>, c: usize| c * m.chunk..((c + 1) * m.chunk).min(m.rows);
    /// Rows `r` of `m` for every token into `tile` (token `t`'s at `t·r.len()`), or straight into
    /// the output (one token), which is then returned.
    #[allow(clippy::mut_from_ref)] // a `Disjoint` part, handed to one thread
    fn part<'m, A>(
        m: &'m Mat<'_>,
        r: Range<usize>,
        cols: usize,
        act: &[A],
        gemm: Gemm<A>,
        n: usize,
        tile: &'m mut [f32],
    ) -> &'m mut [f32] {
        let w = &m.w[r.start * m.row_bytes..r.end * m.row_bytes];
        if n == 1 {
            // SAFETY: each chunk of each matmul is handed to exactly one thread (`fused_job`).
            let dst = unsafe { m.out.part(r.start, r.len()) };
            gemm(m.fmt, w, r.len(), cols, act, 1, dst);
            return dst;
        }
        let tile = &mut tile[..n * r.len()];
        gemm(m.fmt, w, r.len(), cols, act, n, tile);
        for t in 0..n {
            // SAFETY: rows `r` of every token's output row belong to this chunk alone.
            let dst = unsafe { m.out.part(t * m.rows + r.start, r.len()) };
            dst.copy_from_slice(&tile[t * r.len()..(t + 1) * r.len()]);
        }
        tile
    }
    let total: usize = match j.epi {
        Some(_) => mats[0].rows.div_ceil(mats[0].chunk),
        None => mats.iter().map(|m| m.rows.div_ceil(m.chunk)).sum(),
    };
    let chunks = Chunks::new(total, 1);
    let job = |i: usize| {
        let mut sc = (n > 1).then(|| lock(&j.scratch[i]));
        let (t0, t1) = match sc.as_mut() {
            Some(s) => s.tile.split_at_mut(BATCH_CHUNK_MAX * n),
            None => (&mut [][..], &mut [][..]),
        };
        for i in &chunks {
            let mut c = i.start;
            if let Some(e) = j.epi {
                let r = rows(&mats[0], c);
                let len = r.len();
                let g = part(&mats[0], r.clone(), cols, act, gemm, n, t0);
                let u = part(&mats[1], r.clone(), cols, act, gemm, n, t1);
                for t in 0..n {
                    let (gt, ut) = (&g[t * len..(t + 1) * len], &u[t * len..(t + 1) * len]);
                    // SAFETY: as the gate's rows: this chunk's alone, for every token.
                    match &e.out {
                        Some(o) => (e.f)(unsafe { o.part(t * mats[0].rows + r.start, len) }, Some(gt), ut),
                        None if n == 1 => (e.f)(&mut g[..len], None, &u[..len]),
                        None => (e.f)(unsafe { mats[0].out.part(t * mats[0].rows + r.start, len) }, None, ut),
                    }
                }
                continue;
            }
            for m in mats {
                let nc = m.rows.div_ceil(m.chunk);
                if c < nc {
                    part(m, rows(m, c), cols, act, gemm, n, t0);
                    break;
                }
                c -= nc;
            }
        }
    };
    if j.serial { job(0) } else { j.pool.run(&job) }
}

//! Running one op: the heavy ones (`MatMul`, `Attention`) split across the pool on SIMD kernels,
//! the rest through the reference backend.
#![allow(unsafe_code)] // only `Disjoint::part`, each call with a SAFETY line

use std::sync::Mutex;

use purehw_hal::{ActQuant, Format, HostWeight, Op, RopeMode, Step, View};
use purehw_hal_cpu_ref::arena::{Src, cache_rows_needed, grow, invalid, mul, weight, with_out};
use purehw_kernels::ops as k;
use purehw_kernels::ops::softcap;
use purehw_kernels::quant::ActLayout;

use crate::pool::{Chunks, Disjoint, Pool, lock};
use crate::simd::Kernels;
use crate::{ActKey, BufId, Cpu, CpuError, CpuRefError, RopeTable, Scratch, WeightId};

type Result<T> = core::result::Result<T, CpuError>;

/// Elementwise ops with at least this many elements are split across the pool.
const PAR_ELEMS: usize = 4096;

/// Work below this many weight bytes × tokens runs on the calling thread alone.
const SERIAL_BYTES: usize = 64 << 10;

impl Cpu {
    pub(crate) fn run(&mut self, step: &Step<'_>, op: &Op<BufId, WeightId>) -> Result<()> {
        match *op {
            Op::MatMul { out, x, w, n, act } => {
                let r = self.matmul(out, x, w, n, act);
                // The output may overwrite rows the held activations came from.
                if self.held.is_some_and(|h| h.x.buf == out.buf) {
                    self.held = None;
                }
                r
            }
            Op::Attention { out, q, k, v, heads, kv_heads, head_dim, scale, window, softcap } => {
                self.held = None;
                self.attention(step, out, q, k, v, [heads, kv_heads, head_dim, window], scale, softcap)
            }
            Op::Rope { x, rows, heads, head_dim, theta, scale, mode } => {
                self.held = None;
                self.rope(step, x, rows, heads, head_dim, theta, scale, mode)
            }
            Op::GeluTanhMul { out, gate, up, len } => {
                self.held = None;
                let f = self.k.gelu_mul;
                self.gated(out, gate, up, len, f)
            }
            Op::SiluMul { out, gate, up, len } => {
                self.held = None;
                let f = self.k.silu_mul;
                self.gated(out, gate, up, len, f)
            }
            _ => {
                self.held = None;
                Ok(self.inner.run(step, op)?)
            }
        }
    }

    /// A gated activation (`out = act(gate) · up`, elementwise) split across the pool: the
    /// reference kernel on each part, so bit-identical.
    fn gated(
        &mut self,
        out: View<BufId>,
        gate: View<BufId>,
        up: View<BufId>,
        len: usize,
        f: crate::simd::Gated,
    ) -> Result<()> {
        let Cpu { inner, pool, .. } = self;
        let (bufs, _) = inner.parts_mut();
        Ok(with_out(bufs, out, len, "gated activation", |o, inputs| {
            let up = inputs.slice(up, len, "up")?;
            let gate = match inputs.src(gate, len, "gate")? {
                Src::Out => None,
                Src::Slice(g) => Some(g),
            };
            if len < PAR_ELEMS {
                f(o, gate, up);
                return Ok(());
            }
            let d = Disjoint::new(o);
            let chunks = Chunks::new(len, len.div_ceil(pool.threads() * 4).next_multiple_of(8));
            pool.run(&|_| {
                for r in &chunks {
                    // SAFETY: each range is handed to exactly one thread.
                    let o = unsafe { d.part(r.start, r.len()) };
                    f(o, gate.map(|g| &g[r.clone()]), &up[r]);
                }
            });
            Ok(())
        })?)
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
        const OP: &str = "Rope";
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(invalid(OP, "head_dim must be even and > 0").into());
        }
        if rows > step.positions.len() {
            return Err(invalid(OP, "more rows than step.positions").into());
        }
        let width = mul(heads, head_dim, OP)?;
        let len = mul(rows, width, OP)?;
        if len == 0 {
            return Ok(());
        }
        let half = head_dim / 2;
        let key = (theta.to_bits(), scale.to_bits(), head_dim);
        let Cpu { inner, pool, rope, .. } = self;
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
        let cs = &table.cos_sin;
        let (bufs, _) = inner.parts_mut();
        Ok(with_out(bufs, x, len, OP, |o, _| {
            let apply = |t: usize, row: &mut [f32]| {
                for i in 0..half {
                    let (c, s) = (cs[(t * half + i) * 2], cs[(t * half + i) * 2 + 1]);
                    let (ia, ib) = match mode {
                        RopeMode::Neox => (i, i + half),
                        RopeMode::Interleaved => (2 * i, 2 * i + 1),
                    };
                    for head in row.chunks_exact_mut(head_dim) {
                        // rotate(a, b): (a·cos − b·sin, b·cos + a·sin), as the reference.
                        let (a, b) = (head[ia], head[ib]);
                        head[ia] = a * c - b * s;
                        head[ib] = b * c + a * s;
                    }
                }
            };
            if len < PAR_ELEMS {
                o.chunks_exact_mut(width).enumerate().for_each(|(t, r)| apply(t, r));
            } else {
                let d = Disjoint::new(o);
                let chunks = Chunks::new(rows, rows.div_ceil(pool.threads() * 4));
                pool.run(&|_| {
                    for r in &chunks {
                        for t in r {
                            // SAFETY: row t is handed to exactly one thread.
                            apply(t, unsafe { d.part(t * width, width) });
                        }
                    }
                });
            }
            Ok(())
        })?)
    }

    fn matmul(&mut self, out: View<BufId>, x: View<BufId>, w: WeightId, n: usize, act: ActQuant) -> Result<()> {
        const OP: &str = "MatMul";
        let Cpu { inner, pool, k, qa, qk, held, scratch, .. } = self;
        let (bufs, weights) = inner.parts_mut();
        let wt: &HostWeight = weight(weights, w)?;
        let (rows, cols, fmt) = (wt.rows, wt.cols, wt.format);
        let out_len = mul(n, rows, OP)?;
        let x_len = mul(n, cols, OP)?;
        let layout = if act == ActQuant::Int8 { fmt.act_layout() } else { None };
        if let Some(l) = layout {
            let key = ActKey { x, n, cols, k: l == ActLayout::Q8K };
            if *held != Some(key) {
                *held = None;
                let per = cols / if key.k { 256 } else { 32 };
                if key.k { grow(qk, n * per)? } else { grow(qa, n * per)? }
            }
        }
        let k = *k;
        let rb = wt.row_bytes();
        let wbytes = wt.data.as_slice();
        Ok(with_out(bufs, out, out_len, OP, |o, inputs| {
            let xs = inputs.slice(x, x_len, "MatMul x")?;
            match layout {
                None => par_gemm(pool, scratch, fmt, wbytes, rows, cols, rb, xs, n, o, k.gemm_f32)?,
                Some(l) => {
                    let key = ActKey { x, n, cols, k: l == ActLayout::Q8K };
                    if l == ActLayout::Q8A {
                        let per = cols / 32;
                        if *held != Some(key) {
                            par_rows(pool, &mut qa[..n * per], per, n, |t, dst| {
                                (k.quantize_q8a)(&xs[t * cols..(t + 1) * cols], dst)
                            });
                            *held = Some(key);
                        }
                        par_gemm(pool, scratch, fmt, wbytes, rows, cols, rb, &qa[..n * per], n, o, k.gemm_q8a)?
                    } else {
                        let per = cols / 256;
                        if *held != Some(key) {
                            par_rows(pool, &mut qk[..n * per], per, n, |t, dst| {
                                (k.quantize_q8k)(&xs[t * cols..(t + 1) * cols], dst)
                            });
                            *held = Some(key);
                        }
                        par_gemm(pool, scratch, fmt, wbytes, rows, cols, rb, &qk[..n * per], n, o, k.gemm_q8k)?
                    }
                }
            }
            Ok(())
        })?)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        step: &Step<'_>,
        out: View<BufId>,
        q: View<BufId>,
        kc: View<BufId>,
        vc: View<BufId>,
        [heads, kv_heads, head_dim, window]: [usize; 4],
        scale: f32,
        cap: f32,
    ) -> Result<()> {
        const OP: &str = "Attention";
        if heads == 0 || kv_heads == 0 || head_dim == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(invalid(OP, "need heads, kv_heads, head_dim > 0 and kv_heads dividing heads").into());
        }
        let Cpu { inner, pool, k, scratch, .. } = self;
        let k = *k;
        let group = heads / kv_heads;
        let qw = mul(heads, head_dim, OP)?;
        let kvw = mul(kv_heads, head_dim, OP)?;
        let cache_rows = inner.buffer(kc.buf).map_or(0, <[f32]>::len) / kvw;
        let (bufs, _) = inner.parts_mut();
        let q_len = mul(step.rows(), qw, OP)?;
        let kv_len = mul(cache_rows_needed(step, OP)?, kvw, OP)?;
        // Longest key range of any query, and the scores scratch sized once for the whole cache
        // (so a growing context never allocates).
        let longest = step.seqs.iter().map(|s| (s.pos0 + s.len) as usize).max().unwrap_or(0);
        let longest = if window > 0 { longest.min(window) } else { longest };
        for s in scratch.iter() {
            grow(&mut lock(s).scores, group * longest.max(cache_rows))?;
        }
        Ok(with_out(bufs, out, q_len, OP, |o, inputs| {
            let qs = inputs.slice(q, q_len, "Attention q")?;
            let ks = inputs.slice(kc, kv_len, "Attention k")?;
            let vs = inputs.slice(vc, kv_len, "Attention v")?;
            // One task per (query row, kv head): the group of query heads reading that kv head
            // shares each key and value load. Tasks are numbered across the step's sequences.
            let tasks = step.seqs.iter().map(|s| s.len as usize).sum::<usize>() * kv_heads;
            let d = Disjoint::new(o);
            let run = |range: std::ops::Range<usize>, sc: &mut Scratch| {
                for task in range {
                    let (mut row, g) = (task / kv_heads, task % kv_heads);
                    let Some(seq) = step.seqs.iter().find(|s| {
                        let hit = row < s.len as usize;
                        if !hit {
                            row -= s.len as usize;
                        }
                        hit
                    }) else {
                        return;
                    };
                    let t = seq.row as usize + row;
                    let p = seq.pos0 as usize + row;
                    let first = if window > 0 { (p + 1).saturating_sub(window) } else { 0 };
                    let base = seq.cache_row as usize * kvw + g * head_dim;
                    let qo = t * qw + g * group * head_dim;
                    let w = group * head_dim;
                    // SAFETY: each (row, kv head) task owns its group's heads out[qo..qo + w].
                    let dst = unsafe { d.part(qo, w) };
                    let keys = Keys { k: &ks[base..], v: &vs[base..], stride: kvw, range: first..p + 1 };
                    attend_group(&k, dst, &qs[qo..qo + w], head_dim, keys, scale, cap, &mut sc.scores);
                }
            };
            if tasks * longest * head_dim < SERIAL_BYTES {
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
            Ok(())
        })?)
    }
}

/// The keys a query sees: key `j` is `k[j·stride..][..d]`, its value `v[j·stride..][..d]`.
struct Keys<'a> {
    k: &'a [f32],
    v: &'a [f32],
    stride: usize,
    range: std::ops::Range<usize>,
}

/// `purehw_kernels::ops::attend` for each of the query heads in `q` (`q.len() / d` heads sharing
/// one kv head), bit for bit: each head's scores once into scratch (the reference computes them
/// twice, identically), `exp` in key order, `out += e·v` as a product then a sum, then divide.
#[allow(clippy::too_many_arguments)]
fn attend_group(
    k: &Kernels,
    out: &mut [f32],
    q: &[f32],
    d: usize,
    keys: Keys<'_>,
    scale: f32,
    cap: f32,
    scores: &mut [f32],
) {
    let group = q.len() / d;
    out.fill(0.0);
    let n = keys.range.len();
    if n == 0 {
        return;
    }
    let scores = &mut scores[..group * n];
    let mut max = [f32::NEG_INFINITY; 16];
    let mut sum = [0f32; 16];
    if group > max.len() {
        // Wider groups than any model has: one head at a time.
        for h in 0..group {
            let keys = Keys { range: keys.range.clone(), ..keys };
            attend_group(k, &mut out[h * d..(h + 1) * d], &q[h * d..(h + 1) * d], d, keys, scale, cap, scores);
        }
        return;
    }
    for (i, j) in keys.range.clone().enumerate() {
        let kj = &keys.k[j * keys.stride..j * keys.stride + d];
        for h in 0..group {
            let v = (k.dot_f32)(&q[h * d..(h + 1) * d], kj) * scale;
            let s = if cap > 0.0 { softcap(v, cap) } else { v };
            scores[h * n + i] = s;
            max[h] = max[h].max(s);
        }
    }
    // exp(s − max) per head (elementwise, so vectorised exactly), summed in key order.
    for h in 0..group {
        let e = &mut scores[h * n..(h + 1) * n];
        (k.exp_sub)(e, max[h]);
        sum[h] = e.iter().fold(0f32, |acc, &e| acc + e);
    }
    for (i, j) in keys.range.enumerate() {
        let vj = &keys.v[j * keys.stride..j * keys.stride + d];
        for h in 0..group {
            (k.axpy)(&mut out[h * d..(h + 1) * d], scores[h * n + i], vj);
        }
    }
    for h in 0..group {
        for o in &mut out[h * d..(h + 1) * d] {
            *o /= sum[h];
        }
    }
}

/// A GEMM kernel over activations of type `A` (see `simd::GemmA`).
type Gemm<A> = fn(Format, &[u8], usize, usize, &[A], usize, &mut [f32]);

/// Run `f(t, dst)` for each of `n` rows of `per` elements of `out`, split across the pool when
/// there are several rows.
fn par_rows<T: Send>(pool: &Pool, out: &mut [T], per: usize, n: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if n < 8 {
        for (t, dst) in out.chunks_exact_mut(per).enumerate().take(n) {
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
) -> core::result::Result<(), CpuRefError> {
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
        let min = (16 << 10) / row_bytes.max(1);
        let chunk = rows.div_ceil(threads * 8).max(min).max(1).next_multiple_of(4);
        let chunks = Chunks::new(rows, chunk);
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

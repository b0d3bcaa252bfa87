//! The op contract, checked in one place for every backend: each region an op reads or writes
//! lies inside its buffer, regions do not overlap except where the op allows exact in-place
//! aliasing, shapes agree with the weights, token ids fit the table and the step's sequences fit
//! its rows. A backend calls [`op`] (or [`ops`]) before running anything, so a bad step is an
//! error naming the problem on every backend alike, and kernels may assume a valid op.
//!
//! Nothing here allocates: errors carry only `Copy` data.

use crate::{ActLayout, Format, KvType, MatIn, Op, Step, View, act_block, act_words};

/// What the checker needs to know about a backend's handles.
pub trait Resources<B, W> {
    /// Elements in buffer `b`, `None` for a handle the backend never handed out.
    fn buffer_len(&self, b: B) -> Option<usize>;
    /// Shape and format of weight `w`, `None` for an unknown handle.
    fn weight_info(&self, w: W) -> Option<WeightInfo>;
}

/// A weight as the checker sees it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct WeightInfo {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
}

/// A broken op contract.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckError {
    /// A buffer handle the backend never handed out.
    UnknownBuffer { what: &'static str },
    /// A weight handle the backend never handed out.
    UnknownWeight { what: &'static str },
    /// A view plus its length runs past the end of its buffer (or overflows).
    OutOfRange { what: &'static str, start: usize, end: usize, len: usize },
    /// Two regions of one op overlap in a way the op does not allow.
    Overlap { what: &'static str, with: &'static str },
    /// A token id past the embedding table.
    TokenOutOfRange { token: u32, row: usize, rows: usize },
    /// Shapes or parameters an op cannot run with.
    Invalid { op: &'static str, msg: &'static str },
}

impl core::fmt::Display for CheckError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            CheckError::UnknownBuffer { what } => write!(f, "{what}: unknown buffer"),
            CheckError::UnknownWeight { what } => write!(f, "{what}: unknown weight"),
            CheckError::OutOfRange { what, start, end, len } => {
                write!(f, "{what}: elements {start}..{end} are out of range (buffer has {len} elements)")
            }
            CheckError::Overlap { what, with } => {
                write!(f, "{what} overlaps {with} (only exact in-place aliasing is allowed, where the op allows it)")
            }
            CheckError::TokenOutOfRange { token, row, rows } => {
                write!(f, "token id {token} at step row {row} is out of range for an embedding table of {rows} rows")
            }
            CheckError::Invalid { op, msg } => write!(f, "{op}: {msg}"),
        }
    }
}

impl core::error::Error for CheckError {}

type Result<T = ()> = core::result::Result<T, CheckError>;

fn invalid(op: &'static str, msg: &'static str) -> CheckError {
    CheckError::Invalid { op, msg }
}

/// How an op uses a region.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Use {
    /// Written (maybe also read, as in place ops do).
    Out,
    /// Read; may not touch any output.
    In,
    /// Read; may be exactly the output region (in place), otherwise must not touch it.
    InPlace,
}

/// One region of an op.
#[derive(Copy, Clone, Debug)]
struct Region<B> {
    view: View<B>,
    len: usize,
    what: &'static str,
    usage: Use,
}

/// At most this many regions in one op (a fused op's included).
const MAX_REGIONS: usize = 8;

/// The regions of one op, on the stack.
struct Regions<B> {
    r: [Option<Region<B>>; MAX_REGIONS],
    n: usize,
}

impl<B: Copy> Regions<B> {
    fn new() -> Self {
        Regions { r: [None; MAX_REGIONS], n: 0 }
    }
    fn push(&mut self, view: View<B>, len: usize, what: &'static str, usage: Use) {
        if self.n < MAX_REGIONS {
            self.r[self.n] = Some(Region { view, len, what, usage });
            self.n += 1;
        }
    }
    fn iter(&self) -> impl Iterator<Item = Region<B>> + '_ {
        self.r[..self.n].iter().flatten().copied()
    }
}

fn mul(a: usize, b: usize, op: &'static str) -> Result<usize> {
    a.checked_mul(b).ok_or(invalid(op, "size overflows usize"))
}

/// Rows of a KV cache the step's sequences reach, after checking that every sequence's rows lie
/// inside the step: `max(cache_row + pos0 + len)` for a linear cache (`ring == 0`), and
/// `max(ring_row + min(ring, pos0 + len))` for a ring of `ring` rows a slot (positions
/// `0..pos0+len` fill the ring's rows from its first, then wrap).
pub fn cache_rows_needed(step: &Step<'_>, ring: usize, op: &'static str) -> Result<usize> {
    let mut n = 0usize;
    for s in step.seqs {
        if s.row as usize + s.len as usize > step.rows() {
            return Err(invalid(op, "a sequence's rows run past the step's rows"));
        }
        let end = s.pos0 as usize + s.len as usize;
        n = n.max(match ring {
            0 => s.cache_row as usize + end,
            r => s.ring_row as usize + end.min(r),
        });
    }
    Ok(n)
}

/// An f16 cache packs two elements a word: its rows (and each head's part of them) have an even
/// number of elements.
fn kv_even(kv: KvType, n: usize, op: &'static str) -> Result {
    if kv == KvType::F16 && !n.is_multiple_of(2) {
        return Err(invalid(op, "an f16 KV cache needs an even row width and head_dim"));
    }
    Ok(())
}

/// With a ring cache (`ring > 0`): every sequence's keys a query of the step sees are still in
/// the ring once the step's own keys are stored (`window > 0` and `ring >= window + len - 1`:
/// the step's last key overwrites the position `ring` before it, which the step's first query,
/// `len - 1` earlier, must no longer see). A sequence never feeds more rows than the ring holds.
fn ring_holds(step: &Step<'_>, ring: usize, window: Option<usize>, op: &'static str) -> Result {
    if ring == 0 {
        return Ok(());
    }
    if ring > u32::MAX as usize {
        return Err(invalid(op, "ring longer than a u32 position"));
    }
    for s in step.seqs {
        let len = s.len as usize;
        if len > ring {
            return Err(invalid(op, "a sequence feeds more rows in one step than its ring cache holds"));
        }
        if let Some(w) = window {
            if w == 0 {
                return Err(invalid(op, "a ring cache needs a sliding window (window > 0)"));
            }
            if len > 0 && ring < w + len - 1 {
                return Err(invalid(
                    op,
                    "ring too short: a query would see keys the step has overwritten (need ring >= window + rows - 1)",
                ));
            }
        }
    }
    Ok(())
}

/// `v.offset .. v.offset + len` inside a buffer of `buf_len` elements.
pub fn in_range<B>(v: View<B>, len: usize, buf_len: usize, what: &'static str) -> Result<core::ops::Range<usize>> {
    match v.offset.checked_add(len) {
        Some(end) if end <= buf_len => Ok(v.offset..end),
        end => Err(CheckError::OutOfRange { what, start: v.offset, end: end.unwrap_or(usize::MAX), len: buf_len }),
    }
}

fn weight<B, W: Copy>(res: &impl Resources<B, W>, w: W, what: &'static str) -> Result<WeightInfo> {
    res.weight_info(w).ok_or(CheckError::UnknownWeight { what })
}

/// Blocks and words of `n` rows of `cols` activations quantized in `layout`.
fn act_len(n: usize, cols: usize, layout: ActLayout, op: &'static str) -> Result<usize> {
    if !cols.is_multiple_of(act_block(layout)) {
        return Err(invalid(op, "columns are not a whole number of activation blocks"));
    }
    mul(mul(n, cols / act_block(layout), op)?, act_words(layout), op)
}

/// Check every op of a step in order.
pub fn ops<B: Copy + PartialEq, W: Copy>(res: &impl Resources<B, W>, step: &Step<'_>, ops: &[Op<B, W>]) -> Result {
    ops.iter().try_for_each(|o| op(res, step, o))
}

/// Check one op against the contract. A fused op is checked as its expansion, plus: the regions
/// it writes overlap nothing else it touches (a fused kernel may compute them together).
pub fn op<B: Copy + PartialEq, W: Copy>(res: &impl Resources<B, W>, step: &Step<'_>, op: &Op<B, W>) -> Result {
    if op.is_fused() {
        fused_shapes(res, op)?;
        op.expand(|o| self::op(res, step, &o))?;
        let mut regs = Regions::new();
        fused_regions(res, step, op, &mut regs)?;
        for (i, a) in regs.iter().enumerate() {
            for b in regs.iter().skip(i + 1) {
                let written = a.usage == Use::Out || b.usage == Use::Out;
                if written && overlaps(&a, &b) {
                    return Err(CheckError::Overlap { what: a.what, with: b.what });
                }
            }
        }
        return Ok(());
    }
    let mut regs = Regions::new();
    primitive_regions(res, step, op, &mut regs)?;
    let mut out = None;
    for r in regs.iter() {
        let len = res.buffer_len(r.view.buf).ok_or(CheckError::UnknownBuffer { what: r.what })?;
        in_range(r.view, r.len, len, r.what)?;
        if r.usage == Use::Out {
            out = Some(r);
        }
    }
    let Some(out) = out else { return Ok(()) };
    for r in regs.iter().filter(|r| r.usage != Use::Out) {
        if !overlaps(&out, &r) {
            continue;
        }
        let exact = r.view.offset == out.view.offset && r.len == out.len;
        if !(exact && r.usage == Use::InPlace) {
            return Err(CheckError::Overlap { what: r.what, with: out.what });
        }
    }
    Ok(())
}

fn overlaps<B: Copy + PartialEq>(a: &Region<B>, b: &Region<B>) -> bool {
    a.view.buf == b.view.buf
        && a.len > 0
        && b.len > 0
        && a.view.offset < b.view.offset.saturating_add(b.len)
        && b.view.offset < a.view.offset.saturating_add(a.len)
}

/// The regions (and the shape rules) of a primitive op.
fn primitive_regions<B: Copy, W: Copy>(
    res: &impl Resources<B, W>,
    step: &Step<'_>,
    op: &Op<B, W>,
    regs: &mut Regions<B>,
) -> Result {
    match *op {
        Op::Embed { out, table, .. } => {
            const OP: &str = "Embed";
            let t = weight(res, table, "Embed table")?;
            if let Some((row, &token)) = step.tokens.iter().enumerate().find(|&(_, &t_)| t_ as usize >= t.rows) {
                return Err(CheckError::TokenOutOfRange { token, row, rows: t.rows });
            }
            regs.push(out, mul(step.rows(), t.cols, OP)?, "Embed out", Use::Out);
        }
        Op::EmbedIds { out, table, ids, .. } => {
            const OP: &str = "EmbedIds";
            let t = weight(res, table, "EmbedIds table")?;
            if t.rows == 0 {
                return Err(invalid(OP, "the table has no rows"));
            }
            regs.push(ids, step.rows(), "EmbedIds ids", Use::In);
            regs.push(out, mul(step.rows(), t.cols, OP)?, "EmbedIds out", Use::Out);
        }
        Op::RmsNorm { out, x, w, rows, dim, .. } => {
            const OP: &str = "RmsNorm";
            let wt = weight(res, w, "RmsNorm weight")?;
            if wt.rows != 1 || wt.cols != dim {
                return Err(invalid(OP, "weight must be (1, dim)"));
            }
            if dim == 0 {
                return Err(invalid(OP, "dim must be > 0"));
            }
            let len = mul(rows, dim, OP)?;
            regs.push(out, len, "RmsNorm out", Use::Out);
            regs.push(x, len, "RmsNorm x", Use::InPlace);
        }
        Op::MatMul { out, x, w, n, .. } => {
            const OP: &str = "MatMul";
            let wt = weight(res, w, "MatMul weight")?;
            regs.push(out, mul(n, wt.rows, OP)?, "MatMul out", Use::Out);
            regs.push(x, mul(n, wt.cols, OP)?, "MatMul x", Use::In);
        }
        Op::QuantizeAct { out, x, rows, cols, layout } => {
            const OP: &str = "QuantizeAct";
            regs.push(out, act_len(rows, cols, layout, OP)?, "QuantizeAct out", Use::Out);
            regs.push(x, mul(rows, cols, OP)?, "QuantizeAct x", Use::In);
        }
        Op::MatMulQ8 { out, xq, w, n } => {
            const OP: &str = "MatMulQ8";
            let wt = weight(res, w, "MatMulQ8 weight")?;
            let Some(layout) = wt.format.act_layout() else {
                return Err(invalid(OP, "the weight is a float format (no integer dot)"));
            };
            regs.push(out, mul(n, wt.rows, OP)?, "MatMulQ8 out", Use::Out);
            regs.push(xq, act_len(n, wt.cols, layout, OP)?, "MatMulQ8 xq", Use::In);
        }
        Op::Rope { x, rows, heads, head_dim, .. } => {
            const OP: &str = "Rope";
            if head_dim == 0 || !head_dim.is_multiple_of(2) {
                return Err(invalid(OP, "head_dim must be even and > 0"));
            }
            if rows > step.positions.len() {
                return Err(invalid(OP, "more rows than step.positions"));
            }
            regs.push(x, mul(rows, mul(heads, head_dim, OP)?, OP)?, "Rope x", Use::Out);
        }
        Op::StoreKv { cache, src, width, ring, kv } => {
            const OP: &str = "StoreKv";
            ring_holds(step, ring, None, OP)?;
            kv_even(kv, width, OP)?;
            let words = kv.row_words(width);
            regs.push(cache, mul(cache_rows_needed(step, ring, OP)?, words, OP)?, "StoreKv cache", Use::Out);
            regs.push(src, mul(step.rows(), width, OP)?, "StoreKv src", Use::In);
        }
        Op::Attention { out, q, k, v, heads, kv_heads, head_dim, window, ring, kv, .. } => {
            const OP: &str = "Attention";
            if heads == 0 || kv_heads == 0 || head_dim == 0 || !heads.is_multiple_of(kv_heads) {
                return Err(invalid(OP, "need heads, kv_heads, head_dim > 0 and kv_heads dividing heads"));
            }
            if head_dim > purehw_kernels::ops::MAX_HEAD_DIM {
                return Err(invalid(OP, "head_dim above 512"));
            }
            kv_even(kv, head_dim, OP)?;
            ring_holds(step, ring, Some(window), OP)?;
            let q_len = mul(step.rows(), mul(heads, head_dim, OP)?, OP)?;
            let words = kv.row_words(mul(kv_heads, head_dim, OP)?);
            let kv_len = mul(cache_rows_needed(step, ring, OP)?, words, OP)?;
            regs.push(out, q_len, "Attention out", Use::Out);
            regs.push(q, q_len, "Attention q", Use::In);
            regs.push(k, kv_len, "Attention k", Use::In);
            regs.push(v, kv_len, "Attention v", Use::In);
        }
        Op::Add { out, a, b, len } => {
            regs.push(out, len, "Add out", Use::Out);
            regs.push(a, len, "Add a", Use::InPlace);
            regs.push(b, len, "Add b", Use::InPlace);
        }
        Op::GeluTanhMul { out, gate, up, len } | Op::SiluMul { out, gate, up, len } => {
            regs.push(out, len, "gated activation out", Use::Out);
            regs.push(gate, len, "gated activation gate", Use::InPlace);
            regs.push(up, len, "gated activation up", Use::In);
        }
        Op::Softcap { x, len, cap } => {
            if cap.is_nan() || cap <= 0.0 {
                return Err(invalid("Softcap", "cap must be > 0"));
            }
            regs.push(x, len, "Softcap x", Use::Out);
        }
        Op::Argmax { out, x, rows, cols } => {
            const OP: &str = "Argmax";
            if cols == 0 || cols > 1 << 24 {
                return Err(invalid(OP, "need 0 < cols <= 2^24 (an index must be exact in f32)"));
            }
            regs.push(out, rows, "Argmax out", Use::Out);
            regs.push(x, mul(rows, cols, OP)?, "Argmax x", Use::In);
        }
        Op::Copy { out, src, len } => {
            regs.push(out, len, "Copy out", Use::Out);
            regs.push(src, len, "Copy src", Use::In);
        }
        _ => return Err(invalid("op", "unknown op")),
    }
    Ok(())
}

/// A fused op's own shape rules (its expansion checks the rest).
fn fused_shapes<B: Copy + PartialEq, W: Copy>(res: &impl Resources<B, W>, op: &Op<B, W>) -> Result {
    match *op {
        Op::AddRmsNorm { x, x_out, branch, rows, dim, .. } => {
            mul(rows, dim, "AddRmsNorm")?;
            if branch.is_none() && x_out != x {
                return Err(invalid("AddRmsNorm", "without a branch, x_out must be x"));
            }
        }
        Op::Qkv { x, wq, wk, wv, n, heads, kv_heads, head_dim, .. } => {
            const OP: &str = "Qkv";
            if heads == 0 || kv_heads == 0 || head_dim == 0 {
                return Err(invalid(OP, "need heads, kv_heads, head_dim > 0"));
            }
            let (q, k, v) = (weight(res, wq, "Qkv wq")?, weight(res, wk, "Qkv wk")?, weight(res, wv, "Qkv wv")?);
            let (qd, kvd) = (mul(heads, head_dim, OP)?, mul(kv_heads, head_dim, OP)?);
            if q.rows != qd || k.rows != kvd || v.rows != kvd {
                return Err(invalid(OP, "weight rows must be heads·head_dim (q) and kv_heads·head_dim (k, v)"));
            }
            if q.cols != k.cols || q.cols != v.cols {
                return Err(invalid(OP, "q, k and v weights must read the same columns"));
            }
            if matches!(x, MatIn::Q8(_))
                && (q.format.act_layout() != k.format.act_layout() || q.format.act_layout() != v.format.act_layout())
            {
                return Err(invalid(OP, "quantized activations need q, k and v weights of one activation layout"));
            }
            mul(n, qd, OP)?;
        }
        Op::GatedFfn { x, w_gate, w_up, n, ffn, .. } => {
            const OP: &str = "GatedFfn";
            let (g, u) = (weight(res, w_gate, "GatedFfn gate weight")?, weight(res, w_up, "GatedFfn up weight")?);
            if g.rows != ffn || u.rows != ffn || g.cols != u.cols {
                return Err(invalid(OP, "gate and up weights must both be (ffn, cols)"));
            }
            if matches!(x, MatIn::Q8(_)) && g.format.act_layout() != u.format.act_layout() {
                return Err(invalid(OP, "quantized activations need gate and up weights of one activation layout"));
            }
            mul(n, ffn, OP)?;
        }
        Op::HeadArgmax { w, vocab, .. } if weight(res, w, "HeadArgmax weight")?.rows != vocab => {
            return Err(invalid("HeadArgmax", "vocab must be the weight's rows"));
        }
        _ => {}
    }
    Ok(())
}

fn mat_in<B: Copy>(x: MatIn<B>, n: usize, cols: usize, layout: Option<ActLayout>, regs: &mut Regions<B>) -> Result {
    match x {
        MatIn::F32 { x, .. } => regs.push(x, mul(n, cols, "matmul input")?, "matmul x", Use::In),
        MatIn::Q8(xq) => {
            let layout = layout.ok_or(invalid("matmul input", "quantized activations for a float weight"))?;
            regs.push(xq, act_len(n, cols, layout, "matmul input")?, "matmul xq", Use::In)
        }
    }
    Ok(())
}

/// Every region a fused op touches, for the pairwise overlap rule.
fn fused_regions<B: Copy + PartialEq, W: Copy>(
    res: &impl Resources<B, W>,
    step: &Step<'_>,
    op: &Op<B, W>,
    regs: &mut Regions<B>,
) -> Result {
    match *op {
        Op::AddRmsNorm { x, x_out, branch, out, quant, rows, dim, .. } => {
            let len = rows * dim;
            if x_out != x {
                regs.push(x, len, "AddRmsNorm x", Use::In);
                regs.push(x_out, len, "AddRmsNorm x_out", Use::Out);
            } else {
                regs.push(x, len, "AddRmsNorm x (in place)", Use::Out);
            }
            if let Some(b) = branch {
                regs.push(b, len, "AddRmsNorm branch", Use::In);
            }
            regs.push(out, len, "AddRmsNorm out", Use::Out);
            if let Some(q) = quant {
                regs.push(q.out, act_len(rows, dim, q.layout, "AddRmsNorm")?, "AddRmsNorm quantized out", Use::Out);
            }
        }
        Op::Qkv { x, wq, q, k, v, n, heads, kv_heads, head_dim, k_cache, v_cache, ring, kv, .. } => {
            let wi = weight(res, wq, "Qkv wq")?;
            mat_in(x, n, wi.cols, wi.format.act_layout(), regs)?;
            regs.push(q, n * heads * head_dim, "Qkv q", Use::Out);
            regs.push(k, n * kv_heads * head_dim, "Qkv k", Use::Out);
            regs.push(v, n * kv_heads * head_dim, "Qkv v", Use::Out);
            kv_even(kv, head_dim, "Qkv")?;
            let cache = cache_rows_needed(step, ring, "Qkv")? * kv.row_words(kv_heads * head_dim);
            if let Some(c) = k_cache {
                regs.push(c, cache, "Qkv k cache", Use::Out);
            }
            if let Some(c) = v_cache {
                regs.push(c, cache, "Qkv v cache", Use::Out);
            }
        }
        Op::GatedFfn { x, w_gate, gate, up, out, n, ffn, quant, .. } => {
            let wi = weight(res, w_gate, "GatedFfn gate weight")?;
            mat_in(x, n, wi.cols, wi.format.act_layout(), regs)?;
            regs.push(gate, n * ffn, "GatedFfn gate", Use::Out);
            regs.push(up, n * ffn, "GatedFfn up", Use::Out);
            if out != gate {
                regs.push(out, n * ffn, "GatedFfn out", Use::Out);
            }
            if let Some(qo) = quant {
                regs.push(qo.out, act_len(n, ffn, qo.layout, "GatedFfn")?, "GatedFfn quantized gate", Use::Out);
            }
        }
        Op::HeadArgmax { out, xq, w, n, vocab, logits } => {
            let wt = weight(res, w, "HeadArgmax weight")?;
            mat_in(MatIn::Q8(xq), n, wt.cols, wt.format.act_layout(), regs)?;
            regs.push(logits, n * vocab, "HeadArgmax logits", Use::Out);
            regs.push(out, n, "HeadArgmax out", Use::Out);
        }
        _ => {}
    }
    Ok(())
}

//! Ops as data. Shapes are in elements; every activation is f32, row-major.
//!
//! Primitive ops come first; the fused ops after them each name a sequence of primitive ops
//! ([`Op::expand`]) that defines their result, so a backend without a fused kernel runs the
//! expansion and the conformance matrix compares a fused kernel with its composition.

use crate::Format;
/// What a KV cache stores (f32, or f16 two to a buffer word); the kernels' own type.
pub use purehw_kernels::ops::KvType;
/// How RoPE pairs the dimensions of a head; the kernels' own type, so backends pass it straight on.
pub use purehw_kernels::ops::RopeMode;
/// Which quantized-activation blocks a weight format's integer dot reads.
pub use purehw_kernels::quant::ActLayout;
/// How a matmul treats its activations; the kernels' own type.
pub use purehw_kernels::quant::ActQuant;

/// A region of a buffer: the handle and an element offset. The op's shape gives its length.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct View<B> {
    pub buf: B,
    pub offset: usize,
}

impl<B: Copy> View<B> {
    pub const fn new(buf: B, offset: usize) -> Self {
        View { buf, offset }
    }
    /// The same buffer, `n` elements further on.
    pub const fn at(self, n: usize) -> Self {
        View { buf: self.buf, offset: self.offset + n }
    }
}

/// One sequence's share of a step: its query rows and where its KV cache lives.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct SeqSpan {
    /// First row of this sequence in the step's activations (`q`, `out`, new `k`/`v`).
    pub row: u32,
    /// Number of rows (tokens) this sequence has in the step.
    pub len: u32,
    /// First row of this sequence's slot in the KV cache buffers; position `p` lives at `cache_row + p`.
    pub cache_row: u32,
    /// Position of the sequence's first token in this step (tokens before it are already cached).
    pub pos0: u32,
    /// First row of this sequence's slot in the ring caches (those an op reads or writes with
    /// `ring > 0`: a sliding-window layer's, `ring` rows a slot); position `p` lives at
    /// `ring_row + p % ring`. Unused by ops with `ring == 0`.
    pub ring_row: u32,
}

impl SeqSpan {
    /// The cache row of the sequence's position `p` in a cache of `ring` rows a slot (`ring == 0`:
    /// a linear cache, row `cache_row + p`; otherwise row `ring_row + p % ring`).
    pub const fn row_of(&self, p: usize, ring: usize) -> usize {
        if ring == 0 { self.cache_row as usize + p } else { self.ring_row as usize + p % ring }
    }
}

/// Host data shared by all ops of one step. Row `t` of the activations is token `tokens[t]` at
/// position `positions[t]`; `seqs` partitions the rows.
#[derive(Copy, Clone, Debug)]
pub struct Step<'a> {
    pub tokens: &'a [u32],
    pub positions: &'a [u32],
    pub seqs: &'a [SeqSpan],
}

impl Step<'_> {
    /// Rows (tokens) in the step.
    pub fn rows(&self) -> usize {
        self.tokens.len()
    }
}

/// Buffer words (f32-sized elements) one quantized-activation block takes: `BlockQ8A` is 40
/// bytes, `BlockQ8K` 292. A quantized activation buffer holds the blocks' bytes as they are laid
/// out in memory, so `rows × cols/block × words` elements.
pub const fn act_words(layout: ActLayout) -> usize {
    match layout {
        ActLayout::Q8A => core::mem::size_of::<purehw_kernels::quant::BlockQ8A>() / 4,
        ActLayout::Q8K => core::mem::size_of::<purehw_kernels::quant::BlockQ8K>() / 4,
    }
}

/// Elements of one activation block.
pub const fn act_block(layout: ActLayout) -> usize {
    match layout {
        ActLayout::Q8A => 32,
        ActLayout::Q8K => 256,
    }
}

/// Where a matmul's activations come from.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum MatIn<B> {
    /// f32 rows, treated per `act` (an `Int8` matmul quantizes them itself).
    F32 { x: View<B>, act: ActQuant },
    /// Rows already quantized by [`Op::QuantizeAct`] in the layout the weight's format reads.
    Q8(View<B>),
}

/// RoPE's parameters, as [`Op::Rope`] takes them.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct RopeSpec {
    pub theta: f32,
    pub scale: f32,
    pub mode: RopeMode,
}

/// The gated activation of an MLP.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Gate {
    /// `gelu_tanh(gate) · up` (Gemma).
    GeluTanh,
    /// `silu(gate) · up` (Llama).
    Silu,
}

/// An optional quantized copy of an op's f32 output, for the matmuls that read it next.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct QuantOut<B> {
    pub out: View<B>,
    pub layout: ActLayout,
}

/// One op. `out` first; `out` may equal an input exactly (in place) where noted, otherwise
/// regions must not overlap. [`crate::check`] holds the whole contract.
#[derive(Copy, Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Op<B, W> {
    /// `out[t, :] = table[step.tokens[t], :] * scale` for every row of the step.
    /// table: (vocab, cols); out: (step rows, cols).
    Embed { out: View<B>, table: W, scale: f32 },
    /// [`Op::Embed`] with each row's token id read from a buffer the step does not know on the
    /// host: `ids[t]` (f32, as [`Op::Argmax`] writes an index), so a step can take the last
    /// step's argmax without a round trip. An id is taken as `(ids[t] as usize).min(vocab - 1)`
    /// (NaN and negatives give 0). ids: (step rows).
    EmbedIds { out: View<B>, table: W, scale: f32, ids: View<B> },
    /// `out[r, :] = x[r, :] / sqrt(mean(x[r, :]²) + eps) * w` — x, out: (rows, dim); w: (1, dim).
    /// In place allowed.
    RmsNorm { out: View<B>, x: View<B>, w: W, rows: usize, dim: usize, eps: f32 },
    /// `out[t, r] = Σ_c w[r, c] · x[t, c]` — x: (n, w.cols); out: (n, w.rows).
    /// With `act: Int8` and a quantized `w`, each row of x is first quantized to int8 (as
    /// [`Op::QuantizeAct`] does) and the dot is integer (`dot_row_q8a`/`q8k`); float formats
    /// ignore `act`.
    MatMul { out: View<B>, x: View<B>, w: W, n: usize, act: ActQuant },
    /// Quantize `rows` rows of `cols` f32 values into int8 blocks (`quantize_q8a`/`q8k`):
    /// out: (rows, cols / block) blocks of [`act_words`] elements each.
    QuantizeAct { out: View<B>, x: View<B>, rows: usize, cols: usize, layout: ActLayout },
    /// The integer matmul of [`Op::MatMul`] with `Int8` on activations [`Op::QuantizeAct`]
    /// already quantized in the layout `w`'s format reads — xq: (n, w.cols / block) blocks;
    /// out: (n, w.rows). `w` must be a quantized format.
    MatMulQ8 { out: View<B>, xq: View<B>, w: W, n: usize },
    /// Rotary embedding in place on x: (rows, heads, head_dim), row t at `step.positions[t]`
    /// (`rows <= step.positions.len()`, head_dim even).
    /// Frequency i is `(1 / theta^(2i/head_dim)) / scale` in f32, as HF computes it (`scale` = linear
    /// RoPE scaling factor).
    Rope { x: View<B>, rows: usize, heads: usize, head_dim: usize, theta: f32, scale: f32, mode: RopeMode },
    /// Write each sequence's new rows of `src` into the cache: its position `pos0 + i` at row
    /// [`SeqSpan::row_of`]`(pos0 + i, ring)`, so `cache_row + pos0 + i` with `ring == 0`, and
    /// `ring_row + (pos0 + i) % ring` in a ring of `ring` rows a slot (a sliding-window layer's
    /// cache, which holds only the latest positions; a sequence feeds at most `ring` rows).
    /// src: (step rows, width); cache: (cache rows, width) of `kv` elements (`F16`: each value
    /// rounded to the nearest f16, two a buffer word, so a row is `width / 2` words; `width` even).
    StoreKv { cache: View<B>, src: View<B>, width: usize, ring: usize, kv: KvType },
    /// Causal attention per sequence over its key positions `0..pos0+len`, key position j read
    /// from cache row [`SeqSpan::row_of`]`(j, ring)` (`ring == 0`: row `cache_row + j`).
    /// q, out: (step rows, heads·head_dim); k, v: cache (cache rows, kv_heads·head_dim).
    /// Query head h reads kv head `h / (heads / kv_heads)`. Scores are `q·k · scale`, then
    /// `softcap·tanh(s/softcap)` when `softcap > 0`; key position j is visible from query position
    /// i when `j <= i` and (`window == 0` or `i - j < window`).
    /// With `ring > 0` the cache is a ring of `ring` rows a slot, holding the sequence's latest
    /// positions: every key a query sees must still be there, so `window > 0` and
    /// `ring >= window + len - 1` for each sequence's `len` rows of the step (its keys, stored
    /// this step by [`Op::StoreKv`], overwrite only positions at least `ring` behind).
    /// The caches hold `kv` elements ([`Op::StoreKv`]); `F16` keys and values are widened exactly
    /// (`head_dim` even).
    Attention {
        out: View<B>,
        q: View<B>,
        k: View<B>,
        v: View<B>,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        scale: f32,
        window: usize,
        softcap: f32,
        ring: usize,
        kv: KvType,
    },
    /// `out = a + b` over `len` elements. In place allowed (out == a or out == b).
    Add { out: View<B>, a: View<B>, b: View<B>, len: usize },
    /// `out = gelu_tanh(gate) * up` over `len` elements. In place allowed (out == gate).
    GeluTanhMul { out: View<B>, gate: View<B>, up: View<B>, len: usize },
    /// `out = silu(gate) * up` over `len` elements. In place allowed (out == gate).
    SiluMul { out: View<B>, gate: View<B>, up: View<B>, len: usize },
    /// `x = cap · tanh(x / cap)` in place over `len` elements.
    Softcap { x: View<B>, len: usize, cap: f32 },
    /// `out[r] = argmax(x[r, :])` for `rows` rows of `cols` (`kernels::ops::argmax`: NaN counts as
    /// −∞, first index on ties), stored as an f32 holding the index exactly (`cols ≤ 2^24`).
    Argmax { out: View<B>, x: View<B>, rows: usize, cols: usize },
    /// Greedy decoding's LM head, fused: `logits = MatMulQ8(xq, w)` over `n` rows, then
    /// `out = Argmax(logits)` over the weight's `vocab` rows. `logits` (n, vocab) is scratch: after
    /// the op its values are unspecified, so a backend may find each row's argmax without every
    /// logit (only `out` is the op's result).
    HeadArgmax { out: View<B>, xq: View<B>, w: W, n: usize, vocab: usize, logits: View<B> },
    /// `out[i] = src[i]` for `i < len`, bit for bit: `out` and `src` may lie in one buffer but
    /// must not overlap. Moves KV-cache rows between slots (a prompt prefix held by one slot,
    /// copied into another instead of computed again).
    Copy { out: View<B>, src: View<B>, len: usize },

    // ---- fused ops: each is defined by its expansion ----
    /// The residual junction between two blocks: `x_out = x + rmsnorm(branch, post)` (or
    /// `x + branch` without `post`); then `out = rmsnorm(x_out, w)` and optionally its quantized
    /// copy. x, x_out, branch, out: (rows, dim); `x_out` may be `x` (in place); `branch` is only
    /// read. Without `branch` it is the norm (and quantization) of `x` alone, and `x_out` must be
    /// `x`. A separate `x_out` lets a backend run the next matmul's workgroups from `x` directly.
    AddRmsNorm {
        x: View<B>,
        x_out: View<B>,
        branch: Option<View<B>>,
        post: Option<W>,
        out: View<B>,
        w: W,
        quant: Option<QuantOut<B>>,
        rows: usize,
        dim: usize,
        eps: f32,
    },
    /// Attention's input block for `n` rows: `q, k, v = x·Wqᵀ, x·Wkᵀ, x·Wvᵀ`; then (each when given)
    /// per-head RMSNorm of q and k (`eps`), RoPE of q and k, and the new k/v rows stored in the
    /// caches ([`Op::StoreKv`], with `ring` and `kv`). q: (n, heads·head_dim); k, v: (n,
    /// kv_heads·head_dim).
    Qkv {
        x: MatIn<B>,
        wq: W,
        wk: W,
        wv: W,
        q: View<B>,
        k: View<B>,
        v: View<B>,
        n: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        q_norm: Option<W>,
        k_norm: Option<W>,
        eps: f32,
        rope: Option<RopeSpec>,
        k_cache: Option<View<B>>,
        v_cache: Option<View<B>>,
        ring: usize,
        kv: KvType,
    },
    /// The gated MLP's first half for `n` rows: `gate = x·Wgᵀ`, `up = x·Wuᵀ`, then
    /// `out = act(gate) · up` and optionally out's quantized copy. gate, up, out: (n, ffn); `ffn` =
    /// the weights' rows; `out` may be `gate` (in place).
    GatedFfn {
        x: MatIn<B>,
        w_gate: W,
        w_up: W,
        gate: View<B>,
        up: View<B>,
        out: View<B>,
        n: usize,
        ffn: usize,
        kind: Gate,
        quant: Option<QuantOut<B>>,
    },
}

/// What [`Backend::supports`](crate::Backend::supports) is asked about.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OpKind {
    Embed(Format),
    EmbedIds(Format),
    RmsNorm,
    MatMul(Format),
    QuantizeAct(ActLayout),
    MatMulQ8(Format),
    Rope(RopeMode),
    StoreKv,
    Attention,
    Add,
    GeluTanhMul,
    SiluMul,
    Softcap,
    Argmax,
    Copy,
    AddRmsNorm,
    HeadArgmax(Format),
    Qkv,
    GatedFfn,
    /// The cache ops ([`Op::StoreKv`], [`Op::Attention`], [`Op::Qkv`]) on caches of this
    /// element type; asked once, when a model's caches are made. Every backend has `F32`.
    KvCache(KvType),
}

impl OpKind {
    /// The kinds whose support does not depend on a weight format (all but `Embed`, `MatMul`
    /// and `MatMulQ8`, and the cache element type `KvCache`): every backend runs these, so
    /// `supports()` answers only for the others.
    pub fn is_format_free(self) -> bool {
        matches!(
            self,
            OpKind::QuantizeAct(_)
                | OpKind::RmsNorm
                | OpKind::Rope(_)
                | OpKind::StoreKv
                | OpKind::Attention
                | OpKind::Add
                | OpKind::GeluTanhMul
                | OpKind::SiluMul
                | OpKind::Softcap
                | OpKind::Argmax
                | OpKind::Copy
                | OpKind::AddRmsNorm
                | OpKind::Qkv
                | OpKind::GatedFfn
        )
    }
}

impl<B: Copy, W: Copy> Op<B, W> {
    /// The op's kind, given the format of the weight it reads (if any). A fused op's kind names
    /// the fusion; [`expand`](Op::expand) gives the kinds it is made of.
    pub fn kind(&self, format_of: impl Fn(W) -> Format) -> OpKind {
        match *self {
            Op::Embed { table, .. } => OpKind::Embed(format_of(table)),
            Op::EmbedIds { table, .. } => OpKind::EmbedIds(format_of(table)),
            Op::RmsNorm { .. } => OpKind::RmsNorm,
            Op::MatMul { w, .. } => OpKind::MatMul(format_of(w)),
            Op::QuantizeAct { layout, .. } => OpKind::QuantizeAct(layout),
            Op::MatMulQ8 { w, .. } => OpKind::MatMulQ8(format_of(w)),
            Op::Rope { mode, .. } => OpKind::Rope(mode),
            Op::StoreKv { .. } => OpKind::StoreKv,
            Op::Attention { .. } => OpKind::Attention,
            Op::Add { .. } => OpKind::Add,
            Op::GeluTanhMul { .. } => OpKind::GeluTanhMul,
            Op::SiluMul { .. } => OpKind::SiluMul,
            Op::Softcap { .. } => OpKind::Softcap,
            Op::Argmax { .. } => OpKind::Argmax,
            Op::HeadArgmax { w, .. } => OpKind::HeadArgmax(format_of(w)),
            Op::Copy { .. } => OpKind::Copy,
            Op::AddRmsNorm { .. } => OpKind::AddRmsNorm,
            Op::Qkv { .. } => OpKind::Qkv,
            Op::GatedFfn { .. } => OpKind::GatedFfn,
        }
    }

    /// Whether this is a fused op (one that [`expand`](Op::expand)s into others).
    pub fn is_fused(&self) -> bool {
        matches!(self, Op::AddRmsNorm { .. } | Op::Qkv { .. } | Op::GatedFfn { .. } | Op::HeadArgmax { .. })
    }

    /// The primitive ops a fused op stands for, in order, passed to `f` (a primitive op passes
    /// itself). Running them in order *is* the fused op's definition. Never allocates.
    pub fn expand<E>(&self, mut f: impl FnMut(Op<B, W>) -> Result<(), E>) -> Result<(), E> {
        match *self {
            Op::AddRmsNorm { x, x_out, branch, post, out, w, quant, rows, dim, eps } => {
                let len = rows.saturating_mul(dim);
                if let Some(b) = branch {
                    // The normed branch passes through `out`, which the final norm overwrites.
                    if let Some(p) = post {
                        f(Op::RmsNorm { out, x: b, w: p, rows, dim, eps })?;
                        f(Op::Add { out: x_out, a: x, b: out, len })?;
                    } else {
                        f(Op::Add { out: x_out, a: x, b, len })?;
                    }
                }
                f(Op::RmsNorm { out, x: x_out, w, rows, dim, eps })?;
                if let Some(q) = quant {
                    f(Op::QuantizeAct { out: q.out, x: out, rows, cols: dim, layout: q.layout })?;
                }
                Ok(())
            }
            Op::Qkv {
                x,
                wq,
                wk,
                wv,
                q,
                k,
                v,
                n,
                heads,
                kv_heads,
                head_dim,
                q_norm,
                k_norm,
                eps,
                rope,
                k_cache,
                v_cache,
                ring,
                kv,
            } => {
                for (out, w) in [(q, wq), (k, wk), (v, wv)] {
                    f(matmul(out, x, w, n))?;
                }
                if let Some(w) = q_norm {
                    f(Op::RmsNorm { out: q, x: q, w, rows: n.saturating_mul(heads), dim: head_dim, eps })?;
                }
                if let Some(w) = k_norm {
                    f(Op::RmsNorm { out: k, x: k, w, rows: n.saturating_mul(kv_heads), dim: head_dim, eps })?;
                }
                if let Some(r) = rope {
                    for (x, h) in [(q, heads), (k, kv_heads)] {
                        f(Op::Rope { x, rows: n, heads: h, head_dim, theta: r.theta, scale: r.scale, mode: r.mode })?;
                    }
                }
                let width = kv_heads.saturating_mul(head_dim);
                if let Some(c) = k_cache {
                    f(Op::StoreKv { cache: c, src: k, width, ring, kv })?;
                }
                if let Some(c) = v_cache {
                    f(Op::StoreKv { cache: c, src: v, width, ring, kv })?;
                }
                Ok(())
            }
            Op::GatedFfn { x, w_gate, w_up, gate, up, out, n, ffn, kind, quant } => {
                f(matmul(gate, x, w_gate, n))?;
                f(matmul(up, x, w_up, n))?;
                let len = n.saturating_mul(ffn);
                f(match kind {
                    Gate::GeluTanh => Op::GeluTanhMul { out, gate, up, len },
                    Gate::Silu => Op::SiluMul { out, gate, up, len },
                })?;
                if let Some(q) = quant {
                    f(Op::QuantizeAct { out: q.out, x: out, rows: n, cols: ffn, layout: q.layout })?;
                }
                Ok(())
            }
            Op::HeadArgmax { out, xq, w, n, vocab, logits } => {
                f(Op::MatMulQ8 { out: logits, xq, w, n })?;
                f(Op::Argmax { out, x: logits, rows: n, cols: vocab })
            }
            op => f(op),
        }
    }
}

impl<B: Copy, W: Copy> Op<B, W> {
    /// The same op on other handles: each buffer through `fb`, each weight through `fw` (a test
    /// or a wrapping backend running an op list on another backend's objects).
    pub fn map<B2: Copy, W2: Copy>(&self, fb: impl Fn(B) -> B2, fw: impl Fn(W) -> W2) -> Op<B2, W2> {
        let v = |x: View<B>| View::new(fb(x.buf), x.offset);
        let mat_in = |x: MatIn<B>| match x {
            MatIn::F32 { x, act } => MatIn::F32 { x: v(x), act },
            MatIn::Q8(x) => MatIn::Q8(v(x)),
        };
        let quant = |q: Option<QuantOut<B>>| q.map(|q| QuantOut { out: v(q.out), layout: q.layout });
        match *self {
            Op::Embed { out, table, scale } => Op::Embed { out: v(out), table: fw(table), scale },
            Op::EmbedIds { out, table, scale, ids } => {
                Op::EmbedIds { out: v(out), table: fw(table), scale, ids: v(ids) }
            }
            Op::RmsNorm { out, x, w, rows, dim, eps } => Op::RmsNorm { out: v(out), x: v(x), w: fw(w), rows, dim, eps },
            Op::MatMul { out, x, w, n, act } => Op::MatMul { out: v(out), x: v(x), w: fw(w), n, act },
            Op::QuantizeAct { out, x, rows, cols, layout } => {
                Op::QuantizeAct { out: v(out), x: v(x), rows, cols, layout }
            }
            Op::MatMulQ8 { out, xq, w, n } => Op::MatMulQ8 { out: v(out), xq: v(xq), w: fw(w), n },
            Op::Rope { x, rows, heads, head_dim, theta, scale, mode } => {
                Op::Rope { x: v(x), rows, heads, head_dim, theta, scale, mode }
            }
            Op::StoreKv { cache, src, width, ring, kv } => {
                Op::StoreKv { cache: v(cache), src: v(src), width, ring, kv }
            }
            Op::Attention { out, q, k, v: vv, heads, kv_heads, head_dim, scale, window, softcap, ring, kv } => {
                Op::Attention {
                    out: v(out),
                    q: v(q),
                    k: v(k),
                    v: v(vv),
                    heads,
                    kv_heads,
                    head_dim,
                    scale,
                    window,
                    softcap,
                    ring,
                    kv,
                }
            }
            Op::Add { out, a, b, len } => Op::Add { out: v(out), a: v(a), b: v(b), len },
            Op::GeluTanhMul { out, gate, up, len } => Op::GeluTanhMul { out: v(out), gate: v(gate), up: v(up), len },
            Op::SiluMul { out, gate, up, len } => Op::SiluMul { out: v(out), gate: v(gate), up: v(up), len },
            Op::Softcap { x, len, cap } => Op::Softcap { x: v(x), len, cap },
            Op::Argmax { out, x, rows, cols } => Op::Argmax { out: v(out), x: v(x), rows, cols },
            Op::HeadArgmax { out, xq, w, n, vocab, logits } => {
                Op::HeadArgmax { out: v(out), xq: v(xq), w: fw(w), n, vocab, logits: v(logits) }
            }
            Op::Copy { out, src, len } => Op::Copy { out: v(out), src: v(src), len },
            Op::AddRmsNorm { x, x_out, branch, post, out, w, quant: q, rows, dim, eps } => Op::AddRmsNorm {
                x: v(x),
                x_out: v(x_out),
                branch: branch.map(v),
                post: post.map(&fw),
                out: v(out),
                w: fw(w),
                quant: quant(q),
                rows,
                dim,
                eps,
            },
            Op::Qkv {
                x,
                wq,
                wk,
                wv,
                q,
                k,
                v: vv,
                n,
                heads,
                kv_heads,
                head_dim,
                q_norm,
                k_norm,
                eps,
                rope,
                k_cache,
                v_cache,
                ring,
                kv,
            } => Op::Qkv {
                x: mat_in(x),
                wq: fw(wq),
                wk: fw(wk),
                wv: fw(wv),
                q: v(q),
                k: v(k),
                v: v(vv),
                n,
                heads,
                kv_heads,
                head_dim,
                q_norm: q_norm.map(&fw),
                k_norm: k_norm.map(&fw),
                eps,
                rope,
                k_cache: k_cache.map(v),
                v_cache: v_cache.map(v),
                ring,
                kv,
            },
            Op::GatedFfn { x, w_gate, w_up, gate, up, out, n, ffn, kind, quant: q } => Op::GatedFfn {
                x: mat_in(x),
                w_gate: fw(w_gate),
                w_up: fw(w_up),
                gate: v(gate),
                up: v(up),
                out: v(out),
                n,
                ffn,
                kind,
                quant: quant(q),
            },
        }
    }
}

/// A matmul reading `x` as [`MatIn`] says.
fn matmul<B: Copy, W: Copy>(out: View<B>, x: MatIn<B>, w: W, n: usize) -> Op<B, W> {
    match x {
        MatIn::F32 { x, act } => Op::MatMul { out, x, w, n, act },
        MatIn::Q8(xq) => Op::MatMulQ8 { out, xq, w, n },
    }
}

//! Ops as data. Shapes are in elements; every activation is f32, row-major.

use crate::Format;
/// How RoPE pairs the dimensions of a head; the kernels' own type, so backends pass it straight on.
pub use purehw_kernels::ops::RopeMode;
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

/// One op. `out` first; `out` may equal an input exactly (in place) where noted, otherwise
/// regions must not overlap.
#[derive(Copy, Clone, Debug)]
#[non_exhaustive]
pub enum Op<B, W> {
    /// `out[t, :] = table[step.tokens[t], :] * scale` for every row of the step.
    /// table: (vocab, cols); out: (step rows, cols).
    Embed { out: View<B>, table: W, scale: f32 },
    /// `out[r, :] = x[r, :] / sqrt(mean(x[r, :]²) + eps) * w` — x, out: (rows, dim); w: (1, dim).
    /// In place allowed.
    RmsNorm { out: View<B>, x: View<B>, w: W, rows: usize, dim: usize, eps: f32 },
    /// `out[t, r] = Σ_c w[r, c] · x[t, c]` — x: (n, w.cols); out: (n, w.rows).
    /// With `act: Int8` and a quantized `w`, each row of x is first quantized to int8
    /// (`purehw_kernels::quant::quantize_q8a`/`q8k`, the explicit activation-quantization op) and the
    /// dot is integer (`dot_row_q8a`/`q8k`); float formats ignore `act`.
    MatMul { out: View<B>, x: View<B>, w: W, n: usize, act: ActQuant },
    /// Rotary embedding in place on x: (rows, heads, head_dim), row t at `step.positions[t]`
    /// (`rows <= step.positions.len()`, head_dim even).
    /// Frequency i is `(1 / theta^(2i/head_dim)) / scale` in f32, as HF computes it (`scale` = linear
    /// RoPE scaling factor).
    Rope { x: View<B>, rows: usize, heads: usize, head_dim: usize, theta: f32, scale: f32, mode: RopeMode },
    /// Write each sequence's new rows of `src` into the cache at row `cache_row + pos0 + i`.
    /// src: (step rows, width); cache: (cache rows, width).
    StoreKv { cache: View<B>, src: View<B>, width: usize },
    /// Causal attention per sequence over its cache rows `0..pos0+len`.
    /// q, out: (step rows, heads·head_dim); k, v: cache (cache rows, kv_heads·head_dim).
    /// Query head h reads kv head `h / (heads / kv_heads)`. Scores are `q·k · scale`, then
    /// `softcap·tanh(s/softcap)` when `softcap > 0`; key position j is visible from query position
    /// i when `j <= i` and (`window == 0` or `i - j < window`).
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
    },
    /// `out = a + b` over `len` elements. In place allowed (out == a or out == b).
    Add { out: View<B>, a: View<B>, b: View<B>, len: usize },
    /// `out = gelu_tanh(gate) * up` over `len` elements. In place allowed (out == gate).
    GeluTanhMul { out: View<B>, gate: View<B>, up: View<B>, len: usize },
    /// `out = silu(gate) * up` over `len` elements. In place allowed (out == gate).
    SiluMul { out: View<B>, gate: View<B>, up: View<B>, len: usize },
    /// `x = cap · tanh(x / cap)` in place over `len` elements.
    Softcap { x: View<B>, len: usize, cap: f32 },
}

/// What [`Backend::supports`](crate::Backend::supports) is asked about.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpKind {
    Embed(Format),
    RmsNorm,
    MatMul(Format),
    Rope(RopeMode),
    StoreKv,
    Attention,
    Add,
    GeluTanhMul,
    SiluMul,
    Softcap,
}

impl<B: Copy, W: Copy> Op<B, W> {
    /// The op's kind, given the format of the weight it reads (if any).
    pub fn kind(&self, format_of: impl Fn(W) -> Format) -> OpKind {
        match *self {
            Op::Embed { table, .. } => OpKind::Embed(format_of(table)),
            Op::RmsNorm { .. } => OpKind::RmsNorm,
            Op::MatMul { w, .. } => OpKind::MatMul(format_of(w)),
            Op::Rope { mode, .. } => OpKind::Rope(mode),
            Op::StoreKv { .. } => OpKind::StoreKv,
            Op::Attention { .. } => OpKind::Attention,
            Op::Add { .. } => OpKind::Add,
            Op::GeluTanhMul { .. } => OpKind::GeluTanhMul,
            Op::SiluMul { .. } => OpKind::SiluMul,
            Op::Softcap { .. } => OpKind::Softcap,
        }
    }
}

//! The transformer step (Gemma 3, Llama), generic over a backend.
//!
//! Shaped like llama2.c: [`ModelConfig`] (hyper-parameters), [`Weights`] (backend handles of
//! views into the mapped file), [`RunState`] (every buffer, sized once at load), and
//! [`Model::forward`], which builds one step's op list top to bottom and submits it whole.
//!
//! A step may hold several sequences (KV-cache slots), each with its own positions; that is how a
//! server batches decodes. After the first step, a step allocates nothing: the op list, the
//! per-token host arrays and the logits are reused.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use purehw_hal::{ActQuant, Backend, Format, HostBytes, HostWeight, Op, OpKind, SeqSpan, Step, View};

use crate::config::{Arch, LayerKind, ModelConfig};
pub use crate::generate::generate;
use crate::source::{ModelSource, Role};
use crate::{Error, Result};

/// Sizes chosen at load time; every buffer is allocated for them once.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ModelOptions {
    /// KV-cache positions per slot (clamped to the model's trained context).
    pub ctx: usize,
    /// Independent sequences (KV-cache slots).
    pub slots: usize,
    /// Most tokens in one step (prefill chunk).
    pub max_batch: usize,
    /// Most rows of logits one step returns (1 for generation; more for `forward_all` and batches).
    pub logit_rows: usize,
    /// How every matmul treats its activations (`Int8`: quantized per block, integer dots).
    pub act: ActQuant,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions { ctx: 4096, slots: 1, max_batch: 128, logit_rows: 1, act: ActQuant::F32 }
    }
}

/// One layer's weights as backend handles.
struct Layer<W> {
    kind: LayerKind,
    attn_norm: W,              // (hidden)
    wq: W,                     // (heads·head_dim, hidden)
    wk: W,                     // (kv_heads·head_dim, hidden)
    wv: W,                     // (kv_heads·head_dim, hidden)
    wo: W,                     // (hidden, heads·head_dim)
    q_norm: Option<W>,         // (head_dim), Gemma
    k_norm: Option<W>,         // (head_dim), Gemma
    post_attn_norm: Option<W>, // (hidden), Gemma
    ffn_norm: W,               // (hidden)
    gate: W,                   // (ffn, hidden)
    up: W,                     // (ffn, hidden)
    down: W,                   // (hidden, ffn)
    post_ffn_norm: Option<W>,  // (hidden), Gemma
}

/// Every weight of the model, as backend handles.
pub struct Weights<W> {
    embed: W, // (vocab, hidden)
    layers: Vec<Layer<W>>,
    out_norm: W, // (hidden)
    output: W,   // (vocab, hidden); the embedding table when tied
}

/// Activations and caches, allocated once per model.
pub struct RunState<Buf> {
    x: Buf,            // (max_batch, hidden) residual stream
    xb: Buf,           // (max_batch, hidden) branch input / output
    q: Buf,            // (max_batch, heads·head_dim)
    k: Buf,            // (max_batch, kv_heads·head_dim) this step's keys
    v: Buf,            // (max_batch, kv_heads·head_dim) this step's values
    att: Buf,          // (max_batch, heads·head_dim) attention output
    gate: Buf,         // (max_batch, ffn)
    up: Buf,           // (max_batch, ffn)
    logits: Buf,       // (logit_rows, vocab)
    k_cache: Vec<Buf>, // per layer: (slots·ctx, kv_heads·head_dim)
    v_cache: Vec<Buf>, // per layer: (slots·ctx, kv_heads·head_dim)
}

/// Host-side arrays of one step, reused so a step does not allocate.
struct StepHost<Buf, W> {
    tokens: Vec<u32>,    // (rows)
    positions: Vec<u32>, // (rows)
    seqs: Vec<SeqSpan>,  // (sequences)
    ops: Vec<Op<Buf, W>>,
    logits: Vec<f32>, // (logit_rows, vocab)
}

/// A sequence's share of a batched step: its slot, the position of its first new token, and
/// the tokens.
#[derive(Copy, Clone, Debug)]
pub struct SeqInput<'a> {
    pub slot: usize,
    pub pos: usize,
    pub tokens: &'a [u32],
}

/// A loaded model on a backend.
pub struct Model<B: Backend> {
    config: ModelConfig,
    opts: ModelOptions,
    backend: B,
    backend_name: String,
    weights: Weights<B::Weight>,
    state: RunState<B::Buffer>,
    host: StepHost<B::Buffer, B::Weight>,
}

impl<B: Backend> Model<B> {
    /// Load `source`'s weights into `backend` and size every buffer for `opts`.
    pub fn load(mut backend: B, source: &ModelSource, opts: ModelOptions) -> Result<Self> {
        let c = source.config.clone();
        if opts.slots == 0 || opts.max_batch == 0 || opts.logit_rows == 0 || opts.ctx == 0 {
            return Err(Error::Invalid("ctx, slots, max_batch and logit_rows must be at least 1".into()));
        }
        // A model that declares no context length (0) takes the caller's.
        let trained = if c.max_ctx > 0 { c.max_ctx } else { usize::MAX };
        let opts = ModelOptions { ctx: opts.ctx.min(trained), ..opts };
        // Cache rows are addressed with u32 in `SeqSpan`.
        if opts.slots.checked_mul(opts.ctx).is_none_or(|rows| rows > u32::MAX as usize) {
            return Err(Error::Invalid(format!("{} slots of {} positions is too many", opts.slots, opts.ctx)));
        }
        let weights = load_weights(&mut backend, source, &c)?;
        let state = alloc_state(&mut backend, &c, &opts)?;
        let ops_per_step = 8 + c.layers * 24 + 4 * opts.logit_rows;
        let mut logits = Vec::new();
        logits
            .try_reserve_exact(opts.logit_rows * c.vocab)
            .map_err(|_| Error::Invalid(format!("no memory for {} rows of {} logits", opts.logit_rows, c.vocab)))?;
        logits.resize(opts.logit_rows * c.vocab, 0.0);
        let host = StepHost {
            tokens: Vec::with_capacity(opts.max_batch),
            positions: Vec::with_capacity(opts.max_batch),
            seqs: Vec::with_capacity(opts.max_batch),
            ops: Vec::with_capacity(ops_per_step),
            logits,
        };
        let backend_name = String::from(backend.name());
        Ok(Model { config: c, opts, backend, backend_name, weights, state, host })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn options(&self) -> &ModelOptions {
        &self.opts
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Feed `tokens` of sequence `slot` starting at position `pos` (earlier positions must
    /// already be cached) and return the logits of the last token, `(vocab)`.
    pub fn forward(&mut self, slot: usize, pos: usize, tokens: &[u32]) -> Result<&[f32]> {
        if tokens.is_empty() {
            return Err(Error::Invalid("forward: no tokens".into()));
        }
        let mut p = pos;
        for chunk in tokens.chunks(self.opts.max_batch) {
            self.run_step(&[SeqInput { slot, pos: p, tokens: chunk }], false)?;
            p += chunk.len();
        }
        Ok(&self.host.logits[..self.config.vocab])
    }

    /// Like [`forward`](Model::forward) but appends the logits of every position to `out`,
    /// `(tokens.len(), vocab)` row-major.
    pub fn forward_all(&mut self, slot: usize, pos: usize, tokens: &[u32], out: &mut Vec<f32>) -> Result<()> {
        let chunk_len = self.opts.max_batch.min(self.opts.logit_rows);
        let mut p = pos;
        for chunk in tokens.chunks(chunk_len) {
            self.run_step(&[SeqInput { slot, pos: p, tokens: chunk }], true)?;
            out.extend_from_slice(&self.host.logits[..chunk.len() * self.config.vocab]);
            p += chunk.len();
        }
        Ok(())
    }

    /// One step over several sequences at once (e.g. one decode token each). Returns the last
    /// token's logits of each sequence, `(seqs.len(), vocab)` row-major.
    pub fn forward_batch(&mut self, seqs: &[SeqInput<'_>]) -> Result<&[f32]> {
        self.run_step(seqs, false)?;
        Ok(&self.host.logits[..seqs.len() * self.config.vocab])
    }

    /// Check a step's inputs and lay out its host arrays.
    fn prepare(&mut self, seqs: &[SeqInput<'_>], all_logits: bool) -> Result<usize> {
        let (c, o, h) = (&self.config, &self.opts, &mut self.host);
        h.tokens.clear();
        h.positions.clear();
        h.seqs.clear();
        let mut logit_rows = 0;
        for s in seqs {
            if s.slot >= o.slots {
                return Err(Error::Invalid(format!("slot {} out of range (have {})", s.slot, o.slots)));
            }
            if s.tokens.is_empty() {
                return Err(Error::Invalid("a sequence in the step has no tokens".into()));
            }
            if s.pos.saturating_add(s.tokens.len()) > o.ctx {
                return Err(Error::Invalid(format!(
                    "context length {} exceeded: position {} + {} tokens",
                    o.ctx,
                    s.pos,
                    s.tokens.len()
                )));
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= c.vocab) {
                return Err(Error::Invalid(format!("token id {bad} out of range (vocab {})", c.vocab)));
            }
            if h.tokens.len() + s.tokens.len() > o.max_batch {
                return Err(Error::Invalid(format!("step of more than {} tokens", o.max_batch)));
            }
            h.seqs.push(SeqSpan {
                row: h.tokens.len() as u32,
                len: s.tokens.len() as u32,
                cache_row: (s.slot * o.ctx) as u32,
                pos0: s.pos as u32,
            });
            h.tokens.extend_from_slice(s.tokens);
            h.positions.extend((s.pos..s.pos + s.tokens.len()).map(|p| p as u32));
            logit_rows += if all_logits { s.tokens.len() } else { 1 };
        }
        if logit_rows > o.logit_rows {
            return Err(Error::Invalid(format!("step needs {logit_rows} rows of logits, have {}", o.logit_rows)));
        }
        Ok(logit_rows)
    }

    /// Build one step's ops top to bottom, submit them, read back the logits.
    fn run_step(&mut self, seqs: &[SeqInput<'_>], all_logits: bool) -> Result<()> {
        let logit_rows = self.prepare(seqs, all_logits)?;
        let (c, w, s, h) = (&self.config, &self.weights, &self.state, &mut self.host);
        let n = h.tokens.len();
        let (hd, heads, kvh) = (c.head_dim, c.heads, c.kv_heads);
        let kvd = kvh * hd;
        let act = self.opts.act;
        let v = |b| View::new(b, 0);
        let ops = &mut h.ops;
        ops.clear();

        // Embedding: x = embed[tokens] · embed_scale
        ops.push(Op::Embed { out: v(s.x), table: w.embed, scale: c.embed_scale });

        for (l, lw) in w.layers.iter().enumerate() {
            let (rope, window) = match lw.kind {
                LayerKind::Full => (c.rope_full, 0),
                LayerKind::Sliding => (c.rope_local, c.sliding_window),
            };
            // Attention pre-norm: xb = norm(x)
            ops.push(Op::RmsNorm { out: v(s.xb), x: v(s.x), w: lw.attn_norm, rows: n, dim: c.hidden, eps: c.eps });
            // Projections: q, k, v = xb·Wqᵀ, xb·Wkᵀ, xb·Wvᵀ
            ops.push(Op::MatMul { out: v(s.q), x: v(s.xb), w: lw.wq, n, act });
            ops.push(Op::MatMul { out: v(s.k), x: v(s.xb), w: lw.wk, n, act });
            ops.push(Op::MatMul { out: v(s.v), x: v(s.xb), w: lw.wv, n, act });
            // QK-norm (Gemma): per head, over head_dim
            if let Some(qn) = lw.q_norm {
                ops.push(Op::RmsNorm { out: v(s.q), x: v(s.q), w: qn, rows: n * heads, dim: hd, eps: c.eps });
            }
            if let Some(kn) = lw.k_norm {
                ops.push(Op::RmsNorm { out: v(s.k), x: v(s.k), w: kn, rows: n * kvh, dim: hd, eps: c.eps });
            }
            // RoPE with this layer's base and scaling
            for (x, nh) in [(s.q, heads), (s.k, kvh)] {
                ops.push(Op::Rope {
                    x: v(x),
                    rows: n,
                    heads: nh,
                    head_dim: hd,
                    theta: rope.theta,
                    scale: rope.scale,
                    mode: c.rope_mode,
                });
            }
            // KV cache: append this step's keys and values at their positions
            ops.push(Op::StoreKv { cache: v(s.k_cache[l]), src: v(s.k), width: kvd });
            ops.push(Op::StoreKv { cache: v(s.v_cache[l]), src: v(s.v), width: kvd });
            // Causal attention over the cache (sliding window on local layers)
            ops.push(Op::Attention {
                out: v(s.att),
                q: v(s.q),
                k: v(s.k_cache[l]),
                v: v(s.v_cache[l]),
                heads,
                kv_heads: kvh,
                head_dim: hd,
                scale: c.attn_scale,
                window,
                softcap: c.attn_softcap,
            });
            // Output projection, (Gemma) post-attention norm, residual
            ops.push(Op::MatMul { out: v(s.xb), x: v(s.att), w: lw.wo, n, act });
            if let Some(pn) = lw.post_attn_norm {
                ops.push(Op::RmsNorm { out: v(s.xb), x: v(s.xb), w: pn, rows: n, dim: c.hidden, eps: c.eps });
            }
            ops.push(Op::Add { out: v(s.x), a: v(s.x), b: v(s.xb), len: n * c.hidden });
            // MLP pre-norm, gated activation, down projection
            ops.push(Op::RmsNorm { out: v(s.xb), x: v(s.x), w: lw.ffn_norm, rows: n, dim: c.hidden, eps: c.eps });
            ops.push(Op::MatMul { out: v(s.gate), x: v(s.xb), w: lw.gate, n, act });
            ops.push(Op::MatMul { out: v(s.up), x: v(s.xb), w: lw.up, n, act });
            ops.push(match c.arch {
                Arch::Gemma3 => Op::GeluTanhMul { out: v(s.gate), gate: v(s.gate), up: v(s.up), len: n * c.ffn },
                Arch::Llama => Op::SiluMul { out: v(s.gate), gate: v(s.gate), up: v(s.up), len: n * c.ffn },
            });
            ops.push(Op::MatMul { out: v(s.xb), x: v(s.gate), w: lw.down, n, act });
            // (Gemma) post-MLP norm, residual
            if let Some(pn) = lw.post_ffn_norm {
                ops.push(Op::RmsNorm { out: v(s.xb), x: v(s.xb), w: pn, rows: n, dim: c.hidden, eps: c.eps });
            }
            ops.push(Op::Add { out: v(s.x), a: v(s.x), b: v(s.xb), len: n * c.hidden });
        }

        // Final norm and LM head on the rows that need logits: every row, or each sequence's last
        if all_logits {
            ops.push(Op::RmsNorm { out: v(s.xb), x: v(s.x), w: w.out_norm, rows: n, dim: c.hidden, eps: c.eps });
            ops.push(Op::MatMul { out: v(s.logits), x: v(s.xb), w: w.output, n, act });
        } else {
            for (i, sq) in h.seqs.iter().enumerate() {
                let last = (sq.row + sq.len - 1) as usize;
                let xb = View::new(s.xb, i * c.hidden);
                ops.push(Op::RmsNorm {
                    out: xb,
                    x: View::new(s.x, last * c.hidden),
                    w: w.out_norm,
                    rows: 1,
                    dim: c.hidden,
                    eps: c.eps,
                });
            }
            ops.push(Op::MatMul { out: v(s.logits), x: v(s.xb), w: w.output, n: logit_rows, act });
        }
        if c.final_softcap > 0.0 {
            ops.push(Op::Softcap { x: v(s.logits), len: logit_rows * c.vocab, cap: c.final_softcap });
        }

        let step = Step { tokens: &h.tokens, positions: &h.positions, seqs: &h.seqs };
        let name = &self.backend_name;
        self.backend.submit(&step, ops).map_err(|e| Error::backend(name, e))?;
        let out = &mut h.logits[..logit_rows * c.vocab];
        self.backend.read(View::new(s.logits, 0), out).map_err(|e| Error::backend(name, e))?;
        Ok(())
    }
}

/// Load every weight the architecture needs, checking shapes, formats and backend support.
fn load_weights<B: Backend>(backend: &mut B, src: &ModelSource, c: &ModelConfig) -> Result<Weights<B::Weight>> {
    let gemma = c.arch == Arch::Gemma3;
    let embed = matrix(backend, src, Role::TokenEmbd, None)?;
    let output = if c.tied_embeddings { embed } else { matrix(backend, src, Role::Output, None)? };
    let out_norm = norm(backend, src, c, Role::OutputNorm, None)?;
    let mut layers = Vec::with_capacity(c.layers);
    for l in 0..c.layers {
        let li = Some(l);
        // Gemma's extra norms (QK-norm, post-attention, post-MLP); Llama has none.
        let gemma_norm = |b: &mut B, role: Role| -> Result<Option<B::Weight>> {
            if gemma { norm(b, src, c, role, li).map(Some) } else { Ok(None) }
        };
        layers.push(Layer {
            kind: c.layer_kinds.get(l).copied().unwrap_or(LayerKind::Full),
            attn_norm: norm(backend, src, c, Role::AttnNorm, li)?,
            wq: matrix(backend, src, Role::AttnQ, li)?,
            wk: matrix(backend, src, Role::AttnK, li)?,
            wv: matrix(backend, src, Role::AttnV, li)?,
            wo: matrix(backend, src, Role::AttnOut, li)?,
            q_norm: gemma_norm(backend, Role::AttnQNorm)?,
            k_norm: gemma_norm(backend, Role::AttnKNorm)?,
            post_attn_norm: gemma_norm(backend, Role::PostAttnNorm)?,
            ffn_norm: norm(backend, src, c, Role::FfnNorm, li)?,
            gate: matrix(backend, src, Role::FfnGate, li)?,
            up: matrix(backend, src, Role::FfnUp, li)?,
            down: matrix(backend, src, Role::FfnDown, li)?,
            post_ffn_norm: gemma_norm(backend, Role::PostFfnNorm)?,
        });
    }
    Ok(Weights { embed, layers, out_norm, output })
}

fn required(src: &ModelSource, role: Role, layer: Option<usize>) -> Result<HostWeight> {
    src.weight(role, layer)?.ok_or_else(|| {
        let at = layer.map(|l| format!(" of layer {l}")).unwrap_or_default();
        Error::format(src.label.clone(), format!("missing tensor for {role:?}{at}"))
    })
}

/// A weight matrix handed to the backend as stored (no conversion), after asking whether the
/// backend can compute with its format. The embedding table also serves as a tied LM head.
fn matrix<B: Backend>(b: &mut B, src: &ModelSource, role: Role, layer: Option<usize>) -> Result<B::Weight> {
    let hw = required(src, role, layer)?;
    let embed_ok = role != Role::TokenEmbd || b.supports(OpKind::Embed(hw.format));
    if !embed_ok || !b.supports(OpKind::MatMul(hw.format)) {
        let at = layer.map(|l| format!(" (layer {l})")).unwrap_or_default();
        return Err(Error::format(
            src.label.clone(),
            format!("backend {} cannot compute {:?}{at} stored as {}", b.name(), role, hw.format.name()),
        ));
    }
    b.load_weight(&hw).map_err(|e| Error::backend(b.name(), e))
}

/// A norm vector as f32 on the host, with Gemma's `1 + w` applied for HF checkpoints (as HF does,
/// in f32).
fn norm<B: Backend>(
    b: &mut B,
    src: &ModelSource,
    c: &ModelConfig,
    role: Role,
    layer: Option<usize>,
) -> Result<B::Weight> {
    let hw = required(src, role, layer)?;
    if hw.rows != 1 {
        return Err(Error::format(src.label.clone(), format!("{role:?}: norm weight must be a vector")));
    }
    let mut w = alloc::vec![0f32; hw.cols];
    purehw_kernels::quant::dequantize_row(hw.format, hw.data.as_slice(), &mut w);
    if c.norm_add_one {
        for x in &mut w {
            *x += 1.0;
        }
    }
    let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
    let f = HostWeight::new(Format::F32, 1, hw.cols, HostBytes::from_vec(bytes))
        .ok_or_else(|| Error::format(src.label.clone(), format!("{role:?}: bad norm size")))?;
    b.load_weight(&f).map_err(|e| Error::backend(b.name(), e))
}

fn alloc_state<B: Backend>(b: &mut B, c: &ModelConfig, o: &ModelOptions) -> Result<RunState<B::Buffer>> {
    let name = String::from(b.name());
    // Sizes come from files and options: overflow is an error, not a wrap.
    let mul = |dims: &[usize]| {
        dims.iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| Error::Invalid(format!("buffer of {dims:?} elements is too large")))
    };
    let mut a = |dims: &[usize]| -> Result<B::Buffer> { b.alloc(mul(dims)?).map_err(|e| Error::backend(&name, e)) };
    let (qd, kvd, mb) = (mul(&[c.heads, c.head_dim])?, mul(&[c.kv_heads, c.head_dim])?, o.max_batch);
    let x = a(&[mb, c.hidden])?;
    // xb also holds the final-norm rows of every sequence
    let xb = a(&[mb.max(o.logit_rows), c.hidden])?;
    let q = a(&[mb, qd])?;
    let k = a(&[mb, kvd])?;
    let v = a(&[mb, kvd])?;
    let att = a(&[mb, qd])?;
    let gate = a(&[mb, c.ffn])?;
    let up = a(&[mb, c.ffn])?;
    let logits = a(&[o.logit_rows, c.vocab])?;
    let mut k_cache = Vec::with_capacity(c.layers);
    let mut v_cache = Vec::with_capacity(c.layers);
    for _ in 0..c.layers {
        k_cache.push(a(&[o.slots, o.ctx, kvd])?);
        v_cache.push(a(&[o.slots, o.ctx, kvd])?);
    }
    Ok(RunState { x, xb, q, k, v, att, gate, up, logits, k_cache, v_cache })
}

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

use purehw_hal::{
    ActLayout, ActQuant, Backend, Format, Gate, HostBytes, HostWeight, KvType, MatIn, Op, OpKind, QuantOut, RopeSpec,
    SeqSpan, Step, View,
};

use crate::config::{Arch, LayerKind, ModelConfig};
pub use crate::generate::{generate, generate_from};
use crate::source::{ModelSource, Role};
use crate::stream::{LayerSpans, Needs, Plan, Streamer};
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
    /// A sliding-window layer's cache holds only what its queries can still see: a ring of
    /// `min(ctx, window + max_batch - 1)` rows per slot instead of `ctx` ([`Model::kv_ring`]).
    /// Off: every layer keeps all `ctx` positions (the same numbers, more memory; for A/B checks).
    pub swa_ring: bool,
    /// What the KV caches store: `F32` (exact), or `F16` (each key and value rounded to f16 when
    /// stored: half the memory, slightly different numbers).
    pub kv: KvType,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions::DEFAULT
    }
}

impl ModelOptions {
    /// [`Default::default`], usable in constants.
    pub const DEFAULT: ModelOptions = ModelOptions {
        ctx: 4096,
        slots: 1,
        max_batch: 128,
        logit_rows: 1,
        act: ActQuant::F32,
        swa_ring: true,
        kv: KvType::F32,
    };
}

impl ModelOptions {
    /// Rows per slot of a sliding-window layer's ring cache under these options, `None` where
    /// every layer keeps all `ctx` positions (no sliding layers, the ring off, or a window so
    /// long the ring would not be shorter). A step feeds a sequence at most `max_batch` rows,
    /// so `window + max_batch - 1` rows hold every key each of them sees (`hal::check` holds
    /// the rule). `ctx` as the model clamps it.
    pub fn kv_ring(&self, c: &ModelConfig) -> Option<usize> {
        let sliding = c.layer_kinds.contains(&LayerKind::Sliding) && c.sliding_window > 0;
        let ring = c.sliding_window.saturating_add(self.max_batch).saturating_sub(1);
        (self.swa_ring && sliding && ring < self.ctx).then_some(ring)
    }

    /// Bytes of every layer's K and V caches for `c` under these options (`kv`'s element size):
    /// `ctx` rows per slot for a global layer, the ring's for a sliding one
    /// ([`kv_ring`](Self::kv_ring)).
    pub fn kv_bytes(&self, c: &ModelConfig) -> usize {
        let row = 2 * 4 * self.kv.row_words(c.kv_heads * c.head_dim);
        (0..c.layers).map(|l| self.slots.saturating_mul(self.layer_rows(c, l)).saturating_mul(row)).sum()
    }

    /// Cache rows per slot of layer `l`.
    fn layer_rows(&self, c: &ModelConfig, l: usize) -> usize {
        match (c.layer_kinds.get(l), self.kv_ring(c)) {
            (Some(LayerKind::Sliding), Some(ring)) => ring,
            _ => self.ctx,
        }
    }
}

/// One layer's weights as backend handles, with the activation layout each matmul group reads.
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
    /// Int8 layouts: q/k/v share one quantization of their input when all three read one
    /// layout (likewise gate/up); `None` = the matmuls take f32 rows.
    qkv_q8: Option<ActLayout>,
    wo_q8: Option<ActLayout>,
    ffn_q8: Option<ActLayout>,
    down_q8: Option<ActLayout>,
}

/// Every weight of the model, as backend handles.
pub struct Weights<W> {
    embed: W, // (vocab, hidden)
    layers: Vec<Layer<W>>,
    out_norm: W, // (hidden)
    output: W,   // (vocab, hidden); the embedding table when tied
    output_q8: Option<ActLayout>,
    output_fmt: Format,
    embed_fmt: Format,
}

/// Activations and caches, allocated once per model.
pub struct RunState<Buf> {
    x: [Buf; 2],       // (max_batch, hidden) residual stream: each junction reads one, writes the other
    xb: Buf,           // (max_batch, hidden) a block's output (attention, MLP), before the residual add
    xn: Buf,           // (max_batch, hidden) normed input of the next matmuls
    xq: Buf,           // (max_batch, hidden) xn quantized (ActLayout blocks, `act_words` each)
    xq_wide: Buf,      // (max_batch, max(heads·head_dim, ffn)) att or gate quantized
    q: Buf,            // (max_batch, heads·head_dim)
    k: Buf,            // (max_batch, kv_heads·head_dim) this step's keys
    v: Buf,            // (max_batch, kv_heads·head_dim) this step's values
    att: Buf,          // (max_batch, heads·head_dim) attention output
    gate: Buf,         // (max_batch, ffn)
    up: Buf,           // (max_batch, ffn)
    act: Buf,          // (max_batch, ffn) act(gate)·up
    logits: Buf,       // (logit_rows, vocab)
    ids: Buf,          // (logit_rows) argmax of each logit row (an index held exactly in f32)
    k_cache: Vec<Buf>, // per layer: (slots·ctx, kv_heads·head_dim); a sliding layer's with a ring: (slots·ring, …)
    v_cache: Vec<Buf>, // per layer: as k_cache
}

/// What a sequence wants back from a step.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum Want {
    /// Nothing: the step only fills the KV cache (a prompt chunk before the last). The LM head
    /// does not run for it.
    Nothing,
    /// The last token's logits, `(vocab)`.
    #[default]
    Logits,
    /// Only the last token's argmax (greedy decoding): computed on the device, so 4 bytes come
    /// back instead of the logits.
    Argmax,
}

/// Host-side arrays of one step, reused so a step does not allocate.
struct StepHost<Buf, W> {
    tokens: Vec<u32>,    // (rows)
    positions: Vec<u32>, // (rows)
    seqs: Vec<SeqSpan>,  // (sequences)
    ops: Vec<Op<Buf, W>>,
    /// Where each layer's ops end in `ops`, but the last's (streamed steps submit per layer).
    layer_end: Vec<usize>, // (layers - 1)
    /// Per sequence of the step: its row of logits / ids, if it wants one.
    out_row: Vec<Option<u32>>, // (sequences)
    logits: Vec<f32>, // (logit_rows, vocab)
    ids_f: Vec<f32>,  // (logit_rows)
    ids: Vec<u32>,    // (logit_rows)
}

/// A sequence's share of a batched step: its slot, the position of its first new token, and
/// the tokens.
#[derive(Copy, Clone, Debug)]
pub struct SeqInput<'a> {
    pub slot: usize,
    pub pos: usize,
    pub tokens: &'a [u32],
}

/// What one step returned, per sequence of the step (in the order given).
#[derive(Copy, Clone, Debug)]
pub struct StepOut<'a> {
    out_row: &'a [Option<u32>],
    logits: &'a [f32],
    ids: &'a [u32],
    vocab: usize,
    read_logits: bool,
    read_ids: bool,
}

impl<'a> StepOut<'a> {
    /// Sequence `i`'s logits, if the step read them back.
    pub fn logits(&self, i: usize) -> Option<&'a [f32]> {
        let r = (*self.out_row.get(i)?)? as usize;
        self.read_logits.then(|| &self.logits[r * self.vocab..(r + 1) * self.vocab])
    }

    /// Sequence `i`'s argmax token, if the step computed it.
    pub fn argmax(&self, i: usize) -> Option<u32> {
        let r = (*self.out_row.get(i)?)? as usize;
        self.read_ids.then(|| self.ids[r])
    }
}

/// Which fused ops the backend runs itself; the others are expanded here into their primitives.
#[derive(Copy, Clone, Debug)]
struct Fusions {
    add_norm: bool,
    qkv: bool,
    ffn: bool,
    /// The LM head and its argmax as one op where only the ids are read (`Op::HeadArgmax`).
    head_argmax: bool,
    /// The embedding can take its token ids from the device (`Op::EmbedIds`), so greedy
    /// decoding may run ahead (`Backend::submit_ahead`).
    embed_ids: bool,
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
    fused: Fusions,
    /// With a weight budget too small for every layer: moves layers in and out per step.
    stream: Option<Streamer>,
    /// While a step is built for [`Model::decode_greedy`]: submit it ahead, its token from the
    /// device (`Some(true)`) or the host (`Some(false)`).
    ahead: Option<bool>,
    /// Whether the last step built with `ahead` went ahead.
    went_ahead: bool,
    /// Rows per slot of the sliding layers' ring caches; 0: every cache is linear (`ctx` rows).
    ring: usize,
    /// With a ring: the position each ring row of each slot holds (`u32::MAX`: none), as the
    /// steps and copies wrote them; what prefix reuse asks of [`Model::kv_holds`].
    ring_pos: Vec<u32>, // (slots, ring)
}

impl<B: Backend> Model<B> {
    /// Load `source`'s weights into `backend` and size every buffer for `opts`.
    pub fn load(backend: B, source: &ModelSource, opts: ModelOptions) -> Result<Self> {
        Self::load_with_budget(backend, source, opts, None)
    }

    /// As [`load`](Self::load), keeping at most `weight_budget` bytes resident (where given):
    /// the shared weights, the KV cache and the activations always, and as many decoder layers as
    /// the rest holds; the others are streamed per step ([`crate::stream`]), which then runs as
    /// one submission per layer. On a backend that computes on the weights in place (`cpu`,
    /// `cpu-ref`, Vulkan on shared memory) residency is the weight owners' (a file's map); a
    /// backend that copies weights holds the streamed layers in slots of its own
    /// ([`Backend::stream_slots`]), each filled before its layer runs (and one that cannot is
    /// an error). A budget that holds every layer changes nothing. Errors when it cannot hold
    /// the shared weights, the KV cache, the activations and two layers, naming each.
    pub fn load_with_budget(
        mut backend: B,
        source: &ModelSource,
        opts: ModelOptions,
        weight_budget: Option<usize>,
    ) -> Result<Self> {
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
        if !backend.supports(OpKind::KvCache(opts.kv)) {
            return Err(Error::Invalid(
                format!("the {} backend has no {:?} KV cache", backend.name(), opts.kv).to_lowercase(),
            ));
        }
        if opts.kv == KvType::F16 && !c.head_dim.is_multiple_of(2) {
            return Err(Error::Invalid(format!("an f16 KV cache needs an even head_dim (have {})", c.head_dim)));
        }
        // A backend that copies weights streams through buffers of its own (`ring`: the first
        // streamed layer, and how many slots); one that computes on the file's pages streams them.
        let (state, sizes) = alloc_state(&mut backend, &c, &opts)?;
        let logits_host = opts.logit_rows.saturating_mul(c.vocab).saturating_mul(4);
        let needs = |shared, layer| Needs {
            shared,
            kv_cache: sizes.kv_cache,
            buffers: sizes.buffers.saturating_add(logits_host),
            layer,
        };
        let mut ring = None;
        let mut copied_plan = None;
        if let Some(budget) = weight_budget
            && !backend.weights_in_place()
        {
            let (shared, layer) = source_sizes(source, &c)?;
            let plan = Plan::new(budget, c.layers, needs(shared, layer))?;
            if let Plan::Stream { pinned, ahead } = plan {
                let slots = 1 + ahead;
                if !backend.stream_slots(slots, layer).map_err(|e| Error::backend(backend.name(), e))? {
                    return Err(Error::Invalid(format!(
                        "a memory budget needs a backend that computes on the weights' host memory in place \
                         or streams layers through buffers of its own; {} does neither",
                        backend.name()
                    )));
                }
                ring = Some((pinned, slots));
            }
            copied_plan = Some(plan);
        }
        let mut spans = Spans::default();
        let weights = load_weights(&mut backend, source, &c, opts.act, &mut spans, ring)?;
        let stream = match weight_budget {
            None => None,
            Some(budget) => {
                let layer_spans = LayerSpans::new(spans.layers);
                let layer = (0..c.layers).map(|l| layer_spans.bytes(l)).max().unwrap_or(0);
                match copied_plan.map_or_else(|| Plan::new(budget, c.layers, needs(spans.shared, layer)), Ok)? {
                    Plan::Resident => None,
                    Plan::Stream { pinned, ahead } => Some(Streamer::new(layer_spans, pinned, ahead)?),
                }
            }
        };
        let ops_per_step = 8 + c.layers * 24 + 4 * opts.logit_rows;
        let no_mem = |what: &str| Error::Invalid(format!("no memory for {what}"));
        let mut logits = Vec::new();
        logits.try_reserve_exact(opts.logit_rows * c.vocab).map_err(|_| no_mem("the logits"))?;
        logits.resize(opts.logit_rows * c.vocab, 0.0);
        let host = StepHost {
            tokens: Vec::with_capacity(opts.max_batch),
            positions: Vec::with_capacity(opts.max_batch),
            seqs: Vec::with_capacity(opts.max_batch),
            ops: Vec::with_capacity(ops_per_step),
            out_row: Vec::with_capacity(opts.max_batch),
            logits,
            ids_f: alloc::vec![0.0; opts.logit_rows],
            ids: alloc::vec![0; opts.logit_rows],
            layer_end: Vec::with_capacity(c.layers),
        };
        let fused = Fusions {
            add_norm: backend.supports(OpKind::AddRmsNorm),
            qkv: backend.supports(OpKind::Qkv),
            ffn: backend.supports(OpKind::GatedFfn),
            head_argmax: weights.output_q8.is_some() && backend.supports(OpKind::HeadArgmax(weights.output_fmt)),
            embed_ids: backend.supports(OpKind::EmbedIds(weights.embed_fmt)),
        };
        let backend_name = String::from(backend.name());
        let ring = opts.kv_ring(&c).unwrap_or(0);
        let ring_pos = alloc::vec![u32::MAX; opts.slots * ring];
        Ok(Model {
            config: c,
            opts,
            backend,
            backend_name,
            weights,
            state,
            host,
            fused,
            stream,
            ahead: None,
            went_ahead: false,
            ring,
            ring_pos,
        })
    }

    /// With a weight budget that does not hold every layer: `(pinned, ahead)`, the layers kept
    /// resident (`0..pinned`) and how many streamed layers are read ahead. `None` otherwise.
    pub fn streaming(&self) -> Option<(usize, usize)> {
        self.stream.as_ref().map(|s| (s.pinned(), s.ahead()))
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn options(&self) -> &ModelOptions {
        &self.opts
    }

    /// The backend back, the model dropped.
    pub fn into_backend(self) -> B {
        self.backend
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Whether the backend runs [`copy_kv`](Model::copy_kv) (`Op::Copy`).
    pub fn can_copy_kv(&self) -> bool {
        self.backend.supports(OpKind::Copy)
    }

    /// Rows per slot of the sliding-window layers' ring caches (`None`: every layer's cache
    /// holds all `ctx` positions). See [`ModelOptions::kv_ring`].
    pub fn kv_ring(&self) -> Option<usize> {
        (self.ring > 0).then_some(self.ring)
    }

    /// Bytes of the KV caches (every layer's K and V, every slot).
    pub fn kv_bytes(&self) -> usize {
        self.opts.kv_bytes(&self.config)
    }

    /// Whether slot `slot`'s caches still hold `positions` as its steps (or copies) wrote them:
    /// always for a linear cache (the caller knows what it fed); with a ring, each position's
    /// row must not have been overwritten by a later position since.
    pub fn kv_holds(&self, slot: usize, positions: core::ops::Range<usize>) -> bool {
        if self.ring == 0 || positions.is_empty() {
            return true;
        }
        let Some(rows) = self.ring_pos.get(slot * self.ring..(slot + 1) * self.ring) else { return false };
        positions.len() <= self.ring && positions.clone().all(|p| rows[p % self.ring] as usize == p)
    }

    /// The longest prefix `m <= n` of what slot `slot` caches that a sequence can go on from (feed
    /// position `m` next): every key position `m` and later queries see from before `m` is still
    /// in the sliding layers' rings (the last `window` positions before `m`). `n` without a ring.
    pub fn kv_resumable(&self, slot: usize, n: usize) -> usize {
        if self.ring == 0 {
            return n;
        }
        let w = self.config.sliding_window;
        let mut m = n;
        // Each position is looked at once: past a position the ring lost, only a prefix that
        // ends at or before it can hold its last `w` positions.
        loop {
            match (m.saturating_sub(w)..m).rev().find(|&p| !self.kv_holds(slot, p..p + 1)) {
                None => return m,
                Some(lost) => m = lost,
            }
        }
    }

    /// Copy what slot `src` caches at `positions` into slot `dst` at the same positions: every
    /// layer's K and V rows, as one step of copies on the device. A prompt prefix another slot
    /// holds is moved this way instead of computed again; since the kernels are row-independent,
    /// the copy holds exactly what computing those positions in `dst` would have written. An
    /// empty range does nothing.
    ///
    /// A sliding layer's ring (see [`ModelOptions::swa_ring`]) holds only `src`'s latest
    /// positions: its rows holding positions `max(a, b - ring)..b` are copied (where `src` still
    /// holds them), and the copy is an error, copying nothing, unless `src` still holds the last
    /// `window` positions before `b` (those `dst`'s next queries see; ask
    /// [`kv_resumable`](Self::kv_resumable) first), and `dst` its own before `a`. `dst` then goes
    /// on from `b`.
    pub fn copy_kv(&mut self, src: usize, dst: usize, positions: core::ops::Range<usize>) -> Result<()> {
        let o = self.opts;
        if src >= o.slots || dst >= o.slots {
            return Err(Error::Invalid(format!("copy_kv: slot {} out of range (have {})", src.max(dst), o.slots)));
        }
        if src == dst {
            return Err(Error::Invalid(format!("copy_kv: slot {src} onto itself")));
        }
        if positions.start > positions.end || positions.end > o.ctx {
            return Err(Error::Invalid(format!("copy_kv: positions {positions:?} outside the context of {}", o.ctx)));
        }
        if positions.is_empty() {
            return Ok(());
        }
        let (a, b, ring) = (positions.start, positions.end, self.ring);
        // With a ring: the positions src still holds, going back from b (at most ring of them).
        let mut lo = b;
        if ring > 0 {
            while lo > a.max(b.saturating_sub(ring)) && self.kv_holds(src, lo - 1..lo) {
                lo -= 1;
            }
            let need = a.max(b.saturating_sub(self.config.sliding_window));
            if lo > need {
                return Err(Error::Invalid(format!(
                    "copy_kv: slot {src} no longer holds positions {need}..{lo} in its sliding-window ring of {ring} \
                     rows (later positions overwrote them)"
                )));
            }
            // What dst's next queries see from before a is dst's own.
            let own = b.saturating_sub(self.config.sliding_window)..a;
            if !self.kv_holds(dst, own.clone()) {
                return Err(Error::Invalid(format!(
                    "copy_kv: slot {dst} no longer holds its own positions {own:?} in its sliding-window ring"
                )));
            }
        }
        // Buffer words a cache row takes.
        let kvd = o.kv.row_words(self.config.kv_heads * self.config.head_dim);
        let (s, h) = (&self.state, &mut self.host);
        h.ops.clear();
        for (l, (kc, vc)) in s.k_cache.iter().zip(&s.v_cache).enumerate() {
            let sliding = self.weights.layers[l].kind == LayerKind::Sliding;
            let mut copy = |rows_per_slot: usize, row: usize, n: usize| {
                let at = |slot: usize| (slot * rows_per_slot + row) * kvd;
                for c in [*kc, *vc] {
                    h.ops.push(Op::Copy { out: View::new(c, at(dst)), src: View::new(c, at(src)), len: n * kvd });
                }
            };
            if ring > 0 && sliding {
                // Positions lo..b at rows p % ring: one piece, or two where they wrap.
                let (r0, n) = (lo % ring, b - lo);
                let first = n.min(ring - r0);
                if first > 0 {
                    copy(ring, r0, first);
                }
                if n > first {
                    copy(ring, 0, n - first);
                }
            } else {
                // Slot `i`'s position `p` is row `i·ctx + p` of the cache: (slots·ctx, kvd).
                copy(o.ctx, a, b - a);
            }
        }
        let step = Step { tokens: &[], positions: &[], seqs: &[] };
        let name = &self.backend_name;
        self.backend.submit(&step, &h.ops).map_err(|e| Error::backend(name, e))?;
        if ring > 0 {
            // dst's ring now holds lo..b; its rows for a..lo hold none of the copied positions.
            let rows = &mut self.ring_pos[dst * ring..(dst + 1) * ring];
            for p in a..lo {
                if rows[p % ring] as usize == p {
                    rows[p % ring] = u32::MAX;
                }
            }
            for p in lo..b {
                rows[p % ring] = p as u32;
            }
        }
        Ok(())
    }

    /// Feed `tokens` of sequence `slot` starting at position `pos` (earlier positions must
    /// already be cached) and return the logits of the last token, `(vocab)`. Chunks before the
    /// last skip the LM head.
    pub fn forward(&mut self, slot: usize, pos: usize, tokens: &[u32]) -> Result<&[f32]> {
        self.forward_chunks(slot, pos, tokens, Want::Logits)?;
        Ok(&self.host.logits[..self.config.vocab])
    }

    /// Like [`forward`](Model::forward), but returns only the last token's argmax (greedy
    /// decoding), computed on the device.
    pub fn forward_argmax(&mut self, slot: usize, pos: usize, tokens: &[u32]) -> Result<u32> {
        self.forward_chunks(slot, pos, tokens, Want::Argmax)?;
        Ok(self.host.ids[0])
    }

    /// Greedy decoding of sequence `slot`: feed `first` at `pos`, then each step's argmax to
    /// the next step, until `on_token` (handed each new token) returns `false` or `max` tokens
    /// are out. The tokens are [`forward_argmax`](Model::forward_argmax)'s in a loop. Where the
    /// backend runs ahead ([`Backend::submit_ahead`]) the device feeds each argmax to the next
    /// step's embedding itself ([`Op::EmbedIds`]) and step k+1 is submitted before step k's
    /// token is read, so the host's work between steps overlaps the device's. A stop then
    /// leaves one more step run: it writes K/V at the position after the last token fed, which
    /// nothing reads before a later step there writes it again. Returns the tokens produced.
    pub fn decode_greedy(
        &mut self,
        slot: usize,
        pos: usize,
        first: u32,
        max: usize,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<usize> {
        if max == 0 {
            return Ok(0);
        }
        let ahead = self.fused.embed_ids && self.stream.is_none();
        let mut n = 0;
        if !ahead || !self.step_ahead(slot, pos, Some(first))? {
            // The backend runs each step to the end (or the first step already did, above).
            let mut t = if ahead { self.host.ids[0] } else { self.forward_argmax(slot, pos, &[first])? };
            loop {
                n += 1;
                if !on_token(t) || n == max {
                    return Ok(n);
                }
                t = self.forward_argmax(slot, pos + n, &[t])?;
            }
        }
        let mut in_flight = 1;
        let done = loop {
            let next = pos + n + 1;
            if n + 1 < max && next < self.opts.ctx {
                if let Err(e) = self.step_ahead(slot, next, None) {
                    break Err(e);
                }
                in_flight += 1;
            }
            in_flight -= 1;
            let t = match self.wait_ahead() {
                Ok(t) => t,
                Err(e) => break Err(e),
            };
            n += 1;
            if !on_token(t) || n == max || in_flight == 0 {
                break Ok(n);
            }
        };
        // Nothing is left ahead for a later call to mistake for its own, error or not.
        let mut drained = Ok(());
        for _ in 0..in_flight {
            drained = drained.and(self.wait_ahead().map(|_| ()));
        }
        let n = done?;
        drained.map(|_| n)
    }

    /// One greedy decode step submitted ahead: `token` fed at `pos`, or (`None`) the last
    /// step's argmax, on the device. `Ok(false)`: the backend ran it to the end instead (only
    /// with a token), its argmax in `host.ids[0]`.
    fn step_ahead(&mut self, slot: usize, pos: usize, token: Option<u32>) -> Result<bool> {
        let t = [token.unwrap_or(0)];
        self.ahead = Some(token.is_none());
        let r = self.run_step(&[SeqInput { slot, pos, tokens: &t }], &[Want::Argmax], false);
        self.ahead = None;
        let went = core::mem::take(&mut self.went_ahead);
        r.map(|_| went)
    }

    /// The token of the oldest step submitted ahead.
    fn wait_ahead(&mut self) -> Result<u32> {
        let name = &self.backend_name;
        let out = &mut self.host.ids_f[..1];
        self.backend.wait_ahead(&mut [out]).map_err(|e| Error::backend(name, e))?;
        Ok(self.host.ids_f[0] as u32)
    }

    fn forward_chunks(&mut self, slot: usize, pos: usize, tokens: &[u32], want: Want) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::Invalid("forward: no tokens".into()));
        }
        let mut p = pos;
        let chunks = tokens.len().div_ceil(self.opts.max_batch);
        for (i, chunk) in tokens.chunks(self.opts.max_batch).enumerate() {
            let w = if i + 1 == chunks { want } else { Want::Nothing };
            self.run_step(&[SeqInput { slot, pos: p, tokens: chunk }], &[w], false)?;
            p += chunk.len();
        }
        Ok(())
    }

    /// Like [`forward`](Model::forward) but appends the logits of every position to `out`,
    /// `(tokens.len(), vocab)` row-major.
    pub fn forward_all(&mut self, slot: usize, pos: usize, tokens: &[u32], out: &mut Vec<f32>) -> Result<()> {
        let chunk_len = self.opts.max_batch.min(self.opts.logit_rows);
        let mut p = pos;
        for chunk in tokens.chunks(chunk_len) {
            self.run_step(&[SeqInput { slot, pos: p, tokens: chunk }], &[Want::Logits], true)?;
            out.extend_from_slice(&self.host.logits[..chunk.len() * self.config.vocab]);
            p += chunk.len();
        }
        Ok(())
    }

    /// One step over several sequences at once (e.g. one decode token each). Returns the last
    /// token's logits of each sequence, `(seqs.len(), vocab)` row-major.
    pub fn forward_batch(&mut self, seqs: &[SeqInput<'_>]) -> Result<&[f32]> {
        self.run_step(seqs, &[], false)?;
        Ok(&self.host.logits[..seqs.len() * self.config.vocab])
    }

    /// One step over several sequences, each asking for what it needs (`want[i]` for `seqs[i]`;
    /// missing entries mean [`Want::Logits`]): sequences still reading their prompt skip the LM
    /// head, greedy ones get their argmax from the device, the rest their logits.
    pub fn forward_select(&mut self, seqs: &[SeqInput<'_>], want: &[Want]) -> Result<StepOut<'_>> {
        let (read_logits, read_ids) = self.run_step(seqs, want, false)?;
        let h = &self.host;
        Ok(StepOut {
            out_row: &h.out_row,
            logits: &h.logits,
            ids: &h.ids,
            vocab: self.config.vocab,
            read_logits,
            read_ids,
        })
    }

    /// Run, once, the step shapes a server meets first (one token in each of 1, 2, 4, … slots
    /// up to all of them, and a prompt chunk of up to 64 tokens), so that a device backend
    /// records their command buffers and compiles their kernel variants now rather than while
    /// the first requests wait. It writes K/V at the first positions of those slots; callers
    /// treat every slot as empty afterwards.
    pub fn warm_up(&mut self) -> Result<()> {
        let (slots, max_batch, ctx) = (self.opts.slots, self.opts.max_batch, self.opts.ctx);
        let most = max_batch.min(self.opts.logit_rows);
        let tokens = [self.config.bos.unwrap_or(0); 64];
        let mut batches: Vec<usize> = (0..).map(|k| 1usize << k).take_while(|&b| b < slots).collect();
        batches.push(slots);
        for b in batches.into_iter().filter(|&b| b <= most) {
            let seqs: Vec<SeqInput<'_>> = (0..b).map(|slot| SeqInput { slot, pos: 0, tokens: &tokens[..1] }).collect();
            let want: Vec<Want> = seqs.iter().map(|_| Want::Argmax).collect();
            self.forward_select(&seqs, &want)?;
        }
        let n = tokens.len().min(max_batch).min(ctx);
        if n > 1 {
            self.forward_select(&[SeqInput { slot: 0, pos: 0, tokens: &tokens[..n] }], &[Want::Argmax])?;
        }
        Ok(())
    }

    /// Check a step's inputs and lay out its host arrays; returns the number of logit rows.
    fn prepare(&mut self, seqs: &[SeqInput<'_>], want: &[Want], all_rows: bool) -> Result<usize> {
        let (c, o, h) = (&self.config, &self.opts, &mut self.host);
        h.tokens.clear();
        h.positions.clear();
        h.seqs.clear();
        h.out_row.clear();
        if seqs.len() > o.max_batch {
            return Err(Error::Invalid(format!("step of more than {} sequences", o.max_batch)));
        }
        let mut logit_rows = 0;
        for (i, s) in seqs.iter().enumerate() {
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
                ring_row: (s.slot * self.ring) as u32,
            });
            h.tokens.extend_from_slice(s.tokens);
            h.positions.extend((s.pos..s.pos + s.tokens.len()).map(|p| p as u32));
            if all_rows {
                h.out_row.push(Some(logit_rows as u32));
                logit_rows += s.tokens.len();
            } else if want.get(i).copied().unwrap_or_default() != Want::Nothing {
                h.out_row.push(Some(logit_rows as u32));
                logit_rows += 1;
            } else {
                h.out_row.push(None);
            }
        }
        if logit_rows > o.logit_rows {
            return Err(Error::Invalid(format!("step needs {logit_rows} rows of logits, have {}", o.logit_rows)));
        }
        Ok(logit_rows)
    }

    /// Build one step's ops top to bottom, submit them, read back what the sequences want.
    /// Returns whether logits and argmax ids were read.
    fn run_step(&mut self, seqs: &[SeqInput<'_>], want: &[Want], all_rows: bool) -> Result<(bool, bool)> {
        let logit_rows = self.prepare(seqs, want, all_rows)?;
        let wants = |w: Want| (0..seqs.len()).any(|i| want.get(i).copied().unwrap_or_default() == w);
        let read_logits = logit_rows > 0 && (all_rows || wants(Want::Logits));
        let read_ids = logit_rows > 0 && !all_rows && wants(Want::Argmax);
        let (c, w, s, h, fused) = (&self.config, &self.weights, &self.state, &mut self.host, self.fused);
        let (ring, kvt) = (self.ring, self.opts.kv);
        let n = h.tokens.len();
        let (hd, heads, kvh) = (c.head_dim, c.heads, c.kv_heads);
        let act = self.opts.act;
        let v = |b| View::new(b, 0);
        // A matmul group's input: the quantized rows when the group shares a layout, else f32.
        let input = |q8: Option<ActLayout>| match q8 {
            Some(_) => MatIn::Q8(v(s.xq)),
            None => MatIn::F32 { x: v(s.xn), act },
        };
        let quant = |buf, q8: Option<ActLayout>| q8.map(|layout| QuantOut { out: View::new(buf, 0), layout });
        let ops = &mut h.ops;
        ops.clear();
        h.layer_end.clear();
        let pushed = core::cell::Cell::new(0); // ops so far
        let mut push = |op: Op<B::Buffer, B::Weight>| {
            let native = match op {
                Op::AddRmsNorm { .. } => fused.add_norm,
                Op::Qkv { .. } => fused.qkv,
                Op::GatedFfn { .. } => fused.ffn,
                _ => true,
            };
            if native {
                ops.push(op);
            } else {
                let _ = op.expand(|o| {
                    ops.push(o);
                    Ok::<(), ()>(())
                });
            }
            pushed.set(ops.len());
        };

        // Embedding: x = embed[tokens] · embed_scale; then the first layer's pre-norm. The
        // residual stream alternates between two buffers: each junction reads one, writes the other.
        let mut xi = 0; // which of s.x holds the residual stream now
        let x = s.x[0];
        match self.ahead {
            Some(true) => push(Op::EmbedIds { out: v(x), table: w.embed, scale: c.embed_scale, ids: v(s.ids) }),
            _ => push(Op::Embed { out: v(x), table: w.embed, scale: c.embed_scale }),
        }
        let first = &w.layers[0];
        push(Op::AddRmsNorm {
            x: v(x),
            x_out: v(x),
            branch: None,
            post: None,
            out: v(s.xn),
            w: first.attn_norm,
            quant: quant(s.xq, first.qkv_q8),
            rows: n,
            dim: c.hidden,
            eps: c.eps,
        });

        for (l, lw) in w.layers.iter().enumerate() {
            let (rope, window, ring) = match lw.kind {
                LayerKind::Full => (c.rope_full, 0, 0),
                LayerKind::Sliding => (c.rope_local, c.sliding_window, ring),
            };
            // q, k, v = xn·Wᵀ; QK-norm (Gemma); RoPE; this step's keys and values into the cache
            push(Op::Qkv {
                x: input(lw.qkv_q8),
                wq: lw.wq,
                wk: lw.wk,
                wv: lw.wv,
                q: v(s.q),
                k: v(s.k),
                v: v(s.v),
                n,
                heads,
                kv_heads: kvh,
                head_dim: hd,
                q_norm: lw.q_norm,
                k_norm: lw.k_norm,
                eps: c.eps,
                rope: Some(RopeSpec { theta: rope.theta, scale: rope.scale, mode: c.rope_mode }),
                k_cache: Some(v(s.k_cache[l])),
                v_cache: Some(v(s.v_cache[l])),
                ring,
                kv: kvt,
            });
            // Causal attention over the cache (sliding window on local layers)
            push(Op::Attention {
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
                ring,
                kv: kvt,
            });
            // Output projection: xb = att·Woᵀ
            match lw.wo_q8 {
                Some(layout) => {
                    push(Op::QuantizeAct { out: v(s.xq_wide), x: v(s.att), rows: n, cols: heads * hd, layout });
                    push(Op::MatMulQ8 { out: v(s.xb), xq: v(s.xq_wide), w: lw.wo, n });
                }
                None => push(Op::MatMul { out: v(s.xb), x: v(s.att), w: lw.wo, n, act }),
            }
            // (Gemma) post-attention norm, residual, MLP pre-norm
            push(Op::AddRmsNorm {
                x: v(s.x[xi]),
                x_out: v(s.x[1 - xi]),
                branch: Some(v(s.xb)),
                post: lw.post_attn_norm,
                out: v(s.xn),
                w: lw.ffn_norm,
                quant: quant(s.xq, lw.ffn_q8),
                rows: n,
                dim: c.hidden,
                eps: c.eps,
            });
            xi = 1 - xi;
            // act = act(xn·Wgᵀ) · (xn·Wuᵀ)
            push(Op::GatedFfn {
                x: input(lw.ffn_q8),
                w_gate: lw.gate,
                w_up: lw.up,
                gate: v(s.gate),
                up: v(s.up),
                out: v(s.act),
                n,
                ffn: c.ffn,
                kind: match c.arch {
                    Arch::Gemma3 => Gate::GeluTanh,
                    Arch::Llama => Gate::Silu,
                },
                quant: quant(s.xq_wide, lw.down_q8),
            });
            // Down projection: xb = act·Wdᵀ
            match lw.down_q8 {
                Some(_) => push(Op::MatMulQ8 { out: v(s.xb), xq: v(s.xq_wide), w: lw.down, n }),
                None => push(Op::MatMul { out: v(s.xb), x: v(s.act), w: lw.down, n, act }),
            }
            // (Gemma) post-MLP norm, residual, and the next layer's pre-norm (or the final norm)
            let next = w.layers.get(l + 1);
            if next.is_none() && logit_rows == 0 {
                break; // a prompt chunk that needs no logits: the cache is all it fills
            }
            let (norm, q8) = next.map_or((w.out_norm, w.output_q8), |nl| (nl.attn_norm, nl.qkv_q8));
            push(Op::AddRmsNorm {
                x: v(s.x[xi]),
                x_out: v(s.x[1 - xi]),
                branch: Some(v(s.xb)),
                post: lw.post_ffn_norm,
                out: v(s.xn),
                w: norm,
                quant: quant(s.xq, q8),
                rows: n,
                dim: c.hidden,
                eps: c.eps,
            });
            if next.is_some() {
                h.layer_end.push(pushed.get());
            }
            xi = 1 - xi;
        }

        // LM head on the rows that need logits (every row, or some sequences' last), one matmul
        // per run of consecutive rows
        if logit_rows > 0 {
            let words = w.output_q8.map_or(0, |l| c.hidden / purehw_hal::act_block(l) * purehw_hal::act_words(l));
            // Only the ids read (greedy decoding): the LM head and its argmax as one op, which
            // leaves the logits unspecified.
            let fuse_ids = read_ids && !read_logits && c.final_softcap <= 0.0 && fused.head_argmax;
            let mut run: Option<(usize, usize, usize)> = None; // (first row, logit row, rows)
            let mut head = |first: usize, lrow: usize, rows: usize| {
                let out = View::new(s.logits, lrow * c.vocab);
                let xq = View::new(s.xq, first * words);
                push(match w.output_q8 {
                    Some(_) if fuse_ids => {
                        let ids = View::new(s.ids, lrow);
                        Op::HeadArgmax { out: ids, xq, w: w.output, n: rows, vocab: c.vocab, logits: out }
                    }
                    Some(_) => Op::MatMulQ8 { out, xq, w: w.output, n: rows },
                    None => Op::MatMul { out, x: View::new(s.xn, first * c.hidden), w: w.output, n: rows, act },
                });
            };
            for (sq, lrow) in h.seqs.iter().zip(&h.out_row) {
                let Some(lrow) = *lrow else { continue };
                let (first, rows) = if all_rows { (sq.row, sq.len) } else { (sq.row + sq.len - 1, 1) };
                let (first, lrow, rows) = (first as usize, lrow as usize, rows as usize);
                run = match run {
                    Some((f, l, r)) if f + r == first && l + r == lrow => Some((f, l, r + rows)),
                    Some((f, l, r)) => {
                        head(f, l, r);
                        Some((first, lrow, rows))
                    }
                    None => Some((first, lrow, rows)),
                };
            }
            if let Some((f, l, r)) = run {
                head(f, l, r);
            }
            if c.final_softcap > 0.0 {
                push(Op::Softcap { x: v(s.logits), len: logit_rows * c.vocab, cap: c.final_softcap });
            }
            if read_ids && !fuse_ids {
                push(Op::Argmax { out: v(s.ids), x: v(s.logits), rows: logit_rows, cols: c.vocab });
            }
        }

        let step = Step { tokens: &h.tokens, positions: &h.positions, seqs: &h.seqs };
        let name = &self.backend_name;
        match &self.stream {
            // One round trip: the step and the reads of what it computed (a GPU: one command
            // buffer, one wait, not a second submission for the 4 bytes of an argmax).
            None if self.ahead.is_some() => {
                let ids = View::new(s.ids, 0);
                let went = self.backend.submit_ahead(&step, ops, &[(ids, 1)]).map_err(|e| Error::backend(name, e))?;
                if !went {
                    self.backend
                        .submit_read(&step, ops, &mut [(ids, &mut h.ids_f[..1])])
                        .map_err(|e| Error::backend(name, e))?;
                }
                self.went_ahead = went;
            }
            None => {
                let ids = View::new(s.ids, 0);
                let logits = View::new(s.logits, 0);
                let (ids_f, logits_f) = (&mut h.ids_f[..logit_rows], &mut h.logits[..logit_rows * c.vocab]);
                let r = match (read_ids, read_logits) {
                    (true, true) => self.backend.submit_read(&step, ops, &mut [(ids, ids_f), (logits, logits_f)]),
                    (true, false) => self.backend.submit_read(&step, ops, &mut [(ids, ids_f)]),
                    (false, true) => self.backend.submit_read(&step, ops, &mut [(logits, logits_f)]),
                    (false, false) => self.backend.submit(&step, ops),
                };
                r.map_err(|e| Error::backend(name, e))?;
            }
            // One submission per layer (the embedding with the first, the LM head with the last),
            // each layer read ahead before and released after.
            Some(st) => {
                let mut start = 0;
                for l in 0..c.layers {
                    let end = h.layer_end.get(l).copied().unwrap_or(ops.len());
                    st.before(l);
                    if l >= st.pinned() {
                        self.backend.fill_slot(l).map_err(|e| Error::backend(name, e))?;
                    }
                    self.backend.submit(&step, &ops[start..end]).map_err(|e| Error::backend(name, e))?;
                    // The layer's bytes are released only once nothing reads them.
                    self.backend.finish().map_err(|e| Error::backend(name, e))?;
                    st.after(l);
                    start = end;
                }
            }
        }
        // The ring rows this step wrote now hold its positions.
        if ring > 0 {
            for sq in seqs {
                for p in sq.pos..sq.pos + sq.tokens.len() {
                    self.ring_pos[sq.slot * ring + p % ring] = p as u32;
                }
            }
        }
        // A streamed step reads back after its last layer's submission.
        if self.stream.is_some() {
            if read_ids {
                let out = &mut h.ids_f[..logit_rows];
                self.backend.read(View::new(s.ids, 0), out).map_err(|e| Error::backend(name, e))?;
            }
            if read_logits {
                let out = &mut h.logits[..logit_rows * c.vocab];
                self.backend.read(View::new(s.logits, 0), out).map_err(|e| Error::backend(name, e))?;
            }
        }
        if read_ids && !self.went_ahead {
            for (d, &f) in h.ids.iter_mut().zip(h.ids_f[..logit_rows].iter()) {
                *d = f as u32;
            }
        }
        Ok((read_logits, read_ids))
    }
}

/// The activation layout a group of matmuls can share: `Some` when activations are int8 and every
/// weight of the group is quantized in one layout.
fn shared_q8(act: ActQuant, formats: &[Format]) -> Option<ActLayout> {
    if act != ActQuant::Int8 {
        return None;
    }
    let first = formats.first()?.act_layout()?;
    formats.iter().all(|f| f.act_layout() == Some(first)).then_some(first)
}

/// Where the loaded weights' bytes are, for a weight budget: the bytes every token reads, and
/// each layer's matrices (norms are copied into owned f32 at load and count as shared).
#[derive(Default)]
struct Spans {
    shared: usize,
    layers: Vec<Vec<HostBytes>>, // (layers) each matrix's codes, scales, zero points
}

impl Spans {
    fn add(&mut self, w: &HostWeight, layer: Option<usize>) {
        for p in w.byte_parts().into_iter().flatten() {
            match layer {
                Some(l) => {
                    if self.layers.len() <= l {
                        self.layers.resize_with(l + 1, Vec::new);
                    }
                    self.layers[l].push(p.clone());
                }
                None => self.shared += p.len(),
            }
        }
    }
}

/// Load every weight the architecture needs, checking shapes, formats and backend support.
fn load_weights<B: Backend>(
    backend: &mut B,
    src: &ModelSource,
    c: &ModelConfig,
    act: ActQuant,
    spans: &mut Spans,
    ring: Option<(usize, usize)>,
) -> Result<Weights<B::Weight>> {
    let gemma = c.arch == Arch::Gemma3;
    let (embed, embed_fmt) = matrix(backend, src, Role::TokenEmbd, None, spans, None)?;
    let (output, output_fmt) =
        if c.tied_embeddings { (embed, embed_fmt) } else { matrix(backend, src, Role::Output, None, spans, None)? };
    if c.layers == 0 {
        return Err(Error::format(src.label.clone(), "the model has no layers"));
    }
    let out_norm = norm(backend, src, c, Role::OutputNorm, None, spans)?;
    let mut layers = Vec::with_capacity(c.layers);
    for l in 0..c.layers {
        let li = Some(l);
        // Gemma's extra norms (QK-norm, post-attention, post-MLP); Llama has none.
        let gemma_norm = |b: &mut B, role: Role, sp: &mut Spans| -> Result<Option<B::Weight>> {
            if gemma { norm(b, src, c, role, li, sp).map(Some) } else { Ok(None) }
        };
        // A streamed layer's slot where the backend streams through buffers of its own.
        let slot = ring.and_then(|(pinned, slots)| (l >= pinned).then(|| (l - pinned) % slots));
        let attn_norm = norm(backend, src, c, Role::AttnNorm, li, spans)?;
        let (wq, fq) = matrix(backend, src, Role::AttnQ, li, spans, slot)?;
        let (wk, fk) = matrix(backend, src, Role::AttnK, li, spans, slot)?;
        let (wv, fv) = matrix(backend, src, Role::AttnV, li, spans, slot)?;
        let (wo, fo) = matrix(backend, src, Role::AttnOut, li, spans, slot)?;
        let q_norm = gemma_norm(backend, Role::AttnQNorm, spans)?;
        let k_norm = gemma_norm(backend, Role::AttnKNorm, spans)?;
        let post_attn_norm = gemma_norm(backend, Role::PostAttnNorm, spans)?;
        let ffn_norm = norm(backend, src, c, Role::FfnNorm, li, spans)?;
        let (gate, fg) = matrix(backend, src, Role::FfnGate, li, spans, slot)?;
        let (up, fu) = matrix(backend, src, Role::FfnUp, li, spans, slot)?;
        let (down, fd) = matrix(backend, src, Role::FfnDown, li, spans, slot)?;
        let post_ffn_norm = gemma_norm(backend, Role::PostFfnNorm, spans)?;
        layers.push(Layer {
            kind: c.layer_kinds.get(l).copied().unwrap_or(LayerKind::Full),
            attn_norm,
            wq,
            wk,
            wv,
            wo,
            q_norm,
            k_norm,
            post_attn_norm,
            ffn_norm,
            gate,
            up,
            down,
            post_ffn_norm,
            qkv_q8: shared_q8(act, &[fq, fk, fv]),
            wo_q8: shared_q8(act, &[fo]),
            ffn_q8: shared_q8(act, &[fg, fu]),
            down_q8: shared_q8(act, &[fd]),
        });
    }
    Ok(Weights { embed, layers, out_norm, output, output_q8: shared_q8(act, &[output_fmt]), output_fmt, embed_fmt })
}

/// What a weight budget plans with, from the source alone (for a backend that copies weights,
/// before anything is loaded): the bytes of the weights every token reads (norms as the f32
/// vectors they are loaded as) and the largest layer's matrix parts.
fn source_sizes(src: &ModelSource, c: &ModelConfig) -> Result<(usize, usize)> {
    let (mut shared, mut layer) = (0usize, 0usize);
    for role in Role::ALL.into_iter().filter(|r| r.used_by(c.arch) && !r.per_layer()) {
        if role == Role::Output && c.tied_embeddings {
            continue;
        }
        let w = required(src, role, None)?;
        shared += if w.rows == 1 { w.cols * 4 } else { w.total_bytes() };
    }
    for l in 0..c.layers {
        let mut bytes = 0;
        for role in Role::ALL.into_iter().filter(|r| r.used_by(c.arch) && r.per_layer()) {
            let w = required(src, role, Some(l))?;
            if w.rows == 1 {
                shared += w.cols * 4;
            } else {
                bytes += w.total_bytes();
            }
        }
        layer = layer.max(bytes);
    }
    Ok((shared, layer))
}

fn required(src: &ModelSource, role: Role, layer: Option<usize>) -> Result<HostWeight> {
    src.weight(role, layer)?.ok_or_else(|| {
        let at = layer.map(|l| format!(" of layer {l}")).unwrap_or_default();
        Error::format(src.label.clone(), format!("missing tensor for {role:?}{at}"))
    })
}

/// A weight matrix handed to the backend as stored (no conversion), after asking whether the
/// backend can compute with its format. The embedding table also serves as a tied LM head.
fn matrix<B: Backend>(
    b: &mut B,
    src: &ModelSource,
    role: Role,
    layer: Option<usize>,
    spans: &mut Spans,
    slot: Option<usize>,
) -> Result<(B::Weight, Format)> {
    let hw = required(src, role, layer)?;
    let embed_ok = role != Role::TokenEmbd || b.supports(OpKind::Embed(hw.format));
    if !embed_ok || !b.supports(OpKind::MatMul(hw.format)) {
        let at = layer.map(|l| format!(" (layer {l})")).unwrap_or_default();
        return Err(Error::format(
            src.label.clone(),
            format!("backend {} cannot compute {:?}{at} stored as {}", b.name(), role, hw.format.name()),
        ));
    }
    let w = match (layer, slot) {
        (Some(l), Some(slot)) => b.load_streamed(&hw, l, slot),
        _ => b.load_weight(&hw),
    };
    let w = w.map_err(|e| Error::backend(b.name(), e))?;
    spans.add(&hw, layer);
    Ok((w, hw.format))
}

/// A norm vector as f32 on the host, with Gemma's `1 + w` applied for HF checkpoints (as HF does,
/// in f32).
fn norm<B: Backend>(
    b: &mut B,
    src: &ModelSource,
    c: &ModelConfig,
    role: Role,
    layer: Option<usize>,
    spans: &mut Spans,
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
    spans.add(&f, None);
    b.load_weight(&f).map_err(|e| Error::backend(b.name(), e))
}

/// Bytes of a model's buffers, for a weight budget.
struct StateSizes {
    kv_cache: usize,
    buffers: usize,
}

fn alloc_state<B: Backend>(b: &mut B, c: &ModelConfig, o: &ModelOptions) -> Result<(RunState<B::Buffer>, StateSizes)> {
    let name = String::from(b.name());
    let mut elems = 0usize; // every buffer's f32 elements so far
    // Sizes come from files and options: overflow is an error, not a wrap.
    let mul = |dims: &[usize]| {
        dims.iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| Error::Invalid(format!("buffer of {dims:?} elements is too large")))
    };
    let mut a = |dims: &[usize]| -> Result<B::Buffer> {
        let n = mul(dims)?;
        elems = elems.saturating_add(n);
        b.alloc(n).map_err(|e| Error::backend(&name, e))
    };
    let (qd, kvd, mb) = (mul(&[c.heads, c.head_dim])?, mul(&[c.kv_heads, c.head_dim])?, o.max_batch);
    let x = [a(&[mb, c.hidden])?, a(&[mb, c.hidden])?];
    let xb = a(&[mb, c.hidden])?;
    let xn = a(&[mb, c.hidden])?;
    // Quantized rows: 32-element blocks take the most words (40 bytes per 32 values).
    let q8 = |cols: usize| cols.div_ceil(32) * purehw_hal::act_words(ActLayout::Q8A);
    let xq = a(&[mb, q8(c.hidden)])?;
    let xq_wide = a(&[mb, q8(qd.max(c.ffn))])?;
    let q = a(&[mb, qd])?;
    let k = a(&[mb, kvd])?;
    let v = a(&[mb, kvd])?;
    let att = a(&[mb, qd])?;
    let gate = a(&[mb, c.ffn])?;
    let up = a(&[mb, c.ffn])?;
    let act = a(&[mb, c.ffn])?;
    let logits = a(&[o.logit_rows, c.vocab])?;
    let ids = a(&[o.logit_rows])?;
    // Per layer: ctx rows a slot, or a sliding layer's ring; rows of `kv`'s elements.
    let mut k_cache = Vec::with_capacity(c.layers);
    let mut v_cache = Vec::with_capacity(c.layers);
    let mut kv = 0usize;
    let words = o.kv.row_words(kvd);
    for l in 0..c.layers {
        let rows = o.layer_rows(c, l);
        k_cache.push(a(&[o.slots, rows, words])?);
        v_cache.push(a(&[o.slots, rows, words])?);
        kv = kv.saturating_add(mul(&[2, o.slots, rows, words])?);
    }
    let sizes = StateSizes { kv_cache: kv.saturating_mul(4), buffers: elems.saturating_sub(kv).saturating_mul(4) };
    Ok((RunState { x, xb, xn, xq, xq_wide, q, k, v, att, gate, up, act, logits, ids, k_cache, v_cache }, sizes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Gemma 3 text config of the given shape (every 6th layer global).
    fn gemma3(layers: usize, kv_heads: usize, head_dim: usize, window: usize, max_ctx: usize) -> ModelConfig {
        let heads = 2 * kv_heads;
        let json = format!(
            r#"{{"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
            "num_hidden_layers": {layers}, "num_attention_heads": {heads}, "num_key_value_heads": {kv_heads},
            "head_dim": {head_dim}, "max_position_embeddings": {max_ctx}, "sliding_window": {window},
            "sliding_window_pattern": 6}}"#
        );
        ModelConfig::from_hf_json("test", &json).unwrap()
    }

    #[test]
    fn sliding_layers_keep_only_their_window() {
        // Gemma 3 27B's attention: 62 layers (10 global), 16 kv heads of 128, window 1024.
        let c = gemma3(62, 16, 128, 1024, 131_072);
        let row = 2 * 4 * 16 * 128; // K and V, f32, one position of one layer
        assert_eq!(c.layer_kinds.iter().filter(|&&k| k == LayerKind::Full).count(), 10);
        let o = ModelOptions { ctx: 32_768, ..ModelOptions::default() };
        assert_eq!(o.kv_ring(&c), Some(1024 + 128 - 1));
        let full = ModelOptions { swa_ring: false, ..o };
        assert_eq!(full.kv_ring(&c), None);
        assert_eq!(full.kv_bytes(&c), 62 * 32_768 * row);
        assert_eq!(o.kv_bytes(&c), (10 * 32_768 + 52 * 1151) * row);
        // 31 GiB → under 6 GiB at 32k positions.
        assert!(full.kv_bytes(&c) == 31 << 30 && o.kv_bytes(&c) < 6 << 30);
        // Slots multiply both.
        let four = ModelOptions { slots: 4, ..o };
        assert_eq!(four.kv_bytes(&c), 4 * o.kv_bytes(&c));

        // Gemma 3 270M: 18 layers (3 global), one kv head of 256, window 512.
        let c = gemma3(18, 1, 256, 512, 32_768);
        let row = 2 * 4 * 256;
        let o = ModelOptions::default(); // ctx 4096, max_batch 128
        assert_eq!(o.kv_bytes(&c), (3 * 4096 + 15 * 639) * row);
        assert_eq!(ModelOptions { swa_ring: false, ..o }.kv_bytes(&c), 18 * 4096 * row);

        // A ring no shorter than ctx is no ring; neither is a model without sliding layers.
        let short = ModelOptions { ctx: 600, ..o };
        assert_eq!(short.kv_ring(&c), None);
        assert_eq!(short.kv_bytes(&c), 18 * 600 * row);
        let mut global = c.clone();
        global.layer_kinds.fill(LayerKind::Full);
        assert_eq!(o.kv_ring(&global), None);
    }
}

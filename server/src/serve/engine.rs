//! The inference thread: continuous batching over KV-cache slots.
//!
//! One engine per served model. Requests arrive as [`Job`]s through a bounded channel (its bound
//! is the queue); the thread owns the model and loops:
//!
//! 1. drop sequences whose client went away (their event channel is closed);
//! 2. admit queued jobs into free slots;
//! 3. build one step: a decode row for every generating sequence plus one prefill chunk;
//! 4. run it (`Model::forward_select`), then sample each sequence that has a new token. A row
//!    asks only for what it needs: nothing for a prompt chunk before the last, the device's
//!    argmax for plain greedy rows (4 bytes back instead of the vocabulary's logits), the logits
//!    for the rest (sampling, penalties, logprobs, JSON guards).
//!
//! A sequence's tokens depend only on its own prompt, parameters and seed: every backend kernel
//! computes each row independently of the others in the step (bit for bit), so greedy output is
//! the same whatever else is batched.
//!
//! A lost device (`ErrorKind::DeviceLost`) ends every sequence of the step with a 503; the
//! thread then loads the model again on a new backend, or, if that fails, on the fallback
//! (`cpu`), and serves the next requests.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use purehw_core::model::{Model, SeqInput, StepOut, Want};
use purehw_core::sampling::{Sampler, SamplingParams};
use purehw_core::source::ModelSource;
use purehw_core::tokenizer::{Decoder, Tokenizer};
use purehw_hal::{Backend, ErrorKind};
use tokio::sync::mpsc::UnboundedSender;

use super::json_guard::{JsonGuard, Rules, TokenTexts};
use super::json_schema::Schema;
use super::metrics::Stats;
use crate::chat::common_prefix;

/// Per-request generation settings (already validated by the HTTP layer).
#[derive(Clone, Debug, Default)]
pub struct GenParams {
    pub sampling: SamplingParams,
    /// `None`: until a stop condition or the context is full.
    pub max_tokens: Option<usize>,
    /// Stop strings: generation ends before the first occurrence, which is never emitted.
    pub stop: Vec<String>,
    /// Token ids that end generation (EOS, end-of-turn), not emitted.
    pub stop_ids: Vec<u32>,
    /// `Some(k)`: report each token's logprob and the `k` most likely alternatives.
    pub logprobs: Option<usize>,
    /// Constrain the output to one JSON object.
    pub json: bool,
    /// `(token, bias)` added to the logits before sampling.
    pub logit_bias: Vec<(u32, f32)>,
    /// A forced tool call (`tool_choice` "required" or a named function): the reply is
    /// `{"name": N, "arguments": {…}}` with `N` one of these (at most 64). Empty: not forced.
    pub call: Vec<String>,
    /// The reply's JSON schema (root 0), or a forced call's argument schemas (root `i` for
    /// `call[i]`).
    pub schema: Option<Arc<Schema>>,
}

impl GenParams {
    /// What a JSON guard checks for these settings beyond syntax: the forced call's names and
    /// the schema.
    pub fn rules(&self) -> Rules {
        Rules { names: self.call.clone(), schema: self.schema.clone() }
    }
}

/// One generation request.
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    pub events: UnboundedSender<Event>,
    pub accepted: Instant,
}

/// A token's log-probability and the most likely alternatives at its position.
#[derive(Clone, Debug)]
pub struct TokenLogprob {
    pub token: String,
    /// The token's exact bytes: for a token holding part of a UTF-8 character, the real bytes
    /// (its `token` text then shows U+FFFD), so clients can rebuild the text from them.
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// `(token, bytes, logprob)`, most likely first.
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// Why a generation ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a job's receiver gets, in order: `Token`s, then one `Done` (or one `Error`).
#[derive(Debug)]
pub enum Event {
    /// New text (possibly empty: held back while it may start a stop string or a UTF-8
    /// sequence). `logprob` is set when requested and the event carries a generated token.
    Token { text: String, logprob: Option<TokenLogprob> },
    Done {
        finish: Finish,
        prompt_tokens: usize,
        /// Prompt tokens whose K/V were already in the slot or copied into it from another slot
        /// (not computed again).
        cached_tokens: usize,
        completion_tokens: usize,
    },
    Error {
        message: String,
        /// The device was lost: HTTP 503, and a retry will be served (on a new device or the
        /// fallback). Otherwise a 500.
        unavailable: bool,
    },
}

/// Why a job was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full (HTTP 429 with Retry-After).
    QueueFull,
    /// The engine is loading, stopping or has failed (HTTP 503).
    Unavailable,
}

/// Limits fixed at start.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// KV-cache slots: sequences decoded together.
    pub parallel: usize,
    /// Positions per slot.
    pub ctx: usize,
    /// Most prompt tokens one step takes from one sequence.
    pub prefill_chunk: usize,
    /// Jobs that may wait for a slot.
    pub queue: usize,
    /// Reuse what a slot's KV cache already holds: a job goes to the free slot sharing the
    /// longest prefix with its prompt, a longer prefix another slot holds is copied into it on
    /// the device, and only the rest is computed (off: `--no-prompt-cache`).
    pub prompt_cache: bool,
}

/// What the HTTP layer needs of a loaded model.
pub struct Loaded {
    pub tokenizer: Arc<Tokenizer>,
    /// The chat template source (GGUF, tokenizer_config.json or `--chat-template`).
    pub chat_template: Option<String>,
    /// Positions per sequence (the KV slot size).
    pub ctx: usize,
    pub vocab: usize,
    /// EOS and end-of-turn ids.
    pub stop_ids: Vec<u32>,
    /// Token texts for JSON-constrained decoding, built on first use.
    pub texts: OnceLock<Arc<TokenTexts>>,
}

impl Loaded {
    pub fn texts(&self) -> Arc<TokenTexts> {
        self.texts.get_or_init(|| Arc::new(TokenTexts::new(&self.tokenizer))).clone()
    }
}

/// What the engine's load function returns.
pub struct LoadedModel<B: Backend> {
    pub model: Model<B>,
    /// The weights file, open as long as the model lives: a backend may read its mapped pages in
    /// place (Vulkan on a device that shares the host's memory).
    pub source: ModelSource,
    pub tokenizer: Arc<Tokenizer>,
    pub stop_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

/// A handle to one engine thread; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<Job>,
    pub stats: Arc<Stats>,
    /// Set once the model is loaded.
    pub loaded: Arc<OnceLock<Arc<Loaded>>>,
    /// A load error, if loading failed.
    pub failed: Arc<OnceLock<String>>,
    stopping: Arc<AtomicBool>,
}

impl Engine {
    /// Start the thread; `load` runs on it and returns the model and tokenizer.
    pub fn start<B, F>(cfg: EngineConfig, load: F) -> Engine
    where
        B: Backend + 'static,
        F: FnMut() -> Result<LoadedModel<B>, String> + Send + 'static,
    {
        Engine::start_with_fallback(cfg, load, None::<F>)
    }

    /// As [`start`](Engine::start); `load` runs again after a lost device, and where that fails,
    /// `fallback` (another backend) takes over.
    pub fn start_with_fallback<B, C, F, G>(cfg: EngineConfig, mut load: F, fallback: Option<G>) -> Engine
    where
        B: Backend + 'static,
        C: Backend + 'static,
        F: FnMut() -> Result<LoadedModel<B>, String> + Send + 'static,
        G: FnMut() -> Result<LoadedModel<C>, String> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue.max(1));
        let e = Engine {
            tx,
            stats: Arc::new(Stats::default()),
            loaded: Arc::new(OnceLock::new()),
            failed: Arc::new(OnceLock::new()),
            stopping: Arc::new(AtomicBool::new(false)),
        };
        let h = e.clone();
        let spawned = std::thread::Builder::new().name("purehw-engine".into()).spawn(move || {
            let LoadedModel { model, source, tokenizer, stop_ids, chat_template } = match load() {
                Ok(m) => m,
                Err(msg) => {
                    tracing::error!("loading failed: {msg}");
                    let _ = h.failed.set(msg);
                    return;
                }
            };
            let loaded = Arc::new(Loaded {
                tokenizer,
                chat_template,
                // The loader resolved `--ctx-size` (0: the model's own) into the options.
                ctx: model.options().ctx,
                vocab: model.config().vocab,
                stop_ids,
                texts: OnceLock::new(),
            });
            let _ = h.loaded.set(loaded.clone());
            let mut waiting = VecDeque::new();
            let Err(why) = serve_on((model, source), &mut load, &loaded, &cfg, &rx, &h, &mut waiting) else { return };
            let why = match fallback {
                None => why,
                Some(mut fallback) => {
                    tracing::warn!("{why}; falling back to another backend");
                    match fallback() {
                        Ok(m) => {
                            tracing::warn!(backend = m.model.backend().name(), "serving on the fallback backend");
                            match serve_on((m.model, m.source), &mut fallback, &loaded, &cfg, &rx, &h, &mut waiting) {
                                Ok(()) => return,
                                Err(why) => why,
                            }
                        }
                        Err(e) => format!("{why}; the fallback failed too: {e}"),
                    }
                }
            };
            // No backend left: refuse what waits and whatever comes.
            tracing::error!("{why}");
            let _ = h.failed.set(why.clone());
            h.stopping.store(true, Relaxed);
            let message = format!("the engine has no backend: {why}");
            for job in waiting.drain(..).chain(rx.try_iter()) {
                let _ = job.events.send(Event::Error { message: message.clone(), unavailable: true });
            }
            h.stats.queue_depth.store(0, Relaxed);
        });
        if let Err(err) = spawned {
            let _ = e.failed.set(format!("could not start the engine thread: {err}"));
        }
        e
    }

    /// Queue a job. Fails at once when the queue is full or the engine is not serving.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if self.stopping.load(Relaxed) || self.loaded.get().is_none() {
            return Err(SubmitError::Unavailable);
        }
        self.stats.queue_depth.fetch_add(1, Relaxed);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.stats.queue_depth.fetch_sub(1, Relaxed);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull,
                    TrySendError::Disconnected(_) => SubmitError::Unavailable,
                })
            }
        }
    }

    /// Stop accepting jobs; running ones finish.
    pub fn stop_accepting(&self) {
        self.stopping.store(true, Relaxed);
    }

    /// Jobs waiting plus sequences running.
    pub fn busy(&self) -> usize {
        self.stats.queue_depth.load(Relaxed) + self.stats.active.load(Relaxed)
    }
}

/// Holds back text that may be the start of a stop string; cuts at the first stop string.
struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// Add `text`; returns what may be emitted now and whether a stop string was reached.
    fn feed(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(i) = self.stops.iter().filter(|s| !s.is_empty()).filter_map(|s| self.held.find(s.as_str())).min() {
            let out = self.held[..i].to_string();
            self.held.clear();
            return (out, true);
        }
        let cut = self.held.len() - partial_tail(&self.held, self.stops.iter().map(String::as_str));
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest tail of `s` that is a proper prefix of one of `needles` (the next piece
/// of text may complete it), cut at char boundaries.
pub(super) fn partial_tail<'a>(s: &str, needles: impl IntoIterator<Item = &'a str>) -> usize {
    let mut keep = 0;
    for n in needles {
        for (k, _) in n.char_indices().skip(1) {
            if k > keep && s.ends_with(&n[..k]) {
                keep = k;
            }
        }
    }
    keep
}

/// A sequence in a KV slot.
struct Seq<'t> {
    job: Job,
    slot: usize,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// Of those, the ones the slot held from an earlier sequence or had copied from another
    /// slot (not computed for this one).
    cached: usize,
    generated: Vec<u32>,
    /// The token to feed next (after the prompt).
    next: Option<u32>,
    sampler: Sampler,
    /// This step's token, drawn ahead by [`sample_rows`].
    picked: Option<u32>,
    decoder: Decoder<'t>,
    stops: StopMatcher,
    json: Option<(JsonGuard, Arc<TokenTexts>, Rules)>,
    /// Logits copy for constrained sampling.
    scratch: Vec<f32>,
    last_token: Option<Instant>,
    /// A stop string was reached: nothing after it is emitted.
    cut: bool,
    /// The client disconnected.
    gone: bool,
}

impl Seq<'_> {
    /// Tokens in the KV cache.
    fn pos(&self) -> usize {
        self.fed + self.generated.len().saturating_sub(usize::from(self.next.is_some()))
    }

    fn send(&self, e: Event) -> bool {
        self.job.events.send(e).is_ok()
    }
}

/// Why [`run`] returned.
enum Exit {
    /// The job channel closed: the server is stopping.
    Closed,
    /// The device was lost; every sequence of the step has had its 503.
    Lost(String),
}

/// Serve on `model`, loading it again (a new backend) each time the device is lost. `Ok` when
/// the server stops; `Err` when loading again failed.
fn serve_on<B: Backend>(
    // `_source`: held, never read (see `LoadedModel::source`).
    (mut model, mut _source): (Model<B>, ModelSource),
    load: &mut dyn FnMut() -> Result<LoadedModel<B>, String>,
    loaded: &Loaded,
    cfg: &EngineConfig,
    rx: &Receiver<Job>,
    h: &Engine,
    waiting: &mut VecDeque<Job>,
) -> Result<(), String> {
    loop {
        h.stats.set_backend(model.backend().name(), &model.backend().stats());
        // `run` takes the model: the lost device is gone before a new one is made.
        let why = match run(model, loaded, cfg, rx, h, waiting) {
            Exit::Closed => return Ok(()),
            Exit::Lost(why) => why,
        };
        h.stats.device_lost.fetch_add(1, Relaxed);
        tracing::warn!("{why}; loading the model again on a new device");
        // (The old source goes once the new model is loaded: the pages stay mapped throughout.)
        (model, _source) = match load() {
            Ok(m) if m.model.options().ctx == loaded.ctx && m.model.config().vocab == loaded.vocab => {
                (m.model, m.source)
            }
            Ok(_) => return Err(format!("{why}; the model loaded again differs in context or vocabulary")),
            Err(e) => return Err(format!("{why}; loading the model again failed: {e}")),
        };
        tracing::info!(backend = model.backend().name(), "serving again");
    }
}

/// What each slot's KV cache holds: the tokens at its positions `0..len`, in order, kept after
/// its sequence ends so the next one sharing a prefix computes only the rest. Every step's fed
/// tokens are appended once the step has run; a step that fails forgets them all.
struct Held {
    /// (slot, tokens) the tokens whose K/V are in the slot.
    tokens: Vec<Vec<u32>>,
    /// (slot) when the slot was last taken or freed, on a counter: ties go to the least recent.
    used: Vec<u64>,
    clock: u64,
}

impl Held {
    fn new(slots: usize) -> Held {
        Held { tokens: vec![Vec::new(); slots], used: vec![0; slots], clock: 0 }
    }

    /// Where a sequence for `prompt` goes ([`Place`]). The free slot with the longest common
    /// prefix (ties, and `reuse` off: the least recently used), taking up to all but the
    /// prompt's last token (its logits pick the first new token). With `copy` (the backend runs
    /// `Op::Copy`) a longer prefix is copied in from the slot holding it:
    /// * a busy slot holds more of the prompt than any free one: copied from it;
    /// * the free slot with the prefix would lose tokens past it (a conversation's history, when
    ///   a title or tag request shares only its start) while another free slot loses fewer:
    ///   that one is taken and the prefix copied into it, so the history stays for its next turn.
    #[cfg(test)]
    fn pick<T>(&self, slots: &[Option<T>], prompt: &[u32], reuse: bool, copy: bool) -> Place {
        self.pick_within(slots, prompt, reuse, copy, |_, n| n)
    }

    /// [`pick`](Self::pick) where a slot's cache may no longer hold all of its prefix:
    /// `fit(slot, n)` is the longest prefix up to `n` a sequence can go on from in that slot
    /// ([`Model::kv_resumable`]: a sliding-window layer's ring keeps only its latest positions).
    fn pick_within<T>(
        &self,
        slots: &[Option<T>],
        prompt: &[u32],
        reuse: bool,
        copy: bool,
        fit: impl Fn(usize, usize) -> usize,
    ) -> Place {
        let limit = prompt.len() - 1;
        let prefix = |i: usize| if reuse { common_prefix(&self.tokens[i], prompt) } else { 0 };
        // What a sequence can go on from in slot i (the prefix, short of the prompt's end).
        let usable = |i: usize| if reuse { fit(i, prefix(i).min(limit)) } else { 0 };
        let free = || (0..slots.len()).filter(|&i| slots[i].is_none());
        // (Between equally usable slots, the longer prefix first: all of it is usable where the
        // cache holds everything.)
        let (own, _, slot) = free()
            .map(|i| (usable(i), prefix(i), i))
            .max_by_key(|&(n, p, i)| (n, p, std::cmp::Reverse(self.used[i])))
            .expect("a free slot");
        let place = Place { slot, keep: own, copy: None };
        if !reuse || !copy {
            return place;
        }
        // A busy slot's computed positions count too.
        let (best, _, holder) =
            (0..slots.len()).map(|i| (usable(i), prefix(i), i)).max_by_key(|&(n, p, _)| (n, p)).expect("a slot");
        if best > place.keep {
            return Place { copy: Some((holder, best)), ..place };
        }
        let loss = |i: usize| self.tokens[i].len() - prefix(i);
        if place.keep == 0 || loss(slot) == 0 {
            return place;
        }
        let other = free()
            .filter(|&i| i != slot && loss(i) < loss(slot))
            .min_by_key(|&i| (loss(i), std::cmp::Reverse(prefix(i)), self.used[i]));
        match other {
            Some(t) => {
                let keep = usable(t);
                Place { slot: t, keep, copy: (keep < place.keep).then_some((slot, place.keep)) }
            }
            None => place,
        }
    }

    /// A sequence takes `slot`, keeping its first `keep` tokens.
    fn take(&mut self, slot: usize, keep: usize) {
        self.tokens[slot].truncate(keep);
        self.touch(slot);
    }

    /// The sequence in `slot` is gone; what it computed stays.
    fn free(&mut self, slot: usize) {
        self.touch(slot);
    }

    fn touch(&mut self, slot: usize) {
        self.clock += 1;
        self.used[slot] = self.clock;
    }

    fn forget_all(&mut self) {
        self.tokens.iter_mut().for_each(Vec::clear);
    }
}

/// Where a new sequence goes: its slot, the tokens of the slot's own it keeps (positions
/// `0..keep`), and a prefix to copy in from another slot (`(from, end)`: positions `keep..end`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Place {
    slot: usize,
    keep: usize,
    copy: Option<(usize, usize)>,
}

/// What a step asks of a row: nothing before the prompt's last chunk; the device's argmax where
/// that is what sampling would pick (plain greedy, no logprobs, no JSON guard); else the logits.
fn want_of(seq: &Seq<'_>, sample_now: bool) -> Want {
    if !sample_now {
        Want::Nothing
    } else if seq.json.is_none() && seq.job.params.logprobs.is_none() && seq.sampler.is_plain_greedy() {
        Want::Argmax
    } else {
        Want::Logits
    }
}

fn run<B: Backend>(
    mut model: Model<B>,
    loaded: &Loaded,
    cfg: &EngineConfig,
    rx: &Receiver<Job>,
    h: &Engine,
    waiting: &mut VecDeque<Job>,
) -> Exit {
    let tok: &Tokenizer = &loaded.tokenizer;
    let ctx = loaded.ctx;
    let vocab = loaded.vocab;
    let stats = &*h.stats;
    stats.kv_capacity.store(cfg.parallel * ctx, Relaxed);
    let mut slots: Vec<Option<Seq<'_>>> = (0..cfg.parallel).map(|_| None).collect();
    let mut inputs_meta: Vec<(usize, bool)> = Vec::with_capacity(cfg.parallel);
    let mut wants: Vec<Want> = Vec::with_capacity(cfg.parallel);
    let mut feed: Vec<Vec<u32>> = (0..cfg.parallel).map(|_| Vec::new()).collect();
    // A new model (after a lost device) starts with empty caches.
    let mut held = Held::new(cfg.parallel);
    let can_copy = model.can_copy_kv();
    loop {
        // Clients that went away free their slot now (what it computed stays reusable).
        for (slot, s) in slots.iter_mut().enumerate() {
            if s.as_ref().is_some_and(|q| q.job.events.is_closed()) {
                *s = None;
                held.free(slot);
                stats.cancelled.fetch_add(1, Relaxed);
            }
        }
        let free = slots.iter().filter(|s| s.is_none()).count();
        let idle = free == slots.len();
        // Take jobs from the channel only while a slot is free (the channel is the queue).
        while waiting.len() < free {
            let job = if idle && waiting.is_empty() {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(j) => j,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return Exit::Closed,
                }
            } else {
                match rx.try_recv() {
                    Ok(j) => j,
                    Err(_) => break,
                }
            };
            stats.queue_depth.fetch_sub(1, Relaxed);
            if !job.events.is_closed() {
                waiting.push_back(job);
            }
        }
        while slots.iter().any(Option::is_none) {
            let Some(job) = waiting.pop_front() else { break };
            if job.prompt.is_empty() || job.prompt.len() >= ctx {
                let _ = job.events.send(Event::Error {
                    message: format!("the prompt has {} tokens; this model's context is {ctx}", job.prompt.len()),
                    unavailable: false,
                });
                continue;
            }
            // The guard closes the object within the tokens this reply may have.
            let budget = job.params.max_tokens.unwrap_or(usize::MAX).min(ctx - job.prompt.len());
            let guard = if !job.params.call.is_empty() {
                Some(JsonGuard::for_call(job.params.call.len(), budget))
            } else {
                job.params.json.then(|| JsonGuard::with_budget(budget))
            };
            // (A forced call takes its arguments' schema when its name is written.)
            let json = guard.map(|g| {
                let rules = job.params.rules();
                (g.with_schema(&rules), loaded.texts(), rules)
            });
            let sampler = Sampler::new(job.params.sampling, vocab).with_logit_bias(job.params.logit_bias.clone());
            let stops = StopMatcher { stops: job.params.stop.clone(), held: String::new() };
            // The slot keeps the longest prefix it shares with the prompt, a longer one another
            // slot holds is copied in; the rest is computed.
            // (A sliding-window layer's ring may have lost positions of a slot's prefix.)
            let fit = |slot: usize, n: usize| model.kv_resumable(slot, n);
            let place = held.pick_within(&slots, &job.prompt, cfg.prompt_cache, can_copy, fit);
            let slot = place.slot;
            held.take(slot, place.keep);
            let mut cached = place.keep;
            if let Some((from, end)) = place.copy {
                match model.copy_kv(from, slot, place.keep..end) {
                    Ok(()) => {
                        held.tokens[slot].extend_from_slice(&job.prompt[place.keep..end]);
                        stats.prompt_tokens_copied.fetch_add((end - place.keep) as u64, Relaxed);
                        cached = end;
                    }
                    // Positions past `keep` are computed again, whatever the copy left there (a
                    // lost device shows at the next step).
                    Err(e) => tracing::warn!("copying a cached prefix from slot {from} failed, computing it: {e}"),
                }
            }
            stats.prompt_tokens.fetch_add(job.prompt.len() as u64, Relaxed);
            stats.prompt_tokens_cached.fetch_add(cached as u64, Relaxed);
            stats.prompt_tokens_computed.fetch_add((job.prompt.len() - cached) as u64, Relaxed);
            slots[slot] = Some(Seq {
                job,
                slot,
                fed: cached,
                cached,
                generated: Vec::new(),
                next: None,
                sampler,
                picked: None,
                decoder: tok.decode_stream(),
                stops,
                json,
                scratch: Vec::new(),
                last_token: None,
                cut: false,
                gone: false,
            });
        }
        let active = slots.iter().filter(|s| s.is_some()).count();
        stats.active.store(active, Relaxed);
        stats.kv_used.store(slots.iter().flatten().map(|s| s.pos()).sum(), Relaxed);
        if active == 0 {
            continue;
        }

        // One plain greedy sequence alone, past its prompt: a run of steps through
        // `Model::decode_greedy` (on a GPU a step ahead, the device feeding each token on),
        // until it ends, its client goes away or a job arrives to be batched with it.
        if active == 1 && waiting.is_empty() && stats.queue_depth.load(Relaxed) == 0 {
            let slot = slots.iter().position(Option::is_some).expect("one active slot");
            let seq = slots[slot].as_mut().expect("active slot");
            if let (Some(first), Want::Argmax) = (seq.next, want_of(seq, true)) {
                let pos = seq.pos();
                let (mut fed, mut fin) = (first, None);
                let mut last = Instant::now();
                let tokens = &mut held.tokens[slot];
                let r = model.decode_greedy(slot, pos, first, ctx - pos, |t| {
                    // As a step of the loop below: the fed token is held, the new one sampled.
                    tokens.push(fed);
                    seq.next = None;
                    seq.picked = Some(t);
                    fin = step_token(seq, None, loaded, ctx, stats);
                    fed = t;
                    stats.observe_step(&purehw_hal::Stats::default(), 1, last.elapsed());
                    last = Instant::now();
                    fin.is_none() && !seq.job.events.is_closed() && stats.queue_depth.load(Relaxed) == 0
                });
                if let Err(e) = r {
                    match fail_step(e, &mut slots, &mut held, stats) {
                        Some(exit) => return exit,
                        None => continue,
                    }
                }
                if let Some(fin) = fin {
                    let s = slots[slot].take().expect("active slot");
                    held.free(slot);
                    finish(s, fin, stats);
                }
                stats.observe_device(&model.backend().stats());
                continue;
            }
        }

        // One step: every generating sequence decodes its next token; sequences still reading
        // their prompt share a budget of `prefill_chunk` prompt tokens, in slot order.
        inputs_meta.clear();
        let mut budget = cfg.prefill_chunk.max(1);
        for s in slots.iter().flatten() {
            let f = &mut feed[s.slot];
            f.clear();
            if let Some(t) = s.next {
                f.push(t);
                inputs_meta.push((s.slot, true));
            } else if budget > 0 {
                let end = (s.fed + budget).min(s.job.prompt.len());
                budget -= end - s.fed;
                f.extend_from_slice(&s.job.prompt[s.fed..end]);
                inputs_meta.push((s.slot, end == s.job.prompt.len()));
            }
        }
        let inputs: Vec<SeqInput<'_>> = inputs_meta
            .iter()
            .map(|&(slot, _)| {
                let s = slots[slot].as_ref().expect("active slot");
                debug_assert_eq!(held.tokens[slot].len(), s.pos(), "slot {slot}: what it holds is where it goes on");
                SeqInput { slot, pos: s.pos(), tokens: &feed[slot] }
            })
            .collect();
        wants.clear();
        wants.extend(inputs_meta.iter().map(|&(slot, now)| want_of(slots[slot].as_ref().expect("active slot"), now)));
        let started = Instant::now();
        let out = match model.forward_select(&inputs, &wants) {
            Ok(out) => out,
            Err(e) => match fail_step(e, &mut slots, &mut held, stats) {
                Some(exit) => return exit,
                None => continue,
            },
        };
        let wall = started.elapsed();
        for &(slot, _) in &inputs_meta {
            held.tokens[slot].extend_from_slice(&feed[slot]);
        }
        sample_rows(&mut slots, &inputs_meta, &out);
        for (row, &(slot, sample_now)) in inputs_meta.iter().enumerate() {
            let seq = slots[slot].as_mut().expect("active slot");
            let n = feed[slot].len();
            if seq.next.take().is_none() {
                seq.fed += n;
            }
            if !sample_now {
                continue;
            }
            if let Some(fin) = step_token(seq, out.logits(row), loaded, ctx, stats) {
                let s = slots[slot].take().expect("active slot");
                held.free(slot);
                finish(s, fin, stats);
            }
        }
        stats.observe_step(&model.backend().stats(), inputs_meta.len(), wall);
    }
}

/// A backend failure ends every running sequence with an error. A lost device is a 503 (a
/// retry will be served) and ends this run (`Some`), so the model is loaded again; after any
/// other failure the engine goes on (`None`).
fn fail_step(e: purehw_core::Error, slots: &mut [Option<Seq<'_>>], held: &mut Held, stats: &Stats) -> Option<Exit> {
    let lost = matches!(e, purehw_core::Error::Backend { kind: ErrorKind::DeviceLost, .. });
    let msg = format!("inference failed: {e}");
    tracing::error!("{msg}");
    for s in slots.iter_mut() {
        if let Some(q) = s.take() {
            q.send(Event::Error { message: msg.clone(), unavailable: lost });
        }
    }
    // The failed step may have written part of its rows: trust no slot's cache.
    held.forget_all();
    stats.active.store(0, Relaxed);
    stats.kv_used.store(0, Relaxed);
    lost.then_some(Exit::Lost(msg))
}

/// A sampler with the logits and history it draws from, and where its token goes.
type Draw<'a> = (&'a mut Sampler, &'a [u32], &'a [f32], &'a mut Option<u32>);

/// Pick the next token of every row that samples this step (JSON-constrained rows excepted: their
/// guard samples): the device's argmax where the row asked for it, else a draw from its logits,
/// up to one thread per row and per CPU: each draw passes over the whole vocabulary (262k
/// entries for Gemma 3), most of a step's host time.
fn sample_rows(slots: &mut [Option<Seq<'_>>], meta: &[(usize, bool)], out: &StepOut<'_>) {
    let mut row_of = vec![None; slots.len()];
    for (row, &(slot, now)) in meta.iter().enumerate() {
        if now {
            row_of[slot] = Some(row);
        }
    }
    let mut work: Vec<Mutex<Draw<'_>>> = Vec::with_capacity(meta.len());
    for (s, row) in slots.iter_mut().zip(row_of) {
        let (Some(s), Some(row)) = (s.as_mut(), row) else { continue };
        if s.json.is_some() {
            continue;
        }
        if let Some(id) = out.argmax(row) {
            s.picked = Some(id);
        } else if let Some(logits) = out.logits(row) {
            let Seq { sampler, generated, picked, .. } = s;
            work.push(Mutex::new((sampler, generated, logits, picked)));
        }
    }
    // Each thread takes the next undrawn row until none is left.
    let next = AtomicUsize::new(0);
    let draw = || {
        while let Some(w) = work.get(next.fetch_add(1, Relaxed)) {
            let mut g = w.lock().unwrap_or_else(|e| e.into_inner());
            let (s, history, l, out) = &mut *g;
            **out = Some(s.sample(l, history));
        }
    };
    static CPUS: OnceLock<usize> = OnceLock::new();
    let cpus = *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let helpers = work.len().min(cpus).saturating_sub(1);
    if helpers == 0 {
        return draw();
    }
    std::thread::scope(|sc| {
        for _ in 0..helpers {
            // A helper that cannot start (resource limits) leaves its rows to the others.
            let _ = std::thread::Builder::new().spawn_scoped(sc, draw);
        }
        draw();
    });
}

/// Take the token [`sample_rows`] picked for `seq` (or sample it from `logits`) and stream it;
/// `Some` when generation ends. `logits` is there whenever the row needs it ([`want_of`]).
fn step_token(seq: &mut Seq<'_>, logits: Option<&[f32]>, loaded: &Loaded, ctx: usize, stats: &Stats) -> Option<Finish> {
    let p = &seq.job.params;
    let id = match (&mut seq.json, seq.picked.take(), logits) {
        (None, Some(id), _) => id,
        (None, None, Some(logits)) => seq.sampler.sample(logits, &seq.generated),
        (None, None, None) => unreachable!("a row that samples has logits or its argmax (want_of)"),
        (Some(_), _, None) => unreachable!("a JSON-guarded row has its logits (want_of)"),
        (Some((guard, texts, rules)), _, Some(logits)) => {
            seq.scratch.clear();
            seq.scratch.extend_from_slice(logits);
            let (sampler, generated) = (&mut seq.sampler, &seq.generated);
            // `pick` advances the guard by the token's text itself.
            super::json_guard::pick(guard, texts, rules, &mut seq.scratch, |l| sampler.sample(l, generated))
        }
    };
    let now = Instant::now();
    match seq.last_token {
        None => stats.ttft.observe(now - seq.job.accepted),
        Some(t) => stats.itl.observe(now - t),
    }
    seq.last_token = Some(now);
    let json_done = seq.json.as_ref().is_some_and(|(g, _, _)| g.is_complete());
    if p.stop_ids.contains(&id) && seq.json.is_none() {
        return Some(Finish::Stop);
    }
    seq.generated.push(id);
    stats.completion_tokens.fetch_add(1, Relaxed);
    let logprob = p.logprobs.zip(logits).map(|(k, logits)| logprob_of(logits, id, k, loaded));
    let piece = seq.decoder.push(id).unwrap_or_default();
    let (text, stopped) = seq.stops.feed(&piece);
    if !seq.send(Event::Token { text, logprob }) {
        // The client went away: nothing more to send.
        seq.gone = true;
        return Some(Finish::Stop);
    }
    if stopped {
        seq.cut = true;
        return Some(Finish::Stop);
    }
    if json_done {
        return Some(Finish::Stop);
    }
    if p.max_tokens.is_some_and(|m| seq.generated.len() >= m) || seq.fed + seq.generated.len() >= ctx {
        return Some(Finish::Length);
    }
    seq.next = Some(id);
    None
}

/// Flush held text and report the end.
fn finish(mut seq: Seq<'_>, fin: Finish, stats: &Stats) {
    if seq.gone {
        stats.cancelled.fetch_add(1, Relaxed);
        return;
    }
    if !seq.cut {
        let tail = seq.decoder.finish().unwrap_or_default();
        let (mut text, stopped) = seq.stops.feed(&tail);
        if !stopped {
            text.push_str(&seq.stops.flush());
        }
        if !text.is_empty() {
            seq.send(Event::Token { text, logprob: None });
        }
    }
    stats.finished.fetch_add(1, Relaxed);
    stats.e2e.observe(seq.job.accepted.elapsed());
    seq.send(Event::Done {
        finish: fin,
        prompt_tokens: seq.job.prompt.len(),
        cached_tokens: seq.cached,
        completion_tokens: seq.generated.len(),
    });
}

/// Log-softmax of the raw logits at `id`, and the `k` most likely tokens.
fn logprob_of(logits: &[f32], id: u32, k: usize, loaded: &Loaded) -> TokenLogprob {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let lse = max + logits.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    let text = |i: u32| {
        let s = loaded.tokenizer.decode(&[i]).unwrap_or_default();
        // Part of a character decodes to U+FFFD; its real bytes come from the token texts.
        if s.contains('\u{FFFD}')
            && let Some(b) = loaded.texts().get(i)
        {
            return (String::from_utf8_lossy(b).into_owned(), b.to_vec());
        }
        let b = s.as_bytes().to_vec();
        (s, b)
    };
    let mut top: Vec<(String, Vec<u8>, f32)> = Vec::new();
    if k > 0 {
        let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
        for (i, &x) in logits.iter().enumerate() {
            if best.len() < k || x > best[best.len() - 1].0 {
                let at = best.partition_point(|b| b.0 >= x);
                best.insert(at, (x, i as u32));
                best.truncate(k);
            }
        }
        top = best
            .into_iter()
            .map(|(x, i)| {
                let (t, b) = text(i);
                (t, b, x - lse)
            })
            .collect();
    }
    let (token, bytes) = text(id);
    TokenLogprob { token, bytes, logprob: logits.get(id as usize).map_or(f32::NEG_INFINITY, |&x| x - lse), top }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher { stops: stops.iter().map(|s| s.to_string()).collect(), held: String::new() };
        let mut out = String::new();
        for p in pieces {
            let (t, stop) = m.feed(p);
            out.push_str(&t);
            if stop {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_strings_are_never_emitted_even_across_pieces() {
        assert_eq!(run(&["END"], &["ab", "cE", "N", "Dxyz"]), ("abc".into(), true));
        assert_eq!(run(&["END"], &["ab", "cE", "N", "x"]), ("abcENx".into(), false));
        assert_eq!(run(&["\n\n", "###"], &["hi\n", "\nthere"]), ("hi".into(), true));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
    }
}

/// The engine over a real model (SmolLM2 on the `cpu` backend), through a wrapper backend that
/// counts what a step reads back and loses its "device" at a chosen step.
#[cfg(test)]
mod engine_tests {
    use std::fmt;
    use std::path::PathBuf;
    use std::sync::atomic::AtomicUsize;

    use purehw_core::model::ModelOptions;
    use purehw_hal::{ActQuant, ErrorType, HostWeight, Op, OpKind, Step, View};
    use purehw_hal_cpu::Cpu;
    use tokio::sync::mpsc::unbounded_channel;

    use super::*;

    /// `B`, counting the floats read back, whose device is lost at step `lose_at` (and stays lost).
    struct Probe<B> {
        inner: B,
        steps: usize,
        lose_at: Option<usize>,
        read: Arc<AtomicUsize>,
    }

    #[derive(Debug)]
    enum ProbeError<E> {
        Lost,
        Inner(E),
    }

    impl<E: fmt::Display> fmt::Display for ProbeError<E> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                ProbeError::Lost => f.write_str("the device was lost"),
                ProbeError::Inner(e) => e.fmt(f),
            }
        }
    }

    impl<E: purehw_hal::Error> purehw_hal::Error for ProbeError<E> {
        fn kind(&self) -> ErrorKind {
            match self {
                ProbeError::Lost => ErrorKind::DeviceLost,
                ProbeError::Inner(e) => e.kind(),
            }
        }
    }

    impl<B: Backend> ErrorType for Probe<B> {
        type Error = ProbeError<B::Error>;
    }

    impl<B: Backend> Backend for Probe<B> {
        type Buffer = B::Buffer;
        type Weight = B::Weight;

        fn name(&self) -> &str {
            "probe"
        }
        fn supports(&self, op: OpKind) -> bool {
            self.inner.supports(op)
        }
        fn alloc(&mut self, len: usize) -> Result<Self::Buffer, Self::Error> {
            self.inner.alloc(len).map_err(ProbeError::Inner)
        }
        fn load_weight(&mut self, w: &HostWeight) -> Result<Self::Weight, Self::Error> {
            self.inner.load_weight(w).map_err(ProbeError::Inner)
        }
        fn write(&mut self, dst: View<Self::Buffer>, src: &[f32]) -> Result<(), Self::Error> {
            self.inner.write(dst, src).map_err(ProbeError::Inner)
        }
        fn read(&mut self, src: View<Self::Buffer>, dst: &mut [f32]) -> Result<(), Self::Error> {
            self.read.fetch_add(dst.len(), Relaxed);
            self.inner.read(src, dst).map_err(ProbeError::Inner)
        }
        fn submit(&mut self, step: &Step<'_>, ops: &[Op<Self::Buffer, Self::Weight>]) -> Result<(), Self::Error> {
            self.steps += 1;
            if self.lose_at.is_some_and(|n| self.steps >= n) {
                return Err(ProbeError::Lost);
            }
            self.inner.submit(step, ops).map_err(ProbeError::Inner)
        }
    }

    const CFG: EngineConfig = EngineConfig { parallel: 2, ctx: 64, prefill_chunk: 16, queue: 4, prompt_cache: true };

    fn smol() -> PathBuf {
        purehw_conformance::model_file("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf")
    }

    /// What `purehw serve` loads, on `backend`, sized by [`CFG`].
    fn load_on<B: Backend>(backend: B) -> Result<LoadedModel<B>, String> {
        let path = smol();
        let source = ModelSource::open(&path).map_err(|e| e.to_string())?;
        let tok = Tokenizer::from_gguf("smollm2", source.gguf().expect("a GGUF")).map_err(|e| e.to_string())?;
        let opts = ModelOptions {
            ctx: CFG.ctx,
            slots: CFG.parallel,
            max_batch: CFG.prefill_chunk + CFG.parallel,
            logit_rows: CFG.parallel,
            act: ActQuant::Int8,
            ..ModelOptions::default()
        };
        let model = Model::load(backend, &source, opts).map_err(|e| e.to_string())?;
        let stop_ids = tok.eos_ids().to_vec();
        Ok(LoadedModel { model, source, tokenizer: Arc::new(tok), stop_ids, chat_template: None })
    }

    fn probe(lose_at: Option<usize>, read: &Arc<AtomicUsize>) -> Probe<Cpu> {
        Probe { inner: Cpu::new(1).expect("cpu backend"), steps: 0, lose_at, read: read.clone() }
    }

    fn wait_loaded(e: &Engine) -> Arc<Loaded> {
        let t = Instant::now();
        loop {
            if let Some(l) = e.loaded.get() {
                return l.clone();
            }
            assert!(e.failed.get().is_none(), "{:?}", e.failed.get());
            assert!(t.elapsed() < Duration::from_secs(60), "not loaded after 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What a job ends with: its text, and `Ok(completion tokens)` or `Err((message, unavailable))`.
    type Outcome = (String, Result<usize, (String, bool)>);

    fn submit(e: &Engine, prompt: &[u32], params: GenParams) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = unbounded_channel();
        e.submit(Job { prompt: prompt.to_vec(), params, events: tx, accepted: Instant::now() }).expect("submitted");
        rx
    }

    fn outcome(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> Outcome {
        let mut text = String::new();
        loop {
            match rx.blocking_recv() {
                Some(Event::Token { text: t, .. }) => text.push_str(&t),
                Some(Event::Done { completion_tokens, .. }) => return (text, Ok(completion_tokens)),
                Some(Event::Error { message, unavailable }) => return (text, Err((message, unavailable))),
                None => return (text, Err(("the engine dropped the job".into(), false))),
            }
        }
    }

    fn greedy(max_tokens: usize) -> GenParams {
        GenParams { max_tokens: Some(max_tokens), ..GenParams::default() }
    }

    fn prompt(l: &Loaded) -> Vec<u32> {
        l.tokenizer.encode("One, two, three,", true).expect("encoding")
    }

    /// Plain greedy rows read back only the device's argmax; rows that want logprobs read the
    /// logits; both pick the same tokens, alone or batched together.
    #[test]
    fn greedy_rows_read_only_the_argmax_and_pick_what_the_logits_pick() {
        let read = Arc::new(AtomicUsize::new(0));
        let r = read.clone();
        let e = Engine::start(CFG, move || load_on(probe(None, &r)));
        let l = wait_loaded(&e);
        let p = prompt(&l);
        let (argmax_text, done) = outcome(submit(&e, &p, greedy(6)));
        assert_eq!(done, Ok(6));
        let argmax_read = read.swap(0, Relaxed);
        assert!(argmax_read < l.vocab, "a greedy job read {argmax_read} floats (vocab {})", l.vocab);
        let with_logprobs = GenParams { logprobs: Some(0), ..greedy(6) };
        let (logits_text, done) = outcome(submit(&e, &p, with_logprobs.clone()));
        assert_eq!(done, Ok(6));
        assert!(read.load(Relaxed) >= 6 * l.vocab, "a logprobs job read {} floats", read.load(Relaxed));
        assert_eq!(argmax_text, logits_text);
        assert!(!argmax_text.is_empty());
        // Batched together.
        let (a, b) = (submit(&e, &p, greedy(6)), submit(&e, &p, with_logprobs));
        assert_eq!(outcome(a).0, argmax_text);
        assert_eq!(outcome(b).0, argmax_text);
    }

    /// What a job streamed: its text, each generated token's logprob and alternatives (as bits:
    /// compared exactly), and how many prompt tokens came from the cache.
    fn traced(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> (String, Vec<(u32, Vec<u32>)>, usize) {
        let (mut text, mut lps) = (String::new(), Vec::new());
        loop {
            match rx.blocking_recv() {
                Some(Event::Token { text: t, logprob }) => {
                    text.push_str(&t);
                    if let Some(l) = logprob {
                        lps.push((l.logprob.to_bits(), l.top.iter().map(|t| t.2.to_bits()).collect()));
                    }
                }
                Some(Event::Done { cached_tokens, .. }) => return (text, lps, cached_tokens),
                other => panic!("the job ended with {other:?}"),
            }
        }
    }

    /// Prompt caching: a prompt that extends what a slot holds computes only the rest, and every
    /// position computed from the cache has the logits of a fresh prefill, bit for bit (compared
    /// through each token's logprob and its 5 alternatives), alone, in a batch, in chunks, and
    /// after a sequence was cancelled mid-reply.
    #[test]
    fn a_cached_prefix_gives_the_logits_of_a_fresh_prefill() {
        let cpu = || load_on(Cpu::new(1).map_err(|e| e.to_string())?);
        let on = Engine::start(CFG, cpu);
        let off = Engine::start(EngineConfig { prompt_cache: false, ..CFG }, cpu);
        let l = wait_loaded(&on);
        wait_loaded(&off);
        let enc = |s: &str| l.tokenizer.encode(s, true).expect("encoding");
        let params = GenParams { logprobs: Some(5), ..greedy(6) };
        // Longer than a prefill chunk (16), so the cached and computed parts each span chunks.
        let p1 = enc("One, two, three, four, five, six, seven, eight, nine, ten, eleven,");
        let p2 = enc("One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, thirteen,");
        let p3 = enc("One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, thirteen, fourteen,");
        let q1 = enc("Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday, Monday, Tuesday,");
        let q2 = enc("Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday, Monday, Tuesday, Wednesday,");
        assert!(p1.len() > CFG.prefill_chunk && p3.len() + 6 < CFG.ctx, "{} {}", p1.len(), p3.len());
        let expect = |p: &[u32]| {
            let (text, lps, cached) = traced(submit(&off, p, params.clone()));
            assert_eq!(cached, 0, "--no-prompt-cache took tokens from the cache");
            (text, lps)
        };
        // Two at once into the two empty slots.
        let (a, b) = (submit(&on, &p1, params.clone()), submit(&on, &q1, params.clone()));
        let ((ta, la, _), (tb, lb, _)) = (traced(a), traced(b));
        assert_eq!((ta, la), expect(&p1));
        assert_eq!((tb, lb), expect(&q1));
        let (text, lps, cached) = traced(submit(&on, &p2, params.clone()));
        assert!(cached + 1 >= p1.len(), "p2 reused {cached} of p1's {} tokens", p1.len());
        assert_eq!((text, lps), expect(&p2), "p2 from the cache differs from p2 computed");
        // Two at once, each extending what one slot holds.
        let (a, b) = (submit(&on, &p3, params.clone()), submit(&on, &q2, params.clone()));
        let ((ta, la, ca), (tb, lb, cb)) = (traced(a), traced(b));
        assert!(ca > p2.len() / 2 && cb > q1.len() / 2, "cached {ca} of p3, {cb} of q2");
        assert_eq!((ta, la), expect(&p3), "p3 (batched) from the cache differs");
        assert_eq!((tb, lb), expect(&q2), "q2 (batched) from the cache differs");
        // A reply cancelled after its first token: what its slot holds stays true.
        let mut rx = submit(&on, &p3, greedy(40));
        assert!(matches!(rx.blocking_recv(), Some(Event::Token { .. })));
        drop(rx);
        let t = Instant::now();
        while on.stats.active.load(Relaxed) > 0 {
            assert!(t.elapsed() < Duration::from_secs(30), "the cancelled sequence stays");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (text, lps, cached) = traced(submit(&on, &p3, params.clone()));
        assert!(cached > 0);
        assert_eq!((text, lps), expect(&p3), "p3 after a cancelled reply differs");
        let computed = on.stats.prompt_tokens_computed.load(Relaxed);
        let reused = on.stats.prompt_tokens_cached.load(Relaxed);
        assert_eq!(computed + reused, on.stats.prompt_tokens.load(Relaxed));
        assert!(reused > computed, "{reused} cached, {computed} computed");
    }

    /// The free slot sharing the longest prefix wins; ties go to the least recently used; never
    /// the whole prompt (its last token is computed for its logits); nothing when reuse is off.
    #[test]
    fn slots_are_picked_by_longest_prefix_then_least_recent() {
        let slots = [None::<()>; 3];
        let mut held = Held::new(3);
        held.tokens = vec![vec![1, 2, 3], vec![1, 2, 9], vec![7]];
        (held.used, held.clock) = (vec![5, 4, 6], 6);
        let at = |slot, keep| Place { slot, keep, copy: None };
        for copy in [false, true] {
            assert_eq!(held.pick(&slots, &[1, 2, 3, 4], true, copy), at(0, 3));
            assert_eq!(held.pick(&slots, &[1, 2, 3], true, copy), at(0, 2));
            // 0 and 1 share two tokens: 1 is older (and no other slot would lose fewer).
            assert_eq!(held.pick(&slots, &[1, 2, 5], true, copy), at(1, 2));
            assert_eq!(held.pick(&slots, &[8], true, copy), at(1, 0));
            assert_eq!(held.pick(&slots, &[1, 2, 3, 4], false, copy), at(1, 0));
        }
        held.take(1, 1);
        assert_eq!(held.tokens[1], [1]);
        assert!(held.used[1] > 6);
    }

    /// A longer prefix than any free slot's, held by a busy slot, is copied from it; a free slot
    /// whose history the prompt shares only the start of keeps it, the prefix copied into the
    /// free slot that loses fewest tokens; never with reuse off or without `Op::Copy`.
    #[test]
    fn a_prefix_in_another_slot_is_copied() {
        let mut held = Held::new(3);
        held.tokens = vec![vec![1, 2, 3, 4, 5], vec![1, 2, 9], vec![]];
        (held.used, held.clock) = (vec![5, 4, 6], 6);
        let slots = [Some(()), None, None];
        // Slot 0 (busy) holds 4 of the prompt, free slot 1 two: 2..4 copied into slot 1.
        assert_eq!(held.pick(&slots, &[1, 2, 3, 4, 8], true, true), Place { slot: 1, keep: 2, copy: Some((0, 4)) });
        // Never the prompt's last token.
        assert_eq!(held.pick(&slots, &[1, 2, 3, 4], true, true), Place { slot: 1, keep: 2, copy: Some((0, 3)) });
        assert_eq!(held.pick(&slots, &[1, 2, 3, 4, 8], true, false), Place { slot: 1, keep: 2, copy: None });
        assert_eq!(held.pick(&slots, &[1, 2, 3, 4, 8], false, true), Place { slot: 1, keep: 0, copy: None });
        // All free: slot 0 holds the longest prefix (2) but would lose 3 tokens; empty slot 2
        // loses none: the prefix goes there and slot 0 keeps its history.
        let free = [None::<()>; 3];
        assert_eq!(held.pick(&free, &[1, 2, 3, 7, 7], true, true), Place { slot: 2, keep: 0, copy: Some((0, 3)) });
        // A prompt extending slot 0's history takes slot 0 itself.
        assert_eq!(held.pick(&free, &[1, 2, 3, 4, 5, 6], true, true), Place { slot: 0, keep: 5, copy: None });
        // Slot 0 is older, but slot 1 shares as much and loses less: taken, nothing to copy.
        held.tokens[2] = vec![5; 9];
        held.used = vec![3, 4, 6];
        assert_eq!(held.pick(&free, &[1, 2, 7], true, true), Place { slot: 1, keep: 2, copy: None });
    }

    /// A slot whose sliding-window ring no longer holds the window before a prefix's end
    /// (`fit`, as `Model::kv_resumable` answers) serves only the part it still can: less kept in
    /// place, a shorter copy, or none, and the rest is computed; never a prefix it lost.
    #[test]
    fn a_prefix_the_ring_lost_is_not_reused() {
        let mut held = Held::new(3);
        held.tokens = vec![vec![1, 2, 3, 4, 5, 6], vec![1, 2, 3, 9], vec![]];
        (held.used, held.clock) = (vec![5, 4, 6], 6);
        let free = [None::<()>; 3];
        let prompt = [1, 2, 3, 4, 5, 6, 7];
        // Everything still held: slot 0 goes on from 6.
        let all = |_: usize, n: usize| n;
        assert_eq!(held.pick_within(&free, &prompt, true, true, all), Place { slot: 0, keep: 6, copy: None });
        // Slot 0's ring lost what position 6 sees (it went on past it, say): it can go on only
        // from 0. Slot 1's 3 are copied into it (slot 1 keeps its history, slot 0 loses none).
        let lost0 = |slot: usize, n: usize| if slot == 0 { 0 } else { n };
        let got = held.pick_within(&free, &prompt, true, true, lost0);
        assert_eq!(got, Place { slot: 0, keep: 0, copy: Some((1, 3)) });
        // Without Op::Copy: slot 1 goes on from its own 3.
        let got = held.pick_within(&free, &prompt, true, false, lost0);
        assert_eq!(got, Place { slot: 1, keep: 3, copy: None });
        // Slot 0 still holds the window before 4, not before 5 or 6: 4 are copied from it.
        let upto4 = |slot: usize, n: usize| if slot == 0 { n.min(4) } else { n.min(2) };
        assert_eq!(
            held.pick_within(&[Some(()), None, None], &prompt, true, true, upto4),
            Place { slot: 1, keep: 2, copy: Some((0, 4)) }
        );
        // Nothing usable anywhere: computed from scratch, in the slot whose history the prompt
        // extends (it loses nothing).
        let none = |_: usize, _: usize| 0;
        assert_eq!(held.pick_within(&free, &prompt, true, true, none), Place { slot: 0, keep: 0, copy: None });
    }

    /// A prompt sharing a long prefix with one still replying in the other slot: the prefix is
    /// copied on the device (counted as cached and as copied), and every generated token's
    /// logprobs equal those of the whole prompt computed, bit for bit; on cpu-ref and cpu.
    #[test]
    fn a_prefix_copied_from_a_busy_slot_gives_the_logits_of_a_fresh_prefill() {
        fn check<B: Backend + 'static>(make: fn() -> Result<B, String>) {
            let on = Engine::start(CFG, move || load_on(make()?));
            let off = Engine::start(EngineConfig { prompt_cache: false, ..CFG }, move || load_on(make()?));
            let l = wait_loaded(&on);
            wait_loaded(&off);
            let enc = |s: &str| l.tokenizer.encode(s, true).expect("encoding");
            let params = GenParams { logprobs: Some(5), ..greedy(4) };
            let long = "One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve,";
            let a = enc(&format!("{long} thirteen,"));
            let b = enc(&format!("{long} and then"));
            let shared = common_prefix(&a, &b);
            assert!(
                shared > CFG.prefill_chunk && a.len() + 30 < CFG.ctx && b.len() + 4 < CFG.ctx,
                "{shared} {}",
                a.len()
            );
            // `a` replies long; once its first token is out, its prompt is in its slot.
            let mut ra = submit(&on, &a, greedy(30));
            assert!(matches!(ra.blocking_recv(), Some(Event::Token { .. })));
            let (text, lps, cached) = traced(submit(&on, &b, params.clone()));
            assert_eq!(cached, shared, "b's prefix held by the busy slot");
            assert_eq!(on.stats.prompt_tokens_copied.load(Relaxed), shared as u64);
            let _ = outcome(ra);
            let (t_off, l_off, c_off) = traced(submit(&off, &b, params.clone()));
            assert_eq!(c_off, 0);
            assert_eq!((text, lps), (t_off, l_off), "b after the copy differs from b computed");
            assert_eq!(off.stats.prompt_tokens_copied.load(Relaxed), 0);
        }
        check(|| Ok(purehw_hal_cpu_ref::CpuRef::new()));
        check(|| Cpu::new(1).map_err(|e| e.to_string()));
    }

    /// A lost device: the job in flight ends with an `unavailable` error (503); the model is
    /// loaded again on a new device and the next job is served there.
    #[test]
    fn a_lost_device_is_made_again() {
        let read = Arc::new(AtomicUsize::new(0));
        let loads = Arc::new(AtomicUsize::new(0));
        let (r, n) = (read.clone(), loads.clone());
        let e = Engine::start(CFG, move || {
            n.fetch_add(1, Relaxed);
            load_on(probe(Some(3), &r))
        });
        let l = wait_loaded(&e);
        let p = prompt(&l);
        let (_, end) = outcome(submit(&e, &p, greedy(8)));
        let (msg, unavailable) = end.expect_err("the device was lost at step 3");
        assert!(unavailable && msg.contains("lost"), "{msg}");
        let (text, end) = outcome(submit(&e, &p, greedy(2)));
        assert_eq!(end, Ok(2), "{text}");
        assert_eq!(loads.load(Relaxed), 2);
        assert_eq!(e.stats.device_lost.load(Relaxed), 1);
        assert_eq!(e.stats.backend(), "probe");
    }

    /// A lost device that cannot be made again: the fallback backend serves the next jobs; with
    /// no fallback either, the engine refuses jobs (503) instead of hanging.
    #[test]
    fn a_lost_device_falls_back_then_fails_cleanly() {
        let read = Arc::new(AtomicUsize::new(0));
        let fresh = Arc::new(AtomicBool::new(true));
        type Fallback = fn() -> Result<LoadedModel<Cpu>, String>;
        let make = |fallback: Option<Fallback>| {
            let (r, first) = (read.clone(), fresh.clone());
            first.store(true, Relaxed);
            let load = move || {
                if first.swap(false, Relaxed) { load_on(probe(Some(2), &r)) } else { Err("no device any more".into()) }
            };
            Engine::start_with_fallback(CFG, load, fallback)
        };
        let e = make(Some(|| load_on(Cpu::new(1).map_err(|e| e.to_string())?)));
        let p = prompt(&wait_loaded(&e));
        let (_, end) = outcome(submit(&e, &p, greedy(8)));
        assert!(end.is_err_and(|(_, unavailable)| unavailable));
        let (text, end) = outcome(submit(&e, &p, greedy(3)));
        assert_eq!(end, Ok(3), "{text}");
        assert_eq!(e.stats.backend(), "cpu");
        assert!(e.failed.get().is_none());

        let e = make(Some(|| Err("no cpu either".into())));
        let p = prompt(&wait_loaded(&e));
        let (_, end) = outcome(submit(&e, &p, greedy(8)));
        assert!(end.is_err_and(|(_, unavailable)| unavailable));
        let t = Instant::now();
        while e.failed.get().is_none() {
            assert!(t.elapsed() < Duration::from_secs(60), "the engine did not give up");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(e.failed.get().is_some_and(|m| m.contains("no cpu either")), "{:?}", e.failed.get());
        let (tx, _rx) = unbounded_channel();
        let job = Job { prompt: p, params: greedy(1), events: tx, accepted: Instant::now() };
        assert_eq!(e.submit(job).err(), Some(SubmitError::Unavailable));
    }
}

//! The inference thread: continuous batching over KV-cache slots.
//!
//! One engine per served model. Requests arrive as [`Job`]s through a bounded channel (its bound
//! is the queue); the thread owns the model and loops:
//!
//! 1. drop sequences whose client went away (their event channel is closed);
//! 2. admit queued jobs into free slots;
//! 3. build one step: a decode row for every generating sequence plus one prefill chunk;
//! 4. run it (`Model::forward_batch`), then sample each sequence that has a new token.
//!
//! A sequence's tokens depend only on its own prompt, parameters and seed: every backend kernel
//! computes each row independently of the others in the step (bit for bit), so greedy output is
//! the same whatever else is batched.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use purehw_core::model::{Model, SeqInput};
use purehw_core::sampling::{Sampler, SamplingParams};
use purehw_core::tokenizer::{Decoder, Tokenizer};
use purehw_hal::Backend;
use tokio::sync::mpsc::UnboundedSender;

use super::json_guard::{JsonGuard, Rules, TokenTexts};
use super::json_schema::Schema;
use super::metrics::Stats;

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
    Token {
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error {
        message: String,
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
        F: FnOnce() -> Result<LoadedModel<B>, String> + Send + 'static,
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
        let spawned = std::thread::Builder::new().name("purehw-engine".into()).spawn(move || match load() {
            Ok(LoadedModel { model, tokenizer, stop_ids, chat_template }) => {
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
                run(model, &loaded, &cfg, &rx, &h);
            }
            Err(msg) => {
                tracing::error!("loading failed: {msg}");
                let _ = h.failed.set(msg);
            }
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

fn run<B: Backend>(mut model: Model<B>, loaded: &Loaded, cfg: &EngineConfig, rx: &Receiver<Job>, h: &Engine) {
    let tok: &Tokenizer = &loaded.tokenizer;
    let ctx = loaded.ctx;
    let vocab = loaded.vocab;
    let stats = &*h.stats;
    stats.kv_capacity.store(cfg.parallel * ctx, Relaxed);
    let mut slots: Vec<Option<Seq<'_>>> = (0..cfg.parallel).map(|_| None).collect();
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut inputs_meta: Vec<(usize, bool)> = Vec::with_capacity(cfg.parallel);
    let mut feed: Vec<Vec<u32>> = (0..cfg.parallel).map(|_| Vec::new()).collect();
    loop {
        // Clients that went away free their slot now.
        for s in slots.iter_mut() {
            if s.as_ref().is_some_and(|q| q.job.events.is_closed()) {
                *s = None;
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
                    Err(RecvTimeoutError::Disconnected) => return,
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
        for (slot, entry) in slots.iter_mut().enumerate() {
            if entry.is_some() {
                continue;
            }
            let Some(job) = waiting.pop_front() else { break };
            if job.prompt.is_empty() || job.prompt.len() >= ctx {
                let _ = job.events.send(Event::Error {
                    message: format!("the prompt has {} tokens; this model's context is {ctx}", job.prompt.len()),
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
            stats.prompt_tokens.fetch_add(job.prompt.len() as u64, Relaxed);
            *entry = Some(Seq {
                job,
                slot,
                fed: 0,
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
                SeqInput { slot, pos: s.pos(), tokens: &feed[slot] }
            })
            .collect();
        let logits = match model.forward_batch(&inputs) {
            Ok(l) => l,
            Err(e) => {
                // A backend failure ends every running sequence with an error; the engine goes on.
                let msg = format!("inference failed: {e}");
                tracing::error!("{msg}");
                for s in slots.iter_mut() {
                    if let Some(q) = s.take() {
                        q.send(Event::Error { message: msg.clone() });
                    }
                }
                continue;
            }
        };
        sample_rows(&mut slots, &inputs_meta, logits, vocab);
        for (row, &(slot, sample_now)) in inputs_meta.iter().enumerate() {
            let seq = slots[slot].as_mut().expect("active slot");
            let n = feed[slot].len();
            if seq.next.take().is_none() {
                seq.fed += n;
            }
            if !sample_now {
                continue;
            }
            let row_logits = &logits[row * vocab..(row + 1) * vocab];
            if let Some(fin) = step_token(seq, row_logits, loaded, ctx, stats) {
                let s = slots[slot].take().expect("active slot");
                finish(s, fin, stats);
            }
        }
    }
}

/// A sampler with the logits and history it draws from, and where its token goes.
type Draw<'a> = (&'a mut Sampler, &'a [u32], &'a [f32], &'a mut Option<u32>);

/// Draw the next token of every row that samples this step (JSON-constrained rows excepted: their
/// guard samples), up to one thread per row and per CPU: each draw passes over the whole
/// vocabulary (262k entries for Gemma 3), most of a step's host time.
fn sample_rows(slots: &mut [Option<Seq<'_>>], meta: &[(usize, bool)], logits: &[f32], vocab: usize) {
    let mut row_of = vec![None; slots.len()];
    for (row, &(slot, now)) in meta.iter().enumerate() {
        if now {
            row_of[slot] = Some(row);
        }
    }
    let mut work: Vec<Mutex<Draw<'_>>> = Vec::with_capacity(meta.len());
    for (s, row) in slots.iter_mut().zip(row_of) {
        let (Some(s), Some(row)) = (s.as_mut(), row) else { continue };
        if s.json.is_none() {
            let Seq { sampler, generated, picked, .. } = s;
            work.push(Mutex::new((sampler, generated, &logits[row * vocab..(row + 1) * vocab], picked)));
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

/// Sample the next token of `seq` from `logits` and stream it; `Some` when generation ends.
fn step_token(seq: &mut Seq<'_>, logits: &[f32], loaded: &Loaded, ctx: usize, stats: &Stats) -> Option<Finish> {
    let p = &seq.job.params;
    let id = match &mut seq.json {
        None => match seq.picked.take() {
            Some(id) => id,
            None => seq.sampler.sample(logits, &seq.generated),
        },
        Some((guard, texts, rules)) => {
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
    let logprob = p.logprobs.map(|k| logprob_of(logits, id, k, loaded));
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
    seq.send(Event::Done { finish: fin, prompt_tokens: seq.job.prompt.len(), completion_tokens: seq.generated.len() });
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

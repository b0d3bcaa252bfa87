//! Sampling: greedy, temperature, top-k, top-p, min-p, penalties, seeded RNG.
//!
//! [`Sampler::new`] allocates all scratch once (a copy of the logits, the candidate list and the
//! per-token counts, each `vocab` long); [`Sampler::sample`] is on the decode path and never
//! allocates.
//!
//! Order of operations, as in llama.cpp / HF:
//! penalties → greedy argmax if `temperature == 0` → temperature → top-k → softmax → top-p →
//! min-p → draw.

use alloc::vec;
use alloc::vec::Vec;
use core::cmp::Ordering;

use purehw_kernels::ops::{EXP_LO, exp};
use purehw_kernels::quant::{LANES, reduce_lanes};

/// How to pick the next token. [`Default`] is greedy with every filter and penalty off.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax, first index on ties).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p`; 1 = off.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely one's; 0 = off.
    pub min_p: f32,
    /// HF semantics over the tokens in `history`: a positive logit is divided by it, others
    /// multiplied; 1 = off.
    pub repetition_penalty: f32,
    /// OpenAI semantics: `logit -= presence_penalty` for each token seen in `history`.
    pub presence_penalty: f32,
    /// OpenAI semantics: `logit -= frequency_penalty * count` for each token seen in `history`.
    pub frequency_penalty: f32,
    /// RNG seed; the same seed, params and logits give the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Whether sampling is plain argmax.
    pub fn is_greedy(&self) -> bool {
        // NaN counts as greedy too.
        self.temperature.is_nan() || self.temperature <= 0.0
    }

    /// Checks that every value is in range; the message names the offending parameter.
    /// [`Sampler`] itself never panics on odd values, but callers taking user input should
    /// reject them with this.
    pub fn validate(&self) -> Result<(), &'static str> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err("temperature must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err("min_p must be in [0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err("repetition_penalty must be a finite number > 0");
        }
        if !self.presence_penalty.is_finite() {
            return Err("presence_penalty must be finite");
        }
        if !self.frequency_penalty.is_finite() {
            return Err("frequency_penalty must be finite");
        }
        Ok(())
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// xoshiro256** (Blackman & Vigna), seeded through splitmix64: tiny, fast, good enough for
/// sampling and identical on every target.
#[derive(Clone, Debug)]
struct Rng {
    s: [u64; 4],
}

impl Rng {
    fn new(seed: u64) -> Self {
        // splitmix64 spreads any seed (0 included) over a non-zero state.
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        };
        Rng { s: [next(), next(), next(), next()] }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A candidate token: `v` holds its logit, then its unnormalised probability.
#[derive(Copy, Clone, Debug)]
struct Cand {
    id: u32,
    v: f32,
}

/// Larger `v` first; on ties the smaller id first, so top-k = 1 agrees with greedy.
fn by_v_desc(a: &Cand, b: &Cand) -> Ordering {
    b.v.partial_cmp(&a.v).unwrap_or(Ordering::Equal).then(a.id.cmp(&b.id))
}

/// What the last draw knows about the chosen token's probability.
#[derive(Copy, Clone, Debug)]
enum Last {
    None,
    /// Greedy: computed lazily from the scratch logits (saves a pass over the vocabulary when
    /// nobody asks).
    Greedy {
        id: u32,
        n: usize,
    },
    /// Stochastic: log-probability under the distribution drawn from.
    Drawn(f32),
}

/// Picks tokens from logits. One per sequence; reuse it across steps.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Penalised copy of the logits, `(vocab)`.
    logits: Vec<f32>,
    cands: Vec<Cand>,
    /// Per-token occurrence counts, all zero between calls.
    counts: Vec<u32>,
    /// `(token, bias)` added to the logits before anything else (OpenAI's `logit_bias`).
    bias: Vec<(u32, f32)>,
    last: Last,
}

impl Sampler {
    /// A sampler for logits of `vocab` entries. Allocates all of its scratch here.
    pub fn new(params: SamplingParams, vocab: usize) -> Self {
        Sampler {
            params,
            rng: Rng::new(params.seed),
            logits: vec![0.0; vocab],
            cands: Vec::with_capacity(vocab),
            counts: vec![0; vocab],
            bias: Vec::new(),
            last: Last::None,
        }
    }

    /// Add `bias` to these tokens' logits before every draw (ids outside the vocabulary are
    /// ignored; a later entry for the same id adds to an earlier one).
    pub fn with_logit_bias(mut self, bias: Vec<(u32, f32)>) -> Self {
        self.bias = bias;
        self
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether [`sample`](Sampler::sample) is plain argmax of the logits (greedy, no penalties, no
    /// bias): then the device's argmax (`Model::forward_argmax`) picks the same token.
    pub fn is_plain_greedy(&self) -> bool {
        self.params.is_greedy() && !self.params.has_penalties() && self.bias.is_empty()
    }

    pub fn vocab(&self) -> usize {
        self.logits.len()
    }

    /// Restart the RNG from `seed` (for a new request reusing this sampler).
    pub fn reset(&mut self, seed: u64) {
        self.params.seed = seed;
        self.rng = Rng::new(seed);
        self.last = Last::None;
    }

    /// Natural log of the probability of the token the last [`sample`](Sampler::sample) call
    /// returned, under the distribution it was drawn from (after penalties, temperature and
    /// filters; for greedy, the softmax of the penalised logits). `None` before the first call.
    pub fn last_logprob(&self) -> Option<f32> {
        match self.last {
            Last::None => None,
            Last::Drawn(lp) => Some(lp),
            Last::Greedy { id, n } => {
                let l = &self.logits[..n];
                let max = l[id as usize];
                if max == f32::NEG_INFINITY {
                    return Some(-libm::logf(n as f32));
                }
                let mut sum = Lanes::default();
                for c in l.chunks(8) {
                    sum.add(c.iter().map(|&x| prob(x - max)));
                }
                Some(-libm::logf(sum.total()))
            }
        }
    }

    /// The next token. `logits` should be `vocab` long (extra entries are ignored); `history`
    /// is what the penalties look at (ids outside the vocabulary are ignored). Never allocates.
    /// NaN logits count as `-inf`; empty logits give token 0.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let n = logits.len().min(self.logits.len());
        if n == 0 {
            self.last = Last::None;
            return 0;
        }
        for (d, &s) in self.logits[..n].iter_mut().zip(&logits[..n]) {
            *d = sane(s);
        }
        for &(t, b) in &self.bias {
            if let Some(x) = self.logits[..n].get_mut(t as usize) {
                *x = sane(*x + b);
            }
        }
        if self.params.has_penalties() {
            self.apply_penalties(n, history);
        }
        let (argmax, max) = argmax(&self.logits[..n]);
        if self.params.is_greedy() || max == f32::NEG_INFINITY {
            self.last = Last::Greedy { id: argmax, n };
            return argmax;
        }
        self.draw(n, max)
    }

    /// Repetition penalty then presence/frequency (llama.cpp's order), each token once however
    /// often it occurs. Counting then zeroing in a second pass over `history` keeps `counts` all
    /// zero between calls without a list of touched ids.
    fn apply_penalties(&mut self, n: usize, history: &[u32]) {
        let SamplingParams { repetition_penalty: rep, presence_penalty: pres, frequency_penalty: freq, .. } =
            self.params;
        for &t in history {
            if let Some(c) = self.counts[..n].get_mut(t as usize) {
                *c = c.saturating_add(1);
            }
        }
        for &t in history {
            let t = t as usize;
            if t >= n || self.counts[t] == 0 {
                continue;
            }
            let c = core::mem::take(&mut self.counts[t]);
            let mut x = self.logits[t];
            if rep != 1.0 {
                x = if x > 0.0 { x / rep } else { x * rep };
            }
            x -= pres + freq * c as f32;
            self.logits[t] = if x.is_nan() { f32::NEG_INFINITY } else { x };
        }
    }

    fn draw(&mut self, n: usize, max: f32) -> u32 {
        let p = self.params;
        let t = p.temperature;
        let min_p = if p.min_p > 0.0 { p.min_p.min(1.0) } else { 0.0 };
        let l = &mut self.logits[..n];
        let cands = &mut self.cands;

        // Unnormalised probabilities `exp((l - max) / T)`: the most likely token gets exactly 1,
        // so min-p's threshold is simply `min_p`. Subtracting before dividing keeps a tiny T from
        // overflowing.
        let e = |x: f32| prob((x - max) / t);
        let total = if p.top_k > 0 && p.top_k < n {
            top_k(l, p.top_k, cands);
            let mut sum = 0.0f32;
            for c in cands.iter_mut() {
                c.v = e(c.v);
                sum += c.v;
            }
            sum
        } else {
            // Probabilities in place of the logits (nothing reads them after this draw).
            let mut sum = Lanes::default();
            for c in l.chunks_mut(8) {
                for v in c.iter_mut() {
                    *v = e(*v);
                }
                sum.add(c.iter().copied());
            }
            let total = sum.total();
            if p.top_p >= 1.0 && min_p == 0.0 {
                // Nothing filtered: draw straight from the vocabulary, in id order.
                let r = (self.rng.next_f64() * total as f64) as f32;
                let id = pick(l, r);
                self.last = Last::Drawn(libm::logf(l[id] / total));
                return id as u32;
            }
            // min-p and top-p each keep the tokens above some probability (a prefix of the sorted
            // order): list only those. min-p can be applied here as long as top-p still sees the
            // full softmax sum.
            let target = p.top_p.max(0.0) * total;
            let floor = if p.top_p < 1.0 { nucleus_floor(l, target) } else { 0.0 };
            collect(l, floor.max(min_p), cands);
            if p.top_p < 1.0 && !nucleus(cands, target) && floor > min_p {
                // Rounding left the listed tokens short of the target: list them all and redo.
                collect(l, min_p, cands);
                nucleus(cands, target);
            }
            total
        };
        if p.top_k > 0 && p.top_k < n && p.top_p < 1.0 {
            nucleus(cands, p.top_p.max(0.0) * total);
        }

        if min_p > 0.0 {
            cands.retain(|c| c.v >= min_p);
        }

        let kept: f32 = cands.iter().map(|c| c.v).sum();
        let r = (self.rng.next_f64() * kept as f64) as f32;
        let mut cum = 0.0f32;
        // Rounding can leave `r` past the last cumulative sum: the last possible candidate wins.
        let mut chosen = cands.iter().rev().find(|c| c.v > 0.0).copied().unwrap_or(cands[cands.len() - 1]);
        for c in cands.iter() {
            cum += c.v;
            if c.v > 0.0 && r < cum {
                chosen = *c;
                break;
            }
        }
        self.last = Last::Drawn(libm::logf(chosen.v / kept));
        chosen.id
    }
}

/// A logit as the sampler takes it: NaN counts as `-inf`, and `+inf` (which would make `l - max`
/// NaN) as `f32::MAX`, still the clear winner.
#[inline]
fn sane(x: f32) -> f32 {
    if x.is_nan() { f32::NEG_INFINITY } else { x.min(f32::MAX) }
}

/// The sampler's `e^x` for `x = (logit − max) / T ≤ 0`: [`purehw_kernels::ops::exp`], and
/// exactly 0 below its range (so `-inf`, a masked token, stays impossible) or for NaN. Branch-free,
/// so the passes over the vocabulary vectorise.
#[inline]
fn prob(x: f32) -> f32 {
    let v = exp(x);
    if x >= EXP_LO { v } else { 0.0 }
}

/// A sum in 8 interleaved lanes (vectorises; a fixed order, so results are reproducible).
#[derive(Default)]
struct Lanes([f32; LANES]);

impl Lanes {
    /// Add up to 8 values, the `j`-th to lane `j`.
    #[inline]
    fn add(&mut self, x: impl Iterator<Item = f32>) {
        for (s, v) in self.0.iter_mut().zip(x) {
            *s += v;
        }
    }

    fn total(&self) -> f32 {
        reduce_lanes(&self.0)
    }
}

/// The first token whose cumulative probability (in id order) exceeds `r`; the last possible
/// token when rounding leaves `r` past the end. Blocks are skipped by their sums.
fn pick(p: &[f32], r: f32) -> usize {
    const BLOCK: usize = 256;
    let mut cum = 0.0f32;
    for (b, blk) in p.chunks(BLOCK).enumerate() {
        let mut s = Lanes::default();
        for c in blk.chunks(8) {
            s.add(c.iter().copied());
        }
        let s = s.total();
        if r < cum + s {
            let mut c = cum;
            for (j, &v) in blk.iter().enumerate() {
                c += v;
                if v > 0.0 && r < c {
                    return b * BLOCK + j;
                }
            }
        }
        cum += s;
    }
    p.iter().rposition(|&v| v > 0.0).unwrap_or(0)
}

/// A probability below which no token of the top-p nucleus (the most likely tokens until their
/// sum reaches `target`) can lie: the tokens at or above it carry `target`, found from the mass
/// per binary exponent, with one exponent of margin for rounding.
fn nucleus_floor(p: &[f32], target: f32) -> f32 {
    let mut mass = [0f32; 128]; // p ≤ 1: exponent fields 0..=127
    for &v in p {
        mass[((v.to_bits() >> 23) as usize).min(127)] += v;
    }
    let mut cum = 0.0f32;
    for e in (2..128).rev() {
        cum += mass[e];
        if cum >= target {
            return f32::from_bits(((e - 1) as u32) << 23);
        }
    }
    0.0
}

/// The tokens with probability `> 0` and `>= floor`, in id order.
fn collect(p: &[f32], floor: f32, out: &mut Vec<Cand>) {
    out.clear();
    for (i, &v) in p.iter().enumerate() {
        if v > 0.0 && v >= floor {
            out.push(Cand { id: i as u32, v });
        }
    }
}

/// Top-p over `cands`: keep the smallest most-likely prefix whose sum reaches `target`, sorting
/// only as much as needed (a few dozen tokens usually carry the mass). Returns whether the
/// target was reached; if not, `cands` is left whole (sorted).
fn nucleus(cands: &mut Vec<Cand>, target: f32) -> bool {
    let len = cands.len();
    if len <= 1 {
        return cands.first().is_some_and(|c| c.v >= target);
    }
    let mut m = len.min(64);
    let mut done = 0;
    loop {
        if m < len {
            cands[done..].select_nth_unstable_by(m - 1 - done, by_v_desc);
        }
        cands[done..m].sort_unstable_by(by_v_desc);
        let mut cum = 0.0f32;
        for (j, c) in cands[..m].iter().enumerate() {
            cum += c.v;
            if cum >= target {
                cands.truncate(j + 1);
                return true;
            }
        }
        if m == len {
            return false;
        }
        done = m;
        m = m.saturating_mul(4).min(len);
    }
}

/// The `k` best tokens by (logit desc, id asc), the order [`by_v_desc`] sorts by, sorted so.
/// Keeps a buffer of at most `2k` (≥ 64): past a full buffer a token enters only if it beats the
/// k-th best so far, so most of the vocabulary costs one comparison.
fn top_k(l: &[f32], k: usize, out: &mut Vec<Cand>) {
    out.clear();
    let cap = (2 * k).max(64).min(l.len());
    let mut worst = f32::NEG_INFINITY;
    let mut full = false;
    for (i, &v) in l.iter().enumerate() {
        // Later ids lose ties, so an equal logit cannot enter.
        if !full || v > worst {
            out.push(Cand { id: i as u32, v });
            if out.len() == cap {
                out.select_nth_unstable_by(k - 1, by_v_desc);
                out.truncate(k);
                worst = out[k - 1].v;
                full = true;
            }
        }
    }
    if out.len() > k {
        out.select_nth_unstable_by(k - 1, by_v_desc);
        out.truncate(k);
    }
    out.sort_unstable_by(by_v_desc);
}

/// Index and value of the largest entry, first one on ties (`l` holds no NaN). Lane-wise
/// maxima first (vectorises), then the first index holding the maximum.
fn argmax(l: &[f32]) -> (u32, f32) {
    let mut m = [f32::NEG_INFINITY; 8];
    let chunks = l.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &v) in m.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = m.iter().chain(rest).fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    (l.iter().position(|&v| v == max).unwrap_or(0) as u32, max)
}

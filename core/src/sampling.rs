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
            last: Last::None,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
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
                let sum: f32 = l.iter().map(|&x| libm::expf(x - max)).sum();
                Some(-libm::logf(sum))
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
        let l = &mut self.logits[..n];
        for (d, &s) in l.iter_mut().zip(&logits[..n]) {
            // +inf would make `l - max` NaN below; f32::MAX keeps it the clear winner.
            *d = if s.is_nan() {
                f32::NEG_INFINITY
            } else if s == f32::INFINITY {
                f32::MAX
            } else {
                s
            };
        }
        if self.params.has_penalties() {
            self.apply_penalties(n, history);
        }

        let l = &self.logits[..n];
        let (argmax, max) = argmax(l);
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
        let l = &self.logits[..n];
        let cands = &mut self.cands;
        cands.clear();

        // Unnormalised probabilities `exp((l - max) / T)`: the most likely token gets exactly 1,
        // so min-p's threshold is simply `min_p`. Subtracting before dividing keeps a tiny T from
        // overflowing.
        let e = |x: f32| {
            let v = libm::expf((x - max) / t);
            if v.is_nan() { 0.0 } else { v }
        };
        let total = if p.top_k > 0 && p.top_k < n {
            cands.extend(l.iter().enumerate().map(|(i, &v)| Cand { id: i as u32, v }));
            cands.select_nth_unstable_by(p.top_k - 1, by_v_desc);
            cands.truncate(p.top_k);
            let mut sum = 0.0f32;
            for c in cands.iter_mut() {
                c.v = e(c.v);
                sum += c.v;
            }
            sum
        } else {
            // No top-k: min-p can be applied while building the list (it cuts a suffix of the
            // sorted order, as top-p does, so doing it first keeps the same tokens) as long as
            // top-p still sees the full softmax sum.
            let mut sum = 0.0f32;
            for (i, &v) in l.iter().enumerate() {
                let pv = e(v);
                sum += pv;
                if pv > 0.0 && pv >= min_p {
                    cands.push(Cand { id: i as u32, v: pv });
                }
            }
            sum
        };

        if p.top_p < 1.0 && cands.len() > 1 {
            // Sort only as much of the list as top-p needs: a few dozen tokens usually carry the
            // mass, so grow the sorted prefix until its cumulative probability reaches `top_p`.
            let target = p.top_p.max(0.0) * total;
            let len = cands.len();
            let mut m = len.min(64);
            let mut done = 0;
            loop {
                if m < len {
                    cands[done..].select_nth_unstable_by(m - 1 - done, by_v_desc);
                }
                cands[done..m].sort_unstable_by(by_v_desc);
                let mut cum = 0.0f32;
                let mut keep = None;
                for (j, c) in cands[..m].iter().enumerate() {
                    cum += c.v;
                    if cum >= target {
                        keep = Some(j + 1);
                        break;
                    }
                }
                if let Some(k) = keep {
                    cands.truncate(k);
                    break;
                }
                if m == len {
                    break;
                }
                done = m;
                m = m.saturating_mul(4).min(len);
            }
        }

        if min_p > 0.0 {
            cands.retain(|c| c.v >= min_p);
        }

        let kept: f32 = cands.iter().map(|c| c.v).sum();
        let r = (self.rng.next_f64() * kept as f64) as f32;
        let mut cum = 0.0f32;
        // Rounding can leave `r` past the last cumulative sum: the last candidate then wins.
        let mut chosen = cands[cands.len() - 1];
        for c in cands.iter() {
            cum += c.v;
            if r < cum {
                chosen = *c;
                break;
            }
        }
        self.last = Last::Drawn(libm::logf(chosen.v / kept));
        chosen.id
    }
}

/// Index and value of the largest entry, first one on ties.
fn argmax(l: &[f32]) -> (u32, f32) {
    let mut best = 0;
    let mut max = l[0];
    for (i, &v) in l.iter().enumerate().skip(1) {
        if v > max {
            max = v;
            best = i;
        }
    }
    (best as u32, max)
}

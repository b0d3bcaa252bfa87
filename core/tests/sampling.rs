//! Sampler behaviour: greedy, filters, penalties, reproducibility, distribution, no allocation.

use std::sync::Mutex;

use purehw_core::sampling::{Sampler, SamplingParams};
use purehw_kernels::testing::Rng;

// Tests here run one at a time so their timing-sensitive checks don't compete.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Deterministic pseudo-random logits in [-8, 8).
fn logits(n: usize, seed: u32) -> Vec<f32> {
    Rng(0x9E37_79B9_7F4A_7C15 ^ u64::from(seed)).vec(n, 8.0)
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn stochastic(seed: u64) -> SamplingParams {
    SamplingParams { temperature: 1.0, seed, ..Default::default() }
}

#[test]
fn default_is_greedy() {
    let p = SamplingParams::default();
    assert!(p.is_greedy());
    assert_eq!(p.top_k, 0);
    assert_eq!(p.top_p, 1.0);
    assert_eq!(p.min_p, 0.0);
    assert_eq!(p.repetition_penalty, 1.0);
    assert!(p.validate().is_ok());
}

#[test]
fn greedy_is_argmax() {
    let _g = serial();
    let mut s = Sampler::new(SamplingParams::default(), 1000);
    for seed in 0..20 {
        let l = logits(1000, seed);
        assert_eq!(s.sample(&l, &[]), argmax(&l));
    }
    // Ties: the first index wins, like torch.argmax.
    let mut l = vec![0.0f32; 1000];
    l[7] = 3.0;
    l[9] = 3.0;
    assert_eq!(s.sample(&l, &[]), 7);
    // NaN never wins.
    l[3] = f32::NAN;
    assert_eq!(s.sample(&l, &[]), 7);
}

#[test]
fn greedy_logprob() {
    let _g = serial();
    let mut s = Sampler::new(SamplingParams::default(), 4);
    assert_eq!(s.last_logprob(), None);
    let l = [1.0f32, 2.0, 3.0, 4.0];
    assert_eq!(s.sample(&l, &[]), 3);
    let sum: f32 = l.iter().map(|x| (x - 4.0).exp()).sum();
    let want = -sum.ln();
    assert!((s.last_logprob().unwrap() - want).abs() < 1e-5);
}

#[test]
fn seeded_reproducibility() {
    let _g = serial();
    let params =
        SamplingParams { temperature: 0.9, top_k: 50, top_p: 0.95, min_p: 0.02, seed: 1234, ..Default::default() };
    let run = |s: &mut Sampler| -> Vec<u32> { (0..64).map(|i| s.sample(&logits(5000, i % 4), &[])).collect() };
    let mut a = Sampler::new(params, 5000);
    let mut b = Sampler::new(params, 5000);
    let ta = run(&mut a);
    assert_eq!(ta, run(&mut b));
    // Different seed: different stream (overwhelmingly likely over 64 draws).
    let mut c = Sampler::new(SamplingParams { seed: 99, ..params }, 5000);
    assert_ne!(ta, run(&mut c));
    // reset() restarts the stream.
    a.reset(1234);
    assert_eq!(ta, run(&mut a));
    // Not stuck on one token.
    let distinct = ta.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(distinct > 4, "{ta:?}");
}

#[test]
fn top_k_1_is_greedy() {
    let _g = serial();
    let mut s = Sampler::new(SamplingParams { top_k: 1, temperature: 1.5, seed: 5, ..Default::default() }, 3000);
    for seed in 0..30 {
        let l = logits(3000, seed);
        assert_eq!(s.sample(&l, &[]), argmax(&l));
        assert!(s.last_logprob().unwrap().abs() < 1e-6);
    }
    // Ties broken by the smaller id, as greedy does.
    let mut l = vec![0.0f32; 3000];
    l[2999] = 5.0;
    l[11] = 5.0;
    assert_eq!(s.sample(&l, &[]), 11);
}

#[test]
fn top_p_tiny_is_greedy() {
    let _g = serial();
    // Large vocabulary: exercises the partial sort growing past its first prefix.
    let n = 262_144;
    let mut s = Sampler::new(SamplingParams { top_p: 1e-6, temperature: 1.0, seed: 3, ..Default::default() }, n);
    for seed in 0..5 {
        let l = logits(n, seed);
        assert_eq!(s.sample(&l, &[]), argmax(&l));
    }
    // A flat distribution: top-p 0.5 must keep about half the tokens, so many distinct draws.
    let flat = vec![0.0f32; n];
    let mut s = Sampler::new(SamplingParams { top_p: 0.5, temperature: 1.0, seed: 3, ..Default::default() }, n);
    let ids: Vec<u32> = (0..200).map(|_| s.sample(&flat, &[])).collect();
    // Ties sort by id, so the kept half is the lower half.
    assert!(ids.iter().all(|&i| (i as usize) < n / 2 + 1), "{:?}", &ids[..10]);
    assert!(ids.iter().collect::<std::collections::HashSet<_>>().len() > 150);
}

#[test]
fn min_p_filters() {
    let _g = serial();
    // Probabilities ∝ [1, 0.5, 0.1, 0.01]: min_p 0.2 keeps ids 0 and 1 only.
    let l: Vec<f32> = [1.0f32, 0.5, 0.1, 0.01].iter().map(|p| p.ln()).collect();
    for top_k in [0, 3] {
        let mut s =
            Sampler::new(SamplingParams { min_p: 0.2, top_k, temperature: 1.0, seed: 11, ..Default::default() }, 4);
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[s.sample(&l, &[]) as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "top_k {top_k}: {seen:?}");
        assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
        // Renormalised over the two kept: 2/3 and 1/3.
        let f0 = seen[0] as f64 / 2000.0;
        assert!((f0 - 2.0 / 3.0).abs() < 0.05, "{seen:?}");
    }
    // min_p 1 keeps only the most likely.
    let mut s = Sampler::new(SamplingParams { min_p: 1.0, temperature: 1.0, seed: 1, ..Default::default() }, 4);
    for _ in 0..100 {
        assert_eq!(s.sample(&l, &[]), 0);
        assert!(s.last_logprob().unwrap().abs() < 1e-6);
    }
}

#[test]
fn top_k_restricts() {
    let _g = serial();
    let l = [4.0f32, 3.9, 3.8, 0.0, 3.7, -1.0];
    let mut s = Sampler::new(SamplingParams { top_k: 2, temperature: 5.0, seed: 2, ..Default::default() }, 6);
    let mut seen = [0usize; 6];
    for _ in 0..1000 {
        seen[s.sample(&l, &[]) as usize] += 1;
    }
    assert_eq!(seen[2..].iter().sum::<usize>(), 0, "{seen:?}");
    assert!(seen[0] > 300 && seen[1] > 300, "{seen:?}");
}

/// Greedy picks the token that penalties leave on top; checking which one wins at each step
/// pins down the exact formula.
#[test]
fn repetition_penalty_hf_semantics() {
    let _g = serial();
    let p = SamplingParams { repetition_penalty: 2.0, ..Default::default() };
    let mut s = Sampler::new(p, 4);
    // Positive logit divided: 10 → 5 < 6.
    assert_eq!(s.sample(&[10.0, 6.0, 0.0, 0.0], &[0]), 1);
    // Once per token, however often it occurs: 10 → 5 (not 2.5) > 4.
    assert_eq!(s.sample(&[10.0, 4.0, 0.0, 0.0], &[0, 0, 0]), 0);
    // Negative logit multiplied: -1 → -2 < -1.5.
    assert_eq!(s.sample(&[-1.0, -1.5, -9.0, -9.0], &[0]), 1);
    // Not in history: untouched.
    assert_eq!(s.sample(&[10.0, 6.0, 0.0, 0.0], &[2, 3]), 0);
    // Ids outside the vocabulary are ignored, not a panic.
    assert_eq!(s.sample(&[10.0, 6.0, 0.0, 0.0], &[7, u32::MAX]), 0);
}

#[test]
fn presence_and_frequency_openai_semantics() {
    let _g = serial();
    // presence 1, frequency 0.5, token 0 seen 3 times: 10 - (1 + 1.5) = 7.5.
    let p = SamplingParams { presence_penalty: 1.0, frequency_penalty: 0.5, ..Default::default() };
    let mut s = Sampler::new(p, 3);
    assert_eq!(s.sample(&[10.0, 7.4, 0.0], &[0, 0, 0]), 0);
    assert_eq!(s.sample(&[10.0, 7.6, 0.0], &[0, 0, 0]), 1);
    // Token 0 seen once: 10 - 1.5 = 8.5.
    assert_eq!(s.sample(&[10.0, 8.4, 0.0], &[0]), 0);
    assert_eq!(s.sample(&[10.0, 8.6, 0.0], &[0]), 1);
    // Counts do not leak into the next call.
    assert_eq!(s.sample(&[10.0, 9.9, 0.0], &[]), 0);
    // Penalties apply to negative logits too (subtraction, not scaling).
    assert_eq!(s.sample(&[-1.0, -2.4, -9.0], &[0]), 1);
}

#[test]
fn distribution_matches_softmax() {
    let _g = serial();
    let probs = [0.1f64, 0.2, 0.3, 0.4];
    let l: Vec<f32> = probs.iter().map(|p| p.ln() as f32 + 3.0).collect();
    let mut s = Sampler::new(stochastic(42), 4);
    let n = 40_000;
    let mut seen = [0usize; 4];
    for _ in 0..n {
        let id = s.sample(&l, &[]);
        seen[id as usize] += 1;
        let lp = s.last_logprob().unwrap() as f64;
        assert!((lp - probs[id as usize].ln()).abs() < 1e-4);
    }
    for (i, &p) in probs.iter().enumerate() {
        let f = seen[i] as f64 / n as f64;
        // 5 standard deviations of a binomial proportion.
        let tol = 5.0 * (p * (1.0 - p) / n as f64).sqrt();
        assert!((f - p).abs() < tol, "token {i}: {f} vs {p} ({seen:?})");
    }
    // Temperature 0.5 squares the odds: p ∝ [0.01, 0.04, 0.09, 0.16].
    let mut s = Sampler::new(SamplingParams { temperature: 0.5, seed: 7, ..Default::default() }, 4);
    let mut seen = [0usize; 4];
    for _ in 0..n {
        seen[s.sample(&l, &[]) as usize] += 1;
    }
    let q = [0.01f64, 0.04, 0.09, 0.16];
    let z: f64 = q.iter().sum();
    for (i, &qi) in q.iter().enumerate() {
        let p = qi / z;
        let f = seen[i] as f64 / n as f64;
        let tol = 5.0 * (p * (1.0 - p) / n as f64).sqrt();
        assert!((f - p).abs() < tol, "T=0.5 token {i}: {f} vs {p} ({seen:?})");
    }
}

#[test]
fn odd_inputs_do_not_panic() {
    let _g = serial();
    let mut s = Sampler::new(stochastic(1), 8);
    assert_eq!(s.sample(&[], &[]), 0);
    // All -inf: falls back to the first index.
    assert_eq!(s.sample(&[f32::NEG_INFINITY; 8], &[]), 0);
    // +inf wins outright.
    let mut l = [0.0f32; 8];
    l[5] = f32::INFINITY;
    assert_eq!(s.sample(&l, &[]), 5);
    // Longer than vocab: extra entries ignored.
    let mut l = [0.0f32; 12];
    l[10] = 100.0;
    l[2] = 50.0;
    assert_eq!(s.sample(&l, &[]), 2);
    // Tiny temperature behaves like greedy instead of overflowing.
    let mut s = Sampler::new(SamplingParams { temperature: 1e-30, seed: 1, ..Default::default() }, 4);
    assert_eq!(s.sample(&[1.0, 3.0, 2.0, 2.9], &[]), 1);
    // Bad params are reported by validate().
    assert!(SamplingParams { top_p: 0.0, ..Default::default() }.validate().is_err());
    assert!(SamplingParams { temperature: -1.0, ..Default::default() }.validate().is_err());
    assert!(SamplingParams { repetition_penalty: 0.0, ..Default::default() }.validate().is_err());
    assert!(SamplingParams { min_p: 1.5, ..Default::default() }.validate().is_err());
}

#[test]
fn sample_does_not_allocate() {
    let _g = serial();
    let n = 262_144;
    let l = logits(n, 9);
    let history: Vec<u32> = (0..512).map(|i| (i * 7919) % n as u32).collect();
    let configs = [
        SamplingParams::default(),
        SamplingParams { repetition_penalty: 1.1, presence_penalty: 0.5, frequency_penalty: 0.2, ..Default::default() },
        stochastic(1),
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.1,
            seed: 2,
            ..Default::default()
        },
        SamplingParams { temperature: 1.0, top_p: 0.9, seed: 3, ..Default::default() },
        SamplingParams { temperature: 1.0, min_p: 0.1, frequency_penalty: 0.3, seed: 4, ..Default::default() },
    ];
    for params in configs {
        // `allocation_counter` counts this thread's allocations only.
        let mut s = Sampler::new(params, n);
        let info = allocation_counter::measure(|| {
            for _ in 0..8 {
                std::hint::black_box(s.sample(&l, &history));
                std::hint::black_box(s.last_logprob());
            }
            s.reset(7);
            std::hint::black_box(s.sample(&l, &history));
        });
        let (ok, last) = (info.count_total == 0, info.count_total);
        assert!(ok, "{params:?}: {last} allocations in sample()");
    }
}

#[test]
fn logit_bias_moves_and_bans_tokens() {
    let _g = serial();
    let l = logits(1000, 4);
    let top = argmax(&l);
    // -100 bans the argmax for greedy; +100 makes any token win.
    let mut s = Sampler::new(SamplingParams::default(), 1000).with_logit_bias(vec![(top, -100.0), (5000, 3.0)]);
    let next = s.sample(&l, &[]);
    assert_ne!(next, top);
    let mut rest = l.clone();
    rest[top as usize] -= 100.0;
    assert_eq!(next, argmax(&rest));
    let mut s = Sampler::new(SamplingParams::default(), 1000).with_logit_bias(vec![(17, 100.0)]);
    assert_eq!(s.sample(&l, &[]), 17);
    // Drawn: a banned token never comes up.
    let params = SamplingParams { temperature: 1.0, seed: 7, ..Default::default() };
    let flat = vec![0.0f32; 8];
    let mut s = Sampler::new(params, 8).with_logit_bias(vec![(3, -100.0), (5, -100.0)]);
    for _ in 0..500 {
        let t = s.sample(&flat, &[]);
        assert!(t != 3 && t != 5, "banned token {t} drawn");
    }
}

//! Greedy decoding a step ahead (`Model::decode_greedy`: on a GPU the device feeds each argmax
//! to the next step's embedding, `Op::EmbedIds`, and the next step is submitted before the last
//! one's token is read) gives the tokens of a step-by-step loop (`forward_argmax`) on every
//! backend. Stopping early runs one step past the stop; a sequence resumed from there with
//! another token (also through a sliding-window ring) computes what a fresh run computes.

use purehw_conformance::{fixture, golden, matrix, model_file};
use purehw_core::model::{Model, ModelOptions};
use purehw_hal::{ActQuant, Backend, KvType};

fn opts(act: ActQuant) -> ModelOptions {
    ModelOptions { ctx: 96, slots: 1, max_batch: 1, logit_rows: 1, act, swa_ring: true, kv: KvType::F32 }
}

/// `n` tokens after `prompt`, one `forward_argmax` a step.
fn step_by_step<B: Backend>(m: &mut Model<B>, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut t = m.forward_argmax(0, 0, prompt).unwrap();
    let mut out = vec![t];
    while out.len() < n {
        t = m.forward_argmax(0, prompt.len() + out.len() - 1, &[t]).unwrap();
        out.push(t);
    }
    out
}

fn check<B: Backend>(path: &std::path::Path, act: ActQuant, n: usize, make: impl Fn() -> B) {
    let src = golden::open(path);
    let mut m = golden::load(make(), &src, opts(act));
    let prompt = golden::prompt(5, m.config().vocab, 3);
    let want = step_by_step(&mut m, &prompt, n);

    // Whole: the prompt, then n - 1 tokens greedily.
    let first = m.forward_argmax(0, 0, &prompt).unwrap();
    let mut got = vec![first];
    let k = m.decode_greedy(0, prompt.len(), first, n - 1, |t| {
        got.push(t);
        true
    });
    assert_eq!(k.unwrap(), n - 1);
    assert_eq!(got, want, "{}: decode_greedy differs from step by step", m.backend().name());

    // Stopped after 6 tokens; the step after the stop ran too. Resume at the next position
    // with another token than the one that step fed, and compare with a fresh model fed the
    // same sequence step by step.
    let first = m.forward_argmax(0, 0, &prompt).unwrap();
    let mut got = vec![first];
    m.decode_greedy(0, prompt.len(), first, n - 1, |t| {
        got.push(t);
        got.len() < 6
    })
    .unwrap();
    assert_eq!(got[..], want[..6]);
    let other = (got[5] + 1) % m.config().vocab as u32;
    let at = prompt.len() + 5;
    let mut resumed = Vec::new();
    m.decode_greedy(0, at, other, n - 6, |t| {
        resumed.push(t);
        true
    })
    .unwrap();
    let mut fresh = golden::load(make(), &src, opts(act));
    let mut seq = prompt.clone();
    seq.extend_from_slice(&got[..5]);
    seq.push(other);
    fresh.forward_argmax(0, 0, &seq[..at]).unwrap();
    let mut t = fresh.forward_argmax(0, at, &[other]).unwrap();
    let mut again = vec![t];
    while again.len() < resumed.len() {
        t = fresh.forward_argmax(0, at + again.len(), &[t]).unwrap();
        again.push(t);
    }
    assert_eq!(resumed, again, "{}: a sequence resumed after a stop differs", m.backend().name());
}

#[test]
fn cpu() {
    // No steps ahead on the CPU: decode_greedy is the loop itself.
    check(&fixture("tiny-gemma3"), ActQuant::F32, 40, || matrix::cpu(2));
}

#[test]
fn vulkan() {
    if !matrix::vulkan_present("ahead::vulkan") {
        return;
    }
    // The ring of the sliding-window layers (16) wraps twice.
    check(&fixture("tiny-gemma3"), ActQuant::F32, 40, matrix::vulkan);
    check(&model_file("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf"), ActQuant::Int8, 8, matrix::vulkan);
    let m = purehw_hal_vulkan::validation_messages();
    assert!(m.is_empty(), "{} validation-layer messages:\n{}", m.len(), m.join("\n"));
}

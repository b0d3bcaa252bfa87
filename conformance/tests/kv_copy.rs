//! `Model::copy_kv` on real models: a prompt whose prefix was computed in another slot and
//! copied over (`Op::Copy`, every layer's K and V) gives, for every position computed after it,
//! the logits of the whole prompt computed in one slot from scratch, bit for bit. That is what
//! lets the server move a prefix between slots instead of computing it again.

use purehw_conformance::{golden, matrix, model_file};
use purehw_core::model::{Model, ModelOptions};
use purehw_core::source::ModelSource;
use purehw_hal::KvType;
use purehw_hal::{ActQuant, Backend};
use purehw_hal_cpu_ref::CpuRef;

fn gemma3() -> ModelSource {
    let mut src = golden::open(&model_file("gemma3-270m", "gemma-3-270m-q4_k_m.gguf"));
    // A window shorter than the prefix, so the sliding layers' copied rows are partly out of
    // sight (a 512-position window would need a prompt too long for the reference backend).
    src.config.sliding_window = 12;
    src
}

fn smollm2() -> ModelSource {
    golden::open(&model_file("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf"))
}

/// Token ids spread over the vocabulary, fixed.
fn prompt(n: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + seed * 104_729 + 13) % (vocab - 200) + 100) as u32).collect()
}

/// Slot 0 computes `prefix + rest` itself. Slot 1 computes the prefix; slot 2 holds other
/// tokens, then its first `own` positions are the prefix's (computed there), the rest of the
/// prefix is copied from slot 1 and `rest` computed: its logits must equal slot 0's. The copy
/// reads slot 1 while slot 1 goes on (its later positions are written after the copy).
fn check<B: Backend>(src: &ModelSource, act: ActQuant, backend: B, prefix_len: usize, rest_len: usize) {
    let opts =
        ModelOptions { ctx: 64, slots: 3, max_batch: 16, logit_rows: rest_len, act, swa_ring: true, kv: KvType::F32 };
    let mut m: Model<B> = golden::load(backend, src, opts);
    assert!(m.can_copy_kv(), "{} does not run Op::Copy", m.backend().name());
    let vocab = m.config().vocab;
    let (prefix, rest) = (prompt(prefix_len, vocab, 1), prompt(rest_len, vocab, 2));

    let mut want = Vec::new();
    m.forward(0, 0, &prefix).unwrap();
    m.forward_all(0, prefix_len, &rest, &mut want).unwrap();

    m.forward(1, 0, &prefix).unwrap();
    for own in [0, 5] {
        // Stale contents first: a different prompt in slot 2.
        m.forward(2, 0, &prompt(prefix_len + rest_len, vocab, 3)).unwrap();
        if own > 0 {
            m.forward(2, 0, &prefix[..own]).unwrap();
        }
        m.copy_kv(1, 2, own..prefix_len).unwrap();
        let mut got = Vec::new();
        m.forward_all(2, prefix_len, &rest, &mut got).unwrap();
        let name = m.backend().name().to_string();
        assert_eq!(got.len(), want.len());
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            panic!(
                "{name}, {act:?}, {own} positions computed and {} copied: position {} logit {} is {:e}, from scratch {:e}",
                prefix_len - own,
                prefix_len + i / vocab,
                i % vocab,
                got[i],
                want[i]
            );
        }
    }
    // Slot 1 goes on after being copied from: still the from-scratch logits.
    let mut again = Vec::new();
    m.forward_all(1, prefix_len, &rest, &mut again).unwrap();
    assert!(again.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "slot 1 after the copy");
    // Out of range, or onto itself: errors, not panics.
    assert!(m.copy_kv(0, 3, 0..1).is_err());
    assert!(m.copy_kv(1, 1, 0..1).is_err());
    assert!(m.copy_kv(0, 1, 0..65).is_err());
    assert!(m.copy_kv(0, 1, 5..5).is_ok());
}

#[test]
fn cpu_ref_gemma3() {
    check(&gemma3(), ActQuant::F32, CpuRef::new(), 30, 4);
}

#[test]
fn cpu_ref_smollm2_int8() {
    check(&smollm2(), ActQuant::Int8, CpuRef::new(), 30, 4);
}

#[test]
fn cpu_gemma3_both_modes() {
    check(&gemma3(), ActQuant::F32, matrix::cpu(2), 40, 6);
    check(&gemma3(), ActQuant::Int8, matrix::cpu(2), 40, 6);
}

#[test]
fn cpu_smollm2_both_modes() {
    check(&smollm2(), ActQuant::F32, matrix::cpu(2), 40, 6);
    check(&smollm2(), ActQuant::Int8, matrix::cpu(2), 40, 6);
}

#[test]
fn vulkan_smollm2() {
    if !matrix::vulkan_present("vulkan_smollm2") {
        return;
    }
    check(&smollm2(), ActQuant::Int8, matrix::vulkan(), 20, 3);
    let m = purehw_hal_vulkan::validation_messages();
    assert!(m.is_empty(), "{} validation-layer messages:\n{}", m.len(), m.join("\n"));
}

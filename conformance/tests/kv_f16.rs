//! An f16 KV cache (`ModelOptions::kv`, `--kv-type f16`): each key and value rounded to f16 when
//! stored, half the memory. `cpu` gives bit for bit `cpu-ref`'s logits with it (prompt chunks,
//! batched decode over two slots, sliding-window rings), and they stay close to the f32 cache's.
//! Vulkan too, on lavapipe in CI.

use purehw_conformance::golden::{self, run};
use purehw_conformance::{fixture, matrix, model_file, nmse};
use purehw_core::model::ModelOptions;
use purehw_core::source::ModelSource;
use purehw_hal::{ActQuant, KvType};
use purehw_hal_cpu_ref::CpuRef;

fn opts(act: ActQuant, kv: KvType) -> ModelOptions {
    ModelOptions { ctx: 128, slots: 2, max_batch: 8, logit_rows: 8, act, swa_ring: true, kv }
}

/// `cpu` at 1, 2 and 7 threads against `cpu-ref`, both with f16 caches; then f16 against f32.
fn check(src: &ModelSource, act: ActQuant, prompt_len: usize, decode: usize, close: f64) {
    let want = run(&mut golden::load(CpuRef::new(), src, opts(act, KvType::F16)), prompt_len, decode);
    for threads in [1, 2, 7] {
        let got = run(&mut golden::load(matrix::cpu(threads), src, opts(act, KvType::F16)), prompt_len, decode);
        assert_eq!(got.len(), want.len());
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            panic!("cpu at {threads} threads differs from cpu-ref at logit {i}: {} vs {}", got[i], want[i]);
        }
    }
    // Teacher-forced rows only (both prompts): decode feeds each run's own argmax, and a near
    // tie that flips makes the runs read different tokens.
    let exact = run(&mut golden::load(CpuRef::new(), src, opts(act, KvType::F32)), prompt_len, decode);
    let forced = (prompt_len + 1) * src.config.vocab;
    let e = nmse(&want[..forced], &exact[..forced]);
    assert!(e > 0.0, "the f16 cache changed nothing: is it rounding?");
    assert!(e < close, "f16 cache logits NMSE {e:e} against the f32 cache's (bound {close:e})");
}

#[test]
fn tiny_gemma3_f16_cache_matches_the_reference_bit_for_bit() {
    let src = golden::open(&fixture("tiny-gemma3"));
    check(&src, ActQuant::F32, 40, 6, 1e-4);
}

#[test]
fn gemma3_270m_f16_cache_matches_the_reference_bit_for_bit() {
    let mut src = golden::open(&model_file("gemma3-270m", "gemma-3-270m-q4_k_m.gguf"));
    src.config.sliding_window = 12;
    // Gemma's attention is the most sensitive to the keys' rounding: 7.2e-3 measured.
    check(&src, ActQuant::Int8, 20, 4, 2e-2);
}

#[test]
fn smollm2_f16_cache_matches_the_reference_bit_for_bit() {
    let src = golden::open(&model_file("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf"));
    check(&src, ActQuant::F32, 20, 4, 1e-3);
}

#[test]
fn f16_cache_is_half_the_bytes() {
    let src = golden::open(&fixture("tiny-gemma3"));
    let c = &src.config;
    let f32c = opts(ActQuant::F32, KvType::F32);
    let f16c = opts(ActQuant::F32, KvType::F16);
    assert_eq!(f16c.kv_bytes(c) * 2, f32c.kv_bytes(c));
    assert_eq!(golden::load(CpuRef::new(), &src, f16c).kv_bytes(), f16c.kv_bytes(c));
}

#[test]
fn vulkan_f16_cache_matches_the_reference_bit_for_bit() {
    if !matrix::vulkan_present("vulkan_f16_cache_matches_the_reference_bit_for_bit") {
        return;
    }
    for (src, act, prompt_len) in [
        (golden::open(&fixture("tiny-gemma3")), ActQuant::F32, 40),
        (golden::open(&model_file("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf")), ActQuant::Int8, 12),
    ] {
        let want = run(&mut golden::load(CpuRef::new(), &src, opts(act, KvType::F16)), prompt_len, 3);
        let got = run(&mut golden::load(matrix::vulkan(), &src, opts(act, KvType::F16)), prompt_len, 3);
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            panic!("vulkan differs from cpu-ref at logit {i}: {} vs {}", got[i], want[i]);
        }
    }
    assert!(purehw_hal_vulkan::validation_messages().is_empty(), "{:?}", purehw_hal_vulkan::validation_messages());
}

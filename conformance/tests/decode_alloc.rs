//! A decode step allocates nothing once the model is loaded and warmed up: no host allocation,
//! and no device memory (the backend's `stats().memory_used` stays put).

use purehw_conformance::{fixture, golden, model_file};
use purehw_core::model::ModelOptions;
use purehw_hal::KvType;
use purehw_hal::{ActQuant, Backend};
use purehw_hal_cpu_ref::CpuRef;

#[test]
fn decode_step_allocates_nothing() {
    check(&fixture("tiny-gemma3"), ActQuant::F32, CpuRef::new);
}

#[test]
fn cpu_decode_step_allocates_nothing() {
    let cpu = || purehw_hal_cpu::Cpu::new(2).unwrap();
    check(&fixture("tiny-gemma3"), ActQuant::F32, cpu);
    // A real quantized model on the integer path (quantized activations, integer kernels).
    check(&model_file("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf"), ActQuant::Int8, cpu);
}

#[test]
fn vulkan_decode_step_allocates_nothing() {
    if !purehw_conformance::matrix::vulkan_present("vulkan_decode_step_allocates_nothing") {
        return;
    }
    check(&fixture("tiny-gemma3"), ActQuant::F32, purehw_conformance::matrix::vulkan);
    check(
        &model_file("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ActQuant::Int8,
        purehw_conformance::matrix::vulkan,
    );
}

/// Load, warm up (prefill and one decode step), then count allocations over decode steps.
fn check<B: Backend>(path: &std::path::Path, act: ActQuant, make: impl FnOnce() -> B) {
    let src = golden::open(path);
    let opts = ModelOptions { ctx: 64, slots: 2, max_batch: 8, logit_rows: 2, act, swa_ring: true, kv: KvType::F32 };
    let mut m = golden::load(make(), &src, opts);
    m.forward(0, 0, &[2, 10, 20, 30]).unwrap();
    m.forward(0, 4, &[40]).unwrap(); // warm-up: first decode-shaped step
    let device_before = m.backend().stats().memory_used;
    let info = allocation_counter::measure(|| {
        for p in 5..12 {
            let l = m.forward(0, p, &[p as u32]).unwrap();
            assert!(l[0].is_finite());
        }
    });
    assert_eq!(info.count_total, 0, "single-sequence decode allocated: {info:?}");

    // A batched decode step over two slots, too.
    m.forward(1, 0, &[2, 7]).unwrap();
    use purehw_core::model::SeqInput;
    let batch =
        |p: usize| [SeqInput { slot: 0, pos: p, tokens: &[3] }, SeqInput { slot: 1, pos: p - 10, tokens: &[4] }];
    m.forward_batch(&batch(12)).unwrap();
    let info = allocation_counter::measure(|| {
        for p in 13..20 {
            m.forward_batch(&batch(p)).unwrap();
        }
    });
    assert_eq!(info.count_total, 0, "batched decode allocated: {info:?}");
    assert_eq!(m.backend().stats().memory_used, device_before, "device memory grew over decode steps");

    // Greedy decoding, a step ahead where the backend can: two warm-up runs record both
    // parities of the first step and of the steps fed on the device.
    for p in [20, 24] {
        m.decode_greedy(0, p, 5, 3, |_| true).unwrap();
    }
    let device_before = m.backend().stats().memory_used;
    let info = allocation_counter::measure(|| {
        let n = m.decode_greedy(0, 28, 6, 8, |_| true).unwrap();
        assert_eq!(n, 8);
    });
    assert_eq!(info.count_total, 0, "greedy decoding allocated: {info:?}");
    assert_eq!(m.backend().stats().memory_used, device_before, "device memory grew over greedy decoding");
}

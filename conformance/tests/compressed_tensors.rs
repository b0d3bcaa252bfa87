//! compressed-tensors checkpoints (`shared/fixtures/compressed-tensors`: the tiny Gemma 3
//! quantized by the library to int4 group 32, int4 group 32 with zero points, and int8 per
//! channel) against HF transformers' float64 logits (exact dequantization), on every backend with
//! f32 activations: every position within NMSE 1e-8, argmax and 16 greedy tokens equal.

use purehw_conformance::{golden, matrix};

const FIXTURES: [&str; 3] =
    ["compressed-tensors/w4a16-g32", "compressed-tensors/w4a16-g32-asym", "compressed-tensors/w8a16-ch"];

#[test]
fn cpu_ref() {
    for f in FIXTURES {
        golden::check_hf_golden(f, 1e-8, purehw_hal_cpu_ref::CpuRef::new);
    }
}

#[test]
fn cpu() {
    for f in FIXTURES {
        golden::check_hf_golden(f, 1e-8, || purehw_hal_cpu::Cpu::new(2).unwrap_or_else(|e| panic!("{e}")));
    }
}

#[test]
fn vulkan() {
    if !matrix::vulkan_present("compressed_tensors::vulkan") {
        return;
    }
    for f in FIXTURES {
        golden::check_hf_golden(f, 1e-8, matrix::vulkan);
    }
    let m = purehw_hal_vulkan::validation_messages();
    assert!(m.is_empty(), "{} validation-layer messages:\n{}", m.len(), m.join("\n"));
}

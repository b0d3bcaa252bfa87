//! Every fast backend against the reference, op by op and on whole models, bit for bit.

use purehw_conformance::{golden, model_file, ops};
use purehw_hal::ActQuant;
use purehw_hal_cpu::Cpu;
use purehw_hal_cpu::simd::scalar_kernels;
use purehw_hal_cpu_ref::CpuRef;

/// The fast CPU backend with two threads (so work is really split) and the detected kernels.
fn cpu() -> Cpu {
    Cpu::new(2).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn cpu_matmuls_equal_reference() {
    ops::check_matmuls(CpuRef::new(), cpu());
}

#[test]
fn cpu_scalar_fallback_matmuls_equal_reference() {
    ops::check_matmuls(CpuRef::new(), Cpu::with_kernels(2, scalar_kernels()).unwrap());
}

#[test]
fn cpu_attention_and_other_ops_equal_reference() {
    ops::check_attention(CpuRef::new(), cpu());
}

/// A decode step's attention on more threads than it has (row, kv head) tasks.
#[test]
fn cpu_decode_attention_equals_reference() {
    ops::check_attention_decode(CpuRef::new(), Cpu::new(16).unwrap_or_else(|e| panic!("{e}")));
}

#[test]
fn cpu_greedy_64_equals_reference_gemma3_270m() {
    let m = model_file("gemma3-270m", "gemma-3-270m-q4_k_m.gguf");
    golden::check_greedy_twins("gemma3-270m", &m, 64, ActQuant::Int8, CpuRef::new, cpu);
}

#[test]
fn cpu_greedy_64_equals_reference_smollm2() {
    let m = model_file("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf");
    golden::check_greedy_twins("smollm2-135m", &m, 64, ActQuant::Int8, CpuRef::new, cpu);
    golden::check_greedy_twins("smollm2-135m", &m, 64, ActQuant::F32, CpuRef::new, cpu);
}

//! Golden runs of real and tiny models, once per registered backend.

use purehw_conformance::{golden, model_file};

/// Instantiate every golden check for one backend constructor.
macro_rules! golden_tests {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;

            #[test]
            fn tiny_gemma3_hf_layout() {
                golden::check_hf_golden("tiny-gemma3", 1e-8, $make);
            }

            #[test]
            fn gemma3_270m_gguf() {
                let m = model_file("gemma3-270m", "gemma-3-270m-q4_k_m.gguf");
                golden::check_gguf_golden("gemma3-270m", &m, 1e-6, $make);
            }

            #[test]
            fn smollm2_135m_gguf() {
                let m = model_file("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf");
                golden::check_gguf_golden("smollm2-135m", &m, 1e-6, $make);
            }
        }
    };
}

golden_tests!(cpu_ref, purehw_hal_cpu_ref::CpuRef::new);
golden_tests!(cpu, || purehw_hal_cpu::Cpu::new(2).unwrap_or_else(|e| panic!("{e}")));

//! Whole models, greedy, on every fast backend against the reference (`CpuRef`), bit for bit:
//! 64 tokens on every prompt of the fixtures' `cases.json`. The reference's runs are computed once
//! per (model, activation mode) and shared by every backend's test in this binary.

use purehw_conformance::{golden, matrix, model_file};
use purehw_hal::ActQuant;

fn gemma3() -> std::path::PathBuf {
    model_file("gemma3-270m", "gemma-3-270m-q4_k_m.gguf")
}

fn smollm2() -> std::path::PathBuf {
    model_file("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Whether a test marked long runs: `PUREHW_LONG=1`.
fn long_tests() -> bool {
    std::env::var("PUREHW_LONG").is_ok_and(|v| v == "1")
}

/// One test per backend × model × activation mode:
/// `backend => constructor, if present, then after; { test => (fixture, model, act[, long]) }`:
/// `present` says whether the device is there at all, `after` checks more after each run, and a
/// test marked `long` runs only with `PUREHW_LONG=1`.
macro_rules! greedy_twins {
    ($backend:ident => $make:expr, if $present:expr, then $after:expr; { $($name:ident => ($fixture:expr, $model:expr, $act:expr $(, $long:ident)?),)* }) => {
        mod $backend {
            use super::*;
            $(
                #[test]
                fn $name() {
                    if !$present(stringify!($name)) {
                        return;
                    }
                    $(
                        let _ = stringify!($long);
                        if !long_tests() {
                            eprintln!("{}: SKIPPED, a long test (set PUREHW_LONG=1)", stringify!($name));
                            return;
                        }
                    )?
                    golden::check_greedy_twins($fixture, &$model(), 64, $act, $make);
                    $after();
                }
            )*
        }
    };
}

greedy_twins!(cpu => || matrix::cpu(2), if |_| true, then || (); {
    gemma3_int8 => ("gemma3-270m", gemma3, ActQuant::Int8),
    smollm2_int8 => ("smollm2-135m", smollm2, ActQuant::Int8),
    smollm2_f32 => ("smollm2-135m", smollm2, ActQuant::F32),
});

// Gemma on lavapipe takes 10-15 minutes per mode on two cores, more than CI's budget allows:
// long tests there (run with PUREHW_LONG=1 on lavapipe and on GPUs, where they take seconds).
greedy_twins!(vulkan => matrix::vulkan, if matrix::vulkan_present, then assert_validation_silent; {
    gemma3_int8 => ("gemma3-270m", gemma3, ActQuant::Int8, long),
    gemma3_f32 => ("gemma3-270m", gemma3, ActQuant::F32, long),
    smollm2_int8 => ("smollm2-135m", smollm2, ActQuant::Int8),
    smollm2_f32 => ("smollm2-135m", smollm2, ActQuant::F32),
});

fn assert_validation_silent() {
    let m = purehw_hal_vulkan::validation_messages();
    assert!(m.is_empty(), "{} validation-layer messages:\n{}", m.len(), m.join("\n"));
}

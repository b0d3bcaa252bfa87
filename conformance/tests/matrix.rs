//! The op matrix (`purehw_conformance::matrix`) on every registered backend, against the
//! reference: bit for bit on the CPU backends and on Vulkan (where a driver flushes f32
//! denormals, NVIDIA's, a subnormal result may be a zero).

use purehw_conformance::matrix::{self, Report, Tolerance};

/// One test per backend under test: `name => constructor, tolerance`, then optionally
/// `if present` (a check that the device is there at all) and `then after` (more failures to add
/// to the report). The constructor is called once per group of cases.
macro_rules! matrix_tests {
    ($($name:ident => $make:expr, $tol:expr $(, if $present:expr)? $(, then $after:expr)?;)*) => {
        $(
            #[test]
            fn $name() {
                $(if !$present(stringify!($name)) { return; })?
                #[allow(unused_mut)]
                let mut report = matrix::check_all($make, $tol);
                $($after(&mut report);)?
                report.assert_ok();
            }
        )*
    };
}

matrix_tests! {
    cpu_1_thread => || matrix::cpu(1), Tolerance::Exact;
    cpu_2_threads => || matrix::cpu(2), Tolerance::Exact;
    // More threads than most ops have rows or (row, kv head) tasks.
    cpu_7_threads => || matrix::cpu(7), Tolerance::Exact;
    cpu_16_threads => || matrix::cpu(16), Tolerance::Exact;
    cpu_scalar_kernels_2_threads => || matrix::cpu_scalar(2), Tolerance::Exact;
    // On lavapipe in CI (`PUREHW_REQUIRE_VULKAN=1` there); the validation layer must stay silent.
    // Bit for bit, subnormal results flushed to zero allowed where the driver flushes them.
    vulkan => matrix::vulkan, matrix::vulkan_tolerance(), if matrix::vulkan_present, then Report::add_validation_messages;
}

/// The kernels a GPU takes (split matmuls and their tails, block attention's smaller blocks)
/// on whatever Vulkan device is there: on lavapipe in CI they would otherwise run only on the
/// lent GPU.
#[test]
fn vulkan_gpu_kernels() {
    if !matrix::vulkan_present("vulkan_gpu_kernels") {
        return;
    }
    let pick =
        |g: &str| ["MatMulQ8", "MatMul Int", "Prologue", "Tail", "Attention", "Qkv"].iter().any(|p| g.starts_with(p));
    let mut report = matrix::check_groups(matrix::vulkan_gpu_kernels, matrix::vulkan_tolerance(), pick);
    report.add_validation_messages();
    report.assert_ok();
}

/// The norm and gate prologues (`PUREHW_VK_PRO`) in place of the tails.
#[test]
fn vulkan_gpu_prologues() {
    if !matrix::vulkan_present("vulkan_gpu_prologues") {
        return;
    }
    let pick = |g: &str| g.starts_with("Prologue") || g.starts_with("Tail");
    let mut report = matrix::check_groups(matrix::vulkan_gpu_prologues, matrix::vulkan_tolerance(), pick);
    report.add_validation_messages();
    report.assert_ok();
}

/// Batched decode matmuls on the tiled kernel (`PUREHW_VK_BATCH_TILE`), and the fused ops
/// that run them.
#[test]
fn vulkan_batch_tile() {
    if !matrix::vulkan_present("vulkan_batch_tile") {
        return;
    }
    let pick = |g: &str| ["MatMul", "Qkv", "GatedFfn"].iter().any(|p| g.starts_with(p));
    let mut report = matrix::check_groups(matrix::vulkan_batch_tile, matrix::vulkan_tolerance(), pick);
    report.add_validation_messages();
    report.assert_ok();
}

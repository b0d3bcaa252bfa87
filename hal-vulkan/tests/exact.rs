//! `exact.glsl`'s correctly rounded division and square root against the host's IEEE operations,
//! bit for bit, on both of their paths (f64 where the device has it, and 32-bit integers): every
//! class of operand (zero, subnormal, normal, infinite, NaN), quotients that overflow and
//! underflow, and a broad sweep of normal ones.

use purehw_hal_vulkan::{Vulkan, VulkanOptions};
use purehw_kernels::testing::Rng;

/// A float of a random class: mostly normal, also each special kind.
fn operand(rng: &mut Rng) -> f32 {
    let bits = rng.next_u64() as u32;
    match rng.next_u64() % 16 {
        0 => f32::from_bits(bits & 0x807F_FFFF), // zero or subnormal
        1 => {
            // ±infinity, or a NaN with a random payload
            let payload = if rng.next_u64().is_multiple_of(2) { 0 } else { bits & 0x7F_FFFF };
            f32::from_bits((bits & 0x8000_0000) | 0x7F80_0000 | payload)
        }
        2 => f32::from_bits(bits & 0x8000_0000),                 // ±0
        3 => f32::from_bits((bits & 0x807F_FFFF) | (1 << 23)),   // smallest exponent
        4 => f32::from_bits((bits & 0x807F_FFFF) | (254 << 23)), // largest exponent
        _ => f32::from_bits((bits & 0x807F_FFFF) | ((1 + (rng.next_u64() % 254) as u32) << 23)),
    }
}

/// Bits of a result, every NaN alike (the reference does not fix a NaN's payload).
fn key(x: f32) -> u32 {
    if x.is_nan() { 0x7FC0_0000 } else { x.to_bits() }
}

fn check(f64_path: bool) {
    let opts = VulkanOptions { exact_f64: Some(f64_path), ..VulkanOptions::from_env() };
    let mut vk = Vulkan::new(&opts).unwrap_or_else(|e| panic!("{e}"));
    let mut rng = Rng(0x5EED_E8AC);
    let n = 1 << 16;
    let mut a: Vec<f32> = (0..n).map(|_| operand(&mut rng)).collect();
    let mut b: Vec<f32> = (0..n).map(|_| operand(&mut rng)).collect();
    // Operands near one another and near 1 (statistics: a sum over the dimension, 1 over a root).
    for i in 0..n / 4 {
        a[i] = 1.0 + rng.unit().abs() * 2f32.powi(-((i % 24) as i32));
        b[i] = if i % 2 == 0 { 1.0 } else { 1.0 + rng.unit().abs() };
    }
    let (q, r) = vk.probe_exact(&a, &b).unwrap_or_else(|e| panic!("{e}"));
    let mut bad = 0;
    for i in 0..n {
        let (wq, wr) = (a[i] / b[i], a[i].sqrt());
        if key(q[i]) != key(wq) || key(r[i]) != key(wr) {
            if bad < 8 {
                eprintln!(
                    "f64 path {f64_path}: {:e} ({:08x}) / {:e} ({:08x}): got {:08x} want {:08x}; sqrt got {:08x} want {:08x}",
                    a[i],
                    a[i].to_bits(),
                    b[i],
                    b[i].to_bits(),
                    q[i].to_bits(),
                    wq.to_bits(),
                    r[i].to_bits(),
                    wr.to_bits()
                );
            }
            bad += 1;
        }
    }
    assert_eq!(bad, 0, "{bad} of {n} results differ (f64 path {f64_path})");
}

#[test]
fn exact_division_and_root_integer_path() {
    check(false);
}

#[test]
fn exact_division_and_root_f64_path() {
    check(true);
}

//! Latency of the exact division and square root on the device: one invocation's dependent
//! chain (as a junction tail's statistic runs it), on the integer and the f64 paths.
//! `cargo bench -p purehw-hal-vulkan --bench exact`; `PUREHW_VK_DEVICE` picks the device.

use purehw_hal_vulkan::{Vulkan, VulkanOptions};

fn main() {
    const CHAIN: u32 = 4096;
    for f64_path in [false, true] {
        let opts = VulkanOptions { exact_f64: Some(f64_path), ..VulkanOptions::from_env() };
        let mut vk = match Vulkan::new(&opts) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("no Vulkan device: {e}");
                return;
            }
        };
        match vk.exact_chain_ns(CHAIN, 5) {
            Ok(Some(ns)) => println!(
                "{}: f64 path {f64_path}: {:.1} ns per division + square root step ({CHAIN} steps)",
                vk.info().name,
                ns / CHAIN as f64
            ),
            Ok(None) => println!("no timestamps on this device"),
            Err(e) => println!("error: {e}"),
        }
    }
}

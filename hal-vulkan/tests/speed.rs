//! Temporary: Vulkan speed probe (pp512 / tg128 like llama-bench) for the lent GPU.
use purehw_core::model::{Model, ModelOptions};
use purehw_hal_vulkan::{Vulkan, VulkanOptions};

fn probe(name: &str, file: &str) {
    let m = model_file(name, file);
    let src = purehw_core::source::ModelSource::open(&m).unwrap();
    let opts = ModelOptions { ctx: 1024, slots: 1, max_batch: 512, logit_rows: 1, act: purehw_hal::ActQuant::Int8 };
    let o = VulkanOptions::from_env();
    let t = std::time::Instant::now();
    let mut model = Model::load(Vulkan::new(&o).unwrap(), &src, opts).unwrap();
    eprintln!("{name}: load {:?} on {}", t.elapsed(), model.backend().info().name);
    let prompt: Vec<u32> = (0..512).map(|i| 1000 + i * 7).collect();
    for r in 0..3 {
        let t = std::time::Instant::now();
        model.forward_argmax(0, 0, &prompt).unwrap();
        let dt = t.elapsed().as_secs_f64();
        eprintln!("{name} pp512 #{r}: {:.1} tok/s ({:?})", 512.0 / dt, model.backend().last_step_counts());
    }
    for r in 0..3 {
        let t = std::time::Instant::now();
        let mut id = 2;
        for i in 0..128 {
            id = model.forward_argmax(0, i, &[id]).unwrap();
        }
        let dt = t.elapsed().as_secs_f64();
        eprintln!("{name} tg128 #{r}: {:.1} tok/s (dispatches, barriers) {:?}", 128.0 / dt, model.backend().last_step_counts());
    }
}

/// Dispatches and barriers of one decode step (cheap: a 4-token prompt, then one token).
#[test]
#[ignore]
fn vk_counts() {
    let m = model_file("gemma3-270m", "gemma-3-270m-q4_k_m.gguf");
    let src = purehw_core::source::ModelSource::open(&m).unwrap();
    let opts = ModelOptions { ctx: 64, slots: 1, max_batch: 16, logit_rows: 1, act: purehw_hal::ActQuant::Int8 };
    let mut model = Model::load(Vulkan::new(&VulkanOptions::from_env()).unwrap(), &src, opts).unwrap();
    model.forward_argmax(0, 0, &[2, 3, 4, 5]).unwrap();
    eprintln!("prefill 4: (dispatches, barriers) {:?}", model.backend().last_step_counts());
    model.forward_argmax(0, 4, &[6]).unwrap();
    eprintln!("decode: (dispatches, barriers) {:?}", model.backend().last_step_counts());
}

#[test]
#[ignore]
fn vk_speed() {
    probe("gemma3-270m", "gemma-3-270m-q4_k_m.gguf");
    probe("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf");
}

fn model_file(name: &str, file: &str) -> std::path::PathBuf {
    let base = std::env::var_os("PUREHW_MODELS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/purehw/models"));
    base.join(name).join(file)
}

/// A few decode steps (lavapipe-sized).
#[test]
#[ignore]
fn vk_tg8() {
    for (name, file) in [("gemma3-270m", "gemma-3-270m-q4_k_m.gguf"), ("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf")] {
        let m = model_file(name, file);
        let src = purehw_core::source::ModelSource::open(&m).unwrap();
        let opts = ModelOptions { ctx: 64, slots: 1, max_batch: 16, logit_rows: 1, act: purehw_hal::ActQuant::Int8 };
        let mut model = Model::load(Vulkan::new(&VulkanOptions::from_env()).unwrap(), &src, opts).unwrap();
        let t = std::time::Instant::now();
        model.forward_argmax(0, 0, &[2, 3, 4, 5]).unwrap();
        eprintln!("{name} prefill 4: {:?}", t.elapsed());
        let t = std::time::Instant::now();
        let mut id = 6;
        for i in 0..8 {
            id = model.forward_argmax(0, 4 + i, &[id]).unwrap();
        }
        eprintln!("{name} decode: {:?} per token", t.elapsed() / 8);
    }
}

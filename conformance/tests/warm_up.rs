//! `Model::warm_up` (what a server on a GPU runs before serving): afterwards every slot computes
//! what a fresh model computes, bit for bit, though the warm-up wrote K/V into their first
//! positions.

use purehw_conformance::{matrix, model_file};
use purehw_core::model::{Model, ModelOptions};
use purehw_core::source::ModelSource;
use purehw_hal::KvType;
use purehw_hal::{ActQuant, Backend};

/// Prefill a prompt in `slot`, then decode a few tokens greedily; every step's logits.
fn run<B: Backend>(m: &mut Model<B>, slot: usize) -> Vec<Vec<f32>> {
    let vocab = m.config().vocab as u32;
    let prompt = [1u32, 415, 5279, 302, 4843, 349, 264, 1486].map(|t| t % vocab);
    let mut out = vec![m.forward(slot, 0, &prompt).unwrap_or_else(|e| panic!("{e}")).to_vec()];
    for i in 0..3 {
        let id = purehw_conformance::argmax(out.last().expect("a step")) as u32;
        out.push(m.forward(slot, prompt.len() + i, &[id]).unwrap_or_else(|e| panic!("{e}")).to_vec());
    }
    out
}

#[test]
fn warmed_up_slots_compute_as_fresh_ones() {
    let src = ModelSource::open(&model_file("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf"))
        .unwrap_or_else(|e| panic!("{e}"));
    // Five slots: batches of 1, 2, 4 and 5, and a prompt chunk of 64.
    let o = ModelOptions {
        ctx: 128,
        slots: 5,
        max_batch: 80,
        logit_rows: 5,
        act: ActQuant::Int8,
        swa_ring: true,
        kv: KvType::F32,
    };
    let mut fresh = Model::load(matrix::cpu(2), &src, o).unwrap_or_else(|e| panic!("{e}"));
    let mut warm = Model::load(matrix::cpu(2), &src, o).unwrap_or_else(|e| panic!("{e}"));
    warm.warm_up().unwrap_or_else(|e| panic!("{e}"));
    for slot in [0, 4] {
        let (a, b) = (run(&mut fresh, slot), run(&mut warm, slot));
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "slot {slot}, step {i}");
        }
    }
}

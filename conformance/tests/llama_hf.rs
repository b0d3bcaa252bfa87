//! The Llama path through an HF-layout checkpoint: SmolLM2's GGUF weights written out as an f32
//! safetensors checkpoint in HF layout (Q/K rows un-permuted back from llama.cpp's order, HF
//! tensor names, `config.json`), which must reproduce the SmolLM2 goldens with RoPE in HF's
//! `rotate_half` form. Checks the HF naming (Llama's `post_attention_layernorm` is the MLP
//! pre-norm) and that the GGUF's interleaved RoPE equals HF's on un-permuted weights.

use std::path::PathBuf;

use purehw_conformance::{golden, model_file};
use purehw_core::source::Role;
use purehw_hal_cpu_ref::CpuRef;
use purehw_kernels::quant::dequantize_row;
use serde_json::{Value, json};

/// Undo llama.cpp's `permute` of Q/K rows: HF row `h·d + s·d/2 + i` is GGUF row `h·d + 2i + s`.
fn unpermute(rows: &[Vec<f32>], heads: usize) -> Vec<Vec<f32>> {
    let d = rows.len() / heads;
    let mut out = rows.to_vec();
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..d / 2 {
                out[h * d + s * d / 2 + i] = rows[h * d + 2 * i + s].clone();
            }
        }
    }
    out
}

#[test]
fn smollm2_as_hf_checkpoint() {
    let gguf = model_file("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf");
    let src = golden::open(&gguf);
    let c = src.config.clone();
    let rows_of = |role: Role, layer: Option<usize>| -> Vec<Vec<f32>> {
        let w = src.weight(role, layer).unwrap().unwrap_or_else(|| panic!("{role:?} missing"));
        (0..w.rows)
            .map(|r| {
                let mut v = vec![0f32; w.cols];
                dequantize_row(w.format, w.row(r), &mut v);
                v
            })
            .collect()
    };

    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut put = |name: String, rows: Vec<Vec<f32>>| {
        let shape = if rows.len() == 1 { vec![rows[0].len()] } else { vec![rows.len(), rows[0].len()] };
        tensors.push((name, shape, rows.concat()));
    };
    put("model.embed_tokens.weight".into(), rows_of(Role::TokenEmbd, None));
    put("model.norm.weight".into(), rows_of(Role::OutputNorm, None));
    for l in 0..c.layers {
        let p = format!("model.layers.{l}.");
        let li = Some(l);
        put(format!("{p}input_layernorm.weight"), rows_of(Role::AttnNorm, li));
        put(format!("{p}self_attn.q_proj.weight"), unpermute(&rows_of(Role::AttnQ, li), c.heads));
        put(format!("{p}self_attn.k_proj.weight"), unpermute(&rows_of(Role::AttnK, li), c.kv_heads));
        put(format!("{p}self_attn.v_proj.weight"), rows_of(Role::AttnV, li));
        put(format!("{p}self_attn.o_proj.weight"), rows_of(Role::AttnOut, li));
        put(format!("{p}post_attention_layernorm.weight"), rows_of(Role::FfnNorm, li));
        put(format!("{p}mlp.gate_proj.weight"), rows_of(Role::FfnGate, li));
        put(format!("{p}mlp.up_proj.weight"), rows_of(Role::FfnUp, li));
        put(format!("{p}mlp.down_proj.weight"), rows_of(Role::FfnDown, li));
    }

    let dir: PathBuf = std::env::temp_dir().join(format!("purehw-llama-hf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut header = serde_json::Map::new();
    let mut off = 0;
    for (name, shape, data) in &tensors {
        header
            .insert(name.clone(), json!({"dtype": "F32", "shape": shape, "data_offsets": [off, off + 4 * data.len()]}));
        off += 4 * data.len();
    }
    let h = serde_json::to_vec(&Value::Object(header)).unwrap();
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    for (_, _, data) in &tensors {
        file.extend(data.iter().flat_map(|x| x.to_le_bytes()));
    }
    std::fs::write(dir.join("model.safetensors"), file).unwrap();
    drop(tensors);

    let cfg = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.hidden,
        "intermediate_size": c.ffn,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.eps,
        "rope_theta": c.rope_full.theta,
        "vocab_size": c.vocab,
        "max_position_embeddings": c.max_ctx,
        "tie_word_embeddings": c.tied_embeddings,
        "bos_token_id": c.bos,
        "eos_token_id": c.eos,
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();

    let hf = golden::open(&dir);
    assert_eq!(hf.config.rope_mode, purehw_hal::RopeMode::Neox, "HF Llama checkpoints use rotate_half");
    golden::check_gguf_golden("smollm2-135m", &dir, 1e-6, CpuRef::new);
    let _ = std::fs::remove_dir_all(&dir);
}

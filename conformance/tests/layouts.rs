//! The tiny Gemma 3 checkpoint rewritten in the other layouts found in the wild must give the
//! same golden logits: transformers 4.x config keys, the multimodal layout (text config nested
//! under `text_config`, `language_model.` tensor prefixes, vision tensors beside them), f32
//! weights, and sharded files with `model.safetensors.index.json`.

use std::path::{Path, PathBuf};

use purehw_conformance::{fixture, golden, read_json};
use purehw_core::safetensors;
use purehw_hal_cpu_ref::CpuRef;
use serde_json::{Value, json};

struct Tensor {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// The fixture's tensors (bf16) by name.
fn tiny_tensors() -> Vec<Tensor> {
    let bytes = std::fs::read(fixture("tiny-gemma3/model.safetensors")).unwrap();
    let h = safetensors::parse(&bytes).unwrap();
    h.tensors
        .iter()
        .map(|t| Tensor {
            name: t.name.clone(),
            dtype: "BF16",
            shape: t.shape.clone(),
            data: bytes[t.range.clone()].to_vec(),
        })
        .collect()
}

/// bf16 → f32 is exact.
fn to_f32(t: &mut Tensor) {
    t.data = t
        .data
        .chunks_exact(2)
        .flat_map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16).to_le_bytes())
        .collect();
    t.dtype = "F32";
}

fn write_safetensors(path: &Path, tensors: &[&Tensor]) {
    let mut header = serde_json::Map::new();
    let mut off = 0;
    for t in tensors {
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + t.data.len()]}),
        );
        off += t.data.len();
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    for t in tensors {
        out.extend_from_slice(&t.data);
    }
    std::fs::write(path, out).unwrap();
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("purehw-layouts-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The 5.x text config rewritten with 4.x keys (`rope_theta`, `rope_local_base_freq`,
/// `sliding_window_pattern`, no `layer_types` / `rope_parameters`).
fn config_4x() -> Value {
    let mut c = read_json(&fixture("tiny-gemma3/config.json"));
    let o = c.as_object_mut().unwrap();
    let rp = o.remove("rope_parameters").unwrap();
    o.remove("layer_types");
    let pattern = o.remove("_sliding_window_pattern").unwrap();
    o.insert("rope_theta".into(), rp["full_attention"]["rope_theta"].clone());
    o.insert("rope_local_base_freq".into(), rp["sliding_attention"]["rope_theta"].clone());
    o.insert("rope_scaling".into(), Value::Null);
    o.insert("sliding_window_pattern".into(), pattern);
    o.insert("transformers_version".into(), json!("4.53.0"));
    c
}

#[test]
fn multimodal_4x_f32_layout() {
    let dir = temp_dir("mm4x");
    let mut text = config_4x();
    text["model_type"] = json!("gemma3_text");
    let cfg = json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8},
        "mm_tokens_per_image": 256,
        "transformers_version": "4.53.0",
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let mut tensors = tiny_tensors();
    for t in &mut tensors {
        t.name = t.name.replacen("model.", "language_model.model.", 1);
        to_f32(t);
    }
    // A vision tensor the text model must ignore.
    tensors.push(Tensor {
        name: "vision_tower.vision_model.embeddings.patch_embedding.weight".into(),
        dtype: "F32",
        shape: vec![2, 3],
        data: vec![0; 24],
    });
    write_safetensors(&dir.join("model.safetensors"), &tensors.iter().collect::<Vec<_>>());
    golden::check_hf_golden_at(&dir, &fixture("tiny-gemma3"), 1e-8, CpuRef::new);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sharded_5x_multimodal_names() {
    let dir = temp_dir("shard5x");
    let text = read_json(&fixture("tiny-gemma3/config.json"));
    let cfg = json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text,
        "transformers_version": "5.24.0",
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let mut tensors = tiny_tensors();
    for t in &mut tensors {
        t.name = t.name.replacen("model.", "model.language_model.", 1);
    }
    let (a, b) = tensors.split_at(tensors.len() / 2);
    let shards = [("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)];
    let mut map = serde_json::Map::new();
    for (file, part) in shards {
        write_safetensors(&dir.join(file), &part.iter().collect::<Vec<_>>());
        for t in part {
            map.insert(t.name.clone(), json!(file));
        }
    }
    let index = json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    golden::check_hf_golden_at(&dir, &fixture("tiny-gemma3"), 1e-8, CpuRef::new);
    let _ = std::fs::remove_dir_all(&dir);
}

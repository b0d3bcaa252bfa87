//! HF checkpoints: tiny-gemma3 (transformers 5.x config), the same config in 4.x and multimodal
//! shapes, Llama configs, multimodal tensor prefixes and a sharded copy of tiny-gemma3.

mod source_common;

use purehw_core::Error;
use purehw_core::config::{Arch, LayerKind, ModelConfig, Rope};
use purehw_core::hal::{Format, RopeMode};
use purehw_core::source::{ModelSource, Role, SourceKind};
use serde_json::{Value, json};
use source_common::*;

fn tiny_json() -> Value {
    serde_json::from_str(&tiny_config_json()).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}
fn u(v: &Value) -> usize {
    v.as_u64().unwrap() as usize
}

/// Every field of a parsed 5.x Gemma 3 config against the JSON it came from.
fn check_against_json(c: &ModelConfig, j: &Value) {
    assert_eq!(c.arch, Arch::Gemma3);
    assert_eq!(c.vocab, u(&j["vocab_size"]));
    assert_eq!(c.hidden, u(&j["hidden_size"]));
    assert_eq!(c.layers, u(&j["num_hidden_layers"]));
    assert_eq!(c.heads, u(&j["num_attention_heads"]));
    assert_eq!(c.kv_heads, u(&j["num_key_value_heads"]));
    assert_eq!(c.head_dim, u(&j["head_dim"]));
    assert_eq!(c.ffn, u(&j["intermediate_size"]));
    assert_eq!(c.eps, f(&j["rms_norm_eps"]) as f32);
    assert_eq!(c.max_ctx, u(&j["max_position_embeddings"]));
    let rp = &j["rope_parameters"];
    assert_eq!(c.rope_full, Rope { theta: f(&rp["full_attention"]["rope_theta"]) as f32, scale: 1.0 });
    assert_eq!(c.rope_local, Rope { theta: f(&rp["sliding_attention"]["rope_theta"]) as f32, scale: 1.0 });
    assert_eq!(c.rope_mode, RopeMode::Neox);
    let kinds: Vec<LayerKind> = j["layer_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| match t.as_str().unwrap() {
            "full_attention" => LayerKind::Full,
            "sliding_attention" => LayerKind::Sliding,
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(c.layer_kinds, kinds);
    assert_eq!(c.sliding_window, u(&j["sliding_window"]));
    assert_eq!(c.attn_scale, f(&j["query_pre_attn_scalar"]).powf(-0.5) as f32);
    assert_eq!(c.attn_softcap, j["attn_logit_softcapping"].as_f64().unwrap_or(0.0) as f32);
    assert_eq!(c.final_softcap, j["final_logit_softcapping"].as_f64().unwrap_or(0.0) as f32);
    assert_eq!(c.embed_scale, (c.hidden as f64).sqrt() as f32);
    assert!(c.norm_add_one);
    assert_eq!(c.tied_embeddings, j["tie_word_embeddings"].as_bool().unwrap());
    assert_eq!(c.bos, Some(j["bos_token_id"].as_u64().unwrap() as u32));
    assert_eq!(c.eos, vec![j["eos_token_id"].as_u64().unwrap() as u32]);
    assert!(c.add_bos);
}

#[test]
fn tiny_gemma3_config_matches_json() {
    let c = ModelConfig::from_hf_json("tiny/config.json", &tiny_config_json()).unwrap();
    check_against_json(&c, &tiny_json());
}

#[test]
fn tiny_gemma3_open_and_weights() {
    let s = ModelSource::open(&tiny_dir()).unwrap();
    assert_eq!(s.kind, SourceKind::Safetensors);
    check_against_json(&s.config, &tiny_json());
    assert_eq!(s.dir(), Some(tiny_dir().as_path()));
    assert!(s.gguf().is_none());

    let raw = read_raw(&tiny_bytes());
    let summary = s.tensors();
    assert_eq!(summary.len(), raw.len());
    for r in &raw {
        let t = summary.iter().find(|t| t.name == r.name).unwrap();
        assert_eq!((t.dtype.as_str(), &t.shape, t.bytes), (r.dtype.as_str(), &r.shape, r.data.len()));
    }

    let c = &s.config;
    let want = |role: Role| -> (usize, usize) {
        let (q, kv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        match role {
            Role::TokenEmbd | Role::Output => (c.vocab, c.hidden),
            Role::AttnQ => (q, c.hidden),
            Role::AttnK | Role::AttnV => (kv, c.hidden),
            Role::AttnOut => (c.hidden, q),
            Role::AttnQNorm | Role::AttnKNorm => (1, c.head_dim),
            Role::FfnGate | Role::FfnUp => (c.ffn, c.hidden),
            Role::FfnDown => (c.hidden, c.ffn),
            _ => (1, c.hidden),
        }
    };
    let hf = |role: Role, l: usize| -> &str {
        let _ = l;
        match role {
            Role::TokenEmbd => "embed_tokens",
            Role::OutputNorm => "norm",
            Role::AttnNorm => "input_layernorm",
            Role::AttnQ => "self_attn.q_proj",
            Role::AttnK => "self_attn.k_proj",
            Role::AttnV => "self_attn.v_proj",
            Role::AttnOut => "self_attn.o_proj",
            Role::AttnQNorm => "self_attn.q_norm",
            Role::AttnKNorm => "self_attn.k_norm",
            Role::PostAttnNorm => "post_attention_layernorm",
            Role::FfnNorm => "pre_feedforward_layernorm",
            Role::PostFfnNorm => "post_feedforward_layernorm",
            Role::FfnGate => "mlp.gate_proj",
            Role::FfnUp => "mlp.up_proj",
            Role::FfnDown => "mlp.down_proj",
            Role::Output => unreachable!(),
        }
    };
    for role in Role::ALL {
        let layers: Vec<Option<usize>> = if role.per_layer() { (0..c.layers).map(Some).collect() } else { vec![None] };
        for l in layers {
            let w = s.weight(role, l).unwrap();
            if role == Role::Output {
                assert!(w.is_none(), "tied model has no separate output");
                continue;
            }
            let w = w.unwrap_or_else(|| panic!("{role:?} {l:?}"));
            let name = match l {
                Some(l) => format!("model.layers.{l}.{}.weight", hf(role, l)),
                None => format!("model.{}.weight", hf(role, 0)),
            };
            let r = raw.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(w.format, Format::BF16);
            assert_eq!((w.rows, w.cols), want(role), "{name}");
            assert_eq!(w.data.as_slice(), &r.data[..], "{name}");
        }
    }
    // Bad layer arguments are caller errors, not format errors.
    assert!(matches!(s.weight(Role::AttnQ, None), Err(Error::Invalid(_))));
    assert!(matches!(s.weight(Role::AttnQ, Some(c.layers)), Err(Error::Invalid(_))));
    assert!(matches!(s.weight(Role::TokenEmbd, Some(0)), Err(Error::Invalid(_))));
}

/// The 5.x config rewritten the way transformers 4.x wrote it.
fn as_4x(pattern_key: &str) -> Value {
    let mut j = tiny_json();
    let o = j.as_object_mut().unwrap();
    let rp = o.remove("rope_parameters").unwrap();
    o.remove("layer_types");
    o.remove("_sliding_window_pattern");
    o.insert("rope_theta".into(), rp["full_attention"]["rope_theta"].clone());
    o.insert("rope_local_base_freq".into(), rp["sliding_attention"]["rope_theta"].clone());
    o.insert(pattern_key.into(), json!(6));
    o.insert("rope_scaling".into(), Value::Null);
    o.insert("transformers_version".into(), json!("4.50.0"));
    j
}

#[test]
fn gemma3_4x_config_equals_5x() {
    let c5 = ModelConfig::from_hf_json("c5", &tiny_config_json()).unwrap();
    for key in ["sliding_window_pattern", "_sliding_window_pattern"] {
        let c4 = ModelConfig::from_hf_json("c4", &as_4x(key).to_string()).unwrap();
        assert_eq!(c4, c5, "{key}");
    }
    // No pattern at all: transformers' default of 6.
    let mut j = as_4x("sliding_window_pattern");
    j.as_object_mut().unwrap().remove("sliding_window_pattern");
    j.as_object_mut().unwrap().remove("rope_local_base_freq");
    let c = ModelConfig::from_hf_json("c4", &j.to_string()).unwrap();
    assert_eq!(c.layer_kinds, c5.layer_kinds);
    assert_eq!(c.rope_local.theta, 10_000.0);
}

#[test]
fn gemma3_4x_pattern_and_linear_scaling() {
    let mut j = as_4x("sliding_window_pattern");
    j["sliding_window_pattern"] = json!(2);
    j["rope_scaling"] = json!({"rope_type": "linear", "factor": 8.0});
    let c = ModelConfig::from_hf_json("c4", &j.to_string()).unwrap();
    use LayerKind::*;
    assert_eq!(c.layer_kinds, vec![Sliding, Full, Sliding, Full, Sliding, Full]);
    assert_eq!(c.rope_full, Rope { theta: 1_000_000.0, scale: 8.0 });
    assert_eq!(c.rope_local, Rope { theta: 10_000.0, scale: 1.0 }, "4.x scaling is for global layers only");

    // The older `type` spelling.
    j["rope_scaling"] = json!({"type": "linear", "factor": 4});
    assert_eq!(ModelConfig::from_hf_json("c4", &j.to_string()).unwrap().rope_full.scale, 4.0);

    for bad in [json!({"rope_type": "yarn", "factor": 8.0}), json!({"rope_type": "linear"})] {
        j["rope_scaling"] = bad;
        let e = ModelConfig::from_hf_json("x/config.json", &j.to_string()).unwrap_err().to_string();
        assert!(e.contains("x/config.json") && e.contains("rope_scaling"), "{e}");
    }
}

#[test]
fn gemma3_5x_linear_rope_parameters() {
    let mut j = tiny_json();
    j["rope_parameters"]["full_attention"] = json!({"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6});
    let c = ModelConfig::from_hf_json("c", &j.to_string()).unwrap();
    assert_eq!(c.rope_full, Rope { theta: 1e6, scale: 8.0 });
    assert_eq!(c.rope_local, Rope { theta: 1e4, scale: 1.0 });

    j["rope_parameters"]["full_attention"] = json!({"rope_type": "dynamic", "factor": 8.0, "rope_theta": 1e6});
    let e = ModelConfig::from_hf_json("c/config.json", &j.to_string()).unwrap_err().to_string();
    assert!(e.contains("c/config.json") && e.contains("dynamic"), "{e}");

    let mut j = tiny_json();
    j["rope_parameters"].as_object_mut().unwrap().remove("sliding_attention");
    let e = ModelConfig::from_hf_json("c/config.json", &j.to_string()).unwrap_err().to_string();
    assert!(e.contains("rope_parameters.sliding_attention"), "{e}");
}

/// The 5.x text config nested under `text_config` of a multimodal `gemma3` config.
fn as_multimodal(text: Value, top_eos: Option<Value>) -> Value {
    let mut j = json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "boi_token_index": 255999,
        "eoi_token_index": 256000,
        "image_token_index": 262144,
        "mm_tokens_per_image": 256,
        "text_config": text,
        "vision_config": {"hidden_size": 1152, "model_type": "siglip_vision_model", "patch_size": 14},
    });
    if let Some(e) = top_eos {
        j["eos_token_id"] = e;
    }
    j
}

#[test]
fn gemma3_multimodal_nested_config() {
    let c5 = ModelConfig::from_hf_json("c5", &tiny_config_json()).unwrap();
    let mut text = tiny_json();
    text["model_type"] = json!("gemma3_text");
    let c = ModelConfig::from_hf_json("mm", &as_multimodal(text.clone(), None).to_string()).unwrap();
    assert_eq!(ModelConfig { name: c5.name.clone(), ..c.clone() }, c5);

    // Top-level eos list wins (the -it models stop at <end_of_turn> too).
    let c = ModelConfig::from_hf_json("mm", &as_multimodal(text, Some(json!([1, 3]))).to_string()).unwrap();
    assert_eq!(c.eos, vec![1, 3]);

    // A gemma-3-4b-style text_config lists only a few fields; the rest are Gemma3TextConfig defaults.
    let sparse = json!({
        "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024
    });
    let c = ModelConfig::from_hf_json("mm", &as_multimodal(sparse, Some(json!([1, 106]))).to_string()).unwrap();
    assert_eq!((c.hidden, c.ffn, c.layers, c.sliding_window), (2560, 10240, 34, 1024));
    assert_eq!((c.vocab, c.heads, c.kv_heads, c.head_dim, c.max_ctx), (262_208, 8, 4, 256, 131_072));
    assert_eq!(c.rope_full, Rope { theta: 1e6, scale: 8.0 });
    assert_eq!(c.rope_local, Rope { theta: 1e4, scale: 1.0 });
    assert_eq!(c.attn_scale, (256f64).powf(-0.5) as f32);
    assert_eq!(c.embed_scale, (2560f64).sqrt() as f32);
    assert_eq!((c.bos, c.eos.clone(), c.tied_embeddings, c.eps), (Some(2), vec![1, 106], true, 1e-6));
    let full: Vec<usize> = (0..c.layers).filter(|&i| c.layer_kinds[i] == LayerKind::Full).collect();
    assert_eq!(full, vec![5, 11, 17, 23, 29]);

    let e = ModelConfig::from_hf_json("mm/config.json", &json!({"model_type": "gemma3"}).to_string())
        .unwrap_err()
        .to_string();
    assert!(e.contains("mm/config.json") && e.contains("text_config"), "{e}");
}

/// SmolLM2-135M-Instruct's config.json (HF layout).
fn smollm2_json() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
        "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "max_position_embeddings": 8192,
        "mlp_bias": false, "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
        "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": null, "rope_theta": 100000, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
        "transformers_version": "4.42.3", "use_cache": true, "vocab_size": 49152
    })
}

#[test]
fn llama_config() {
    let c = ModelConfig::from_hf_json("smol", &smollm2_json().to_string()).unwrap();
    assert_eq!(c.arch, Arch::Llama);
    assert_eq!((c.vocab, c.hidden, c.layers, c.heads, c.kv_heads, c.head_dim, c.ffn), (49152, 576, 30, 9, 3, 64, 1536));
    assert_eq!((c.eps, c.max_ctx), (1e-5, 8192));
    assert_eq!(c.rope_full, Rope { theta: 100_000.0, scale: 1.0 });
    assert_eq!(c.rope_local, c.rope_full);
    assert_eq!(c.rope_mode, RopeMode::Neox);
    assert_eq!(c.layer_kinds, vec![LayerKind::Full; 30]);
    assert_eq!((c.sliding_window, c.attn_softcap, c.final_softcap, c.embed_scale), (0, 0.0, 0.0, 1.0));
    assert_eq!(c.attn_scale, (64f64).powf(-0.5) as f32);
    assert!(!c.norm_add_one && c.tied_embeddings);
    assert_eq!((c.bos, c.eos.clone()), (Some(1), vec![2]));

    // 5.x style rope_parameters, explicit head_dim, eos list, no tie.
    let mut j = smollm2_json();
    let o = j.as_object_mut().unwrap();
    o.remove("rope_theta");
    o.remove("rope_scaling");
    o.remove("tie_word_embeddings");
    o.insert("rope_parameters".into(), json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}));
    o.insert("head_dim".into(), json!(128));
    o.insert("eos_token_id".into(), json!([2, 0]));
    let c = ModelConfig::from_hf_json("smol", &j.to_string()).unwrap();
    assert_eq!(c.rope_full, Rope { theta: 500_000.0, scale: 2.0 });
    assert_eq!((c.head_dim, c.eos.clone(), c.tied_embeddings), (128, vec![2, 0], false));

    // Mistral v0.1: every layer slides.
    let mut j = smollm2_json();
    j["model_type"] = json!("mistral");
    j["sliding_window"] = json!(4096);
    let c = ModelConfig::from_hf_json("m", &j.to_string()).unwrap();
    assert_eq!((c.sliding_window, c.layer_kinds[0]), (4096, LayerKind::Sliding));
    j["sliding_window"] = Value::Null;
    let c = ModelConfig::from_hf_json("m", &j.to_string()).unwrap();
    assert_eq!((c.sliding_window, c.layer_kinds[0]), (0, LayerKind::Full));

    let cases = [
        ("rope_scaling", json!({"rope_type": "llama3", "factor": 8.0}), "llama3"),
        ("rope_scaling", json!({"rope_type": "yarn", "factor": 4.0}), "yarn"),
        ("model_type", json!("qwen2"), "qwen2"),
        ("hidden_act", json!("gelu"), "gelu"),
        ("attention_bias", json!(true), "attention_bias"),
        ("num_attention_heads", json!(4), "multiple"),
        ("eos_token_id", json!(60000), "vocabulary"),
        ("vocab_size", json!("big"), "vocab_size"),
    ];
    for (k, v, want) in cases {
        let mut j = smollm2_json();
        j[k] = v;
        let e = ModelConfig::from_hf_json("smol/config.json", &j.to_string()).unwrap_err().to_string();
        assert!(e.starts_with("smol/config.json: ") && e.contains(want), "{k}: {e}");
    }
}

#[test]
fn missing_fields_name_field_and_file() {
    for key in [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "intermediate_size",
        "head_dim",
        "num_key_value_heads",
    ] {
        let mut j = tiny_json();
        j.as_object_mut().unwrap().remove(key);
        let e = ModelConfig::from_hf_json("tiny/config.json", &j.to_string()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Format { .. }));
        assert!(msg.contains("tiny/config.json") && msg.contains(key), "{msg}");
    }
    for key in ["hidden_size", "vocab_size", "num_hidden_layers"] {
        let mut j = smollm2_json();
        j.as_object_mut().unwrap().remove(key);
        let msg = ModelConfig::from_hf_json("smol/config.json", &j.to_string()).unwrap_err().to_string();
        assert!(msg.contains("smol/config.json") && msg.contains(key), "{msg}");
    }
    let msg = ModelConfig::from_hf_json("a/config.json", "{not json").unwrap_err().to_string();
    assert!(msg.contains("a/config.json") && msg.contains("JSON"), "{msg}");
    let msg = ModelConfig::from_hf_json("a/config.json", "[1, 2]").unwrap_err().to_string();
    assert!(msg.contains("a/config.json"), "{msg}");
    let mut j = tiny_json();
    j["layer_types"].as_array_mut().unwrap().pop();
    let msg = ModelConfig::from_hf_json("a/config.json", &j.to_string()).unwrap_err().to_string();
    assert!(msg.contains("layer_types"), "{msg}");
}

/// Tiny-gemma3's tensors renamed with `prefix` in place of `model.`, plus a vision tensor.
fn renamed(prefix: &str, lm_head: Option<&str>) -> Vec<u8> {
    let mut raw = read_raw(&tiny_bytes());
    for r in &mut raw {
        r.name = format!("{prefix}{}", r.name.strip_prefix("model.").unwrap());
    }
    raw.push(Raw {
        name: "model.vision_tower.patch.weight".into(),
        dtype: "F32".into(),
        shape: vec![2, 2],
        data: vec![0; 16],
    });
    if let Some(h) = lm_head {
        let e = raw.iter().find(|r| r.name.ends_with("embed_tokens.weight")).unwrap().clone();
        raw.push(Raw { name: h.into(), ..e });
    }
    write_raw(&raw)
}

#[test]
fn multimodal_prefixes() {
    let base = ModelSource::open(&tiny_dir()).unwrap();
    let mut text = tiny_json();
    text["model_type"] = json!("gemma3_text");
    let mm_cfg = as_multimodal(text, None).to_string();
    for prefix in ["model.language_model.", "language_model.model."] {
        let s = ModelSource::from_safetensors(
            "mm",
            &mm_cfg,
            vec![("model.safetensors".into(), shared(renamed(prefix, None)))],
        )
        .unwrap();
        for role in Role::ALL {
            let l = role.per_layer().then_some(3);
            let (a, b) = (base.weight(role, l).unwrap(), s.weight(role, l).unwrap());
            assert_eq!(
                a.map(|w| w.data.as_slice().to_vec()),
                b.map(|w| w.data.as_slice().to_vec()),
                "{prefix} {role:?}"
            );
        }
        assert!(s.tensors().iter().any(|t| t.name.contains("vision_tower")));
    }
    // Untied: lm_head under the multimodal prefix.
    let mut text = tiny_json();
    text["tie_word_embeddings"] = json!(false);
    let cfg = as_multimodal(text, None).to_string();
    let s = ModelSource::from_safetensors(
        "mm",
        &cfg,
        vec![(
            "model.safetensors".into(),
            shared(renamed("language_model.model.", Some("language_model.lm_head.weight"))),
        )],
    )
    .unwrap();
    let out = s.weight(Role::Output, None).unwrap().unwrap();
    assert_eq!(out.data.as_slice(), base.weight(Role::TokenEmbd, None).unwrap().unwrap().data.as_slice());
    // Untied but no lm_head: an error naming it.
    let s = ModelSource::from_safetensors(
        "mm",
        &cfg,
        vec![("model.safetensors".into(), shared(renamed("model.language_model.", None)))],
    )
    .unwrap();
    let e = s.weight(Role::Output, None).unwrap_err().to_string();
    assert!(e.contains("lm_head.weight") && e.contains("missing"), "{e}");
}

#[test]
fn llama_layout_role_mapping() {
    // A tiny Llama: hidden 8, 2 heads of 4, 1 KV head, ffn 12, vocab 16, 1 layer, untied.
    let cfg = json!({
        "model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2
    })
    .to_string();
    let mut k = 0u8;
    let mut t = |name: &str, shape: &[usize]| {
        k += 1;
        let n: usize = shape.iter().product();
        Raw { name: name.into(), dtype: "F32".into(), shape: shape.to_vec(), data: vec![k; n * 4] }
    };
    let raw = vec![
        t("model.embed_tokens.weight", &[16, 8]),
        t("lm_head.weight", &[16, 8]),
        t("model.norm.weight", &[8]),
        t("model.layers.0.input_layernorm.weight", &[8]),
        t("model.layers.0.post_attention_layernorm.weight", &[8]),
        t("model.layers.0.self_attn.q_proj.weight", &[8, 8]),
        t("model.layers.0.self_attn.k_proj.weight", &[4, 8]),
        t("model.layers.0.self_attn.v_proj.weight", &[4, 8]),
        t("model.layers.0.self_attn.o_proj.weight", &[8, 8]),
        t("model.layers.0.mlp.gate_proj.weight", &[12, 8]),
        t("model.layers.0.mlp.up_proj.weight", &[12, 8]),
        t("model.layers.0.mlp.down_proj.weight", &[8, 12]),
    ];
    let s =
        ModelSource::from_safetensors("ll", &cfg, vec![("model.safetensors".into(), shared(write_raw(&raw)))]).unwrap();
    let byte = |role: Role| {
        let l = role.per_layer().then_some(0);
        s.weight(role, l).unwrap().map(|w| {
            assert_eq!(w.format, Format::F32);
            w.data.as_slice()[0]
        })
    };
    assert_eq!(byte(Role::FfnNorm), Some(5), "Llama's post_attention_layernorm is the MLP's input norm");
    assert_eq!(byte(Role::Output), Some(2));
    assert_eq!(byte(Role::FfnDown), Some(12));
    for role in [Role::AttnQNorm, Role::AttnKNorm, Role::PostAttnNorm, Role::PostFfnNorm] {
        assert_eq!(byte(role), None, "{role:?}");
    }
}

#[test]
fn sharded_checkpoint_matches_single_file() {
    let single = ModelSource::open(&tiny_dir()).unwrap();
    let raw = read_raw(&tiny_bytes());
    let (a, b): (Vec<Raw>, Vec<Raw>) = raw.iter().cloned().partition(|r| {
        r.name.starts_with("model.embed")
            || r.name.contains("layers.0.")
            || r.name.contains("layers.1.")
            || r.name.contains("layers.2.")
    });
    assert!(!a.is_empty() && !b.is_empty());
    let dir = TempDir::new("sharded");
    let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    std::fs::write(dir.path().join(names[0]), write_raw(&a)).unwrap();
    std::fs::write(dir.path().join(names[1]), write_raw(&b)).unwrap();
    let mut wm = serde_json::Map::new();
    for (shard, part) in names.iter().zip([&a, &b]) {
        for r in part.iter() {
            wm.insert(r.name.clone(), json!(shard));
        }
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": wm});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::write(dir.path().join("config.json"), tiny_config_json()).unwrap();

    let s = ModelSource::open(dir.path()).unwrap();
    assert_eq!(s.config, single.config);
    assert_eq!(s.tensors().len(), single.tensors().len());
    let c = &s.config;
    for role in Role::ALL {
        let layers: Vec<Option<usize>> = if role.per_layer() { (0..c.layers).map(Some).collect() } else { vec![None] };
        for l in layers {
            let (x, y) = (single.weight(role, l).unwrap(), s.weight(role, l).unwrap());
            match (x, y) {
                (None, None) => {}
                (Some(x), Some(y)) => {
                    assert_eq!((x.format, x.rows, x.cols), (y.format, y.rows, y.cols));
                    assert_eq!(x.data.as_slice(), y.data.as_slice(), "{role:?} {l:?}");
                }
                other => panic!("{role:?} {l:?}: {other:?}"),
            }
        }
    }

    // Missing shard: an error naming it.
    std::fs::remove_file(dir.path().join(names[1])).unwrap();
    let e = ModelSource::open(dir.path()).err().unwrap().to_string();
    assert!(e.contains(names[1]) && e.contains("missing"), "{e}");
}

#[test]
fn hf_side_files() {
    // generation_config eos, tokenizer_config add_bos + chat template.
    let dir = TempDir::new("side");
    std::fs::write(dir.path().join("config.json"), tiny_config_json()).unwrap();
    std::fs::copy(tiny_dir().join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": [1, 7]}"#).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"add_bos_token": false, "chat_template": "{{ x }}"}"#)
        .unwrap();
    let s = ModelSource::open(dir.path()).unwrap();
    assert_eq!(s.config.eos, vec![1, 7]);
    assert!(!s.config.add_bos);
    assert_eq!(s.chat_template().as_deref(), Some("{{ x }}"));
    // A single .safetensors path opens with its folder's config.
    let s = ModelSource::open(&dir.path().join("model.safetensors")).unwrap();
    assert_eq!(s.config.eos, vec![1, 7]);
}

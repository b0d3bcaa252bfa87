//! GGUF sources: the real Gemma 3 270M and SmolLM2-135M files (a missing one fails the test), and
//! `ModelConfig::from_gguf` on hand-built metadata.

mod source_common;

use purehw_core::config::{Arch, LayerKind, ModelConfig, Rope};
use purehw_core::gguf::{Array, GgufFile, TensorInfo, Value};
use purehw_core::hal::{Format, RopeMode};
use purehw_core::source::{ModelSource, Role, SourceKind};
use source_common::*;

fn first_input_id(model: &str) -> u32 {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join(model).join("cases.json")).unwrap()).unwrap();
    cases["cases"][0]["input_ids"][0].as_u64().unwrap() as u32
}

/// Every role of every layer loads with the shape the config implies.
fn check_all_weights(s: &ModelSource) {
    let c = &s.config;
    for role in Role::ALL {
        let layers: Vec<Option<usize>> = if role.per_layer() { (0..c.layers).map(Some).collect() } else { vec![None] };
        for l in layers {
            let w = s.weight(role, l).unwrap_or_else(|e| panic!("{role:?} {l:?}: {e}"));
            let Some(w) = w else {
                assert!(role == Role::Output || !role.used_by(c.arch), "{role:?} missing");
                continue;
            };
            let want = match role {
                Role::TokenEmbd | Role::Output => (c.vocab, c.hidden),
                Role::AttnQ => (c.heads * c.head_dim, c.hidden),
                Role::AttnK | Role::AttnV => (c.kv_heads * c.head_dim, c.hidden),
                Role::AttnOut => (c.hidden, c.heads * c.head_dim),
                Role::AttnQNorm | Role::AttnKNorm => (1, c.head_dim),
                Role::FfnGate | Role::FfnUp => (c.ffn, c.hidden),
                Role::FfnDown => (c.hidden, c.ffn),
                _ => (1, c.hidden),
            };
            assert_eq!((w.rows, w.cols), want, "{role:?} {l:?}");
            assert_eq!(w.data.len(), w.rows * w.format.bytes_for(w.cols).unwrap());
        }
    }
}

#[test]
fn gemma3_270m_gguf() {
    let Some(path) = model_file("gemma3-270m/gemma-3-270m-q4_k_m.gguf") else { return };
    let s = ModelSource::open(&path).unwrap();
    assert_eq!(s.kind, SourceKind::Gguf);
    let c = &s.config;
    assert_eq!(c.arch, Arch::Gemma3);
    assert_eq!((c.layers, c.heads, c.kv_heads, c.head_dim, c.hidden, c.ffn), (18, 4, 1, 256, 640, 2048));
    assert_eq!((c.vocab, c.max_ctx, c.sliding_window), (262_144, 32_768, 512));
    let full: Vec<usize> = (0..c.layers).filter(|&i| c.layer_kinds[i] == LayerKind::Full).collect();
    assert_eq!(full, vec![5, 11, 17]);
    assert_eq!(c.rope_full, Rope { theta: 1_000_000.0, scale: 1.0 });
    assert_eq!(c.rope_local, Rope { theta: 10_000.0, scale: 1.0 });
    assert_eq!(c.rope_mode, RopeMode::Neox);
    assert_eq!(c.attn_scale, (256f64).powf(-0.5) as f32);
    assert_eq!(c.embed_scale, (640f64).sqrt() as f32);
    assert!(!c.norm_add_one && c.tied_embeddings);
    assert_eq!((c.attn_softcap, c.final_softcap), (0.0, 0.0));
    assert_eq!((c.bos, c.eos.clone()), (Some(2), vec![1]));
    // The reference prompts start with BOS.
    assert!(c.add_bos);
    assert_eq!(c.bos, Some(first_input_id("gemma3-270m")));
    assert_eq!(c.name, "Gemma 3 270m");

    assert_eq!(s.dir(), path.parent());
    assert!(s.chat_template().is_none());
    let g = s.gguf().unwrap();
    assert_eq!(s.tensors().len(), g.tensors.len());
    let embd = s.tensors().into_iter().find(|t| t.name == "token_embd.weight").unwrap();
    assert_eq!(embd.shape, vec![262_144, 640]);
    let fmt = s.weight(Role::TokenEmbd, None).unwrap().unwrap().format;
    assert_eq!(fmt.name(), embd.dtype);
    check_all_weights(&s);
}

#[test]
fn smollm2_135m_gguf() {
    let Some(path) = model_file("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let s = ModelSource::open(&path).unwrap();
    let c = &s.config;
    assert_eq!(c.arch, Arch::Llama);
    assert_eq!((c.layers, c.heads, c.kv_heads, c.head_dim, c.hidden, c.ffn), (30, 9, 3, 64, 576, 1536));
    assert_eq!((c.vocab, c.max_ctx, c.sliding_window), (49_152, 8192, 0));
    assert_eq!(c.layer_kinds, vec![LayerKind::Full; 30]);
    assert_eq!(c.rope_full, Rope { theta: 100_000.0, scale: 1.0 });
    assert_eq!(c.rope_local, c.rope_full);
    assert_eq!(c.rope_mode, RopeMode::Interleaved);
    assert_eq!(c.attn_scale, (64f64).powf(-0.5) as f32);
    assert_eq!((c.embed_scale, c.norm_add_one, c.tied_embeddings), (1.0, false, true));
    assert_eq!((c.bos, c.eos.clone()), (Some(1), vec![2]));
    // The reference prompts carry no BOS, as the file's add_bos_token says.
    assert!(!c.add_bos);
    assert_ne!(Some(first_input_id("smollm2-135m")), c.bos);
    assert!(s.chat_template().unwrap().contains("<|im_start|>"));
    assert!(s.weight(Role::Output, None).unwrap().is_none());
    check_all_weights(&s);

    // The same bytes through the no-std entry point.
    let b = ModelSource::from_gguf_bytes("smol", shared(std::fs::read(&path).unwrap())).unwrap();
    assert_eq!(b.config, s.config);
    assert!(b.dir().is_none());
}

fn meta(kv: &[(&str, Value)]) -> Vec<(String, Value)> {
    kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn tensor(name: &str, dims: &[u64]) -> TensorInfo {
    TensorInfo { name: name.into(), format: Format::F32, dims: dims.to_vec(), start: 0, len: 0 }
}

fn gguf(metadata: Vec<(String, Value)>, tensors: Vec<TensorInfo>) -> GgufFile {
    GgufFile { version: 3, metadata, tensors, alignment: 32, data_start: 0 }
}

fn llama_meta() -> Vec<(String, Value)> {
    meta(&[
        ("general.architecture", Value::String("llama".into())),
        ("llama.context_length", Value::U32(4096)),
        ("llama.embedding_length", Value::U32(256)),
        ("llama.block_count", Value::U32(2)),
        ("llama.feed_forward_length", Value::U32(512)),
        ("llama.attention.head_count", Value::U32(8)),
        ("llama.attention.head_count_kv", Value::U32(2)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(500_000.0)),
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", Value::Array(Array::String(vec!["a".into(); 100]))),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.eot_token_id", Value::U32(9)),
    ])
}

#[test]
fn from_gguf_llama_metadata() {
    let g = gguf(llama_meta(), vec![tensor("token_embd.weight", &[256, 100]), tensor("output.weight", &[256, 100])]);
    let c = ModelConfig::from_gguf("l.gguf", &g).unwrap();
    assert_eq!((c.vocab, c.hidden, c.layers, c.heads, c.kv_heads, c.head_dim, c.ffn), (100, 256, 2, 8, 2, 32, 512));
    assert_eq!(c.rope_full, Rope { theta: 500_000.0, scale: 1.0 });
    assert_eq!(c.eos, vec![2, 9], "eos plus end-of-turn");
    assert!(c.add_bos, "SentencePiece vocabularies default to BOS");
    assert!(!c.tied_embeddings, "output.weight present");
    assert_eq!(c.name, "l.gguf");

    // Vocabulary from the token list when there is no embedding tensor; linear scaling.
    let mut m = llama_meta();
    m.push(("llama.rope.scaling.type".into(), Value::String("linear".into())));
    m.push(("llama.rope.scaling.factor".into(), Value::F32(4.0)));
    m.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)));
    m.push(("llama.attention.key_length".into(), Value::U32(64)));
    let c = ModelConfig::from_gguf("l.gguf", &gguf(m, vec![])).unwrap();
    assert_eq!((c.vocab, c.head_dim, c.rope_full.scale, c.add_bos, c.tied_embeddings), (100, 64, 4.0, false, true));

    // Errors name the file and the key or problem.
    let drop = |key: &str| llama_meta().into_iter().filter(|(k, _)| k != key).collect::<Vec<_>>();
    let with = |key: &str, v: Value| {
        let mut m = drop(key);
        m.push((key.into(), v));
        m
    };
    let cases = [
        (drop("llama.block_count"), "llama.block_count"),
        (drop("llama.attention.layer_norm_rms_epsilon"), "layer_norm_rms_epsilon"),
        (drop("general.architecture"), "general.architecture"),
        (with("general.architecture", Value::String("qwen2".into())), "qwen2"),
        (with("llama.rope.scaling.type", Value::String("yarn".into())), "yarn"),
        (with("llama.attention.head_count_kv", Value::Array(Array::U32(vec![2, 2]))), "head_count_kv"),
        (with("llama.attention.head_count_kv", Value::U32(3)), "multiple"),
        (with("llama.rope.dimension_count", Value::U32(16)), "partial"),
        (with("tokenizer.ggml.eos_token_id", Value::U32(100)), "vocabulary"),
        (with("llama.embedding_length", Value::String("x".into())), "embedding_length"),
    ];
    for (m, want) in cases {
        let e = ModelConfig::from_gguf("l.gguf", &gguf(m, vec![tensor("token_embd.weight", &[256, 100])]))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("l.gguf: ") && e.contains(want), "{want}: {e}");
    }
}

#[test]
fn from_gguf_gemma3_metadata() {
    let mut m = meta(&[
        ("general.architecture", Value::String("gemma3".into())),
        ("gemma3.context_length", Value::U32(131_072)),
        ("gemma3.embedding_length", Value::U32(5376)),
        ("gemma3.block_count", Value::U32(62)),
        ("gemma3.feed_forward_length", Value::U32(21_504)),
        ("gemma3.attention.head_count", Value::U32(32)),
        ("gemma3.attention.head_count_kv", Value::U32(16)),
        ("gemma3.attention.key_length", Value::U32(128)),
        ("gemma3.attention.value_length", Value::U32(128)),
        ("gemma3.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
        ("gemma3.rope.freq_base", Value::F32(1e6)),
        ("gemma3.rope.scaling.type", Value::String("linear".into())),
        ("gemma3.rope.scaling.factor", Value::F32(8.0)),
        ("gemma3.attention.sliding_window", Value::U32(1024)),
        ("tokenizer.ggml.bos_token_id", Value::U32(2)),
        ("tokenizer.ggml.eos_token_id", Value::U32(1)),
    ]);
    let t = vec![tensor("token_embd.weight", &[5376, 262_208])];
    let c = ModelConfig::from_gguf("g.gguf", &gguf(m.clone(), t.clone())).unwrap();
    assert_eq!(c.arch, Arch::Gemma3);
    assert_eq!(c.rope_full, Rope { theta: 1e6, scale: 8.0 });
    assert_eq!(c.rope_local, Rope { theta: 10_000.0, scale: 1.0 }, "scaling is for global layers only");
    assert_eq!(c.layer_kinds.iter().filter(|k| **k == LayerKind::Full).count(), 10);
    assert_eq!(c.layer_kinds[5], LayerKind::Full);
    // 27B (62 layers) scales by hidden/heads = 168, as its HF query_pre_attn_scalar says.
    assert_eq!(c.attn_scale, (168f64).powf(-0.5) as f32);
    assert_eq!((c.eos.clone(), c.tied_embeddings, c.norm_add_one), (vec![1], true, false));

    m.retain(|(k, _)| k != "gemma3.attention.sliding_window");
    let e = ModelConfig::from_gguf("g.gguf", &gguf(m, t)).unwrap_err().to_string();
    assert!(e.contains("gemma3.attention.sliding_window"), "{e}");
}

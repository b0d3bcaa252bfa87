//! A text-only HF `config.json` written from a [`ModelConfig`] (a GGUF's metadata, or a
//! multimodal config's `text_config`), such that [`ModelConfig::from_hf_json`] reads back the
//! same model and transformers builds `Gemma3ForCausalLM` / `LlamaForCausalLM` with it.
//!
//! What a GGUF does not say is what llama.cpp assumes too, and so does [`ModelConfig::from_gguf`]:
//! Gemma 3's local RoPE base (10000) and its every-6th-layer-global pattern. Both are written
//! explicitly here (`layer_types`, `rope_parameters`). Fields the engine has no notion of are
//! either transformers' defaults for the architecture (`hidden_activation`, `attention_bias`) or
//! left out; nothing is guessed.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde_json::{Map, Value, json};

use crate::config::{Arch, LayerKind, ModelConfig, Rope};
use crate::gguf::GgufFile;

/// `rope_parameters` entry (transformers 5.x).
fn rope_entry(r: Rope) -> Value {
    if r.scale == 1.0 {
        json!({ "rope_type": "default", "rope_theta": r.theta as f64 })
    } else {
        json!({ "rope_type": "linear", "rope_theta": r.theta as f64, "factor": r.scale as f64 })
    }
}

/// `query_pre_attn_scalar` back from the score scale `1/sqrt(q)`: an integer when it is one (it
/// always is in released models), else the exact value.
fn query_pre_attn_scalar(attn_scale: f32) -> Value {
    let q = 1.0 / (attn_scale as f64 * attn_scale as f64);
    let r = libm::round(q);
    if (q - r).abs() < 1e-3 * r.max(1.0) { json!(r as u64) } else { json!(q) }
}

fn softcap(v: f32) -> Value {
    if v > 0.0 { json!(v as f64) } else { Value::Null }
}

/// The config, or why it cannot be written.
pub fn from_model(c: &ModelConfig, gguf: Option<&GgufFile>) -> Result<Map<String, Value>, String> {
    let eos = match c.eos.as_slice() {
        [one] => json!(one),
        many => json!(many),
    };
    let pad = gguf.and_then(|g| g.get("tokenizer.ggml.padding_token_id")).and_then(|v| v.as_u64());
    let v = match c.arch {
        Arch::Gemma3 => {
            if c.rope_local.scale != 1.0 {
                return Err("local RoPE scaling is not expressible in a Gemma 3 config".into());
            }
            let layer_types: Vec<&str> = c
                .layer_kinds
                .iter()
                .map(|k| match k {
                    LayerKind::Sliding => "sliding_attention",
                    LayerKind::Full => "full_attention",
                })
                .collect();
            json!({
                "architectures": ["Gemma3ForCausalLM"],
                "model_type": "gemma3_text",
                "vocab_size": c.vocab,
                "hidden_size": c.hidden,
                "intermediate_size": c.ffn,
                "num_hidden_layers": c.layers,
                "num_attention_heads": c.heads,
                "num_key_value_heads": c.kv_heads,
                "head_dim": c.head_dim,
                "max_position_embeddings": c.max_ctx,
                "rms_norm_eps": c.eps as f64,
                "query_pre_attn_scalar": query_pre_attn_scalar(c.attn_scale),
                "sliding_window": c.sliding_window,
                "layer_types": layer_types,
                "rope_parameters": {
                    "full_attention": rope_entry(c.rope_full),
                    "sliding_attention": rope_entry(c.rope_local),
                },
                // transformers 4.x reads these instead of rope_parameters / layer_types.
                "rope_theta": c.rope_full.theta as f64,
                "rope_local_base_freq": c.rope_local.theta as f64,
                "attn_logit_softcapping": softcap(c.attn_softcap),
                "final_logit_softcapping": softcap(c.final_softcap),
                "hidden_activation": "gelu_pytorch_tanh",
                "attention_bias": false,
                "attention_dropout": 0.0,
                "use_bidirectional_attention": false,
                "tie_word_embeddings": c.tied_embeddings,
                "bos_token_id": c.bos,
                "eos_token_id": eos,
                "pad_token_id": pad,
                "dtype": "float32",
                "use_cache": true,
            })
        }
        Arch::Llama => {
            if c.rope_full != c.rope_local || c.sliding_window != 0 {
                return Err("per-layer RoPE or sliding windows are not expressible in a Llama config".into());
            }
            let mut v = json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": c.vocab,
                "hidden_size": c.hidden,
                "intermediate_size": c.ffn,
                "num_hidden_layers": c.layers,
                "num_attention_heads": c.heads,
                "num_key_value_heads": c.kv_heads,
                "head_dim": c.head_dim,
                "max_position_embeddings": c.max_ctx,
                "rms_norm_eps": c.eps as f64,
                "rope_theta": c.rope_full.theta as f64,
                "hidden_act": "silu",
                "attention_bias": false,
                "mlp_bias": false,
                "tie_word_embeddings": c.tied_embeddings,
                "bos_token_id": c.bos,
                "eos_token_id": eos,
                "pad_token_id": pad,
                "dtype": "float32",
                "use_cache": true,
            });
            if c.rope_full.scale != 1.0 {
                v["rope_scaling"] = json!({ "rope_type": "linear", "factor": c.rope_full.scale as f64 });
            }
            if c.attn_scale != libm::pow(c.head_dim as f64, -0.5) as f32 {
                return Err(format!("attention scale {} is not 1/sqrt(head_dim): not expressible", c.attn_scale));
            }
            v
        }
        #[allow(unreachable_patterns)]
        other => return Err(format!("writing a config for {other:?} is not supported")),
    };
    match v {
        Value::Object(m) => Ok(m),
        _ => Err("internal: config is not an object".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qpas_round_trips() {
        for q in [256.0f64, 168.0, 32.0] {
            let s = libm::pow(q, -0.5) as f32;
            assert_eq!(query_pre_attn_scalar(s), json!(q as u64));
        }
    }
}

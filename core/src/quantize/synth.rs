//! `purehw synth`: a random-weight checkpoint with the shapes and config quirks of a real model
//! (Gemma 3 4B / 12B / 27B, text), written exactly as [`quantize`](super::quantize) writes one,
//! for speed and memory tests of models too large to fetch.
//!
//! The config is the text part of the HF `google/gemma-3-*-pt` config.json (sizes, sliding
//! window 1024 with 5 local : 1 global layers, linear RoPE ×8 on the global layers only, theta
//! 1M global / 10k local, `query_pre_attn_scalar` 168 for 27B, tied embeddings, no soft-caps)
//! flattened into a text-only `Gemma3ForCausalLM` config with both the 4.x fields
//! (`rope_scaling`, `sliding_window_pattern`) and the 5.x ones (`layer_types`,
//! `rope_parameters`); the engine reads it through the same [`ModelConfig::from_hf_json`] as a
//! downloaded checkpoint.
//!
//! Weights are pseudo-random and deterministic: each row of each tensor has its own generator
//! seeded from (`seed`, tensor name, row), so the bytes do not depend on the thread count. Each
//! element is a sum of four uniform 16-bit lanes of one 64-bit draw (Irwin–Hall, normal-ish,
//! bounded at ±3.5σ), scaled so activations stay finite at any depth: Linear weights have
//! std 1/√fan_in, the embedding 1/√hidden (×√hidden at the input gives unit rms; tied as the LM
//! head, logits of unit std), norm weights std 0.02 about 0 (Gemma applies `1 + w`). Rows are
//! made and quantized a few at a time, so memory holds one shard's output, not the model. The
//! groups are quantized by plain min-max round-to-nearest: the scale search `quantize` runs buys
//! nothing on noise and would only cost time.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use super::{
    FloatTy, Item, Progress, QuantizeError, Scheme, copy_tokenizer_files, encode, note_fallbacks, quantization_config,
    spec_fitting, write_checkpoint, write_json,
};
use crate::config::ModelConfig;
use crate::source::{Role, expected_shape, hf_tensor_name};

/// The models `--like` names.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Like {
    Gemma3_4b,
    Gemma3_12b,
    Gemma3_27b,
}

/// Every `--like`.
pub const LIKES: [&str; 3] = ["gemma3-4b", "gemma3-12b", "gemma3-27b"];

impl core::str::FromStr for Like {
    type Err = QuantizeError;

    fn from_str(s: &str) -> Result<Like, QuantizeError> {
        match s {
            "gemma3-4b" => Ok(Like::Gemma3_4b),
            "gemma3-12b" => Ok(Like::Gemma3_12b),
            "gemma3-27b" => Ok(Like::Gemma3_27b),
            _ => Err(QuantizeError::Unsupported {
                model: s.to_string(),
                msg: format!("unknown --like model (choose one of {})", LIKES.join(", ")),
            }),
        }
    }
}

/// The sizes that differ between the models (HF `text_config` of `google/gemma-3-*-pt`;
/// `head_dim` and `query_pre_attn_scalar` are `Gemma3TextConfig`'s default 256 where the
/// config leaves them out).
struct Dims {
    hidden: usize,
    ffn: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    query_pre_attn_scalar: usize,
}

impl Like {
    fn dims(self) -> Dims {
        match self {
            Like::Gemma3_4b => Dims {
                hidden: 2560,
                ffn: 10240,
                layers: 34,
                heads: 8,
                kv_heads: 4,
                head_dim: 256,
                query_pre_attn_scalar: 256,
            },
            Like::Gemma3_12b => Dims {
                hidden: 3840,
                ffn: 15360,
                layers: 48,
                heads: 16,
                kv_heads: 8,
                head_dim: 256,
                query_pre_attn_scalar: 256,
            },
            Like::Gemma3_27b => Dims {
                hidden: 5376,
                ffn: 21504,
                layers: 62,
                heads: 32,
                kv_heads: 16,
                head_dim: 128,
                query_pre_attn_scalar: 168,
            },
        }
    }

    /// The model's number of decoder layers.
    pub fn layers(self) -> usize {
        self.dims().layers
    }

    fn name(self) -> &'static str {
        match self {
            Like::Gemma3_4b => LIKES[0],
            Like::Gemma3_12b => LIKES[1],
            Like::Gemma3_27b => LIKES[2],
        }
    }
}

/// `purehw synth`'s options.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub like: Like,
    pub scheme: Scheme,
    pub seed: u64,
    /// Decoder layers to write (`None`: the model's own count).
    pub layers: Option<usize>,
    /// Most bytes of decoder layers per shard (a larger layer gets a shard of its own).
    pub shard_size: u64,
    /// A `tokenizer.json` to copy (with its siblings); without one the checkpoint has none.
    pub tokenizer: Option<PathBuf>,
    /// Worker threads (0: one per core).
    pub threads: usize,
}

/// The text-only HF `config.json` (without `quantization_config`) of `like` with `layers`
/// decoder layers.
pub fn hf_config(like: Like, layers: usize) -> Map<String, Value> {
    const PATTERN: usize = 6;
    let d = like.dims();
    let layer_types: Vec<&str> =
        (0..layers).map(|i| if (i + 1) % PATTERN == 0 { "full_attention" } else { "sliding_attention" }).collect();
    let v = json!({
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": 262_208,
        "hidden_size": d.hidden,
        "intermediate_size": d.ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "head_dim": d.head_dim,
        "query_pre_attn_scalar": d.query_pre_attn_scalar,
        "max_position_embeddings": 131_072,
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": 1024,
        // transformers 4.x: the pattern, one theta per kind, and a scaling for the global layers.
        "sliding_window_pattern": PATTERN,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rope_scaling": { "factor": 8.0, "rope_type": "linear" },
        // transformers 5.x: the same, per layer type.
        "layer_types": layer_types,
        "rope_parameters": {
            "full_attention": { "rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0 },
            "sliding_attention": { "rope_type": "default", "rope_theta": 10_000.0 },
        },
        "attn_logit_softcapping": null,
        "final_logit_softcapping": null,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": true,
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
        "use_cache": true,
        // Provenance: not a trained model.
        "purehw_synth": { "like": like.name(), "layers_of_model": d.layers },
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Write the random-weight checkpoint into the new folder `out`.
pub fn synth(out: &Path, opts: &SynthOptions, progress: &dyn Progress) -> Result<(), QuantizeError> {
    if opts.shard_size == 0 {
        return Err(QuantizeError::ShardSize);
    }
    if std::fs::symlink_metadata(out).is_ok() {
        return Err(QuantizeError::OutExists(out.to_path_buf()));
    }
    let full = opts.like.layers();
    let layers = opts.layers.unwrap_or(full);
    if layers == 0 || layers > full {
        return Err(QuantizeError::Unsupported {
            model: opts.like.name().to_string(),
            msg: format!("--layers {layers}: must be 1 to {full} (the model's own count)"),
        });
    }
    if let Some(t) = &opts.tokenizer
        && !t.is_file()
    {
        return Err(QuantizeError::Io {
            path: t.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "--tokenizer: no such file"),
        });
    }
    let mut config = hf_config(opts.like, layers);
    let text = serde_json::to_string(&Value::Object(config.clone())).unwrap_or_default();
    let c = ModelConfig::from_hf_json(&format!("{} config.json", opts.like.name()), &text)?;
    let items = plan(&c, opts.scheme, progress)?;
    config.insert("quantization_config".into(), quantization_config(&items));
    if let Some(Value::Object(m)) = config.get_mut("purehw_synth") {
        m.insert("seed".into(), json!(opts.seed));
        m.insert("scheme".into(), json!(scheme_name(opts.scheme)));
    }

    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let seed = opts.seed;
    let produce = |it: &Item| {
        let std = std_of(&c, it.role, it.cols);
        let base = seed ^ fnv1a(it.name.as_bytes());
        encode(it, c.arch, threads, false, None, &|r, row| fill_row(base, r, std, row))
    };
    let side = |dir: &Path| {
        copy_tokenizer_files(opts.tokenizer.as_deref(), None, dir)?;
        if !dir.join("generation_config.json").exists() {
            write_json(
                &dir.join("generation_config.json"),
                &json!({ "bos_token_id": c.bos, "eos_token_id": c.eos, "pad_token_id": 0 }),
            )?;
        }
        if !dir.join("tokenizer.json").exists() {
            progress.note(
                "no tokenizer: `bench` and `logits --ids` run on token ids; give `run`/`chat`/`serve` \
                 --tokenizer FILE (a Gemma 3 tokenizer.json), or synth with --tokenizer to copy one in",
            );
        }
        Ok(())
    };
    write_checkpoint(out, &items, layers, opts.shard_size, &config, progress, &produce, &side)
}

fn scheme_name(s: Scheme) -> String {
    let base = match s.kind {
        super::SchemeKind::Seed => "seed".to_string(),
        super::SchemeKind::W8 => "w8".to_string(),
        super::SchemeKind::W4(g) => format!("w4g{g}"),
    };
    if s.asym { format!("{base}-asym") } else { base }
}

/// Every tensor of a Gemma 3 text model, in bf16 where not quantized.
fn plan(c: &ModelConfig, scheme: Scheme, progress: &dyn Progress) -> Result<Vec<Item>, QuantizeError> {
    let mut items = Vec::new();
    let mut fallbacks = alloc::collections::BTreeMap::new();
    for role in Role::ALL {
        if !role.used_by(c.arch) || (role == Role::Output && c.tied_embeddings) {
            continue;
        }
        let layers: Vec<Option<usize>> = if role.per_layer() { (0..c.layers).map(Some).collect() } else { vec![None] };
        for layer in layers {
            let (rows, cols) = expected_shape(c, role);
            let name = hf_tensor_name(role, layer.unwrap_or(0), c.arch);
            let int = spec_fitting(scheme, role, &name, cols, &mut fallbacks)?;
            items.push(Item { role, layer, name, rows, cols, w: None, dtype: FloatTy::BF16, int });
        }
    }
    note_fallbacks(&fallbacks, progress);
    Ok(items)
}

/// The standard deviation of `role`'s weights (see the module docs).
fn std_of(c: &ModelConfig, role: Role, cols: usize) -> f32 {
    match role.hf_class(c.arch) {
        "Linear" => 1.0 / (cols as f32).sqrt(),
        "Embedding" => 1.0 / (c.hidden as f32).sqrt(),
        _ => 0.02,
    }
}

/// FNV-1a of `b`: a tensor's name as a seed.
fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| (h ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// SplitMix64's step: `state` advanced, and its output.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Row `r` of the tensor seeded `base`: zero mean, standard deviation `std`.
fn fill_row(base: u64, r: usize, std: f32, row: &mut [f32]) {
    let mut state = base ^ (r as u64).wrapping_mul(0xd1b5_4a32_d192_ed03);
    splitmix(&mut state);
    // Four uniform lanes on 0..65536 sum to mean 131070, variance 4·(65536² − 1)/12.
    let k = std / (65536.0f32 / 3f32.sqrt());
    for v in row.iter_mut() {
        let x = splitmix(&mut state);
        let s = (x & 0xffff) + ((x >> 16) & 0xffff) + ((x >> 32) & 0xffff) + (x >> 48);
        *v = (s as f32 - 131_070.0) * k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Arch, LayerKind, Rope};

    #[test]
    fn configs_read_back_with_the_quirks() {
        for (like, layers, hidden, heads, kv, hd, ffn) in [
            (Like::Gemma3_4b, 34, 2560, 8, 4, 256, 10240),
            (Like::Gemma3_12b, 48, 3840, 16, 8, 256, 15360),
            (Like::Gemma3_27b, 62, 5376, 32, 16, 128, 21504),
        ] {
            let text = serde_json::to_string(&Value::Object(hf_config(like, like.layers()))).unwrap();
            let c = ModelConfig::from_hf_json("synth", &text).unwrap();
            assert_eq!(c.arch, Arch::Gemma3);
            assert_eq!(
                (c.layers, c.hidden, c.heads, c.kv_heads, c.head_dim, c.ffn),
                (layers, hidden, heads, kv, hd, ffn)
            );
            assert_eq!((c.vocab, c.sliding_window, c.max_ctx, c.eps), (262_208, 1024, 131_072, 1e-6));
            assert_eq!(c.rope_full, Rope { theta: 1e6, scale: 8.0 });
            assert_eq!(c.rope_local, Rope { theta: 1e4, scale: 1.0 });
            let qpas = if like == Like::Gemma3_27b { 168.0f64 } else { 256.0 };
            assert_eq!(c.attn_scale, qpas.powf(-0.5) as f32);
            assert_eq!((c.attn_softcap, c.final_softcap), (0.0, 0.0));
            assert!(c.tied_embeddings && c.norm_add_one);
            let full: Vec<usize> = (0..c.layers).filter(|&i| c.layer_kinds[i] == LayerKind::Full).collect();
            assert_eq!(full, (1..=layers / 6).map(|k| 6 * k - 1).collect::<Vec<_>>());
        }
    }

    #[test]
    fn rows_are_seeded_and_normalish() {
        let (mut a, mut b) = (vec![0f32; 4096], vec![0f32; 4096]);
        fill_row(7, 3, 0.5, &mut a);
        fill_row(7, 3, 0.5, &mut b);
        assert_eq!(a, b);
        fill_row(7, 4, 0.5, &mut b);
        assert_ne!(a, b);
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let sd = (a.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / a.len() as f32).sqrt();
        assert!(mean.abs() < 0.03 && (sd - 0.5).abs() < 0.03, "mean {mean} sd {sd}");
        assert!(a.iter().all(|v| v.abs() <= 0.5 * 3.47));
    }
}

//! Model hyper-parameters, from HF `config.json` or GGUF metadata.
//!
//! HF configs come in four shapes we accept:
//! * transformers 5.x Gemma 3 (`gemma3_text`): `rope_parameters` per layer type and `layer_types`;
//! * transformers 4.x Gemma 3: `rope_theta`, `rope_local_base_freq`, `rope_scaling` (global layers
//!   only) and `sliding_window_pattern` (layer `i` is global iff `(i + 1) % pattern == 0`);
//! * multimodal Gemma 3 (`gemma3`, `Gemma3ForConditionalGeneration`): the text model's fields nested
//!   under `text_config`, where transformers fills every omitted field from `Gemma3TextConfig`'s
//!   defaults, so we do the same ([`gemma3_text_defaults`]);
//! * Llama-family (`llama`, `mistral`): `rope_theta` or 5.x `rope_parameters`, optional linear
//!   `rope_scaling`.
//!
//! A top-level config must name its shape fields (sizes, layer and head counts); only numerics with
//! a well-known transformers default (eps, RoPE bases, window, …) may be omitted. A
//! `quantization_config` must be a compressed-tensors scheme we compute with
//! ([`crate::quantization`]); other methods are refused.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use purehw_hal::RopeMode;
use serde_json::{Map, Value};

use crate::gguf::{Array, GgufFile, Value as GgufValue};
use crate::{Error, Result};

/// The architectures the step implements.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Arch {
    /// Gemma 3 text (`gemma3_text`, `gemma3` GGUF).
    Gemma3,
    /// Llama family (SmolLM2, Qwen-style without biases).
    Llama,
}

/// Attention kind of one layer.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// Sees the last `sliding_window` positions; uses the local RoPE.
    Sliding,
    /// Sees every earlier position; uses the global RoPE.
    Full,
}

/// One RoPE setting: base and linear scaling factor (1.0 = none).
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct Rope {
    pub theta: f32,
    pub scale: f32,
}

/// Everything the step needs to know about a model's shape and numerics.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// MLP inner width.
    pub ffn: usize,
    pub eps: f32,
    /// Longest context the model was trained for.
    pub max_ctx: usize,
    /// RoPE of full-attention layers.
    pub rope_full: Rope,
    /// RoPE of sliding-window layers (equals `rope_full` for models without them).
    pub rope_local: Rope,
    pub rope_mode: RopeMode,
    /// One entry per layer.
    pub layer_kinds: Vec<LayerKind>,
    /// Window of sliding layers, 0 when none.
    pub sliding_window: usize,
    /// Attention score scale: `1/sqrt(query_pre_attn_scalar)` (Gemma) or `1/sqrt(head_dim)`.
    pub attn_scale: f32,
    /// `tanh` soft-capping of attention scores, 0 = off.
    pub attn_softcap: f32,
    /// `tanh` soft-capping of final logits, 0 = off.
    pub final_softcap: f32,
    /// Embeddings are multiplied by this (`sqrt(hidden)` for Gemma, unrounded).
    pub embed_scale: f32,
    /// Norm weights are stored as `w` and applied as `1 + w` (HF Gemma checkpoints; GGUF has the +1 folded in).
    pub norm_add_one: bool,
    /// Output projection is the embedding table.
    pub tied_embeddings: bool,
    pub bos: Option<u32>,
    /// End-of-sequence ids (generation stops at any of them).
    pub eos: Vec<u32>,
    /// Whether prompts start with `bos`.
    pub add_bos: bool,
    /// Free text for `inspect` (e.g. the file's `general.name`).
    pub name: String,
}

/// transformers' `Gemma3TextConfig` defaults, applied to fields a multimodal config's
/// `text_config` omits (gemma-3-4b's, for one, lists only a handful).
pub mod gemma3_text_defaults {
    pub const VOCAB_SIZE: usize = 262_208;
    pub const HIDDEN_SIZE: usize = 2304;
    pub const INTERMEDIATE_SIZE: usize = 9216;
    pub const NUM_HIDDEN_LAYERS: usize = 26;
    pub const NUM_ATTENTION_HEADS: usize = 8;
    pub const NUM_KEY_VALUE_HEADS: usize = 4;
    pub const HEAD_DIM: usize = 256;
    pub const MAX_POSITION_EMBEDDINGS: usize = 131_072;
    pub const RMS_NORM_EPS: f64 = 1e-6;
    pub const ROPE_THETA: f64 = 1_000_000.0;
    pub const ROPE_LOCAL_BASE_FREQ: f64 = 10_000.0;
    pub const QUERY_PRE_ATTN_SCALAR: f64 = 256.0;
    pub const SLIDING_WINDOW: usize = 4096;
    pub const SLIDING_WINDOW_PATTERN: usize = 6;
    pub const BOS_TOKEN_ID: u32 = 2;
    pub const EOS_TOKEN_ID: u32 = 1;
    pub const TIE_WORD_EMBEDDINGS: bool = true;
}

/// Facts a Gemma 3 GGUF does not carry (llama.cpp hard-codes them too).
const GEMMA3_GGUF_LOCAL_ROPE_BASE: f32 = 10_000.0;
const GEMMA3_SLIDING_PATTERN: usize = 6;

/// A JSON object being read, with the path prefix used in error messages.
struct Obj<'a> {
    file: &'a str,
    map: &'a Map<String, Value>,
    /// `""` at top level, `"text_config."` when nested.
    path: &'static str,
}

impl<'a> Obj<'a> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::format(self.file, msg)
    }
    /// The value, `None` when absent or null.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }
    fn missing(&self, key: &str) -> Error {
        self.err(format!("missing field `{}{key}`", self.path))
    }
    /// The value read by `conv`; `None` when absent or null, an error when `conv` refuses it.
    fn typed<T>(&self, key: &str, what: &str, conv: impl FnOnce(&'a Value) -> Option<T>) -> Result<Option<T>> {
        self.get(key)
            .map(|v| conv(v).ok_or_else(|| self.err(format!("field `{}{key}` is not {what}: {v}", self.path))))
            .transpose()
    }
    fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.typed(key, "a non-negative integer", |v| v.as_u64().and_then(|x| usize::try_from(x).ok()))
    }
    fn req_usize(&self, key: &str) -> Result<usize> {
        self.usize(key)?.ok_or_else(|| self.missing(key))
    }
    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", Value::as_f64)
    }
    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a boolean", Value::as_bool)
    }
    fn str(&self, key: &str) -> Result<Option<&'a str>> {
        self.typed(key, "a string", Value::as_str)
    }
    fn obj(&self, key: &str) -> Result<Option<&'a Map<String, Value>>> {
        self.typed(key, "an object", Value::as_object)
    }
    /// A token id or list of ids (`eos_token_id` may be either). `None` when absent; `Some([])` for null.
    fn ids(&self, key: &str) -> Result<Option<Vec<u32>>> {
        let Some(v) = self.map.get(key) else { return Ok(None) };
        let ids = if v.is_null() { Some(Vec::new()) } else { token_ids(v) };
        ids.map(Some)
            .ok_or_else(|| self.err(format!("field `{}{key}` is not a token id or list of ids: {v}", self.path)))
    }
}

/// A token id or a list of ids, as HF configs write `eos_token_id`; `None` for anything else.
pub(crate) fn token_ids(v: &Value) -> Option<Vec<u32>> {
    let one = |v: &Value| v.as_u64().and_then(|x| u32::try_from(x).ok());
    match v {
        Value::Array(a) => a.iter().map(one).collect(),
        v => one(v).map(|x| vec![x]),
    }
}

/// `Ok(None)` when GGUF `key` is absent, the value `read` takes from it, or an error saying it is
/// not `what`.
fn gguf_opt<'g, T>(
    label: &str,
    g: &'g GgufFile,
    key: &str,
    what: &str,
    read: impl FnOnce(&'g GgufValue) -> Option<T>,
) -> Result<Option<T>> {
    let Some(v) = g.get(key) else { return Ok(None) };
    read(v).map(Some).ok_or_else(|| Error::format(label, format!("GGUF key `{key}` is not {what}")))
}

fn pow_neg_half(x: f64) -> f32 {
    libm::pow(x, -0.5) as f32
}

/// One RoPE entry of 5.x `rope_parameters` or 4.x `rope_scaling`: its type and linear factor.
/// Returns the scale (1.0 for `default`); `theta` is read by the caller.
fn rope_scale(o: &Obj<'_>, m: &Map<String, Value>, what: &str) -> Result<f32> {
    let ty = m.get("rope_type").or_else(|| m.get("type")).filter(|v| !v.is_null());
    let ty = match ty {
        None => "default",
        Some(v) => v.as_str().ok_or_else(|| o.err(format!("`{what}.rope_type` is not a string")))?,
    };
    match ty {
        "default" => Ok(1.0),
        "linear" => {
            let f = m
                .get("factor")
                .and_then(Value::as_f64)
                .ok_or_else(|| o.err(format!("`{what}`: linear RoPE scaling needs a numeric `factor`")))?;
            // Checked as f32, the type it is used in (1e39 would be infinite, 1e-50 zero).
            let f32 = f as f32;
            if !(f32.is_finite() && f32 > 0.0) {
                return Err(o.err(format!("`{what}.factor` must be positive, got {f}")));
            }
            Ok(f32)
        }
        other => Err(o.err(format!("`{what}`: unsupported RoPE type `{other}` (only default and linear)"))),
    }
}

/// A RoPE base, checked as the f32 it is used as.
fn check_theta(o: &Obj<'_>, theta: f64, what: &str) -> Result<f32> {
    let t = theta as f32;
    if t.is_finite() && t > 1.0 { Ok(t) } else { Err(o.err(format!("`{what}` must be a number > 1, got {theta}"))) }
}

/// One 5.x `rope_parameters` entry `m` (`what` names it in errors): its `rope_theta`, else the
/// top-level `fallback_key`, else `default`; and its scaling.
fn rope_entry(t: &Obj<'_>, m: &Map<String, Value>, what: &str, fallback_key: &str, default: f64) -> Result<Rope> {
    let theta = match m.get("rope_theta").filter(|v| !v.is_null()) {
        Some(v) => v.as_f64().ok_or_else(|| t.err(format!("`{what}.rope_theta` is not a number")))?,
        None => t.f64(fallback_key)?.unwrap_or(default),
    };
    Ok(Rope { theta: check_theta(t, theta, &format!("{what}.rope_theta"))?, scale: rope_scale(t, m, what)? })
}

/// 4.x RoPE: `rope_theta` (else `default`) and an optional `rope_scaling`.
fn rope_legacy(t: &Obj<'_>, default: f64) -> Result<Rope> {
    let theta = t.f64("rope_theta")?.unwrap_or(default);
    let scale = match t.obj("rope_scaling")? {
        Some(m) => rope_scale(t, m, &format!("{}rope_scaling", t.path))?,
        None => 1.0,
    };
    Ok(Rope { theta: check_theta(t, theta, &format!("{}rope_theta", t.path))?, scale })
}

/// Shape checks shared by every source.
fn check_shape(file: &str, c: &ModelConfig) -> Result<()> {
    let err = |m: String| Err(Error::format(file, m));
    for (name, v) in [
        ("vocab", c.vocab),
        ("hidden", c.hidden),
        ("layers", c.layers),
        ("heads", c.heads),
        ("kv_heads", c.kv_heads),
        ("head_dim", c.head_dim),
        ("ffn", c.ffn),
    ] {
        if v == 0 {
            return err(format!("{name} is 0"));
        }
    }
    if !c.heads.is_multiple_of(c.kv_heads) {
        return err(format!("{} attention heads are not a multiple of {} KV heads", c.heads, c.kv_heads));
    }
    if !c.head_dim.is_multiple_of(2) {
        return err(format!("head_dim {} is odd; RoPE needs pairs", c.head_dim));
    }
    if c.heads.checked_mul(c.head_dim).is_none() || c.vocab.checked_mul(c.hidden).is_none() {
        return err("sizes overflow".into());
    }
    if !(c.eps.is_finite() && c.eps > 0.0) {
        return err(format!("rms_norm_eps must be positive, got {}", c.eps));
    }
    if !(c.attn_scale.is_finite() && c.attn_scale > 0.0) {
        return err(format!("attention scale {} is not a positive number", c.attn_scale));
    }
    if c.layer_kinds.len() != c.layers {
        return err(format!("{} layer types for {} layers", c.layer_kinds.len(), c.layers));
    }
    if c.layer_kinds.contains(&LayerKind::Sliding) && c.sliding_window == 0 {
        return err("sliding-window layers with a window of 0".into());
    }
    for &id in c.bos.iter().chain(&c.eos) {
        if id as usize >= c.vocab {
            return err(format!("special token id {id} is outside the vocabulary ({} tokens)", c.vocab));
        }
    }
    Ok(())
}

impl ModelConfig {
    /// Parse an HF `config.json`. `label` names the file in errors.
    pub fn from_hf_json(label: &str, json: &str) -> Result<ModelConfig> {
        let root: Value = serde_json::from_str(json).map_err(|e| Error::format(label, format!("invalid JSON: {e}")))?;
        let map = root.as_object().ok_or_else(|| Error::format(label, "config is not a JSON object"))?;
        let top = Obj { file: label, map, path: "" };
        // A quantization we cannot compute with is refused here, before any tensor is read; the
        // source reads the scheme again to load the weights.
        crate::quantization::Quantization::from_hf_config(label, map)?;

        let arch0 = top.get("architectures").and_then(Value::as_array).and_then(|a| a.first()).and_then(Value::as_str);
        let model_type = match top.str("model_type")? {
            Some(t) => t,
            // Old exports sometimes lack model_type; the architecture class says the same.
            None => match arch0 {
                Some("Gemma3ForCausalLM") => "gemma3_text",
                Some("Gemma3ForConditionalGeneration") => "gemma3",
                Some("LlamaForCausalLM") => "llama",
                Some("MistralForCausalLM") => "mistral",
                _ => return Err(top.missing("model_type")),
            },
        };
        let mut cfg = match model_type {
            "gemma3_text" => gemma3_from_hf(&top, &top, false)?,
            "gemma3" => {
                let tc = top.obj("text_config")?.ok_or_else(|| top.missing("text_config"))?;
                let text = Obj { file: label, map: tc, path: "text_config." };
                gemma3_from_hf(&text, &top, true)?
            }
            "llama" | "mistral" => llama_from_hf(&top, model_type == "mistral")?,
            other => {
                return Err(top.err(format!(
                    "unsupported model_type `{other}` (supported: gemma3_text, gemma3, llama, mistral)"
                )));
            }
        };
        cfg.name = top
            .str("_name_or_path")
            .ok()
            .flatten()
            .filter(|s| !s.is_empty())
            .or(arch0)
            .unwrap_or(model_type)
            .to_string();
        check_shape(label, &cfg)?;
        Ok(cfg)
    }

    /// Build from GGUF metadata (`gemma3` or `llama` architecture). `label` names the file in errors.
    pub fn from_gguf(label: &str, g: &GgufFile) -> Result<ModelConfig> {
        let err = |m: String| Error::format(label, m);
        let arch_name =
            g.get_str("general.architecture").ok_or_else(|| err("missing GGUF key `general.architecture`".into()))?;
        let arch = match arch_name {
            "gemma3" => Arch::Gemma3,
            "llama" => Arch::Llama,
            other => return Err(err(format!("unsupported GGUF architecture `{other}` (supported: gemma3, llama)"))),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        // Absent → None; present but not an unsigned integer (e.g. a per-layer array) → error.
        let opt_u = |k: &str| {
            gguf_opt(label, g, &key(k), "a single unsigned integer", |v| {
                v.as_u64().and_then(|v| usize::try_from(v).ok())
            })
        };
        let req_u = |k: &str| opt_u(k)?.ok_or_else(|| err(format!("missing GGUF key `{}`", key(k))));
        let opt_f = |k: &str| gguf_opt(label, g, &key(k), "a number", GgufValue::as_f32);

        let hidden = req_u("embedding_length")?;
        let layers = req_u("block_count")?;
        let ffn = req_u("feed_forward_length")?;
        let heads = req_u("attention.head_count")?;
        let kv_heads = opt_u("attention.head_count_kv")?.unwrap_or(heads);
        if heads == 0 {
            return Err(err("attention.head_count is 0".into()));
        }
        let head_dim = match opt_u("attention.key_length")? {
            Some(d) => d,
            None => hidden / heads,
        };
        if let Some(v) = opt_u("attention.value_length")?
            && v != head_dim
        {
            return Err(err(format!("value_length {v} differs from key_length {head_dim}: unsupported")));
        }
        if let Some(r) = opt_u("rope.dimension_count")?
            && r != head_dim
        {
            return Err(err(format!("partial RoPE ({r} of {head_dim} dims) is unsupported")));
        }
        let max_ctx = req_u("context_length")?;
        let eps = opt_f("attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| err(format!("missing GGUF key `{}`", key("attention.layer_norm_rms_epsilon"))))?;
        // llama.cpp's default base when the key is absent.
        let theta = opt_f("rope.freq_base")?.unwrap_or(10_000.0);
        if !(theta.is_finite() && theta > 1.0) {
            return Err(err(format!("rope.freq_base must be > 1, got {theta}")));
        }
        let scale = match g.get_str(&key("rope.scaling.type")) {
            None | Some("none") => opt_f("rope.scale_linear")?.unwrap_or(1.0),
            Some("linear") => opt_f("rope.scaling.factor")?
                .ok_or_else(|| err(format!("linear RoPE scaling without `{}`", key("rope.scaling.factor"))))?,
            Some(other) => return Err(err(format!("unsupported RoPE scaling `{other}` (only linear)"))),
        };
        if !(scale.is_finite() && scale > 0.0) {
            return Err(err(format!("RoPE scaling factor must be positive, got {scale}")));
        }

        let embd = g.tensor("token_embd.weight");
        let vocab = match embd.map(|t| t.dims.as_slice()) {
            Some([_, rows]) => usize::try_from(*rows).map_err(|_| err("token_embd.weight is too large".into()))?,
            Some(d) => return Err(err(format!("token_embd.weight has {} dims, expected 2", d.len()))),
            None => match g.get_array("tokenizer.ggml.tokens") {
                Some(Array::String(t)) => t.len(),
                _ => opt_u("vocab_size")?.ok_or_else(|| err("cannot tell the vocabulary size: no token_embd.weight, tokenizer.ggml.tokens or vocab_size".into()))?,
            },
        };

        let tok_id = |k: &str| gguf_opt(label, g, k, "a token id", |v| v.as_u64().and_then(|v| u32::try_from(v).ok()));
        let bos = tok_id("tokenizer.ggml.bos_token_id")?;
        let mut eos = Vec::new();
        // Stop at the file's EOS and, when declared, its end-of-turn token (chat models).
        for k in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = tok_id(k)?
                && !eos.contains(&id)
            {
                eos.push(id);
            }
        }
        let add_bos = match gguf_opt(label, g, "tokenizer.ggml.add_bos_token", "a boolean", GgufValue::as_bool)? {
            Some(b) => b,
            // llama.cpp's defaults: SentencePiece-style vocabularies add BOS, BPE ones do not.
            None => matches!(g.get_str("tokenizer.ggml.model"), Some("llama" | "gemma")),
        };
        let softcap = |k: &str| opt_f(k).map(|v| v.unwrap_or(0.0));
        let tied = g.tensor("output.weight").is_none();
        let name = g.get_str("general.name").unwrap_or(label).to_string();

        let cfg = match arch {
            Arch::Gemma3 => {
                let sliding_window = req_u("attention.sliding_window")?;
                // llama.cpp: Gemma 3 27B scales by hidden/heads (its query_pre_attn_scalar, 168); the
                // other sizes by head_dim. 27B is recognised by its 62 layers, as llama.cpp does.
                let qpas = if layers == 62 { hidden / heads } else { head_dim };
                ModelConfig {
                    arch,
                    vocab,
                    hidden,
                    layers,
                    heads,
                    kv_heads,
                    head_dim,
                    ffn,
                    eps,
                    max_ctx,
                    rope_full: Rope { theta, scale },
                    rope_local: Rope { theta: GEMMA3_GGUF_LOCAL_ROPE_BASE, scale: 1.0 },
                    rope_mode: RopeMode::Neox,
                    layer_kinds: pattern_kinds(layers, GEMMA3_SLIDING_PATTERN),
                    sliding_window,
                    attn_scale: pow_neg_half(qpas as f64),
                    attn_softcap: softcap("attn_logit_softcapping")?,
                    final_softcap: softcap("final_logit_softcapping")?,
                    embed_scale: libm::sqrt(hidden as f64) as f32,
                    // GGUF conversion folds Gemma's `1 + w` into the stored norm weights.
                    norm_add_one: false,
                    tied_embeddings: tied,
                    bos,
                    eos,
                    add_bos,
                    name,
                }
            }
            Arch::Llama => ModelConfig {
                arch,
                vocab,
                hidden,
                layers,
                heads,
                kv_heads,
                head_dim,
                ffn,
                eps,
                max_ctx,
                rope_full: Rope { theta, scale },
                rope_local: Rope { theta, scale },
                // llama.cpp's converter permutes Q/K rows for ggml's interleaved pairing.
                rope_mode: RopeMode::Interleaved,
                layer_kinds: vec![LayerKind::Full; layers],
                sliding_window: 0,
                attn_scale: pow_neg_half(head_dim as f64),
                attn_softcap: 0.0,
                final_softcap: 0.0,
                embed_scale: 1.0,
                norm_add_one: false,
                tied_embeddings: tied,
                bos,
                eos,
                add_bos,
                name,
            },
        };
        check_shape(label, &cfg)?;
        Ok(cfg)
    }

    /// Attention kind of `layer` (Full past the end, which callers never ask for).
    pub fn layer_kind(&self, layer: usize) -> LayerKind {
        self.layer_kinds.get(layer).copied().unwrap_or(LayerKind::Full)
    }

    /// RoPE of `layer`.
    pub fn rope(&self, layer: usize) -> Rope {
        match self.layer_kind(layer) {
            LayerKind::Full => self.rope_full,
            LayerKind::Sliding => self.rope_local,
        }
    }
}

/// Every `pattern`-th layer is global: layer `i` is Full iff `(i + 1) % pattern == 0`.
fn pattern_kinds(layers: usize, pattern: usize) -> Vec<LayerKind> {
    (0..layers).map(|i| if (i + 1) % pattern == 0 { LayerKind::Full } else { LayerKind::Sliding }).collect()
}

/// Gemma 3 text fields from `t` (the top level, or `text_config` when `nested`); token ids may sit
/// at the top level of a multimodal config, so `top` is consulted for those first.
fn gemma3_from_hf(t: &Obj<'_>, top: &Obj<'_>, nested: bool) -> Result<ModelConfig> {
    use gemma3_text_defaults as d;
    // Nested text configs inherit transformers' defaults; a top-level one must state its shape.
    let shape = |k: &str, default: usize| -> Result<usize> {
        if nested { Ok(t.usize(k)?.unwrap_or(default)) } else { t.req_usize(k) }
    };
    let vocab = shape("vocab_size", d::VOCAB_SIZE)?;
    let hidden = shape("hidden_size", d::HIDDEN_SIZE)?;
    let ffn = shape("intermediate_size", d::INTERMEDIATE_SIZE)?;
    let layers = shape("num_hidden_layers", d::NUM_HIDDEN_LAYERS)?;
    let heads = shape("num_attention_heads", d::NUM_ATTENTION_HEADS)?;
    let kv_heads = shape("num_key_value_heads", d::NUM_KEY_VALUE_HEADS)?;
    let head_dim = shape("head_dim", d::HEAD_DIM)?;
    let max_ctx = t.usize("max_position_embeddings")?.unwrap_or(d::MAX_POSITION_EMBEDDINGS);
    let eps = t.f64("rms_norm_eps")?.unwrap_or(d::RMS_NORM_EPS) as f32;
    let qpas = t.f64("query_pre_attn_scalar")?.unwrap_or(d::QUERY_PRE_ATTN_SCALAR);
    if !(qpas.is_finite() && qpas > 0.0) {
        return Err(t.err(format!("`{}query_pre_attn_scalar` must be positive, got {qpas}", t.path)));
    }
    let sliding_window = t.usize("sliding_window")?.unwrap_or(d::SLIDING_WINDOW);
    let softcap = |k: &str| -> Result<f32> { Ok(t.f64(k)?.unwrap_or(0.0) as f32) };
    let attn_softcap = softcap("attn_logit_softcapping")?;
    let final_softcap = softcap("final_logit_softcapping")?;
    if let Some(act) = t.str("hidden_activation")?.or(t.str("hidden_act")?)
        && !matches!(act, "gelu_pytorch_tanh" | "gelu_tanh")
    {
        return Err(t.err(format!("unsupported hidden_activation `{act}` (Gemma 3 uses gelu_pytorch_tanh)")));
    }
    if t.bool("attention_bias")? == Some(true) {
        return Err(t.err("attention_bias = true is unsupported"));
    }
    if t.bool("use_bidirectional_attention")? == Some(true) {
        return Err(t.err("use_bidirectional_attention = true (an embedding model) is unsupported"));
    }

    let layer_kinds = match t.get("layer_types") {
        Some(v) => {
            let a = v.as_array().ok_or_else(|| t.err(format!("`{}layer_types` is not a list", t.path)))?;
            if a.len() != layers {
                return Err(t.err(format!("`{}layer_types` has {} entries for {layers} layers", t.path, a.len())));
            }
            a.iter()
                .map(|x| match x.as_str() {
                    Some("full_attention") => Ok(LayerKind::Full),
                    Some("sliding_attention") => Ok(LayerKind::Sliding),
                    _ => Err(t.err(format!("`{}layer_types`: unknown layer type {x}", t.path))),
                })
                .collect::<Result<Vec<_>>>()?
        }
        None => {
            let p = match t.usize("sliding_window_pattern")? {
                Some(p) => p,
                None => t.usize("_sliding_window_pattern")?.unwrap_or(d::SLIDING_WINDOW_PATTERN),
            };
            if p == 0 {
                return Err(t.err(format!("`{}sliding_window_pattern` is 0", t.path)));
            }
            pattern_kinds(layers, p)
        }
    };

    let (rope_full, rope_local) = match t.obj("rope_parameters")? {
        // transformers 5.x: one entry per layer type (a flat entry applies to both).
        Some(rp) => {
            let per_type = rp.contains_key("full_attention") || rp.contains_key("sliding_attention");
            let entry = |ty: &str, fallback_key: &str, default: f64| -> Result<Rope> {
                if !per_type {
                    return rope_entry(t, rp, &format!("{}rope_parameters", t.path), fallback_key, default);
                }
                let what = format!("{}rope_parameters.{ty}", t.path);
                match rp.get(ty) {
                    Some(Value::Object(m)) => rope_entry(t, m, &what, fallback_key, default),
                    Some(_) => Err(t.err(format!("`{what}` is not an object"))),
                    None => Err(t.missing(&format!("rope_parameters.{ty}"))),
                }
            };
            let needs = |k: LayerKind| layer_kinds.contains(&k);
            let full = if needs(LayerKind::Full) || !per_type || rp.contains_key("full_attention") {
                entry("full_attention", "rope_theta", d::ROPE_THETA)?
            } else {
                Rope { theta: d::ROPE_THETA as f32, scale: 1.0 }
            };
            let local = if needs(LayerKind::Sliding) || !per_type || rp.contains_key("sliding_attention") {
                entry("sliding_attention", "rope_local_base_freq", d::ROPE_LOCAL_BASE_FREQ)?
            } else {
                full
            };
            (full, local)
        }
        // transformers 4.x: rope_scaling applies to the global layers only.
        None => {
            let full = rope_legacy(t, d::ROPE_THETA)?;
            let local = t.f64("rope_local_base_freq")?.unwrap_or(d::ROPE_LOCAL_BASE_FREQ);
            (full, Rope { theta: check_theta(t, local, &format!("{}rope_local_base_freq", t.path))?, scale: 1.0 })
        }
    };

    // Multimodal configs keep token ids (eos [1, 106] for -it models) at the top level.
    let bos = match top.ids("bos_token_id")?.or(if nested { t.ids("bos_token_id")? } else { None }) {
        Some(v) => v.first().copied(),
        None => Some(d::BOS_TOKEN_ID),
    };
    let eos = top
        .ids("eos_token_id")?
        .or(if nested { t.ids("eos_token_id")? } else { None })
        .unwrap_or_else(|| vec![d::EOS_TOKEN_ID]);
    let tied = match top.bool("tie_word_embeddings")? {
        Some(b) => b,
        None => t.bool("tie_word_embeddings")?.unwrap_or(d::TIE_WORD_EMBEDDINGS),
    };

    Ok(ModelConfig {
        arch: Arch::Gemma3,
        vocab,
        hidden,
        layers,
        heads,
        kv_heads,
        head_dim,
        ffn,
        eps,
        max_ctx,
        rope_full,
        rope_local,
        rope_mode: RopeMode::Neox,
        layer_kinds,
        sliding_window,
        attn_scale: pow_neg_half(qpas),
        attn_softcap,
        final_softcap,
        embed_scale: libm::sqrt(hidden as f64) as f32,
        norm_add_one: true,
        tied_embeddings: tied,
        bos,
        eos,
        add_bos: true,
        name: String::new(),
    })
}

/// Llama / Mistral (`LlamaConfig` / `MistralConfig` defaults for omitted numerics).
fn llama_from_hf(t: &Obj<'_>, mistral: bool) -> Result<ModelConfig> {
    let vocab = t.req_usize("vocab_size")?;
    let hidden = t.req_usize("hidden_size")?;
    let ffn = t.req_usize("intermediate_size")?;
    let layers = t.req_usize("num_hidden_layers")?;
    let heads = t.req_usize("num_attention_heads")?;
    if heads == 0 {
        return Err(t.err("num_attention_heads is 0"));
    }
    let kv_heads = t.usize("num_key_value_heads")?.unwrap_or(heads);
    let head_dim = match t.usize("head_dim")? {
        Some(d) => d,
        None if hidden.is_multiple_of(heads) => hidden / heads,
        None => {
            return Err(
                t.err(format!("hidden_size {hidden} is not a multiple of {heads} heads and head_dim is missing"))
            );
        }
    };
    let max_ctx = t.usize("max_position_embeddings")?.unwrap_or(if mistral { 131_072 } else { 2048 });
    let eps = t.f64("rms_norm_eps")?.unwrap_or(1e-6) as f32;
    if let Some(act) = t.str("hidden_act")?
        && act != "silu"
    {
        return Err(t.err(format!("unsupported hidden_act `{act}` (only silu)")));
    }
    for k in ["attention_bias", "mlp_bias"] {
        if t.bool(k)? == Some(true) {
            return Err(t.err(format!("`{k}` = true is unsupported")));
        }
    }
    let default_theta = 10_000.0;
    let rope = match t.obj("rope_parameters")? {
        // transformers 5.x folds theta and scaling into one object.
        Some(m) => rope_entry(t, m, "rope_parameters", "rope_theta", default_theta)?,
        None => rope_legacy(t, default_theta)?,
    };
    // Mistral v0.1 attends within a window on every layer (MistralConfig defaults to 4096);
    // later releases set it to null.
    let sliding_window = if mistral {
        match t.map.get("sliding_window") {
            None => 4096,
            Some(Value::Null) => 0,
            Some(_) => t.req_usize("sliding_window")?,
        }
    } else {
        0
    };
    let kind = if sliding_window > 0 { LayerKind::Sliding } else { LayerKind::Full };
    let bos = match t.ids("bos_token_id")? {
        Some(v) => v.first().copied(),
        None => Some(1),
    };
    let eos = t.ids("eos_token_id")?.unwrap_or_else(|| vec![2]);
    Ok(ModelConfig {
        arch: Arch::Llama,
        vocab,
        hidden,
        layers,
        heads,
        kv_heads,
        head_dim,
        ffn,
        eps,
        max_ctx,
        rope_full: rope,
        rope_local: rope,
        // HF checkpoints keep Q/K in rotate_half order.
        rope_mode: RopeMode::Neox,
        layer_kinds: vec![kind; layers],
        sliding_window,
        attn_scale: pow_neg_half(head_dim as f64),
        attn_softcap: 0.0,
        final_softcap: 0.0,
        embed_scale: 1.0,
        norm_add_one: false,
        tied_embeddings: t.bool("tie_word_embeddings")?.unwrap_or(false),
        bos,
        eos,
        // config.json does not say; `ModelSource::open` overrides from tokenizer_config.json.
        add_bos: true,
        name: String::new(),
    })
}

//! Model hyper-parameters, from HF `config.json` or GGUF metadata.

use alloc::string::String;
use alloc::vec::Vec;
use purehw_hal::RopeMode;

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

//! A model's files, opened: its [`ModelConfig`], its tensors by [`Role`], and what the tokenizer
//! and chat template need.
//!
//! CONTRACT (implementation pending).

use alloc::string::String;
use alloc::vec::Vec;
use purehw_hal::HostWeight;

use crate::config::ModelConfig;
use crate::Result;

/// What a tensor is for, independent of the file's naming scheme.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// `(vocab, hidden)`
    TokenEmbd,
    /// `(vocab, hidden)`; absent when tied to `TokenEmbd`.
    Output,
    /// `(hidden)`
    OutputNorm,
    /// Per layer, `(hidden)`: before attention.
    AttnNorm,
    /// `(heads·head_dim, hidden)`
    AttnQ,
    /// `(kv_heads·head_dim, hidden)`
    AttnK,
    /// `(kv_heads·head_dim, hidden)`
    AttnV,
    /// `(hidden, heads·head_dim)`
    AttnOut,
    /// `(head_dim)` Gemma QK-norm.
    AttnQNorm,
    /// `(head_dim)`
    AttnKNorm,
    /// `(hidden)` Gemma: after attention, before the residual add.
    PostAttnNorm,
    /// `(hidden)` before the MLP (Gemma `pre_feedforward_layernorm`, Llama `post_attention_layernorm`).
    FfnNorm,
    /// `(ffn, hidden)`
    FfnGate,
    /// `(ffn, hidden)`
    FfnUp,
    /// `(hidden, ffn)`
    FfnDown,
    /// `(hidden)` Gemma: after the MLP, before the residual add.
    PostFfnNorm,
}

/// Which kind of files a model came from.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Gguf,
    Safetensors,
}

/// One tensor as stored, for `inspect`.
#[derive(Clone, Debug)]
pub struct TensorSummary {
    pub name: String,
    /// `"Q4_K"`, `"BF16"`, `"I32"`, …
    pub dtype: String,
    /// Outermost first (HF order).
    pub shape: Vec<usize>,
    pub bytes: usize,
}

/// An opened model.
pub struct ModelSource {
    pub config: ModelConfig,
    pub kind: SourceKind,
    /// Path or label used in error messages.
    pub label: String,
}

impl ModelSource {
    /// The tensor for `role` (of `layer`, for per-layer roles) as a 2-D weight (`rows, cols`; a
    /// vector is `1, n`), or `Ok(None)` when the model does not have it (e.g. `Output` when tied).
    /// Shape and byte size are checked; a mismatch is an error naming the tensor and the file.
    pub fn weight(&self, role: Role, layer: Option<usize>) -> Result<Option<HostWeight>> {
        let _ = (role, layer);
        unimplemented!()
    }

    /// Every tensor, for `inspect`.
    pub fn tensors(&self) -> Vec<TensorSummary> {
        unimplemented!()
    }
}

//! HF safetensors checkpoints: single file or sharded (`model.safetensors.index.json`).
//!
//! CONTRACT (implementation pending).

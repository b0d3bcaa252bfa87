//! purehw's engine: weight files, models and the transformer step, generic over a
//! [`purehw_hal::Backend`].
//!
//! * [`gguf`], [`safetensors`]: parse weight files from any `&[u8]` (mmap under `std`).
//! * [`config`]: one [`config::ModelConfig`] from HF `config.json` (4.x and 5.x styles, nested
//!   `text_config`) or GGUF metadata.
//! * [`source`]: a model's files opened (`std`): config, tensors by role, tokenizer hints.
//! * [`model`]: Gemma 3 and Llama, prefill and decode with a KV cache.
//! * [`sampling`]: greedy, temperature, top-k/p, min-p, penalties, seeded RNG.
//! * [`tokenizer`] (`std`): tokenizer.json, or built from a GGUF's vocabulary.
#![no_std]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod model;
pub mod sampling;
pub mod safetensors;
pub mod source;
#[cfg(feature = "std")]
pub mod tokenizer;

pub use error::{Error, Result};
pub use purehw_hal as hal;

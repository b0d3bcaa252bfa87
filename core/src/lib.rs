//! purehw's engine: weight files, models and the transformer step, generic over a
//! [`purehw_hal::Backend`].
//!
//! * [`gguf`], [`safetensors`]: parse weight files from any `&[u8]` (mmap under `std`).
//! * [`config`]: one [`config::ModelConfig`] from HF `config.json` (4.x and 5.x styles, nested
//!   `text_config`) or GGUF metadata.
//! * [`source`]: a model's files opened (`std`): config, tensors by role, tokenizer hints.
//! * [`model`]: Gemma 3 and Llama, prefill and decode with a KV cache.
//! * [`stream`]: a weight budget: layers read ahead and released around the step that uses them.
//! * [`sampling`]: greedy, temperature, top-k/p, min-p, penalties, seeded RNG.
//! * [`tokenizer`] (`std`): tokenizer.json, or built from a GGUF's vocabulary.
//! * [`quantize`] (`std`): a float checkpoint or GGUF written as a compressed-tensors one.
//!
//! Dependencies beyond the kept list: `serde`/`serde_json` read `config.json` and safetensors
//! headers without `std`; `libm` gives f32 math without `std`. The `safetensors` crate is not
//! used for parsing: it accepts duplicate header keys and its errors do not always name the
//! tensor, and every malformed header must be an error naming the tensor and the file.
//! `memmap2` maps weight files and advises their pages (the `unsafe` calls, in `source.rs`;
//! `libc` gives the page size). The `safetensors` crate does
//! write: `quantize`'s output, whose tensors we make ourselves.
#![no_std]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod model;
pub mod quantization;
#[cfg(feature = "std")]
pub mod quantize;
pub mod safetensors;
pub mod sampling;
pub mod source;
pub mod stream;
#[cfg(feature = "std")]
pub mod tokenizer;

pub use error::{Error, Result};
pub use purehw_hal as hal;

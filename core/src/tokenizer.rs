//! Tokenizers: HF tokenizer.json through the `tokenizers` crate, or built from a GGUF vocabulary.
//!
//! CONTRACT (implementation pending).

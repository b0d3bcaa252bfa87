//! Tokenizers: HF `tokenizer.json` through the `tokenizers` crate, or built from a GGUF vocabulary.
//!
//! Every source gives the ids HF gives for the same model:
//! * [`Tokenizer::from_file`] / [`Tokenizer::from_json_bytes`]: a `tokenizer.json` through the
//!   `tokenizers` crate (plus the `tokenizer_config.json` beside it, when present, for BOS/EOS and
//!   `add_bos_token`).
//! * [`Tokenizer::from_gguf`]: `tokenizer.ggml.model` = `llama` (SentencePiece vocabulary with
//!   scores, e.g. Gemma 3: native, `spm.rs`, reproducing HF's converted tokenizer) or `gpt2`
//!   (byte-level BPE with merges, e.g. SmolLM2: a `tokenizers` pipeline built in code).
//!
//! Special tokens written in the text (`<start_of_turn>`, `<|im_start|>`, …) are always matched
//! whole. [`Tokenizer::decode`] skips nothing; [`Decoder`] streams text id by id without ever
//! splitting a UTF-8 character.

mod gguf;
mod spm;
mod stream;

use std::borrow::ToOwned;
use std::boxed::Box;
use std::format;
use std::path::Path;
use std::string::{String, ToString};
use std::vec::Vec;

use serde_json::Value as Json;
use tokenizers::Tokenizer as HfTokenizer;

use crate::gguf::GgufFile;
use crate::{Error, Result};

pub use stream::Decoder;

/// Names that end generation wherever they are in a vocabulary (llama.cpp's end-of-generation list,
/// plus the plain `<eos>` / `</s>`), besides the EOS a file declares.
const EOG_NAMES: &[&str] = &[
    "<eos>",
    "</s>",
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

enum Engine {
    // Both boxed: each is kilobytes inline.
    Hf(Box<HfTokenizer>),
    Spm(Box<spm::Spm>),
}

/// A text tokenizer: encode, decode, stream, and the special ids a runner needs.
pub struct Tokenizer {
    engine: Engine,
    /// Names the source in error messages.
    label: String,
    bos: Option<u32>,
    /// Declared EOS first, then other end-of-generation tokens.
    eos: Vec<u32>,
    add_bos: bool,
    /// One past the largest id (model vocabulary and added tokens).
    vocab_size: usize,
}

impl core::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("label", &self.label)
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

impl Tokenizer {
    /// Load a `tokenizer.json`; reads `tokenizer_config.json` from the same folder if it exists.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let label = path.display().to_string();
        let json = std::fs::read(path).map_err(|source| Error::Io { file: label.clone(), source })?;
        let config_path = path.with_file_name("tokenizer_config.json");
        let config = match std::fs::read(&config_path) {
            Ok(bytes) => Some((config_path.display().to_string(), bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(Error::Io { file: config_path.display().to_string(), source });
            }
        };
        Self::from_json_parts(&label, &json, config.as_ref().map(|(l, b)| (l.as_str(), b.as_slice())))
    }

    /// A `tokenizer.json` held in memory (no `tokenizer_config.json`).
    pub fn from_json_bytes(json: &[u8]) -> Result<Self> {
        Self::from_json_parts("tokenizer.json", json, None)
    }

    /// A `tokenizer.json` and, optionally, its `tokenizer_config.json` as `(label, bytes)`.
    pub fn from_json_parts(label: &str, json: &[u8], config: Option<(&str, &[u8])>) -> Result<Self> {
        // `tokenizers` has `expect`s on some malformed inputs: a panic there is this file's error.
        let inner = std::panic::catch_unwind(|| HfTokenizer::from_bytes(json))
            .map_err(|_| Error::format(label, "malformed tokenizer (the tokenizers crate panicked)"))?
            .map_err(|e| Error::format(label, e.to_string()))?;
        let config = match config {
            Some((config_label, bytes)) => {
                Some(serde_json::from_slice::<Json>(bytes).map_err(|e| Error::format(config_label, e.to_string()))?)
            }
            None => None,
        };
        let token_named = |key: &str| -> Option<u32> {
            let name = config.as_ref().and_then(|c| c.get(key)).and_then(token_content)?;
            inner.token_to_id(name)
        };

        // BOS: the config names it; else the post-processor's template puts it before the text.
        let template_bos = template_bos(&inner);
        let bos = token_named("bos_token").or(template_bos);
        let add_bos = config
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(Json::as_bool)
            .unwrap_or(template_bos.is_some());

        let mut eos = Vec::new();
        push_unique(&mut eos, token_named("eos_token"));
        let added = inner.get_added_tokens_decoder();
        let mut added_ids: Vec<u32> = added.keys().copied().collect();
        added_ids.sort_unstable();
        for id in &added_ids {
            if EOG_NAMES.contains(&added[id].content.as_str()) {
                push_unique(&mut eos, Some(*id));
            }
        }

        let model_size = inner.get_vocab_size(false);
        let vocab_size = added_ids.last().map_or(model_size, |&m| model_size.max(m as usize + 1));
        Ok(Tokenizer { engine: Engine::Hf(Box::new(inner)), label: label.to_owned(), bos, eos, add_bos, vocab_size })
    }

    /// Build from a GGUF's `tokenizer.ggml.*` metadata; `label` names the file in errors.
    pub fn from_gguf(label: &str, gguf: &GgufFile) -> Result<Self> {
        gguf::build(label, gguf)
    }

    /// Token ids of `text`, with BOS first if `add_bos`. Special tokens in the text are parsed as
    /// special tokens.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let bos =
            if add_bos {
                Some(self.bos.ok_or_else(|| {
                    Error::Invalid(format!("{}: BOS requested but this tokenizer has none", self.label))
                })?)
            } else {
                None
            };
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        ids.extend(bos);
        match &self.engine {
            Engine::Hf(hf) => {
                let encoding = hf
                    .encode_fast(text, false)
                    .map_err(|e| Error::Invalid(format!("{}: cannot encode text: {e}", self.label)))?;
                ids.extend_from_slice(encoding.get_ids());
            }
            Engine::Spm(spm) => spm.encode(text, &mut ids),
        }
        Ok(ids)
    }

    /// Text of `ids`, skipping nothing (special tokens appear as written). Byte-fallback pieces
    /// are fused into UTF-8; invalid byte sequences come out as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.check_ids(ids)?;
        match &self.engine {
            Engine::Hf(hf) => {
                hf.decode(ids, false).map_err(|e| Error::Invalid(format!("{}: cannot decode: {e}", self.label)))
            }
            Engine::Spm(spm) => Ok(spm.decode(ids)),
        }
    }

    /// A streaming decoder: feed ids one by one, get text that never splits a character.
    pub fn decode_stream(&self) -> Decoder<'_> {
        Decoder::new(self)
    }

    /// The vocabulary entry of `id` as stored (`▁the`, `Ġthe`, `<0x0A>`, `<start_of_turn>`).
    pub fn token_to_piece(&self, id: u32) -> Option<String> {
        match &self.engine {
            Engine::Hf(hf) => hf.id_to_token(id),
            Engine::Spm(spm) => ((id as usize) < spm.len()).then(|| spm.piece(id).to_owned()),
        }
    }

    /// The id of a vocabulary entry or added token, spelled as stored.
    pub fn id_of(&self, piece: &str) -> Option<u32> {
        match &self.engine {
            Engine::Hf(hf) => hf.token_to_id(piece),
            Engine::Spm(spm) => spm.lookup(piece),
        }
    }

    /// Whether `id` is a special (added) token, matched whole in text: `<start_of_turn>`, …
    pub fn is_special(&self, id: u32) -> bool {
        match &self.engine {
            Engine::Hf(hf) => hf.get_added_vocabulary().simple_id_to_token(id).is_some(),
            Engine::Spm(spm) => spm.is_added(id),
        }
    }

    /// One past the largest id this tokenizer can produce or decode.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Ids that end generation: the declared EOS first, then other end-of-turn tokens.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Whether this model's prompts normally start with BOS.
    pub fn add_bos_default(&self) -> bool {
        self.add_bos
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(id) => Err(Error::Invalid(format!(
                "{}: token id {id} is out of range (vocabulary of {})",
                self.label, self.vocab_size
            ))),
            None => Ok(()),
        }
    }
}

fn push_unique(ids: &mut Vec<u32>, id: Option<u32>) {
    if let Some(id) = id
        && !ids.contains(&id)
    {
        ids.push(id);
    }
}

/// A special token in `tokenizer_config.json`: a string or `{"content": …}`.
fn token_content(v: &Json) -> Option<&str> {
    match v {
        Json::String(s) => Some(s),
        Json::Object(o) => o.get("content").and_then(Json::as_str),
        _ => None,
    }
}

/// The token the post-processor puts before the text, if it puts exactly one there.
fn template_bos(tok: &HfTokenizer) -> Option<u32> {
    let pp = serde_json::to_value(tok.get_post_processor()?).ok()?;
    processor_bos(&pp)
}

fn processor_bos(pp: &Json) -> Option<u32> {
    match pp.get("type")?.as_str()? {
        "Sequence" => pp.get("processors")?.as_array()?.iter().find_map(processor_bos),
        "TemplateProcessing" => {
            let single = pp.get("single")?.as_array()?;
            let first = single.first()?.get("SpecialToken")?.get("id")?.as_str()?;
            let ids = pp.get("special_tokens")?.get(first)?.get("ids")?.as_array()?;
            match ids.as_slice() {
                [id] => id.as_u64().and_then(|id| u32::try_from(id).ok()),
                _ => None,
            }
        }
        "BertProcessing" | "RobertaProcessing" => pp.get("cls")?.get(1)?.as_u64().and_then(|id| u32::try_from(id).ok()),
        _ => None,
    }
}

//! A tokenizer from a GGUF's `tokenizer.ggml.*` metadata that gives the ids HF gives for the same
//! model (HF's own GGUF conversion, and the model's published `tokenizer.json`).
//!
//! * `llama` (SentencePiece vocabulary + scores): [`super::spm`], a BPE whose merges are every
//!   split of a piece into two pieces, ranked as HF's SentencePiece conversion ranks them (score of
//!   the merged piece, then longer left piece, then longer right piece). For Gemma 3 this
//!   reproduces the published `tokenizer.json` merge list exactly.
//! * `gpt2` (byte-level BPE): a `tokenizers` BPE with the file's merges, and the pre-tokenizer
//!   `tokenizer.ggml.pre` names.
//!
//! CONTROL (3) and USER_DEFINED (4) tokens are added tokens, matched whole in the raw text.

use std::borrow::ToOwned;
use std::boxed::Box;
use std::format;
use std::string::String;
use std::vec;
use std::vec::Vec;

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use super::spm::{Spm, SpmVocab};
use super::{EOG_NAMES, Engine, Tokenizer, push_unique};
use crate::gguf::{Array, GgufFile, Value};
use crate::{Error, Result};

const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// GPT-2's split (the one `ByteLevel` applies itself), after isolating every digit.
const PRE_DIGITS_THEN_GPT2: &[&str] = &["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"];
const PRE_GPT2: &[&str] = &["gpt-2", "gpt2", "default", "mpt", "olmo", "jais", "trillion"];
const PRE_LLAMA3: &[&str] = &["llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe", "pixtral"];
const PRE_QWEN2: &[&str] = &["qwen2", "deepseek-r1-qwen", "megrez"];
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub(super) fn build(label: &str, g: &GgufFile) -> Result<Tokenizer> {
    let bad = |msg: String| Error::format(label, msg);
    let model = g
        .get_str("tokenizer.ggml.model")
        .ok_or_else(|| bad("no tokenizer.ggml.model: the file carries no tokenizer".into()))?;
    let tokens = match g.get_array("tokenizer.ggml.tokens") {
        Some(Array::String(t)) if !t.is_empty() => t,
        _ => return Err(bad("tokenizer.ggml.tokens is missing or not a list of strings".into())),
    };
    let n = tokens.len();
    // Ids are u32.
    if u32::try_from(n).is_err() {
        return Err(bad(format!("{n} tokens: too many")));
    }
    let types = match g.get_array("tokenizer.ggml.token_type") {
        None => None,
        Some(a) => {
            let t = int_array(a).ok_or_else(|| bad("tokenizer.ggml.token_type is not integers".into()))?;
            if t.len() != n {
                return Err(bad(format!("tokenizer.ggml.token_type has {} entries for {n} tokens", t.len())));
            }
            Some(t)
        }
    };
    let special_id = |key: &str| -> Result<Option<u32>> {
        let full = format!("tokenizer.ggml.{key}");
        match g.get(&full) {
            None => Ok(None),
            // Some converters write -1 (or u32::MAX) for "none".
            Some(Value::I32(-1) | Value::I64(-1)) => Ok(None),
            Some(_) => match g.get_u64(&full) {
                Some(id) if id < n as u64 => Ok(Some(id as u32)),
                Some(id) if id == u32::MAX as u64 => Ok(None),
                _ => Err(bad(format!("{full} is not a token id below {n}"))),
            },
        }
    };
    let bos = special_id("bos_token_id")?;
    let eos = special_id("eos_token_id")?;
    let unk = special_id("unknown_token_id")?;
    let pad = special_id("padding_token_id")?;
    let eot = special_id("eot_token_id")?;
    let eom = special_id("eom_token_id")?;

    // Whether a token is matched whole in the raw text. Without types, only the declared ones.
    let is_added = |i: usize| match &types {
        Some(t) => t[i] == CONTROL || t[i] == USER_DEFINED,
        None => [bos, eos, unk, pad, eot, eom].contains(&Some(i as u32)),
    };
    let is_control = |i: usize| match &types {
        Some(t) => t[i] == CONTROL,
        None => true,
    };

    let engine = match model {
        "llama" => {
            let scores = match g.get_array("tokenizer.ggml.scores") {
                Some(Array::F32(s)) if s.len() == n => s,
                _ => {
                    return Err(bad(format!(
                        "tokenizer.ggml.scores must be {n} f32 values for a llama (SentencePiece) vocabulary"
                    )));
                }
            };
            // SentencePiece scores USER_DEFINED pieces 0; llama.cpp's converter stores -1000.
            let rank_score = |i: usize| match &types {
                Some(t) if t[i] == USER_DEFINED => 0.0,
                _ => scores[i],
            };
            let spm = Spm::new(SpmVocab {
                label,
                tokens,
                rank_score: &rank_score,
                added: &is_added,
                unk,
                add_space_prefix: g.get_bool("tokenizer.ggml.add_space_prefix").unwrap_or(true),
            })
            .map_err(bad)?;
            Engine::Spm(Box::new(spm))
        }
        "gpt2" => {
            let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
            let mut hf = byte_level_bpe(label, g, tokens, pre)?;
            let added: Vec<AddedToken> = (0..n)
                .filter(|&i| is_added(i) && !tokens[i].is_empty())
                .map(|i| AddedToken::from(tokens[i].clone(), is_control(i)).normalized(false))
                .collect();
            hf.add_tokens(&added);
            Engine::Hf(Box::new(hf))
        }
        other => {
            return Err(bad(format!("tokenizer.ggml.model {other:?} is not supported (llama and gpt2 are)")));
        }
    };

    let mut eos_ids = Vec::new();
    for id in [eos, eot, eom] {
        push_unique(&mut eos_ids, id);
    }
    for i in (0..n).filter(|&i| is_added(i)) {
        let piece = match &engine {
            Engine::Spm(spm) => spm.piece(i as u32),
            Engine::Hf(_) => tokens[i].as_str(),
        };
        if EOG_NAMES.contains(&piece) {
            push_unique(&mut eos_ids, Some(i as u32));
        }
    }
    let add_bos = g.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(model == "llama");

    Ok(Tokenizer { engine, label: label.to_owned(), bos, eos: eos_ids, add_bos, vocab_size: n })
}

/// Byte-level BPE with the file's merges.
fn byte_level_bpe(label: &str, g: &GgufFile, tokens: &[String], pre: &str) -> Result<HfTokenizer> {
    let bad = |msg: String| Error::format(label, msg);
    let merges = match g.get_array("tokenizer.ggml.merges") {
        Some(Array::String(m)) => m,
        _ => return Err(bad("tokenizer.ggml.merges is missing or not a list of strings".into())),
    };
    // Of duplicates the last wins, as in llama.cpp and HF.
    let mut vocab = Vocab::with_capacity(tokens.len());
    let mut duplicates = 0usize;
    for (i, t) in tokens.iter().enumerate() {
        duplicates += usize::from(vocab.insert(t.clone(), i as u32).is_some());
    }
    if duplicates > 0 {
        log::warn!("{label}: {duplicates} duplicate vocabulary entries; only the last of each is encodable");
    }
    let pairs = merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => Ok((a.to_owned(), b.to_owned())),
            _ => Err(bad(format!("tokenizer.ggml.merges[{i}] = {m:?} is not two pieces"))),
        })
        .collect::<Result<Vec<_>>>()?;

    let gpt2 = || ByteLevel::new(false, true, true);
    let split_then_bytes = |re: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| bad(format!("pre-tokenizer regex: {e}")))?;
        Ok(PreSequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into())
    };
    let mut ignore_merges = false;
    let pre_tokenizer: PreTokenizerWrapper = if PRE_DIGITS_THEN_GPT2.contains(&pre) {
        PreSequence::new(vec![Digits::new(true).into(), gpt2().into()]).into()
    } else if PRE_LLAMA3.contains(&pre) {
        ignore_merges = true;
        split_then_bytes(LLAMA3_SPLIT)?
    } else if PRE_QWEN2.contains(&pre) {
        split_then_bytes(QWEN2_SPLIT)?
    } else {
        if !PRE_GPT2.contains(&pre) {
            log::warn!("{label}: pre-tokenizer {pre:?} unknown here; using GPT-2's split");
        }
        gpt2().into()
    };

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| bad(format!("cannot build the vocabulary: {e}")))?;
    let mut tok = HfTokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevel::default()));
    Ok(tok)
}

/// Any integer array as i64 (token types are i32 in practice).
fn int_array(a: &Array) -> Option<Vec<i64>> {
    Some(match a {
        Array::I32(v) => v.iter().map(|&x| x as i64).collect(),
        Array::U32(v) => v.iter().map(|&x| x as i64).collect(),
        Array::I8(v) => v.iter().map(|&x| x as i64).collect(),
        Array::U8(v) => v.iter().map(|&x| x as i64).collect(),
        Array::I16(v) => v.iter().map(|&x| x as i64).collect(),
        Array::U16(v) => v.iter().map(|&x| x as i64).collect(),
        Array::I64(v) => v.clone(),
        Array::U64(v) => v.iter().map(|&x| i64::try_from(x).unwrap_or(i64::MAX)).collect(),
        _ => return None,
    })
}

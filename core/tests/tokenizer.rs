//! Tokenizer against the reference ids in shared/fixtures, from tokenizer.json and from GGUF.
//!
//! Fixtures: `$PUREHW_FIXTURES`, else `<repo>/../shared/fixtures`. Models: `$PUREHW_MODELS`, else
//! `$XDG_CACHE_HOME` (or `~/.cache`) + `/purehw/models`. A test whose model file is absent
//! fails with the command that fetches it.

use std::sync::OnceLock;

use purehw_core::gguf::{self, Array, GgufFile, Value};
use purehw_core::tokenizer::Tokenizer;
use purehw_kernels::testing::Rng;
use serde_json::Value as Json;

mod source_common;
use source_common::{fixtures_dir, model_file};

struct Case {
    name: String,
    prompt: String,
    input_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    greedy_text: String,
}

fn cases(model: &str) -> Vec<Case> {
    let path = fixtures_dir().join(model).join("cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: Json = serde_json::from_str(&text).unwrap();
    let ids = |v: &Json| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| u32::try_from(x.as_u64().unwrap()).unwrap()).collect()
    };
    let cases: Vec<Case> = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().into(),
            prompt: c["prompt"].as_str().unwrap().into(),
            input_ids: ids(&c["input_ids"]),
            greedy_ids: ids(&c["greedy_ids"]),
            greedy_text: c["greedy_text"].as_str().unwrap().into(),
        })
        .collect();
    assert!(!cases.is_empty(), "{}: no cases", path.display());
    cases
}

fn load_gguf(rel: &str) -> Option<Tokenizer> {
    let path = model_file(rel)?;
    let bytes = std::fs::read(&path).unwrap();
    let file = gguf::parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Some(Tokenizer::from_gguf(&path.display().to_string(), &file).unwrap())
}

fn gemma_json() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = model_file("gemma3-270m/tokenizer.json")?;
        Some(Tokenizer::from_file(&path).unwrap())
    })
    .as_ref()
}

fn gemma_gguf() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| load_gguf("gemma3-270m/gemma-3-270m-q4_k_m.gguf")).as_ref()
}

fn smollm_gguf() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| load_gguf("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")).as_ref()
}

/// Every fixture case: prompt ids, greedy text, round trip, streaming.
fn check_cases(tok: &Tokenizer, model: &str) -> usize {
    let bos = tok.bos_id();
    let bos_piece = bos.and_then(|b| tok.token_to_piece(b));
    let mut checked = 0;
    for case in cases(model) {
        // BOS is added unless the prompt already writes it out (ChatML's <|im_start|> is BOS).
        let written = bos_piece.as_deref().is_some_and(|p| case.prompt.starts_with(p));
        let add_bos = case.input_ids.first().copied() == bos && !written;
        let ids = tok.encode(&case.prompt, add_bos).unwrap();
        assert_eq!(ids, case.input_ids, "{model}/{}: input_ids", case.name);
        let text = tok.decode(&case.greedy_ids).unwrap();
        assert_eq!(text, case.greedy_text, "{model}/{}: greedy_text", case.name);
        let plain = tok.encode(&case.prompt, false).unwrap();
        assert_eq!(tok.decode(&plain).unwrap(), case.prompt, "{model}/{}: round trip", case.name);
        assert_eq!(stream(tok, &case.greedy_ids), case.greedy_text, "{model}/{}: stream", case.name);
        checked += 1;
    }
    checked
}

/// Decode through the streaming decoder; no chunk may end inside a character.
fn stream(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut dec = tok.decode_stream();
    let mut out = String::new();
    for &id in ids {
        let chunk = dec.push(id).unwrap();
        assert!(!chunk.ends_with('\u{FFFD}'), "chunk {chunk:?} ends in U+FFFD");
        out.push_str(&chunk);
    }
    out.push_str(&dec.finish().unwrap());
    out
}

/// Our own cases; none carries golden ids: they compare two sources, or round-trip.
const EXTRA: &[&str] = &[
    "",
    " ",
    "     ",
    "a  b   c    d",
    " leading and trailing ",
    "tabs\tand\t\ttabs\t\t\t!",
    "line\nbreaks\n\n\nand\r\nCRLF\n",
    "  \n \t mixed \t\n  ",
    "x                                        y", // 40 spaces: longer than any space token
    "1234567890 3.14159 00042 1,000,000",
    "emoji 🐱🐶👍🏽 and ZWJ 👨‍👩‍👧 family",
    "中文字符和日本語のテキスト、한국어도",
    "Ünïcödé àccents, ß, Ω, ½, ∑, 𝔘",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "before <start_of_turn> middle <end_of_turn>after",
    "<|im_start|>user\nHi<|im_end|>\n",
    "not a special <start_of_turn token",
    "▁literal▁marks▁",
    "<0x41> is not a byte",
    "def f(x):\n    return x ** 2  # square\n",
    "\u{0}\u{1}\u{7f}\u{80}\u{ffff}",
];

#[test]
fn gemma3_tokenizer_json_matches_fixtures() {
    let Some(tok) = gemma_json() else { return };
    let n = check_cases(tok, "gemma3-270m");
    eprintln!("gemma3 tokenizer.json: {n} fixture cases");
    assert_eq!(tok.bos_id(), tok.id_of("<bos>"));
    assert!(tok.add_bos_default());
}

#[test]
fn gemma3_gguf_matches_fixtures() {
    let Some(tok) = gemma_gguf() else { return };
    let n = check_cases(tok, "gemma3-270m");
    eprintln!("gemma3 GGUF: {n} fixture cases");
    assert_eq!(tok.bos_id(), tok.id_of("<bos>"));
    assert!(tok.add_bos_default());
    let eos = tok.eos_ids();
    assert_eq!(eos.first().copied(), tok.id_of("<eos>"));
    assert!(eos.contains(&tok.id_of("<end_of_turn>").unwrap()));
}

#[test]
fn smollm2_gguf_matches_fixtures() {
    let Some(tok) = smollm_gguf() else { return };
    let n = check_cases(tok, "smollm2-135m");
    eprintln!("smollm2 GGUF: {n} fixture cases");
    assert_eq!(tok.bos_id(), tok.id_of("<|im_start|>"));
    assert!(!tok.add_bos_default());
    assert!(tok.eos_ids().contains(&tok.id_of("<|im_end|>").unwrap()));
}

#[test]
fn gemma3_gguf_agrees_with_tokenizer_json() {
    let (Some(json), Some(gguf)) = (gemma_json(), gemma_gguf()) else { return };
    for text in EXTRA {
        let a = json.encode(text, true).unwrap();
        let b = gguf.encode(text, true).unwrap();
        assert_eq!(a, b, "ids differ for {text:?}");
        assert_eq!(json.decode(&a).unwrap(), gguf.decode(&b).unwrap(), "text differs for {text:?}");
        // A literal '▁' in the text decodes as a space (as in HF): no round trip for those.
        let expect = text.replace('\u{2581}', " ");
        let plain = gguf.encode(text, false).unwrap();
        assert_eq!(gguf.decode(&plain).unwrap(), expect, "round trip of {text:?}");
        assert_eq!(stream(gguf, &plain), expect, "stream of {text:?}");
        assert_eq!(stream(json, &plain), expect, "stream of {text:?} (json)");
    }
    for piece in ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "\n", "\n\n", "\t", "<0x41>", "▁the"] {
        assert_eq!(json.id_of(piece), gguf.id_of(piece), "id of {piece:?}");
    }
    // Every GGUF id: same piece, same text, same special status as tokenizer.json.
    for id in 0..gguf.vocab_size() as u32 {
        assert_eq!(json.token_to_piece(id), gguf.token_to_piece(id), "piece of id {id}");
        assert_eq!(json.decode(&[id]).unwrap(), gguf.decode(&[id]).unwrap(), "decode of id {id}");
        assert_eq!(json.is_special(id), gguf.is_special(id), "special status of id {id}");
    }
}

/// Random texts from vocabulary pieces, special tokens, whitespace runs, digits and odd
/// characters: the GGUF-built tokenizer must give tokenizer.json's ids on every one.
#[test]
fn gemma3_gguf_agrees_with_tokenizer_json_on_random_text() {
    let (Some(json), Some(gguf)) = (gemma_json(), gemma_gguf()) else { return };
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut next = move |n: u64| rng.next_u64() % n;
    let specials =
        ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unused7>", "<table>", "[multimodal]"];
    let odd = [
        '\u{0}',
        '\u{7f}',
        '\u{85}',
        '\u{a0}',
        '\u{200b}',
        '\u{feff}',
        '\u{2581}',
        '\u{e000}',
        '\u{10fffd}',
        '\u{1f431}',
        '\u{20000}',
        'ß',
        '½',
    ];
    let vocab = gguf.vocab_size() as u64;
    for round in 0..400 {
        let mut text = String::new();
        for _ in 0..1 + next(12) {
            match next(7) {
                0..=2 => text.push_str(&json.decode(&[next(vocab) as u32]).unwrap()),
                3 => text.push_str(specials[next(specials.len() as u64) as usize]),
                4 => {
                    let ws = [" ", "\n", "\t", "\r\n"][next(4) as usize];
                    text.push_str(&ws.repeat(1 + next(40) as usize));
                }
                5 => text.push_str(&next(1_000_000_007).to_string()),
                _ => text.push(odd[next(odd.len() as u64) as usize]),
            }
        }
        let a = json.encode(&text, false).unwrap();
        let b = gguf.encode(&text, false).unwrap();
        assert_eq!(a, b, "round {round}: ids differ for {text:?}");
        assert_eq!(json.decode(&a).unwrap(), gguf.decode(&b).unwrap(), "round {round}: text differs");
    }
}

#[test]
fn gemma3_special_tokens_are_single_ids() {
    let Some(tok) = gemma_gguf() else { return };
    let sot = tok.id_of("<start_of_turn>").unwrap();
    let eot = tok.id_of("<end_of_turn>").unwrap();
    let ids = tok.encode("before <start_of_turn> middle <end_of_turn>after", false).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == sot).count(), 1);
    assert_eq!(ids.iter().filter(|&&i| i == eot).count(), 1);
    // A broken special token is plain text.
    let ids = tok.encode("<start_of_turn", false).unwrap();
    assert!(!ids.contains(&sot));
    // Byte fallback: a character outside the vocabulary becomes its UTF-8 bytes.
    let ids = tok.encode("\u{10FFFD}", false).unwrap();
    assert_eq!(ids.len(), 4, "{ids:?}");
    for id in &ids {
        assert!(tok.token_to_piece(*id).unwrap().starts_with("<0x"));
    }
    assert_eq!(tok.decode(&ids).unwrap(), "\u{10FFFD}");
    assert_eq!(stream(tok, &ids), "\u{10FFFD}");
    // Invalid bytes: one U+FFFD each, streamed or not; the stream does not wait forever.
    let (ff, a) = (tok.id_of("<0xFF>").unwrap(), tok.id_of("a").unwrap());
    let mut garbage = vec![ff; 10];
    garbage.push(a);
    let expect = format!("{}a", "\u{FFFD}".repeat(10));
    assert_eq!(tok.decode(&garbage).unwrap(), expect);
    let mut dec = tok.decode_stream();
    let streamed: String = garbage.iter().map(|&id| dec.push(id).unwrap()).collect();
    assert_eq!(streamed, expect);
    assert_eq!(dec.finish().unwrap(), "");
    // A truncated character is flushed by finish().
    let mut dec = tok.decode_stream();
    assert_eq!(dec.push(ids[0]).unwrap(), "");
    assert_eq!(dec.finish().unwrap(), "\u{FFFD}");
}

#[test]
fn smollm2_extra_cases_round_trip() {
    let Some(tok) = smollm_gguf() else { return };
    for text in EXTRA {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), *text, "round trip of {text:?}");
        assert_eq!(stream(tok, &ids), *text, "stream of {text:?}");
    }
    // The "smollm" pre-tokenizer isolates every digit.
    let ids = tok.encode("1234567890", false).unwrap();
    assert_eq!(ids.len(), 10, "{ids:?}");
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>\n", false).unwrap();
    assert_eq!(ids.first().copied(), tok.id_of("<|im_start|>"));
    assert!(ids.contains(&tok.id_of("<|im_end|>").unwrap()));
    // BOS on request is the declared one.
    assert_eq!(tok.encode("", true).unwrap(), vec![tok.bos_id().unwrap()]);
}

#[test]
fn decode_rejects_out_of_range_ids() {
    let tok = Tokenizer::from_gguf("tiny", &tiny_spm(vec![3, 3, 3, 3, 4])).unwrap();
    let n = tok.vocab_size() as u32;
    assert!(tok.decode(&[n]).is_err());
    assert!(tok.decode(&[u32::MAX]).is_err());
    assert!(tok.decode_stream().push(n).is_err());
    assert!(tok.token_to_piece(n).is_none());
}

// ---- Small synthetic vocabularies: run without any model file. ----

fn strings(v: &[&str]) -> Value {
    Value::Array(Array::String(v.iter().map(|s| s.to_string()).collect()))
}

fn gguf_file(metadata: Vec<(&str, Value)>) -> GgufFile {
    GgufFile {
        version: 3,
        metadata: metadata.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        tensors: Vec::new(),
        alignment: 32,
        data_start: 0,
    }
}

/// A tiny SentencePiece vocabulary with a control token, a user-defined one and byte fallback.
fn tiny_spm(types: Vec<i32>) -> GgufFile {
    let mut tokens = vec!["<unk>", "<s>", "</s>", "<tool>", "  "];
    let bytes: Vec<String> = (0..=255u8).map(|b| format!("<0x{b:02X}>")).collect();
    tokens.extend(bytes.iter().map(String::as_str));
    tokens.extend(["▁", "h", "e", "l", "o", "he", "ll", "hell", "hello", "▁hello"]);
    let n = tokens.len();
    let mut all_types = types;
    all_types.resize(5, 1);
    all_types.extend(std::iter::repeat_n(6, 256));
    all_types.resize(n, 1);
    let scores: Vec<f32> = (0..n).map(|i| -(i as f32)).collect();
    gguf_file(vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.scores", Value::Array(Array::F32(scores))),
        ("tokenizer.ggml.token_type", Value::Array(Array::I32(all_types))),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
    ])
}

#[test]
fn synthetic_spm_vocabulary() {
    let file = tiny_spm(vec![3, 3, 3, 3, 4]);
    let tok = Tokenizer::from_gguf("tiny", &file).unwrap();
    let id = |p: &str| tok.id_of(p).unwrap();
    assert_eq!(tok.encode("hello", true).unwrap(), vec![1, id("hello")]);
    assert_eq!(tok.encode(" hello", false).unwrap(), vec![id("▁hello")]);
    // Special tokens whole; 'x' is outside the vocabulary: byte fallback.
    assert_eq!(tok.encode("hello<tool>x</s>", false).unwrap(), vec![id("hello"), 3, id("<0x78>"), 2]);
    assert_eq!(tok.decode(&tok.encode("hello<tool>x  y", false).unwrap()).unwrap(), "hello<tool>x  y");
    // The space run stored with real spaces is reached through '▁▁'.
    assert_eq!(tok.encode("  ", false).unwrap(), vec![4]);
    assert_eq!(tok.decode(&[4]).unwrap(), "  ");
    assert_eq!(tok.eos_ids(), &[2]);
    assert!(tok.add_bos_default());
    assert_eq!(tok.bos_id(), Some(1));
}

#[test]
fn synthetic_duplicate_pieces() {
    // The last of duplicates is the one text encodes to (llama.cpp and HF agree); all decode.
    let file = gguf_file(vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strings(&["<unk>", "a", "b", "a", "ab"])),
        ("tokenizer.ggml.scores", Value::Array(Array::F32(vec![0.0, -1.0, -2.0, -3.0, -4.0]))),
        ("tokenizer.ggml.token_type", Value::Array(Array::I32(vec![2, 1, 1, 1, 1]))),
        ("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
    ]);
    let tok = Tokenizer::from_gguf("dup", &file).unwrap();
    assert_eq!(tok.encode("a", false).unwrap(), vec![3]);
    assert_eq!(tok.encode("ab", false).unwrap(), vec![4]);
    assert_eq!(tok.decode(&[1, 3, 2]).unwrap(), "aab");
    assert_eq!(tok.bos_id(), None);
}

#[test]
fn synthetic_byte_level_bpe() {
    // GPT-2's byte-to-char map sends ' ' to 'Ġ'; printable ASCII maps to itself.
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into()];
    let byte_chars: Vec<char> = (b'!'..=b'~').map(char::from).chain(['Ġ', 'Ċ']).collect();
    tokens.extend(byte_chars.iter().map(|c| c.to_string()));
    tokens.extend(["Ġh", "Ġhi", "hi"].map(String::from));
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let mut types = vec![1i32; tokens.len()];
    types[0] = 3;
    types[1] = 3;
    let file = gguf_file(vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", strings(&refs)),
        ("tokenizer.ggml.token_type", Value::Array(Array::I32(types))),
        ("tokenizer.ggml.merges", strings(&["Ġ h", "Ġh i", "h i"])),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(0)),
    ]);
    let tok = Tokenizer::from_gguf("tiny", &file).unwrap();
    let id = |p: &str| tok.id_of(p).unwrap();
    assert_eq!(tok.encode("<|im_start|>hi hi", false).unwrap(), vec![1, id("hi"), id("Ġhi")]);
    assert_eq!(tok.encode("12", false).unwrap(), vec![id("1"), id("2")]);
    assert_eq!(tok.decode(&tok.encode("hi 12\n", false).unwrap()).unwrap(), "hi 12\n");
    assert!(!tok.add_bos_default());
}

#[test]
fn malformed_inputs_are_errors() {
    assert!(Tokenizer::from_json_bytes(b"not json").is_err());
    assert!(Tokenizer::from_json_bytes(b"{}").is_err());
    assert!(Tokenizer::from_file("/nonexistent/tokenizer.json").is_err());

    assert!(Tokenizer::from_gguf("empty", &gguf_file(vec![])).is_err());
    let unknown = gguf_file(vec![
        ("tokenizer.ggml.model", Value::String("rwkv".into())),
        ("tokenizer.ggml.tokens", strings(&["a"])),
    ]);
    assert!(Tokenizer::from_gguf("rwkv", &unknown).is_err());

    // Scores missing or short, token types of the wrong length, ids out of range.
    let mut f = tiny_spm(vec![3, 3, 3, 3, 4]);
    f.metadata.retain(|(k, _)| k != "tokenizer.ggml.scores");
    assert!(Tokenizer::from_gguf("no scores", &f).is_err());
    let mut f = tiny_spm(vec![3, 3, 3, 3, 4]);
    for (k, v) in &mut f.metadata {
        if k == "tokenizer.ggml.token_type" {
            *v = Value::Array(Array::I32(vec![1, 1]));
        }
    }
    assert!(Tokenizer::from_gguf("short types", &f).is_err());
    let mut f = tiny_spm(vec![3, 3, 3, 3, 4]);
    for (k, v) in &mut f.metadata {
        if k == "tokenizer.ggml.bos_token_id" {
            *v = Value::U32(100_000);
        }
    }
    assert!(Tokenizer::from_gguf("bos out of range", &f).is_err());

    // BPE merges naming pieces that are not in the vocabulary.
    let bad_merges = gguf_file(vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&["a", "b"])),
        ("tokenizer.ggml.merges", strings(&["a b"])),
    ]);
    assert!(Tokenizer::from_gguf("merges", &bad_merges).is_err());
    let no_space = gguf_file(vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&["a", "b", "ab"])),
        ("tokenizer.ggml.merges", strings(&["ab"])),
    ]);
    assert!(Tokenizer::from_gguf("merges", &no_space).is_err());

    // A tokenizer without BOS refuses add_bos instead of inventing one.
    let mut f = tiny_spm(vec![3, 3, 3, 3, 4]);
    f.metadata.retain(|(k, _)| k != "tokenizer.ggml.bos_token_id");
    let tok = Tokenizer::from_gguf("no bos", &f).unwrap();
    assert!(tok.encode("hello", true).is_err());
    assert!(tok.encode("hello", false).is_ok());
}

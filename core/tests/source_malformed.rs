//! Malformed safetensors checkpoints: every case is an `Error::Format` naming the file and the
//! problem, never a panic.

mod source_common;

use purehw_core::Error;
use purehw_core::safetensors;
use purehw_core::source::{ModelSource, Role};
use serde_json::json;
use source_common::*;

const FILE: &str = "tiny/model.safetensors";

fn open(bytes: Vec<u8>) -> Result<ModelSource, Error> {
    ModelSource::from_safetensors("tiny", &tiny_config_json(), vec![("model.safetensors".into(), shared(bytes))])
}

/// `open` fails with a format error about FILE whose message contains every `want`.
#[track_caller]
fn expect_err(bytes: Vec<u8>, want: &[&str]) {
    match open(bytes) {
        Err(Error::Format { file, msg }) => {
            assert_eq!(file, FILE, "{msg}");
            for w in want {
                assert!(msg.contains(w), "`{msg}` lacks `{w}`");
            }
        }
        Err(e) => panic!("not a format error: {e}"),
        Ok(_) => panic!("accepted a malformed file (want {want:?})"),
    }
}

/// A small valid file: two F32 tensors of 2x2.
fn two() -> Vec<Raw> {
    vec![
        Raw { name: "a".into(), dtype: "F32".into(), shape: vec![2, 2], data: vec![1; 16] },
        Raw { name: "b".into(), dtype: "F32".into(), shape: vec![2, 2], data: vec![2; 16] },
    ]
}

fn header(entries: serde_json::Value, data_len: usize) -> Vec<u8> {
    with_header(entries.to_string().as_bytes(), vec![0; data_len])
}

#[test]
fn the_helpers_write_valid_files() {
    let h = safetensors::parse(&write_raw(&two())).unwrap();
    assert_eq!(h.tensors.len(), 2);
    assert_eq!(h.tensor("b").unwrap().range.len(), 16);
    assert!(safetensors::parse(&tiny_bytes()).is_ok());
}

#[test]
fn truncated_files() {
    let full = tiny_bytes();
    let n = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
    for cut in [0, 1, 7, 8, 9, 100, n, n + 7, n + 8, n + 9, full.len() / 2, full.len() - 1] {
        let want: &[&str] = match cut {
            c if c < 8 => &["too short"],
            c if c < n + 8 => &["past the end"],
            _ => &["outside the data section"],
        };
        expect_err(full[..cut].to_vec(), want);
    }
}

#[test]
fn header_length_past_eof_and_huge() {
    let mut b = write_raw(&two());
    let len = b.len() as u64;
    b[..8].copy_from_slice(&len.to_le_bytes());
    expect_err(b.clone(), &["header length", "past the end"]);
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_err(b, &["header length", "limit"]);
}

#[test]
fn invalid_json_and_types() {
    expect_err(with_header(b"{\"a\": ", vec![]), &["JSON"]);
    expect_err(with_header(&[b'{', 0xff, 0xfe, b'}'], vec![]), &["JSON"]);
    expect_err(with_header(b"[1, 2]", vec![]), &["JSON object"]);
    expect_err(header(json!({"a": 5}), 0), &["`a`", "not an object"]);
    expect_err(header(json!({"a": {"dtype": "F32", "shape": [1]}}), 4), &["`a`", "data_offsets"]);
    expect_err(header(json!({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}), 4), &["`a`", "shape"]);
    expect_err(header(json!({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}), 4), &["shape"]);
    expect_err(header(json!({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}), 4), &["data_offsets"]);
    expect_err(header(json!({"a": {"dtype": 3, "shape": [1], "data_offsets": [0, 4]}}), 4), &["dtype"]);
    expect_err(header(json!({"__metadata__": {"k": 1}}), 0), &["__metadata__"]);
    // Duplicate keys would let one name mean two tensors.
    let dup = br#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#;
    expect_err(with_header(dup, vec![0; 8]), &["`a`", "twice"]);
}

#[test]
fn unknown_dtype() {
    let mut t = two();
    t[1].dtype = "Q4_K".into();
    expect_err(write_raw(&t), &["`b`", "unknown dtype `Q4_K`"]);
}

#[test]
fn shape_size_mismatch() {
    let mut t = two();
    t[0].shape = vec![2, 3];
    expect_err(write_raw(&t), &["`a`", "[2, 3]", "needs 24 bytes", "give 16"]);
    // Element count overflow.
    t[0].shape = vec![usize::MAX, 4];
    expect_err(write_raw(&t), &["`a`"]);
    // Sub-byte dtype that does not fill whole bytes.
    t[0].shape = vec![3];
    t[0].dtype = "F4".into();
    t[0].data = vec![0; 2];
    expect_err(write_raw(&t), &["`a`", "whole number of bytes"]);
}

#[test]
fn offsets_out_of_range_overlapping_or_with_holes() {
    let e = |a: [usize; 2], b: [usize; 2], data: usize| {
        header(
            json!({
                "a": {"dtype": "F32", "shape": [(a[1].saturating_sub(a[0])) / 4], "data_offsets": a},
                "b": {"dtype": "F32", "shape": [(b[1].saturating_sub(b[0])) / 4], "data_offsets": b},
            }),
            data,
        )
    };
    expect_err(e([0, 16], [16, 32], 16), &["`b`", "outside the data section (16 bytes)"]);
    expect_err(e([0, 16], [8, 24], 24), &["overlap"]);
    expect_err(e([0, 16], [0, 16], 16), &["overlap"]);
    expect_err(e([0, 16], [20, 36], 36), &["belong to no tensor"]);
    expect_err(e([0, 16], [16, 32], 40), &["8 trailing bytes"]);
    expect_err(e([16, 0], [16, 32], 32), &["`a`", "outside"]);
    // Zero-sized tensors at a shared offset are fine.
    assert!(safetensors::parse(&e([0, 0], [0, 16], 16)).is_ok());
}

#[test]
fn missing_and_misshapen_tensors() {
    let raw = read_raw(&tiny_bytes());
    let without = |name: &str| write_raw(&raw.iter().filter(|r| r.name != name).cloned().collect::<Vec<_>>());

    let s = open(without("model.layers.3.self_attn.q_proj.weight")).unwrap();
    let e = s.weight(Role::AttnQ, Some(3)).unwrap_err().to_string();
    assert!(e.contains("tiny") && e.contains("missing tensor `model.layers.3.self_attn.q_proj.weight`"), "{e}");
    assert!(s.weight(Role::AttnQ, Some(2)).is_ok());

    // No embedding at all: refused at open.
    match open(without("model.embed_tokens.weight")) {
        Err(e) => assert!(e.to_string().contains("embed_tokens"), "{e}"),
        Ok(_) => panic!("opened a checkpoint without embeddings"),
    }

    // Transposed q_proj (same bytes): the error names the tensor and both shapes.
    let mut t = raw.clone();
    let q = t.iter_mut().find(|r| r.name == "model.layers.0.self_attn.q_proj.weight").unwrap();
    q.shape.reverse();
    let s = open(write_raw(&t)).unwrap();
    match s.weight(Role::AttnQ, Some(0)) {
        Err(Error::Format { file, msg }) => {
            assert_eq!(file, FILE);
            assert!(msg.contains("q_proj") && msg.contains("[64, 128]") && msg.contains("expected [128, 64]"), "{msg}");
        }
        other => panic!("{other:?}"),
    }

    // An integer tensor where a weight belongs.
    let mut t = raw.clone();
    let k = t.iter_mut().find(|r| r.name == "model.layers.0.self_attn.k_proj.weight").unwrap();
    k.dtype = "I16".into();
    let s = open(write_raw(&t)).unwrap();
    let e = s.weight(Role::AttnK, Some(0)).unwrap_err().to_string();
    assert!(e.contains("k_proj") && e.contains("I16") && e.contains("cannot be loaded"), "{e}");
    // …but inspect still lists it.
    assert!(s.tensors().iter().any(|t| t.dtype == "I16"));

    // Same tensor in two shards.
    let r = ModelSource::from_safetensors(
        "tiny",
        &tiny_config_json(),
        vec![("a.safetensors".into(), shared(tiny_bytes())), ("b.safetensors".into(), shared(tiny_bytes()))],
    );
    assert!(r.err().unwrap().to_string().contains("also in a.safetensors"));
}

#[test]
fn index_problems() {
    let raw = read_raw(&tiny_bytes());
    let shard = |n: &str| vec![(n.to_string(), shared(tiny_bytes()))];
    let mut wm = serde_json::Map::new();
    for r in &raw {
        wm.insert(r.name.clone(), json!("s1.safetensors"));
    }
    let idx = |wm: &serde_json::Map<String, serde_json::Value>| json!({"weight_map": wm}).to_string();
    let open_idx = |index: String| {
        ModelSource::from_safetensors_indexed("tiny", &tiny_config_json(), Some(&index), shard("s1.safetensors")).err()
    };
    assert!(open_idx(idx(&wm)).is_none());

    let mut m = wm.clone();
    m.insert("model.extra.weight".into(), json!("s1.safetensors"));
    let e = open_idx(idx(&m)).unwrap().to_string();
    assert!(e.contains("tiny/s1.safetensors") && e.contains("model.extra.weight") && e.contains("not in it"), "{e}");

    let mut m = wm.clone();
    m.insert("model.extra.weight".into(), json!("s2.safetensors"));
    let e = open_idx(idx(&m)).unwrap().to_string();
    assert!(e.contains("model.safetensors.index.json") && e.contains("s2.safetensors") && e.contains("missing"), "{e}");

    let mut m = wm.clone();
    m.insert("x".into(), json!("../../etc/passwd"));
    assert!(open_idx(idx(&m)).unwrap().to_string().contains("not a plain file name"));
    assert!(open_idx("{}".into()).unwrap().to_string().contains("weight_map"));
    assert!(open_idx("{\"weight_map\": {\"a\": 1}}".into()).unwrap().to_string().contains("`a`"));

    // A folder whose index names a shard that is not there.
    let dir = TempDir::new("noshard");
    std::fs::write(dir.path().join("config.json"), tiny_config_json()).unwrap();
    std::fs::write(dir.path().join("model.safetensors.index.json"), idx(&wm)).unwrap();
    let e = ModelSource::open(dir.path()).err().unwrap().to_string();
    assert!(e.contains("s1.safetensors") && e.contains("missing"), "{e}");
}

#[test]
fn config_problems_name_config_json() {
    let j = tiny_config_json().replace("\"hidden_size\"", "\"hidden_sz\"");
    let e = ModelSource::from_safetensors("tiny", &j, vec![("model.safetensors".into(), shared(tiny_bytes()))])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tiny/config.json") && e.contains("hidden_size"), "{e}");

    // A folder without config.json or any model file.
    let dir = TempDir::new("empty");
    let e = ModelSource::open(dir.path()).err().unwrap().to_string();
    assert!(e.contains("no model"), "{e}");
    let e = ModelSource::open(&dir.path().join("nope")).err().unwrap();
    assert!(matches!(e, Error::Io { .. }), "{e}");
}

#[test]
fn other_quantization_methods_are_refused_clearly() {
    let mut j: serde_json::Value = serde_json::from_str(&tiny_config_json()).unwrap();
    j["quantization_config"] = json!({"quant_method": "gptq", "bits": 4});
    let e =
        ModelSource::from_safetensors("tiny", &j.to_string(), vec![("model.safetensors".into(), shared(tiny_bytes()))])
            .err()
            .unwrap()
            .to_string();
    assert!(e.contains("tiny/config.json") && e.contains("unsupported quantization `gptq`"), "{e}");
}

/// Every single-byte corruption of a small file's header, and every truncation, is an error or a
/// valid parse — never a panic.
#[test]
fn corrupted_headers_never_panic() {
    let good = write_raw(&two());
    let n = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    for i in 0..n {
        for b in [0u8, b'"', b'{', b'9', b'-', 0xff, b' ', good[i].wrapping_add(1)] {
            let mut x = good.clone();
            x[i] = b;
            if let Ok(h) = safetensors::parse(&x) {
                for t in &h.tensors {
                    assert!(t.range.end <= x.len());
                }
            }
        }
    }
    for cut in 0..good.len() {
        assert!(safetensors::parse(&good[..cut]).is_err());
    }
}

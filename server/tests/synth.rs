//! `purehw synth` end to end: each `--like` model, cut to a few layers, is written in
//! `quantize`'s layout with the real config's quirks, loads, steps to finite logits and runs
//! `bench`; the same seed gives the same tensors whatever the thread count or sharding; bad
//! arguments are clear errors that write nothing.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use purehw_conformance::{model_file, read_f32};
use serde_json::Value;

fn purehw(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_purehw")).args(args).output().expect("running purehw")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn ok(o: &Output) -> String {
    assert!(o.status.success(), "exit {:?}\nstderr:\n{}", o.status.code(), stderr(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Exit code 1 and one clear `purehw: …` line containing every needle; no panic.
#[track_caller]
fn user_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr:\n{err}");
    assert!(!err.contains("panicked") && !err.contains("internal error"), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in:\n{err}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A safetensors file's tensors as (dtype, shape, bytes), read from the format's description.
fn read_st(path: &Path) -> BTreeMap<String, (String, Vec<u64>, Vec<u8>)> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let data = &b[8 + n..];
    let mut out = BTreeMap::new();
    for (name, t) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        let off: Vec<usize> =
            t["data_offsets"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let shape = t["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        out.insert(name.clone(), (t["dtype"].as_str().unwrap().to_string(), shape, data[off[0]..off[1]].to_vec()));
    }
    out
}

/// Every tensor of a checkpoint folder, checked against its index: each listed in the shard
/// holding it, each decoder layer in one shard, the shared tensors in `model-shared`.
fn tensors(dir: &Path) -> BTreeMap<String, (String, Vec<u64>, Vec<u8>)> {
    let index = read_json(&dir.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    let mut all = BTreeMap::new();
    let mut shard_of_layer: BTreeMap<u64, String> = BTreeMap::new();
    let files: std::collections::BTreeSet<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    for f in files {
        for (name, t) in read_st(&dir.join(f)) {
            assert_eq!(map[&name].as_str(), Some(f), "{name}");
            match name.strip_prefix("model.layers.") {
                Some(rest) => {
                    let l: u64 = rest.split('.').next().unwrap().parse().unwrap();
                    let prev = shard_of_layer.insert(l, f.to_string());
                    assert!(prev.as_deref().is_none_or(|p| p == f), "layer {l} spans {prev:?} and {f}");
                }
                None => assert_eq!(f, "model-shared.safetensors", "{name}"),
            }
            all.insert(name, t);
        }
    }
    assert_eq!(all.len(), map.len());
    all
}

/// Logits of eight token ids at every position: all finite, and not all alike.
#[track_caller]
fn finite_logits(dir: &Path, vocab: usize) {
    let out = dir.parent().unwrap().join(format!("{}.logits", dir.file_name().unwrap().to_string_lossy()));
    ok(&purehw(&[
        "logits",
        "-m",
        s(dir),
        "--ids",
        "2,818,5279,529,7001,563,9079,236761",
        "--all-positions",
        "-o",
        s(&out),
    ]));
    let l = read_f32(&out);
    assert_eq!(l.len(), 8 * vocab);
    assert!(l.iter().all(|v| v.is_finite()), "non-finite logits");
    let mean = l.iter().map(|&v| v as f64).sum::<f64>() / l.len() as f64;
    let sd = (l.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / l.len() as f64).sqrt();
    assert!(sd > 0.1 && sd < 100.0, "logit sd {sd}");
}

#[test]
fn gemma3_4b_six_layers_in_quantizes_layout_loads_and_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let tok = model_file("gemma3-270m", "tokenizer.json");
    ok(&purehw(&[
        "synth",
        "--like",
        "gemma3-4b",
        "--layers",
        "6",
        "--seed",
        "7",
        "-t",
        "2",
        "--tokenizer",
        s(&tok),
        s(&a),
    ]));
    // Same seed on one thread, a layer per shard: the same tensors.
    let o = purehw(&[
        "synth",
        "--like",
        "gemma3-4b",
        "--layers",
        "6",
        "--seed",
        "7",
        "-t",
        "1",
        "--shard-size",
        "1",
        s(&b),
    ]);
    ok(&o);
    assert!(stderr(&o).contains("no tokenizer"), "{}", stderr(&o));

    let files = |d: &Path| {
        let mut v: Vec<String> =
            std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    };
    assert_eq!(
        files(&a),
        [
            "config.json",
            "generation_config.json",
            "model-00001-of-00001.safetensors",
            "model-shared.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    assert_eq!(
        files(&b),
        [
            "config.json",
            "generation_config.json",
            "model-00001-of-00006.safetensors",
            "model-00002-of-00006.safetensors",
            "model-00003-of-00006.safetensors",
            "model-00004-of-00006.safetensors",
            "model-00005-of-00006.safetensors",
            "model-00006-of-00006.safetensors",
            "model-shared.safetensors",
            "model.safetensors.index.json"
        ]
    );
    let (ta, tb) = (tensors(&a), tensors(&b));
    assert!(ta == tb, "same seed, different tensors");
    assert_eq!(read_json(&a.join("config.json")), read_json(&b.join("config.json")));

    // The real shapes, quantized as `seed` does.
    let shape = |n: &str| ta[n].1.clone();
    assert_eq!(shape("model.embed_tokens.weight_packed"), [262_208, 2560 / 4]);
    assert_eq!(shape("model.embed_tokens.weight_zero_point"), [262_208 / 4, 1]);
    assert_eq!(shape("model.layers.1.self_attn.q_proj.weight_packed"), [2048, 2560 / 4]);
    assert_eq!(shape("model.layers.1.self_attn.k_proj.weight_scale"), [1024, 1]);
    assert_eq!(shape("model.layers.1.mlp.down_proj.weight_packed"), [2560, 10240 / 8]);
    assert_eq!(shape("model.layers.1.mlp.gate_proj.weight_scale"), [10240, 2560 / 32]);
    assert_eq!(shape("model.layers.0.self_attn.q_norm.weight"), [256]);
    assert_eq!(ta["model.norm.weight"].0, "BF16");
    assert!(!ta.contains_key("lm_head.weight") && !ta.contains_key("lm_head.weight_packed"));
    assert_eq!(ta.len(), 4 + 1 + 6 * (7 * 3 + 6));

    // The config's quirks, as the HF config writes them.
    let c = read_json(&a.join("config.json"));
    assert_eq!(c["architectures"][0], "Gemma3ForCausalLM");
    for (k, v) in [
        ("vocab_size", 262_208.0),
        ("hidden_size", 2560.0),
        ("intermediate_size", 10240.0),
        ("num_hidden_layers", 6.0),
        ("num_attention_heads", 8.0),
        ("num_key_value_heads", 4.0),
        ("head_dim", 256.0),
        ("query_pre_attn_scalar", 256.0),
        ("sliding_window", 1024.0),
        ("sliding_window_pattern", 6.0),
        ("rope_theta", 1e6),
        ("rope_local_base_freq", 1e4),
        ("rms_norm_eps", 1e-6),
    ] {
        assert_eq!(c[k].as_f64(), Some(v), "{k}");
    }
    assert_eq!(c["rope_scaling"]["factor"].as_f64(), Some(8.0));
    // Five local layers, then a global one (run below: RoPE ×8 at theta 1M).
    let kinds: Vec<&str> = c["layer_types"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(kinds, [["sliding_attention"; 5].as_slice(), &["full_attention"]].concat());
    assert_eq!(c["rope_parameters"]["full_attention"]["factor"].as_f64(), Some(8.0));
    assert_eq!(c["final_logit_softcapping"], Value::Null);
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["hidden_activation"], "gelu_pytorch_tanh");
    let q = &c["quantization_config"];
    assert_eq!(q["format"], "pack-quantized");
    assert_eq!(q["config_groups"].as_object().unwrap().len(), 3);

    // It runs: logits from ids, bench from its own ids, run through the copied tokenizer.
    finite_logits(&a, 262_208);
    ok(&purehw(&["bench", "-m", s(&b), "-p", "8", "-n", "4", "-r", "1"]));
    let out = ok(&purehw(&["run", "-m", s(&a), "-p", "The capital of France", "-n", "3", "--json"]));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ids"].as_array().unwrap().len(), 3);
}

#[test]
fn gemma3_12b_and_27b_one_layer_load_and_step() {
    let tmp = tempfile::tempdir().unwrap();
    for (like, scheme, hidden, heads, kv, hd, ffn, qpas) in [
        ("gemma3-12b", "seed-asym", 3840, 16, 8, 256, 15360, 256),
        ("gemma3-27b", "seed", 5376, 32, 16, 128, 21504, 168),
    ] {
        let out = tmp.path().join(like);
        ok(&purehw(&["synth", "--like", like, "--layers", "1", "--scheme", scheme, s(&out)]));
        let c = read_json(&out.join("config.json"));
        let got: Vec<u64> =
            ["hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size"]
                .iter()
                .map(|k| c[k].as_u64().unwrap())
                .collect();
        assert_eq!(got, [hidden, heads, kv, hd, ffn], "{like}");
        assert_eq!(c["query_pre_attn_scalar"].as_u64(), Some(qpas), "{like}");
        assert_eq!(c["purehw_synth"]["layers_of_model"].as_u64(), Some(if like == "gemma3-27b" { 62 } else { 48 }));
        let t = tensors(&out);
        assert_eq!(t["model.layers.0.mlp.up_proj.weight_packed"].1, [ffn, hidden / 8], "{like}");
        assert_eq!(t["model.layers.0.self_attn.o_proj.weight_packed"].1, [hidden, heads * hd / 4], "{like}");
        // -asym: zero points on the Linear layers too.
        assert_eq!(t.contains_key("model.layers.0.mlp.up_proj.weight_zero_point"), scheme.ends_with("-asym"));
        finite_logits(&out, 262_208);
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn bad_arguments_are_clear_errors_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = s(&out);
    user_error(
        &purehw(&["synth", "--like", "gemma3-1000b", o]),
        &["gemma3-1000b", "gemma3-4b, gemma3-12b, gemma3-27b"],
    );
    user_error(&purehw(&["synth", "--like", "gemma3-4b", "--scheme", "w3", o]), &["unknown scheme `w3`"]);
    user_error(&purehw(&["synth", "--like", "gemma3-27b", "--layers", "63", o]), &["--layers 63", "1 to 62"]);
    user_error(&purehw(&["synth", "--like", "gemma3-4b", "--layers", "0", o]), &["--layers 0"]);
    user_error(&purehw(&["synth", "--like", "gemma3-4b", "--shard-size", "lots", o]), &["--shard-size"]);
    user_error(
        &purehw(&["synth", "--like", "gemma3-4b", "--tokenizer", "/nonexistent/tokenizer.json", o]),
        &["/nonexistent/tokenizer.json"],
    );
    let missing = tmp.path().join("no/such/dir/out");
    user_error(&purehw(&["synth", "--like", "gemma3-4b", "--layers", "1", s(&missing)]), &["does not exist"]);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "something was written");
    std::fs::create_dir(&out).unwrap();
    user_error(&purehw(&["synth", "--like", "gemma3-4b", o]), &["already exists"]);
}

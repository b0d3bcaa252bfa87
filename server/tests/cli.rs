//! The `purehw` binary end to end: inspect, run, logits, bench, pull, and clean errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use purehw_conformance::{argmax, fixture, model_file, read_f32, read_json};

const GEMMA: (&str, &str) = ("gemma3-270m", "gemma-3-270m-q4_k_m.gguf");
const SMOL: (&str, &str) = ("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf");

fn purehw(args: &[&str]) -> Output {
    purehw_env(args, &[])
}

fn purehw_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_purehw"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running purehw")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn ok(o: &Output) -> String {
    assert!(o.status.success(), "exit {:?}\nstderr:\n{}", o.status.code(), stderr(o));
    stdout(o)
}

/// A user error: exit code 1, one `purehw: ...` line on stderr containing `needle`, no panic.
#[track_caller]
fn user_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr:\n{err}");
    assert!(!err.contains("panicked") && !err.contains("internal error"), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("purehw: ") || last.starts_with("error: ") || last.contains("--help"), "{err}");
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

#[test]
fn help_and_version() {
    let out = ok(&purehw(&["--help"]));
    for cmd in ["pull", "inspect", "run", "chat", "logits", "bench", "serve", "devices"] {
        assert!(out.contains(cmd), "{out}");
    }
    assert!(ok(&purehw(&["--version"])).contains("purehw"));
}

#[test]
fn inspect_gemma3_gguf() {
    let m = model_file(GEMMA.0, GEMMA.1);
    let text = ok(&purehw(&["inspect", path_str(&m)]));
    assert!(text.contains("Gemma3"), "{text}");
    assert!(text.contains("token_embd.weight"), "{text}");
    let v = json(&ok(&purehw(&["inspect", "--json", path_str(&m)])));
    assert_eq!(v["kind"], "gguf");
    assert_eq!(v["config"]["arch"], "Gemma3");
    assert_eq!(v["config"]["layers"], 18);
    let tensors = v["tensors"].as_array().unwrap();
    let embd = tensors.iter().find(|t| t["name"] == "token_embd.weight").expect("token_embd.weight");
    // Outermost first: (vocab, hidden).
    assert_eq!(embd["shape"][0], v["config"]["vocab"]);
    assert_eq!(embd["shape"][1], v["config"]["hidden"]);
    let sum: u64 = tensors.iter().map(|t| t["bytes"].as_u64().unwrap()).sum();
    assert_eq!(sum, v["tensor_bytes"].as_u64().unwrap());
    // Tensor data is most of the file.
    let file_len = std::fs::metadata(&m).unwrap().len();
    assert!(sum <= file_len && sum > file_len / 2, "{sum} of {file_len}");
}

#[test]
fn inspect_smollm2_gguf() {
    let m = model_file(SMOL.0, SMOL.1);
    let v = json(&ok(&purehw(&["inspect", "--json", path_str(&m)])));
    assert_eq!(v["config"]["arch"], "Llama");
    assert_eq!(v["config"]["layers"], 30);
    assert!(v["tensors"].as_array().unwrap().iter().any(|t| t["dtype"] == "Q4_1"));
}

#[test]
fn inspect_hf_folder() {
    let dir = fixture("tiny-gemma3");
    let cfg = read_json(&dir.join("config.json"));
    let v = json(&ok(&purehw(&["inspect", "--json", path_str(&dir)])));
    assert_eq!(v["kind"], "safetensors");
    assert_eq!(v["config"]["arch"], "Gemma3");
    assert_eq!(v["config"]["vocab"], cfg["vocab_size"]);
    assert_eq!(v["config"]["hidden"], cfg["hidden_size"]);
    assert_eq!(v["config"]["layers"], cfg["num_hidden_layers"]);
    assert!(v["tensors"].as_array().unwrap().iter().all(|t| t["dtype"] == "BF16"));
    assert!(ok(&purehw(&["inspect", path_str(&dir)])).contains("sliding"));
}

#[test]
fn missing_model_is_a_clear_error() {
    user_error(&purehw(&["inspect", "/nonexistent/model.gguf"]), "/nonexistent/model.gguf");
    user_error(&purehw(&["run", "-m", "/nonexistent/model.gguf", "-p", "hi"]), "no such file");
    user_error(&purehw(&["logits", "-m", "/nonexistent", "--ids", "1", "-o", "/dev/null"]), "no such file");
    user_error(&purehw(&["pull", "llama-7b"]), "unknown model");
}

#[test]
fn corrupt_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    // Not GGUF at all.
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a model file, just some text long enough to parse").unwrap();
    user_error(&purehw(&["inspect", path_str(&junk)]), "junk.gguf");
    user_error(&purehw(&["run", "-m", path_str(&junk), "-p", "hi", "-n", "1"]), "junk.gguf");
    // A real GGUF cut short: the header parses, the tensor data is missing.
    let real = std::fs::read(model_file(SMOL.0, SMOL.1)).unwrap();
    for len in [0, 3, 100, 4096, 1 << 20] {
        let cut = tmp.path().join(format!("cut{len}.gguf"));
        std::fs::write(&cut, &real[..len]).unwrap();
        user_error(&purehw(&["inspect", path_str(&cut)]), &format!("cut{len}.gguf"));
    }
    // An empty folder is no checkpoint.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    user_error(&purehw(&["inspect", path_str(&empty)]), "empty");
}

#[test]
fn bad_arguments_are_clear_errors() {
    let m = model_file(SMOL.0, SMOL.1);
    let m = path_str(&m);
    user_error(&purehw(&["run", "-m", m]), "--prompt");
    user_error(&purehw(&["run", "-m", m, "-p", "hi", "--top-p", "0"]), "top_p");
    user_error(&purehw(&["run", "-m", m, "-p", "hi", "--temperature", "-1"]), "temperature");
    user_error(&purehw(&["run", "-m", m, "-p", "hi", "-n", "many"]), "many");
    user_error(&purehw(&["run", "-m", m, "-p", "hi", "--backend", "cuda"]), "cuda");
    user_error(&purehw(&["run", "-m", m, "-p", "hi", "--backend", "cuda"]), "cpu-ref");
    user_error(&purehw(&["run", "-m", m, "-p", "hi", "--backend", "cuda"]), "vulkan");
    user_error(&purehw(&["run", "-m", m, "-p", "hi", "--act", "int4"]), "int4");
    user_error(&purehw(&["bench", "-m", m, "-p", "100000"]), "context");
    user_error(&purehw(&["bench", "-m", m, "-r", "0"]), "repetitions");
    user_error(&purehw(&["bench", "-m", m, "-p", "0", "-n", "0"]), "nothing to measure");
    user_error(&purehw(&["bench", "-m", "/nonexistent/model.gguf"]), "no such file");
    user_error(&purehw(&["logits", "-m", m, "--ids", "1,x", "-o", "/dev/null"]), "\"x\"");
    user_error(&purehw(&["logits", "-m", m, "--ids", "1,99999999", "-o", "/dev/null"]), "99999999");
    user_error(&purehw(&["logits", "-m", m, "-o", "/dev/null"]), "--ids");
    user_error(&purehw(&["inspect"]), "MODEL");
}

fn france_case(model: &str) -> serde_json::Value {
    let cases = read_json(&fixture(&format!("{model}/cases.json")));
    cases["cases"].as_array().unwrap().iter().find(|c| c["name"] == "france").expect("france case").clone()
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// `-m gemma3-270m` resolves to the cached GGUF and the tokenizer.json beside it.
#[test]
fn run_json_greedy_gemma3() {
    model_file(GEMMA.0, GEMMA.1);
    let case = france_case("gemma3-270m");
    let prompt = case["prompt"].as_str().unwrap();
    // f32 activations: the golden ids come from HF in float.
    let o = purehw(&["run", "-m", "gemma3-270m", "-p", prompt, "-n", "8", "--json", "--act", "f32"]);
    let v = json(&ok(&o));
    assert_eq!(ids(&v["prompt_ids"]), ids(&case["input_ids"]));
    assert_eq!(ids(&v["ids"]), ids(&case["greedy_ids"])[..8]);
    let text = v["text"].as_str().unwrap();
    let golden_text = case["greedy_text"].as_str().unwrap_or_default();
    assert!(golden_text.is_empty() || golden_text.starts_with(text.trim_end()), "{text:?} vs {golden_text:?}");
}

/// Streaming prints the same text as --json; the SmolLM2 tokenizer comes from the GGUF.
#[test]
fn run_streams_text_smollm2() {
    let m = model_file(SMOL.0, SMOL.1);
    let case = france_case("smollm2-135m");
    let prompt = case["prompt"].as_str().unwrap();
    let args = ["run", "-m", path_str(&m), "-p", prompt, "-n", "6", "--act", "f32"];
    let v = json(&ok(&purehw(&[&args[..], &["--json"]].concat())));
    assert_eq!(ids(&v["prompt_ids"]), ids(&case["input_ids"]));
    let golden = ids(&case["greedy_ids"]);
    let n = golden.len().min(6);
    assert_eq!(ids(&v["ids"])[..n], golden[..n]);
    let streamed = ok(&purehw(&args));
    assert_eq!(streamed.trim_end_matches('\n'), v["text"].as_str().unwrap());
}

#[test]
fn logits_file() {
    let m = model_file(GEMMA.0, GEMMA.1);
    let case = france_case("gemma3-270m");
    let input: Vec<String> = ids(&case["input_ids"]).iter().map(|i| i.to_string()).collect();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("last.f32");
    ok(&purehw(&["logits", "-m", path_str(&m), "--act", "f32", "--ids", &input.join(","), "-o", path_str(&out)]));
    let ours = read_f32(&out);
    let golden = read_f32(&fixture("gemma3-270m/france.last_logits.f32"));
    assert_eq!(ours.len(), golden.len(), "one row of vocab f32s");
    assert_eq!(argmax(&ours), argmax(&golden));
    assert!(purehw_conformance::nmse(&ours, &golden) < 1e-4);

    let all = tmp.path().join("all.f32");
    ok(&purehw(&[
        "logits",
        "-m",
        path_str(&m),
        "--act",
        "f32",
        "--ids",
        &input.join(","),
        "--all-positions",
        "-o",
        path_str(&all),
    ]));
    let rows = read_f32(&all);
    assert_eq!(rows.len(), input.len() * golden.len());
    let vocab = golden.len();
    for (p, want) in ids(&case["prompt_argmax"]).iter().enumerate() {
        assert_eq!(argmax(&rows[p * vocab..(p + 1) * vocab]) as u64, *want, "position {p}");
    }
    // The last row is the last-position logits.
    assert_eq!(&rows[(input.len() - 1) * vocab..], &ours[..]);
}

/// The fast backend and the reference are twins in the same activation mode: same greedy ids.
#[test]
fn run_backends_agree_smollm2() {
    let m = model_file(SMOL.0, SMOL.1);
    let case = france_case("smollm2-135m");
    let prompt = case["prompt"].as_str().unwrap();
    let base = ["run", "-m", path_str(&m), "-p", prompt, "-n", "8", "--json"];
    let run = |extra: &[&str]| json(&ok(&purehw(&[&base[..], extra].concat())));
    let cpu = run(&["--backend", "cpu"]);
    let reference = run(&["--backend", "cpu-ref", "--act", "int8"]);
    assert_eq!(cpu["prompt_ids"], reference["prompt_ids"]);
    assert_eq!(ids(&cpu["ids"]).len(), 8);
    assert_eq!(ids(&cpu["ids"]), ids(&reference["ids"]));
    // And in f32, on one thread.
    let cpu = run(&["--backend", "cpu", "--act", "f32", "-t", "1"]);
    assert_eq!(ids(&cpu["ids"]), ids(&run(&["--backend", "cpu-ref"])["ids"]));
}

/// `bench --json`: one object, every key, sane values.
#[track_caller]
fn check_bench(args: &[&str], backend: &str, pp: u64, tg: u64) -> serde_json::Value {
    let v = json(ok(&purehw(args)).trim());
    assert_eq!(v["backend"], backend, "{v}");
    assert!(v["model"].as_str().unwrap().ends_with(SMOL.1), "{v}");
    let threads = v["threads"].as_u64().unwrap();
    assert!(threads >= 1, "{v}");
    if backend == "cpu-ref" {
        assert_eq!(threads, 1);
    }
    for (test, n) in [("pp", pp), ("tg", tg)] {
        assert_eq!(v[test]["n"].as_u64(), Some(n), "{v}");
        let mean = v[test]["tps_mean"].as_f64().unwrap();
        let std = v[test]["tps_std"].as_f64().unwrap();
        assert!(mean > 0.0 && mean.is_finite(), "{v}");
        assert!(std >= 0.0 && std.is_finite(), "{v}");
    }
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 1 << 20, "{v}");
    v
}

/// `--kv-type f16` reaches the model bench loads (and the table says so).
#[test]
fn bench_kv_type_f16() {
    let m = model_file(SMOL.0, SMOL.1);
    let args = ["bench", "-m", path_str(&m), "-p", "8", "-n", "2", "-r", "1", "--kv-type", "f16"];
    let v = check_bench(&[&args[..], &["--json"]].concat(), "cpu", 8, 2);
    assert_eq!(v["kv_type"], "f16");
    let out = purehw(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("| int8 | f16 |"), "{text}");
}

#[test]
fn bench_json_cpu() {
    let m = model_file(SMOL.0, SMOL.1);
    let v = check_bench(&["bench", "-m", path_str(&m), "-p", "16", "-n", "4", "-r", "2", "--json"], "cpu", 16, 4);
    assert_eq!(v["act"], "int8");
    assert_eq!(v["kv_type"], "f32");
    assert!(v["simd"].is_string(), "{v}");
    // Device-only numbers are left out.
    for key in ["device", "dispatches_per_token", "barriers_per_token", "tg_device_seconds"] {
        assert!(v.get(key).is_none(), "{key} in {v}");
    }
    // A skipped test is n 0 with zero rates; the text table has a row per test run.
    let o = ok(&purehw(&["bench", "-m", path_str(&m), "-p", "0", "-n", "2", "-r", "1", "--json", "-t", "1"]));
    let v = json(o.trim());
    assert_eq!(v["threads"], 1);
    assert_eq!(v["pp"]["n"], 0);
    assert_eq!(v["pp"]["tps_mean"], 0.0);
    let text = ok(&purehw(&["bench", "-m", path_str(&m), "-p", "4", "-n", "2", "-r", "1"]));
    assert!(text.contains(" pp4 "), "{text}");
    assert!(text.contains(" tg2 "), "{text}");
    assert!(text.contains("t/s") && text.contains("peak RSS"), "{text}");
}

/// `-d N`: the tests run after N tokens of context (named `pp4 @ d20`, `depth` in the JSON); a
/// depth past the model's context is a clear error.
#[test]
fn bench_depth() {
    let m = model_file(SMOL.0, SMOL.1);
    let text = ok(&purehw(&["bench", "-m", path_str(&m), "-p", "4", "-n", "2", "-d", "20", "-r", "1"]));
    assert!(text.contains(" pp4 @ d20 ") && text.contains(" tg2 @ d20 "), "{text}");
    let v =
        json(ok(&purehw(&["bench", "-m", path_str(&m), "-p", "4", "-n", "2", "-d", "20", "-r", "1", "--json"])).trim());
    assert_eq!(v["depth"], 20);
    assert!(v["pp"]["tps_mean"].as_f64().unwrap() > 0.0 && v["tg"]["tps_mean"].as_f64().unwrap() > 0.0, "{v}");
    let e = purehw(&["bench", "-m", path_str(&m), "-p", "4", "-n", "2", "-d", "100000", "-r", "1"]);
    assert!(!e.status.success() && stderr(&e).contains("after -d 100000"), "{}", stderr(&e));
}

/// `-b N`: the tg test decodes N sequences together (`tg2 ×3`, `tg.n` all their tokens); 0 is
/// a clear error.
#[test]
fn bench_batch() {
    let m = model_file(SMOL.0, SMOL.1);
    let v =
        json(ok(&purehw(&["bench", "-m", path_str(&m), "-p", "0", "-n", "2", "-b", "3", "-r", "1", "--json"])).trim());
    assert_eq!(v["batch"], 3, "{v}");
    assert_eq!(v["tg"]["n"], 6, "{v}");
    assert!(v["tg"]["tps_mean"].as_f64().unwrap() > 0.0, "{v}");
    let text = ok(&purehw(&["bench", "-m", path_str(&m), "-p", "0", "-n", "2", "-b", "3", "-r", "1"]));
    assert!(text.contains(" tg2 ×3 "), "{text}");
    user_error(&purehw(&["bench", "-m", path_str(&m), "-b", "0"]), "--batch");
}

/// `--threads-sweep`: one table row (or JSON entry) per thread count, the cpu backend only.
#[test]
fn bench_threads_sweep() {
    let m = model_file(SMOL.0, SMOL.1);
    let text = ok(&purehw(&["bench", "-m", path_str(&m), "-p", "4", "-n", "2", "-r", "1", "--threads-sweep", "1,2"]));
    assert!(text.contains("| threads |") && text.contains("of roofline"), "{text}");
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("|       ")).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(rows[0].contains("1.00x"), "{text}");
    let v = json(
        ok(&purehw(&[
            "bench",
            "-m",
            path_str(&m),
            "-p",
            "0",
            "-n",
            "2",
            "-r",
            "1",
            "--threads-sweep",
            "2,1",
            "--json",
        ]))
        .trim(),
    );
    let sweep = v["sweep"].as_array().expect("a sweep array");
    assert_eq!(sweep.iter().map(|r| r["threads"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 1]);
    assert!(sweep.iter().all(|r| r["tg"]["tps_mean"].as_f64().unwrap() > 0.0), "{v}");
    let e = purehw(&["bench", "-m", path_str(&m), "--backend", "cpu-ref", "--threads-sweep", "1"]);
    assert!(!e.status.success() && stderr(&e).contains("--threads-sweep"), "{}", stderr(&e));
}

/// `--pin` / `PUREHW_PIN=1` bind the cpu threads to CPUs and change nothing computed.
#[test]
fn pinned_threads_same_tokens() {
    let m = model_file(SMOL.0, SMOL.1);
    let args = ["run", "-m", path_str(&m), "-p", "The capital of France is", "-n", "6", "--json", "-t", "2"];
    let free = json(ok(&purehw(&args)).trim());
    let pinned = json(ok(&purehw(&[&args[..], &["--pin"]].concat())).trim());
    let env = json(ok(&purehw_env(&args, &[("PUREHW_PIN", "1")])).trim());
    assert_eq!(free["ids"], pinned["ids"]);
    assert_eq!(free["ids"], env["ids"]);
    let bench = ["bench", "-m", path_str(&m), "-p", "4", "-n", "2", "-r", "1", "-t", "2", "--pin", "--json"];
    assert_eq!(json(ok(&purehw(&bench)).trim())["threads"], 2);
}

#[test]
fn bench_json_cpu_ref() {
    let m = model_file(SMOL.0, SMOL.1);
    let args = ["bench", "-m", path_str(&m), "--backend", "cpu-ref", "-p", "8", "-n", "2", "-r", "1", "--json"];
    let v = check_bench(&args, "cpu-ref", 8, 2);
    assert_eq!(v["act"], "f32");
    assert_eq!(v["pp"]["tps_std"], 0.0, "one repetition has no spread");
}

/// `--memory-budget`: a budget below the layers streams them with the same tokens, `bench`
/// says so with its disk reads (on Vulkan too where it uses the file in place); too small a
/// budget and a bad size are clear errors.
#[test]
fn memory_budget_streams_and_refuses_clearly() {
    let m = model_file(SMOL.0, SMOL.1);
    let base = ["run", "-m", path_str(&m), "-p", "The capital of France is", "-n", "6", "--json"];
    let run = |extra: &[&str]| json(&ok(&purehw(&[&base[..], extra].concat())));
    let whole = run(&[]);
    // SmolLM2 needs ~40 MB (30 MB of shared weights, 2.2 MB a layer); its 30 layers are 66 MB.
    assert_eq!(ids(&run(&["--memory-budget", "45M"])["ids"]), ids(&whole["ids"]));
    let reference = |extra: &[&str]| run(&[&["--backend", "cpu-ref", "--act", "int8"], extra].concat());
    assert_eq!(ids(&reference(&["--memory-budget", "45M"])["ids"]), ids(&whole["ids"]));

    let args = ["bench", "-m", path_str(&m), "-p", "8", "-n", "2", "-r", "1", "--json", "--memory-budget", "45MB"];
    let v = check_bench(&args, "cpu", 8, 2);
    assert_eq!(v["memory_budget_bytes"], 45_000_000, "{v}");
    assert_eq!(v["streaming"]["layers"], 30, "{v}");
    assert!(v["streaming"]["pinned_layers"].as_u64().unwrap() < 30, "{v}");
    assert!(v["disk_read_bytes_per_token"].as_f64().is_some_and(|b| b >= 0.0), "{v}");
    // The disk's rate is null only where direct reads are refused (tmpfs, some overlays).
    assert!(v["disk_read_gbps"].is_null() || v["disk_read_gbps"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    let v = check_bench(&["bench", "-m", path_str(&m), "-p", "8", "-n", "2", "-r", "1", "--json"], "cpu", 8, 2);
    assert!(v.get("streaming").is_none() && v.get("memory_budget_bytes").is_none(), "{v}");

    let too_small = purehw(&[&base[..], &["--memory-budget", "20M"]].concat());
    user_error(&too_small, "memory budget of 20000000 bytes is too small: this model needs at least");
    assert!(stderr(&too_small).contains("two decoder layers of 2211840 each"), "{}", stderr(&too_small));
    user_error(&purehw(&[&base[..], &["--memory-budget", "lots"]].concat()), "is not a size");
    // Vulkan streams too: the file's pages in place (lavapipe, integrated GPUs), or copies into
    // device slots (a discrete GPU; `PUREHW_VK_IMPORT=0` makes lavapipe copy).
    if vulkan_device("memory_budget_streams_and_refuses_clearly").is_some() {
        let vk = &["--backend", "vulkan", "--memory-budget", "45M"];
        assert_eq!(ids(&run(vk)["ids"]), ids(&whole["ids"]));
        let copying = ok(&purehw_env(&[&base[..], vk].concat(), &[("PUREHW_VK_IMPORT", "0")]));
        assert_eq!(ids(&json(&copying)["ids"]), ids(&whole["ids"]));
    }
}

/// A fresh cache holding a verified copy: `pull` does nothing (no pip, no network: PATH is
/// empty), and a damaged copy is noticed (then fetching fails clearly without python3).
#[test]
fn pull_verifies_the_cache() {
    let src = model_file(SMOL.0, SMOL.1);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(SMOL.0);
    std::fs::create_dir_all(&dir).unwrap();
    let dest: PathBuf = dir.join(SMOL.1);
    std::fs::copy(&src, &dest).unwrap();
    let env = [("PUREHW_MODELS", path_str(tmp.path())), ("PATH", "/nonexistent")];
    let o = purehw_env(&["pull", SMOL.0], &env);
    assert!(ok(&o).contains("up to date"), "{}", stderr(&o));
    assert!(dir.join(".sha256-ok").is_file());
    // Again, from the stamp.
    assert!(ok(&purehw_env(&["pull", SMOL.0], &env)).contains("up to date"));

    let mut bytes = std::fs::read(&dest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&dest, bytes).unwrap();
    let o = purehw_env(&["pull", SMOL.0], &env);
    user_error(&o, "python3");
    assert!(stderr(&o).contains("sha256"), "{}", stderr(&o));
    // Nothing half-written left behind.
    let names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp") && !n.starts_with(".pull-")), "{names:?}");
}

/// `purehw devices --json`, parsed; and the Vulkan entry, if Vulkan has a device.
fn devices() -> (serde_json::Value, Option<serde_json::Value>) {
    let v = json(ok(&purehw(&["devices", "--json"])).trim());
    let vk = v["backends"].as_array().unwrap().iter().find(|b| b["name"] == "vulkan").cloned().expect("vulkan listed");
    let present = vk["available"] == true;
    (v, present.then_some(vk))
}

/// Whether a Vulkan device is there for `test`; without one the test is skipped with a printed
/// line, unless `PUREHW_REQUIRE_VULKAN=1`, where that is a failure.
fn vulkan_device(test: &str) -> Option<serde_json::Value> {
    let (v, vk) = devices();
    if vk.is_none() {
        let required = std::env::var("PUREHW_REQUIRE_VULKAN").is_ok_and(|v| v == "1");
        assert!(!required, "{test}: PUREHW_REQUIRE_VULKAN=1 but Vulkan is unavailable: {v}");
        eprintln!("{test}: skipped: Vulkan is unavailable");
    }
    vk.map(|vk| vk["devices"][0].clone())
}

/// `purehw devices`: every backend, in text and JSON; each Vulkan device with what matters, or
/// why Vulkan is unavailable.
#[test]
fn devices_lists_every_backend() {
    let text = ok(&purehw(&["devices"]));
    for name in ["cpu ", "cpu-ref ", "vulkan ", "SIMD", "--backend auto"] {
        assert!(text.contains(name), "{name:?} missing in:\n{text}");
    }
    let (v, vk) = devices();
    let names: Vec<&str> = v["backends"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cpu", "cpu-ref", "vulkan"]);
    assert_eq!(v["default"], "cpu");
    assert!(v["backends"][0]["simd"].is_string() && v["backends"][0]["threads"].as_u64().unwrap() >= 1, "{v}");
    match vk {
        None => assert!(v["backends"][2]["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}"),
        Some(vk) => {
            let devs = vk["devices"].as_array().unwrap();
            assert!(!devs.is_empty(), "{vk}");
            for d in devs {
                for key in [
                    "name",
                    "type",
                    "driver",
                    "api_version",
                    "subgroup_size",
                    "float16",
                    "int8_dot",
                    "coopmat",
                    "heaps",
                ] {
                    assert!(!d[key].is_null(), "{key} missing in {d}");
                }
                assert!(text.contains(d["name"].as_str().unwrap()), "{text}");
            }
            // `auto` never takes a CPU device (lavapipe).
            if devs.iter().all(|d| d["gpu"] == false) {
                assert_eq!(v["auto"], "cpu", "{v}");
            }
        }
    }
    // Without a Vulkan driver: the reason, and auto is cpu.
    let o = purehw_env(&["devices", "--json"], &[("VK_ICD_FILENAMES", "/nonexistent.json")]);
    let v = json(ok(&o).trim());
    assert_eq!(v["backends"][2]["available"], false, "{v}");
    assert!(v["backends"][2]["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    assert_eq!(v["auto"], "cpu");
}

/// `--backend auto` without a discrete or integrated GPU runs on cpu, saying so in one line.
#[test]
fn auto_without_a_gpu_is_cpu() {
    let (v, _) = devices();
    if v["auto"] != "cpu" {
        eprintln!("auto_without_a_gpu_is_cpu: skipped: this machine has a GPU ({})", v["auto"]);
        return;
    }
    let m = model_file(SMOL.0, SMOL.1);
    let base = ["run", "-m", path_str(&m), "-p", "The capital of France is", "-n", "3", "--json"];
    let o = purehw(&[&base[..], &["--backend", "auto"]].concat());
    let auto = json(&ok(&o));
    let note = stderr(&o);
    assert_eq!(note.lines().count(), 1, "{note}");
    assert!(note.starts_with("purehw: --backend auto: ") && note.contains("using cpu"), "{note}");
    assert_eq!(auto["ids"], json(&ok(&purehw(&[&base[..], &["--backend", "cpu"]].concat())))["ids"]);
}

/// `run` and `logits` on Vulkan give what `cpu` gives (same int8 activations): the same greedy
/// ids, the same last-position argmax and logits within rounding.
#[test]
fn vulkan_run_and_logits_agree_with_cpu_smollm2() {
    if vulkan_device("vulkan_run_and_logits_agree_with_cpu_smollm2").is_none() {
        return;
    }
    let m = model_file(SMOL.0, SMOL.1);
    let case = france_case("smollm2-135m");
    let prompt = case["prompt"].as_str().unwrap();
    let base = ["run", "-m", path_str(&m), "-p", prompt, "-n", "4", "--json"];
    let cpu = json(&ok(&purehw(&[&base[..], &["--backend", "cpu"]].concat())));
    let vk = json(&ok(&purehw(&[&base[..], &["--backend", "vulkan"]].concat())));
    assert_eq!(ids(&vk["ids"]), ids(&cpu["ids"]));
    assert_eq!(vk["text"], cpu["text"]);

    let tmp = tempfile::tempdir().unwrap();
    let input: Vec<String> = ids(&case["input_ids"]).iter().map(|i| i.to_string()).collect();
    let logits = |backend: &str| {
        let out = tmp.path().join(format!("{backend}.f32"));
        let args =
            ["logits", "-m", path_str(&m), "--ids", &input.join(","), "--backend", backend, "-o", path_str(&out)];
        ok(&purehw(&args));
        read_f32(&out)
    };
    let (c, v) = (logits("cpu"), logits("vulkan"));
    assert_eq!(c.len(), v.len());
    assert_eq!(argmax(&c), argmax(&v));
    assert!(purehw_conformance::nmse(&v, &c) < 1e-6, "nmse {}", purehw_conformance::nmse(&v, &c));
}

/// Device memory running out (injected at the 3rd device allocation) is one line naming the
/// device and what did not fit, exit code 1.
#[test]
fn vulkan_out_of_memory_is_one_clear_line() {
    let Some(dev) = vulkan_device("vulkan_out_of_memory_is_one_clear_line") else { return };
    let m = model_file(SMOL.0, SMOL.1);
    let o = purehw_env(
        &["run", "-m", path_str(&m), "-p", "hi", "-n", "2", "--backend", "vulkan"],
        &[("PUREHW_VK_FAULT", "oom:3")],
    );
    user_error(&o, "out of device memory");
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(dev["name"].as_str().unwrap()), "the device is not named: {err}");
    assert!(err.contains("needs") && err.contains("bytes of device memory"), "what did not fit / the budget: {err}");
}

/// `bench --backend vulkan`: the usual numbers, plus the device, dispatches and barriers per
/// decode token and device time per decode step.
#[test]
fn bench_json_vulkan() {
    let Some(dev) = vulkan_device("bench_json_vulkan") else { return };
    let m = model_file(SMOL.0, SMOL.1);
    let v = check_bench(
        &["bench", "-m", path_str(&m), "--backend", "vulkan", "-p", "4", "-n", "2", "-r", "1", "--json"],
        "vulkan",
        4,
        2,
    );
    assert_eq!(v["act"], "int8");
    assert_eq!(v["device"], dev["name"], "{v}");
    assert!(v["dispatches_per_token"].as_u64().unwrap() > 0, "{v}");
    assert!(v["barriers_per_token"].as_u64().is_some(), "{v}");
    if dev["timestamps"] == true {
        assert!(v["tg_device_seconds"].as_f64().unwrap() > 0.0, "{v}");
    }
    let text = ok(&purehw(&["bench", "-m", path_str(&m), "--backend", "vulkan", "-p", "0", "-n", "1", "-r", "1"]));
    assert!(text.contains(" tg1 ") && text.contains("dispatches"), "{text}");
    assert!(text.contains(&format!("device: {}", dev["name"].as_str().unwrap())), "{text}");
}

//! Golden-output checks written once, generic over the backend (instantiated per backend in
//! `tests/golden.rs` and `tests/models.rs`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use purehw_core::model::{Model, ModelOptions, SeqInput};
use purehw_core::source::ModelSource;
use purehw_hal::{ActQuant, Backend};
use purehw_hal_cpu_ref::CpuRef;

use crate::{argmax, fixture, nmse, read_f32, read_json, top2_gap};

/// Open a model folder/file, panicking with the error's message (tests only).
pub fn open(path: &std::path::Path) -> ModelSource {
    ModelSource::open(path).unwrap_or_else(|e| panic!("{e}"))
}

/// Load `src` on `backend`, panicking with the error's message.
pub fn load<B: Backend>(backend: B, src: &ModelSource, opts: ModelOptions) -> Model<B> {
    Model::load(backend, src, opts).unwrap_or_else(|e| panic!("{e}"))
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// Greedy decode `n` tokens after `prompt` (slot 0), never stopping early unless `eos` is given.
/// Returns the ids and, per step, the top-2 logit gap (for divergence messages).
pub fn greedy<B: Backend>(m: &mut Model<B>, prompt: &[u32], n: usize, eos: &[u32]) -> (Vec<u32>, Vec<f32>) {
    let mut out = Vec::new();
    let mut gaps = Vec::new();
    let mut logits = m.forward(0, 0, prompt).unwrap_or_else(|e| panic!("{e}")).to_vec();
    for i in 0..n {
        let id = argmax(&logits) as u32;
        out.push(id);
        gaps.push(top2_gap(&logits));
        if eos.contains(&id) || i + 1 == n {
            break;
        }
        logits = m.forward(0, prompt.len() + i, &[id]).unwrap_or_else(|e| panic!("{e}")).to_vec();
    }
    (out, gaps)
}

/// Panic with where two greedy runs diverge and how close the decision was.
pub fn assert_greedy(case: &str, ours: &[u32], gaps: &[f32], golden: &[u32]) {
    if let Some(i) = ours.iter().zip(golden).position(|(a, b)| a != b) {
        panic!(
            "{case}: greedy diverges at step {i}: ours {} golden {} (our top-2 gap there {:.6})\n ours   {ours:?}\n golden {golden:?}",
            ours[i], golden[i], gaps[i]
        );
    }
    assert_eq!(ours.len(), golden.len(), "{case}: greedy length differs\n ours   {ours:?}\n golden {golden:?}");
}

/// An HF-layout checkpoint with `golden.json`: every position's logits (NMSE ≤ `tol`, argmax
/// equal) and 16 greedy tokens (never stopping at EOS).
pub fn check_hf_golden<B: Backend>(dir: &str, tol: f64, make: impl FnMut() -> B) {
    let dir = fixture(dir);
    check_hf_golden_at(&dir, &dir, tol, make)
}

/// [`check_hf_golden`] for a checkpoint at `model` (e.g. the fixture rewritten in another
/// layout) against the goldens in `golden_dir`.
pub fn check_hf_golden_at<B: Backend>(
    model: &std::path::Path,
    dir: &std::path::Path,
    tol: f64,
    mut make: impl FnMut() -> B,
) {
    let src = open(model);
    let golden = read_json(&dir.join("golden.json"));
    let opts = ModelOptions { ctx: 512, slots: 1, max_batch: 48, logit_rows: 48, ..Default::default() };
    let mut m = load(make(), &src, opts);
    let vocab = m.config().vocab;
    for case in golden["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let input = ids(&case["input_ids"]);
        let want = read_f32(&dir.join(case["logits_file"].as_str().expect("logits_file")));
        assert_eq!(want.len(), input.len() * vocab, "{name}: golden logits shape");
        let mut got = Vec::new();
        m.forward_all(0, 0, &input, &mut got).unwrap_or_else(|e| panic!("{e}"));
        let mut worst = 0f64;
        for (p, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
            let e = nmse(g, w);
            worst = worst.max(e);
            assert!(e <= tol, "{name}: position {p}: NMSE {e:e} > {tol:e}");
            assert_eq!(argmax(g), argmax(w), "{name}: position {p}: argmax differs (NMSE {e:e})");
        }
        eprintln!("{name}: {} positions, worst per-position NMSE {worst:.3e}", input.len());
        let (ours, gaps) = greedy(&mut m, &input, 16, &[]);
        assert_greedy(name, &ours, &gaps, &ids(&case["greedy_ids"]));
    }
}

/// A real GGUF with `cases.json`: last-position logits (NMSE ≤ `tol`), per-position argmax over
/// the prompt, and the greedy ids (stopping at EOS as HF `generate` does).
pub fn check_gguf_golden<B: Backend>(
    fixture_dir: &str,
    model: &std::path::Path,
    tol: f64,
    mut make: impl FnMut() -> B,
) {
    let dir = fixture(fixture_dir);
    let cases = read_json(&dir.join("cases.json"));
    let src = open(model);
    let opts = ModelOptions { ctx: 2048, slots: 1, max_batch: 128, logit_rows: 1, ..Default::default() };
    let mut m = load(make(), &src, opts);
    let eos = m.config().eos.clone();
    for case in cases["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let input = ids(&case["input_ids"]);
        let want = read_f32(&dir.join(format!("{name}.last_logits.f32")));
        let got = m.forward(0, 0, &input).unwrap_or_else(|e| panic!("{e}")).to_vec();
        let e = nmse(&got, &want);
        eprintln!("{fixture_dir}/{name}: {} prompt tokens, last-position NMSE {e:.3e}", input.len());
        assert!(e <= tol, "{name}: last-position NMSE {e:e} > {tol:e}");
        let golden = ids(&case["greedy_ids"]);
        let (ours, gaps) = greedy(&mut m, &input, golden.len(), &eos);
        assert_greedy(name, &ours, &gaps, &golden);
    }
}

/// The reference's greedy run on one prompt: the ids and the logits after feeding the last one.
pub struct ReferenceRun {
    pub name: String,
    pub input: Vec<u32>,
    pub ids: Vec<u32>,
    pub last_logits: Vec<f32>,
}

/// Which greedy runs of the reference a test wants: a fixture's prompts on one model file, `n`
/// tokens, in one activation mode.
type RunKey = (String, std::path::PathBuf, usize, String);

/// Reference runs, computed once per test binary and shared by every backend's test in it
/// (`CpuRef` takes minutes on a real model). One `OnceLock` per key, so tests wanting the same
/// runs wait for one computation and tests wanting different ones do not wait for each other.
static REFERENCE_RUNS: Mutex<BTreeMap<RunKey, Arc<RunCell>>> = Mutex::new(BTreeMap::new());

/// One key's runs, once computed.
type RunCell = OnceLock<Arc<Vec<ReferenceRun>>>;

const TWIN_OPTIONS: ModelOptions = ModelOptions { ctx: 2048, ..ModelOptions::DEFAULT };

/// Greedy `n` tokens (never stopping at EOS) on every prompt of a fixture's `cases.json`, on the
/// reference (`CpuRef`), with the logits after the last one; computed once per binary.
pub fn reference_runs(fixture_dir: &str, model: &std::path::Path, n: usize, act: ActQuant) -> Arc<Vec<ReferenceRun>> {
    let key = (fixture_dir.to_string(), model.to_path_buf(), n, format!("{act:?}"));
    let cell = REFERENCE_RUNS.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default().clone();
    cell.get_or_init(|| {
        let cases = read_json(&fixture(fixture_dir).join("cases.json"));
        let src = open(model);
        let mut m = load(CpuRef::new(), &src, ModelOptions { act, ..TWIN_OPTIONS });
        let runs = cases["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .map(|case| {
                let name = case["name"].as_str().expect("name").to_string();
                let input = ids(&case["input_ids"]);
                let t = std::time::Instant::now();
                let (ids, _) = greedy(&mut m, &input, n, &[]);
                let pos = input.len() + n - 1;
                let last = *ids.last().expect("tokens");
                let last_logits = m.forward(0, pos, &[last]).unwrap_or_else(|e| panic!("{e}")).to_vec();
                eprintln!(
                    "{fixture_dir}/{name} ({act:?}): {} prompt + {n} greedy tokens on the reference: {:.2?}",
                    input.len(),
                    t.elapsed()
                );
                ReferenceRun { name, input, ids, last_logits }
            })
            .collect();
        Arc::new(runs)
    })
    .clone()
}

/// Greedy `n` tokens (never stopping at EOS) on every prompt of a GGUF fixture, on a twin
/// backend and on the reference (`CpuRef`, run once per binary: [`reference_runs`]) in the same
/// activation mode: the ids and the final logits must be equal bit for bit.
pub fn check_greedy_twins<B: Backend>(
    fixture_dir: &str,
    model: &std::path::Path,
    n: usize,
    act: ActQuant,
    make: impl FnOnce() -> B,
) {
    let want = reference_runs(fixture_dir, model, n, act);
    // The source (the file's memory map) outlives the model: a backend may read the weights in
    // place (hal-vulkan imports the mapped pages) without holding the map itself.
    let src = open(model);
    let mut b = load(make(), &src, ModelOptions { act, ..TWIN_OPTIONS });
    for r in want.iter() {
        let t = std::time::Instant::now();
        let (ib, gaps) = greedy(&mut b, &r.input, n, &[]);
        eprintln!(
            "{fixture_dir}/{} ({act:?}): {} prompt + {n} greedy tokens on {}: {:.2?}",
            r.name,
            r.input.len(),
            b.backend().name(),
            t.elapsed()
        );
        assert_greedy(&r.name, &ib, &gaps, &r.ids);
        let pos = r.input.len() + n - 1;
        let lb = b.forward(0, pos, &[*r.ids.last().expect("tokens")]).unwrap_or_else(|e| panic!("{e}")).to_vec();
        if let Some(i) = (0..lb.len()).find(|&i| r.last_logits[i].to_bits() != lb[i].to_bits()) {
            panic!(
                "{}: logits after {n} tokens differ first at {i}: {} (reference) vs {}",
                r.name, r.last_logits[i], lb[i]
            );
        }
    }
}

/// Token ids spread over the vocabulary, fixed.
pub fn prompt(n: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + seed * 104_729 + 13) % (vocab - 200) + 100) as u32).collect()
}

/// Every logit row of a run: slot 0 reads a long prompt (every position's logits), slot 1 a short
/// one; then `decode` batched steps over both slots, each feeding its previous argmax.
pub fn run<B: Backend>(m: &mut Model<B>, prompt_len: usize, decode: usize) -> Vec<f32> {
    let vocab = m.config().vocab;
    let mut out = Vec::new();
    m.forward_all(0, 0, &prompt(prompt_len, vocab, 1), &mut out).unwrap();
    let short = prompt(5, vocab, 2);
    out.extend_from_slice(m.forward(1, 0, &short).unwrap());
    let argmax = |l: &[f32]| argmax(l) as u32;
    let mut next = [argmax(&out[(prompt_len - 1) * vocab..prompt_len * vocab]), argmax(&out[prompt_len * vocab..])];
    let mut pos = [prompt_len, short.len()];
    for _ in 0..decode {
        let (a, b) = ([next[0]], [next[1]]);
        let seqs = [SeqInput { slot: 0, pos: pos[0], tokens: &a }, SeqInput { slot: 1, pos: pos[1], tokens: &b }];
        let l = m.forward_batch(&seqs).unwrap();
        next = [argmax(&l[..vocab]), argmax(&l[vocab..])];
        out.extend_from_slice(l);
        pos = [pos[0] + 1, pos[1] + 1];
    }
    out
}

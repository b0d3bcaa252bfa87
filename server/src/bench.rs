//! `purehw bench`: prompt processing and generation speed, defined as llama.cpp's llama-bench
//! defines them.
//!
//! - `ppN`: one step over an N-token prompt from position 0 (logits of the last position only);
//!   tokens/s = N / seconds.
//! - `tgN`: N single-token steps from position 0, starting at BOS; tokens/s = N / seconds. Each
//!   step reads back only its argmax, not the logits, and (one sequence) feeds it to the next
//!   step, as greedy generation does (`Model::decode_greedy`, which runs a step ahead on a GPU).
//!
//! Prompt token ids are pseudo-random but fixed (llama-bench uses random tokens too); special
//! tokens are left out. Each test runs once untimed to warm up, then `-r` times; the result is the mean and
//! sample standard deviation of tokens/s over those runs. Every run starts again at position 0,
//! which is all a reset takes: a step reads only the cache rows before its own positions.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use purehw_core::model::{Model, ModelOptions, SeqInput, Want};
use purehw_core::source::ModelSource;
use purehw_hal::{ActQuant, KvType};
use serde::Serialize;

use crate::backends::{self, Hw, Maker, Registered, WithBackend};
use crate::error::{CliResult, Context, err};
use crate::{BenchArgs, models, out};

/// One test's result; `n` 0 means it was skipped (`-p 0` / `-n 0`) and the rates are 0.
#[derive(Serialize, Default, Copy, Clone)]
struct Rate {
    n: usize,
    tps_mean: f64,
    tps_std: f64,
}

#[derive(Serialize)]
struct BenchJson<'a> {
    model: &'a str,
    backend: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    simd: Option<&'static str>,
    /// The device's name (vulkan).
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<&'a str>,
    threads: usize,
    act: &'static str,
    /// `--kv-type`: "f32" or "f16".
    kv_type: &'static str,
    repetitions: usize,
    /// Tokens in the context before each test (`-d`).
    depth: usize,
    /// Sequences decoded together in the tg test (`-b`); `tg.n` counts all their tokens.
    batch: usize,
    model_bytes: usize,
    params: usize,
    pp: Rate,
    tg: Rate,
    /// `None` (JSON null) where the OS does not report it.
    peak_rss_bytes: Option<u64>,
    /// Bytes this process read from storage per generated token over the tg runs (warm-up
    /// included; /proc/self/io `read_bytes`): what a weight budget costs in disk reads. Pages
    /// already in the page cache cost none. `None` where the OS does not report it.
    disk_read_bytes_per_token: Option<f64>,
    /// The disk's sequential read rate under the model's file (GB/s), read past the page cache
    /// (`O_DIRECT`): the ceiling on streaming layers that are not cached. `None` where the file
    /// system or OS does not allow direct reads.
    disk_read_gbps: Option<f64>,
    /// With a budget on a backend that copies weights (a discrete GPU): bytes copied into its
    /// streaming slots per generated token over the tg runs, and the rate of those copies (GB/s,
    /// host→device through staging).
    #[serde(skip_serializing_if = "Option::is_none")]
    device_copy_bytes_per_token: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_copy_gbps: Option<f64>,
    /// `--memory-budget` in bytes, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_budget_bytes: Option<usize>,
    /// With a budget that does not hold every layer: the layers kept resident and how many are
    /// read ahead (the others are streamed).
    #[serde(skip_serializing_if = "Option::is_none")]
    streaming: Option<Streaming>,
    /// Measured bandwidth of the memory the weights are read from (GB/s = 1e9 bytes/s): the
    /// host's, read with the same thread count, or a discrete device's own (a kernel reading
    /// device memory).
    mem_read_gbps: f64,
    /// Weight bytes one decode step streams (every matmul weight, the LM head included).
    decode_bytes_per_token: usize,
    /// `batch · mem_read_gbps / decode_bytes_per_token`: the memory-bound ceiling of tg.
    tg_roofline_tps: f64,
    /// `tg.tps_mean / tg_roofline_tps`.
    tg_roofline_fraction: f64,
    /// Where the backend counts them (vulkan): dispatches and barriers of one decode step.
    #[serde(skip_serializing_if = "Option::is_none")]
    dispatches_per_token: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    barriers_per_token: Option<usize>,
    /// Where the backend times its steps (vulkan's timestamp queries): device seconds per
    /// decode step, the mean over the timed tg runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    tg_device_seconds: Option<f64>,
}

pub fn bench(a: &BenchArgs) -> CliResult {
    if a.repetitions == 0 {
        return err("-r/--repetitions must be at least 1");
    }
    if a.n_prompt == 0 && a.n_gen == 0 {
        return err("-p and -n are both 0: nothing to measure");
    }
    let r = models::resolve(&a.model)?;
    let src = ModelSource::open(&r.path)?;
    let max_ctx = src.config.max_ctx;
    for (flag, n) in [("-p", a.n_prompt), ("-n", a.n_gen)] {
        if max_ctx > 0 && a.depth + n > max_ctx {
            let at = if a.depth > 0 { format!(" after -d {}", a.depth) } else { String::new() };
            return err(format!("{flag} {n}{at} exceeds the model's context of {max_ctx} tokens"));
        }
    }
    if a.batch == 0 {
        return err("-b/--batch must be at least 1");
    }
    let opts = ModelOptions {
        ctx: a.depth + a.n_prompt.max(a.n_gen).max(1),
        slots: a.batch,
        // The whole prompt in one step, as llama-bench's default batch does; the depth's tokens
        // in steps of up to 512 (with `-p 0` too).
        max_batch: a.n_prompt.max(a.depth.min(512)).max(a.batch),
        logit_rows: a.batch,
        act: ActQuant::default(),
        ..ModelOptions::default()
    };
    if a.threads_sweep.is_empty() {
        backends::dispatch(&a.backend, BenchOn { a, path: &r.path, src: &src, opts, quiet: false })?;
        return Ok(());
    }
    sweep(a, &r.path, &src, opts)
}

/// `--threads-sweep`: the tests at each thread count, then one table (or one JSON object).
fn sweep(a: &BenchArgs, path: &Path, src: &ModelSource, opts: ModelOptions) -> CliResult {
    if a.backend.kind != backends::BackendKind::Cpu {
        return err("--threads-sweep measures the cpu backend's threads: leave out --backend, or pass --backend cpu");
    }
    if a.threads_sweep.contains(&0) {
        return err("--threads-sweep: every thread count must be at least 1");
    }
    let mut rows = Vec::new();
    for &t in &a.threads_sweep {
        let b = backends::BackendArgs { threads: t, ..a.backend.clone() };
        if !a.json {
            eprintln!("{t} thread{}…", if t == 1 { "" } else { "s" });
        }
        rows.push(backends::dispatch(&b, BenchOn { a, path, src, opts, quiet: true })?);
    }
    if a.json {
        let s = serde_json::to_string(&serde_json::json!({ "model": path.display().to_string(), "sweep": rows }))
            .context(|| "encoding the --json output".into())?;
        return out::print_all(&format!("{s}\n"));
    }
    let (pp, tg) = (test_name("pp", a.n_prompt, a.depth), test_name("tg", a.n_gen, a.depth));
    let mut t = format!(
        "| threads | {pp:>9} t/s | {tg:>9} t/s | tg speed-up | read GB/s | tg roofline t/s | of roofline |\n\
         | ------: | ------------: | ------------: | ----------: | --------: | --------------: | ----------: |\n"
    );
    let base = rows.first().map_or(0.0, |r: &Summary| r.tg.tps_mean);
    for r in &rows {
        let up = if base > 0.0 { r.tg.tps_mean / base } else { 0.0 };
        let _ = writeln!(
            t,
            "| {:>7} | {:>13.2} | {:>13.2} | {:>10.2}x | {:>9.1} | {:>15.1} | {:>10.0}% |",
            r.threads,
            r.pp.tps_mean,
            r.tg.tps_mean,
            up,
            r.mem_read_gbps,
            r.tg_roofline_tps,
            100.0 * r.tg_roofline_fraction
        );
    }
    out::print_all(&t)
}

/// How a budgeted model streams its layers.
#[derive(Serialize, Copy, Clone)]
struct Streaming {
    layers: usize,
    pinned_layers: usize,
    read_ahead: usize,
}

/// One thread count's results (`--threads-sweep`).
#[derive(Serialize)]
struct Summary {
    threads: usize,
    pp: Rate,
    tg: Rate,
    mem_read_gbps: f64,
    tg_roofline_tps: f64,
    tg_roofline_fraction: f64,
}

/// `bench`'s body on one backend.
struct BenchOn<'a> {
    a: &'a BenchArgs,
    path: &'a Path,
    src: &'a ModelSource,
    /// Everything but `act`, which is the backend's.
    opts: ModelOptions,
    /// Print nothing (the sweep prints one table at the end).
    quiet: bool,
}

impl WithBackend for BenchOn<'_> {
    type Out = Summary;

    fn run<B: Registered>(self, make: Maker<B>) -> CliResult<Summary> {
        let backend = make.make()?;
        let hw = backend.hw();
        let opts = ModelOptions { act: make.act, kv: make.kv, ..self.opts };
        bench_on(backend, make.budget, B::NAME, &hw, self.a, self.path, self.src, opts, self.quiet)
    }
}

#[allow(clippy::too_many_arguments)]
fn bench_on<B: Registered>(
    mut backend: B,
    budget: Option<usize>,
    name: &'static str,
    hw: &Hw,
    a: &BenchArgs,
    path: &Path,
    src: &ModelSource,
    opts: ModelOptions,
    quiet: bool,
) -> CliResult<Summary> {
    let show = !a.json && !quiet;
    let tensors = src.tensors();
    let model_bytes: usize = tensors.iter().map(|t| t.bytes).sum();
    let params: usize = tensors.iter().map(|t| t.shape.iter().product::<usize>()).sum();
    let act = match opts.act {
        ActQuant::F32 => "f32",
        ActQuant::Int8 => "int8",
    };
    let file = path.file_name().map_or_else(|| path.display().to_string(), |f| f.to_string_lossy().into_owned());
    let kv = match opts.kv {
        KvType::F32 => "f32",
        KvType::F16 => "f16",
    };
    let table = Table { file, size: fmt_size(model_bytes), params: fmt_params(params), name, hw, act, kv };
    // Before the model takes the device's memory: the probe needs two buffers of 1 GiB.
    let device_bw = if quiet { None } else { backend.device_bandwidth()? };
    // Loaded before the header is printed: a budget too small is then the only output.
    let mut model = Model::load_with_budget(backend, src, opts, budget)?;
    if show {
        out::print_all(&table.header())?;
    }
    let streaming = model.streaming().map(|(pinned_layers, read_ahead)| Streaming {
        layers: model.config().layers,
        pinned_layers,
        read_ahead,
    });
    let c = model.config();
    // A decode step reads every matmul weight once; the embedding table only when it is also
    // the LM head (otherwise one row of it).
    let embed_bytes = tensors.iter().find(|t| t.name == "token_embd.weight" || t.name.ends_with("embed_tokens.weight"));
    let decode_bytes = model_bytes - if c.tied_embeddings { 0 } else { embed_bytes.map_or(0, |t| t.bytes) };
    let mut ids = TokenIds::new(c.vocab, c.bos, &c.eos);
    let (bos, add_bos) = (c.bos, c.add_bos);
    // The context's first `depth` tokens, once: the tests below only overwrite what follows.
    let depth = a.depth;
    if depth > 0 {
        let mut history: Vec<u32> = (0..depth).map(|_| ids.next()).collect();
        if let (Some(b), true) = (bos, add_bos) {
            history[0] = b;
        }
        for slot in 0..a.batch {
            for (i, chunk) in history.chunks(opts.max_batch).enumerate() {
                model.forward(slot, i * opts.max_batch, chunk).context(|| format!("prefilling -d {depth}"))?;
            }
        }
    }
    let (pp_name, mut tg_name) = (test_name("pp", a.n_prompt, depth), test_name("tg", a.n_gen, depth));
    if a.batch > 1 {
        tg_name = format!("{tg_name} ×{}", a.batch);
    }
    let mut pp = Rate::default();
    if a.n_prompt > 0 {
        // llama-bench: BOS first where the model adds one, then random tokens.
        let mut prompt: Vec<u32> = (0..a.n_prompt).map(|_| ids.next()).collect();
        if let (Some(b), true, 0) = (bos, add_bos, depth) {
            prompt[0] = b;
        }
        pp = measure(a.n_prompt, a.repetitions, || {
            let t = Instant::now();
            model.forward(0, depth, &prompt)?;
            Ok(t.elapsed().as_secs_f64())
        })
        .context(|| pp_name.clone())?;
        if show {
            out::print_all(&table.row(&pp_name, &pp))?;
        }
    }
    let mut tg = Rate::default();
    // Device seconds of the decode steps (summed, counted), where the backend times its steps.
    let mut device_time = (0f64, 0usize);
    let mut counts = None;
    let mut disk_per_token = None;
    let mut copy: Option<(f64, Option<f64>)> = None;
    if a.n_gen > 0 {
        // llama-bench: from an empty context (or after the depth's tokens), BOS first where the
        // context is empty, then random tokens (a batch's streams; one sequence decodes greedily
        // from the first).
        let mut steps: Vec<u32> = (0..a.n_gen).map(|_| ids.next()).collect();
        if let (Some(b), 0) = (bos, depth) {
            steps[0] = b;
        }
        let mut runs = 0;
        let read_before = disk_read_bytes();
        let copied_before = model.backend().stats().streamed;
        // With a batch, sequence s decodes the same tokens shifted by s (its own stream).
        let want = vec![Want::Argmax; a.batch];
        let mut seqs: Vec<SeqInput<'_>> = Vec::with_capacity(a.batch);
        tg = measure(a.n_gen * a.batch, a.repetitions, || {
            let t = Instant::now();
            let warm = runs > 0;
            runs += 1;
            if a.batch == 1 {
                // Greedy decoding as `run` does it (Model::decode_greedy): from the first token,
                // each step's argmax is the next step's token, 4 bytes read back a step; on a
                // GPU the device feeds it on while the host prepares the step after.
                let before = model.backend().stats().steps_seconds;
                let n = model.decode_greedy(0, depth, steps[0], steps.len(), |_| true)?;
                if n != steps.len() {
                    return Err(purehw_core::Error::Invalid(format!("decoded {n} of {} tokens", steps.len())));
                }
                let after = model.backend().stats().steps_seconds;
                if warm && let (Some(b), Some(e)) = (before, after) {
                    device_time.0 += e.0 - b.0;
                    device_time.1 += (e.1 - b.1) as usize;
                }
            } else {
                for pos in 0..steps.len() {
                    seqs.clear();
                    seqs.extend((0..a.batch).map(|s| SeqInput {
                        slot: s,
                        pos: depth + pos,
                        tokens: core::slice::from_ref(&steps[(pos + s) % steps.len()]),
                    }));
                    model.forward_select(&seqs, &want)?;
                    if warm && let Some(s) = model.backend().stats().last_step_seconds {
                        device_time.0 += s;
                        device_time.1 += 1;
                    }
                }
            }
            Ok(t.elapsed().as_secs_f64())
        })
        .context(|| tg_name.clone())?;
        let tokens = (a.n_gen * a.batch * (a.repetitions + 1)) as f64;
        disk_per_token = read_before.zip(disk_read_bytes()).map(|(b, e)| e.saturating_sub(b) as f64 / tokens);
        if let (Some(b), Some(e)) = (copied_before, model.backend().stats().streamed) {
            let (bytes, secs) = (e.0.saturating_sub(b.0) as f64, e.1 - b.1);
            copy = Some((bytes / tokens, (secs > 0.0).then(|| bytes / secs / 1e9)));
        }
        counts = model.backend().step_counts();
        if show {
            out::print_all(&table.row(&tg_name, &tg))?;
        }
    }
    let tg_device = (device_time.1 > 0).then(|| device_time.0 / device_time.1 as f64);

    let peak = peak_rss_bytes();
    // After the peak RSS is read: the probe's buffer must not count. A device backend's probe
    // reads the host's memory with every core (the device's own memory only where it shares the
    // host's: an integrated GPU, lavapipe).
    let probe_threads = match hw.device {
        Some(_) => std::thread::available_parallelism().map_or(1, |n| n.get()),
        None => hw.threads,
    };
    let bw = device_bw.unwrap_or_else(|| read_bandwidth(probe_threads, 1 << 30, 5));
    let disk_gbps = disk_read_rate(path, 256 << 20).map(|r| r / 1e9);
    // A batched step serves `batch` tokens with one read of the weights.
    let roof = a.batch as f64 * bw / decode_bytes.max(1) as f64;
    let frac = tg.tps_mean / roof;
    let summary = Summary {
        threads: hw.threads,
        pp,
        tg,
        mem_read_gbps: bw / 1e9,
        tg_roofline_tps: roof,
        tg_roofline_fraction: frac,
    };
    if quiet {
        return Ok(summary);
    }
    if a.json {
        let model_path = path.display().to_string();
        let v = BenchJson {
            model: &model_path,
            backend: name,
            simd: hw.simd,
            device: hw.device.as_deref(),
            threads: hw.threads,
            act,
            kv_type: kv,
            repetitions: a.repetitions,
            depth: a.depth,
            batch: a.batch,
            model_bytes,
            params,
            pp,
            tg,
            peak_rss_bytes: peak,
            disk_read_bytes_per_token: disk_per_token,
            disk_read_gbps: disk_gbps,
            device_copy_bytes_per_token: copy.map(|c| c.0),
            device_copy_gbps: copy.and_then(|c| c.1),
            memory_budget_bytes: budget,
            streaming,
            mem_read_gbps: bw / 1e9,
            decode_bytes_per_token: decode_bytes,
            tg_roofline_tps: roof,
            tg_roofline_fraction: frac,
            dispatches_per_token: counts.map(|c| c.0),
            barriers_per_token: counts.map(|c| c.1),
            tg_device_seconds: tg_device,
        };
        let s = serde_json::to_string(&v).context(|| "encoding the --json output".into())?;
        out::print_all(&format!("{s}\n"))?;
        return Ok(summary);
    }
    let mut device = String::new();
    if let Some(d) = &hw.device {
        let _ = write!(device, "\ndevice: {d}");
        if let Some((disp, bar)) = counts {
            let _ = write!(device, "; a decode step is {disp} dispatches and {bar} barriers");
        }
        if let Some(s) = tg_device {
            let _ = write!(device, "; {:.3} ms of device time per decode step", s * 1e3);
        }
    }
    let mib = |b: f64| format!("{:.1} MiB", b / (1u64 << 20) as f64);
    let rss = peak.map_or_else(|| "unknown".into(), |b| mib(b as f64));
    let disk = disk_per_token.map_or_else(|| "unknown".into(), |b| format!("{:.2} MB/token", b / 1e6));
    let disk_rate = disk_gbps.map_or_else(|| "unknown".into(), |r| format!("{r:.2} GB/s"));
    let stream = match (budget, streaming) {
        (None, _) => String::new(),
        (Some(b), None) => format!("; memory budget {} holds every layer", mib(b as f64)),
        (Some(b), Some(s)) => format!(
            "; memory budget {}: {} of {} layers resident, the rest streamed ({} read ahead)",
            mib(b as f64),
            s.pinned_layers,
            s.layers,
            s.read_ahead
        ),
    };
    let stream = match copy {
        Some((b, r)) => format!(
            "{stream}; copied into device slots during tg: {:.2} MB/token{}",
            b / 1e6,
            r.map_or_else(String::new, |r| format!(" at {r:.2} GB/s host→device"))
        ),
        None => stream,
    };
    out::print_all(&format!(
        "{device}\npeak RSS: {rss}; read from disk during tg: {disk} (the disk reads {disk_rate}){stream}\n{}: {:.1} GB/s; decode reads {:.1} MB/token -> tg roofline {roof:.1} t/s{}\n",
        match device_bw {
            Some(_) => "device memory read bandwidth (a kernel reading 1 GiB)".to_string(),
            None => format!("memory read bandwidth ({probe_threads} threads)"),
        },
        bw / 1e9,
        decode_bytes as f64 / 1e6,
        if tg.n > 0 { format!(", reached {:.0}%", 100.0 * frac) } else { String::new() }
    ))?;
    Ok(summary)
}

/// Memory read bandwidth in bytes/s: `threads` threads each stream their share of a `bytes`
/// buffer (far larger than the caches), best of `reps` passes.
fn read_bandwidth(threads: usize, bytes: usize, reps: usize) -> f64 {
    let words = bytes / 8;
    let buf: Vec<u64> = (0..words as u64).collect(); // written, so every page is really mapped
    let per = words.div_ceil(threads.max(1));
    let mut best = 0f64;
    for _ in 0..reps {
        let t = Instant::now();
        let sum = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(per)
                .map(|part| {
                    s.spawn(move || {
                        // Eight independent sums: load-bound, not add-latency-bound.
                        let mut acc = [0u64; 8];
                        for c in part.chunks_exact(8) {
                            for (a, &w) in acc.iter_mut().zip(c) {
                                *a = a.wrapping_add(w);
                            }
                        }
                        acc.iter().fold(0u64, |x, &y| x.wrapping_add(y))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        best = best.max(bytes as f64 / t.elapsed().as_secs_f64());
    }
    best
}

/// One untimed warm-up, then `reps` timed runs of `run` (which returns its seconds).
fn measure(
    n: usize,
    reps: usize,
    mut run: impl FnMut() -> purehw_core::Result<f64>,
) -> Result<Rate, purehw_core::Error> {
    run()?;
    let mut tps = Vec::with_capacity(reps);
    for _ in 0..reps {
        let secs = run()?;
        tps.push(n as f64 / secs.max(f64::MIN_POSITIVE));
    }
    let (tps_mean, tps_std) = mean_std(&tps);
    Ok(Rate { n, tps_mean, tps_std })
}

/// A test's name as llama-bench prints it: `pp512`, or `pp512 @ d800` after a depth.
fn test_name(kind: &str, n: usize, depth: usize) -> String {
    if depth > 0 { format!("{kind}{n} @ d{depth}") } else { format!("{kind}{n}") }
}

/// Mean and sample standard deviation (0 for fewer than two samples, as llama-bench reports).
fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Fixed pseudo-random token ids (splitmix64), skipping BOS and EOS.
struct TokenIds {
    state: u64,
    vocab: u64,
    special: Vec<u32>,
}

impl TokenIds {
    fn new(vocab: usize, bos: Option<u32>, eos: &[u32]) -> TokenIds {
        let mut special: Vec<u32> = eos.to_vec();
        special.extend(bos);
        TokenIds { state: 0x5eed_1234_abcd_0042, vocab: vocab.max(1) as u64, special }
    }

    fn next(&mut self) -> u32 {
        // A vocabulary of nothing but special tokens still ends: take what comes after 64 tries.
        let mut id = 0;
        for _ in 0..64 {
            self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            id = (z % self.vocab) as u32;
            if !self.special.contains(&id) {
                break;
            }
        }
        id
    }
}

/// The disk's sequential read rate (bytes/s) under `model` (a file, or a folder's largest
/// `.safetensors` file): up to `most` bytes read with `O_DIRECT`, past the page cache, in 8 MiB
/// blocks. `None` where direct reads are refused (tmpfs, some overlays) or not Linux.
fn disk_read_rate(model: &Path, most: usize) -> Option<f64> {
    let file = if model.is_dir() {
        std::fs::read_dir(model)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .max_by_key(|p| p.metadata().map_or(0, |m| m.len()))?
    } else {
        model.to_path_buf()
    };
    direct_read_rate(&file, most)
}

#[cfg(target_os = "linux")]
fn direct_read_rate(file: &Path, most: usize) -> Option<f64> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    const BLOCK: usize = 8 << 20;
    const ALIGN: usize = 4096; // O_DIRECT wants the buffer, offset and length aligned
    let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(file).ok()?;
    let mut buf = vec![0u8; BLOCK + ALIGN];
    let start = buf.as_ptr().align_offset(ALIGN);
    let block = &mut buf[start..start + BLOCK];
    let t = Instant::now();
    let mut total = 0;
    while total < most {
        match f.read(block) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(_) => return None,
        }
    }
    let secs = t.elapsed().as_secs_f64();
    (total > 0 && secs > 0.0).then(|| total as f64 / secs)
}

#[cfg(not(target_os = "linux"))]
fn direct_read_rate(_file: &Path, _most: usize) -> Option<f64> {
    None
}

/// Bytes this process has read from storage so far (`read_bytes` of /proc/self/io).
fn disk_read_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines().find_map(|l| l.strip_prefix("read_bytes:")).and_then(|v| v.trim().parse().ok())
}

/// The peak resident set (VmHWM) of this process, from /proc/self/status.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

fn fmt_size(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", b / (1u64 << 20) as f64)
    }
}

fn fmt_params(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2} M", n / 1e6)
    } else {
        format!("{:.2} K", n / 1e3)
    }
}

/// llama-bench's markdown table.
struct Table<'a> {
    file: String,
    size: String,
    params: String,
    name: &'static str,
    hw: &'a Hw,
    act: &'static str,
    /// The KV cache's elements.
    kv: &'static str,
}

impl Table<'_> {
    fn model_width(&self) -> usize {
        self.file.len().max(30)
    }

    fn backend(&self) -> String {
        // (A device's name is printed below the table: it is too long for the column.)
        match self.hw.simd {
            Some(simd) => format!("{} ({simd})", self.name),
            None => self.name.to_string(),
        }
    }

    fn header(&self) -> String {
        let w = self.model_width();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| {:w$} | {:>10} | {:>10} | {:12} | {:>7} | {:4} | {:3} | {:>8} | {:>20} |",
            "model", "size", "params", "backend", "threads", "act", "kv", "test", "t/s"
        );
        let _ = writeln!(
            s,
            "| {} | ---------: | ---------: | ------------ | ------: | ---- | --- | -------: | -------------------: |",
            "-".repeat(w)
        );
        s
    }

    fn row(&self, test: &str, r: &Rate) -> String {
        let w = self.model_width();
        let tps = format!("{:.2} ± {:.2}", r.tps_mean, r.tps_std);
        format!(
            "| {:w$} | {:>10} | {:>10} | {:12} | {:>7} | {:4} | {:3} | {:>8} | {:>20} |\n",
            self.file,
            self.size,
            self.params,
            self.backend(),
            self.hw.threads,
            self.act,
            self.kv,
            test,
            tps
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        assert_eq!(mean_std(&[]), (0.0, 0.0));
        assert_eq!(mean_std(&[3.0]), (3.0, 0.0));
        let (m, s) = mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(m, 5.0);
        assert!((s - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn token_ids_are_fixed_in_range_and_not_special() {
        let mut a = TokenIds::new(50, Some(1), &[2, 3]);
        let mut b = TokenIds::new(50, Some(1), &[2, 3]);
        for _ in 0..1000 {
            let id = a.next();
            assert_eq!(id, b.next());
            assert!(id < 50 && ![1, 2, 3].contains(&id), "{id}");
        }
    }
}

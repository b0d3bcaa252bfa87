//! `purehw quantize` and `purehw synth`: the commands around [`purehw_core::quantize`] (which
//! holds the work): model name resolution, `--shard-size` parsing and a progress bar on a
//! terminal.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use purehw_core::quantize::synth::{self, Like, SynthOptions};
use purehw_core::quantize::{self, Options, Progress, Scheme};

use purehw_core::source::{ModelSource, Role};
use purehw_hal_cpu::Cpu;

use crate::commands::tokenizer_for;
use crate::error::{CliError, CliResult, Context, err};
use crate::models;

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// An HF checkpoint folder (bf16/f16/f32 safetensors), a .gguf file or a known model name.
    pub input: String,
    /// The checkpoint folder to write (must not exist).
    pub output: PathBuf,
    /// seed (attention INT8, MLP INT4 g32, embeddings INT8 asym), w8, w4g32, w4g64, w4g128;
    /// each also with -asym.
    #[arg(long, default_value = "seed")]
    pub scheme: String,
    /// Most bytes of decoder layers per shard file (e.g. 2GiB, 500MB); a layer is never split.
    #[arg(long, default_value = "2GiB")]
    pub shard_size: String,
    /// tokenizer.json to copy into the output (default: the one beside the input).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Worker threads (0 = one per core).
    #[arg(short = 't', long, default_value_t = 0)]
    pub threads: usize,
    /// A text to calibrate the INT4 modules on (default: a built-in English text of ~1,300
    /// tokens): the model runs over it and each INT4 module is quantized by GPTQ against its
    /// inputs' statistics.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Round every module on its own (no calibration run, no GPTQ).
    #[arg(long, conflicts_with = "calibration")]
    pub no_calibrate: bool,
}

/// The built-in calibration text: original, and unlike `purehw quality`'s text.
const CALIBRATION: &str = include_str!("calibration.txt");
/// Most bytes of input Hessians a calibration run holds (4 bytes per entry of each `cols²`).
const HESSIAN_BYTES: usize = 2 << 30;

/// `SIZE`: bytes, or a number with `K`/`M`/`G`/`T` (powers of 1000) or `KiB`/`MiB`/`GiB`/`TiB`.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return None,
    };
    let v = n * mult as f64;
    (v.is_finite() && v >= 1.0 && v < u64::MAX as f64).then_some(v as u64)
}

/// A progress bar on stderr when it is a terminal; notes are printed either way.
struct Bar(ProgressBar);

impl Progress for Bar {
    fn start(&self, tensors: u64) {
        self.0.set_length(tensors);
    }
    fn tensor_done(&self, name: &str) {
        self.0.set_message(name.to_string());
        self.0.inc(1);
    }
    fn note(&self, msg: &str) {
        self.0.suspend(|| eprintln!("purehw: {msg}"));
    }
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// The model whose shapes and config to copy: gemma3-4b, gemma3-12b, gemma3-27b.
    #[arg(long)]
    pub like: String,
    /// The checkpoint folder to write (must not exist).
    pub output: PathBuf,
    /// As quantize's --scheme: seed, w8, w4g32, w4g64, w4g128; each also with -asym.
    #[arg(long, default_value = "seed")]
    pub scheme: String,
    /// Seed of the pseudo-random weights (same seed, same bytes).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write only the first N decoder layers (default: all of the model's).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Most bytes of decoder layers per shard file (e.g. 2GiB, 500MB); a layer is never split.
    #[arg(long, default_value = "2GiB")]
    pub shard_size: String,
    /// A tokenizer.json to copy into the output (default: none; bench runs on token ids).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Worker threads (0 = one per core).
    #[arg(short = 't', long, default_value_t = 0)]
    pub threads: usize,
}

fn bar() -> Bar {
    let bar = if std::io::stderr().is_terminal() { ProgressBar::new(0) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} tensors {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    Bar(bar)
}

pub fn synth(a: &SynthArgs) -> CliResult {
    let cli = |e: quantize::QuantizeError| CliError(format!("synth: {e}"));
    let like: Like = a.like.parse().map_err(cli)?;
    let scheme: Scheme = a.scheme.parse().map_err(cli)?;
    let Some(shard_size) = parse_size(&a.shard_size) else {
        return err(format!("--shard-size {:?}: expected a size such as 2GiB or 500MB", a.shard_size));
    };
    let opts = SynthOptions {
        like,
        scheme,
        seed: a.seed,
        layers: a.layers,
        shard_size,
        tokenizer: a.tokenizer.clone(),
        threads: a.threads,
    };
    let bar = bar();
    let res = synth::synth(&a.output, &opts, &bar);
    bar.0.finish_and_clear();
    res.map_err(cli)?;
    eprintln!(
        "purehw: wrote {} (random weights like {}, {} layers, seed {}, scheme {}, compressed-tensors pack-quantized)",
        a.output.display(),
        a.like,
        a.layers.unwrap_or(like.layers()),
        a.seed,
        a.scheme
    );
    Ok(())
}

pub fn quantize(a: &QuantizeArgs) -> CliResult {
    // Cheap arguments first, before anything is loaded or pulled.
    let scheme: Scheme = a.scheme.parse().map_err(|e: quantize::QuantizeError| CliError(e.to_string()))?;
    let Some(shard_size) = parse_size(&a.shard_size) else {
        return err(format!("--shard-size {:?}: expected a size such as 2GiB or 500MB", a.shard_size));
    };
    if a.output.exists() {
        return Err(CliError(quantize::QuantizeError::OutExists(a.output.clone()).to_string()));
    }
    let r = models::resolve(&a.input)?;
    let hessians = if a.no_calibrate { None } else { calibrate(a, &r, scheme)? };
    let opts =
        Options { scheme, shard_size, tokenizer: a.tokenizer.clone().or(r.tokenizer), threads: a.threads, hessians };
    let bar = bar();
    let res = quantize::quantize(&r.path, &a.output, &opts, &bar);
    bar.0.finish_and_clear();
    res.map_err(|e| CliError(format!("quantize: {e}")))?;
    eprintln!("purehw: wrote {} (scheme {}, compressed-tensors pack-quantized)", a.output.display(), a.scheme);
    Ok(())
}

/// The input Hessians of the modules `scheme` stores in 4 bits, from a run of the model over
/// the calibration text on the `cpu` backend; `None` (with a note) when there are none or they
/// would not fit [`HESSIAN_BYTES`].
fn calibrate(
    a: &QuantizeArgs,
    r: &models::Resolved,
    scheme: Scheme,
) -> CliResult<Option<quantize::calibrate::Hessians>> {
    let src = ModelSource::open(&r.path)?;
    let c = &src.config;
    let roles: Vec<Role> = Role::ALL
        .iter()
        .copied()
        .filter(|&role| scheme.spec_for(role).is_some_and(|s| s.bits == 4) && role.per_layer())
        .collect();
    if roles.is_empty() {
        return Ok(None);
    }
    let mut bytes = 0usize;
    for &role in &roles {
        if let Some(w) = src.weight(role, Some(0))? {
            bytes = bytes.saturating_add(w.cols.saturating_mul(w.cols).saturating_mul(4).saturating_mul(c.layers));
        }
    }
    if bytes > HESSIAN_BYTES {
        eprintln!(
            "purehw: the INT4 modules' input statistics would take {:.1} GiB (more than {} GiB); rounding them without calibration",
            bytes as f64 / (1u64 << 30) as f64,
            HESSIAN_BYTES >> 30
        );
        return Ok(None);
    }
    let text = match &a.calibration {
        Some(p) => std::fs::read_to_string(p).context(|| format!("reading {}", p.display()))?,
        None => CALIBRATION.to_string(),
    };
    let tok = match tokenizer_for(a.tokenizer.as_deref(), r, &src) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("purehw: no tokenizer for the calibration text ({e}); rounding without calibration");
            return Ok(None);
        }
    };
    let mut ids = tok.encode(&text, c.add_bos)?;
    ids.truncate(c.max_ctx.max(1));
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= c.vocab) {
        return err(format!("the tokenizer gave id {bad}, outside the vocabulary ({})", c.vocab));
    }
    let started = std::time::Instant::now();
    let cpu = Cpu::new(a.threads).context(|| "starting the cpu backend for calibration".into())?;
    let h = quantize::calibrate::calibrate(cpu, &src, &ids, &roles)?;
    eprintln!("purehw: calibrated on {} tokens in {:.1} s", ids.len(), started.elapsed().as_secs_f64());
    Ok(Some(h))
}

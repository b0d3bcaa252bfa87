//! `purehw quantize` and `purehw synth`: the commands around [`purehw_core::quantize`] (which
//! holds the work): model name resolution, `--shard-size` parsing and a progress bar on a
//! terminal.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use purehw_core::quantize::synth::{self, Like, SynthOptions};
use purehw_core::quantize::{self, Options, Progress, Scheme};

use crate::error::{CliError, CliResult, err};
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
}

/// `SIZE`: bytes, or a number with `K`/`M`/`G`/`T` (powers of 1000) or `KiB`/`MiB`/`GiB`/`TiB`.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000_000,
        "g" | "gb" => 1000_000_000,
        "t" | "tb" => 1000_000_000_000,
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
    let opts = Options { scheme, shard_size, tokenizer: a.tokenizer.clone().or(r.tokenizer), threads: a.threads };
    let bar = bar();
    let res = quantize::quantize(&r.path, &a.output, &opts, &bar);
    bar.0.finish_and_clear();
    res.map_err(|e| CliError(format!("quantize: {e}")))?;
    eprintln!("purehw: wrote {} (scheme {}, compressed-tensors pack-quantized)", a.output.display(), a.scheme);
    Ok(())
}

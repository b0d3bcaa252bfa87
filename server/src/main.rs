//! `purehw`: pull, inspect, run, benchmark, quantize and serve models.
//!
//! Dependencies beyond the kept set (clap, serde, tokenizers, axum/tokio, minijinja, tracing):
//! `tokio-stream` and `futures-util` turn the engine's token channel into the SSE response stream
//! axum wants; `minijinja-contrib` (pycompat) supplies the Python string/dict methods that real
//! HF chat templates call (`.strip()`, `.startswith()`, `.items()`); `sha2` verifies pulled
//! models; `indicatif` draws `quantize`'s and `synth`'s progress bars; dev-only: `tower` (calling the router without a socket), `tempfile`. serde_json's
//! `preserve_order` (indexmap, already here through minijinja, and foldhash) keeps a request's key
//! order: a JSON schema's properties are written in the order given, and templates print objects
//! as Python's dicts would.

mod backends;
mod bench;
mod chat;
mod commands;
mod error;
mod models;
mod out;
mod quality;
mod quantize;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use clap::{Args, Parser, Subcommand};

use crate::backends::BackendArgs;
use crate::error::CliResult;

#[derive(Parser, Debug)]
#[command(name = "purehw", version, about = "LLM inference in Rust: pull, inspect and run models")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Download a known model into the cache and verify its sha256.
    Pull {
        /// gemma3-270m or smollm2-135m.
        #[arg(default_value = "gemma3-270m")]
        model: String,
    },
    /// Show a model's architecture, hyper-parameters and tensors.
    Inspect {
        /// A known model name, a .gguf file or a checkpoint folder.
        model: String,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a prompt.
    Run(RunArgs),
    /// Chat in the terminal through the model's chat template (default model: smollm2-135m).
    Chat(ChatArgs),
    /// Write the logits of a token sequence to a file of little-endian f32.
    Logits(LogitsArgs),
    /// Measure prompt processing and generation speed, as llama.cpp's llama-bench does.
    Bench(BenchArgs),
    /// Serve models over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Write a model as a compressed-tensors INT8/INT4 checkpoint (transformers and vLLM read it).
    Quantize(quantize::QuantizeArgs),
    /// Compare a quantized model with its reference: top-1 agreement, mean KL, perplexity.
    Quality(quality::QualityArgs),
    /// Write a random-weight checkpoint shaped like a real model, as quantize writes one.
    Synth(quantize::SynthArgs),
    /// List the compute backends and devices of this machine, or why one is unavailable.
    Devices {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Options shared by the commands that load a model.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// A known model name (gemma3-270m, smollm2-135m: pulled if absent), a .gguf file or a
    /// checkpoint folder.
    #[arg(short = 'm', long)]
    pub model: String,
    /// tokenizer.json to use (default: the one beside the model, else the GGUF's vocabulary).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// KV-cache length in tokens (0 = just what the command needs, up to the model's limit).
    #[arg(short = 'c', long, default_value_t = 0)]
    pub ctx_size: usize,
}

/// How `run` and `chat` draw tokens.
#[derive(Args, Debug)]
// So that `--presence-penalty -0.5` parses as a value, not a flag.
#[command(allow_negative_numbers = true)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// 1 = off.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// HF repetition penalty over the prompt and the generated tokens; 1 = off.
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// OpenAI presence penalty; 0 = off.
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// OpenAI frequency penalty; 0 = off.
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// RNG seed (default: from the clock, so sampled runs differ).
    #[arg(long)]
    pub seed: Option<u64>,
}

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt.
    #[arg(short = 'p', long)]
    pub prompt: String,
    /// Most tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 64)]
    pub n_predict: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object `{"prompt_ids", "ids", "text"}` instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct ChatArgs {
    /// A known model name (smollm2-135m, gemma3-270m: pulled if absent), a .gguf file or a
    /// checkpoint folder.
    #[arg(short = 'm', long, default_value = serve::DEFAULT_MODELS[0])]
    pub model: String,
    /// tokenizer.json to use (default: the one beside the model, else the GGUF's vocabulary).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// A Jinja chat template file overriding the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// The system prompt to start with (`/system TEXT` changes it).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// KV-cache length in tokens: how much of the conversation is kept (0 = the model's, up to
    /// 4096).
    #[arg(short = 'c', long, default_value_t = 0)]
    pub ctx_size: usize,
    /// Most tokens per reply (0 = until the model ends its turn or the context is full).
    #[arg(short = 'n', long = "n-predict", default_value_t = 0)]
    pub n_predict: usize,
    /// Compute each turn's whole prompt instead of continuing from the KV cache (the replies are
    /// the same; for comparison).
    #[arg(long)]
    pub no_prompt_cache: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Token ids, comma-separated (e.g. 2,818,5279).
    #[arg(long, conflicts_with = "prompt", required_unless_present = "prompt")]
    pub ids: Option<String>,
    /// Text to tokenize instead of --ids (BOS added as the model wants).
    #[arg(short = 'p', long)]
    pub prompt: Option<String>,
    /// Every position's logits, `[positions, vocab]`, instead of the last one's.
    #[arg(long)]
    pub all_positions: bool,
    /// Output file.
    #[arg(short = 'o', long)]
    pub output: PathBuf,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A known model name (gemma3-270m, smollm2-135m: pulled if absent), a .gguf file or a
    /// checkpoint folder.
    #[arg(short = 'm', long)]
    pub model: String,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Prompt tokens processed in one step (the `ppN` test; 0 = skip it).
    #[arg(short = 'p', long = "n-prompt", value_name = "N", default_value_t = 512)]
    pub n_prompt: usize,
    /// Tokens generated one at a time (the `tgN` test; 0 = skip it).
    #[arg(short = 'n', long = "n-gen", value_name = "N", default_value_t = 128)]
    pub n_gen: usize,
    /// Tokens already in the context before each test (llama-bench's `-d`): they are prefilled
    /// once, untimed, and the tests run after them (`pp512 @ d800`), so attention over a long
    /// history is part of what is measured.
    #[arg(short = 'd', long = "n-depth", value_name = "N", default_value_t = 0)]
    pub depth: usize,
    /// Timed repetitions of each test, after one untimed warm-up.
    #[arg(short = 'r', long, value_name = "N", default_value_t = 5)]
    pub repetitions: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Run the tests at each of these thread counts (cpu backend) and print the scaling table:
    /// tokens/s, speed-up over the first count and the share of the memory roofline reached.
    #[arg(long, value_name = "N,N,...", value_delimiter = ',')]
    pub threads_sweep: Vec<usize>,
    /// Sequences the tg test decodes together (continuous batching as `serve` runs it: one step,
    /// one token each, greedy rows reading back their argmax); its t/s is all of them together.
    #[arg(short = 'b', long, value_name = "N", default_value_t = 1)]
    pub batch: usize,
}

/// The last panic's message. `main` prints it only if the panic reaches `main`: one the engine
/// catches itself (the `tokenizers` crate panics on some malformed files) is a clear error instead.
static PANIC: Mutex<Option<String>> = Mutex::new(None);

fn main() -> ExitCode {
    // A bug must still end in one line, not a backtrace; exit code 101 tells it from a user error.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        *PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("internal error{at}: {msg}"));
    }));
    // Usage errors exit 1 like every other error (clap's own default is 2); --help is not one.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(1) } else { ExitCode::SUCCESS };
        }
    };
    match std::panic::catch_unwind(|| dispatch(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("purehw: {e}");
            ExitCode::from(1)
        }
        Err(_) => {
            let msg = PANIC.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
            eprintln!("purehw: {msg} (please report this)");
            ExitCode::from(101)
        }
    }
}

fn dispatch(cli: Cli) -> CliResult {
    match cli.cmd {
        Cmd::Pull { model } => commands::pull(&model),
        Cmd::Inspect { model, json } => commands::inspect(&model, json),
        Cmd::Run(a) => commands::run(&a),
        Cmd::Chat(a) => chat::chat(&a),
        Cmd::Logits(a) => commands::logits(&a),
        Cmd::Bench(a) => bench::bench(&a),
        Cmd::Serve(a) => serve::serve(&a),
        Cmd::Quantize(a) => quantize::quantize(&a),
        Cmd::Quality(a) => quality::quality(&a),
        Cmd::Synth(a) => quantize::synth(&a),
        Cmd::Devices { json } => backends::devices(json),
    }
}

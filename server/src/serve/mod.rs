//! `purehw serve`: the OpenAI-compatible HTTP server.
//!
//! `main` here only wires things: it starts one [`engine::Engine`] thread per model (each makes
//! its backend and loads its model in the background, so `/health` answers at once and says
//! `loading`), builds the axum app ([`api::app`]) and serves it until SIGINT/SIGTERM, then lets
//! running streams finish. After a lost device an engine makes its backend again and reloads
//! the model with the same options; if that fails it falls back to the `cpu` backend.

pub mod api;
pub mod engine;
pub mod json_guard;
pub mod json_schema;
pub mod metrics;
pub mod page;
pub mod template;
pub mod tools;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, ValueEnum};
use purehw_core::model::{Model, ModelOptions};
use purehw_core::source::ModelSource;
use purehw_core::tokenizer::Tokenizer;
use purehw_hal::{ActQuant, Backend, KvType};

use crate::backends::{self, BackendArgs, Maker, Registered, WithBackend};
use crate::error::{CliResult, Context, err};
use crate::models;
use engine::{Engine, EngineConfig, LoadedModel};
use template::ChatTemplate;

/// `purehw serve` options.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Model(s) to serve: a known name (pulled if absent), a .gguf file or a checkpoint folder.
    /// Repeat to serve several. Default: smollm2-135m (instruction-tuned: it answers chat) and
    /// gemma3-270m (pretrained) beside it.
    #[arg(short = 'm', long = "model")]
    pub models: Vec<String>,
    /// tokenizer.json to use (default: the GGUF's own vocabulary, else tokenizer.json beside the model).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// A Jinja chat template file overriding the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8006)]
    pub port: u16,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Require `Authorization: Bearer KEY` on /v1 routes (also read from PUREHW_API_KEY).
    #[arg(long, env = "PUREHW_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Sequences decoded together in one batch (KV-cache slots).
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// Context per sequence (0: the model's, capped at 4096).
    #[arg(short = 'c', long, default_value_t = 0)]
    pub ctx_size: usize,
    /// Compute each request's whole prompt instead of reusing the longest prefix a KV-cache slot
    /// already holds or copying it from another slot (the replies are the same; for comparison).
    #[arg(long)]
    pub no_prompt_cache: bool,
    /// Requests that may wait for a free slot before new ones get 429.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Largest request body in bytes (413 above).
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body: usize,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// One served model.
pub struct ServedModel {
    /// The id clients send as `model`.
    pub id: String,
    /// The weights file or folder (shown in `/health`).
    pub path: PathBuf,
    pub engine: Engine,
    /// Unix seconds when serving started (OpenAI's `created`).
    pub created: u64,
    /// The compiled chat template (or why there is none), made on first use.
    pub template: OnceLock<Result<ChatTemplate, String>>,
}

impl ServedModel {
    /// The backend computing now (`cpu`, `vulkan`, ...; the fallback's after a lost device).
    pub fn backend(&self) -> String {
        self.engine.stats.backend()
    }

    /// The compiled chat template, once the model is loaded.
    pub fn template(&self) -> Option<&Result<ChatTemplate, String>> {
        let loaded = self.engine.loaded.get()?;
        Some(self.template.get_or_init(|| {
            let Some(src) = &loaded.chat_template else {
                return Err(format!("model {} has no chat template (pass --chat-template FILE)", self.id));
            };
            compile_template(&self.id, src, &loaded.tokenizer).map_err(|e| e.to_string())
        }))
    }
}

/// Everything the handlers share.
pub struct AppState {
    pub models: Vec<ServedModel>,
    pub api_key: Option<String>,
    pub requests: metrics::Requests,
    pub started: Instant,
    pub max_body: usize,
}

impl AppState {
    /// The model a request names.
    pub fn model(&self, id: &str) -> Option<&ServedModel> {
        self.models.iter().find(|m| m.id == id)
    }
}

/// What `serve` serves without `-m`, in `/v1/models` order: a chat model first (a new user's
/// first question gets an answer), then the pretrained flagship.
pub const DEFAULT_MODELS: [&str; 2] = ["smollm2-135m", "gemma3-270m"];

pub fn serve(a: &ServeArgs) -> CliResult {
    init_tracing(a.log_format);
    if a.parallel == 0 {
        return err("--parallel must be at least 1");
    }
    let specs =
        if a.models.is_empty() { DEFAULT_MODELS.iter().map(|m| m.to_string()).collect() } else { a.models.clone() };
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let template_override = match &a.chat_template {
        Some(p) => Some(std::fs::read_to_string(p).context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    let mut resolved = Vec::new();
    for spec in &specs {
        let r = models::resolve(spec)?;
        let id = if models::known(spec).is_some() {
            spec.clone()
        } else {
            r.path.file_stem().map_or_else(|| spec.clone(), |s| s.to_string_lossy().into_owned())
        };
        if resolved.iter().any(|(i, _): &(String, models::Resolved)| *i == id) {
            return err(format!("model {id} is given twice"));
        }
        resolved.push((id, r));
    }
    let fallback = backends::cpu_fallback(&a.backend);
    backends::dispatch(&a.backend, ServeOn { a, models: resolved, template: template_override, created, fallback })
}

/// `serve`'s body on one backend: an engine per model, then the HTTP server.
struct ServeOn<'a> {
    a: &'a ServeArgs,
    /// (id, where it is) of each model.
    models: Vec<(String, models::Resolved)>,
    template: Option<String>,
    created: u64,
    /// Where a lost device that cannot be made again hands over.
    fallback: Maker<purehw_hal_cpu::Cpu>,
}

impl WithBackend for ServeOn<'_> {
    type Out = ();

    fn run<B: Registered>(self, make: Maker<B>) -> CliResult {
        let a = self.a;
        let mut served = Vec::new();
        for (id, r) in self.models {
            let cfg = EngineConfig {
                parallel: a.parallel,
                ctx: a.ctx_size,
                prefill_chunk: 256,
                queue: a.queue,
                prompt_cache: !a.no_prompt_cache,
            };
            let job = LoadJob {
                path: r.path.clone(),
                tokenizer: a.tokenizer.clone().or(r.tokenizer.clone()),
                explicit_tokenizer: a.tokenizer.is_some(),
                template: self.template.clone(),
                cfg: cfg.clone(),
                act: make.act,
                kv: make.kv,
                budget: make.budget,
                meta: Arc::new(OnceLock::new()),
            };
            let load = {
                let (job, make) = (job.clone(), make.clone());
                move || {
                    let b = make.make().map_err(|e| e.to_string())?;
                    let warm = b.warms_up();
                    job.load(b, warm)
                }
            };
            // A lost device that cannot be made again hands over to `cpu` (keeping the job's
            // activation mode, so the text stays the same where it can).
            let engine = if B::NAME == self.fallback.name() {
                Engine::start(cfg, load)
            } else {
                let make = self.fallback.clone();
                Engine::start_with_fallback(
                    cfg,
                    load,
                    Some(move || job.load(make.make().map_err(|e| e.to_string())?, false)),
                )
            };
            engine.stats.set_backend(B::NAME, &purehw_hal::Stats::default());
            served.push(ServedModel { id, path: r.path, engine, created: self.created, template: OnceLock::new() });
        }
        let state = Arc::new(AppState {
            models: served,
            api_key: a.api_key.clone().filter(|k| !k.is_empty()),
            requests: metrics::Requests::default(),
            started: Instant::now(),
            max_body: a.max_body,
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context(|| "starting the async runtime".into())?;
        rt.block_on(api::run(state, &a.host, a.port))
    }
}

/// What a model's tokenizer side is: read once, kept when the model is loaded again.
struct Meta {
    tokenizer: Arc<Tokenizer>,
    stop_ids: Vec<u32>,
    chat_template: Option<String>,
}

/// What an engine thread loads (again after a lost device: the tokenizer side is kept).
#[derive(Clone)]
struct LoadJob {
    path: PathBuf,
    tokenizer: Option<PathBuf>,
    explicit_tokenizer: bool,
    template: Option<String>,
    cfg: EngineConfig,
    act: ActQuant,
    /// `--kv-type`.
    kv: KvType,
    /// `--memory-budget` in bytes.
    budget: Option<usize>,
    meta: Arc<OnceLock<Meta>>,
}

impl LoadJob {
    /// Load the model on `backend`; `warm`: run [`Model::warm_up`] before serving.
    fn load<B: Backend>(&self, backend: B, warm: bool) -> Result<LoadedModel<B>, String> {
        let t = Instant::now();
        let src = ModelSource::open(&self.path).map_err(|e| e.to_string())?;
        let t_open = t.elapsed().as_secs_f64();
        let c = &src.config;
        let ctx = match self.cfg.ctx {
            0 => c.max_ctx.clamp(1, 4096),
            n if c.max_ctx > 0 && n > c.max_ctx => {
                return Err(format!("--ctx-size {n} exceeds the model's context of {} tokens", c.max_ctx));
            }
            n => n,
        };
        let meta = match self.meta.get() {
            Some(m) => m,
            None => {
                let m = self.meta(&src)?;
                self.meta.get_or_init(|| m)
            }
        };
        let t_tok = t.elapsed().as_secs_f64();
        let opts = ModelOptions {
            ctx,
            slots: self.cfg.parallel,
            max_batch: self.cfg.prefill_chunk + self.cfg.parallel,
            logit_rows: self.cfg.parallel,
            act: self.act,
            kv: self.kv,
            ..ModelOptions::default()
        };
        let mut model = Model::load_with_budget(backend, &src, opts, self.budget).map_err(|e| e.to_string())?;
        // A device records each step shape and compiles its kernels the first time it runs it:
        // now, not while the first batch of requests waits (H100, Gemma 3 270M, the pipeline
        // cache empty: 16 streams started together took 0.9–1.8 s without, 0.37 s with). Not
        // when layers stream: every step would read the whole model.
        let t_warm = Instant::now();
        if warm && model.streaming().is_none() {
            model.warm_up().map_err(|e| format!("warming up: {e}"))?;
        }
        let warm_s = t_warm.elapsed().as_secs_f64();
        tracing::info!(
            model = %self.path.display(),
            backend = model.backend().name(),
            ctx,
            slots = self.cfg.parallel,
            secs = t.elapsed().as_secs_f64(),
            open_s = t_open,
            tokenizer_s = t_tok - t_open,
            warm_up_s = warm_s,
            "model loaded"
        );
        Ok(LoadedModel {
            model,
            source: src,
            tokenizer: meta.tokenizer.clone(),
            stop_ids: meta.stop_ids.clone(),
            chat_template: meta.chat_template.clone(),
        })
    }

    /// The tokenizer, the ids that stop a chat, and the chat template.
    fn meta(&self, src: &ModelSource) -> Result<Meta, String> {
        // The GGUF's own vocabulary loads in a fraction of the time tokenizer.json takes (same ids).
        let tok = match (&self.tokenizer, src.gguf()) {
            (Some(p), _) if self.explicit_tokenizer => Tokenizer::from_file(p),
            (_, Some(g)) => Tokenizer::from_gguf(&self.path.display().to_string(), g),
            (Some(p), None) => Tokenizer::from_file(p),
            (None, None) => {
                return Err(format!("{}: no tokenizer (pass --tokenizer FILE)", self.path.display()));
            }
        }
        .map_err(|e| e.to_string())?;
        let stop_ids = stop_ids(&tok);
        let chat_template =
            self.template.clone().or_else(|| model_chat_template(src, &self.path, self.tokenizer.as_deref()));
        Ok(Meta { tokenizer: Arc::new(tok), stop_ids, chat_template })
    }
}

/// The ids that end a chat reply: the tokenizer's EOS ids, then the end-of-turn markers it has,
/// which stop a chat even where the model's EOS is something else (`<|eom_id|>`: Llama 3.1 ends a
/// tool call with it).
pub fn stop_ids(tok: &Tokenizer) -> Vec<u32> {
    let mut stop_ids = tok.eos_ids().to_vec();
    for marker in ["<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>"] {
        if let Some(id) = tok.id_of(marker).filter(|id| !stop_ids.contains(id)) {
            stop_ids.push(id);
        }
    }
    stop_ids
}

/// The model's own chat template: the GGUF's or checkpoint's, else `chat_template` of a
/// tokenizer_config.json beside the model or beside `tokenizer`.
pub fn model_chat_template(src: &ModelSource, path: &Path, tokenizer: Option<&Path>) -> Option<String> {
    src.chat_template().or_else(|| {
        let dirs = [path.parent(), tokenizer.and_then(Path::parent)];
        dirs.into_iter().flatten().find_map(|d| {
            let text = std::fs::read_to_string(d.join("tokenizer_config.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            v.get("chat_template")?.as_str().map(String::from)
        })
    })
}

/// Compile a chat template with `tok`'s BOS and first EOS as `bos_token` / `eos_token`.
pub fn compile_template(label: &str, source: &str, tok: &Tokenizer) -> Result<ChatTemplate, template::TemplateError> {
    let piece = |id: Option<u32>| id.and_then(|i| tok.token_to_piece(i)).unwrap_or_default();
    let bos = piece(tok.bos_id());
    let eos = piece(tok.eos_ids().first().copied());
    ChatTemplate::new(label, source, &bos, &eos)
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PUREHW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
}

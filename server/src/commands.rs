//! The subcommands.

use std::fmt::Write as _;
use std::path::Path;

use purehw_core::config::{LayerKind, ModelConfig};
use purehw_core::model::{Model, ModelOptions};
use purehw_core::sampling::{Sampler, SamplingParams};
use purehw_core::source::{ModelSource, SourceKind};
use purehw_core::tokenizer::Tokenizer;
use purehw_hal::Backend;
use serde_json::json;

use crate::backends::{self, Maker, Registered, WithBackend};
use crate::error::{CliError, CliResult, Context, err};
use crate::models::{self, Resolved};
use crate::out;
use crate::{LogitsArgs, ModelArgs, RunArgs, SamplingArgs};

pub fn pull(name: &str) -> CliResult {
    let Some(m) = models::known(name) else {
        return err(format!("unknown model {name:?}; known models: {}", models::known_names()));
    };
    models::pull(m, &models::cache_dir()?)
}

pub fn inspect(spec: &str, as_json: bool) -> CliResult {
    let r = models::resolve(spec)?;
    let src = ModelSource::open(&r.path)?;
    let c = &src.config;
    let tensors = src.tensors();
    let total: usize = tensors.iter().map(|t| t.bytes).sum();
    let kind = match src.kind {
        SourceKind::Gguf => "gguf",
        SourceKind::Safetensors => "safetensors",
    };
    if as_json {
        let v = json!({
            "path": r.path.display().to_string(),
            "kind": kind,
            "config": config_json(c),
            "tensor_bytes": total,
            "tensors": tensors.iter().map(|t| json!({
                "name": t.name, "dtype": t.dtype, "shape": t.shape, "bytes": t.bytes,
            })).collect::<Vec<_>>(),
        });
        return out::print_all(&format!("{v}\n"));
    }
    let mut s = String::new();
    let _ = writeln!(s, "{} ({kind})", r.path.display());
    if !c.name.is_empty() {
        let _ = writeln!(s, "name:           {}", c.name);
    }
    let _ = writeln!(s, "architecture:   {:?}", c.arch);
    let _ = writeln!(s, "vocab:          {}", c.vocab);
    let _ = writeln!(s, "hidden:         {}", c.hidden);
    let _ = writeln!(s, "layers:         {}", c.layers);
    let _ = writeln!(s, "heads:          {} (kv {}, head_dim {})", c.heads, c.kv_heads, c.head_dim);
    let _ = writeln!(s, "ffn:            {}", c.ffn);
    let _ = writeln!(s, "rms eps:        {:e}", c.eps);
    let _ = writeln!(s, "max context:    {}", c.max_ctx);
    let _ = writeln!(
        s,
        "rope:           full theta {} scale {}, local theta {} scale {} ({:?})",
        c.rope_full.theta, c.rope_full.scale, c.rope_local.theta, c.rope_local.scale, c.rope_mode
    );
    let sliding = c.layer_kinds.iter().filter(|k| **k == LayerKind::Sliding).count();
    if sliding > 0 {
        let full: Vec<String> = c
            .layer_kinds
            .iter()
            .enumerate()
            .filter(|(_, k)| **k == LayerKind::Full)
            .map(|(i, _)| i.to_string())
            .collect();
        let _ = writeln!(
            s,
            "attention:      {sliding} sliding (window {}), full at layers {}",
            c.sliding_window,
            full.join(",")
        );
    }
    let _ = writeln!(s, "attn scale:     {}", c.attn_scale);
    if c.attn_softcap > 0.0 || c.final_softcap > 0.0 {
        let _ = writeln!(s, "softcap:        attention {}, final {}", c.attn_softcap, c.final_softcap);
    }
    let _ = writeln!(s, "embed scale:    {}", c.embed_scale);
    let _ = writeln!(s, "tied embedding: {}", c.tied_embeddings);
    let _ = writeln!(s, "bos:            {} (add: {})", c.bos.map_or("none".into(), |b| b.to_string()), c.add_bos);
    let _ = writeln!(s, "eos:            {:?}", c.eos);
    let _ = writeln!(s, "tensors:        {} ({:.1} MiB)", tensors.len(), total as f64 / (1 << 20) as f64);
    let w = tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
    for t in &tensors {
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        let _ = writeln!(s, "  {:w$}  {:6}  {:>16}  {:>11}", t.name, t.dtype, shape.join("x"), t.bytes);
    }
    out::print_all(&s)
}

fn config_json(c: &ModelConfig) -> serde_json::Value {
    json!({
        "name": c.name,
        "arch": format!("{:?}", c.arch),
        "vocab": c.vocab,
        "hidden": c.hidden,
        "layers": c.layers,
        "heads": c.heads,
        "kv_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "ffn": c.ffn,
        "eps": c.eps,
        "max_ctx": c.max_ctx,
        "rope_full": { "theta": c.rope_full.theta, "scale": c.rope_full.scale },
        "rope_local": { "theta": c.rope_local.theta, "scale": c.rope_local.scale },
        "rope_mode": format!("{:?}", c.rope_mode),
        "layer_kinds": c.layer_kinds.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>(),
        "sliding_window": c.sliding_window,
        "attn_scale": c.attn_scale,
        "attn_softcap": c.attn_softcap,
        "final_softcap": c.final_softcap,
        "embed_scale": c.embed_scale,
        "norm_add_one": c.norm_add_one,
        "tied_embeddings": c.tied_embeddings,
        "bos": c.bos,
        "eos": c.eos,
        "add_bos": c.add_bos,
    })
}

/// `--tokenizer`, else the tokenizer.json beside the model, else the GGUF's own vocabulary.
pub fn tokenizer_for(given: Option<&Path>, r: &Resolved, src: &ModelSource) -> CliResult<Tokenizer> {
    if let Some(p) = given.or(r.tokenizer.as_deref()) {
        return Ok(Tokenizer::from_file(p)?);
    }
    match src.gguf() {
        Some(g) => Ok(Tokenizer::from_gguf(&src.label, g)?),
        None => err(format!("{}: no tokenizer.json beside the model; pass --tokenizer FILE", src.label)),
    }
}

/// `--ctx-size`, or just what `need` tokens take, clamped to the model's limit.
fn ctx_for(a: &ModelArgs, c: &ModelConfig, need: usize) -> CliResult<usize> {
    let ctx = if a.ctx_size > 0 { a.ctx_size } else { need };
    if ctx > c.max_ctx && c.max_ctx > 0 {
        if a.ctx_size > 0 {
            return err(format!("--ctx-size {} exceeds the model's context of {} tokens", a.ctx_size, c.max_ctx));
        }
        return Ok(c.max_ctx);
    }
    Ok(ctx.max(1))
}

fn seed_from_clock() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

impl SamplingArgs {
    /// The sampling parameters, checked.
    pub fn params(&self) -> CliResult<SamplingParams> {
        let params = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed.unwrap_or_else(seed_from_clock),
        };
        params.validate().context(|| "sampling".into())?;
        Ok(params)
    }
}

pub fn run(a: &RunArgs) -> CliResult {
    let params = a.sampling.params()?;

    let r = models::resolve(&a.model.model)?;
    let src = ModelSource::open(&r.path)?;
    let tok = tokenizer_for(a.model.tokenizer.as_deref(), &r, &src)?;
    let c = &src.config;
    let prompt_ids = tok.encode(&a.prompt, c.add_bos)?;
    if prompt_ids.is_empty() {
        return err("the prompt is empty (and the model adds no BOS token)");
    }
    let ctx = ctx_for(&a.model, c, prompt_ids.len().saturating_add(a.n_predict))?;
    if prompt_ids.len() > ctx {
        return err(format!("the prompt is {} tokens, more than the context of {ctx}", prompt_ids.len()));
    }
    backends::dispatch(&a.model.backend, RunOn { a, src: &src, tok: &tok, prompt_ids: &prompt_ids, ctx, params })
}

/// `run`'s body on one backend: generate and print the answer.
struct RunOn<'a> {
    a: &'a RunArgs,
    src: &'a ModelSource,
    tok: &'a Tokenizer,
    prompt_ids: &'a [u32],
    ctx: usize,
    params: SamplingParams,
}

impl WithBackend for RunOn<'_> {
    type Out = ();

    fn run<B: Registered>(self, make: Maker<B>) -> CliResult {
        let RunOn { a, src, tok, prompt_ids, ctx, params } = self;
        let opts = ModelOptions { ctx, slots: 1, act: make.act, ..ModelOptions::default() };
        let model = make.load(src, opts)?;
        generate_and_print(model, a, tok, prompt_ids, params)
    }
}

fn generate_and_print<B: Backend>(
    mut model: Model<B>,
    a: &RunArgs,
    tok: &Tokenizer,
    prompt_ids: &[u32],
    params: SamplingParams,
) -> CliResult {
    let mut sampler = Sampler::new(params, model.config().vocab);

    let mut decoder = tok.decode_stream();
    let mut stream_err: Option<CliError> = None;
    let mut closed = false;
    let eos = model.config().eos.clone();
    let ids = purehw_core::model::generate(&mut model, prompt_ids, a.n_predict, &mut sampler, !a.ignore_eos, |id| {
        // The end-of-sequence token ends the stream; its text is not part of the answer.
        if a.json || (!a.ignore_eos && eos.contains(&id)) {
            return true;
        }
        let piece = match decoder.push(id) {
            Ok(p) => p,
            Err(e) => {
                stream_err = Some(e.into());
                return false;
            }
        };
        match out::print(&piece) {
            Ok(Ok(())) => true,
            Ok(Err(out::Closed)) => {
                closed = true;
                false
            }
            Err(e) => {
                stream_err = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = stream_err {
        return Err(e);
    }
    if closed {
        return Ok(());
    }
    if a.json {
        let text = tok.decode(&ids)?;
        // A struct keeps the documented key order: prompt_ids, ids, text.
        #[derive(serde::Serialize)]
        struct RunJson<'a> {
            prompt_ids: &'a [u32],
            ids: &'a [u32],
            text: &'a str,
        }
        let v = serde_json::to_string(&RunJson { prompt_ids, ids: &ids, text: &text })
            .context(|| "encoding the --json output".into())?;
        return out::print_all(&format!("{v}\n"));
    }
    let rest = decoder.finish()?;
    out::print_all(&format!("{rest}\n"))
}

fn parse_ids(s: &str) -> CliResult<Vec<u32>> {
    let ids: Vec<u32> = s
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<u32>().context(|| format!("--ids: {t:?} is not a token id")))
        .collect::<CliResult<_>>()?;
    if ids.is_empty() {
        return err("--ids: no token ids given");
    }
    Ok(ids)
}

pub fn logits(a: &LogitsArgs) -> CliResult {
    // Check the cheap argument before loading anything.
    let given = a.ids.as_deref().map(parse_ids).transpose()?;
    let r = models::resolve(&a.model.model)?;
    let src = ModelSource::open(&r.path)?;
    let from = if given.is_some() { "--ids" } else { "the tokenizer" };
    let ids = match given {
        Some(ids) => ids,
        None => {
            let tok = tokenizer_for(a.model.tokenizer.as_deref(), &r, &src)?;
            tok.encode(a.prompt.as_deref().unwrap_or_default(), src.config.add_bos)?
        }
    };
    if ids.is_empty() {
        return err("no tokens to run");
    }
    let vocab = src.config.vocab;
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return err(format!("{from}: token id {bad} out of range (vocab {vocab})"));
    }
    let ctx = ctx_for(&a.model, &src.config, ids.len())?;
    if ids.len() > ctx {
        return err(format!("{} tokens do not fit the context of {ctx}", ids.len()));
    }
    let defaults = ModelOptions::default();
    let rows = if a.all_positions { ids.len().min(defaults.max_batch) } else { 1 };
    let opts = ModelOptions { ctx, slots: 1, logit_rows: rows, ..defaults };
    let values = backends::dispatch(&a.model.backend, LogitsOn { src: &src, opts, ids: &ids, all: a.all_positions })?;
    let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(&a.output, bytes).context(|| format!("writing {}", a.output.display()))?;
    let rows = values.len() / vocab.max(1);
    eprintln!("purehw: wrote {rows}x{vocab} f32 (little-endian) to {}", a.output.display());
    Ok(())
}

/// `logits`' body on one backend: the last position's logits, or with `all` every position's.
struct LogitsOn<'a> {
    src: &'a ModelSource,
    /// Everything but `act`, which is the backend's.
    opts: ModelOptions,
    ids: &'a [u32],
    all: bool,
}

impl WithBackend for LogitsOn<'_> {
    type Out = Vec<f32>;

    fn run<B: Registered>(self, make: Maker<B>) -> CliResult<Vec<f32>> {
        let LogitsOn { src, opts, ids, all } = self;
        let mut model = make.load(src, ModelOptions { act: make.act, ..opts })?;
        if all {
            let mut v = Vec::with_capacity(ids.len() * src.config.vocab);
            model.forward_all(0, 0, ids, &mut v)?;
            Ok(v)
        } else {
            Ok(model.forward(0, 0, ids)?.to_vec())
        }
    }
}

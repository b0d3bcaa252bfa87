//! `purehw quantize`: a float checkpoint (HF safetensors, or a GGUF dequantized through the
//! kernels) written as a compressed-tensors `pack-quantized` checkpoint, the layout transformers
//! and vLLM read (`shared/fixtures/compressed-tensors/FORMAT.md`).
//!
//! It lives here, in the engine's library (under `std`), rather than in the binary: it reads
//! models through [`ModelSource`] (the GGUF name mapping, shapes and the dequantizing kernels
//! are the loader's), and its output is checked by loading it back through the same crate, so
//! the writer and the reader of the format sit side by side. The binary adds the progress bar.
//!
//! What is written into `OUT` (through a temporary folder beside it, renamed at the end, so a
//! failure leaves nothing behind):
//! * `model-NNNNN-of-MMMMM.safetensors`: whole decoder layers, a layer never split, as many per
//!   file as fit `shard_size`; `model-shared.safetensors`: the tensors every token uses
//!   (embeddings, final norm, an untied LM head); `model.safetensors.index.json`.
//! * `config.json`: the input's own (HF, text-only) with `quantization_config` added, as the
//!   library does; for a GGUF or a multimodal (`text_config`) input a text-only
//!   `Gemma3ForCausalLM` / `LlamaForCausalLM` config written from the model's hyper-parameters.
//! * tokenizer files and `generation_config.json`, copied from beside the input (or written from
//!   the GGUF's metadata).
//!
//! Each group is quantized by [`rtn::quantize_group`]: compressed-tensors' min-max
//! round-to-nearest, then a search over nearby scales and least-squares refits keeping the
//! smallest squared error, each weight's weighted by `rms + |w|` as llama.cpp's K-quants do (`PUREHW_QUANTIZE_RTN=1` turns the search off, to measure what it buys).
//!
//! With input Hessians from a calibration run ([`calibrate`]; `purehw quantize` runs the model
//! over a built-in text on the `cpu` backend), a module is quantized by [`gptq`] instead: the
//! same groups and fields, each column's rounding error carried into the columns after it in
//! the order of their input energy, so the module's outputs move least.
//!
//! A GGUF's tensors are turned back into the HF checkpoint they were converted from: HF names,
//! Gemma's norm weights without the `+1` llama.cpp folds in, Llama's Q/K rows un-permuted (the
//! converter interleaves each head's two halves for ggml's RoPE).

pub mod calibrate;
pub mod gptq;
mod hf_config;
pub mod rtn;
pub mod synth;

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use std::borrow::Cow;
use std::fs;
use std::path::{Path, PathBuf};

use purehw_hal::{Format, HostWeight, RopeMode, ScaleType};
use serde_json::{Map, Value, json};

use crate::config::{Arch, ModelConfig};
use crate::source::{ModelSource, Role, SourceKind, hf_tensor_name};
use rtn::GroupSpec;

/// Every `--scheme`.
pub const SCHEMES: [&str; 10] =
    ["seed", "seed-asym", "w8", "w8-asym", "w4g32", "w4g32-asym", "w4g64", "w4g64-asym", "w4g128", "w4g128-asym"];

/// A quantization scheme: which modules become which integers.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Scheme {
    pub kind: SchemeKind,
    /// `-asym`: zero points for the schemes' symmetric parts.
    pub asym: bool,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SchemeKind {
    /// Attention projections INT8 per channel, MLP projections INT4 group 32, embeddings (and an
    /// untied LM head) INT8 asymmetric per row; norms kept.
    Seed,
    /// Every decoder Linear INT8 per channel.
    W8,
    /// Every decoder Linear INT4 in groups of this many columns.
    W4(usize),
}

impl core::str::FromStr for Scheme {
    type Err = QuantizeError;

    fn from_str(s: &str) -> Result<Scheme, QuantizeError> {
        let (base, asym) = match s.strip_suffix("-asym") {
            Some(b) => (b, true),
            None => (s, false),
        };
        let kind = match base {
            "seed" => SchemeKind::Seed,
            "w8" => SchemeKind::W8,
            "w4g32" => SchemeKind::W4(32),
            "w4g64" => SchemeKind::W4(64),
            "w4g128" => SchemeKind::W4(128),
            _ => return Err(QuantizeError::UnknownScheme(s.to_string())),
        };
        Ok(Scheme { kind, asym })
    }
}

/// How one module's weight is stored.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct IntSpec {
    pub bits: u8,
    /// `None`: one scale per row (output channel).
    pub group: Option<usize>,
    pub symmetric: bool,
}

impl Scheme {
    /// The scheme's choice for `role` (`None`: kept in its float dtype).
    pub fn spec_for(self, role: Role) -> Option<IntSpec> {
        let sym = !self.asym;
        let attn = matches!(role, Role::AttnQ | Role::AttnK | Role::AttnV | Role::AttnOut);
        let mlp = matches!(role, Role::FfnGate | Role::FfnUp | Role::FfnDown);
        match self.kind {
            SchemeKind::Seed if attn => Some(IntSpec { bits: 8, group: None, symmetric: sym }),
            SchemeKind::Seed if mlp => Some(IntSpec { bits: 4, group: Some(32), symmetric: sym }),
            SchemeKind::Seed if matches!(role, Role::TokenEmbd | Role::Output) => {
                Some(IntSpec { bits: 8, group: None, symmetric: false })
            }
            SchemeKind::W8 if attn || mlp => Some(IntSpec { bits: 8, group: None, symmetric: sym }),
            SchemeKind::W4(g) if attn || mlp => Some(IntSpec { bits: 4, group: Some(g), symmetric: sym }),
            _ => None,
        }
    }
}

/// Why quantizing failed. Every message names the file, tensor or argument.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuantizeError {
    #[error("unknown scheme `{0}` (schemes: {list})", list = SCHEMES.join(", "))]
    UnknownScheme(String),
    #[error("{}: already exists; remove it or name another output folder", .0.display())]
    OutExists(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Source(#[from] crate::Error),
    /// The input is something the quantizer does not turn into a checkpoint.
    #[error("{model}: {msg}")]
    Unsupported { model: String, msg: String },
    #[error("tensor `{tensor}`: {msg}")]
    Tensor { tensor: String, msg: String },
    #[error("{}: writing safetensors: {msg}", path.display())]
    Write { path: PathBuf, msg: String },
    #[error("--shard-size must be positive")]
    ShardSize,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> QuantizeError + '_ {
    move |source| QuantizeError::Io { path: path.to_path_buf(), source }
}

/// What the caller is told while the work goes on (the binary draws a progress bar).
pub trait Progress {
    /// The work is `tensors` tensors.
    fn start(&self, _tensors: u64) {}
    /// One more tensor is written.
    fn tensor_done(&self, _name: &str) {}
    /// Something the user should know (a fallback taken, a file not written).
    fn note(&self, _msg: &str) {}
}

/// No reporting.
pub struct Silent;
impl Progress for Silent {}

/// `purehw quantize`'s options.
#[derive(Clone, Debug)]
pub struct Options {
    pub scheme: Scheme,
    /// Most bytes of decoder layers per shard (a larger layer gets a shard of its own).
    pub shard_size: u64,
    /// The `tokenizer.json` to copy (with its siblings); default: the one beside the input.
    pub tokenizer: Option<PathBuf>,
    /// Worker threads (0: one per core).
    pub threads: usize,
    /// Input Hessians from a calibration run ([`calibrate`]): the modules they name are
    /// quantized by [`gptq`], the others by rounding alone.
    pub hessians: Option<calibrate::Hessians>,
}

/// The float dtype a tensor is written in.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum FloatTy {
    F32,
    F16,
    BF16,
}

impl FloatTy {
    fn bytes(self) -> usize {
        match self {
            FloatTy::F32 => 4,
            _ => 2,
        }
    }
    fn st(self) -> safetensors::Dtype {
        match self {
            FloatTy::F32 => safetensors::Dtype::F32,
            FloatTy::F16 => safetensors::Dtype::F16,
            FloatTy::BF16 => safetensors::Dtype::BF16,
        }
    }
    fn scale(self) -> ScaleType {
        match self {
            FloatTy::F32 => ScaleType::F32,
            FloatTy::F16 => ScaleType::F16,
            FloatTy::BF16 => ScaleType::BF16,
        }
    }
    /// The source's own dtype when it is a float one; f32 for GGUF blocks (dequantized exactly).
    fn of(f: Format) -> FloatTy {
        match f {
            Format::F16 => FloatTy::F16,
            Format::BF16 => FloatTy::BF16,
            _ => FloatTy::F32,
        }
    }
    fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            FloatTy::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            FloatTy::F16 => v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
            FloatTy::BF16 => v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        }
    }
}

/// One tensor of the output, planned.
struct Item {
    role: Role,
    /// `None` for model-wide tensors.
    layer: Option<usize>,
    /// HF name, `….weight`.
    name: String,
    rows: usize,
    cols: usize,
    /// The input's tensor (`quantize`); `None` for generated weights (`synth`).
    w: Option<HostWeight>,
    dtype: FloatTy,
    /// `None`: written as a float tensor.
    int: Option<IntSpec>,
}

impl Item {
    fn module(&self) -> &str {
        self.name.strip_suffix(".weight").unwrap_or(&self.name)
    }

    /// Bytes this tensor takes in the output.
    fn out_bytes(&self) -> u64 {
        let (rows, cols) = (self.rows as u64, self.cols as u64);
        match self.int {
            None => rows * cols * self.dtype.bytes() as u64,
            Some(s) => {
                let groups = s.group.map_or(1, |g| cols / g as u64);
                let k = 32 / s.bits as u64;
                let zeros = if s.symmetric { 0 } else { rows.div_ceil(k) * groups * 4 };
                rows * cols / k * 4 + rows * groups * self.dtype.bytes() as u64 + 16 + zeros
            }
        }
    }
}

/// An output tensor's bytes, for the safetensors writer.
struct OutTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &OutTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The largest group of at most `want` columns that divides `cols` and is a whole number of
/// `k`-code words; `None` when there is none (then the module is quantized per channel).
fn fitting_group(want: usize, cols: usize, k: usize) -> Option<usize> {
    (1..=want / k).rev().map(|n| n * k).find(|g| cols.is_multiple_of(*g))
}

/// Quantize the model at `input` (already resolved: a GGUF file or a checkpoint folder) into
/// the new folder `out`.
pub fn quantize(input: &Path, out: &Path, opts: &Options, progress: &dyn Progress) -> Result<(), QuantizeError> {
    if opts.shard_size == 0 {
        return Err(QuantizeError::ShardSize);
    }
    if fs::symlink_metadata(out).is_ok() {
        return Err(QuantizeError::OutExists(out.to_path_buf()));
    }
    let src = ModelSource::open(input)?;
    let label = src.label.clone();
    let unsupported = |msg: String| QuantizeError::Unsupported { model: label.clone(), msg };
    let c = src.config.clone();
    let hf_json = hf_input_config(&src)?;
    if hf_json.as_ref().is_some_and(|m| m.contains_key("quantization_config")) {
        return Err(unsupported("the checkpoint is already quantized (config.json has a quantization_config)".into()));
    }
    let items = plan(&src, &c, opts.scheme, progress)?;
    // What the text model does not use (a vision tower, an old `rotary_emb.inv_freq`) is not
    // carried over: the output is a text-only checkpoint.
    let all = src.tensors();
    if all.len() > items.len() {
        let used: Vec<String> = Role::ALL
            .iter()
            .flat_map(|&r| (0..if r.per_layer() { c.layers } else { 1 }).map(move |l| (r, l)))
            .map(|(r, l)| src.tensor_name(r, l))
            .collect();
        let left: Vec<&str> = all.iter().map(|t| t.name.as_str()).filter(|n| !used.iter().any(|u| u == n)).collect();
        if let Some(first) = left.first() {
            progress.note(&format!(
                "{} tensors of the input are not part of the text model and are not written (`{first}`, …)",
                left.len()
            ));
        }
    }

    // config.json: the input's own, or one written from the hyper-parameters.
    let mut config = match hf_json {
        Some(m) => m,
        None => hf_config::from_model(&c, src.gguf()).map_err(unsupported)?,
    };
    config.insert("quantization_config".into(), quantization_config(&items));
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let search = std::env::var_os("PUREHW_QUANTIZE_RTN").is_none();
    let hess = |it: &Item| opts.hessians.as_ref().and_then(|h| h.get(&(it.role, it.layer?)));
    let produce = |it: &Item| convert(&src, &c, it, threads, search, hess(it));
    let side = |dir: &Path| side_files(&src, &c, opts, dir, progress);
    write_checkpoint(out, &items, c.layers, opts.shard_size, &config, progress, &produce, &side)
}

/// An item's output tensors, made (`quantize`: from the input; `synth`: generated) and encoded.
type Produce<'a> = dyn Fn(&Item) -> Result<Vec<(String, OutTensor)>, QuantizeError> + 'a;

/// Write `items` into the new folder `out` as compressed-tensors does: the shared tensors into
/// `model-shared.safetensors`, whole layers into `model-NNNNN-of-MMMMM.safetensors` (at most
/// `shard_size` bytes of layers each, one shard in memory at a time), the index, `config`, and
/// what `side` adds; all through a temporary folder renamed at the end.
#[allow(clippy::too_many_arguments)]
fn write_checkpoint(
    out: &Path,
    items: &[Item],
    layers: usize,
    shard_size: u64,
    config: &Map<String, Value>,
    progress: &dyn Progress,
    produce: &Produce<'_>,
    side: &dyn Fn(&Path) -> Result<(), QuantizeError>,
) -> Result<(), QuantizeError> {
    let unsupported = |msg: String| QuantizeError::Unsupported { model: out.display().to_string(), msg };
    // Shards: each layer whole; the shared tensors on their own.
    let layer_bytes: Vec<u64> =
        (0..layers).map(|l| items.iter().filter(|i| i.layer == Some(l)).map(Item::out_bytes).sum()).collect();
    let mut shard_of_layer = vec![0usize; layers];
    let (mut shard, mut filled) = (0usize, 0u64);
    for (l, &b) in layer_bytes.iter().enumerate() {
        if filled > 0 && filled + b > shard_size {
            shard += 1;
            filled = 0;
        }
        shard_of_layer[l] = shard;
        filled += b;
    }
    let shards = shard + 1;
    let shard_name = |s: usize| format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
    const SHARED: &str = "model-shared.safetensors";

    let parent = match out.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => return Err(unsupported(format!("{}: not a folder path", out.display()))),
    };
    if !parent.is_dir() {
        return Err(QuantizeError::Io {
            path: parent.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "the output's parent folder does not exist"),
        });
    }
    let out_name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = TempDir::create(parent.join(format!(".{out_name}.partial-{}", std::process::id())))?;

    progress.start(items.len() as u64);
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    let mut flush = |file: &str, tensors: &mut Vec<(String, OutTensor)>| -> Result<(), QuantizeError> {
        let path = tmp.0.join(file);
        let meta = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
        safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), meta, &path)
            .map_err(|e| QuantizeError::Write { path: path.clone(), msg: e.to_string() })?;
        for (n, t) in tensors.drain(..) {
            total += t.data.len() as u64;
            weight_map.insert(n, file.to_string());
        }
        Ok(())
    };
    // The shared tensors, then the layers in order, one shard in memory at a time.
    let mut pending = Vec::new();
    for it in items.iter().filter(|i| i.layer.is_none()) {
        pending.extend(produce(it)?);
        progress.tensor_done(&it.name);
    }
    flush(SHARED, &mut pending)?;
    for l in 0..layers {
        for it in items.iter().filter(|i| i.layer == Some(l)) {
            pending.extend(produce(it)?);
            progress.tensor_done(&it.name);
        }
        if l + 1 == layers || shard_of_layer[l + 1] != shard_of_layer[l] {
            flush(&shard_name(shard_of_layer[l]), &mut pending)?;
        }
    }
    let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    write_json(&tmp.0.join("model.safetensors.index.json"), &index)?;

    write_json(&tmp.0.join("config.json"), &Value::Object(config.clone()))?;
    side(&tmp.0)?;

    // Files readable by all, as any checkpoint (copies keep a read-only source's mode; the
    // safetensors writer makes owner-only files).
    #[cfg(unix)]
    for e in fs::read_dir(&tmp.0).map_err(io(&tmp.0))? {
        use std::os::unix::fs::PermissionsExt;
        let p = e.map_err(io(&tmp.0))?.path();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).map_err(io(&p))?;
    }
    fs::rename(&tmp.0, out).map_err(io(out))?;
    tmp.keep();
    Ok(())
}

/// The input's `config.json` when it is a text-only HF checkpoint (copied with the
/// quantization added); `None` for a GGUF or a multimodal config (written anew).
fn hf_input_config(src: &ModelSource) -> Result<Option<Map<String, Value>>, QuantizeError> {
    let Some(dir) = src.dir().filter(|_| src.kind == SourceKind::Safetensors) else { return Ok(None) };
    let path = dir.join("config.json");
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| crate::Error::format(path.display().to_string(), format!("invalid JSON: {e}")))?;
    match v {
        Value::Object(m) if !m.contains_key("text_config") => Ok(Some(m)),
        Value::Object(m) if m.contains_key("quantization_config") => Ok(Some(m)),
        _ => Ok(None),
    }
}

/// Every tensor of the output, with its storage; a group that does not divide a module's
/// columns falls back to the largest one that does (told through `progress`).
fn plan(
    src: &ModelSource,
    c: &ModelConfig,
    scheme: Scheme,
    progress: &dyn Progress,
) -> Result<Vec<Item>, QuantizeError> {
    let mut items = Vec::new();
    let mut fallbacks: BTreeMap<(String, usize), Option<usize>> = BTreeMap::new();
    for role in Role::ALL {
        let layers: Vec<Option<usize>> = if role.per_layer() { (0..c.layers).map(Some).collect() } else { vec![None] };
        for layer in layers {
            let Some(w) = src.weight(role, layer)? else { continue };
            let name = hf_tensor_name(role, layer.unwrap_or(0), c.arch);
            if matches!(w.format, Format::Int(_)) {
                return Err(QuantizeError::Unsupported {
                    model: src.label.clone(),
                    msg: format!("`{name}` is already quantized"),
                });
            }
            let int = spec_fitting(scheme, role, &name, w.cols, &mut fallbacks)?;
            let dtype = FloatTy::of(w.format);
            items.push(Item { role, layer, name, rows: w.rows, cols: w.cols, w: Some(w), dtype, int });
        }
    }
    note_fallbacks(&fallbacks, progress);
    Ok(items)
}

/// `scheme`'s storage for `role`'s tensor `name` of `cols` columns; a group that does not divide
/// the columns falls back to the largest one that does (recorded in `fallbacks`).
fn spec_fitting(
    scheme: Scheme,
    role: Role,
    name: &str,
    cols: usize,
    fallbacks: &mut BTreeMap<(String, usize), Option<usize>>,
) -> Result<Option<IntSpec>, QuantizeError> {
    let mut int = scheme.spec_for(role);
    if let Some(s) = &mut int {
        let k = 32 / s.bits as usize;
        if !cols.is_multiple_of(k) {
            return Err(QuantizeError::Tensor {
                tensor: name.to_string(),
                msg: format!("{cols} columns are not a whole number of {k}-code int32 words"),
            });
        }
        if let Some(g) = s.group
            && !cols.is_multiple_of(g)
        {
            s.group = fitting_group(g, cols, k);
            let suffix = name.rsplit('.').nth(1).unwrap_or_default().to_string();
            fallbacks.insert((suffix, cols), s.group);
        }
    }
    Ok(int)
}

fn note_fallbacks(fallbacks: &BTreeMap<(String, usize), Option<usize>>, progress: &dyn Progress) {
    for ((module, cols), g) in fallbacks {
        let to = g.map_or("per channel".to_string(), |g| format!("group {g}"));
        progress.note(&format!("{module}: the group size does not divide its {cols} columns; quantized with {to}"));
    }
}

/// One input tensor's output tensors: its values as the HF checkpoint holds them, encoded.
fn convert(
    src: &ModelSource,
    c: &ModelConfig,
    it: &Item,
    threads: usize,
    search: bool,
    hess: Option<&gptq::Hessian>,
) -> Result<Vec<(String, OutTensor)>, QuantizeError> {
    let Some(w) = &it.w else {
        return Err(QuantizeError::Tensor { tensor: it.name.clone(), msg: "internal: no input tensor".into() });
    };
    let cols = it.cols;
    let mut x = dequantize(w, threads);
    // GGUF → HF: Gemma's norm weights lose the folded-in +1; Llama's Q/K rows are un-permuted.
    let is_norm = !matches!(it.role.hf_class(c.arch), "Linear" | "Embedding");
    if is_norm && c.arch == Arch::Gemma3 && !c.norm_add_one {
        x.iter_mut().for_each(|v| *v -= 1.0);
    }
    if c.rope_mode == RopeMode::Interleaved && src.kind == SourceKind::Gguf {
        match it.role {
            Role::AttnQ => x = unpermute_rows(&x, c.heads, c.head_dim, cols),
            Role::AttnK => x = unpermute_rows(&x, c.kv_heads, c.head_dim, cols),
            _ => {}
        }
    }
    encode(it, c.arch, threads, search, hess, &|r, row| row.copy_from_slice(&x[r * cols..(r + 1) * cols]))
}

/// One item's output tensors: the float tensor, or `weight_packed`, `weight_scale`,
/// `weight_shape` and (asymmetric) `weight_zero_point`. `fill(r, row)` writes row `r`'s values;
/// rows are made and encoded a few at a time on `threads` threads, so only the output is held.
fn encode(
    it: &Item,
    arch: Arch,
    threads: usize,
    search: bool,
    hess: Option<&gptq::Hessian>,
    fill: &(dyn Fn(usize, &mut [f32]) + Sync),
) -> Result<Vec<(String, OutTensor)>, QuantizeError> {
    let (rows, cols) = (it.rows, it.cols);
    let per = rows.div_ceil(threads.max(1)).max(1);
    let is_norm = !matches!(it.role.hf_class(arch), "Linear" | "Embedding");
    let Some(spec) = it.int else {
        let shape = if rows == 1 && is_norm { vec![cols] } else { vec![rows, cols] };
        let rb = cols * it.dtype.bytes();
        let mut data = vec![0u8; rows * rb];
        std::thread::scope(|s| {
            for (i, chunk) in data.chunks_mut(per * rb).enumerate() {
                s.spawn(move || {
                    let mut x = vec![0f32; cols];
                    for (r, out) in chunk.chunks_mut(rb).enumerate() {
                        fill(i * per + r, &mut x);
                        out.copy_from_slice(&it.dtype.encode(&x));
                    }
                });
            }
        });
        return Ok(vec![(it.name.clone(), OutTensor { dtype: it.dtype.st(), shape, data })]);
    };
    let gs = GroupSpec { bits: spec.bits, symmetric: spec.symmetric, scale: it.dtype.scale(), search };
    let group = spec.group.unwrap_or(cols);
    let groups = cols / group;
    let k = 32 / spec.bits as usize;
    let mut packed = vec![0u32; rows * cols / k];
    let mut scales = vec![0f32; rows * groups];
    let mut zeros = vec![0u8; rows * groups];
    // With a Hessian of the module's width: GPTQ in activation order with static groups, its
    // factor dampened more when 1% of the mean diagonal leaves it singular.
    let gptq = hess.filter(|h| h.cols == cols && h.tokens > 0).and_then(|h| {
        let order = h.act_order();
        let u = [0.01, 0.1, 1.0].iter().find_map(|&d| h.factor(d, &order))?;
        Some((u, order, h.diag()))
    });
    // Column weights of the scale search beyond the weights' own magnitudes: the input energy
    // when calibrated (Gemma 3 270M `seed` with GPTQ, measured before activation order: mean KL
    // 0.083, against 0.097 with `rms + |w|` alone, 0.096 unweighted). Without calibration none:
    // the preceding norm's gains as a data-free stand-in was measured worse (`seed` mean KL 0.235
    // against 0.172 unweighted; `rms + |w|` alone gives 0.165).
    let col_w: Option<&[f32]> = gptq.as_ref().map(|g| &g.2[..]);
    let gptq = &gptq;
    // The first element that is not finite: (row, column, value).
    let bad: Option<(usize, usize, f32)> = std::thread::scope(|s| {
        let parts =
            packed.chunks_mut(per * cols / k).zip(scales.chunks_mut(per * groups)).zip(zeros.chunks_mut(per * groups));
        let handles: Vec<_> = parts
            .enumerate()
            .map(|(i, ((p, sc), z))| {
                s.spawn(move || {
                    let mut xr = vec![0f32; cols];
                    let mut u = vec![0u8; cols];
                    let mut mag = Vec::with_capacity(cols);
                    for r in 0..sc.len() / groups {
                        fill(i * per + r, &mut xr);
                        if let Some(j) = xr.iter().position(|v| !v.is_finite()) {
                            return Some((i * per + r, j, xr[j]));
                        }
                        // llama.cpp's weighting without an importance matrix (make_qkx2_quants):
                        // rms + |w| per group, so large weights are kept closer; times the column
                        // weights. Weights only rank the search's candidates; plain RTN has one.
                        mag.clear();
                        if search {
                            for xg in xr.chunks(group) {
                                let rms = (xg.iter().map(|v| v * v).sum::<f32>() / xg.len() as f32).sqrt();
                                mag.extend(xg.iter().map(|v| rms + v.abs()));
                            }
                            if let Some(w) = col_w {
                                mag.iter_mut().zip(w).for_each(|(m, w)| *m *= w);
                            }
                        }
                        let imp = search.then_some(&mag[..]);
                        let gz = r * groups..(r + 1) * groups;
                        if let Some((fu, order, _)) = gptq {
                            let (scr, zr) = (&mut sc[gz.clone()], &mut z[gz]);
                            gptq::quantize_row(gs, group, fu, &xr, imp, &mut u, scr, zr, order);
                        } else {
                            for (g, (sg, zg)) in sc[gz.clone()].iter_mut().zip(&mut z[gz]).enumerate() {
                                let cols_g = g * group..(g + 1) * group;
                                let imp_g = imp.map(|m| &m[cols_g.clone()]);
                                let (s, zp) = rtn::quantize_group(gs, &xr[cols_g.clone()], imp_g, &mut u[cols_g]);
                                *sg = s;
                                *zg = zp as u8;
                            }
                        }
                        rtn::pack_row(spec.bits, &u, &mut p[r * cols / k..(r + 1) * cols / k]);
                    }
                    None
                })
            })
            .collect();
        // Chunks are in row order, so the first one found is the first in the tensor.
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).find_map(|b| b)
    });
    if let Some((r, j, v)) = bad {
        return Err(QuantizeError::Tensor {
            tensor: it.name.clone(),
            msg: format!("element [{r}, {j}] is {v}; cannot quantize"),
        });
    }
    let m = it.module();
    let words = |w: &[u32]| w.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>();
    let mut out = vec![
        (
            format!("{m}.weight_packed"),
            OutTensor { dtype: safetensors::Dtype::I32, shape: vec![rows, cols / k], data: words(&packed) },
        ),
        (
            format!("{m}.weight_scale"),
            OutTensor { dtype: it.dtype.st(), shape: vec![rows, groups], data: it.dtype.encode(&scales) },
        ),
        (
            format!("{m}.weight_shape"),
            OutTensor {
                dtype: safetensors::Dtype::I64,
                shape: vec![2],
                data: [rows as i64, cols as i64].iter().flat_map(|v| v.to_le_bytes()).collect(),
            },
        ),
    ];
    if !spec.symmetric {
        let zp = rtn::pack_zeros(spec.bits, &zeros, rows, groups);
        out.push((
            format!("{m}.weight_zero_point"),
            OutTensor { dtype: safetensors::Dtype::I32, shape: vec![rows.div_ceil(k), groups], data: words(&zp) },
        ));
    }
    Ok(out)
}

/// A weight as f32, `rows × cols` row-major, dequantized by the kernels in parallel.
fn dequantize(w: &HostWeight, threads: usize) -> Vec<f32> {
    let (rows, cols, rb) = (w.rows, w.cols, w.row_bytes());
    let bytes = w.data.as_slice();
    let mut x = vec![0f32; rows * cols];
    let per = rows.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (i, chunk) in x.chunks_mut(per * cols).enumerate() {
            s.spawn(move || {
                for (r, row) in chunk.chunks_mut(cols).enumerate() {
                    let at = (i * per + r) * rb;
                    purehw_kernels::quant::dequantize_row(w.format, &bytes[at..at + rb], row);
                }
            });
        }
    });
    x
}

/// Undo llama.cpp's `permute` of Q/K rows: within each head, GGUF row `2i + j` is HF row
/// `j·(head_dim/2) + i` (`j` the RoPE half).
fn unpermute_rows(x: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    let half = head_dim / 2;
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let from = h * head_dim + 2 * i + j;
                let to = h * head_dim + j * half + i;
                out[to * cols..(to + 1) * cols].copy_from_slice(&x[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// The `quantization_config` compressed-tensors writes: one config group per distinct scheme,
/// targeting `Linear` when one scheme covers every Linear, else each module kind by a regex
/// anchored at the end (disjoint, so no precedence rule is needed); `lm_head` ignored unless
/// quantized.
fn quantization_config(items: &[Item]) -> Value {
    let linear = |i: &Item| i.role.hf_class(Arch::Llama) == "Linear";
    let mut by_spec: BTreeMap<IntSpec, Vec<&Item>> = BTreeMap::new();
    for it in items {
        if let Some(s) = it.int {
            by_spec.entry(s).or_default().push(it);
        }
    }
    let all_linear_one_spec = by_spec.len() == 1
        && by_spec
            .values()
            .all(|v| v.iter().all(|i| linear(i)) && v.len() == items.iter().filter(|i| linear(i)).count());
    let mut groups = Map::new();
    for (n, (spec, members)) in by_spec.iter().enumerate() {
        let targets: Vec<String> = if all_linear_one_spec {
            vec!["Linear".into()]
        } else {
            let mut t: Vec<String> = Vec::new();
            for it in members {
                let m = it.module();
                // `model.layers.3.mlp.down_proj` → `re:.*mlp\.down_proj$` when every layer's agrees.
                let target = match (it.layer, it.role) {
                    (_, Role::Output) => "lm_head".to_string(),
                    (None, _) => format!("re:.*{}$", m.rsplit('.').next().unwrap_or(m)),
                    (Some(_), role) => {
                        let tail: Vec<&str> = m.rsplitn(3, '.').take(2).collect();
                        let tail = format!("{}\\.{}", tail[1], tail[0]);
                        let same = items.iter().filter(|i| i.role == role).all(|i| i.int == Some(*spec));
                        if same { format!("re:.*{tail}$") } else { m.to_string() }
                    }
                };
                if !t.contains(&target) {
                    t.push(target);
                }
            }
            t
        };
        let (strategy, group_size) = match spec.group {
            Some(g) => ("group", json!(g)),
            None => ("channel", Value::Null),
        };
        groups.insert(
            format!("group_{n}"),
            json!({
                "format": "pack-quantized",
                "input_activations": null,
                "output_activations": null,
                "targets": targets,
                "weights": {
                    "dynamic": false,
                    "group_size": group_size,
                    "num_bits": spec.bits,
                    "strategy": strategy,
                    "symmetric": spec.symmetric,
                    "type": "int",
                },
            }),
        );
    }
    let head_quantized = items.iter().any(|i| i.role == Role::Output && i.int.is_some());
    let ignore: Vec<&str> = if head_quantized { vec![] } else { vec!["lm_head"] };
    json!({
        "config_groups": groups,
        "format": "pack-quantized",
        "global_compression_ratio": null,
        "ignore": ignore,
        "kv_cache_scheme": null,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.20.0",
    })
}

/// Tokenizer and generation files: copied from beside `--tokenizer` or the input; for a GGUF
/// without them, `generation_config.json` and `chat_template.jinja` from its metadata.
fn side_files(
    src: &ModelSource,
    c: &ModelConfig,
    opts: &Options,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<(), QuantizeError> {
    copy_tokenizer_files(opts.tokenizer.as_deref(), src.dir(), dir)?;
    if let Some(g) = src.gguf() {
        if !dir.join("generation_config.json").exists() {
            let eos = match c.eos.as_slice() {
                [one] => json!(one),
                many => json!(many),
            };
            write_json(&dir.join("generation_config.json"), &json!({ "bos_token_id": c.bos, "eos_token_id": eos }))?;
        }
        if let Some(t) = g.get_str("tokenizer.chat_template")
            && !dir.join("chat_template.jinja").exists()
        {
            let p = dir.join("chat_template.jinja");
            fs::write(&p, t).map_err(io(&p))?;
        }
    }
    if !dir.join("tokenizer.json").exists() {
        progress.note("no tokenizer.json beside the input: the output has none (pass --tokenizer FILE to add one)");
    }
    Ok(())
}

/// `tokenizer` (as `tokenizer.json`) and the tokenizer and generation files beside it, else
/// beside the input folder `input_dir`, into `dir`.
fn copy_tokenizer_files(tokenizer: Option<&Path>, input_dir: Option<&Path>, dir: &Path) -> Result<(), QuantizeError> {
    const FILES: [&str; 10] = [
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "generation_config.json",
        "chat_template.jinja",
        "chat_template.json",
    ];
    let from: Vec<PathBuf> = tokenizer
        .and_then(|t| t.parent().map(Path::to_path_buf))
        .into_iter()
        .chain(input_dir.map(Path::to_path_buf))
        .collect();
    if let Some(t) = tokenizer {
        fs::copy(t, dir.join("tokenizer.json")).map_err(io(t))?;
    }
    for f in FILES {
        if dir.join(f).exists() {
            continue;
        }
        if let Some(p) = from.iter().map(|d| d.join(f)).find(|p| p.is_file()) {
            fs::copy(&p, dir.join(f)).map_err(io(&p))?;
        }
    }
    Ok(())
}

fn write_json(path: &Path, v: &Value) -> Result<(), QuantizeError> {
    let mut text = serde_json::to_string_pretty(v).unwrap_or_default();
    text.push('\n');
    fs::write(path, text).map_err(io(path))
}

/// A folder removed when dropped, unless kept.
struct TempDir(PathBuf);

impl TempDir {
    fn create(path: PathBuf) -> Result<TempDir, QuantizeError> {
        fs::create_dir(&path).map_err(io(&path))?;
        Ok(TempDir(path))
    }
    fn keep(mut self) {
        self.0 = PathBuf::new();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_parse() {
        for s in SCHEMES {
            assert!(s.parse::<Scheme>().is_ok(), "{s}");
        }
        assert!("w4g16".parse::<Scheme>().is_err());
        let seed: Scheme = "seed".parse().unwrap();
        assert_eq!(seed.spec_for(Role::FfnDown), Some(IntSpec { bits: 4, group: Some(32), symmetric: true }));
        assert_eq!(seed.spec_for(Role::TokenEmbd), Some(IntSpec { bits: 8, group: None, symmetric: false }));
        assert_eq!(seed.spec_for(Role::AttnNorm), None);
        let w8: Scheme = "w8".parse().unwrap();
        assert_eq!(w8.spec_for(Role::TokenEmbd), None);
    }

    #[test]
    fn groups_fall_back_to_a_divisor() {
        assert_eq!(fitting_group(128, 160, 8), Some(80));
        assert_eq!(fitting_group(64, 160, 8), Some(40));
        assert_eq!(fitting_group(128, 64, 8), Some(64));
        assert_eq!(fitting_group(32, 12, 8), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // permute: reshape(heads, 2, hd/2) → swap → reshape; HF row h·hd + j·hd/2 + i goes to
        // GGUF row h·hd + 2i + j.
        let (heads, hd, cols) = (2, 8, 1);
        let hf: Vec<f32> = (0..heads * hd).map(|r| r as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    gguf[h * hd + 2 * i + j] = hf[h * hd + j * hd / 2 + i];
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, heads, hd, cols), hf);
    }
}

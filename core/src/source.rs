//! A model's files, opened: its [`ModelConfig`], its tensors by [`Role`], and what the tokenizer
//! and chat template need.
//!
//! Sources are built from bytes ([`ModelSource::from_gguf_bytes`], [`ModelSource::from_safetensors`])
//! so that `no_std` targets can hand in flash or RAM; under `std`, [`ModelSource::open`] maps the
//! files. Tensor data is never copied: a [`HostWeight`] is a range of the shared bytes.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;
use purehw_hal::{ByteOwner, Codes, Format, HostBytes, HostWeight, PackedInt, PlainBytes, ScaleType, WeightParts};

use crate::config::{Arch, ModelConfig};
use crate::gguf::{self, GgufFile};
use crate::quantization::{CtFormat, CtScheme, Quantization};
use crate::safetensors::{self as st, Header};
use crate::{Error, Result};

/// Bytes of one file, shared with every weight cut from it.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A file's bytes as the source keeps them: with a say over residency where the file is mapped.
type Owned = Arc<dyn ByteOwner>;

/// What a tensor is for, independent of the file's naming scheme.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// `(vocab, hidden)`
    TokenEmbd,
    /// `(vocab, hidden)`; absent when tied to `TokenEmbd`.
    Output,
    /// `(hidden)`
    OutputNorm,
    /// Per layer, `(hidden)`: before attention.
    AttnNorm,
    /// `(heads·head_dim, hidden)`
    AttnQ,
    /// `(kv_heads·head_dim, hidden)`
    AttnK,
    /// `(kv_heads·head_dim, hidden)`
    AttnV,
    /// `(hidden, heads·head_dim)`
    AttnOut,
    /// `(head_dim)` Gemma QK-norm.
    AttnQNorm,
    /// `(head_dim)`
    AttnKNorm,
    /// `(hidden)` Gemma: after attention, before the residual add.
    PostAttnNorm,
    /// `(hidden)` before the MLP (Gemma `pre_feedforward_layernorm`, Llama `post_attention_layernorm`).
    FfnNorm,
    /// `(ffn, hidden)`
    FfnGate,
    /// `(ffn, hidden)`
    FfnUp,
    /// `(hidden, ffn)`
    FfnDown,
    /// `(hidden)` Gemma: after the MLP, before the residual add.
    PostFfnNorm,
}

impl Role {
    /// Every role, model-wide ones first.
    pub const ALL: [Role; 16] = [
        Role::TokenEmbd,
        Role::Output,
        Role::OutputNorm,
        Role::AttnNorm,
        Role::AttnQ,
        Role::AttnK,
        Role::AttnV,
        Role::AttnOut,
        Role::AttnQNorm,
        Role::AttnKNorm,
        Role::PostAttnNorm,
        Role::FfnNorm,
        Role::FfnGate,
        Role::FfnUp,
        Role::FfnDown,
        Role::PostFfnNorm,
    ];

    /// Whether the role exists once per layer (and so needs `layer`).
    pub const fn per_layer(self) -> bool {
        !matches!(self, Role::TokenEmbd | Role::Output | Role::OutputNorm)
    }

    /// The HF module class holding this tensor, as quantization `targets` name it.
    pub const fn hf_class(self, arch: Arch) -> &'static str {
        match self {
            Role::TokenEmbd => "Embedding",
            Role::Output
            | Role::AttnQ
            | Role::AttnK
            | Role::AttnV
            | Role::AttnOut
            | Role::FfnGate
            | Role::FfnUp
            | Role::FfnDown => "Linear",
            _ => match arch {
                Arch::Gemma3 => "Gemma3RMSNorm",
                Arch::Llama => "LlamaRMSNorm",
            },
        }
    }

    /// Whether models of `arch` have this tensor at all.
    pub const fn used_by(self, arch: Arch) -> bool {
        match arch {
            Arch::Gemma3 => true,
            Arch::Llama => !matches!(self, Role::AttnQNorm | Role::AttnKNorm | Role::PostAttnNorm | Role::PostFfnNorm),
        }
    }
}

/// Which kind of files a model came from.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Gguf,
    Safetensors,
}

/// One tensor as stored, for `inspect`.
#[derive(Clone, Debug)]
pub struct TensorSummary {
    pub name: String,
    /// `"Q4_K"`, `"BF16"`, `"I32"`, …
    pub dtype: String,
    /// Outermost first (HF order).
    pub shape: Vec<usize>,
    pub bytes: usize,
}

struct Shard {
    /// File name as in the index (`model-00001-of-00002.safetensors`).
    name: String,
    /// What errors call it (`<label>/<name>`).
    display: String,
    bytes: Owned,
    header: Header,
}

enum Store {
    Gguf {
        file: GgufFile,
        bytes: Owned,
    },
    Safetensors {
        shards: Vec<Shard>,
        /// Tensor name → shard index.
        index: BTreeMap<String, usize>,
        /// Where the decoder's tensors live: `model.`, or `model.language_model.` /
        /// `language_model.model.` in multimodal checkpoints.
        prefix: &'static str,
        /// `lm_head.weight` or `language_model.lm_head.weight`, when present.
        lm_head: Option<&'static str>,
        /// compressed-tensors quantization of the checkpoint's modules, if any.
        quant: Option<Quantization>,
    },
}

/// An opened model.
pub struct ModelSource {
    pub config: ModelConfig,
    pub kind: SourceKind,
    /// Path or label used in error messages.
    pub label: String,
    store: Store,
    chat_template: Option<String>,
    /// Whether the bytes are files' memory maps (a device sharing memory may import them).
    mapped: bool,
    #[cfg(feature = "std")]
    dir: Option<std::path::PathBuf>,
}

const HF_PREFIXES: [&str; 4] = ["model.", "model.language_model.", "language_model.model.", "language_model."];
const HF_LM_HEADS: [&str; 2] = ["lm_head.weight", "language_model.lm_head.weight"];

impl ModelSource {
    /// A GGUF file's bytes. `label` names it in errors.
    pub fn from_gguf_bytes(label: &str, bytes: SharedBytes) -> Result<ModelSource> {
        Self::from_gguf_owner(label, Arc::new(PlainBytes(bytes)))
    }

    fn from_gguf_owner(label: &str, bytes: Owned) -> Result<ModelSource> {
        let file = gguf::parse((*bytes).as_ref()).map_err(|m| Error::format(label, m))?;
        let config = ModelConfig::from_gguf(label, &file)?;
        let chat_template = file.get_str("tokenizer.chat_template").map(String::from);
        Ok(ModelSource {
            config,
            kind: SourceKind::Gguf,
            label: label.to_string(),
            store: Store::Gguf { file, bytes },
            chat_template,
            mapped: false,
            #[cfg(feature = "std")]
            dir: None,
        })
    }

    /// An HF checkpoint: `config.json`'s text and every safetensors file as (file name, bytes).
    /// `label` is the model's folder (or any name); errors call files `<label>/<name>`.
    pub fn from_safetensors(label: &str, config_json: &str, shards: Vec<(String, SharedBytes)>) -> Result<ModelSource> {
        Self::from_safetensors_indexed(label, config_json, None, shards)
    }

    /// As [`from_safetensors`](Self::from_safetensors), checking the shards against
    /// `model.safetensors.index.json`'s text: every shard it names must be given, and every tensor
    /// it lists must be in the shard it names.
    pub fn from_safetensors_indexed(
        label: &str,
        config_json: &str,
        index_json: Option<&str>,
        shards: Vec<(String, SharedBytes)>,
    ) -> Result<ModelSource> {
        let weight_map = index_json.map(|json| parse_index(label, json)).transpose()?;
        let shards = shards.into_iter().map(|(n, b)| (n, Arc::new(PlainBytes(b)) as Owned)).collect();
        Self::from_hf_parts(label, config_json, weight_map.as_deref(), shards)
    }

    /// [`from_safetensors_indexed`](Self::from_safetensors_indexed) with the index already parsed.
    fn from_hf_parts(
        label: &str,
        config_json: &str,
        weight_map: Option<&[(String, String)]>,
        shards: Vec<(String, Owned)>,
    ) -> Result<ModelSource> {
        let config_file = format!("{label}/config.json");
        let config = ModelConfig::from_hf_json(&config_file, config_json)?;
        let root: serde_json::Value =
            serde_json::from_str(config_json).map_err(|e| Error::format(&config_file, format!("invalid JSON: {e}")))?;
        let quant = match root.as_object() {
            Some(m) => Quantization::from_hf_config(&config_file, m)?,
            None => None,
        };
        if shards.is_empty() {
            return Err(Error::format(label, "no safetensors files"));
        }

        let mut parsed = Vec::with_capacity(shards.len());
        let mut index = BTreeMap::new();
        for (name, bytes) in shards {
            let display = format!("{label}/{name}");
            let header = st::parse((*bytes).as_ref()).map_err(|m| Error::format(&display, m))?;
            let si = parsed.len();
            for t in &header.tensors {
                if let Some(&other) = index.get(&t.name) {
                    let other: &Shard = &parsed[other];
                    return Err(Error::format(&display, format!("tensor `{}` is also in {}", t.name, other.name)));
                }
                index.insert(t.name.clone(), si);
            }
            parsed.push(Shard { name, display, bytes, header });
        }

        for (tensor, shard) in weight_map.unwrap_or_default() {
            let Some(si) = parsed.iter().position(|s| &s.name == shard) else {
                return Err(Error::format(
                    index_file(label),
                    format!("shard `{shard}` (holding `{tensor}`) is missing"),
                ));
            };
            if index.get(tensor) != Some(&si) {
                return Err(Error::format(
                    &parsed[si].display,
                    format!("tensor `{tensor}` is listed in the index for this shard but is not in it"),
                ));
            }
        }

        // A quantized (`pack-quantized`) table has `weight_packed` in place of `weight`.
        let has_embed =
            |p: &str| ["weight", "weight_packed"].iter().any(|w| index.contains_key(&format!("{p}embed_tokens.{w}")));
        let Some(prefix) = HF_PREFIXES.into_iter().find(|p| has_embed(p)) else {
            return Err(Error::format(
                label,
                "no token embedding tensor (model.embed_tokens.weight) in the checkpoint",
            ));
        };
        let lm_head = HF_LM_HEADS.into_iter().find(|n| index.contains_key(*n));
        Ok(ModelSource {
            config,
            kind: SourceKind::Safetensors,
            label: label.to_string(),
            store: Store::Safetensors { shards: parsed, index, prefix, lm_head, quant },
            chat_template: None,
            mapped: false,
            #[cfg(feature = "std")]
            dir: None,
        })
    }

    /// The parsed GGUF file (metadata for the tokenizer, chat template, `inspect`).
    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.store {
            Store::Gguf { file, .. } => Some(file),
            Store::Safetensors { .. } => None,
        }
    }

    /// The chat template: GGUF `tokenizer.chat_template`, or for an HF folder `chat_template.jinja`
    /// or `tokenizer_config.json`'s `chat_template`.
    pub fn chat_template(&self) -> Option<String> {
        self.chat_template.clone()
    }

    /// The file name `role` maps to in this model's naming scheme.
    pub fn tensor_name(&self, role: Role, layer: usize) -> String {
        match &self.store {
            Store::Gguf { .. } => gguf_name(role, layer),
            Store::Safetensors { prefix, lm_head, .. } => match role {
                Role::Output => lm_head.unwrap_or(HF_LM_HEADS[0]).to_string(),
                _ => format!("{prefix}{}", hf_name(role, layer, self.config.arch)),
            },
        }
    }

    /// The tensor for `role` (of `layer`, for per-layer roles) as a 2-D weight (`rows, cols`; a
    /// vector is `1, n`), or `Ok(None)` when the model does not have it (e.g. `Output` when tied).
    /// Shape and byte size are checked; a mismatch is an error naming the tensor and the file.
    /// `range` of `bytes` as a weight's bytes, marked as mapped when the source maps files.
    fn host_bytes(&self, bytes: &Owned, range: core::ops::Range<usize>) -> Option<HostBytes> {
        HostBytes::from_owner(bytes.clone(), range, self.mapped)
    }

    pub fn weight(&self, role: Role, layer: Option<usize>) -> Result<Option<HostWeight>> {
        let c = &self.config;
        let layer = match (role.per_layer(), layer) {
            (true, Some(l)) if l < c.layers => l,
            (true, Some(l)) => {
                return Err(Error::Invalid(format!("{role:?}: layer {l} out of range ({} layers)", c.layers)));
            }
            (true, None) => return Err(Error::Invalid(format!("{role:?} is per layer; a layer index is needed"))),
            (false, Some(_)) => return Err(Error::Invalid(format!("{role:?} is model-wide; pass no layer"))),
            (false, None) => 0,
        };
        if !role.used_by(c.arch) || (role == Role::Output && c.tied_embeddings) {
            return Ok(None);
        }
        let (rows, cols) = expected_shape(c, role);
        let name = self.tensor_name(role, layer);
        let w = match &self.store {
            Store::Gguf { file, bytes } => {
                let t = file.tensor(&name).ok_or_else(|| missing(&self.label, &name))?;
                let dim = |d: u64| usize::try_from(d).unwrap_or(usize::MAX);
                let found = match t.dims.as_slice() {
                    [n] => (1, dim(*n)),
                    [c, r] => (dim(*r), dim(*c)),
                    d => {
                        return Err(Error::format(
                            &self.label,
                            format!("tensor `{name}` has {} dims, expected 1 or 2", d.len()),
                        ));
                    }
                };
                check_found(&self.label, &name, (rows, cols), found)?;
                let data = self.host_bytes(bytes, t.start..t.start.saturating_add(t.len)).ok_or_else(|| {
                    Error::format(&self.label, format!("tensor `{name}`: data lies outside the file"))
                })?;
                HostWeight::new(t.format, rows, cols, data).ok_or_else(|| {
                    Error::format(
                        &self.label,
                        format!("tensor `{name}`: {} bytes do not hold {rows}x{cols} {}", t.len, t.format.name()),
                    )
                })?
            }
            Store::Safetensors { shards, index, quant, .. } => {
                let module = name.strip_suffix(".weight").unwrap_or(&name);
                if let Some(scheme) = quant.as_ref().and_then(|q| q.scheme_for(module, role.hf_class(c.arch))) {
                    if matches!(role.hf_class(c.arch), "Gemma3RMSNorm" | "LlamaRMSNorm") {
                        return Err(Error::format(
                            &self.label,
                            format!(
                                "`{module}` is targeted by the quantization scheme; quantized norms are not supported"
                            ),
                        ));
                    }
                    return self.int_weight(shards, index, module, scheme, (rows, cols)).map(Some);
                }
                let shard = index.get(&name).and_then(|&i| shards.get(i)).ok_or_else(|| missing(&self.label, &name))?;
                let t = shard.header.tensor(&name).ok_or_else(|| missing(&shard.display, &name))?;
                let found = match t.shape.as_slice() {
                    [n] => (1, *n),
                    [r, c] => (*r, *c),
                    s => {
                        return Err(Error::format(
                            &shard.display,
                            format!("tensor `{name}` has shape {s:?}, expected 1 or 2 dims"),
                        ));
                    }
                };
                check_found(&shard.display, &name, (rows, cols), found)?;
                let format = t.dtype.format().ok_or_else(|| {
                    Error::format(
                        &shard.display,
                        format!(
                            "tensor `{name}` has dtype {}, which cannot be loaded as a weight (F32, F16, BF16 only)",
                            t.dtype
                        ),
                    )
                })?;
                let data = self.host_bytes(&shard.bytes, t.range.clone()).ok_or_else(|| {
                    Error::format(&shard.display, format!("tensor `{name}`: data lies outside the file"))
                })?;
                HostWeight::new(format, rows, cols, data).ok_or_else(|| {
                    Error::format(
                        &shard.display,
                        format!("tensor `{name}`: byte size does not match {rows}x{cols} {format:?}"),
                    )
                })?
            }
        };
        Ok(Some(w))
    }

    /// A compressed-tensors module's weight (`scheme` as its config group says): codes, scales and
    /// zero points as views of the files, every part's dtype and shape checked.
    fn int_weight(
        &self,
        shards: &[Shard],
        index: &BTreeMap<String, usize>,
        module: &str,
        scheme: CtScheme,
        (rows, cols): (usize, usize),
    ) -> Result<HostWeight> {
        let find = |part: &str| -> Result<Option<(&Shard, &st::TensorEntry)>> {
            let name = format!("{module}.{part}");
            let Some(sh) = index.get(&name).and_then(|&i| shards.get(i)) else { return Ok(None) };
            sh.header.tensor(&name).map(|t| Some((sh, t))).ok_or_else(|| missing(&sh.display, &name))
        };
        let need = |part: &str| find(part)?.ok_or_else(|| missing(&self.label, &format!("{module}.{part}")));
        let bad =
            |sh: &Shard, part: &str, msg: String| Error::format(&sh.display, format!("tensor `{module}.{part}` {msg}"));
        let expect = |sh: &Shard, part: &str, t: &st::TensorEntry, dtypes: &[st::Dtype], shape: &[usize]| {
            if !dtypes.contains(&t.dtype) {
                return Err(bad(sh, part, format!("has dtype {}, expected {}", t.dtype, dtype_list(dtypes))));
            }
            if t.shape != shape {
                return Err(bad(sh, part, format!("has shape {:?}, expected {shape:?}", t.shape)));
            }
            Ok(())
        };
        let bits = scheme.bits as usize;
        let (part, codes) = match scheme.format {
            CtFormat::PackQuantized => {
                let k = 32 / bits;
                if !cols.is_multiple_of(k) {
                    return Err(Error::format(
                        &self.label,
                        format!("`{module}`: {cols} columns are not a whole number of {k}-code int32 words"),
                    ));
                }
                let (sh, t) = need("weight_shape")?;
                expect(sh, "weight_shape", t, &[st::Dtype::I64, st::Dtype::I32], &[2])?;
                let shape = read_ints(t.dtype, &sh.bytes.as_ref().as_ref()[t.range.clone()]);
                if shape != [rows as i64, cols as i64] {
                    return Err(bad(sh, "weight_shape", format!("says {shape:?}, expected [{rows}, {cols}]")));
                }
                let (sh, t) = need("weight_packed")?;
                expect(sh, "weight_packed", t, &[st::Dtype::I32], &[rows, cols / k])?;
                ((sh, t), Codes::Packed)
            }
            CtFormat::IntQuantized => {
                let (sh, t) = need("weight")?;
                expect(sh, "weight", t, &[st::Dtype::I8], &[rows, cols])?;
                ((sh, t), Codes::I8)
            }
        };
        let groups = match scheme.group {
            None => 1,
            Some(g) if cols.is_multiple_of(g) => cols / g,
            Some(g) => {
                return Err(Error::format(
                    &self.label,
                    format!("`{module}`: group size {g} does not divide its {cols} columns"),
                ));
            }
        };
        let (ssh, stt) = need("weight_scale")?;
        expect(ssh, "weight_scale", stt, &[st::Dtype::BF16, st::Dtype::F16, st::Dtype::F32], &[rows, groups])?;
        let scale = match stt.dtype {
            st::Dtype::BF16 => ScaleType::BF16,
            st::Dtype::F16 => ScaleType::F16,
            _ => ScaleType::F32,
        };
        if let Some((sh, _)) = find("weight_g_idx")? {
            return Err(bad(sh, "weight_g_idx", "is present: activation reordering (g_idx) is not supported".into()));
        }
        let p = PackedInt { bits: scheme.bits, codes, group: scheme.group, symmetric: scheme.symmetric, scale };
        let zeros = match (scheme.symmetric, find("weight_zero_point")?) {
            (true, None) => None,
            (true, Some((sh, _))) => {
                return Err(bad(sh, "weight_zero_point", "is present, but the scheme is symmetric".into()));
            }
            (false, None) => return Err(missing(&self.label, &format!("{module}.weight_zero_point"))),
            (false, Some((sh, t))) => Some(self.zero_points(sh, t, module, p, rows, groups)?),
        };
        let view = |sh: &Shard, t: &st::TensorEntry, part: &str| {
            self.host_bytes(&sh.bytes, t.range.clone()).ok_or_else(|| bad(sh, part, "lies outside the file".into()))
        };
        let ((csh, ct), scales) = (part, view(ssh, stt, "weight_scale")?);
        let data = view(csh, ct, "codes")?;
        HostWeight::with_parts(Format::Int(p), rows, cols, data, WeightParts { scales: Some(scales), zeros })
            .map_err(|e| Error::format(&csh.display, format!("`{module}`: {e}")))
    }

    /// A module's zero points: packed down the columns (`[ceil(rows / k), groups]` int32, as
    /// compressed-tensors 0.10+ writes them) in place, or one integer per (row, group) (older
    /// writers, `int-quantized`), range-checked and packed here (they are small).
    fn zero_points(
        &self,
        sh: &Shard,
        t: &st::TensorEntry,
        module: &str,
        p: PackedInt,
        rows: usize,
        groups: usize,
    ) -> Result<HostBytes> {
        let part = "weight_zero_point";
        let bad = |msg: String| Error::format(&sh.display, format!("tensor `{module}.{part}` {msg}"));
        let k = p.zero_elems();
        if t.dtype == st::Dtype::I32 && t.shape == [rows.div_ceil(k), groups] {
            return self.host_bytes(&sh.bytes, t.range.clone()).ok_or_else(|| bad("lies outside the file".into()));
        }
        if !matches!(t.dtype, st::Dtype::I8 | st::Dtype::I32 | st::Dtype::I64) || t.shape != [rows, groups] {
            return Err(bad(format!(
                "has {} {:?}, expected I32 [{}, {groups}] (packed) or an integer [{rows}, {groups}]",
                t.dtype,
                t.shape,
                rows.div_ceil(k)
            )));
        }
        let half = 1i64 << (p.bits - 1);
        let vals = read_ints(t.dtype, &sh.bytes.as_ref().as_ref()[t.range.clone()]);
        let mut words = alloc::vec![0u32; rows.div_ceil(k) * groups];
        for (i, &v) in vals.iter().enumerate() {
            let (r, g) = (i / groups, i % groups);
            if !(-half..half).contains(&v) {
                return Err(bad(format!(
                    "value {v} at [{r}, {g}] is out of range for {}-bit codes ({}..={})",
                    p.bits,
                    -half,
                    half - 1
                )));
            }
            words[(r / k) * groups + g] |= ((v + half) as u32) << (p.bits as usize * (r % k));
        }
        Ok(HostBytes::from_vec(words.iter().flat_map(|w| w.to_le_bytes()).collect()))
    }

    /// Every tensor, for `inspect` (file order for GGUF; shard then offset order for safetensors).
    pub fn tensors(&self) -> Vec<TensorSummary> {
        match &self.store {
            Store::Gguf { file, .. } => file
                .tensors
                .iter()
                .map(|t| TensorSummary {
                    name: t.name.clone(),
                    dtype: t.format.name().to_string(),
                    shape: t.dims.iter().rev().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect(),
                    bytes: t.len,
                })
                .collect(),
            Store::Safetensors { shards, .. } => shards
                .iter()
                .flat_map(|s| &s.header.tensors)
                .map(|t| TensorSummary {
                    name: t.name.clone(),
                    dtype: t.dtype.name().to_string(),
                    shape: t.shape.clone(),
                    bytes: t.range.len(),
                })
                .collect(),
        }
    }
}

/// What errors call a checkpoint's `model.safetensors.index.json`.
fn index_file(label: &str) -> String {
    format!("{label}/model.safetensors.index.json")
}

/// `model.safetensors.index.json`'s weight map as (tensor, shard file) pairs.
fn parse_index(label: &str, json: &str) -> Result<Vec<(String, String)>> {
    st::parse_index(json.as_bytes()).map_err(|m| Error::format(index_file(label), m))
}

/// Little-endian integers of an integer dtype (`I8`, `I32`, `I64`; nothing for others).
fn read_ints(dtype: st::Dtype, b: &[u8]) -> Vec<i64> {
    match dtype {
        st::Dtype::I8 => b.iter().map(|&x| x as i8 as i64).collect(),
        st::Dtype::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect(),
        st::Dtype::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect(),
        _ => Vec::new(),
    }
}

/// `"I32 or I64"`.
fn dtype_list(d: &[st::Dtype]) -> String {
    d.iter().map(|d| d.name()).collect::<Vec<_>>().join(" or ")
}

fn missing(file: &str, name: &str) -> Error {
    Error::format(file, format!("missing tensor `{name}`"))
}

fn check_found(file: &str, name: &str, want: (usize, usize), found: (usize, usize)) -> Result<()> {
    if want == found {
        return Ok(());
    }
    Err(Error::format(
        file,
        format!("tensor `{name}` has shape [{}, {}], expected [{}, {}] (rows, cols)", found.0, found.1, want.0, want.1),
    ))
}

/// `(rows, cols)` the config implies for `role`.
pub fn expected_shape(c: &ModelConfig, role: Role) -> (usize, usize) {
    let q = c.heads * c.head_dim;
    let kv = c.kv_heads * c.head_dim;
    match role {
        Role::TokenEmbd | Role::Output => (c.vocab, c.hidden),
        Role::OutputNorm | Role::AttnNorm | Role::PostAttnNorm | Role::FfnNorm | Role::PostFfnNorm => (1, c.hidden),
        Role::AttnQ => (q, c.hidden),
        Role::AttnK | Role::AttnV => (kv, c.hidden),
        Role::AttnOut => (c.hidden, q),
        Role::AttnQNorm | Role::AttnKNorm => (1, c.head_dim),
        Role::FfnGate | Role::FfnUp => (c.ffn, c.hidden),
        Role::FfnDown => (c.hidden, c.ffn),
    }
}

fn gguf_name(role: Role, l: usize) -> String {
    let per = |s: &str| format!("blk.{l}.{s}.weight");
    match role {
        Role::TokenEmbd => "token_embd.weight".into(),
        Role::Output => "output.weight".into(),
        Role::OutputNorm => "output_norm.weight".into(),
        Role::AttnNorm => per("attn_norm"),
        Role::AttnQ => per("attn_q"),
        Role::AttnK => per("attn_k"),
        Role::AttnV => per("attn_v"),
        Role::AttnOut => per("attn_output"),
        Role::AttnQNorm => per("attn_q_norm"),
        Role::AttnKNorm => per("attn_k_norm"),
        Role::PostAttnNorm => per("post_attention_norm"),
        Role::FfnNorm => per("ffn_norm"),
        Role::FfnGate => per("ffn_gate"),
        Role::FfnUp => per("ffn_up"),
        Role::FfnDown => per("ffn_down"),
        Role::PostFfnNorm => per("post_ffw_norm"),
    }
}

/// The name a text-only HF checkpoint (`Gemma3ForCausalLM`, `LlamaForCausalLM`) gives `role`'s
/// tensor: `model.layers.3.self_attn.q_proj.weight`, `lm_head.weight`.
pub fn hf_tensor_name(role: Role, layer: usize, arch: Arch) -> String {
    match role {
        Role::Output => HF_LM_HEADS[0].to_string(),
        _ => format!("model.{}", hf_name(role, layer, arch)),
    }
}

/// HF name without the decoder prefix (`model.`).
fn hf_name(role: Role, l: usize, arch: Arch) -> String {
    let per = |s: &str| format!("layers.{l}.{s}.weight");
    match role {
        Role::TokenEmbd => "embed_tokens.weight".into(),
        Role::Output => "lm_head.weight".into(),
        Role::OutputNorm => "norm.weight".into(),
        Role::AttnNorm => per("input_layernorm"),
        Role::AttnQ => per("self_attn.q_proj"),
        Role::AttnK => per("self_attn.k_proj"),
        Role::AttnV => per("self_attn.v_proj"),
        Role::AttnOut => per("self_attn.o_proj"),
        Role::AttnQNorm => per("self_attn.q_norm"),
        Role::AttnKNorm => per("self_attn.k_norm"),
        // Same HF name, different place in the block: Gemma normalises the attention output with
        // it, Llama the MLP input.
        Role::PostAttnNorm => per("post_attention_layernorm"),
        Role::FfnNorm => match arch {
            Arch::Gemma3 => per("pre_feedforward_layernorm"),
            Arch::Llama => per("post_attention_layernorm"),
        },
        Role::FfnGate => per("mlp.gate_proj"),
        Role::FfnUp => per("mlp.up_proj"),
        Role::FfnDown => per("mlp.down_proj"),
        Role::PostFfnNorm => per("post_feedforward_layernorm"),
    }
}

#[cfg(feature = "std")]
mod open {
    use super::*;
    use crate::config::token_ids;
    use alloc::vec;
    use std::fs;
    use std::path::{Path, PathBuf};

    fn io(path: &Path, e: std::io::Error) -> Error {
        Error::Io { file: path.display().to_string(), source: e }
    }

    fn read_text(path: &Path) -> Result<String> {
        fs::read_to_string(path).map_err(|e| io(path, e))
    }

    /// Memory-map a weight file read-only; weights are never copied wholesale. This and
    /// [`MappedFile`]'s residency calls are the workspace's only `unsafe` outside FFI and SIMD.
    #[allow(unsafe_code)]
    fn map_file(path: &Path) -> Result<Owned> {
        let f = fs::File::open(path).map_err(|e| io(path, e))?;
        // SAFETY: the mapping is read-only and private to this process. The one hazard is another
        // process truncating or rewriting the file while it is mapped (as with every mmap-based
        // engine); model files are treated as immutable, and `purehw pull` replaces files by
        // atomic rename, which leaves existing mappings intact.
        let m = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| io(path, e))?;
        Ok(Arc::new(MappedFile(m)))
    }

    /// A weight file's read-only map, whose pages can be read ahead and given back
    /// (`madvise`), so a model loaded with a memory budget streams its layers.
    struct MappedFile(memmap2::Mmap);

    impl AsRef<[u8]> for MappedFile {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    /// The OS page size (`sysconf`), read once.
    #[cfg(unix)]
    #[allow(unsafe_code)]
    fn page_size() -> usize {
        static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        // SAFETY: sysconf reads a constant of the system; it takes no pointers.
        *PAGE.get_or_init(|| usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1))
    }

    /// `range` widened to whole pages (the map starts on a page), clamped to `len`: every page
    /// holding a byte of it. `None` when empty.
    pub(crate) fn pages_around(range: core::ops::Range<usize>, page: usize, len: usize) -> Option<(usize, usize)> {
        let end = range.end.min(len);
        if range.start >= end {
            return None;
        }
        let start = range.start - range.start % page;
        let end = end.div_ceil(page).saturating_mul(page).min(len);
        (start < end).then(|| (start, end - start))
    }

    /// `range` narrowed to whole pages: only pages holding nothing but bytes of it (a page shared
    /// with a neighbouring tensor stays). The last page of the file counts as whole. `None` when
    /// no page is.
    pub(crate) fn pages_within(range: core::ops::Range<usize>, page: usize, len: usize) -> Option<(usize, usize)> {
        let end = range.end.min(len);
        let start = range.start.div_ceil(page).saturating_mul(page);
        let end = if end == len { end } else { end - end % page };
        (start < end).then(|| (start, end - start))
    }

    impl ByteOwner for MappedFile {
        #[cfg(unix)]
        fn prefetch(&self, range: core::ops::Range<usize>) {
            if let Some((off, len)) = pages_around(range, page_size(), self.0.len()) {
                // Start the reads, then map the pages in (Linux 5.14+; older kernels refuse it and
                // the pages fault in on first touch). Hints: failures change nothing but speed.
                let _ = self.0.advise_range(memmap2::Advice::WillNeed, off, len);
                #[cfg(target_os = "linux")]
                let _ = self.0.advise_range(memmap2::Advice::PopulateRead, off, len);
            }
        }

        #[cfg(unix)]
        #[allow(unsafe_code)]
        fn release(&self, range: core::ops::Range<usize>) {
            if let Some((off, len)) = pages_within(range, page_size(), self.0.len()) {
                // SAFETY: MADV_DONTNEED drops these pages from this process's map. The map is
                // read-only and private, never written, so the next touch reads the same bytes
                // from the file again (the hazard is the one `map_file` names: the file changing
                // underneath). `off` is page-aligned and `off + len` lies inside the map.
                let _ = unsafe { self.0.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, off, len) };
            }
        }
    }

    fn is_gguf(path: &Path) -> bool {
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            return true;
        }
        let mut magic = [0u8; 4];
        fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
            && &magic == b"GGUF"
    }

    impl ModelSource {
        /// Open a `.gguf` file, a `.safetensors` file (its folder's `config.json` alongside), or a
        /// folder holding `config.json` with `model.safetensors` or `model.safetensors.index.json`
        /// and its shards (or else exactly one `.gguf`).
        pub fn open(path: &Path) -> Result<ModelSource> {
            let meta = fs::metadata(path).map_err(|e| io(path, e))?;
            if meta.is_file() {
                if is_gguf(path) {
                    return open_gguf(path);
                }
                if path.extension().is_some_and(|e| e == "safetensors") {
                    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    return open_hf(&dir, None, vec![name]);
                }
                return Err(Error::format(path.display().to_string(), "not a .gguf or .safetensors file"));
            }
            let index = path.join("model.safetensors.index.json");
            if path.join("config.json").is_file() {
                if index.is_file() {
                    let map = parse_index(&path.display().to_string(), &read_text(&index)?)?;
                    let mut names: Vec<String> = map.iter().map(|(_, s)| s.clone()).collect();
                    names.sort();
                    names.dedup();
                    return open_hf(path, Some(map), names);
                }
                if path.join("model.safetensors").is_file() {
                    return open_hf(path, None, vec!["model.safetensors".into()]);
                }
            }
            let ggufs: Vec<PathBuf> = fs::read_dir(path)
                .map_err(|e| io(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")))
                .collect();
            match ggufs.as_slice() {
                [one] => open_gguf(one),
                [] => Err(Error::format(
                    path.display().to_string(),
                    "no model here: expected config.json with model.safetensors or model.safetensors.index.json, or a .gguf file",
                )),
                _ => Err(Error::format(path.display().to_string(), "several .gguf files here; name one")),
            }
        }

        /// The model's folder (to find `tokenizer.json`, `tokenizer_config.json`); `None` for
        /// sources built from bytes.
        pub fn dir(&self) -> Option<&Path> {
            self.dir.as_deref()
        }
    }

    fn open_gguf(path: &Path) -> Result<ModelSource> {
        let mut s = ModelSource::from_gguf_owner(&path.display().to_string(), map_file(path)?)?;
        s.dir = path.parent().map(Path::to_path_buf);
        s.mapped = true;
        Ok(s)
    }

    fn open_hf(dir: &Path, weight_map: Option<Vec<(String, String)>>, shard_names: Vec<String>) -> Result<ModelSource> {
        let config_json = read_text(&dir.join("config.json"))?;
        let label = dir.display().to_string();
        let mut shards = Vec::with_capacity(shard_names.len());
        for name in shard_names {
            let p = dir.join(&name);
            if !p.is_file() {
                let what = if weight_map.is_some() { "shard named in model.safetensors.index.json" } else { "file" };
                return Err(Error::format(p.display().to_string(), format!("{what} is missing")));
            }
            shards.push((name, map_file(&p)?));
        }
        let mut s = ModelSource::from_hf_parts(&label, &config_json, weight_map.as_deref(), shards)?;
        s.dir = Some(dir.to_path_buf());
        s.mapped = true;
        apply_hf_side_files(&mut s, dir)?;
        Ok(s)
    }

    /// What `config.json` does not say but transformers' `generate` and tokenizer use:
    /// `generation_config.json`'s `eos_token_id` (the ids `generate` stops at) and
    /// `tokenizer_config.json`'s `add_bos_token` and `chat_template`.
    fn apply_hf_side_files(s: &mut ModelSource, dir: &Path) -> Result<()> {
        let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
            let p = dir.join(name);
            if !p.is_file() {
                return Ok(None);
            }
            let text = read_text(&p)?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| Error::format(p.display().to_string(), format!("invalid JSON: {e}")))
        };
        if let Some(g) = read_json("generation_config.json")? {
            let file = dir.join("generation_config.json").display().to_string();
            if let Some(v) = g.get("eos_token_id").filter(|v| !v.is_null()) {
                let eos = token_ids(v)
                    .ok_or_else(|| Error::format(&file, "`eos_token_id` is not a token id or list of ids"))?;
                if let Some(bad) = eos.iter().find(|&&e| e as usize >= s.config.vocab) {
                    return Err(Error::format(&file, format!("eos_token_id {bad} is outside the vocabulary")));
                }
                s.config.eos = eos;
            }
        }
        if let Some(t) = read_json("tokenizer_config.json")? {
            if let Some(b) = t.get("add_bos_token").and_then(|v| v.as_bool()) {
                s.config.add_bos = b;
            }
            if let Some(ct) = t.get("chat_template").and_then(|v| v.as_str()) {
                s.chat_template = Some(ct.to_string());
            }
        }
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            s.chat_template = Some(read_text(&jinja)?);
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::open::{pages_around, pages_within};

    #[test]
    fn prefetch_widens_to_pages_and_release_narrows() {
        // A 10-page file; a tensor from the middle of page 1 to the middle of page 3.
        let (p, len) = (4096, 10 * 4096);
        assert_eq!(pages_around(6000..14000, p, len), Some((4096, 3 * 4096)));
        assert_eq!(pages_within(6000..14000, p, len), Some((8192, 4096)));
        // Whole pages stay as they are; nothing whole inside a page-sized range that straddles.
        assert_eq!(pages_within(4096..12288, p, len), Some((4096, 8192)));
        assert_eq!(pages_within(100..4196, p, len), None);
        // The file's last, partial page counts as whole; nothing past the end.
        assert_eq!(pages_within(9 * 4096..len - 10, p, len - 10), Some((9 * 4096, 4086)));
        assert_eq!(pages_around(len - 10..len, p, len), Some((9 * 4096, 4096)));
        assert_eq!(pages_around(5..5, p, len), None);
    }
}

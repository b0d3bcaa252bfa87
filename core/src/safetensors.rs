//! HF safetensors checkpoints: single file or sharded (`model.safetensors.index.json`).
//!
//! Layout: 8-byte little-endian header length `n`, `n` bytes of JSON (an object of tensor name →
//! `{dtype, shape, data_offsets}` plus an optional `__metadata__` string map), then the data
//! section. Offsets are relative to the data section. The format requires the tensors to cover the
//! data section exactly — no overlaps, holes or trailing bytes — so a file cannot hide extra
//! payload; we enforce that, and check every tensor's byte size against its shape.
//!
//! [`parse`] and [`parse_index`] never panic and never read out of bounds; their errors are plain
//! messages and callers prefix the file name (as with [`crate::gguf::parse`]).

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use purehw_kernels::Format;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

/// Headers larger than this are refused (the reference implementation uses the same bound), so a
/// hostile length cannot make us parse hundreds of megabytes of JSON.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Element types a safetensors file may declare. Only the float ones load as weights; the integer
/// ones appear in quantized checkpoints (compressed-tensors packs into `I32`, stores shapes as `I64`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
#[non_exhaustive]
pub enum Dtype {
    Bool,
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F16,
    BF16,
    F32,
    F64,
    C64,
    F8_E4M3,
    F8_E5M2,
    F8_E8M0,
    F8_E4M3FNUZ,
    F8_E5M2FNUZ,
    F6_E2M3,
    F6_E3M2,
    F4,
}

impl Dtype {
    const ALL: [Dtype; 22] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::U16,
        Dtype::I16,
        Dtype::U32,
        Dtype::I32,
        Dtype::U64,
        Dtype::I64,
        Dtype::F16,
        Dtype::BF16,
        Dtype::F32,
        Dtype::F64,
        Dtype::C64,
        Dtype::F8_E4M3,
        Dtype::F8_E5M2,
        Dtype::F8_E8M0,
        Dtype::F8_E4M3FNUZ,
        Dtype::F8_E5M2FNUZ,
        Dtype::F6_E2M3,
        Dtype::F6_E3M2,
        Dtype::F4,
    ];

    /// The name as written in the header (`"BF16"`, `"I32"`, …).
    pub const fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::U16 => "U16",
            Dtype::I16 => "I16",
            Dtype::U32 => "U32",
            Dtype::I32 => "I32",
            Dtype::U64 => "U64",
            Dtype::I64 => "I64",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::C64 => "C64",
            Dtype::F8_E4M3 => "F8_E4M3",
            Dtype::F8_E5M2 => "F8_E5M2",
            Dtype::F8_E8M0 => "F8_E8M0",
            Dtype::F8_E4M3FNUZ => "F8_E4M3FNUZ",
            Dtype::F8_E5M2FNUZ => "F8_E5M2FNUZ",
            Dtype::F6_E2M3 => "F6_E2M3",
            Dtype::F6_E3M2 => "F6_E3M2",
            Dtype::F4 => "F4",
        }
    }

    /// Parse a header dtype name; `None` for names the format does not define.
    pub fn from_name(s: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == s)
    }

    /// Bits per element (sub-byte types exist: F4, F6).
    pub const fn bits(self) -> usize {
        match self {
            Dtype::F4 => 4,
            Dtype::F6_E2M3 | Dtype::F6_E3M2 => 6,
            Dtype::Bool
            | Dtype::U8
            | Dtype::I8
            | Dtype::F8_E4M3
            | Dtype::F8_E5M2
            | Dtype::F8_E8M0
            | Dtype::F8_E4M3FNUZ
            | Dtype::F8_E5M2FNUZ => 8,
            Dtype::U16 | Dtype::I16 | Dtype::F16 | Dtype::BF16 => 16,
            Dtype::U32 | Dtype::I32 | Dtype::F32 => 32,
            Dtype::U64 | Dtype::I64 | Dtype::F64 | Dtype::C64 => 64,
        }
    }

    /// The kernels' format for dtypes that load as weights.
    pub const fn format(self) -> Option<Format> {
        match self {
            Dtype::F32 => Some(Format::F32),
            Dtype::F16 => Some(Format::F16),
            Dtype::BF16 => Some(Format::BF16),
            _ => None,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of a safetensors file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    /// Outermost first.
    pub shape: Vec<usize>,
    /// Absolute byte range in the file (already checked to lie inside it).
    pub range: Range<usize>,
}

/// A parsed safetensors header. Tensor data stays in the caller's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// `__metadata__`, sorted by key (serde_json's map order).
    pub metadata: Vec<(String, String)>,
    /// Sorted by data offset.
    pub tensors: Vec<TensorEntry>,
    /// Absolute offset of the data section (`8 + header length`).
    pub data_start: usize,
    by_name: BTreeMap<String, usize>,
}

impl Header {
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).and_then(|&i| self.tensors.get(i))
    }
}

/// A JSON object's entries in file order, duplicates kept so we can reject them (a plain map would
/// silently keep the last one, letting two files disagree about what a checkpoint contains).
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = m.next_entry::<String, Value>()? {
                    v.push(e);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

fn no_duplicates<'a>(names: impl Iterator<Item = &'a str>, what: &str) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for n in names {
        if !seen.insert(n) {
            return Err(format!("{what} `{n}` appears twice"));
        }
    }
    Ok(())
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|x| usize::try_from(x).ok())
}

/// Parse the header of a safetensors file and validate every tensor against the data section.
pub fn parse(bytes: &[u8]) -> Result<Header, String> {
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("file is {} bytes, too short for the 8-byte header length", bytes.len()))?;
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER_LEN {
        return Err(format!("header length {n} exceeds the {MAX_HEADER_LEN}-byte limit"));
    }
    let data_start = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| format!("header length {n} runs past the end of the file ({} bytes)", bytes.len()))?;
    let json = bytes.get(8..data_start).unwrap_or_default();
    let entries: Entries =
        serde_json::from_slice(json).map_err(|e| format!("header is not a valid JSON object: {e}"))?;
    no_duplicates(entries.0.iter().map(|(k, _)| k.as_str()), "header key")?;
    let data_len = bytes.len() - data_start;

    let mut metadata = Vec::new();
    let mut tensors = Vec::with_capacity(entries.0.len());
    for (name, v) in entries.0 {
        if name == "__metadata__" {
            let obj = v.as_object().ok_or("`__metadata__` is not an object")?;
            for (k, v) in obj {
                let s = v.as_str().ok_or_else(|| format!("`__metadata__.{k}` is not a string"))?;
                metadata.push((k.clone(), s.to_string()));
            }
            continue;
        }
        tensors.push(tensor_entry(name, &v, data_start, data_len)?);
    }

    // Zero-length tensors sort before a tensor at the same offset, so they never look like overlaps.
    tensors.sort_by_key(|t| (t.range.start, t.range.end));
    let mut covered = data_start;
    let mut prev: Option<&TensorEntry> = None;
    for t in &tensors {
        if t.range.start < covered {
            let other = prev.map(|p| p.name.as_str()).unwrap_or("?");
            return Err(format!(
                "tensor `{}`: data_offsets [{}, {}] overlap tensor `{other}`",
                t.name,
                t.range.start - data_start,
                t.range.end - data_start
            ));
        }
        if t.range.start > covered {
            return Err(format!(
                "bytes {}..{} of the data section belong to no tensor (before `{}`)",
                covered - data_start,
                t.range.start - data_start,
                t.name
            ));
        }
        covered = t.range.end;
        prev = Some(t);
    }
    if covered != bytes.len() {
        return Err(format!("{} trailing bytes after the last tensor's data", bytes.len() - covered));
    }
    let by_name = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
    Ok(Header { metadata, tensors, data_start, by_name })
}

fn tensor_entry(name: String, v: &Value, data_start: usize, data_len: usize) -> Result<TensorEntry, String> {
    let obj = v.as_object().ok_or_else(|| format!("tensor `{name}`: entry is not an object"))?;
    let field = |k: &str| obj.get(k).ok_or_else(|| format!("tensor `{name}`: missing `{k}`"));

    let dtype_name = field("dtype")?.as_str().ok_or_else(|| format!("tensor `{name}`: `dtype` is not a string"))?;
    let dtype = Dtype::from_name(dtype_name).ok_or_else(|| format!("tensor `{name}`: unknown dtype `{dtype_name}`"))?;

    let shape = field("shape")?
        .as_array()
        .and_then(|a| a.iter().map(as_usize).collect::<Option<Vec<_>>>())
        .ok_or_else(|| format!("tensor `{name}`: `shape` is not a list of non-negative integers"))?;

    let offs = field("data_offsets")?
        .as_array()
        .and_then(|a| match a.as_slice() {
            [b, e] => Some((as_usize(b)?, as_usize(e)?)),
            _ => None,
        })
        .ok_or_else(|| format!("tensor `{name}`: `data_offsets` is not a pair of non-negative integers"))?;
    let (begin, end) = offs;
    if begin > end || end > data_len {
        return Err(format!(
            "tensor `{name}`: data_offsets [{begin}, {end}] lie outside the data section ({data_len} bytes)"
        ));
    }

    let bytes = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.bits()))
        .filter(|bits| bits % 8 == 0)
        .map(|bits| bits / 8)
        .ok_or_else(|| format!("tensor `{name}`: shape {shape:?} of {dtype} is not a whole number of bytes"))?;
    if bytes != end - begin {
        return Err(format!(
            "tensor `{name}`: shape {shape:?} of {dtype} needs {bytes} bytes but data_offsets [{begin}, {end}] give {}",
            end - begin
        ));
    }
    // Cannot overflow: end <= data_len and data_start + data_len == file length.
    Ok(TensorEntry { name, dtype, shape, range: data_start + begin..data_start + end })
}

/// Parse `model.safetensors.index.json`: its `weight_map` as (tensor, shard file) pairs in file
/// order. Shard names must be plain file names (no directories), so an index cannot point outside
/// the model's folder.
pub fn parse_index(json: &[u8]) -> Result<Vec<(String, String)>, String> {
    #[derive(serde::Deserialize)]
    struct IndexFile {
        weight_map: Entries,
    }
    let idx: IndexFile = serde_json::from_slice(json).map_err(|e| format!("invalid index JSON: {e}"))?;
    no_duplicates(idx.weight_map.0.iter().map(|(k, _)| k.as_str()), "weight_map tensor")?;
    idx.weight_map
        .0
        .into_iter()
        .map(|(tensor, v)| {
            let shard = v.as_str().ok_or_else(|| format!("weight_map: `{tensor}` does not map to a file name"))?;
            if shard.is_empty() || shard == "." || shard == ".." || shard.contains(['/', '\\']) {
                return Err(format!("weight_map: `{tensor}` maps to `{shard}`, which is not a plain file name"));
            }
            Ok((tensor, shard.to_string()))
        })
        .collect()
}

//! Helpers shared by the `source_*` tests: fixture paths, a temp folder, and an independent
//! safetensors writer/reader (written from the format description, not with the code under test).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Map, Value};

pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("PUREHW_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures")))
}

pub fn tiny_dir() -> PathBuf {
    fixtures_dir().join("tiny-gemma3")
}

pub fn models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PUREHW_MODELS") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("neither XDG_CACHE_HOME nor HOME is set");
    cache.join("purehw/models")
}

/// The model file; panics when it is absent.
pub fn model_file(rel: &str) -> Option<PathBuf> {
    let path = models_dir().join(rel);
    if path.exists() {
        return Some(path);
    }
    // A missing model is a failure, never a silent skip: CI pulls the models first.
    panic!("{} is missing: run `purehw pull` first", path.display())
}

pub fn shared(v: Vec<u8>) -> Arc<dyn AsRef<[u8]> + Send + Sync> {
    Arc::new(v)
}

/// A fresh folder under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "purehw-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One tensor as stored: name, dtype name, shape, bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Raw {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Read a safetensors file with serde_json only (header order kept).
pub fn read_raw(bytes: &[u8]) -> Vec<Raw> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let hdr: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out: Vec<Raw> = hdr
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(name, v)| {
            let o = &v["data_offsets"];
            let (b, e) = (o[0].as_u64().unwrap() as usize, o[1].as_u64().unwrap() as usize);
            Raw {
                name,
                dtype: v["dtype"].as_str().unwrap().to_string(),
                shape: v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect(),
                data: data[b..e].to_vec(),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Write tensors as a safetensors file (contiguous, in the given order; header padded to 8 bytes).
pub fn write_raw(tensors: &[Raw]) -> Vec<u8> {
    let mut hdr = Map::new();
    hdr.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0usize;
    for t in tensors {
        hdr.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + t.data.len()]}),
        );
        off += t.data.len();
    }
    let mut json = serde_json::to_vec(&Value::Object(hdr)).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    with_header(&json, tensors.iter().flat_map(|t| t.data.iter().copied()).collect())
}

/// A file from a header text and a data section, as given (for malformed cases).
pub fn with_header(json: &[u8], data: Vec<u8>) -> Vec<u8> {
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json);
    out.extend(data);
    out
}

pub fn tiny_config_json() -> String {
    std::fs::read_to_string(tiny_dir().join("config.json")).unwrap()
}

pub fn tiny_bytes() -> Vec<u8> {
    std::fs::read(tiny_dir().join("model.safetensors")).unwrap()
}

//! Shared helpers for conformance tests: where fixtures and models are, f32 files, NMSE; the
//! op matrix ([`matrix`]) and the model-level checks ([`golden`]).
#![forbid(unsafe_code)]

use std::path::PathBuf;

/// `../shared/fixtures` beside the project root, or `$PUREHW_FIXTURES`.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("PUREHW_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures")),
    }
}

/// A fixture file or folder; panics with a clear message if it is missing (tests only).
pub fn fixture(rel: &str) -> PathBuf {
    let p = fixtures_dir().join(rel);
    assert!(p.exists(), "fixture {} not found (set PUREHW_FIXTURES?)", p.display());
    p
}

/// The model cache: `$PUREHW_MODELS`, else `$XDG_CACHE_HOME/purehw/models`, else `~/.cache/purehw/models`.
pub fn models_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PUREHW_MODELS") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
    base.join("purehw").join("models")
}

/// A cached model file, e.g. `model_file("gemma3-270m", "gemma-3-270m-q4_k_m.gguf")`.
/// Panics with the command to fetch it when absent.
pub fn model_file(model: &str, file: &str) -> PathBuf {
    let p = models_dir().join(model).join(file);
    assert!(p.exists(), "{} not found: run `purehw pull {model}` first", p.display());
    p
}

/// Little-endian f32 file.
pub fn read_f32(path: &std::path::Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Normalised mean squared error `Σ(a−b)² / Σb²`, in f64; NaN/Inf in `a` gives +inf.
pub fn nmse(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    if a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    num / den.max(f64::MIN_POSITIVE)
}

/// [`nmse`] over the elements finite in both (for comparisons that check NaN/Inf apart).
pub fn nmse_finite(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b).filter(|(x, y)| x.is_finite() && y.is_finite()) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    num / den.max(f64::MIN_POSITIVE)
}

/// Index of the largest value (first one on ties, like torch.argmax).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// The two largest values' gap, for messages when a greedy run diverges.
pub fn top2_gap(x: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in x {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    a - b
}

/// Read a JSON file.
pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    let s = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub mod golden;
pub mod matrix;

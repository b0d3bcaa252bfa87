//! The GGUF parser and the scalar dequantizers against gguf-py 0.19 `dequantize` on real files:
//! for one tensor of each block type, the type, shape and data offset must match, the first values
//! bit for bit, the sha256 of the whole tensor as little-endian f32 exactly, and the sum closely.

use purehw_conformance::{fixture, model_file, read_json};
use purehw_core::gguf;
use purehw_kernels::quant::dequantize_row;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn check_file(vectors: &str, model: &str, file: &str) {
    let spec = read_json(&fixture(vectors));
    assert_eq!(spec["file"].as_str(), Some(file), "{vectors}: describes another file");
    let path = model_file(model, file);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let gg = gguf::parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));

    let tensors = spec["tensors"].as_array().expect("tensors array");
    assert!(!tensors.is_empty());
    for t in tensors {
        check_tensor(file, &bytes, &gg, t);
    }
}

fn check_tensor(file: &str, bytes: &[u8], gg: &gguf::GgufFile, want: &Value) {
    let name = want["tensor"].as_str().expect("tensor name");
    let ctx = format!("{file}: {name}");
    let info = gg.tensor(name).unwrap_or_else(|| panic!("{ctx}: not in the file"));

    assert_eq!(info.format.name(), want["type"].as_str().unwrap(), "{ctx}: type");
    let shape: Vec<u64> = want["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
    assert_eq!(info.dims, shape, "{ctx}: shape (ggml order)");
    assert_eq!(info.n_elements(), want["n_elements"].as_u64().unwrap(), "{ctx}: element count");
    // The fixture's `offset_in_data` is gguf-py's `ReaderTensor.data_offset`: despite its name, the
    // absolute offset in the file (data section start + the stored offset).
    assert_eq!(
        info.start as u64,
        want["offset_in_data"].as_u64().unwrap(),
        "{ctx}: data offset (data section starts at {}, stored offset {})",
        gg.data_start,
        info.offset_in_data(gg)
    );

    // Dequantize row by row, streaming into the hash and the sum.
    let cols = info.dims[0] as usize;
    let row_bytes = info.format.bytes_for(cols).unwrap_or_else(|| panic!("{ctx}: bad row length"));
    let data = info.data(bytes).unwrap_or_else(|| panic!("{ctx}: data out of range"));
    assert_eq!(data.len() % row_bytes, 0, "{ctx}: data is not whole rows");

    let first_want: Vec<f32> = want["first"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let mut first = Vec::with_capacity(first_want.len());
    let mut hasher = Sha256::new();
    let (mut sum, mut abs_sum) = (0f64, 0f64);
    let mut row = vec![0f32; cols];
    let mut le = Vec::with_capacity(cols * 4);
    for r in data.chunks_exact(row_bytes) {
        dequantize_row(info.format, r, &mut row);
        let need = first_want.len() - first.len();
        first.extend_from_slice(&row[..need.min(cols)]);
        le.clear();
        for &v in &row {
            le.extend_from_slice(&v.to_le_bytes());
            sum += v as f64;
            abs_sum += (v as f64).abs();
        }
        hasher.update(&le);
    }

    assert_eq!(first.len(), first_want.len(), "{ctx}: tensor shorter than the reference prefix");
    for (i, (g, w)) in first.iter().zip(&first_want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{ctx}: element {i}: got {g:e}, gguf-py {w:e}");
    }

    let sha = format!("{:x}", hasher.finalize());
    assert_eq!(sha, want["sha256_f32le"].as_str().unwrap(), "{ctx}: sha256 of the dequantized tensor");

    // The reference sum's own accumulation order is unknown; allow f32-level rounding of Σ|x|.
    let want_sum = want["sum"].as_f64().unwrap();
    let tol = 1e-6 * abs_sum.max(1.0);
    assert!((sum - want_sum).abs() <= tol, "{ctx}: sum {sum} vs {want_sum} (tolerance {tol:e})");
}

#[test]
fn gemma3_270m_q4_k_m() {
    check_file("gguf-vectors/gemma3-270m.json", "gemma3-270m", "gemma-3-270m-q4_k_m.gguf");
}

#[test]
fn smollm2_135m_q4_1() {
    check_file("gguf-vectors/smollm2-135m.json", "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf");
}

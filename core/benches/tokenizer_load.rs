//! Tokenizer load and encode times (best of 5), for the cached models:
//! `cargo bench -p purehw-core --bench tokenizer_load`.

use std::path::PathBuf;
use std::time::Instant;

use purehw_core::gguf;
use purehw_core::tokenizer::Tokenizer;

fn models_dir() -> PathBuf {
    std::env::var_os("PUREHW_MODELS").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
        cache.join("purehw/models")
    })
}

fn best(f: &dyn Fn()) -> String {
    let mut wall = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        f();
        wall = wall.min(t.elapsed().as_secs_f64() * 1e3);
    }
    format!("{wall:.1} ms")
}

fn main() {
    let dir = models_dir();
    let text = "The capital of France is Paris. 日本の首都は東京です。 def f(n):\n    return n * 2\n".repeat(1000);
    for rel in ["gemma3-270m/gemma-3-270m-q4_k_m.gguf", "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"] {
        let Ok(bytes) = std::fs::read(dir.join(rel)) else {
            eprintln!("{rel}: not cached (purehw pull)");
            continue;
        };
        let file = gguf::parse(&bytes).expect("GGUF parses");
        println!("{rel}: Tokenizer::from_gguf {}", best(&|| drop(Tokenizer::from_gguf(rel, &file).unwrap())));
        let tok = Tokenizer::from_gguf(rel, &file).unwrap();
        println!("{rel}: encode {} KB {}", text.len() / 1024, best(&|| drop(tok.encode(&text, false).unwrap())));
    }
    let json = dir.join("gemma3-270m/tokenizer.json");
    if json.exists() {
        println!(
            "gemma3 tokenizer.json: Tokenizer::from_file {}",
            best(&|| drop(Tokenizer::from_file(&json).unwrap()))
        );
    }
}

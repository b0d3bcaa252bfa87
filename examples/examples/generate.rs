//! The smallest program that loads a model and streams tokens through purehw's public API.
//!
//!     cargo run --release -p purehw-examples --example generate -- MODEL TOKENIZER "Once upon a time"
//!
//! MODEL is a .gguf file or an HF checkpoint folder; TOKENIZER a tokenizer.json, or `-` to build
//! the tokenizer from the GGUF's own vocabulary.

use std::io::Write;
use std::path::Path;

use purehw_core::model::{Model, ModelOptions, generate};
use purehw_core::sampling::{Sampler, SamplingParams};
use purehw_core::source::ModelSource;
use purehw_core::tokenizer::Tokenizer;
use purehw_hal_cpu_ref::CpuRef;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model_path, tok_path, prompt] = &args[..] else {
        return Err("usage: generate MODEL TOKENIZER|- PROMPT".into());
    };

    // Open the weights (memory-mapped) and the tokenizer.
    let src = ModelSource::open(Path::new(model_path))?;
    let tok = match (tok_path.as_str(), src.gguf()) {
        ("-", Some(gguf)) => Tokenizer::from_gguf(model_path, gguf)?,
        _ => Tokenizer::from_file(Path::new(tok_path))?,
    };

    // Load onto a backend; any `purehw_hal::Backend` works here.
    let mut model = Model::load(CpuRef::new(), &src, ModelOptions::default())?;

    // Tokenize, then sample (temperature 0.7, seeded) and print each piece as it arrives.
    let ids = tok.encode(prompt, src.config.add_bos)?;
    let params = SamplingParams { temperature: 0.7, top_p: 0.95, seed: 42, ..Default::default() };
    let mut sampler = Sampler::new(params, src.config.vocab);
    let mut stream = tok.decode_stream();
    print!("{prompt}");
    generate(&mut model, &ids, 64, &mut sampler, true, |id| {
        if let Ok(Some(text)) = stream.step(id) {
            print!("{text}");
            let _ = std::io::stdout().flush();
        }
        true
    })?;
    println!();
    Ok(())
}

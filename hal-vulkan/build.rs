//! Compiles `../shaders/*.comp` (GLSL 4.60 compute shaders, `#include "common/…"` resolved here)
//! to SPIR-V with glslang 15.1, built from source by the `glslang` crate with `cc` alone, and
//! writes `$OUT_DIR/shaders.rs`: one `include_bytes!` per variant, embedded in the binary.
//!
//! A shader is compiled once per variant its `// variants:` line names: `KEY=A|B|C` gives one
//! variant per value, with `KEY` defined to the value (e.g. `FMT=Q4_0|Q8_0` defines
//! `FMT_Q4_0`-style names through `#define FMT FMT_Q4_0`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../shaders");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed={}", root.display());
    let compiler = glslang::Compiler::acquire().expect("glslang initialises");
    let mut table =
        String::from("/// (name, SPIR-V) of every compiled shader variant.\npub static SPIRV: &[(&str, &[u8])] = &[\n");
    let mut files: Vec<_> = std::fs::read_dir(&root)
        .expect("shaders/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "comp"))
        .collect();
    files.sort();
    for path in files {
        println!("cargo:rerun-if-changed={}", path.display());
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let source = resolve_includes(&root, &text, &path, 0);
        // A shader using the exact division or square root also gets an `.x64` twin of each
        // variant that settles their rounding in f64 (`exact.glsl`), for devices with
        // shaderFloat64.
        let x64 = EXACT_USERS.iter().any(|f| text.contains(f));
        for (suffix, defines) in variants(&text) {
            let name = if suffix.is_empty() { stem.clone() } else { format!("{stem}.{suffix}") };
            let mut builds = vec![(name.clone(), defines.clone())];
            if x64 {
                let mut d = defines;
                d.push(("EXACT_F64".to_string(), "1".to_string()));
                builds.push((format!("{name}.x64"), d));
            }
            for (name, defines) in builds {
                let words = compile(compiler, &name, &source, &defines);
                let file = out.join(format!("{name}.spv"));
                let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                std::fs::write(&file, bytes).unwrap();
                writeln!(table, "    ({name:?}, include_bytes!({:?})),", file.display().to_string()).unwrap();
            }
        }
    }
    table.push_str("];\n");
    std::fs::write(out.join("shaders.rs"), table).unwrap();
}

/// What a shader calls that `exact.glsl` makes exact: its division and square root, directly or
/// through the functions and row routines built on them.
const EXACT_USERS: &[&str] = &[
    "div_rn",
    "sqrt_rn",
    "tanh_ref",
    "silu_ref",
    "gelu_ref",
    "softcap_ref",
    "quantize_seg",
    "quantize_row",
    "row_rms_inv",
];

/// The variants a shader's `// variants: KEY=A|B` line asks for: (name suffix, defines).
fn variants(text: &str) -> Vec<(String, Vec<(String, String)>)> {
    let Some(line) = text.lines().find_map(|l| l.trim().strip_prefix("// variants:")) else {
        return vec![(String::new(), Vec::new())];
    };
    let mut out = vec![(String::new(), Vec::new())];
    for spec in line.split_whitespace() {
        let (key, values) = spec.split_once('=').expect("KEY=A|B");
        let mut next = Vec::new();
        for (suffix, defs) in &out {
            for v in values.split('|') {
                let s = if suffix.is_empty() { v.to_string() } else { format!("{suffix}.{v}") };
                let mut d = defs.clone();
                // A number is defined as itself; a name as KEY_NAME (compared against #defines).
                let val = if v.parse::<i64>().is_ok() { v.to_string() } else { format!("{key}_{v}") };
                d.push((key.to_string(), val));
                next.push((s, d));
            }
        }
        out = next;
    }
    out
}

/// Inline `#include "file"` lines (relative to `shaders/`), keeping line numbers readable.
fn resolve_includes(root: &Path, text: &str, from: &Path, depth: usize) -> String {
    assert!(depth < 8, "{}: includes nest too deep", from.display());
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(rest) = line.trim().strip_prefix("#include") {
            let name = rest.trim().trim_matches('"');
            let path = root.join(name);
            println!("cargo:rerun-if-changed={}", path.display());
            let inc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {name}: {e}", from.display()));
            out.push_str(&resolve_includes(root, &inc, &path, depth + 1));
            writeln!(out, "#line {}", i + 2).unwrap();
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn compile(compiler: &glslang::Compiler, name: &str, source: &str, defines: &[(String, String)]) -> Vec<u32> {
    use glslang::*;
    let src = ShaderSource::from(source.to_string());
    let defs: Vec<(&str, Option<&str>)> = defines.iter().map(|(k, v)| (k.as_str(), Some(v.as_str()))).collect();
    let input = ShaderInput::new(
        &src,
        ShaderStage::Compute,
        &CompilerOptions {
            source_language: SourceLanguage::GLSL,
            target: Target::Vulkan { version: VulkanVersion::Vulkan1_2, spirv_version: SpirvVersion::SPIRV1_5 },
            version_profile: None,
            messages: ShaderMessage::DEFAULT,
        },
        Some(&defs),
        None,
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    let shader = Shader::new(compiler, input).unwrap_or_else(|e| panic!("shader {name}: {e}"));
    let mut program = compiler.create_program();
    program.add_shader(&shader);
    program.compile(ShaderStage::Compute).unwrap_or_else(|e| panic!("shader {name}: {e}"))
}

//! compressed-tensors checkpoints: the fixtures load as `Format::Int` weights, and every broken
//! part or unsupported scheme is an error naming the tensor (or the config field), never a panic.

mod source_common;

use purehw_core::Error;
use purehw_core::source::{ModelSource, Role};
use purehw_hal::{Codes, Format, PackedInt, ScaleType};
use serde_json::Value;
use source_common::*;

const Q: &str = "model.layers.0.self_attn.q_proj";

fn fixture(v: &str) -> (String, Vec<Raw>) {
    let dir = fixtures_dir().join("compressed-tensors").join(v);
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    (config, read_raw(&std::fs::read(dir.join("model.safetensors")).unwrap()))
}

fn open(config: &str, tensors: &[Raw]) -> Result<ModelSource, Error> {
    ModelSource::from_safetensors("ct", config, vec![("model.safetensors".into(), shared(write_raw(tensors)))])
}

/// Layer 0's q_proj from a checkpoint, or the error.
fn q_proj(config: &str, tensors: &[Raw]) -> Result<purehw_hal::HostWeight, Error> {
    open(config, tensors)?.weight(Role::AttnQ, Some(0)).map(|w| w.expect("q_proj"))
}

#[track_caller]
fn expect_err(r: Result<impl std::fmt::Debug, Error>, want: &[&str]) {
    match r {
        Err(e @ Error::Format { .. }) => {
            let msg = e.to_string();
            for w in want {
                assert!(msg.contains(w), "`{msg}` lacks `{w}`");
            }
        }
        Err(e) => panic!("not a format error: {e}"),
        Ok(v) => panic!("accepted (want {want:?}): {v:?}"),
    }
}

/// The config with `f` applied to its quantization_config.
fn edit_config(config: &str, f: impl FnOnce(&mut Value)) -> String {
    let mut v: Value = serde_json::from_str(config).unwrap();
    f(&mut v["quantization_config"]);
    v.to_string()
}

fn edit(tensors: &[Raw], name: &str, f: impl FnOnce(&mut Raw)) -> Vec<Raw> {
    let mut t = tensors.to_vec();
    f(t.iter_mut().find(|t| t.name == name).unwrap_or_else(|| panic!("no {name}")));
    t
}

fn without(tensors: &[Raw], name: &str) -> Vec<Raw> {
    tensors.iter().filter(|t| t.name != name).cloned().collect()
}

#[test]
fn fixtures_load_as_packed_int() {
    let want = [("w4a16-g32", 4, Some(32), true), ("w4a16-g32-asym", 4, Some(32), false), ("w8a16-ch", 8, None, true)];
    for (v, bits, group, symmetric) in want {
        let (config, tensors) = fixture(v);
        let src = open(&config, &tensors).unwrap_or_else(|e| panic!("{e}"));
        let w = src.weight(Role::FfnDown, Some(5)).unwrap().unwrap();
        let p = PackedInt { bits, codes: Codes::Packed, group, symmetric, scale: ScaleType::BF16 };
        assert_eq!((w.format, w.rows, w.cols), (Format::Int(p), 64, 160), "{v}");
        // Not targeted (an Embedding) or not quantized: plain bf16.
        assert_eq!(src.weight(Role::TokenEmbd, None).unwrap().unwrap().format, Format::BF16);
        assert_eq!(src.weight(Role::AttnNorm, Some(0)).unwrap().unwrap().format, Format::BF16);
    }
}

#[test]
fn broken_parts_name_the_tensor() {
    let (config, t) = fixture("w4a16-g32-asym");
    let scale = format!("{Q}.weight_scale");
    let packed = format!("{Q}.weight_packed");
    let zp = format!("{Q}.weight_zero_point");
    let shape = format!("{Q}.weight_shape");
    for part in [&scale, &packed, &zp, &shape] {
        expect_err(q_proj(&config, &without(&t, part)), &["missing tensor", part]);
    }
    let bad = edit(&t, &scale, |r| {
        r.shape = vec![128, 1];
        r.data.truncate(256);
    });
    expect_err(q_proj(&config, &bad), &[&scale, "shape [128, 1], expected [128, 2]"]);
    let bad = edit(&t, &scale, |r| r.dtype = "I16".into());
    expect_err(q_proj(&config, &bad), &[&scale, "dtype I16"]);
    let bad = edit(&t, &packed, |r| {
        r.shape = vec![128, 7];
        r.data.truncate(128 * 7 * 4);
    });
    expect_err(q_proj(&config, &bad), &[&packed, "shape [128, 7], expected [128, 8]"]);
    let bad = edit(&t, &shape, |r| r.data[8..16].copy_from_slice(&72i64.to_le_bytes()));
    expect_err(q_proj(&config, &bad), &[&shape, "[128, 72]"]);
    let bad = edit(&t, &zp, |r| {
        r.shape = vec![15, 2];
        r.data.truncate(15 * 2 * 4);
    });
    expect_err(q_proj(&config, &bad), &[&zp, "expected I32 [16, 2]"]);
    let extra = Raw { name: format!("{Q}.weight_g_idx"), dtype: "I32".into(), shape: vec![64], data: vec![0; 256] };
    expect_err(q_proj(&config, &[t.clone(), vec![extra]].concat()), &["weight_g_idx", "not supported"]);
    // A zero point in a symmetric scheme.
    let (sym_config, sym) = fixture("w4a16-g32");
    let zp_raw = t.iter().find(|r| r.name == zp).unwrap().clone();
    expect_err(q_proj(&sym_config, &[sym, vec![zp_raw]].concat()), &[&zp, "symmetric"]);
}

/// Zero points written one per (row, group) (older writers) load like the packed ones; a value
/// outside the 4-bit range is an error naming the tensor and the element.
#[test]
fn unpacked_zero_points() {
    let (config, t) = fixture("w4a16-g32-asym");
    let zp = format!("{Q}.weight_zero_point");
    let packed = &t.iter().find(|r| r.name == zp).unwrap().data;
    let words: Vec<u32> = packed.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    let vals: Vec<i32> =
        (0..128 * 2).map(|i| ((words[(i / 2 / 8) * 2 + i % 2] >> (4 * ((i / 2) % 8))) & 0xF) as i32 - 8).collect();
    let unpacked = |vals: &[i32]| {
        edit(&t, &zp, |r| {
            r.shape = vec![128, 2];
            r.data = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        })
    };
    let a = q_proj(&config, &t).unwrap();
    let b = q_proj(&config, &unpacked(&vals)).unwrap();
    let (mut ra, mut rb) = (vec![0f32; 64], vec![0f32; 64]);
    for r in 0..128 {
        a.dequantize_row(r, &mut ra);
        b.dequantize_row(r, &mut rb);
        assert_eq!(ra, rb, "row {r}");
    }
    let mut out = vals.clone();
    out[2 * 5 + 1] = 8;
    expect_err(q_proj(&config, &unpacked(&out)), &[&zp, "value 8 at [5, 1] is out of range"]);
}

#[test]
fn ignore_and_targets_are_honoured() {
    let (config, t) = fixture("w4a16-g32");
    // Ignored or not targeted: the module must be a plain `.weight`.
    let ignored = edit_config(&config, |q| q["ignore"] = serde_json::json!(["lm_head", "re:.*q_proj$"]));
    expect_err(q_proj(&ignored, &t), &["missing tensor", &format!("{Q}.weight`")]);
    let mlp_only =
        edit_config(&config, |q| q["config_groups"]["group_0"]["targets"] = serde_json::json!(["re:.*mlp\\..*"]));
    expect_err(q_proj(&mlp_only, &t), &["missing tensor", &format!("{Q}.weight`")]);
    let src = open(&mlp_only, &t).unwrap();
    assert!(matches!(src.weight(Role::FfnUp, Some(0)).unwrap().unwrap().format, Format::Int(_)));
    // Targeted by exact module name.
    let by_name = edit_config(&config, |q| q["config_groups"]["group_0"]["targets"] = serde_json::json!([Q]));
    assert!(matches!(q_proj(&by_name, &t).unwrap().format, Format::Int(_)));
}

#[test]
fn unsupported_schemes_are_refused_at_open() {
    let (config, t) = fixture("w4a16-g32");
    let weights = |k: &str, v: Value| {
        let k = k.to_string();
        edit_config(&config, move |q| q["config_groups"]["group_0"]["weights"][k] = v)
    };
    let cases: Vec<(String, &str)> = vec![
        (weights("num_bits", 2.into()), "num_bits"),
        (weights("type", "float".into()), "type `float`"),
        (weights("strategy", "tensor".into()), "strategy"),
        (weights("group_size", 0.into()), "group_size"),
        (weights("actorder", "group".into()), "actorder"),
        (
            edit_config(&config, |q| q["config_groups"]["group_0"]["format"] = "float-quantized".into()),
            "float-quantized",
        ),
        (edit_config(&config, |q| q["quant_method"] = "gptq".into()), "unsupported quantization `gptq`"),
        (
            edit_config(&config, |q| q["config_groups"]["group_0"]["targets"] = serde_json::json!(["re:(a|b)"])),
            "pattern",
        ),
    ];
    for (c, want) in cases {
        expect_err(open(&c, &t).map(|_| ()), &["ct/config.json", want]);
    }
    // A group that does not divide the columns (64 and 160): an error on the module.
    let g48 = weights("group_size", 48.into());
    expect_err(q_proj(&g48, &t), &[Q, "group size 48 does not divide its 64 columns"]);
}

/// `int-quantized`: the raw int8 `weight` and its scales.
#[test]
fn int_quantized_int8() {
    let (config, t) = fixture("w8a16-ch");
    let config = edit_config(&config, |q| {
        q["format"] = "int-quantized".into();
        q["config_groups"]["group_0"]["format"] = "int-quantized".into();
    });
    // Rewrite every packed weight as `weight` int8: byte i is q + 128.
    let mut out = Vec::new();
    for r in &t {
        if let Some(m) = r.name.strip_suffix(".weight_packed") {
            let data = r.data.iter().map(|b| b.wrapping_sub(128)).collect();
            out.push(Raw {
                name: format!("{m}.weight"),
                dtype: "I8".into(),
                shape: vec![r.shape[0], r.shape[1] * 4],
                data,
            });
        } else if !r.name.ends_with(".weight_shape") {
            out.push(r.clone());
        }
    }
    let a = q_proj(&edit_config(&fixture("w8a16-ch").0, |_| {}), &t).unwrap();
    let b = q_proj(&config, &out).unwrap();
    assert!(matches!(b.format, Format::Int(PackedInt { codes: Codes::I8, .. })));
    let (mut ra, mut rb) = (vec![0f32; 64], vec![0f32; 64]);
    for r in 0..128 {
        a.dequantize_row(r, &mut ra);
        b.dequantize_row(r, &mut rb);
        assert_eq!(ra, rb, "row {r}");
    }
    let bad = edit(&out, &format!("{Q}.weight"), |r| r.dtype = "U8".into());
    expect_err(q_proj(&config, &bad), &[&format!("{Q}.weight"), "dtype U8"]);
}

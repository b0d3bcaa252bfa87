//! `gguf::parse` on arbitrary bytes: must return Ok or Err, never panic or read out of bounds;
//! every tensor range it accepts must lie inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = purehw_core::gguf::parse(data) {
        for t in &f.tensors {
            assert!(t.start.checked_add(t.len).is_some_and(|e| e <= data.len()));
        }
    }
});

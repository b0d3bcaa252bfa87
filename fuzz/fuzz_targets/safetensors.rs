//! The safetensors header and index parsers on arbitrary bytes: Ok or Err, never a panic; every
//! accepted tensor lies inside the input and the tensors tile the data section.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = purehw_core::safetensors::parse(data) {
        let mut end = h.data_start;
        for t in &h.tensors {
            assert_eq!(t.range.start, end);
            end = t.range.end;
        }
        assert_eq!(end, data.len());
    }
    let _ = purehw_core::safetensors::parse_index(data);
});

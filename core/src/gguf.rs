//! GGUF v3 (and v2) parsing from any `&[u8]`: metadata, tensor table, validated data ranges.
//!
//! Layout (little-endian, ggml `docs/gguf.md`): magic `"GGUF"`, version u32, tensor count u64,
//! metadata count u64, the metadata (key string, value type u32, value), the tensor table (name,
//! n_dims u32, dims u64 each, ggml type u32, offset u64), then the data section at the next
//! multiple of `general.alignment` (default 32). Strings are a u64 length and UTF-8 bytes.
//!
//! `parse` never panics and never reads out of bounds: every length read from the file is checked
//! against the bytes that remain before anything is allocated from it.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use purehw_kernels::Format;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Array),
}

/// A metadata array, kept typed so a 262k-entry vocabulary stays compact.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    /// Arrays of arrays (rare); kept so the file still parses.
    Array(Vec<Array>),
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub format: Format,
    /// ggml order: `dims[0]` is the fastest-varying (columns of a matrix).
    pub dims: Vec<u64>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    /// Number of elements (product of `dims`; `parse` checked it fits).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Start relative to the data section, as stored in the file.
    pub fn offset_in_data(&self, file: &GgufFile) -> usize {
        self.start - file.data_start
    }

    /// This tensor's bytes in `bytes` (the buffer that was parsed), or `None` for another buffer
    /// that is too short.
    pub fn data<'a>(&self, bytes: &'a [u8]) -> Option<&'a [u8]> {
        bytes.get(self.start..self.start.checked_add(self.len)?)
    }
}

/// A parsed GGUF file (metadata and tensor table; tensor data stays in the caller's bytes).
#[derive(Clone, Debug, PartialEq)]
pub struct GgufFile {
    pub version: u32,
    /// In file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: usize,
    /// Absolute offset of the data section.
    pub data_start: usize,
}

/// Default `general.alignment`.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// Arrays of arrays deeper than this are refused (a hostile file could otherwise recurse deeply).
const MAX_ARRAY_NESTING: usize = 8;

/// The ggml name of a type id (`"Q4_K"`, `"IQ2_XXS"`, …), supported or not; `None` if unknown.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// The ggml type ids purehw supports, with their [`Format`]s.
const GGML_FORMATS: [(u32, Format); 11] = [
    (0, Format::F32),
    (1, Format::F16),
    (2, Format::Q4_0),
    (3, Format::Q4_1),
    (6, Format::Q5_0),
    (7, Format::Q5_1),
    (8, Format::Q8_0),
    (12, Format::Q4_K),
    (13, Format::Q5_K),
    (14, Format::Q6_K),
    (30, Format::BF16),
];

/// The [`Format`] of a ggml type id, when purehw supports it.
pub fn format_from_ggml(id: u32) -> Option<Format> {
    GGML_FORMATS.iter().find(|&&(i, _)| i == id).map(|&(_, f)| f)
}

/// The ggml type id of a [`Format`] (for writers and tests).
pub fn ggml_type_of(format: Format) -> Option<u32> {
    GGML_FORMATS.iter().find(|&&(_, f)| f == format).map(|&(i, _)| i)
}

/// A bounds-checked cursor. Errors say what was short and where; callers add which key or tensor.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.b.len().saturating_sub(self.pos)
    }

    fn bytes(&mut self, n: u64) -> Result<&'a [u8], String> {
        let s = usize::try_from(n).ok().and_then(|n| self.b.get(self.pos..)?.get(..n)).ok_or_else(|| {
            format!("truncated: {n} bytes needed at offset {} but only {} remain", self.pos, self.remaining())
        })?;
        self.pos += s.len();
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let s = self.bytes(N as u64)?;
        s.try_into().map_err(|_| String::from("truncated"))
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }

    /// A u64 length, then that many UTF-8 bytes.
    fn string(&mut self) -> Result<String, String> {
        let at = self.pos;
        let len = self.u64().map_err(|e| format!("string length: {e}"))?;
        let rem = self.remaining();
        let s = self.bytes(len).map_err(|_| {
            format!("string of {len} bytes at offset {at} runs past the end of the file ({rem} bytes remain)")
        })?;
        core::str::from_utf8(s).map(String::from).map_err(|e| format!("invalid UTF-8 in string at offset {at}: {e}"))
    }

    /// `n` fixed-size elements; `n` is checked against the remaining bytes before allocating.
    fn fixed<const S: usize, T>(&mut self, n: u64, f: impl Fn([u8; S]) -> T) -> Result<Vec<T>, String> {
        let total = n.checked_mul(S as u64).ok_or_else(|| format!("array of {n} elements is too large"))?;
        let s = self.bytes(total)?;
        let (elems, _) = s.as_chunks::<S>();
        Ok(elems.iter().map(|&e| f(e)).collect())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.array().map(i8::from_le_bytes)?),
            2 => Value::U16(self.array().map(u16::from_le_bytes)?),
            3 => Value::I16(self.array().map(i16::from_le_bytes)?),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.array().map(i32::from_le_bytes)?),
            6 => Value::F32(self.array().map(f32::from_le_bytes)?),
            7 => Value::Bool(bool_of(self.u8()?)?),
            8 => Value::String(self.string()?),
            9 => Value::Array(self.array_value(depth + 1)?),
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.array().map(i64::from_le_bytes)?),
            12 => Value::F64(self.array().map(f64::from_le_bytes)?),
            _ => return Err(format!("unknown value type {ty}")),
        })
    }

    fn array_value(&mut self, depth: usize) -> Result<Array, String> {
        if depth > MAX_ARRAY_NESTING {
            return Err(format!("arrays nested more than {MAX_ARRAY_NESTING} deep"));
        }
        let ty = self.u32().map_err(|e| format!("array type: {e}"))?;
        let n = self.u64().map_err(|e| format!("array length: {e}"))?;
        // The smallest encoding of one element bounds how many can fit in what is left.
        let min_elem: u64 = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            _ => return Err(format!("array of unknown value type {ty}")),
        };
        let rem = self.remaining() as u64;
        if n > rem / min_elem {
            return Err(format!("array of {n} elements runs past the end of the file ({rem} bytes remain)"));
        }
        Ok(match ty {
            0 => Array::U8(self.fixed(n, |[b]: [u8; 1]| b)?),
            1 => Array::I8(self.fixed(n, i8::from_le_bytes)?),
            2 => Array::U16(self.fixed(n, u16::from_le_bytes)?),
            3 => Array::I16(self.fixed(n, i16::from_le_bytes)?),
            4 => Array::U32(self.fixed(n, u32::from_le_bytes)?),
            5 => Array::I32(self.fixed(n, i32::from_le_bytes)?),
            6 => Array::F32(self.fixed(n, f32::from_le_bytes)?),
            7 => Array::Bool(self.fixed(n, |[b]: [u8; 1]| b)?.into_iter().map(bool_of).collect::<Result<_, _>>()?),
            10 => Array::U64(self.fixed(n, u64::from_le_bytes)?),
            11 => Array::I64(self.fixed(n, i64::from_le_bytes)?),
            12 => Array::F64(self.fixed(n, f64::from_le_bytes)?),
            8 => {
                let mut v = Vec::with_capacity(initial_capacity(n));
                for i in 0..n {
                    v.push(self.string().map_err(|e| format!("element {i}: {e}"))?);
                }
                Array::String(v)
            }
            _ => {
                let mut v = Vec::with_capacity(initial_capacity(n));
                for i in 0..n {
                    v.push(self.array_value(depth + 1).map_err(|e| format!("element {i}: {e}"))?);
                }
                Array::Array(v)
            }
        })
    }
}

/// Counts are already checked against the bytes left, but an element in memory can be several times
/// its encoded size: reserve at most this many up front and let larger vectors grow.
fn initial_capacity(n: u64) -> usize {
    n.min(1 << 16) as usize
}

fn bool_of(b: u8) -> Result<bool, String> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(format!("invalid bool byte {b} (must be 0 or 1)")),
    }
}

/// Parse `bytes` as GGUF. Errors are plain messages; callers prefix the file name.
pub fn parse(bytes: &[u8]) -> Result<GgufFile, String> {
    let mut r = Reader { b: bytes, pos: 0 };

    // Header.
    let magic = r.array::<4>().map_err(|_| String::from("not a GGUF file: shorter than its 4-byte magic"))?;
    if &magic != b"GGUF" {
        return Err(format!("not a GGUF file: magic is {magic:02x?}, expected \"GGUF\""));
    }
    let version = r.u32().map_err(|e| format!("header: version: {e}"))?;
    match version {
        2 | 3 => {}
        1 => return Err(String::from("GGUF version 1 is not supported (only 2 and 3)")),
        v if matches!(v.swap_bytes(), 2 | 3) => {
            return Err(String::from("big-endian GGUF files are not supported"));
        }
        v => return Err(format!("unsupported GGUF version {v} (only 2 and 3)")),
    }
    let tensor_count = r.u64().map_err(|e| format!("header: tensor count: {e}"))?;
    let kv_count = r.u64().map_err(|e| format!("header: metadata count: {e}"))?;
    // Smallest encodings: a key/value is 8 + 4 + 1 bytes, a tensor entry 8 + 4 + 8 + 4 + 8.
    let rem = r.remaining() as u64;
    if kv_count > rem / 13 {
        return Err(format!("header: {kv_count} metadata entries cannot fit in the {rem} bytes left"));
    }
    if tensor_count > rem / 32 {
        return Err(format!("header: {tensor_count} tensors cannot fit in the {rem} bytes left"));
    }

    // Metadata.
    let mut metadata = Vec::with_capacity(initial_capacity(kv_count));
    let mut keys = BTreeSet::new();
    for i in 0..kv_count {
        let key = r.string().map_err(|e| format!("metadata entry {i}: key: {e}"))?;
        let ty = r.u32().map_err(|e| format!("metadata '{key}': value type: {e}"))?;
        let value = r.value(ty, 0).map_err(|e| format!("metadata '{key}': {e}"))?;
        if !keys.insert(key.clone()) {
            return Err(format!("metadata '{key}': duplicate key"));
        }
        metadata.push((key, value));
    }
    let alignment = alignment_of(&metadata)?;

    // Tensor table.
    let mut infos = Vec::with_capacity(initial_capacity(tensor_count));
    let mut names = BTreeSet::new();
    for i in 0..tensor_count {
        let name = r.string().map_err(|e| format!("tensor {i}: name: {e}"))?;
        if !names.insert(name.clone()) {
            return Err(format!("tensor '{name}': duplicate tensor name"));
        }
        let info = tensor_entry(&mut r, alignment).map_err(|e| format!("tensor '{name}': {e}"))?;
        infos.push((name, info));
    }
    let data_start =
        r.pos.checked_next_multiple_of(alignment).ok_or_else(|| String::from("data section offset overflows"))?;

    // Data ranges.
    let mut tensors = Vec::with_capacity(infos.len());
    for (name, (format, dims, offset, len)) in infos {
        let start = usize::try_from(offset).ok().and_then(|o| data_start.checked_add(o));
        let end = start.and_then(|s| s.checked_add(len));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(format!("tensor '{name}': data offset {offset} overflows"));
        };
        if end > bytes.len() {
            return Err(format!(
                "tensor '{name}': data [{start}, {end}) runs past the end of the file ({} bytes)",
                bytes.len()
            ));
        }
        tensors.push(TensorInfo { name, format, dims, start, len });
    }
    let mut by_start: Vec<&TensorInfo> = tensors.iter().filter(|t| t.len > 0).collect();
    by_start.sort_by_key(|t| t.start);
    for w in by_start.windows(2) {
        if let [a, b] = w
            && b.start < a.start + a.len
        {
            return Err(format!(
                "tensors '{}' [{}, {}) and '{}' [{}, {}) overlap",
                a.name,
                a.start,
                a.start + a.len,
                b.name,
                b.start,
                b.start + b.len
            ));
        }
    }

    Ok(GgufFile { version, metadata, tensors, alignment, data_start })
}

/// `general.alignment`: an unsigned integer, a power of two; 32 when absent.
fn alignment_of(metadata: &[(String, Value)]) -> Result<usize, String> {
    const KEY: &str = "general.alignment";
    let Some((_, v)) = metadata.iter().find(|(k, _)| k == KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let a = match *v {
        Value::U8(a) => a as u64,
        Value::U16(a) => a as u64,
        Value::U32(a) => a as u64,
        Value::U64(a) => a,
        ref other => return Err(format!("metadata '{KEY}': expected an unsigned integer, got {other:?}")),
    };
    if a == 0 || !a.is_power_of_two() {
        return Err(format!("metadata '{KEY}': {a} is not a power of two"));
    }
    // Far larger than any real alignment; keeps offsets well inside usize.
    if a > 1 << 30 {
        return Err(format!("metadata '{KEY}': {a} is unreasonably large"));
    }
    Ok(a as usize)
}

/// One tensor entry after its name: `(format, dims, offset in data section, byte length)`.
fn tensor_entry(r: &mut Reader<'_>, alignment: usize) -> Result<(Format, Vec<u64>, u64, usize), String> {
    let n_dims = r.u32().map_err(|e| format!("n_dims: {e}"))?;
    if n_dims == 0 || n_dims as usize > MAX_DIMS {
        return Err(format!("{n_dims} dimensions (1 to {MAX_DIMS} supported)"));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for d in 0..n_dims {
        dims.push(r.u64().map_err(|e| format!("dimension {d}: {e}"))?);
    }
    let ty = r.u32().map_err(|e| format!("type: {e}"))?;
    let offset = r.u64().map_err(|e| format!("offset: {e}"))?;

    let format = format_from_ggml(ty).ok_or_else(|| match ggml_type_name(ty) {
        Some(name) => format!("unsupported ggml type {ty} ({name})"),
        None => format!("unknown ggml type {ty}"),
    })?;
    // ggml keeps dims as i64, so the element count must fit one.
    if dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d).filter(|&p| p <= i64::MAX as u64)).is_none() {
        return Err(format!("dims {dims:?}: element count overflows"));
    }
    let row = dims[0];
    let block = format.block_elems() as u64;
    if row % block != 0 {
        return Err(format!(
            "row of {row} elements is not a whole number of {} blocks ({block} elements each)",
            format.name()
        ));
    }
    let len = usize::try_from(row)
        .ok()
        .and_then(|r| format.bytes_for(r))
        .and_then(|row_bytes| dims[1..].iter().try_fold(row_bytes, |l, &d| l.checked_mul(usize::try_from(d).ok()?)))
        .ok_or_else(|| format!("dims {dims:?}: byte size overflows"))?;
    if offset % alignment as u64 != 0 {
        return Err(format!("data offset {offset} is not a multiple of the alignment {alignment}"));
    }
    Ok((format, dims, offset, len))
}

impl Value {
    /// Any integer type that fits.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// A float, or a non-negative integer as one.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => self.as_u64().map(|v| v as f32),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl GgufFile {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    /// Any integer type that fits.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }
    /// A float, or a non-negative integer as one.
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f32()
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }
    pub fn get_array(&self, key: &str) -> Option<&Array> {
        self.get(key)?.as_array()
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

//! The GGUF parser on hand-built files: a valid one parses; each kind of damage is an error that
//! names the problem (and the key or tensor), never a panic.

use purehw_core::gguf::{self, Array, Value};
use purehw_kernels::Format;
use purehw_kernels::testing::Rng;

// GGUF value types.
const T_U8: u32 = 0;
const T_U32: u32 = 4;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

/// A tiny GGUF writer: every field can be set to something invalid.
#[derive(Clone)]
struct Gguf {
    magic: [u8; 4],
    version: u32,
    /// `None`: the real counts.
    tensor_count: Option<u64>,
    kv_count: Option<u64>,
    /// Key bytes, value type, encoded value.
    kvs: Vec<(Vec<u8>, u32, Vec<u8>)>,
    tensors: Vec<Tensor>,
    /// Padding before the data section.
    alignment: usize,
    data: Vec<u8>,
}

#[derive(Clone)]
struct Tensor {
    name: Vec<u8>,
    dims: Vec<u64>,
    ty: u32,
    offset: u64,
}

fn string(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

fn array(ty: u32, n: u64, elems: &[u8]) -> Vec<u8> {
    let mut v = ty.to_le_bytes().to_vec();
    v.extend_from_slice(&n.to_le_bytes());
    v.extend_from_slice(elems);
    v
}

impl Gguf {
    fn build(&self) -> Vec<u8> {
        let mut b = self.magic.to_vec();
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.tensor_count.unwrap_or(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&self.kv_count.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kvs {
            b.extend_from_slice(&string(k));
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(v);
        }
        for t in &self.tensors {
            b.extend_from_slice(&string(&t.name));
            b.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&t.ty.to_le_bytes());
            b.extend_from_slice(&t.offset.to_le_bytes());
        }
        while !b.len().is_multiple_of(self.alignment) {
            b.push(0);
        }
        b.extend_from_slice(&self.data);
        b
    }

    fn kv(mut self, key: &str, ty: u32, value: Vec<u8>) -> Self {
        self.kvs.push((key.as_bytes().to_vec(), ty, value));
        self
    }

    fn tensor(&mut self, name: &str) -> &mut Tensor {
        self.tensors.iter_mut().find(|t| t.name == name.as_bytes()).expect("test tensor")
    }
}

fn tensor(name: &str, dims: &[u64], ty: u32, offset: u64) -> Tensor {
    Tensor { name: name.as_bytes().to_vec(), dims: dims.to_vec(), ty, offset }
}

/// Three tensors (F32 8x2 = 64 bytes at 0, Q4_0 32x2 = 36 bytes at 64, Q8_0 64 = 68 bytes at
/// 128) and metadata of several types. The file ends exactly where the last tensor does.
fn valid() -> Gguf {
    let strs: Vec<u8> = [string(b"a"), string(b"bc")].concat();
    let nested: Vec<u8> = [array(T_U8, 2, &[1, 2]), array(T_U8, 1, &[3])].concat();
    Gguf {
        magic: *b"GGUF",
        version: 3,
        tensor_count: None,
        kv_count: None,
        kvs: Vec::new(),
        tensors: vec![tensor("a", &[8, 2], 0, 0), tensor("b", &[32, 2], 2, 64), tensor("c", &[64], 8, 128)],
        alignment: 32,
        data: (0..196u32).map(|i| (i * 7) as u8).collect(),
    }
    .kv("general.architecture", T_STRING, string(b"llama"))
    .kv("general.alignment", T_U32, 32u32.to_le_bytes().to_vec())
    .kv("x.f32", T_F32, 1.5f32.to_le_bytes().to_vec())
    .kv("x.bool", T_BOOL, vec![1])
    .kv("x.ids", T_ARRAY, array(T_U32, 3, &[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]))
    .kv("x.strs", T_ARRAY, array(T_STRING, 2, &strs))
    .kv("x.nested", T_ARRAY, array(T_ARRAY, 2, &nested))
}

/// Parses `g` and expects an error containing every one of `needles`.
#[track_caller]
fn fails(g: &Gguf, needles: &[&str]) -> String {
    fails_bytes(&g.build(), needles)
}

#[track_caller]
fn fails_bytes(bytes: &[u8], needles: &[&str]) -> String {
    match gguf::parse(bytes) {
        Ok(f) => panic!("expected an error mentioning {needles:?}, parsed: {f:?}"),
        Err(e) => {
            for n in needles {
                assert!(e.contains(n), "error {e:?} does not mention {n:?}");
            }
            e
        }
    }
}

#[test]
fn valid_file_parses() {
    let bytes = valid().build();
    let f = gguf::parse(&bytes).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    assert_eq!(f.data_start % 32, 0);
    assert_eq!(f.data_start + 196, bytes.len());
    assert_eq!(f.get_str("general.architecture"), Some("llama"));
    assert_eq!(f.get_u64("general.alignment"), Some(32));
    assert_eq!(f.get_f32("x.f32"), Some(1.5));
    assert_eq!(f.get_bool("x.bool"), Some(true));
    assert_eq!(f.get_array("x.ids"), Some(&Array::U32(vec![1, 2, 3])));
    assert_eq!(f.get_array("x.strs"), Some(&Array::String(vec!["a".into(), "bc".into()])));
    assert_eq!(f.get_array("x.nested"), Some(&Array::Array(vec![Array::U8(vec![1, 2]), Array::U8(vec![3])])));
    assert_eq!(f.metadata.len(), 7);
    assert_eq!(f.metadata[0].0, "general.architecture");

    let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    let a = f.tensor("a").unwrap();
    assert_eq!((a.format, a.dims.as_slice(), a.start, a.len), (Format::F32, &[8u64, 2][..], f.data_start, 64));
    let b = f.tensor("b").unwrap();
    assert_eq!((b.format, b.start - f.data_start, b.len), (Format::Q4_0, 64, 36));
    let c = f.tensor("c").unwrap();
    assert_eq!((c.format, c.offset_in_data(&f), c.len, c.n_elements()), (Format::Q8_0, 128, 68, 64));
    assert_eq!(c.data(&bytes), Some(&bytes[f.data_start + 128..]));
}

#[test]
fn version_2_and_other_alignments_parse() {
    let mut g = valid();
    g.version = 2;
    assert_eq!(gguf::parse(&g.build()).unwrap().version, 2);

    // No alignment key: the default 32.
    let mut g = valid();
    g.kvs.retain(|(k, _, _)| k != b"general.alignment");
    assert_eq!(gguf::parse(&g.build()).unwrap().alignment, 32);

    // Alignment 64: offsets 0, 64, 128 stay aligned.
    let mut g = valid();
    g.kvs[1].2 = 64u32.to_le_bytes().to_vec();
    g.alignment = 64;
    let f = gguf::parse(&g.build()).unwrap();
    assert_eq!((f.alignment, f.data_start % 64), (64, 0));
}

#[test]
fn empty_file_with_no_tensors_parses() {
    let mut g = valid();
    g.tensors.clear();
    g.data.clear();
    let f = gguf::parse(&g.build()).unwrap();
    assert!(f.tensors.is_empty());
}

#[test]
fn truncation_at_every_byte_is_an_error() {
    let bytes = valid().build();
    for n in 0..bytes.len() {
        assert!(gguf::parse(&bytes[..n]).is_err(), "truncated to {n} of {} bytes parsed", bytes.len());
    }
}

#[test]
fn bad_magic() {
    let mut g = valid();
    g.magic = *b"GGML";
    fails(&g, &["magic"]);
    fails_bytes(b"GG", &["magic"]);
    fails_bytes(b"", &["magic"]);
}

#[test]
fn unsupported_versions() {
    for (v, what) in [(1, "version 1"), (4, "version 4"), (0, "version 0"), (3u32.swap_bytes(), "big-endian")] {
        let mut g = valid();
        g.version = v;
        fails(&g, &[what]);
    }
}

#[test]
fn invalid_utf8() {
    let mut g = valid();
    g.kvs[0].0 = b"general.\xffarch".to_vec();
    fails(&g, &["metadata entry 0", "UTF-8"]);

    let mut g = valid();
    g.kvs[0].2 = string(b"lla\xc3ma");
    fails(&g, &["general.architecture", "UTF-8"]);

    let mut g = valid();
    g.kvs[5].2 = array(T_STRING, 2, &[string(b"a"), string(b"\xfe")].concat());
    fails(&g, &["x.strs", "element 1", "UTF-8"]);

    let mut g = valid();
    g.tensor("b").name = b"b\x80".to_vec();
    fails(&g, &["tensor 1", "UTF-8"]);
}

#[test]
fn lengths_past_eof_are_refused_before_allocating() {
    // Each of these would ask for exabytes if trusted.
    let mut g = valid();
    g.kvs[0].2 = u64::MAX.to_le_bytes().to_vec();
    fails(&g, &["general.architecture", "past the end"]);

    let mut g = valid();
    g.kvs[0].0 = vec![b'k'; 4];
    let mut b = g.build();
    // Key length field of the first entry: right after the 24-byte header.
    b[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    fails_bytes(&b, &["metadata entry 0", "past the end"]);

    for ty in [T_U8, T_U32, T_STRING, T_ARRAY] {
        let mut g = valid();
        g.kvs[4].2 = array(ty, u64::MAX / 2, &[]);
        fails(&g, &["x.ids", "past the end"]);
    }

    let mut g = valid();
    g.tensor("c").name = vec![b'c'; 3];
    let mut b = g.build();
    let at = b.windows(11).position(|w| w == [3, 0, 0, 0, 0, 0, 0, 0, b'c', b'c', b'c']).unwrap();
    b[at..at + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
    fails_bytes(&b, &["tensor 2", "past the end"]);

    let mut g = valid();
    g.tensor_count = Some(u64::MAX);
    fails(&g, &["tensors cannot fit"]);
    let mut g = valid();
    g.kv_count = Some(1 << 60);
    fails(&g, &["metadata entries cannot fit"]);
}

#[test]
fn bad_metadata_values() {
    let g = valid().kv("x.bad", 13, vec![0; 8]);
    fails(&g, &["x.bad", "unknown value type 13"]);

    let g = valid().kv("x.badarr", T_ARRAY, array(42, 1, &[0; 8]));
    fails(&g, &["x.badarr", "unknown value type 42"]);

    let g = valid().kv("x.b", T_BOOL, vec![2]);
    fails(&g, &["x.b", "bool"]);

    let g = valid().kv("x.f32", T_F32, 2.0f32.to_le_bytes().to_vec());
    fails(&g, &["x.f32", "duplicate"]);

    // Arrays of arrays nested 1000 deep: refused, not a stack overflow.
    let mut v = array(T_U8, 0, &[]);
    for _ in 0..1000 {
        v = array(T_ARRAY, 1, &v);
    }
    let g = valid().kv("x.deep", T_ARRAY, v);
    fails(&g, &["x.deep", "nested"]);
}

#[test]
fn bad_alignment() {
    for (a, what) in [(0u32, "0 is not a power of two"), (48, "48 is not a power of two")] {
        let mut g = valid();
        g.kvs[1].2 = a.to_le_bytes().to_vec();
        fails(&g, &["general.alignment", what]);
    }
    let mut g = valid();
    g.kvs[1] = (b"general.alignment".to_vec(), T_STRING, string(b"32"));
    fails(&g, &["general.alignment", "unsigned integer"]);
}

#[test]
fn bad_dims() {
    let mut g = valid();
    g.tensor("a").dims = vec![1, 1, 1, 1, 1];
    fails(&g, &["tensor 'a'", "5 dimensions"]);

    let mut g = valid();
    g.tensor("a").dims = vec![];
    fails(&g, &["tensor 'a'", "0 dimensions"]);

    let mut g = valid();
    g.tensor("c").dims = vec![32, 1 << 40, 1 << 40];
    fails(&g, &["tensor 'c'", "overflow"]);

    // Element count fits but the byte size (x4 for F32) does not fit u64.
    let mut g = valid();
    g.tensor("a").dims = vec![1 << 62, 1];
    fails(&g, &["tensor 'a'", "overflow"]);
}

#[test]
fn unsupported_and_unknown_types() {
    let mut g = valid();
    g.tensor("b").ty = 16;
    let e = fails(&g, &["tensor 'b'", "16", "IQ2_XXS"]);
    assert!(e.contains("unsupported"), "{e}");

    let mut g = valid();
    g.tensor("b").ty = 99;
    fails(&g, &["tensor 'b'", "unknown ggml type 99"]);
}

#[test]
fn row_not_whole_blocks() {
    let mut g = valid();
    g.tensor("b").dims = vec![33, 2];
    fails(&g, &["tensor 'b'", "33", "Q4_0"]);
}

#[test]
fn offset_not_aligned() {
    let mut g = valid();
    g.tensor("c").offset = 132;
    fails(&g, &["tensor 'c'", "132", "alignment"]);
}

#[test]
fn tensor_past_eof() {
    let mut g = valid();
    g.tensor("c").offset = 160;
    fails(&g, &["tensor 'c'", "past the end"]);

    let mut g = valid();
    g.tensor("c").offset = u64::MAX - 31;
    fails(&g, &["tensor 'c'"]);

    let mut g = valid();
    g.data.pop();
    fails(&g, &["tensor 'c'", "past the end"]);
}

#[test]
fn overlapping_tensors() {
    let mut g = valid();
    g.tensor("b").offset = 32;
    fails(&g, &["'a'", "'b'", "overlap"]);

    // Order in the table does not matter: c (68 bytes at 0) runs into b (at 64).
    let mut g = valid();
    g.tensor("a").offset = 128;
    g.tensor("c").offset = 0;
    fails(&g, &["'c'", "'b'", "overlap"]);
}

#[test]
fn duplicate_tensor_names() {
    let mut g = valid();
    g.tensor("c").name = b"a".to_vec();
    fails(&g, &["tensor 'a'", "duplicate"]);
}

/// Random byte damage to a valid file: any result, but never a panic.
#[test]
fn random_corruption_never_panics() {
    let good = valid().build();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut next = move || rng.next_u64();
    for _ in 0..20_000 {
        let mut b = good.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() % b.len() as u64) as usize;
            b[i] = match next() % 3 {
                0 => next() as u8,
                1 => 0xFF,
                _ => 0,
            };
        }
        let _ = gguf::parse(&b);
    }
}

#[test]
fn value_accessors() {
    let f = gguf::parse(&valid().build()).unwrap();
    assert_eq!(f.get("x.bool"), Some(&Value::Bool(true)));
    assert_eq!(f.get("missing"), None);
    assert!(f.tensor("missing").is_none());
}

//! Op-by-op comparison of two backends (the reference and a twin), written once, generic over
//! both. Every check is bit-exact: the twins implement the reference semantics exactly, in both
//! activation modes.

use half::{bf16, f16};
use purehw_hal::{ActQuant, Backend, Format, HostBytes, HostWeight, Op, RopeMode, SeqSpan, Step, View};

/// xorshift64*: reproducible test data without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.unit() * scale).collect()
    }
}

/// A random `rows × cols` weight in `fmt`: random codes with small finite f16 scales, or random
/// floats for the float formats.
pub fn random_weight(rng: &mut Rng, fmt: Format, rows: usize, cols: usize) -> HostWeight {
    let row_bytes = fmt.bytes_for(cols).expect("whole blocks");
    let mut bytes: Vec<u8> = (0..rows * row_bytes).map(|_| rng.next_u64() as u8).collect();
    let f16_at = |b: &mut [u8], o: usize, rng: &mut Rng| {
        let s = f16::from_f32(0.01 + 0.04 * rng.unit().abs());
        b[o..o + 2].copy_from_slice(&s.to_le_bytes());
    };
    match fmt {
        Format::F32 => bytes = rng.vec(rows * cols, 1.0).iter().flat_map(|v| v.to_le_bytes()).collect(),
        Format::F16 => bytes = rng.vec(rows * cols, 1.0).iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
        Format::BF16 => {
            bytes = rng.vec(rows * cols, 1.0).iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect()
        }
        _ => {
            let offsets: &[usize] = match fmt {
                Format::Q4_1 | Format::Q5_1 | Format::Q4_K | Format::Q5_K => &[0, 2],
                Format::Q6_K => &[208],
                _ => &[0],
            };
            for block in bytes.chunks_exact_mut(fmt.block_bytes()) {
                for &o in offsets {
                    f16_at(block, o, rng);
                }
            }
        }
    }
    HostWeight::new(fmt, rows, cols, HostBytes::from_vec(bytes)).expect("consistent weight")
}

/// An output to compare: the buffer on each side and its length.
type Out<A, B> = ((<A as Backend>::Buffer, <B as Backend>::Buffer), usize);

/// Both backends, with a buffer of each filled with the same data.
struct Pair<A: Backend, B: Backend> {
    a: A,
    b: B,
}

impl<A: Backend, B: Backend> Pair<A, B> {
    fn buf(&mut self, data: &[f32]) -> (A::Buffer, B::Buffer) {
        let ba = self.a.alloc(data.len()).unwrap_or_else(|e| panic!("{e}"));
        let bb = self.b.alloc(data.len()).unwrap_or_else(|e| panic!("{e}"));
        self.a.write(View::new(ba, 0), data).unwrap_or_else(|e| panic!("{e}"));
        self.b.write(View::new(bb, 0), data).unwrap_or_else(|e| panic!("{e}"));
        (ba, bb)
    }

    fn weight(&mut self, w: &HostWeight) -> (A::Weight, B::Weight) {
        (
            self.a.load_weight(w).unwrap_or_else(|e| panic!("{e}")),
            self.b.load_weight(w).unwrap_or_else(|e| panic!("{e}")),
        )
    }

    /// Run the same ops on both (built by `ops` from each side's handles) and compare `outs`.
    fn check(
        &mut self,
        what: &str,
        step: &Step<'_>,
        ops_a: &[Op<A::Buffer, A::Weight>],
        ops_b: &[Op<B::Buffer, B::Weight>],
        outs: &[Out<A, B>],
    ) {
        self.a.submit(step, ops_a).unwrap_or_else(|e| panic!("{what}: {e}"));
        self.b.submit(step, ops_b).unwrap_or_else(|e| panic!("{what}: {e}"));
        for (k, &((oa, ob), len)) in outs.iter().enumerate() {
            let (mut ra, mut rb) = (vec![0f32; len], vec![0f32; len]);
            self.a.read(View::new(oa, 0), &mut ra).unwrap_or_else(|e| panic!("{e}"));
            self.b.read(View::new(ob, 0), &mut rb).unwrap_or_else(|e| panic!("{e}"));
            if let Some(i) = (0..len).find(|&i| ra[i].to_bits() != rb[i].to_bits()) {
                panic!("{what}: output {k} differs first at element {i}: {} vs {} (of {len})", ra[i], rb[i]);
            }
        }
    }
}

const ONE_ROW: Step<'static> = Step { tokens: &[], positions: &[], seqs: &[] };

/// Every matmul format in both activation modes for several token counts, including the reuse
/// of quantized activations across matmuls reading the same rows and its invalidation when
/// those rows are overwritten. `a` is the reference.
pub fn check_matmuls<A: Backend, B: Backend>(a: A, b: B) {
    let mut p = Pair { a, b };
    let mut rng = Rng(0x5EED);
    for fmt in Format::ALL {
        let cols = match fmt.block_elems() {
            1 => 70,
            32 => 640,
            _ => 512,
        };
        let rows = 37;
        let w1 = random_weight(&mut rng, fmt, rows, cols);
        let w2 = random_weight(&mut rng, fmt, rows, cols);
        let (wa1, wb1) = p.weight(&w1);
        let (wa2, wb2) = p.weight(&w2);
        for act in [ActQuant::F32, ActQuant::Int8] {
            for n in [1usize, 2, 5, 33, 70] {
                let mut x = rng.vec(n * cols, 2.0);
                // A zero row, and a row with one large outlier.
                x[..cols].fill(0.0);
                if n > 1 {
                    x[cols + 3] = 300.0;
                }
                let xb = p.buf(&x);
                let o1 = p.buf(&vec![0.0; n * rows]);
                let o2 = p.buf(&vec![0.0; n * rows]);
                let what = format!("MatMul {fmt:?} {act:?} n={n}");
                macro_rules! mm {
                    ($o:expr, $x:expr, $w:expr) => {
                        Op::MatMul { out: View::new($o, 0), x: View::new($x, 0), w: $w, n, act }
                    };
                }
                p.check(
                    &what,
                    &ONE_ROW,
                    &[mm!(o1.0, xb.0, wa1), mm!(o2.0, xb.0, wa2)],
                    &[mm!(o1.1, xb.1, wb1), mm!(o2.1, xb.1, wb2)],
                    &[(o1, n * rows), (o2, n * rows)],
                );
                // Overwrite x's rows between two matmuls that read it: the second must see the new rows.
                let sq = p.buf(&rng.vec(n * cols, 1.0));
                macro_rules! add {
                    ($o:expr, $a:expr, $b:expr) => {
                        Op::Add { out: View::new($o, 0), a: View::new($a, 0), b: View::new($b, 0), len: n * cols }
                    };
                }
                p.check(
                    &format!("{what} after x changes"),
                    &ONE_ROW,
                    &[mm!(o1.0, xb.0, wa1), add!(xb.0, xb.0, sq.0), mm!(o2.0, xb.0, wa1)],
                    &[mm!(o1.1, xb.1, wb1), add!(xb.1, xb.1, sq.1), mm!(o2.1, xb.1, wb1)],
                    &[(o1, n * rows), (o2, n * rows)],
                );
            }
        }
    }
}

/// Attention over several sequences sharing a step (decode and prefill rows), with and without a
/// sliding window and a softcap, for grouped and plain heads. `a` is the reference.
pub fn check_attention<A: Backend, B: Backend>(a: A, b: B) {
    let mut p = Pair { a, b };
    let mut rng = Rng(0xA77E);
    let seqs = [
        SeqSpan { row: 0, len: 1, cache_row: 0, pos0: 40 },
        SeqSpan { row: 1, len: 9, cache_row: 64, pos0: 0 },
        SeqSpan { row: 10, len: 30, cache_row: 128, pos0: 20 },
    ];
    attention_cases(&mut p, &mut rng, &seqs);
    let rows = 40;
    let positions = positions_of(&seqs);
    // The remaining ops once each (a twin may run them itself).
    let dim = 64;
    let x = p.buf(&rng.vec(rows * dim, 3.0));
    let y = p.buf(&rng.vec(rows * dim, 3.0));
    let o = p.buf(&vec![0.0; rows * dim]);
    let table = random_weight(&mut rng, Format::Q8_0, 50, dim);
    let norm = random_weight(&mut rng, Format::F32, 1, dim);
    let (ta, tb) = p.weight(&table);
    let (na, nb) = p.weight(&norm);
    let tokens: Vec<u32> = (0..rows as u32).map(|i| i % 50).collect();
    let step = Step { tokens: &tokens, positions: &positions, seqs: &seqs };
    let len = rows * dim;
    macro_rules! ops {
        ($x:expr, $y:expr, $o:expr, $t:expr, $n:expr) => {
            [
                Op::RmsNorm { out: View::new($o, 0), x: View::new($x, 0), w: $n, rows, dim, eps: 1e-6 },
                Op::Rope {
                    x: View::new($o, 0),
                    rows,
                    heads: 2,
                    head_dim: 32,
                    theta: 1e4,
                    scale: 1.0,
                    mode: RopeMode::Neox,
                },
                Op::GeluTanhMul { out: View::new($o, 0), gate: View::new($o, 0), up: View::new($y, 0), len },
                Op::SiluMul { out: View::new($y, 0), gate: View::new($y, 0), up: View::new($x, 0), len },
                Op::Add { out: View::new($o, 0), a: View::new($o, 0), b: View::new($y, 0), len },
                Op::Softcap { x: View::new($o, 0), len, cap: 5.0 },
                Op::Embed { out: View::new($x, 0), table: $t, scale: 2.0 },
            ]
        };
    }
    p.check(
        "elementwise ops",
        &step,
        &ops!(x.0, y.0, o.0, ta, na),
        &ops!(x.1, y.1, o.1, tb, nb),
        &[(o, len), (x, len), (y, len)],
    );
}

/// A batched decode step: three sequences of one row each with long contexts (each query row
/// reads a cache of its own, far from row 0). `a` is the reference.
pub fn check_attention_decode<A: Backend, B: Backend>(a: A, b: B) {
    let mut p = Pair { a, b };
    let mut rng = Rng(0xDEC0);
    let seqs = [
        SeqSpan { row: 0, len: 1, cache_row: 0, pos0: 250 },
        SeqSpan { row: 1, len: 1, cache_row: 256, pos0: 100 },
        SeqSpan { row: 2, len: 1, cache_row: 512, pos0: 255 },
    ];
    attention_cases(&mut p, &mut rng, &seqs);
}

/// Each row's position: sequence by sequence, `pos0..pos0 + len`.
fn positions_of(seqs: &[SeqSpan]) -> Vec<u32> {
    seqs.iter().flat_map(|s| s.pos0..s.pos0 + s.len).collect()
}

/// Every head layout, window and softcap case of [`check_attention`] on a step of `seqs`.
fn attention_cases<A: Backend, B: Backend>(p: &mut Pair<A, B>, rng: &mut Rng, seqs: &[SeqSpan]) {
    let positions = positions_of(seqs);
    let rows = positions.len();
    let tokens = vec![0u32; rows];
    let step = &Step { tokens: &tokens, positions: &positions, seqs };
    let cache = seqs.iter().map(|s| (s.cache_row + s.pos0 + s.len) as usize).max().unwrap_or(0);
    for (heads, kv_heads, head_dim) in [(4, 1, 256), (9, 3, 64), (2, 2, 8)] {
        for (window, softcap) in [(0, 0.0), (7, 0.0), (0, 50.0), (16, 30.0)] {
            let q = p.buf(&rng.vec(rows * heads * head_dim, 1.0));
            let k = p.buf(&rng.vec(cache * kv_heads * head_dim, 1.0));
            let v = p.buf(&rng.vec(cache * kv_heads * head_dim, 1.0));
            let o = p.buf(&vec![0.0; rows * heads * head_dim]);
            macro_rules! op {
                ($o:expr, $q:expr, $k:expr, $v:expr) => {
                    Op::Attention {
                        out: View::new($o, 0),
                        q: View::new($q, 0),
                        k: View::new($k, 0),
                        v: View::new($v, 0),
                        heads,
                        kv_heads,
                        head_dim,
                        scale: 1.0 / (head_dim as f32).sqrt(),
                        window,
                        softcap,
                    }
                };
            }
            p.check(
                &format!("Attention {heads}/{kv_heads}x{head_dim} window {window} softcap {softcap}"),
                step,
                &[op!(o.0, q.0, k.0, v.0)],
                &[op!(o.1, q.1, k.1, v.1)],
                &[(o, rows * heads * head_dim)],
            );
        }
    }
}

//! The matrix's cases: every primitive op, every weight format where an op reads one, token
//! counts of decode (1–16) and prefill (33, 70), odd row counts, columns that are no multiple of
//! 8 (float formats) or 1, 2, 3 and 20 blocks (block formats), long contexts, sliding windows,
//! softcaps, both RoPE modes, Argmax's NaN/±inf/ties, the fused ops in their variants, and the
//! in-place forms. Views sit at odd offsets inside buffers with random contents around them
//! wherever that is cheap, so a write outside an op's region shows.

use std::sync::Arc;

use purehw_hal::{
    ActLayout, ActQuant, Codes, Format, Gate, HostBytes, HostWeight, KvType, MatIn, Op, PackedInt, QuantOut, RopeMode,
    RopeSpec, ScaleType, SeqSpan, View, WeightParts, act_block, act_words,
};
use purehw_kernels::testing::{Rng, random_int_weight, random_row};

use super::{Buf, Case, Check, Group, StepData, Wt, quantize_rows};

/// Every group of the matrix.
pub(super) fn all() -> Vec<Group> {
    let mut rng = Rng(0x5EED_CAFE);
    let mut groups = vec![embed(&mut rng), embed_ids(&mut rng)];
    for fmt in Format::ALL.into_iter().chain(INT_FORMATS) {
        groups.push(matmul(&mut rng, fmt));
    }
    groups.push(quantize_act(&mut rng));
    for fmt in Format::ALL.into_iter().filter(|f| f.act_layout().is_some()) {
        groups.push(matmul_q8(&mut rng, fmt));
    }
    groups.push(rms_norm(&mut rng));
    groups.push(rope(&mut rng));
    groups.push(store_kv(&mut rng));
    groups.extend(attention(&mut rng));
    groups.push(elementwise(&mut rng));
    groups.push(argmax(&mut rng));
    groups.push(head_argmax(&mut rng));
    groups.push(copy(&mut rng));
    groups.push(add_rms_norm(&mut rng));
    groups.extend(qkv(&mut rng));
    groups.extend(gated_ffn(&mut rng));
    groups.extend(prologues(&mut rng));
    groups.extend(tails(&mut rng));
    // Ring caches (a sliding-window layer's): last, so the data of the groups above stays as it was.
    groups.push(store_kv_caches(&mut rng, KvType::F32));
    groups.extend(attention_caches(&mut rng, KvType::F32, &ring_attention_steps()));
    groups.push(qkv_caches(&mut rng, KvType::F32, &ring_qkv_steps()));
    // f16 caches, linear and ring: last too.
    groups.push(store_kv_caches(&mut rng, KvType::F16));
    let mut f16_steps = vec![
        ("decode and prefill rows", 0, 0, mixed_seqs()),
        (
            "prefill blocks on a long context",
            0,
            0,
            vec![
                SeqSpan { row: 0, len: 37, cache_row: 0, pos0: 490, ring_row: 0 },
                SeqSpan { row: 37, len: 3, cache_row: 640, pos0: 100, ring_row: 0 },
            ],
        ),
    ];
    f16_steps.push(ring_attention_steps().swap_remove(0));
    groups.extend(attention_caches(&mut rng, KvType::F16, &f16_steps));
    let mut qkv_steps = vec![(
        vec![
            SeqSpan { row: 0, len: 1, cache_row: 0, pos0: 40, ring_row: 0 },
            SeqSpan { row: 1, len: 6, cache_row: 64, pos0: 13, ring_row: 16 },
        ],
        0,
    )];
    qkv_steps.extend(ring_qkv_steps());
    groups.push(qkv_caches(&mut rng, KvType::F16, &qkv_steps));
    groups
}

// ---- data ----

/// compressed-tensors layouts: int4 and int8, grouped (32, 64, 128) and per channel, symmetric
/// and with zero points, every scale type, packed and `int-quantized` codes.
pub const INT_FORMATS: [Format; 8] = {
    const fn int(bits: u8, codes: Codes, group: Option<usize>, symmetric: bool, scale: ScaleType) -> Format {
        Format::Int(PackedInt { bits, codes, group, symmetric, scale })
    }
    [
        int(4, Codes::Packed, Some(32), true, ScaleType::BF16),
        int(4, Codes::Packed, Some(32), false, ScaleType::BF16),
        int(4, Codes::Packed, Some(128), false, ScaleType::F16),
        int(4, Codes::Packed, None, true, ScaleType::F32),
        int(8, Codes::Packed, None, true, ScaleType::BF16),
        int(8, Codes::Packed, Some(64), false, ScaleType::BF16),
        int(8, Codes::I8, None, true, ScaleType::BF16),
        int(8, Codes::I8, Some(32), false, ScaleType::F16),
    ]
};

/// A random `rows × cols` weight in `fmt` (the shared random rows: finite values, small scales).
fn weight(rng: &mut Rng, fmt: Format, rows: usize, cols: usize) -> HostWeight {
    if let Format::Int(p) = fmt {
        let (codes, scales, zeros) = random_int_weight(rng, p, rows, cols);
        let parts = WeightParts {
            scales: Some(HostBytes::from_vec(scales)),
            zeros: (!p.symmetric).then(|| HostBytes::from_vec(zeros)),
        };
        return HostWeight::with_parts(fmt, rows, cols, HostBytes::from_vec(codes), parts).expect("consistent weight");
    }
    let bytes = (0..rows).flat_map(|_| random_row(rng, fmt, cols)).collect();
    HostWeight::new(fmt, rows, cols, HostBytes::from_vec(bytes)).expect("consistent weight")
}

/// The width of the tails cases' residual stream.
const TAILS_DIM: usize = 768;

/// A tails case's residual junction: `(x, branch, norm weight, post-norm weight)` into x_out (in
/// place or not), the normed row and its quantization in `layout`; `what` names the three.
fn junction(
    c: &mut Case,
    rng: &mut Rng,
    (x, branch, w, post): (View<Buf>, View<Buf>, Wt, Option<Wt>),
    in_place: bool,
    layout: ActLayout,
    what: [&'static str; 3],
) -> (View<Buf>, QuantOut<Buf>) {
    let dim = TAILS_DIM;
    let x_out = if in_place { x } else { c.output_at(rng, dim, 0, what[0], Check::Float) };
    let out = c.output_at(rng, dim, 1, what[1], Check::Float);
    let len = dim / act_block(layout) * act_words(layout);
    let q = QuantOut { out: c.output_at(rng, len, 0, what[2], Check::DerivedBlocks(layout)), layout };
    c.op(Op::AddRmsNorm { x, x_out, branch: Some(branch), post, out, w, quant: Some(q), rows: 1, dim, eps: 1e-6 });
    (x_out, q)
}

/// `w` with row `to` a copy of row `from`, for each pair.
fn repeated_rows(w: HostWeight, pairs: &[(usize, usize)]) -> HostWeight {
    let rb = w.format.bytes_for(w.cols).expect("a fixed-size format");
    let mut b = w.data.as_slice().to_vec();
    for &(from, to) in pairs {
        b.copy_within(from * rb..(from + 1) * rb, to * rb);
    }
    HostWeight::new(w.format, w.rows, w.cols, HostBytes::from_vec(b)).expect("consistent weight")
}

/// An f32 weight of the given values.
fn f32_weight(rows: usize, cols: usize, v: &[f32]) -> HostWeight {
    let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    HostWeight::new(Format::F32, rows, cols, HostBytes::from_vec(bytes)).expect("consistent weight")
}

/// An RMSNorm weight: (1, dim) around 1.
fn norm_weight(rng: &mut Rng, dim: usize) -> HostWeight {
    let v: Vec<f32> = rng.vec(dim, 0.5).iter().map(|x| 1.0 + x).collect();
    f32_weight(1, dim, &v)
}

/// `data` at element `at` of a buffer with `at` random values before it and 5 after it.
fn padded(rng: &mut Rng, data: &[f32], at: usize) -> (Vec<f32>, usize) {
    let mut v = rng.vec(at, 9.0);
    v.extend_from_slice(data);
    v.extend(rng.vec(5, 9.0));
    (v, at)
}

impl Case {
    /// `data` placed at offset `at` of a padded buffer (random values around it).
    fn input_at(&mut self, rng: &mut Rng, data: &[f32], at: usize) -> View<Buf> {
        let (v, at) = padded(rng, data, at);
        self.buf(v).at(at)
    }

    /// `len` random values in [-scale, scale) at offset `at` of a padded buffer.
    fn random_at(&mut self, rng: &mut Rng, len: usize, scale: f32, at: usize) -> View<Buf> {
        let data = rng.vec(len, scale);
        self.input_at(rng, &data, at)
    }

    /// An output region of `len` at offset `at`, starting random (an op must not read its
    /// output, or rely on it being zero), compared whole afterwards.
    fn output_at(&mut self, rng: &mut Rng, len: usize, at: usize, what: &'static str, check: Check) -> View<Buf> {
        let v = self.random_at(rng, len, 9.0, at);
        self.out(v, len, what, check);
        v
    }
}

/// Activation rows with the hard cases for quantization: after a plain row, a zero row, a row
/// with one large outlier, a row with a tiny block, and a row whose values sit exactly halfway
/// between codes.
fn activations(rng: &mut Rng, n: usize, cols: usize) -> Vec<f32> {
    let mut x = rng.vec(n * cols, 2.0);
    let block = 32.min(cols);
    for (t, row) in x.chunks_exact_mut(cols).enumerate() {
        match t % 5 {
            1 => row.fill(0.0),
            2 => row[3 % cols] = 300.0,
            3 => row[..block].iter_mut().for_each(|v| *v *= 1e-30),
            4 => {
                // amax 127 in every block makes d = 1, so k + 0.5 is a rounding tie.
                for (i, v) in row.iter_mut().enumerate() {
                    *v = if i % 32 == 0 { 127.0 } else { (i % 250) as f32 - 124.5 };
                }
            }
            _ => {}
        }
    }
    x
}

/// Columns for a shape index: float formats get counts that are no multiple of 8, block
/// formats 1, 2, 3 and 20 blocks.
fn cols_for(fmt: Format, k: usize) -> usize {
    match fmt.block_elems() {
        1 => [70, 259, 7, 1030][k],
        b => b * [1, 2, 3, 20][k],
    }
}

/// Matmul shapes: (tokens, weight rows, column index for [`cols_for`]). Decode 1–16 rows and
/// prefill 33 and 70, odd row counts, every column count at least once with one row.
const MATMUL_SHAPES: [(usize, usize, usize); 12] = [
    (1, 37, 0),
    (1, 257, 3),
    (1, 37, 1),
    (2, 257, 1),
    (3, 37, 2),
    (5, 37, 3),
    (8, 257, 2),
    (16, 37, 3),
    (16, 257, 0),
    (33, 37, 1),
    (70, 257, 2),
    (70, 37, 3),
];

/// A matmul over `n` rows: exact for the decode integer matvec, else a float op or a prefill one.
fn matmul_check(n: usize, integer: bool) -> Check {
    match (n <= 16, integer) {
        (true, true) => Check::Exact,
        (true, false) => Check::Float,
        (false, _) => Check::Prefill,
    }
}

// ---- primitive ops ----

fn embed(rng: &mut Rng) -> Group {
    let mut cases = Vec::new();
    let vocab = 50;
    for fmt in Format::ALL.into_iter().chain(INT_FORMATS[..2].iter().copied()) {
        for (k, n, scale, at) in [(0, 1, 1.0, 0), (1, 5, 25.3, 3), (0, 33, 0.5, 1)] {
            let cols = cols_for(fmt, k);
            let mut step = StepData::one_seq(n, 0);
            step.tokens =
                (0..n).map(|t| [vocab as u32 - 1, 0, (rng.next_u64() % vocab as u64) as u32][t % 3]).collect();
            let mut c = Case::new(format!("Embed {fmt:?} cols={cols} n={n} scale={scale}"), step);
            let table = c.weight(weight(rng, fmt, vocab, cols));
            let out = c.output_at(rng, n * cols, at, "out", Check::Float);
            c.op(Op::Embed { out, table, scale });
            cases.push(c);
        }
    }
    Group { name: "Embed, every format".into(), cases }
}

/// EmbedIds: the ids from a buffer, as an argmax leaves them, and ids no argmax gives (past the
/// table, negative, NaN, fractional), which every backend takes the same way.
fn embed_ids(rng: &mut Rng) -> Group {
    let mut cases = Vec::new();
    let vocab = 50;
    for fmt in Format::ALL.into_iter().chain(INT_FORMATS[..2].iter().copied()) {
        for (k, n, at) in [(0, 1, 0), (1, 7, 3)] {
            let cols = cols_for(fmt, k);
            let ids: Vec<f32> = (0..n)
                .map(|t| [(rng.next_u64() % vocab as u64) as f32, 49.0, 1e9, -1.0, f32::NAN, 3.7, 0.0][t % 7])
                .collect();
            let mut c = Case::new(format!("EmbedIds {fmt:?} cols={cols} n={n}"), StepData::one_seq(n, 0));
            let table = c.weight(weight(rng, fmt, vocab, cols));
            let ids = c.input_at(rng, &ids, at);
            let out = c.output_at(rng, n * cols, at, "out", Check::Float);
            c.op(Op::EmbedIds { out, table, scale: 2.5, ids });
            cases.push(c);
        }
    }
    Group { name: "EmbedIds, every format".into(), cases }
}

fn matmul(rng: &mut Rng, fmt: Format) -> Group {
    let mut cases = Vec::new();
    for act in [ActQuant::F32, ActQuant::Int8] {
        let integer = act == ActQuant::Int8 && fmt.act_layout().is_some();
        for (s, &(n, rows, k)) in MATMUL_SHAPES.iter().enumerate() {
            let cols = cols_for(fmt, k);
            let at = [0, 3][s % 2];
            let mut c =
                Case::new(format!("MatMul {fmt:?} {act:?} n={n} rows={rows} cols={cols}"), StepData::one_seq(n, 0));
            let w = c.weight(weight(rng, fmt, rows, cols));
            let x = activations(rng, n, cols);
            let x = c.input_at(rng, &x, at);
            let out = c.output_at(rng, n * rows, at, "out", matmul_check(n, integer));
            c.op(Op::MatMul { out, x, w, n, act });
            cases.push(c);
        }
        // compressed-tensors decode shapes of whole 256-column chunks (Vulkan's chunked mm_int),
        // a partial and several workgroups of rows, chunks not a whole number of its wide
        // variant's depth, and rows enough for its 256-thread workgroups.
        if matches!(fmt, Format::Int(_)) && act == ActQuant::F32 {
            for (rows, cols, at) in [(37, 1024, 3), (300, 2048, 0), (37, 1280, 0), (32770, 256, 3)] {
                let mut c =
                    Case::new(format!("MatMul {fmt:?} {act:?} n=1 rows={rows} cols={cols}"), StepData::one_seq(1, 0));
                let w = c.weight(weight(rng, fmt, rows, cols));
                let x = activations(rng, 1, cols);
                let x = c.input_at(rng, &x, at);
                let out = c.output_at(rng, rows, at, "out", Check::Float);
                c.op(Op::MatMul { out, x, w, n: 1, act });
                cases.push(c);
            }
        }
        // Two matmuls reading the same rows, the rows overwritten, a third reading them: a
        // backend reusing quantized activations must see the new rows.
        for n in [5, 33] {
            let (rows, cols) = (37, cols_for(fmt, 2));
            let mut c = Case::new(
                format!("MatMul {fmt:?} {act:?} n={n}: shared rows, then rows rewritten"),
                StepData::one_seq(n, 0),
            );
            let w1 = c.weight(weight(rng, fmt, rows, cols));
            let w2 = c.weight(weight(rng, fmt, rows, cols));
            let x = c.buf(activations(rng, n, cols));
            let d = c.buf(rng.vec(n * cols, 1.0));
            let check = matmul_check(n, integer);
            let o1 = c.output_at(rng, n * rows, 0, "first out", check);
            let o2 = c.output_at(rng, n * rows, 0, "second out", check);
            let o3 = c.output_at(rng, n * rows, 0, "out after x changed", check);
            c.op(Op::MatMul { out: o1, x, w: w1, n, act });
            c.op(Op::MatMul { out: o2, x, w: w2, n, act });
            c.op(Op::Add { out: x, a: x, b: d, len: n * cols });
            c.op(Op::MatMul { out: o3, x, w: w1, n, act });
            c.out(x, n * cols, "x", Check::Float);
            cases.push(c);
        }
    }
    Group { name: format!("MatMul {fmt:?}, F32 and Int8 activations"), cases }
}

fn quantize_act(rng: &mut Rng) -> Group {
    let mut cases = Vec::new();
    for layout in [ActLayout::Q8A, ActLayout::Q8K] {
        for (i, (rows, blocks)) in [(1, 1), (2, 3), (3, 2), (5, 20), (16, 1), (33, 3)].into_iter().enumerate() {
            let cols = act_block(layout) * blocks;
            let mut x = activations(rng, rows, cols);
            if rows > 5 {
                // Large magnitudes, and a block of one repeated value.
                x[5 * cols..6 * cols].iter_mut().for_each(|v| *v *= 1e30);
                x[5 * cols..5 * cols + 32].fill(-0.75);
            }
            let at = [0, 3][i % 2];
            let mut c =
                Case::new(format!("QuantizeAct {layout:?} rows={rows} cols={cols}"), StepData::one_seq(rows, 0));
            let xv = c.input_at(rng, &x, at);
            let out = c.output_at(rng, rows * blocks * act_words(layout), at, "blocks", Check::Blocks(layout));
            c.op(Op::QuantizeAct { out, x: xv, rows, cols, layout });
            cases.push(c);
        }
    }
    Group { name: "QuantizeAct, both layouts".into(), cases }
}

fn matmul_q8(rng: &mut Rng, fmt: Format) -> Group {
    let layout = fmt.act_layout().expect("a block format");
    let mut cases = Vec::new();
    for &(n, rows, k) in &MATMUL_SHAPES {
        let cols = cols_for(fmt, k);
        let mut c = Case::new(format!("MatMulQ8 {fmt:?} n={n} rows={rows} cols={cols}"), StepData::one_seq(n, 0));
        let w = c.weight(weight(rng, fmt, rows, cols));
        let xq = c.buf(quantize_rows(&activations(rng, n, cols), n, cols, layout));
        let out = c.output_at(rng, n * rows, 1, "out", matmul_check(n, true));
        c.op(Op::MatMulQ8 { out, xq, w, n });
        cases.push(c);
    }
    Group { name: format!("MatMulQ8 {fmt:?}"), cases }
}

fn rms_norm(rng: &mut Rng) -> Group {
    let mut cases = Vec::new();
    let shapes = [(1, 7, 1e-6), (3, 64, 1e-5), (16, 70, 1e-6), (37, 259, 1e-6), (2, 640, 1e-6), (5, 1152, 1e-5)];
    for (i, &(rows, dim, eps)) in shapes.iter().enumerate() {
        for in_place in [false, true] {
            let mut x = rng.vec(rows * dim, 3.0);
            if rows > 2 {
                x[dim..2 * dim].fill(0.0); // rms = sqrt(eps)
                x[2 * dim..3 * dim].iter_mut().for_each(|v| *v *= 1e15);
            }
            let mut c = Case::new(
                format!("RmsNorm rows={rows} dim={dim} eps={eps:e}{}", if in_place { " in place" } else { "" }),
                StepData::one_seq(rows, 0),
            );
            let w = c.weight(norm_weight(rng, dim));
            let at = [0, 3][i % 2];
            let xv = c.input_at(rng, &x, at);
            let out = if in_place {
                c.out(xv, rows * dim, "x (in place)", Check::Float);
                xv
            } else {
                c.output_at(rng, rows * dim, 1, "out", Check::Float)
            };
            c.op(Op::RmsNorm { out, x: xv, w, rows, dim, eps });
            cases.push(c);
        }
    }
    Group { name: "RmsNorm".into(), cases }
}

fn rope(rng: &mut Rng) -> Group {
    let mut cases = Vec::new();
    let positions = vec![0, 1, 17, 255, 4099];
    for mode in [RopeMode::Neox, RopeMode::Interleaved] {
        for theta in [1e4f32, 1e6] {
            for scale in [1.0f32, 8.0] {
                for (heads, head_dim, rows) in [(3, 8, 5), (4, 64, 5), (2, 128, 3), (1, 256, 5)] {
                    let step =
                        StepData { tokens: vec![0; positions.len()], positions: positions.clone(), seqs: vec![] };
                    let mut c = Case::new(
                        format!(
                            "Rope {mode:?} theta={theta:e} scale={scale} heads={heads} head_dim={head_dim} rows={rows}"
                        ),
                        step,
                    );
                    let x = c.random_at(rng, rows * heads * head_dim, 2.0, 3);
                    c.out(x, rows * heads * head_dim, "x", Check::Float);
                    c.op(Op::Rope { x, rows, heads, head_dim, theta, scale, mode });
                    cases.push(c);
                }
            }
        }
    }
    Group { name: "Rope, both modes".into(), cases }
}

/// Steps of several sequences: decode rows and prefill rows together.
fn mixed_seqs() -> Vec<SeqSpan> {
    vec![
        SeqSpan { row: 0, len: 1, cache_row: 0, pos0: 40, ring_row: 0 },
        SeqSpan { row: 1, len: 9, cache_row: 64, pos0: 0, ring_row: 0 },
        SeqSpan { row: 10, len: 30, cache_row: 128, pos0: 20, ring_row: 0 },
    ]
}

fn store_kv(rng: &mut Rng) -> Group {
    let mut cases = Vec::new();
    let long = vec![
        SeqSpan { row: 0, len: 1, cache_row: 0, pos0: 700, ring_row: 0 },
        SeqSpan { row: 1, len: 3, cache_row: 704, pos0: 253, ring_row: 0 },
    ];
    for (name, seqs) in [("mixed", mixed_seqs()), ("long", long)] {
        for width in [64, 192, 256] {
            let step = StepData::of_seqs(&seqs);
            let cache_rows = seqs.iter().map(|s| (s.cache_row + s.pos0 + s.len) as usize).max().unwrap_or(0);
            let rows = step.positions.len();
            let mut c = Case::new(format!("StoreKv {name} width={width}"), step);
            let src = c.random_at(rng, rows * width, 1.0, 1);
            let cache = c.output_at(rng, cache_rows * width, 3, "cache", Check::Exact);
            c.op(Op::StoreKv { cache, src, width, ring: 0, kv: KvType::F32 });
            cases.push(c);
        }
    }
    Group { name: "StoreKv".into(), cases }
}

/// Rows of ring caches of `ring` rows a slot that `seqs` reach.
fn ring_rows(seqs: &[SeqSpan], ring: usize) -> usize {
    seqs.iter().map(|s| s.ring_row as usize + ring.min((s.pos0 + s.len) as usize)).max().unwrap_or(0)
}

/// Rows of the caches `seqs` reach: linear (`ring == 0`, from each sequence's `cache_row`) or
/// rings of `ring` rows a slot.
fn cache_rows(seqs: &[SeqSpan], ring: usize) -> usize {
    match ring {
        0 => seqs.iter().map(|s| (s.cache_row + s.pos0 + s.len) as usize).max().unwrap_or(0),
        r => ring_rows(seqs, r),
    }
}

/// StoreKv into caches of `kv` elements: ring caches (a decode row, a prefill run wrapping the
/// ring, a short sequence that has not filled it); for f16 also linear ones and rounding's edges.
fn store_kv_caches(rng: &mut Rng, kv: KvType) -> Group {
    let f16 = kv == KvType::F16;
    let mut steps = vec![("ring", ring_seqs(), 24)];
    if f16 {
        steps.insert(0, ("mixed", mixed_seqs(), 0));
    }
    let mut cases = Vec::new();
    for (name, seqs, ring) in steps {
        for width in [64, 256] {
            let step = StepData::of_seqs(&seqs);
            let rows = step.positions.len();
            let tag = if f16 { format!("f16 {name}") } else { format!("ring={ring}") };
            let mut c = Case::new(format!("StoreKv {tag} width={width}"), step);
            let src = c.random_at(rng, rows * width, 1.0, 1);
            let cache = c.output_at(rng, cache_rows(&seqs, ring) * kv.row_words(width), 3, "cache", Check::Exact);
            c.op(Op::StoreKv { cache, src, width, ring, kv });
            cases.push(c);
        }
    }
    if f16 {
        // Rounding's edges: ties (to even), the largest half and overflow, subnormal halves and
        // underflow (a tie at half the smallest), signed zeros and infinities.
        let edges: Vec<f32> = [
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            -(1.0 + 1.0 / 2048.0),
            65504.0,
            65519.0,
            65520.0,
            -1e9,
            f32::INFINITY,
            f32::NEG_INFINITY,
            6.103_515_6e-5,
            6.0e-5,
            2f32.powi(-24),
            2f32.powi(-25),
            3.0 * 2f32.powi(-26),
            1e-30,
            -0.0,
        ]
        .into_iter()
        .cycle()
        .take(64)
        .collect();
        let seqs = [SeqSpan { row: 0, len: 1, cache_row: 0, pos0: 3, ring_row: 0 }];
        let mut c = Case::new("StoreKv f16 edge values", StepData::of_seqs(&seqs));
        let src = c.input_at(rng, &edges, 1);
        let cache = c.output_at(rng, 4 * 64 / 2, 3, "cache", Check::Exact);
        c.op(Op::StoreKv { cache, src, width: 64, ring: 0, kv });
        cases.push(c);
    }
    let name = if f16 { "StoreKv, f16 caches" } else { "StoreKv, ring caches" };
    Group { name: name.into(), cases }
}

/// A step of attention over caches: what it is, window, ring (0: linear), its sequences.
type AttnStep = (&'static str, usize, usize, Vec<SeqSpan>);

/// Ring caches: `ring = window + longest - 1` (the least the contract allows), sequences whose
/// keys wrap the ring, in decode and in prefill blocks (rows ≥ 32 take attention_blk on
/// Vulkan), and key ranges crossing 256-key chunks.
fn ring_attention_steps() -> Vec<AttnStep> {
    vec![
        (
            "decode and prefill rows wrapping the ring",
            16,
            31,
            vec![
                SeqSpan { row: 0, len: 16, cache_row: 0, pos0: 610, ring_row: 0 },
                SeqSpan { row: 16, len: 1, cache_row: 0, pos0: 700, ring_row: 31 },
                SeqSpan { row: 17, len: 5, cache_row: 0, pos0: 2, ring_row: 62 },
                SeqSpan { row: 22, len: 1, cache_row: 0, pos0: 30, ring_row: 93 },
            ],
        ),
        (
            "prefill blocks, long window",
            300,
            336,
            vec![
                SeqSpan { row: 0, len: 37, cache_row: 0, pos0: 1000, ring_row: 0 },
                SeqSpan { row: 37, len: 3, cache_row: 0, pos0: 334, ring_row: 336 },
            ],
        ),
    ]
}

/// Attention over caches of `kv` elements for each step, GQA and plain, with and without a
/// softcap. f16 caches hold random halves, with subnormal ones and signed zeros among them.
fn attention_caches(rng: &mut Rng, kv: KvType, steps: &[AttnStep]) -> Vec<Group> {
    let f16 = kv == KvType::F16;
    // Some subnormal halves and signed zeros (widened exactly too), packed two a word.
    let cache = |x: Vec<f32>| -> Vec<f32> {
        if !f16 {
            return x;
        }
        let odd: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| match i % 13 {
                3 => v * 1e-6,
                7 => -0.0,
                _ => v,
            })
            .collect();
        pack_f16(&odd)
    };
    let mut groups = Vec::new();
    for (what, window, ring, seqs) in steps {
        let (window, ring) = (*window, *ring);
        let step = StepData::of_seqs(seqs);
        let rows = step.positions.len();
        let n = cache_rows(seqs, ring);
        for (heads, kv_heads, head_dim) in [(4, 1, 256), (9, 3, 64)] {
            let k = Arc::new(cache(rng.vec(n * kv_heads * head_dim, 1.0)));
            let v = Arc::new(cache(rng.vec(n * kv_heads * head_dim, 1.0)));
            let mut cases = Vec::new();
            for softcap in [0.0f32, 50.0] {
                let scale = if softcap > 0.0 { 1.0 } else { 1.0 / (head_dim as f32).sqrt() };
                let shape = format!("{heads}/{kv_heads}x{head_dim} window={window} ring={ring} softcap={softcap}");
                let name =
                    if f16 { format!("Attention f16 {what}: {shape}") } else { format!("Attention {what}: {shape}") };
                let mut c = Case::new(name, step.clone());
                let q = c.random_at(rng, rows * heads * head_dim, 1.0, 1);
                let (kb, vb) = (c.shared(k.clone()), c.shared(v.clone()));
                let out = c.output_at(rng, rows * heads * head_dim, 3, "out", Check::Float);
                c.op(Op::Attention {
                    out,
                    q,
                    k: kb,
                    v: vb,
                    heads,
                    kv_heads,
                    head_dim,
                    scale,
                    window,
                    softcap,
                    ring,
                    kv,
                });
                cases.push(c);
            }
            let caches = if f16 { "f16 caches" } else { "ring caches" };
            groups.push(Group { name: format!("Attention, {caches}, {what}, {heads}/{kv_heads}x{head_dim}"), cases });
        }
    }
    groups
}

/// Qkv's steps over ring caches of 16 rows a slot: one token, and a batch of two sequences.
fn ring_qkv_steps() -> Vec<(Vec<SeqSpan>, usize)> {
    vec![
        (vec![SeqSpan { row: 0, len: 1, cache_row: 0, pos0: 37, ring_row: 16 }], 16),
        (
            vec![
                SeqSpan { row: 0, len: 1, cache_row: 0, pos0: 40, ring_row: 0 },
                SeqSpan { row: 1, len: 6, cache_row: 0, pos0: 13, ring_row: 16 },
            ],
            16,
        ),
    ]
}

/// Qkv storing into caches of `kv` elements through its epilogue, for each (step, ring): a
/// quantized format and a float one, f32 and quantized input.
fn qkv_caches(rng: &mut Rng, kv: KvType, steps: &[(Vec<SeqSpan>, usize)]) -> Group {
    let (heads, kv_heads, head_dim, cols) = (4, 2, 64, 256);
    let rope = Some(RopeSpec { theta: 1e4, scale: 1.0, mode: RopeMode::Neox });
    let f16 = kv == KvType::F16;
    let mut cases = Vec::new();
    for fmt in [Format::Q8_0, Format::F16] {
        let layout = fmt.act_layout();
        for input in [Input::F32, Input::Q8] {
            if input == Input::Q8 && layout.is_none() {
                continue;
            }
            for (seqs, ring) in steps {
                let ring = *ring;
                let step = StepData::of_seqs(seqs);
                let n = step.positions.len();
                let tag = if f16 { "f16 caches, " } else { "" };
                let mut c = Case::new(format!("Qkv {fmt:?} {input:?} input, {tag}ring={ring}, n={n}"), step);
                let wq = c.weight(weight(rng, fmt, heads * head_dim, cols));
                let wk = c.weight(weight(rng, fmt, kv_heads * head_dim, cols));
                let wv = c.weight(weight(rng, fmt, kv_heads * head_dim, cols));
                let (q_norm, k_norm) =
                    (Some(c.weight(norm_weight(rng, head_dim))), Some(c.weight(norm_weight(rng, head_dim))));
                let x = activations(rng, n, cols);
                let x = mat_in(&mut c, rng, &x, n, cols, input, layout);
                let q = c.output_at(rng, n * heads * head_dim, 3, "q", Check::Float);
                let k = c.output_at(rng, n * kv_heads * head_dim, 0, "k", Check::Float);
                let v = c.output_at(rng, n * kv_heads * head_dim, 1, "v", Check::Float);
                // f16 caches are pairs of halves in a word: compared bit for bit.
                let check = if f16 { Check::Exact } else { Check::Float };
                let cache = cache_rows(seqs, ring) * kv.row_words(kv_heads * head_dim);
                let k_cache = Some(c.output_at(rng, cache, 0, "k cache", check));
                let v_cache = Some(c.output_at(rng, cache, 2, "v cache", check));
                c.op(Op::Qkv {
                    x,
                    wq,
                    wk,
                    wv,
                    q,
                    k,
                    v,
                    n,
                    heads,
                    kv_heads,
                    head_dim,
                    q_norm,
                    k_norm,
                    eps: 1e-6,
                    rope,
                    k_cache,
                    v_cache,
                    ring,
                    kv,
                });
                cases.push(c);
            }
        }
    }
    let name = if f16 { "Qkv, f16 caches" } else { "Qkv, ring caches" };
    Group { name: name.into(), cases }
}

fn attention(rng: &mut Rng) -> Vec<Group> {
    let steps = [
        ("decode and prefill rows", mixed_seqs()),
        (
            // Long contexts crossing 256-key chunks, and exactly 256 and 512 keys.
            "batched decode, long contexts",
            vec![
                SeqSpan { row: 0, len: 1, cache_row: 0, pos0: 700, ring_row: 0 },
                SeqSpan { row: 1, len: 1, cache_row: 704, pos0: 255, ring_row: 0 },
                SeqSpan { row: 2, len: 1, cache_row: 960, pos0: 511, ring_row: 0 },
            ],
        ),
        (
            "prefill chunk on a long context",
            vec![
                SeqSpan { row: 0, len: 16, cache_row: 0, pos0: 600, ring_row: 0 },
                SeqSpan { row: 16, len: 1, cache_row: 640, pos0: 612, ring_row: 0 },
            ],
        ),
        (
            // Blocks of prefill rows whose keys cross the 512-key chunk, and a sequence that
            // starts inside a block.
            "prefill blocks on a long context",
            vec![
                SeqSpan { row: 0, len: 37, cache_row: 0, pos0: 490, ring_row: 0 },
                SeqSpan { row: 37, len: 3, cache_row: 640, pos0: 100, ring_row: 0 },
            ],
        ),
    ];
    let mut groups = Vec::new();
    for (what, seqs) in &steps {
        let step = StepData::of_seqs(seqs);
        let rows = step.positions.len();
        let cache_rows = seqs.iter().map(|s| (s.cache_row + s.pos0 + s.len) as usize).max().unwrap_or(0);
        for (heads, kv_heads, head_dim) in [(4, 1, 256), (9, 3, 64), (2, 2, 8), (8, 8, 128)] {
            let k = Arc::new(rng.vec(cache_rows * kv_heads * head_dim, 1.0));
            let v = Arc::new(rng.vec(cache_rows * kv_heads * head_dim, 1.0));
            let mut cases = Vec::new();
            for window in [0, 7, 16] {
                for softcap in [0.0f32, 30.0, 50.0] {
                    // With a softcap, scale 1 makes scores large enough for the cap to bite.
                    let scale = if softcap > 0.0 { 1.0 } else { 1.0 / (head_dim as f32).sqrt() };
                    let mut c = Case::new(
                        format!("Attention {what}: {heads}/{kv_heads}x{head_dim} window={window} softcap={softcap}"),
                        step.clone(),
                    );
                    let q = c.random_at(rng, rows * heads * head_dim, 1.0, 1);
                    let (kb, vb) = (c.shared(k.clone()), c.shared(v.clone()));
                    let out = c.output_at(rng, rows * heads * head_dim, 3, "out", Check::Float);
                    c.op(Op::Attention {
                        out,
                        q,
                        k: kb,
                        v: vb,
                        heads,
                        kv_heads,
                        head_dim,
                        scale,
                        window,
                        softcap,
                        ring: 0,
                        kv: KvType::F32,
                    });
                    cases.push(c);
                }
            }
            groups.push(Group { name: format!("Attention {what}, {heads}/{kv_heads}x{head_dim}"), cases });
        }
    }
    groups
}

fn elementwise(rng: &mut Rng) -> Group {
    let mut cases = Vec::new();
    let data = |rng: &mut Rng, len: usize| {
        let mut v = rng.vec(len, 8.0);
        if len >= 100 {
            v[len - 6..].copy_from_slice(&[0.0, -0.0, 25.0, -25.0, 1e-3, -1e-3]);
        }
        v
    };
    for len in [1, 7, 1000, 4099] {
        // Add: out apart, out == a, out == b, out == a == b.
        for form in ["out apart", "out == a", "out == b", "out == a == b"] {
            let mut c = Case::new(format!("Add len={len} {form}"), StepData::one_seq(1, 0));
            let (da, db) = (data(rng, len), data(rng, len));
            let a = c.input_at(rng, &da, 3);
            let b = if form == "out == a == b" { a } else { c.input_at(rng, &db, 1) };
            let out = match form {
                "out apart" => c.output_at(rng, len, 1, "out", Check::Float),
                "out == b" => b,
                _ => a,
            };
            if form != "out apart" {
                c.out(out, len, "out (in place)", Check::Float);
            }
            c.op(Op::Add { out, a, b, len });
            cases.push(c);
        }
        for gate_kind in [Gate::GeluTanh, Gate::Silu] {
            for in_place in [false, true] {
                let mut c = Case::new(
                    format!("{gate_kind:?}Mul len={len}{}", if in_place { " out == gate" } else { "" }),
                    StepData::one_seq(1, 0),
                );
                let (dg, du) = (data(rng, len), data(rng, len));
                let gate = c.input_at(rng, &dg, 1);
                let up = c.input_at(rng, &du, 0);
                let out = if in_place {
                    c.out(gate, len, "gate (in place)", Check::Float);
                    gate
                } else {
                    c.output_at(rng, len, 3, "out", Check::Float)
                };
                c.op(match gate_kind {
                    Gate::GeluTanh => Op::GeluTanhMul { out, gate, up, len },
                    Gate::Silu => Op::SiluMul { out, gate, up, len },
                });
                cases.push(c);
            }
        }
        for cap in [5.0f32, 30.0, 50.0] {
            let mut c = Case::new(format!("Softcap len={len} cap={cap}"), StepData::one_seq(1, 0));
            let mut v = data(rng, len);
            v.iter_mut().step_by(3).for_each(|x| *x *= 20.0);
            let x = c.input_at(rng, &v, 3);
            c.out(x, len, "x", Check::Float);
            c.op(Op::Softcap { x, len, cap });
            cases.push(c);
        }
    }
    Group { name: "Add, GeluTanhMul, SiluMul, Softcap".into(), cases }
}

fn argmax(rng: &mut Rng) -> Group {
    let (nan, inf) = (f32::NAN, f32::INFINITY);
    let mut cases = Vec::new();
    // Rows of 70,003: every pattern where the CPU backend splits a row across threads.
    for (rows, cols) in [(1, 1), (9, 7), (5, 1000), (2, 4099), (1, 262_144), (9, 70_003)] {
        let mut x = rng.vec(rows * cols, 10.0);
        for (r, row) in x.chunks_exact_mut(cols).enumerate() {
            let last = cols - 1;
            match r {
                0 if cols > 1 => {
                    // NaN first, and the largest value last.
                    row[0] = nan;
                    row[last] = 20.0;
                }
                1 => row[cols / 2] = inf,
                2 => {
                    // A tie: the first index wins.
                    row[1] = 30.0;
                    row[last] = 30.0;
                }
                3 => row.fill(nan),
                4 => row.fill(-inf),
                5 => {
                    // +inf ties with f32::MAX (NaN counts as −∞, +∞ as the largest finite value).
                    row[2] = f32::MAX;
                    row[5] = inf;
                }
                6 => {
                    row.fill(-0.0);
                    row[4] = 0.0;
                }
                7 => {
                    row[0] = -inf;
                    row[3] = nan;
                }
                _ => {}
            }
        }
        let mut c = Case::new(format!("Argmax rows={rows} cols={cols}"), StepData::one_seq(1, 0));
        let xv = c.input_at(rng, &x, 1);
        let out = c.output_at(rng, rows, 3, "indices", Check::Exact);
        c.op(Op::Argmax { out, x: xv, rows, cols });
        cases.push(c);
    }
    Group { name: "Argmax".into(), cases }
}

/// HeadArgmax (greedy decoding's LM head and its argmax as one op; only the ids are checked,
/// the logits are scratch): Q8_0 heads of 1–16 tokens, rows not a whole number of the CPU's
/// chunks, a dominant row repeated further down (a tie the first index wins), a near copy of it
/// one code apart (exact logits decide), an infinite scale (no estimate: the expansion), and a
/// Q4_0 head (no estimate kernel).
fn head_argmax(rng: &mut Rng) -> Group {
    let mut cases = Vec::new();
    let f16 = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
    for (fmt, n, rows, cols, kind) in [
        (Format::Q8_0, 1, 1000, 640, 0),
        (Format::Q8_0, 2, 1000, 640, 0),
        (Format::Q8_0, 3, 4099, 256, 1),
        (Format::Q8_0, 8, 20_000, 640, 1),
        (Format::Q8_0, 16, 1537, 640, 2),
        (Format::Q8_0, 5, 700, 96, 3),
        (Format::Q4_0, 4, 1000, 256, 0),
    ] {
        let name = format!("HeadArgmax {fmt:?} n={n} rows={rows} cols={cols} case {kind}");
        let mut c = Case::new(name, StepData::one_seq(n, 0));
        let mut w = weight(rng, fmt, rows, cols);
        let rb = fmt.bytes_for(cols).expect("a block format");
        let mut b = w.data.as_slice().to_vec();
        let (s, s2) = (rows / 3, rows - 2);
        match kind {
            // Row s dominates (large scales), a copy of it at s2 ties.
            1 | 2 => {
                for blk in b[s * rb..(s + 1) * rb].chunks_exact_mut(34) {
                    blk[..2].copy_from_slice(&f16(0.5));
                }
                b.copy_within(s * rb..(s + 1) * rb, s2 * rb);
                if kind == 2 {
                    // ... and a near copy just before it: one code one step apart.
                    b.copy_within(s * rb..(s + 1) * rb, (s - 1) * rb);
                    let at = (s - 1) * rb + 2 + 7;
                    b[at] = b[at].wrapping_add(1).min(126);
                }
            }
            // An infinite scale: a non-finite logit somewhere.
            3 => b[5 * rb..5 * rb + 2].copy_from_slice(&0x7C00u16.to_le_bytes()),
            _ => {}
        }
        w = HostWeight::new(fmt, rows, cols, HostBytes::from_vec(b)).expect("consistent weight");
        let wi = c.weight(w);
        let layout = fmt.act_layout().expect("a block format");
        let mut x = activations(rng, n, cols);
        if kind == 1 || kind == 2 {
            // Positive activations, so the large-scale row's logit is the largest... mostly.
            x.iter_mut().for_each(|v| *v = v.abs());
        }
        let xq = c.buf(quantize_rows(&x, n, cols, layout));
        let logits = c.buf(vec![0.0; n * rows]);
        let out = c.output_at(rng, n, 2, "indices", Check::Exact);
        c.op(Op::HeadArgmax { out, xq, w: wi, n, vocab: rows, logits });
        cases.push(c);
    }
    Group { name: "HeadArgmax".into(), cases }
}

/// Copy: between buffers and within one (a KV cache's slots, either way round), lengths around
/// the CPU backend's split into threads; values a careless copy would change (subnormals, −0);
/// a chain of copies through one region and copies mixed with a compute op in one step (the
/// ordering a device needs barriers for).
fn copy(rng: &mut Rng) -> Group {
    let mut cases = Vec::new();
    let data = |rng: &mut Rng, len: usize| {
        let mut v = rng.vec(len, 8.0);
        let odd = [-0.0, 1e-40, -3e-39, f32::MIN_POSITIVE, f32::MAX, -f32::MAX];
        v.iter_mut().step_by(5).zip(odd.iter().cycle()).for_each(|(x, &o)| *x = o);
        v
    };
    for len in [1, 7, 1000, 4099, 3 * 4096 + 5] {
        let mut c = Case::new(format!("Copy len={len} between buffers"), StepData::one_seq(1, 0));
        let d = data(rng, len);
        let src = c.input_at(rng, &d, 3);
        let out = c.output_at(rng, len, 1, "out", Check::Exact);
        c.op(Op::Copy { out, src, len });
        cases.push(c);
        // Slot 0 to slot 2 and slot 2 to slot 1 of one cache of 3 slots (`len` rows each).
        for (from, to) in [(0, 2), (2, 1)] {
            let mut c = Case::new(format!("Copy len={len} slot {from} to {to} of one buffer"), StepData::one_seq(1, 0));
            let d = data(rng, 3 * len + 4);
            let cache = c.input_at(rng, &d, 2);
            let out = cache.at(to * len + 1);
            c.out(out, len, "cache", Check::Exact);
            c.op(Op::Copy { out, src: cache.at(from * len + 1), len });
            cases.push(c);
        }
    }
    // a → b, then b → c, then c → a's second half: each copy reads what the one before wrote.
    let len = 515;
    let mut c = Case::new("Copy chain through one buffer", StepData::one_seq(1, 0));
    let d = data(rng, 4 * len);
    let buf = c.input_at(rng, &d, 1);
    c.out(buf.at(len), 3 * len, "buffer", Check::Exact);
    c.op(Op::Copy { out: buf.at(len), src: buf, len });
    c.op(Op::Copy { out: buf.at(3 * len), src: buf.at(len), len });
    c.op(Op::Copy { out: buf.at(2 * len), src: buf.at(3 * len), len });
    cases.push(c);
    // Compute, copy its result, compute on the copy.
    let mut c = Case::new("Copy between Adds in one step", StepData::one_seq(1, 0));
    let (da, db) = (rng.vec(len, 8.0), rng.vec(len, 8.0));
    let a = c.input_at(rng, &da, 3);
    let b = c.input_at(rng, &db, 1);
    let t = c.output_at(rng, len, 2, "sum", Check::Float);
    let copied = c.output_at(rng, len, 0, "copied sum", Check::Float);
    let again = c.output_at(rng, len, 4, "sum again", Check::Float);
    c.op(Op::Add { out: t, a, b, len });
    c.op(Op::Copy { out: copied, src: t, len });
    c.op(Op::Add { out: again, a: copied, b, len });
    cases.push(c);
    Group { name: "Copy".into(), cases }
}

// ---- fused ops ----

fn add_rms_norm(rng: &mut Rng) -> Group {
    let mut cases = Vec::new();
    let dim = 768;
    for branch in ["no branch", "branch", "branch + post norm"] {
        for quant in [None, Some(ActLayout::Q8A), Some(ActLayout::Q8K)] {
            for rows in [1, 5, 33] {
                let mut c = Case::new(
                    format!("AddRmsNorm {branch} quant={quant:?} rows={rows} dim={dim}"),
                    StepData::one_seq(rows, 0),
                );
                let w = c.weight(norm_weight(rng, dim));
                let post = (branch == "branch + post norm").then(|| c.weight(norm_weight(rng, dim)));
                let x = c.random_at(rng, rows * dim, 4.0, 3);
                // With a branch the new residual goes to its own buffer (the prologue form a GPU
                // fuses into the next matmuls); without one it is x itself.
                let (b, x_out) = if branch != "no branch" {
                    let b = c.random_at(rng, rows * dim, 4.0, 1);
                    (Some(b), c.output_at(rng, rows * dim, 1, "x_out = x + branch", Check::Float))
                } else {
                    (None, x)
                };
                let out = c.output_at(rng, rows * dim, 1, "out", Check::Float);
                let quant = quant.map(|layout| {
                    let len = rows * dim / act_block(layout) * act_words(layout);
                    QuantOut { out: c.output_at(rng, len, 1, "quantized out", Check::DerivedBlocks(layout)), layout }
                });
                c.op(Op::AddRmsNorm { x, x_out, branch: b, post, out, w, quant, rows, dim, eps: 1e-6 });
                cases.push(c);
            }
        }
    }
    Group { name: "AddRmsNorm".into(), cases }
}

/// How a fused matmul reads its rows, by name.
#[derive(Copy, Clone, Debug, PartialEq)]
enum Input {
    F32,
    Int8,
    /// Rows quantized beforehand (as `QuantizeAct` does).
    Q8,
}

/// `x` as a fused op's input: f32 rows, or their blocks in `layout`.
fn mat_in(
    c: &mut Case,
    rng: &mut Rng,
    x: &[f32],
    n: usize,
    cols: usize,
    input: Input,
    layout: Option<ActLayout>,
) -> MatIn<Buf> {
    match input {
        Input::F32 => MatIn::F32 { x: c.input_at(rng, x, 1), act: ActQuant::F32 },
        Input::Int8 => MatIn::F32 { x: c.input_at(rng, x, 1), act: ActQuant::Int8 },
        Input::Q8 => MatIn::Q8(c.buf(quantize_rows(x, n, cols, layout.expect("block formats")))),
    }
}

fn qkv(rng: &mut Rng) -> Vec<Group> {
    let (heads, kv_heads, head_dim, cols) = (4, 2, 64, 512);
    let formats = [
        [Format::Q4_K, Format::Q4_K, Format::Q6_K],
        [Format::Q5_0, Format::Q5_0, Format::Q8_0],
        [Format::Q4_1, Format::Q4_1, Format::Q5_1],
        [Format::F16, Format::F16, Format::BF16],
    ];
    // Gemma-like (norms, Neox RoPE, caches), Llama-like (interleaved RoPE scaled, caches), bare.
    let variants = [
        (
            "q/k norms, Neox rope 1e6, caches",
            true,
            Some(RopeSpec { theta: 1e6, scale: 1.0, mode: RopeMode::Neox }),
            true,
        ),
        (
            "interleaved rope 1e4 scale 8, caches",
            false,
            Some(RopeSpec { theta: 1e4, scale: 8.0, mode: RopeMode::Interleaved }),
            true,
        ),
        ("no norms, rope or caches", false, None, false),
    ];
    let steps = [
        vec![SeqSpan { row: 0, len: 1, cache_row: 0, pos0: 17, ring_row: 0 }],
        vec![
            SeqSpan { row: 0, len: 1, cache_row: 0, pos0: 300, ring_row: 0 },
            SeqSpan { row: 1, len: 4, cache_row: 320, pos0: 0, ring_row: 0 },
        ],
        vec![SeqSpan { row: 0, len: 33, cache_row: 0, pos0: 5, ring_row: 0 }],
    ];
    let mut groups = Vec::new();
    for fmts in formats {
        let layout = fmts[0].act_layout();
        let mut cases = Vec::new();
        for input in [Input::F32, Input::Int8, Input::Q8] {
            if input == Input::Q8 && layout.is_none() {
                continue;
            }
            for &(variant, norms, rope, caches) in &variants {
                for seqs in &steps {
                    let step = StepData::of_seqs(seqs);
                    let n = step.positions.len();
                    let cache_rows = seqs.iter().map(|s| (s.cache_row + s.pos0 + s.len) as usize).max().unwrap_or(0);
                    let mut c = Case::new(format!("Qkv {fmts:?} {input:?} input, {variant}, n={n}"), step);
                    let wq = c.weight(weight(rng, fmts[0], heads * head_dim, cols));
                    let wk = c.weight(weight(rng, fmts[1], kv_heads * head_dim, cols));
                    let wv = c.weight(weight(rng, fmts[2], kv_heads * head_dim, cols));
                    let (q_norm, k_norm) = if norms {
                        (Some(c.weight(norm_weight(rng, head_dim))), Some(c.weight(norm_weight(rng, head_dim))))
                    } else {
                        (None, None)
                    };
                    let x = activations(rng, n, cols);
                    let x = mat_in(&mut c, rng, &x, n, cols, input, layout);
                    let check = if n > 16 { Check::Prefill } else { Check::Float };
                    let q = c.output_at(rng, n * heads * head_dim, 3, "q", check);
                    let k = c.output_at(rng, n * kv_heads * head_dim, 0, "k", check);
                    let v = c.output_at(rng, n * kv_heads * head_dim, 1, "v", check);
                    let width = kv_heads * head_dim;
                    let (k_cache, v_cache) = if caches {
                        (
                            Some(c.output_at(rng, cache_rows * width, 0, "k cache", check)),
                            Some(c.output_at(rng, cache_rows * width, 2, "v cache", check)),
                        )
                    } else {
                        (None, None)
                    };
                    c.op(Op::Qkv {
                        x,
                        wq,
                        wk,
                        wv,
                        q,
                        k,
                        v,
                        n,
                        heads,
                        kv_heads,
                        head_dim,
                        q_norm,
                        k_norm,
                        eps: 1e-6,
                        rope,
                        k_cache,
                        v_cache,
                        ring: 0,
                        kv: KvType::F32,
                    });
                    cases.push(c);
                }
            }
        }
        groups.push(Group { name: format!("Qkv {fmts:?}"), cases });
    }
    groups
}

fn gated_ffn(rng: &mut Rng) -> Vec<Group> {
    let (cols, ffn) = (512, 512);
    let formats = [
        [Format::Q4_K, Format::Q4_K],
        [Format::Q8_0, Format::Q8_0],
        [Format::Q5_1, Format::Q4_0],
        [Format::BF16, Format::F16],
    ];
    let shapes =
        [(1, None), (5, Some(ActLayout::Q8A)), (33, Some(ActLayout::Q8K)), (1, Some(ActLayout::Q8K)), (16, None)];
    let mut groups = Vec::new();
    for fmts in formats {
        let layout = fmts[0].act_layout();
        let mut cases = Vec::new();
        for input in [Input::F32, Input::Int8, Input::Q8] {
            if input == Input::Q8 && layout.is_none() {
                continue;
            }
            for kind in [Gate::GeluTanh, Gate::Silu] {
                for &(n, quant) in &shapes {
                    let mut c = Case::new(
                        format!("GatedFfn {fmts:?} {input:?} input, {kind:?}, quant={quant:?}, n={n}"),
                        StepData::one_seq(n, 0),
                    );
                    let w_gate = c.weight(weight(rng, fmts[0], ffn, cols));
                    let w_up = c.weight(weight(rng, fmts[1], ffn, cols));
                    let x = activations(rng, n, cols);
                    let x = mat_in(&mut c, rng, &x, n, cols, input, layout);
                    let check = if n > 16 { Check::Prefill } else { Check::Float };
                    let gate = c.output_at(rng, n * ffn, 1, "gate", check);
                    let up = c.output_at(rng, n * ffn, 0, "up", check);
                    // The activation in place (over gate) or in its own buffer, both forms.
                    let out = if n % 2 == 0 { gate } else { c.output_at(rng, n * ffn, 0, "act(gate)·up", check) };
                    let quant = quant.map(|layout| {
                        let len = n * ffn / act_block(layout) * act_words(layout);
                        QuantOut {
                            out: c.output_at(rng, len, 0, "quantized activation", Check::DerivedBlocks(layout)),
                            layout,
                        }
                    });
                    c.op(Op::GatedFfn { x, w_gate, w_up, gate, up, out, n, ffn, kind, quant });
                    cases.push(c);
                }
            }
        }
        groups.push(Group { name: format!("GatedFfn {fmts:?}"), cases });
    }
    groups
}

/// One token's AddRmsNorm or GatedFfn with its quantized output read by the next matmul: the
/// pair a GPU backend records as one dispatch (the op as the matmul's prologue).
fn prologues(rng: &mut Rng) -> Vec<Group> {
    let mut groups = Vec::new();
    for fmt in [Format::Q5_0, Format::Q4_1, Format::Q8_0, Format::Q4_K, Format::Q6_K] {
        let layout = fmt.act_layout().expect("a block format");
        let mut cases = Vec::new();
        let (dim, rows) = (768, 300);
        for post in [false, true] {
            let mut c = Case::new(
                format!("AddRmsNorm (post norm: {post}) → MatMulQ8 {fmt:?} dim={dim}"),
                StepData::one_seq(1, 0),
            );
            let w = c.weight(norm_weight(rng, dim));
            let post = post.then(|| c.weight(norm_weight(rng, dim)));
            let wm = c.weight(weight(rng, fmt, rows, dim));
            let x = c.random_at(rng, dim, 4.0, 3);
            let b = c.random_at(rng, dim, 4.0, 1);
            let x_out = c.output_at(rng, dim, 1, "x_out = x + branch", Check::Float);
            let out = c.output_at(rng, dim, 1, "out", Check::Float);
            let len = dim / act_block(layout) * act_words(layout);
            let q = QuantOut { out: c.output_at(rng, len, 1, "quantized out", Check::DerivedBlocks(layout)), layout };
            c.op(Op::AddRmsNorm { x, x_out, branch: Some(b), post, out, w, quant: Some(q), rows: 1, dim, eps: 1e-6 });
            let mm = c.output_at(rng, rows, 1, "matmul out", Check::Exact);
            c.op(Op::MatMulQ8 { out: mm, xq: q.out, w: wm, n: 1 });
            cases.push(c);
        }
        let (cols, ffn) = (512, 1024);
        for kind in [Gate::GeluTanh, Gate::Silu] {
            let mut c = Case::new(format!("GatedFfn {kind:?} → MatMulQ8 {fmt:?} ffn={ffn}"), StepData::one_seq(1, 0));
            let w_gate = c.weight(weight(rng, fmt, ffn, cols));
            let w_up = c.weight(weight(rng, fmt, ffn, cols));
            let wd = c.weight(weight(rng, fmt, rows, ffn));
            let x = activations(rng, 1, cols);
            let x = mat_in(&mut c, rng, &x, 1, cols, Input::Q8, Some(layout));
            let gate = c.output_at(rng, ffn, 1, "gate", Check::Float);
            let up = c.output_at(rng, ffn, 0, "up", Check::Float);
            let out = c.output_at(rng, ffn, 0, "act(gate)·up", Check::Float);
            let len = ffn / act_block(layout) * act_words(layout);
            let q = QuantOut {
                out: c.output_at(rng, len, 0, "quantized activation", Check::DerivedBlocks(layout)),
                layout,
            };
            c.op(Op::GatedFfn { x, w_gate, w_up, gate, up, out, n: 1, ffn, kind, quant: Some(q) });
            let mm = c.output_at(rng, rows, 1, "matmul out", Check::Exact);
            c.op(Op::MatMulQ8 { out: mm, xq: q.out, w: wd, n: 1 });
            cases.push(c);
        }
        groups.push(Group { name: format!("Prologue {fmt:?}"), cases });
    }
    groups
}

/// One token's output projection, the residual junction after it (its branch the projection),
/// the gated MLP, the down projection and the next junction: the ops a GPU backend records with
/// each junction and the MLP's activation as tails of the matmuls before them (several tails in
/// one step, residuals in place and not).
fn tails(rng: &mut Rng) -> Vec<Group> {
    let (dim, ffn, attn, vocab) = (TAILS_DIM, 1024, 512, 300);
    let mut groups = Vec::new();
    for [fa, fb, fc] in [
        [Format::Q5_0, Format::Q5_0, Format::Q6_K],
        [Format::Q4_1, Format::Q4_1, Format::Q4_1],
        [Format::Q4_K, Format::Q8_0, Format::Q5_K],
        [Format::Q6_K, Format::Q4_K, Format::Q5_1],
        [Format::Q4_0, Format::Q5_1, Format::Q8_0],
    ] {
        let [la, lb, lc] = [fa, fb, fc].map(|f| f.act_layout().expect("a block format"));
        let words = |len: usize, l: ActLayout| len / act_block(l) * act_words(l);
        let mut cases = Vec::new();
        for (post, in_place, kind) in [(true, false, Gate::GeluTanh), (false, true, Gate::Silu)] {
            let mut c = Case::new(
                format!(
                    "MatMulQ8 {fa:?} → AddRmsNorm (post norm: {post}, in place: {in_place}) → GatedFfn {fb:?} {kind:?} → MatMulQ8 {fc:?} → AddRmsNorm → MatMulQ8"
                ),
                StepData::one_seq(1, 0),
            );
            let wo = c.weight(weight(rng, fa, dim, attn));
            let wg = c.weight(weight(rng, fb, ffn, dim));
            let wu = c.weight(weight(rng, fb, ffn, dim));
            let wd = c.weight(weight(rng, fc, dim, ffn));
            // The LM head with rows repeated in other workgroups: its argmax ties, the first wins.
            let wh = c.weight(repeated_rows(weight(rng, fa, vocab, dim), &[(7, 140), (7, 299), (7, 8)]));
            let (n1, n2) = (c.weight(norm_weight(rng, dim)), c.weight(norm_weight(rng, dim)));
            let p1 = post.then(|| c.weight(norm_weight(rng, dim)));
            let p2 = post.then(|| c.weight(norm_weight(rng, dim)));
            let a = activations(rng, 1, attn);
            let xa = c.buf(quantize_rows(&a, 1, attn, la));
            let x = if in_place {
                c.output_at(rng, dim, 3, "residual", Check::Float)
            } else {
                c.random_at(rng, dim, 4.0, 3)
            };
            let o = c.output_at(rng, dim, 1, "o projection", Check::Exact);
            c.op(Op::MatMulQ8 { out: o, xq: xa, w: wo, n: 1 });
            let (x1, q1) = junction(&mut c, rng, (x, o, n1, p1), in_place, lb, ["x + o", "normed", "quantized normed"]);
            let gate = c.output_at(rng, ffn, 1, "gate", Check::Float);
            let up = c.output_at(rng, ffn, 0, "up", Check::Float);
            let act = c.output_at(rng, ffn, 0, "act(gate)·up", Check::Float);
            let q2 = QuantOut {
                out: c.output_at(rng, words(ffn, lc), 0, "quantized activation", Check::DerivedBlocks(lc)),
                layout: lc,
            };
            c.op(Op::GatedFfn {
                x: MatIn::Q8(q1.out),
                w_gate: wg,
                w_up: wu,
                gate,
                up,
                out: act,
                n: 1,
                ffn,
                kind,
                quant: Some(q2),
            });
            let d = c.output_at(rng, dim, 1, "down projection", Check::Exact);
            c.op(Op::MatMulQ8 { out: d, xq: q2.out, w: wd, n: 1 });
            let (_, q3) =
                junction(&mut c, rng, (x1, d, n2, p2), in_place, la, ["x + down", "normed 2", "quantized normed 2"]);
            let h = c.output_at(rng, vocab, 1, "head", Check::Exact);
            c.op(Op::MatMulQ8 { out: h, xq: q3.out, w: wh, n: 1 });
            let am = c.output_at(rng, 1, 0, "argmax", Check::Exact);
            c.op(Op::Argmax { out: am, x: h, rows: 1, cols: vocab });
            cases.push(c);
        }
        // Gemma's attention shape: one token's Qkv (norms, Neox RoPE, caches), 256-wide heads.
        let (heads, kv_heads, hd) = (4, 1, 256);
        let seqs = [SeqSpan { row: 0, len: 1, cache_row: 3, pos0: 37, ring_row: 0 }];
        let mut c = Case::new(format!("Qkv {fa:?} one token, head_dim {hd}"), StepData::of_seqs(&seqs));
        let wq = c.weight(weight(rng, fa, heads * hd, dim));
        let wk = c.weight(weight(rng, fa, kv_heads * hd, dim));
        let wv = c.weight(weight(rng, fa, kv_heads * hd, dim));
        let (q_norm, k_norm) = (Some(c.weight(norm_weight(rng, hd))), Some(c.weight(norm_weight(rng, hd))));
        let x = activations(rng, 1, dim);
        let x = mat_in(&mut c, rng, &x, 1, dim, Input::Q8, Some(la));
        let q = c.output_at(rng, heads * hd, 3, "q", Check::Float);
        let k = c.output_at(rng, kv_heads * hd, 0, "k", Check::Float);
        let v = c.output_at(rng, kv_heads * hd, 1, "v", Check::Float);
        let k_cache = Some(c.output_at(rng, 48 * kv_heads * hd, 0, "k cache", Check::Float));
        let v_cache = Some(c.output_at(rng, 48 * kv_heads * hd, 2, "v cache", Check::Float));
        let rope = Some(RopeSpec { theta: 1e6, scale: 1.0, mode: RopeMode::Neox });
        c.op(Op::Qkv {
            x,
            wq,
            wk,
            wv,
            q,
            k,
            v,
            n: 1,
            heads,
            kv_heads,
            head_dim: hd,
            q_norm,
            k_norm,
            eps: 1e-6,
            rope,
            k_cache,
            v_cache,
            ring: 0,
            kv: KvType::F32,
        });
        cases.push(c);
        groups.push(Group { name: format!("Tail {fa:?} {fb:?} {fc:?}"), cases });
    }
    groups
}

// ---- f16 KV caches ----

/// `vals` rounded to f16 and packed two to a buffer word (element `2i` in the low half), as an
/// f16 cache holds them.
fn pack_f16(vals: &[f32]) -> Vec<f32> {
    vals.chunks(2)
        .map(|p| {
            let lo = half::f16::from_f32(p[0]).to_bits() as u32;
            let hi = p.get(1).map_or(0, |&x| half::f16::from_f32(x).to_bits() as u32);
            f32::from_bits(lo | hi << 16)
        })
        .collect()
}

/// The sequences of the ring caches' StoreKv step: a decode row, a prefill run that wraps the
/// ring, a short sequence that has not filled it.
fn ring_seqs() -> Vec<SeqSpan> {
    vec![
        SeqSpan { row: 0, len: 1, cache_row: 0, pos0: 700, ring_row: 0 },
        SeqSpan { row: 1, len: 20, cache_row: 0, pos0: 15, ring_row: 24 },
        SeqSpan { row: 21, len: 3, cache_row: 0, pos0: 2, ring_row: 48 },
        SeqSpan { row: 24, len: 24, cache_row: 0, pos0: 253, ring_row: 72 },
    ]
}

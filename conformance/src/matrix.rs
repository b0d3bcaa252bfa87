//! The conformance matrix: every op × weight format × shape, run on a backend under test and on
//! the reference (`CpuRef`, the definition of correct), compared output by output (ggml's
//! test-backend-ops).
//!
//! * The cases ([`cases`]) are data, written once: each is a step (host data, buffers with their
//!   initial contents, weights, ops naming buffers and weights by index) and the buffers to
//!   compare afterwards, whole (so a stray write outside an op's region shows too).
//! * [`check_all`] asks the backend's `supports()` first: an unsupported op × format prints one
//!   line and is skipped, unless a model needs it ([`needed_by_models`]), then it is a failure.
//! * Each output is checked for NaN/Inf first (a non-finite value where the reference has a
//!   finite one, or the other way round, fails), then against a [`Tolerance`]: bit for bit, or
//!   NMSE per op; integer outputs (quantized blocks, Argmax indices, the decode integer matvec)
//!   are always exact. A failure names the case, the output, the worst element, its index and
//!   both values.
//! * The reference's outputs are computed once per test binary and shared by every backend's test.
//!
//! Backends under test are instantiated in `tests/matrix.rs`; the constructors are here
//! ([`cpu`], [`cpu_scalar`], [`vulkan`]).

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use purehw_hal::{
    ActLayout, Backend, Format, HostBytes, HostWeight, Op, OpKind, SeqSpan, Step, View, act_block, act_words,
};
use purehw_hal_cpu::Cpu;
use purehw_hal_cpu_ref::CpuRef;
use purehw_hal_vulkan::{Tails, Vulkan, VulkanOptions};
use purehw_kernels::quant::{BlockQ8A, BlockQ8K};

mod cases;

// ---- backends under test ----

/// The fast CPU backend with `threads` threads and the SIMD kernels this CPU has.
pub fn cpu(threads: usize) -> Cpu {
    Cpu::new(threads).unwrap_or_else(|e| panic!("{e}"))
}

/// The fast CPU backend with the portable scalar kernels (the fallback where no SIMD set is).
pub fn cpu_scalar(threads: usize) -> Cpu {
    Cpu::with_kernels(threads, purehw_hal_cpu::simd::scalar_kernels()).unwrap_or_else(|e| panic!("{e}"))
}

/// How tests drive Vulkan: the device `PUREHW_VK_DEVICE` names (default: the best one), with the
/// validation layer on unless `PUREHW_VK_VALIDATION=0`.
pub fn vulkan_options() -> VulkanOptions {
    let mut o = VulkanOptions::from_env();
    o.validation = std::env::var("PUREHW_VK_VALIDATION").map_or(true, |v| v != "0");
    o
}

/// The Vulkan backend as [`vulkan_options`] says.
pub fn vulkan() -> Vulkan {
    Vulkan::new(&vulkan_options()).unwrap_or_else(|e| panic!("{e}"))
}

/// The Vulkan backend copying weights into device buffers even where it could use them in
/// place (as a discrete GPU does), so lavapipe checks that path.
pub fn vulkan_copying() -> Vulkan {
    let mut o = vulkan_options();
    o.import = Some(false);
    Vulkan::new(&o).unwrap_or_else(|e| panic!("{e}"))
}

/// The Vulkan backend with the GPUs' decode kernels forced on (split matmuls and their tails,
/// the integer matmul's wide variant), so that a CPU device such as lavapipe checks them too.
pub fn vulkan_gpu_kernels() -> Vulkan {
    let mut o = vulkan_options();
    o.split_matvec = Some(true);
    o.tails = Some(Tails::ALL);
    o.prologues = Some((false, false));
    // Block attention's smaller blocks (chosen per step), which the default does not take.
    o.attention_rows = Some(0);
    o.int_wide = Some(true);
    Vulkan::new(&o).unwrap_or_else(|e| panic!("{e}"))
}

/// The Vulkan backend with split matmuls and both prologues instead of tails (the decode
/// kernels `PUREHW_VK_PRO` chooses).
pub fn vulkan_gpu_prologues() -> Vulkan {
    let mut o = vulkan_options();
    o.split_matvec = Some(true);
    o.tails = Some(Tails::NONE);
    o.prologues = Some((true, true));
    Vulkan::new(&o).unwrap_or_else(|e| panic!("{e}"))
}

/// The Vulkan backend with every batched decode matmul (2–16 tokens, any rows) on the tiled
/// kernel (`PUREHW_VK_BATCH_TILE=2`) instead of the split one.
pub fn vulkan_batch_tile() -> Vulkan {
    let mut o = vulkan_options();
    o.split_matvec = Some(true);
    o.batch_tile = Some((2, 0));
    Vulkan::new(&o).unwrap_or_else(|e| panic!("{e}"))
}

/// Vulkan's tolerance: [`Tolerance::Exact`], or [`Tolerance::ExactFlushed`] on a device that
/// does not promise to keep f32 denormals.
pub fn vulkan_tolerance() -> Tolerance {
    if vulkan().info().denorm_preserve { Tolerance::Exact } else { Tolerance::ExactFlushed }
}

/// Whether a Vulkan device is there for `test`. Without one the test is skipped with a printed
/// line, unless `PUREHW_REQUIRE_VULKAN=1` (CI on lavapipe), where that is a failure.
pub fn vulkan_present(test: &str) -> bool {
    match Vulkan::new(&vulkan_options()) {
        Ok(_) => true,
        Err(e) if std::env::var("PUREHW_REQUIRE_VULKAN").is_ok_and(|v| v == "1") => {
            panic!("{test}: PUREHW_REQUIRE_VULKAN=1 but there is no usable Vulkan device: {e}")
        }
        Err(e) => {
            eprintln!("{test}: SKIPPED, no usable Vulkan device ({e}); set PUREHW_REQUIRE_VULKAN=1 to fail instead");
            false
        }
    }
}

// ---- tolerances ----

/// How close a backend's outputs must be to the reference's.
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum Tolerance {
    /// Bit for bit, NaN payloads included: what `hal-cpu` and `hal-vulkan` promise.
    Exact,
    /// Bit for bit, except that a float result the reference has as a subnormal may be a zero
    /// of the same sign: a device whose driver does not keep f32 denormals (NVIDIA's reports
    /// `shaderDenormPreserveFloat32 = false`) flushes them. Integer outputs stay exact.
    ExactFlushed,
    /// NMSE `Σ(got − want)² / Σ want²` per output: `float_ops` for float ops, `prefill_matmul`
    /// for a matmul over more than 16 rows. Integer outputs stay exact.
    Nmse { float_ops: f64, prefill_matmul: f64 },
}

impl Tolerance {
    /// The bounds for a backend that may reorder float sums.
    pub const NMSE: Tolerance = Tolerance::Nmse { float_ops: 1e-7, prefill_matmul: 1e-6 };
}

/// How one output of a case is compared.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// A float op's result: NMSE `float_ops`.
    Float,
    /// A matmul's result over more than 16 rows: NMSE `prefill_matmul`.
    Prefill,
    /// Integer work or a copy (the decode integer matvec, Argmax indices, KV stores): exact.
    Exact,
    /// Quantized blocks of an input given exactly: exact (scale, codes, sums).
    Blocks(ActLayout),
    /// Quantized blocks of a float result of the same op (a fused op's quantized copy): exact
    /// under [`Tolerance::Exact`], else NMSE `float_ops` of the dequantized values.
    DerivedBlocks(ActLayout),
}

// ---- cases ----

/// A buffer of a case: an index into [`Case::bufs`].
pub type Buf = usize;
/// A weight of a case: an index into [`Case::weights`].
pub type Wt = usize;

/// A step's host data, owned.
#[derive(Clone, Debug, Default)]
pub struct StepData {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub seqs: Vec<SeqSpan>,
}

impl StepData {
    /// `n` rows of one sequence at positions `pos0..`, its cache from row 0.
    pub fn one_seq(n: usize, pos0: u32) -> Self {
        Self::of_seqs(&[SeqSpan { row: 0, len: n as u32, cache_row: 0, pos0, ring_row: 0 }])
    }

    /// The rows of `seqs` (token 0 each), at their positions.
    pub fn of_seqs(seqs: &[SeqSpan]) -> Self {
        let positions: Vec<u32> = seqs.iter().flat_map(|s| s.pos0..s.pos0 + s.len).collect();
        StepData { tokens: vec![0; positions.len()], positions, seqs: seqs.to_vec() }
    }

    pub fn step(&self) -> Step<'_> {
        Step { tokens: &self.tokens, positions: &self.positions, seqs: &self.seqs }
    }
}

/// One entry of the matrix: a step to run and the buffers to compare after it.
pub struct Case {
    pub name: String,
    step: StepData,
    /// Initial contents of each buffer (shared between cases where they are large).
    bufs: Vec<Arc<Vec<f32>>>,
    weights: Vec<HostWeight>,
    ops: Vec<Op<Buf, Wt>>,
    /// Buffers compared whole after the step: (the op's region in it and its length, what it
    /// is, how). Outside the region nothing may change.
    outs: Vec<(View<Buf>, usize, &'static str, Check)>,
    /// The reference's contents of `outs`, computed on first use.
    reference: OnceLock<Result<Vec<Vec<f32>>, String>>,
}

impl Case {
    fn new(name: impl Into<String>, step: StepData) -> Self {
        Case {
            name: name.into(),
            step,
            bufs: Vec::new(),
            weights: Vec::new(),
            ops: Vec::new(),
            outs: Vec::new(),
            reference: OnceLock::new(),
        }
    }

    /// A buffer starting as `data`, viewed from element 0.
    fn buf(&mut self, data: Vec<f32>) -> View<Buf> {
        self.shared(Arc::new(data))
    }

    fn shared(&mut self, data: Arc<Vec<f32>>) -> View<Buf> {
        assert!(!data.is_empty(), "{}: an empty buffer", self.name);
        self.bufs.push(data);
        View::new(self.bufs.len() - 1, 0)
    }

    fn weight(&mut self, w: HostWeight) -> Wt {
        self.weights.push(w);
        self.weights.len() - 1
    }

    fn op(&mut self, op: Op<Buf, Wt>) {
        self.ops.push(op);
    }

    /// Compare buffer `v.buf` after the step: `len` elements from `v` as `check` says, the rest
    /// unchanged.
    fn out(&mut self, v: View<Buf>, len: usize, what: &'static str, check: Check) {
        self.outs.push((v, len, what, check));
    }

    /// Every op kind the case runs: each op's, and for a fused op those of its expansion too.
    fn op_kinds(&self) -> Vec<OpKind> {
        let format_of = |w: Wt| self.weights[w].format;
        let mut kinds = Vec::new();
        for op in &self.ops {
            kinds.push(op.kind(format_of));
            // The cache ops also ask for their caches' element type.
            if let Op::StoreKv { kv, .. } | Op::Attention { kv, .. } | Op::Qkv { kv, .. } = *op {
                kinds.push(OpKind::KvCache(kv));
            }
            let _ = op.expand(|o| {
                kinds.push(o.kind(format_of));
                Ok::<(), ()>(())
            });
        }
        kinds.dedup();
        kinds
    }

    /// The reference's outputs.
    fn reference(&self) -> &[Vec<f32>] {
        let r = self.reference.get_or_init(|| run(&mut CpuRef::new(), self, &self.weights, false));
        let outs = match r {
            Ok(outs) => outs,
            Err(e) => panic!("{}: the reference refuses the case (a bug in the case): {e}", self.name),
        };
        // An output the step leaves as it was compares nothing: a bug in the case.
        // So does one the reference makes non-finite.
        for (&(v, len, what, check), o) in self.outs.iter().zip(outs) {
            let region = &o[v.offset..v.offset + len];
            assert!(
                bits(region) != bits(&self.bufs[v.buf][v.offset..v.offset + len]),
                "{}: the step does not change {what}",
                self.name
            );
            if matches!(check, Check::Float | Check::Prefill | Check::Exact) {
                assert!(region.iter().all(|v| v.is_finite()), "{}: the reference's {what} is not finite", self.name);
            }
        }
        outs
    }
}

/// Cases that run on one instance of the backend, one after another.
pub struct Group {
    pub name: String,
    pub cases: Vec<Case>,
}

/// The whole matrix, built once per test binary.
pub fn matrix() -> &'static [Group] {
    static MATRIX: OnceLock<Vec<Group>> = OnceLock::new();
    MATRIX.get_or_init(cases::all)
}

/// Whether Gemma 3 or Llama models need this op × format: every op, with every GGUF format
/// (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K). A backend that skips one
/// fails the matrix.
pub fn needed_by_models(kind: OpKind) -> bool {
    const GGUF: [Format; 11] = Format::ALL;
    match kind {
        OpKind::Embed(f) | OpKind::MatMul(f) => GGUF.contains(&f),
        OpKind::MatMulQ8(f) => GGUF.contains(&f) && f.act_layout().is_some(),
        k => k.is_format_free(),
    }
}

// ---- running ----

/// What [`check_all`] did.
#[derive(Debug, Default)]
pub struct Report {
    /// The backend's name.
    pub backend: String,
    /// Cases run and compared.
    pub ran: usize,
    /// Op kinds the backend does not support (each case using one was skipped).
    pub skipped: BTreeSet<String>,
    /// One message per failed comparison (or per case the backend refused).
    pub failures: Vec<String>,
}

/// Run every case of the matrix on backends from `make` (a fresh one per group) and on the
/// reference. The report lists a failure for each output that differs beyond `tol`, each case
/// the backend refuses, and each op × format a model needs that it skips ([`Report::assert_ok`]).
pub fn check_all<B: Backend>(make: impl Fn() -> B, tol: Tolerance) -> Report {
    check_groups(make, tol, |_| true)
}

/// [`check_all`] over the groups whose name `pick` accepts.
pub fn check_groups<B: Backend>(make: impl Fn() -> B, tol: Tolerance, pick: impl Fn(&str) -> bool) -> Report {
    let t0 = Instant::now();
    let mut report = Report::default();
    let mut needed_missing = BTreeSet::new();
    for group in matrix().iter().filter(|g| pick(&g.name)) {
        let tg = Instant::now();
        // Mapped weights of the group's cases, alive while the backend is (declared first, so
        // dropped after it).
        let mut keep = Vec::new();
        let mut b = make();
        report.backend = b.name().to_string();
        let mut ran = 0;
        for (i, case) in group.cases.iter().enumerate() {
            let missing: Vec<OpKind> = case.op_kinds().into_iter().filter(|&k| !b.supports(k)).collect();
            if !missing.is_empty() {
                for k in missing {
                    if report.skipped.insert(format!("{k:?}")) {
                        eprintln!("{}: skips {k:?} (unsupported), first in {}", report.backend, case.name);
                    }
                    if needed_by_models(k) && needed_missing.insert(format!("{k:?}")) {
                        report
                            .failures
                            .push(format!("{k:?} is unsupported, but a model needs it (first in {})", case.name));
                    }
                }
                continue;
            }
            let want = case.reference();
            // Every other case reads back through `submit_read`, the one-round-trip path, and
            // every other pair of cases hands its weights over as memory-mapped pages.
            let weights = if i % 4 >= 2 { mapped_weights(&case.weights) } else { case.weights.clone() };
            let r = run(&mut b, case, &weights, i % 2 == 1);
            keep.push(weights);
            match r {
                Err(e) => report.failures.push(format!("{}: the backend fails: {e}", case.name)),
                Ok(got) => {
                    for (k, &(v, len, what, check)) in case.outs.iter().enumerate() {
                        if let Err(msg) = compare(&got[k], &want[k], v.offset..v.offset + len, check, tol) {
                            let m = format!("{} [{what}, {check:?}]: {msg}", case.name);
                            eprintln!("MISMATCH {m}");
                            report.failures.push(m);
                        }
                    }
                }
            }
            ran += 1;
        }
        report.ran += ran;
        eprintln!("{}: {} ({ran} cases) {:.2?}", report.backend, group.name, tg.elapsed());
    }
    eprintln!(
        "{}: {} cases in {} groups, {} failures, {} op kinds skipped {:?}, {:.2?}",
        report.backend,
        report.ran,
        matrix().len(),
        report.failures.len(),
        report.skipped.len(),
        report.skipped,
        t0.elapsed()
    );
    report
}

impl Report {
    /// Panic, listing the failures, if there are any.
    pub fn assert_ok(&self) {
        if self.failures.is_empty() {
            return;
        }
        const SHOWN: usize = 40;
        let n = self.failures.len();
        let more = if n > SHOWN { format!("\n... and {} more (all printed above)", n - SHOWN) } else { String::new() };
        panic!(
            "{}: {n} failures in {} cases:\n{}{more}",
            self.backend,
            self.ran,
            self.failures[..n.min(SHOWN)].join("\n")
        );
    }

    /// Add the Vulkan validation layer's messages so far as failures (there must be none).
    pub fn add_validation_messages(&mut self) {
        for m in purehw_hal_vulkan::validation_messages() {
            self.failures.push(format!("validation layer: {m}"));
        }
    }
}

/// Run `case` on `b`: buffers allocated and filled, `weights` (the case's, perhaps as mapped
/// pages) loaded, one submit; the whole of each compared buffer read back (with `submit_read`
/// when `one_trip`). The caller keeps `weights` alive as long as `b`.
fn run<B: Backend>(b: &mut B, case: &Case, weights: &[HostWeight], one_trip: bool) -> Result<Vec<Vec<f32>>, String> {
    let err = |e: B::Error| e.to_string();
    let mut bufs = Vec::with_capacity(case.bufs.len());
    for data in &case.bufs {
        let h = b.alloc(data.len()).map_err(err)?;
        b.write(View::new(h, 0), data).map_err(err)?;
        bufs.push(h);
    }
    let weights = weights.iter().map(|w| b.load_weight(w)).collect::<Result<Vec<_>, _>>().map_err(err)?;
    let ops: Vec<Op<B::Buffer, B::Weight>> =
        case.ops.iter().map(|o| o.map(|i: Buf| bufs[i], |i: Wt| weights[i])).collect();
    let mut outs: Vec<Vec<f32>> = case.outs.iter().map(|o| vec![0f32; case.bufs[o.0.buf].len()]).collect();
    let step = case.step.step();
    if one_trip {
        let mut reads: Vec<(View<B::Buffer>, &mut [f32])> =
            case.outs.iter().zip(outs.iter_mut()).map(|(c, o)| (View::new(bufs[c.0.buf], 0), &mut o[..])).collect();
        b.submit_read(&step, &ops, &mut reads).map_err(err)?;
    } else {
        b.submit(&step, &ops).map_err(err)?;
        for (c, o) in case.outs.iter().zip(outs.iter_mut()) {
            b.read(View::new(bufs[c.0.buf], 0), o).map_err(err)?;
        }
    }
    Ok(outs)
}

/// Bytes in whole pages from a page-aligned address, as a file's memory map holds them.
struct Pages {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for Pages {
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// `ws` as a model file hands them over: one page-aligned run of whole pages (as a memory map
/// is), each weight at a 32-byte aligned offset in it (as in a GGUF), marked mapped, so that a
/// backend importing mapped host memory in place (hal-vulkan on a unified-memory device) reads
/// them there.
fn mapped_weights(ws: &[HostWeight]) -> Vec<HostWeight> {
    const PAGE: usize = 4096;
    let mut at = Vec::with_capacity(ws.len());
    let mut end = 0usize;
    for w in ws {
        let start = end.next_multiple_of(32);
        at.push(start);
        end = start + w.data.len();
    }
    let len = end.next_multiple_of(PAGE).max(PAGE);
    let mut buf = vec![0u8; len + PAGE];
    let start = buf.as_ptr().align_offset(PAGE);
    for (w, &a) in ws.iter().zip(&at) {
        buf[start + a..start + a + w.data.len()].copy_from_slice(w.data.as_slice());
    }
    let pages: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(Pages { buf, start, len });
    ws.iter()
        .zip(&at)
        .map(|(w, &a)| {
            let data = HostBytes::new_mapped(pages.clone(), a..a + w.data.len()).expect("inside the pages");
            // Scales and zero points stay where they are: only the codes move.
            HostWeight::with_parts(w.format, w.rows, w.cols, data, w.parts.clone()).expect("consistent weight")
        })
        .collect()
}

// ---- comparing ----

/// Compare one output buffer with the reference's: outside `region` (the op's output) nothing
/// may differ; inside it NaN/Inf first, then as `check` and `tol` say. The error names the worst
/// element, its index in the region and both values.
pub fn compare(got: &[f32], want: &[f32], region: Range<usize>, check: Check, tol: Tolerance) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("length {} vs the reference's {}", got.len(), want.len()));
    }
    if let Some(i) = (0..got.len()).find(|i| !region.contains(i) && got[*i].to_bits() != want[*i].to_bits()) {
        return Err(format!(
            "a write outside the output (elements {region:?} of {}): element {i} is {:e}, was {:e}",
            got.len(),
            got[i],
            want[i]
        ));
    }
    let (got, want) = (&got[region.clone()], &want[region]);
    let limit = match (check, tol) {
        (Check::Blocks(layout), _) | (Check::DerivedBlocks(layout), Tolerance::Exact | Tolerance::ExactFlushed) => {
            return compare_blocks(got, want, layout);
        }
        (Check::Float | Check::Prefill, Tolerance::ExactFlushed) => {
            let flushed = |g: f32, w: f32| w.is_subnormal() && g == 0.0 && g.is_sign_negative() == w.is_sign_negative();
            let want: Vec<f32> = got.iter().zip(want).map(|(&g, &w)| if flushed(g, w) { g } else { w }).collect();
            return compare_floats(got, &want, None);
        }
        (Check::DerivedBlocks(layout), Tolerance::Nmse { float_ops, .. }) => {
            return compare_floats(&dequantize(got, layout), &dequantize(want, layout), Some(float_ops));
        }
        (Check::Exact, _) | (_, Tolerance::Exact) => None,
        (Check::Float, Tolerance::Nmse { float_ops, .. }) => Some(float_ops),
        (Check::Prefill, Tolerance::Nmse { prefill_matmul, .. }) => Some(prefill_matmul),
    };
    compare_floats(got, want, limit)
}

/// NaN/Inf first; then bit for bit (`limit` None) or NMSE ≤ `limit` over the finite elements.
fn compare_floats(got: &[f32], want: &[f32], limit: Option<f64>) -> Result<(), String> {
    let class = |x: f32| {
        if x.is_nan() {
            0
        } else if x == f32::INFINITY {
            1
        } else if x == f32::NEG_INFINITY {
            2
        } else {
            3
        }
    };
    let nonfinite = (0..got.len()).filter(|&i| class(got[i]) != class(want[i])).collect::<Vec<_>>();
    if let Some(&i) = nonfinite.first() {
        return Err(format!(
            "NaN/Inf mismatch at {} of {} elements, first at {i}: got {:e} want {:e}",
            nonfinite.len(),
            got.len(),
            got[i],
            want[i]
        ));
    }
    let e = crate::nmse_finite(got, want);
    let differ = (0..got.len()).filter(|&i| got[i].to_bits() != want[i].to_bits()).count();
    let fails = match limit {
        None => differ > 0,
        Some(l) => e.is_nan() || e > l,
    };
    if !fails {
        return Ok(());
    }
    let worst = (0..got.len())
        .filter(|&i| class(want[i]) == 3)
        .max_by(|&a, &b| (got[a] - want[a]).abs().total_cmp(&(got[b] - want[b]).abs()))
        .or_else(|| (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()))
        .unwrap_or(0);
    let first = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()).unwrap_or(0);
    let bound = match limit {
        None => "bit-exact".to_string(),
        Some(l) => format!("NMSE bound {l:e}"),
    };
    Err(format!(
        "{differ} of {} elements differ ({bound}; NMSE {e:.3e}), first at {first}; worst at {worst}: got {:e} ({:#010x}) want {:e} ({:#010x})",
        got.len(),
        got[worst],
        got[worst].to_bits(),
        want[worst],
        want[worst].to_bits()
    ))
}

/// Quantized blocks bit for bit; on a difference, the first block that differs, field by field.
fn compare_blocks(got: &[f32], want: &[f32], layout: ActLayout) -> Result<(), String> {
    let words = act_words(layout);
    let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) else { return Ok(()) };
    let differ = got.chunks(words).zip(want.chunks(words)).filter(|(a, b)| bits(a) != bits(b)).count();
    let blk = i / words;
    let (g, w) = (&got[blk * words..(blk + 1) * words], &want[blk * words..(blk + 1) * words]);
    let field = |name: &str, idx: usize, a: String, b: String| format!("{name}[{idx}] got {a} want {b}");
    let mut diffs = Vec::new();
    match layout {
        ActLayout::Q8A => {
            let (a, b): (BlockQ8A, BlockQ8A) =
                (bytemuck::pod_read_unaligned(bytes(g)), bytemuck::pod_read_unaligned(bytes(w)));
            if a.d.to_bits() != b.d.to_bits() {
                diffs.push(format!("d got {:e} want {:e}", a.d, b.d));
            }
            if a.sum != b.sum {
                diffs.push(format!("sum got {} want {}", a.sum, b.sum));
            }
            diffs.extend(
                (0..32)
                    .filter(|&j| a.qs[j] != b.qs[j])
                    .map(|j| field("qs", j, a.qs[j].to_string(), b.qs[j].to_string())),
            );
        }
        ActLayout::Q8K => {
            let (a, b): (BlockQ8K, BlockQ8K) =
                (bytemuck::pod_read_unaligned(bytes(g)), bytemuck::pod_read_unaligned(bytes(w)));
            if a.d.to_bits() != b.d.to_bits() {
                diffs.push(format!("d got {:e} want {:e}", a.d, b.d));
            }
            diffs.extend(
                (0..256)
                    .filter(|&j| a.qs[j] != b.qs[j])
                    .map(|j| field("qs", j, a.qs[j].to_string(), b.qs[j].to_string())),
            );
            diffs.extend(
                (0..16)
                    .filter(|&j| a.bsums[j] != b.bsums[j])
                    .map(|j| field("bsums", j, a.bsums[j].to_string(), b.bsums[j].to_string())),
            );
        }
    }
    if diffs.is_empty() {
        diffs.push(format!(
            "word {i}: got {:#010x} want {:#010x} (padding or past the blocks)",
            got[i].to_bits(),
            want[i].to_bits()
        ));
    }
    let shown = diffs.len().min(6);
    Err(format!(
        "{differ} of {} {layout:?} blocks differ, first block {blk}: {}{}",
        got.len().div_ceil(words),
        diffs[..shown].join(", "),
        if diffs.len() > shown { format!(" (+{} more fields)", diffs.len() - shown) } else { String::new() }
    ))
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn bytes(x: &[f32]) -> &[u8] {
    bytemuck::cast_slice(x)
}

/// The values quantized blocks stand for (`d · q`), for the NMSE of derived blocks.
fn dequantize(words: &[f32], layout: ActLayout) -> Vec<f32> {
    let w = act_words(layout);
    let mut out = Vec::with_capacity(words.len() / w * act_block(layout));
    for blk in words.chunks_exact(w) {
        match layout {
            ActLayout::Q8A => {
                let b: BlockQ8A = bytemuck::pod_read_unaligned(bytes(blk));
                out.extend(b.qs.iter().map(|&q| b.d * q as f32));
            }
            ActLayout::Q8K => {
                let b: BlockQ8K = bytemuck::pod_read_unaligned(bytes(blk));
                out.extend(b.qs.iter().map(|&q| b.d * q as f32));
            }
        }
    }
    out
}

/// `x` quantized on the host as `QuantizeAct` defines it: `rows` rows of `cols`, as buffer words.
pub fn quantize_rows(x: &[f32], rows: usize, cols: usize, layout: ActLayout) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * cols / act_block(layout) * act_words(layout));
    for row in x.chunks_exact(cols).take(rows) {
        match layout {
            ActLayout::Q8A => {
                let mut b = vec![BlockQ8A::default(); cols / 32];
                purehw_kernels::quant::quantize_q8a(row, &mut b);
                out.extend_from_slice(bytemuck::cast_slice::<BlockQ8A, f32>(&b));
            }
            ActLayout::Q8K => {
                let mut b = vec![BlockQ8K::default(); cols / 256];
                purehw_kernels::quant::quantize_q8k(row, &mut b);
                out.extend_from_slice(bytemuck::cast_slice::<BlockQ8K, f32>(&b));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use purehw_hal::{ErrorType, HostWeight};

    use super::*;

    /// The reference with two planted faults: Softcap with cap 30 is slightly off, and Q6_K's
    /// integer matmul is unsupported.
    struct Wrong(CpuRef);

    impl ErrorType for Wrong {
        type Error = <CpuRef as ErrorType>::Error;
    }

    impl Backend for Wrong {
        type Buffer = <CpuRef as Backend>::Buffer;
        type Weight = <CpuRef as Backend>::Weight;
        fn name(&self) -> &str {
            "wrong"
        }
        fn supports(&self, op: OpKind) -> bool {
            op != OpKind::MatMulQ8(Format::Q6_K) && self.0.supports(op)
        }
        fn alloc(&mut self, len: usize) -> Result<Self::Buffer, Self::Error> {
            self.0.alloc(len)
        }
        fn load_weight(&mut self, w: &HostWeight) -> Result<Self::Weight, Self::Error> {
            self.0.load_weight(w)
        }
        fn write(&mut self, dst: View<Self::Buffer>, src: &[f32]) -> Result<(), Self::Error> {
            self.0.write(dst, src)
        }
        fn read(&mut self, src: View<Self::Buffer>, dst: &mut [f32]) -> Result<(), Self::Error> {
            self.0.read(src, dst)
        }
        fn submit(&mut self, step: &Step<'_>, ops: &[Op<Self::Buffer, Self::Weight>]) -> Result<(), Self::Error> {
            let ops: Vec<_> = ops
                .iter()
                .map(|&o| match o {
                    Op::Softcap { x, len, cap: 30.0 } => Op::Softcap { x, len, cap: 30.001 },
                    o => o,
                })
                .collect();
            self.0.submit(step, &ops)
        }
    }

    #[test]
    fn a_wrong_backend_fails_the_matrix() {
        let r = check_all(|| Wrong(CpuRef::new()), Tolerance::Exact);
        assert_eq!(r.skipped.iter().collect::<Vec<_>>(), ["MatMulQ8(Q6_K)"]);
        assert!(r.failures[0].starts_with("MatMulQ8(Q6_K) is unsupported, but a model needs it"), "{:?}", r.failures);
        let softcap: Vec<_> = r.failures[1..].iter().filter(|f| f.contains("cap=30 [x, Float]")).collect();
        assert_eq!((softcap.len(), r.failures.len()), (4, 5), "{:#?}", r.failures);
        assert!(softcap[0].contains("worst at"), "{}", softcap[0]);
        // Within an NMSE bound the cap's error passes; the unsupported format still fails.
        let r = check_all(|| Wrong(CpuRef::new()), Tolerance::NMSE);
        assert_eq!(r.failures.len(), 1, "{:#?}", r.failures);
    }

    #[test]
    fn comparisons_catch_what_they_should() {
        let want = [1.0f32, -2.0, 3.0, f32::NAN];
        assert!(compare(&want, &want, 0..4, Check::Float, Tolerance::Exact).is_ok());
        // One ulp off: a failure when exact, fine within an NMSE bound.
        let mut got = want;
        got[2] = f32::from_bits(3.0f32.to_bits() + 1);
        let e = compare(&got, &want, 0..4, Check::Float, Tolerance::Exact).unwrap_err();
        assert!(e.contains("worst at 2"), "{e}");
        assert!(compare(&got, &want, 0..4, Check::Float, Tolerance::NMSE).is_ok());
        assert!(compare(&got, &want, 0..4, Check::Exact, Tolerance::NMSE).is_err());
        // A flushed subnormal passes only under ExactFlushed, only for float results, only as a
        // zero of the same sign.
        let sub = [1.0f32, -1e-39, 2e-39, 3.0];
        let flushed = [1.0f32, -0.0, 0.0, 3.0];
        assert!(compare(&flushed, &sub, 0..4, Check::Float, Tolerance::ExactFlushed).is_ok());
        assert!(compare(&flushed, &sub, 0..4, Check::Float, Tolerance::Exact).is_err());
        assert!(compare(&flushed, &sub, 0..4, Check::Exact, Tolerance::ExactFlushed).is_err());
        assert!(compare(&[1.0f32, 0.0, 0.0, 3.0], &sub, 0..4, Check::Float, Tolerance::ExactFlushed).is_err());
        // NaN/Inf first, whatever the bound.
        got[0] = f32::INFINITY;
        let e = compare(&got, &want, 0..4, Check::Float, Tolerance::NMSE).unwrap_err();
        assert!(e.starts_with("NaN/Inf mismatch at 1 of 4 elements, first at 0"), "{e}");
        // Outside the op's region nothing may change, whatever the tolerance.
        let e = compare(&got, &want, 0..2, Check::Float, Tolerance::NMSE).unwrap_err();
        assert!(e.starts_with("a write outside the output (elements 0..2 of 4): element 2"), "{e}");
        // Blocks: the differing field is named.
        let x: Vec<f32> = (0..64).map(|i| i as f32 - 20.0).collect();
        let a = quantize_rows(&x, 1, 64, ActLayout::Q8A);
        let mut b = a.clone();
        let mut blk: BlockQ8A = bytemuck::pod_read_unaligned(bytes(&b[10..20]));
        blk.qs[5] += 1;
        b[10..20].copy_from_slice(bytemuck::cast_slice(&[blk]));
        let e = compare(&b, &a, 0..20, Check::Blocks(ActLayout::Q8A), Tolerance::NMSE).unwrap_err();
        assert!(e.contains("first block 1") && e.contains("qs[5]"), "{e}");
    }
}

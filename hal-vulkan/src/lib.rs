//! The Vulkan backend: every op of a transformer step as a GLSL compute shader, driven through
//! ash, with results equal to `hal-cpu-ref`'s bit for bit wherever the reference's operation
//! order can be kept (all of it today: see `shaders/common/mm.glsl` and `exact.glsl`).
//!
//! * **Loader at run time.** `libvulkan` is opened when a backend is made (ash's `loaded`), so a
//!   binary without Vulkan installed still runs on the CPU.
//! * **Buffers by address.** Every buffer is reached through its device address
//!   (`VK_KHR_buffer_device_address`, core in Vulkan 1.2): shaders take addresses and offsets in
//!   push constants, so there are no descriptor sets to allocate or write at all, and no
//!   `maxStorageBufferRange` limit on a binding (lavapipe's is 128 MiB, smaller than Gemma 3's
//!   embedding table).
//! * **Weights.** On a device that shares memory with the host (an integrated GPU, lavapipe) the
//!   memory-mapped file's pages are imported in place (`VK_EXT_external_memory_host`), so a model
//!   costs its file's pages once; elsewhere each weight gets device-local memory, uploaded
//!   through a staging buffer.
//! * **Steps recorded once.** A step's ops become one command buffer, cached by the step's shape
//!   (its op list, row and sequence counts, and the regions read back); a step of a known shape
//!   only writes its per-token data (tokens, positions, sequence spans, RoPE tables) into a small
//!   buffer and replays the command buffer: one submit, one fence wait. A barrier goes only
//!   where a dispatch touches what an earlier one since the last barrier wrote.
//! * **Exactness.** Floats are `precise` (no contraction); division and square root are
//!   correctly rounded in integer arithmetic; RoPE's cos/sin come from the reference's own
//!   function on the host; each matmul lane keeps the reference's block order.
//!
//! Shaders are compiled at build time by glslang 15.1 (the `glslang` crate builds it from
//! source with `cc` alone): Debian 12's `glslc` (shaderc 2023.2) lacks `GL_KHR_cooperative_matrix`
//! and `GL_NV_cooperative_matrix2`, and a fresh machine has no cmake for `shaderc`'s own build.

mod error;
mod kernels;
mod vk;

use std::collections::HashMap;
use std::path::PathBuf;

use ash::vk as raw;
use bytemuck::Pod;
use purehw_hal::check::{Resources, WeightInfo};
use purehw_hal::{
    ActLayout, ActQuant, Backend, ErrorType, Format, Gate, HostWeight, KvType, MatIn, Op, OpKind, RopeMode, Stats,
    Step, View, act_block, act_words,
};

pub use error::{VkError, VulkanError};
use kernels::*;
pub use vk::DeviceInfo;
use vk::{Gpu, Instance, Mem, Pipeline, RawBuffer};

type Result<T> = std::result::Result<T, VulkanError>;

/// Handle of a buffer of f32 elements on the device.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct BufId(u32);

/// Handle of a weight on the device.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct WeightId(u32);

/// How to pick and drive a device.
#[derive(Clone, Debug, Default)]
pub struct VulkanOptions {
    /// `PUREHW_VK_DEVICE`: a device index, or a substring of its name.
    pub device: Option<String>,
    /// Enable VK_LAYER_KHRONOS_validation (an error if it is not installed). Default: the
    /// `PUREHW_VK_VALIDATION=1` environment variable.
    pub validation: bool,
    /// Whether a CPU device (lavapipe) may be chosen when no GPU is there.
    pub allow_cpu: bool,
    /// Decode matmuls (1–4 tokens) on the split kernel (`mm_split.comp`: one load wave, then the
    /// chains from shared memory) rather than one chain per thread. `None`: on GPUs only (a CPU
    /// device runs it slowly). `PUREHW_VK_SPLIT=0|1` sets it.
    pub split_matvec: Option<bool>,
    /// Which prologues decode steps use, (norm, gate); `None`: the measured default.
    /// `PUREHW_VK_PRO=none|norm|gate|all` sets it.
    pub prologues: Option<(bool, bool)>,
    /// Rows per workgroup of block attention (1–8, at least 256 / head_dim); `None`: 8; `Some(0)`:
    /// chosen per step for enough workgroups. `PUREHW_VK_ATTN_QB` sets it.
    pub attention_rows: Option<usize>,
    /// Decode steps run the residual junction after an output projection, and the gated MLP's
    /// activation, as tails of the matmuls before them (run by the last workgroup to finish: no
    /// dispatch or barrier of their own). `None`: [`Tails::DEFAULT`] wherever the split matmuls
    /// run.
    /// `PUREHW_VK_TAIL=0|1|qkv,norm,gate` sets it (the last: only those named).
    pub tails: Option<Tails>,
    /// Use mapped weights in place where the device shares memory with the host (the default);
    /// `Some(false)` copies them as on a discrete GPU (so lavapipe checks that path).
    /// `PUREHW_VK_IMPORT=0` sets it.
    pub import: Option<bool>,
    /// Batched decode matmuls of at least this many tokens (2–16) and weight rows take the
    /// tiled kernel with one token tile (`mm_tile.comp`: a workgroup's 32 or 64 rows share its
    /// staged activations) instead of the split one. `None`: [`BATCH_TILE`] (the LM head of a
    /// step of 8–16 sequences); `Some((17, 0))`: never. `PUREHW_VK_BATCH_TILE=N[,ROWS]` sets it
    /// (ROWS 0 when left out), `off` turns it off.
    pub batch_tile: Option<(usize, usize)>,
    /// One-token matmuls on compressed-tensors weights take the chunked path's wide variant
    /// (`mm_int.comp`'s WIDE=1: four code words and four x values a shared load, codes made
    /// floats by their bits, [`INT_DEPTH`] chunks in flight). `None`: off (not yet measured on a
    /// GPU against the plain chunked path). `PUREHW_VK_INT_WIDE=0|1` sets it.
    pub int_wide: Option<bool>,
    /// Settle the exact division and square root in f64 (`exact.glsl`'s `.x64` shader variants)
    /// where the device has shaderFloat64; else in 32-bit integers. Both give the reference's
    /// correctly rounded results. `None`: f64 where available. `PUREHW_VK_F64=0|1` sets it.
    pub exact_f64: Option<bool>,
}

impl VulkanOptions {
    /// From the environment: `PUREHW_VK_DEVICE`, `PUREHW_VK_VALIDATION`; CPU devices allowed.
    pub fn from_env() -> Self {
        VulkanOptions {
            device: std::env::var("PUREHW_VK_DEVICE").ok().filter(|s| !s.is_empty()),
            validation: std::env::var("PUREHW_VK_VALIDATION").is_ok_and(|v| v == "1"),
            allow_cpu: true,
            split_matvec: std::env::var("PUREHW_VK_SPLIT").ok().map(|v| v == "1"),
            prologues: match std::env::var("PUREHW_VK_PRO").as_deref() {
                Ok("none") => Some((false, false)),
                Ok("norm") => Some((true, false)),
                Ok("gate") => Some((false, true)),
                Ok("all") => Some((true, true)),
                _ => None,
            },
            attention_rows: std::env::var("PUREHW_VK_ATTN_QB").ok().and_then(|v| v.parse().ok()),
            tails: std::env::var("PUREHW_VK_TAIL").ok().map(|v| Tails::parse(&v)),
            import: std::env::var("PUREHW_VK_IMPORT").ok().map(|v| v != "0"),
            batch_tile: std::env::var("PUREHW_VK_BATCH_TILE").ok().and_then(|v| parse_batch_tile(&v)),
            int_wide: std::env::var("PUREHW_VK_INT_WIDE").ok().map(|v| v != "0"),
            exact_f64: std::env::var("PUREHW_VK_F64").ok().map(|v| v != "0"),
        }
    }
}

/// Which decode ops run as tails of the matmuls before them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tails {
    /// Qkv's epilogue (per-head norms, RoPE, the caches) after the q/k/v matmuls.
    pub qkv: bool,
    /// A residual junction (AddRmsNorm) after the matmul writing its branch.
    pub norm: bool,
    /// The gated MLP's activation and quantization after the gate and up matmuls.
    pub gate: bool,
    /// An Argmax after the matmul writing its input (the LM head of greedy decoding).
    pub argmax: bool,
}

impl Tails {
    pub const ALL: Tails = Tails { qkv: true, norm: true, gate: true, argmax: true };
    pub const NONE: Tails = Tails { qkv: false, norm: false, gate: false, argmax: false };
    /// The junctions, the gate and Qkv per segment; not the argmax (16k pairs in one workgroup,
    /// 64 an invocation). H100, tg128 Gemma 3 270M / SmolLM2, device time per decode step: none
    /// 1.261 / 1.680 ms, norm 1.223 / 1.619, norm+gate 1.210 / 1.610, norm+qkv 1.216 / 1.611,
    /// these three 1.202 / 1.589, all four 1.247 / 1.593.
    pub const DEFAULT: Tails = Tails { qkv: true, norm: true, gate: true, argmax: false };

    /// `0` none, `1` all, else a comma list of `qkv`, `norm`, `gate`, `argmax`.
    pub fn parse(v: &str) -> Tails {
        match v {
            "0" => Tails::NONE,
            "1" => Tails::ALL,
            _ => Tails {
                qkv: v.contains("qkv"),
                norm: v.contains("norm"),
                gate: v.contains("gate"),
                argmax: v.contains("argmax"),
            },
        }
    }

    fn any(self) -> bool {
        self.qkv || self.norm || self.gate || self.argmax
    }
}

/// Rank for the default choice: discrete > integrated > virtual > CPU.
fn rank(kind: raw::PhysicalDeviceType) -> u32 {
    match kind {
        raw::PhysicalDeviceType::DISCRETE_GPU => 0,
        raw::PhysicalDeviceType::INTEGRATED_GPU => 1,
        raw::PhysicalDeviceType::VIRTUAL_GPU => 2,
        raw::PhysicalDeviceType::CPU => 3,
        _ => 4,
    }
}

/// The type of a device, in words.
pub fn kind_name(kind: raw::PhysicalDeviceType) -> &'static str {
    match kind {
        raw::PhysicalDeviceType::DISCRETE_GPU => "discrete GPU",
        raw::PhysicalDeviceType::INTEGRATED_GPU => "integrated GPU",
        raw::PhysicalDeviceType::VIRTUAL_GPU => "virtual GPU",
        raw::PhysicalDeviceType::CPU => "CPU",
        _ => "other",
    }
}

impl DeviceInfo {
    /// Whether this is a real GPU (discrete or integrated), what `--backend auto` takes.
    pub fn is_gpu(&self) -> bool {
        matches!(self.kind, raw::PhysicalDeviceType::DISCRETE_GPU | raw::PhysicalDeviceType::INTEGRATED_GPU)
    }

    pub fn kind_name(&self) -> &'static str {
        kind_name(self.kind)
    }
}

/// Every Vulkan device on this machine, or why there are none (no loader, …).
pub fn devices() -> std::result::Result<Vec<DeviceInfo>, VkError> {
    let inst = Instance::shared(false)?;
    Ok(inst.devices()?.into_iter().map(|(_, i)| i).collect())
}

/// Validation-layer messages so far (tests assert there are none).
pub fn validation_messages() -> Vec<String> {
    vk::VALIDATION_MESSAGES.lock().map(|v| v.clone()).unwrap_or_default()
}

/// A fault to inject, for tests of the error paths.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The next submit reports the device lost (and the backend stays lost).
    DeviceLost,
    /// The next allocation reports device memory exhausted.
    OutOfMemory,
}

struct DevBuf {
    raw: RawBuffer,
    len: usize,
}

struct DevWeight {
    format: Format,
    rows: usize,
    cols: usize,
    /// Where the stored rows are: a weight store buffer and the byte offset of row 0.
    store: usize,
    byte: u64,
    /// For vectors (norm weights): an f32 copy, dequantized on the host by the reference.
    f32_store: Option<usize>,
    /// A compressed-tensors weight's scales and zero points (weight stores of their own).
    int: Option<IntParts>,
}

#[derive(Copy, Clone, Debug)]
struct IntParts {
    /// (weight store, byte offset) of the scales and of the zero points.
    scales: (usize, u64),
    zeros: Option<(usize, u64)>,
}

/// A recorded step: its command buffer and the key it was recorded for.
struct Shape {
    rows: usize,
    positions: usize,
    nseq: usize,
    ops: Vec<Op<BufId, WeightId>>,
    reads: Vec<(View<BufId>, usize)>,
    cb: raw::CommandBuffer,
    /// Recorded for a step submitted ahead through this parity's step and readback buffers.
    parity: Option<usize>,
    layout: StepLayout,
    /// Bytes of readback space each read takes, in order.
    read_at: Vec<u64>,
    /// With `PUREHW_VK_PROFILE=1`: the kernel behind each timestamp after the first two.
    prof: Vec<String>,
}

/// A read a step is recorded with: where, and how many f32s.
trait ReadSpec {
    fn view(&self) -> View<BufId>;
    fn len(&self) -> usize;
}

impl ReadSpec for (View<BufId>, &mut [f32]) {
    fn view(&self) -> View<BufId> {
        self.0
    }
    fn len(&self) -> usize {
        self.1.len()
    }
}

impl ReadSpec for (View<BufId>, usize) {
    fn view(&self) -> View<BufId> {
        self.0
    }
    fn len(&self) -> usize {
        self.1
    }
}

/// One parity of the steps submitted ahead.
struct Ahead {
    up: Option<RawBuffer>,
    readback: Option<RawBuffer>,
    fence: raw::Fence,
    pending: bool,
    /// (readback offset, f32s) of each read, at most [`AHEAD_READS`].
    reads: [(u64, usize); AHEAD_READS],
    nreads: usize,
}

/// Reads a step submitted ahead may have (greedy decoding has one: the argmax).
const AHEAD_READS: usize = 4;
/// Readback room of a step submitted ahead.
const AHEAD_READ_BYTES: u64 = 1 << 16;
/// Timestamps of the steps ahead: two per parity, at the end of the query pool (the profile
/// uses its start).
const AHEAD_QUERY: u32 = vk::QUERIES - 4;

impl Ahead {
    fn new(fence: raw::Fence) -> Self {
        Ahead { up: None, readback: None, fence, pending: false, reads: [(0, 0); AHEAD_READS], nreads: 0 }
    }
}

/// Where a step's host data lies in the step buffer (u32 words).
#[derive(Clone, Debug, Default)]
struct StepLayout {
    tokens: u32,
    positions: u32,
    row_seq: u32,
    seqs: u32,
    /// (theta bits, scale bits, head_dim, word offset) of each RoPE table.
    rope: Vec<(u32, u32, usize, u32)>,
    words: usize,
}

/// An op run as the prologue of the next op's matmuls (`mm_split.comp` PRO=1, 2).
#[derive(Copy, Clone, Debug)]
enum Pro {
    /// An AddRmsNorm.
    Norm(Op<BufId, WeightId>),
    /// A GatedFfn's activation and quantization.
    Gate(Op<BufId, WeightId>),
}

/// Resource ids for barrier tracking beyond the buffers.
const SCRATCH_ID: u32 = u32::MAX;

/// Regions touched since the last barrier: (resource, byte range).
#[derive(Default)]
struct Hazards {
    written: Vec<(u32, u64, u64)>,
    read: Vec<(u32, u64, u64)>,
    barriers: usize,
    dispatches: usize,
    /// A barrier since the last dispatch (`PUREHW_VK_TRACE`).
    fresh: bool,
}

impl Hazards {
    /// Record an access; returns whether a barrier must come first.
    fn conflicts(&self, reads: &[(u32, u64, u64)], writes: &[(u32, u64, u64)]) -> bool {
        let hit = |a: &(u32, u64, u64), b: &(u32, u64, u64)| a.0 == b.0 && a.1 < b.2 && b.1 < a.2;
        reads.iter().any(|r| self.written.iter().any(|w| hit(r, w)))
            || writes.iter().any(|w| self.written.iter().chain(&self.read).any(|x| hit(w, x)))
    }
}

/// One dispatch's accesses.
struct Access {
    reads: [(u32, u64, u64); 6],
    nr: usize,
    writes: [(u32, u64, u64); 6],
    nw: usize,
}

impl Access {
    fn new() -> Self {
        Access { reads: [(0, 0, 0); 6], nr: 0, writes: [(0, 0, 0); 6], nw: 0 }
    }
    fn r(mut self, id: u32, off: usize, len: usize) -> Self {
        self.reads[self.nr] = (id, 4 * off as u64, 4 * (off + len) as u64);
        self.nr += 1;
        self
    }
    fn w(mut self, id: u32, off: usize, len: usize) -> Self {
        self.writes[self.nw] = (id, 4 * off as u64, 4 * (off + len) as u64);
        self.nw += 1;
        self
    }
}

/// The Vulkan backend.
pub struct Vulkan {
    gpu: Gpu,
    pipelines: HashMap<(String, Vec<u32>), Pipeline>,
    new_pipelines: bool,
    cache_path: Option<PathBuf>,
    bufs: Vec<DevBuf>,
    weights: Vec<DevWeight>,
    /// Weight memory: device copies, and host ranges imported in place (start, end address,
    /// store, and the bytes whose owner keeps the pages mapped while the device reads them).
    wstore: Vec<RawBuffer>,
    imported: Vec<(usize, usize, usize, purehw_hal::HostBytes)>,
    staging: Option<RawBuffer>,
    readback: Option<RawBuffer>,
    step_up: Option<RawBuffer>,
    step_dev: Option<RawBuffer>,
    /// Quantized activations of `MatMul { act: Int8 }` (quantized here, then the integer matmul).
    scratch: Option<RawBuffer>,
    shapes: Vec<Shape>,
    /// Least recently used shape last; evicted when the cache is full.
    fence: raw::Fence,
    pending: bool,
    /// Steps submitted ahead (`Backend::submit_ahead`): per parity, the step and readback
    /// buffers, the fence, whether it is still to be waited for, and the step's read offsets
    /// and lengths; `ahead_n` in flight or uncollected, the next taking parity `ahead_next`.
    ahead: [Ahead; 2],
    ahead_n: usize,
    ahead_next: usize,
    /// `PUREHW_VK_AHEAD=0` turns steps ahead off (each step then waits for the last).
    ahead_on: bool,
    once: raw::CommandBuffer,
    host_step: Vec<u32>,
    /// Each RoPE table's frequencies, by (theta, scale, head_dim) bits: computed once, not per
    /// step (a decode step then allocates nothing and calls no `powf`).
    rope_freqs: Vec<((u32, u32, usize), Vec<f32>)>,
    mem_used: u64,
    budget: u64,
    lost: bool,
    fault: Option<Fault>,
    /// `PUREHW_VK_FAULT=lost:N` / `oom:N`: the fault strikes at the N-th submit / allocation.
    fault_after: Option<(Fault, usize)>,
    last_step_ns: Option<f64>,
    /// Device seconds of every timed step so far, and their count.
    steps_time: (f64, u64),
    /// Dispatches and barriers of the last recorded step (for `purehw bench`).
    last_counts: (usize, usize),
    /// Decode matmuls on `mm_split.comp` (see [`VulkanOptions::split_matvec`]).
    split: bool,
    /// Integer dots through the device's packed 4×8-bit dot product (`PUREHW_VK_DOT=0`: the
    /// portable form, for comparing the two).
    dot: bool,
    /// Which prologues decode steps use (norm, gate); `PUREHW_VK_PRO=none|norm|gate|all`
    /// overrides the default, for measuring each.
    prologues: (bool, bool),
    /// Decode matmuls shrink their rows per workgroup until the dispatch has this many
    /// workgroups (latency: fewer items per invocation); `PUREHW_VK_SPLIT_WG` overrides it.
    split_wg: usize,
    /// Prefill matmuls on block formats take `mm_tile.comp` (`PUREHW_VK_TILE=0` keeps
    /// `mm_q8.comp`; `PUREHW_VK_TILE=R,T,GR,KC,MAGIC` forces one tile, for measuring).
    tile: Option<Option<[u32; 5]>>,
    /// See [`VulkanOptions::batch_tile`] (where the tiled kernel is on): (tokens, rows).
    batch_tile: (usize, usize),
    /// Prefill attention in blocks of rows (`attention_blk.comp`); `PUREHW_VK_ATTN_BLK=0` keeps
    /// one row per workgroup.
    attn_blk: bool,
    /// One-token matmuls on compressed-tensors weights take `mm_int.comp`'s chunked path where
    /// the shapes allow (`PUREHW_VK_INT_CHUNKS=0`: the element-wise one, for comparing).
    int_chunks: bool,
    /// The chunked path's wide variant (see [`VulkanOptions::int_wide`]).
    int_wide: bool,
    /// Shaders using exact division take their `.x64` variants (see [`VulkanOptions::exact_f64`]).
    exact_f64: bool,
    /// Threads a workgroup of one-token `mm_int` matmuls (`PUREHW_VK_INT_WG=64|256`, for
    /// measuring; default: 64 below 32768 rows, else 256).
    int_wg: Option<u32>,
    /// Chunks whose codes the wide variant loads at once ([`INT_DEPTH`]; `PUREHW_VK_INT_DEPTH`
    /// sets 1–8, for measuring).
    int_depth: u32,
    /// Rows per block-attention workgroup (see [`VulkanOptions::attention_rows`]).
    attn_qb: Option<usize>,
    /// Decode matmuls' tails (see [`VulkanOptions::tails`]).
    tails: Tails,
    /// The tails' counters (`TAIL_COUNTERS` words, zero between steps).
    counters: Option<RawBuffer>,
    /// Tail groups of the step being recorded (each takes the next counter).
    rec_tails: usize,
    /// `PUREHW_VK_TRACE=1`: print each dispatch to stderr as a step shape is recorded.
    trace: bool,
    /// `PUREHW_VK_PROFILE=1`: device time per kernel (every dispatch then ends with a barrier and
    /// a timestamp), printed on drop.
    profile: Option<HashMap<String, (f64, usize)>>,
    /// `PUREHW_VK_PROFILE=2`: the profile keys name each dispatch's spec constants and grid.
    profile_shapes: bool,
    prof_names: Vec<String>,
    /// Rows of the step being recorded (profile keys).
    rec_rows: usize,
    /// Whether mapped weights may be imported (see [`VulkanOptions::import`]).
    import: bool,
    /// Streamed layers' slots (see [`Backend::stream_slots`]).
    ring: Option<Ring>,
    /// Two command buffers and fences for filling slots through two halves of staging.
    copy_sync: Option<([raw::CommandBuffer; 2], [raw::Fence; 2])>,
}

/// Device buffers that streamed layers take turns in: layer weights are placed at the same
/// offsets whichever time they are copied in, so recorded steps stay valid.
struct Ring {
    /// The slots' weight stores.
    slots: Vec<usize>,
    slot_bytes: u64,
    /// Per layer: its slot, the next free byte there, and each weight's bytes and offset.
    layers: HashMap<usize, SlotLayer>,
    /// The layer each slot holds now.
    holds: Vec<Option<usize>>,
    /// Bytes copied into slots so far, and the seconds it took.
    copied: (u64, f64),
}

/// A streamed layer: its slot, the next free byte there, and each weight's bytes and offset.
type SlotLayer = (usize, u64, Vec<(purehw_hal::HostBytes, u64)>);

/// Alignment of a weight's rows in a slot (at least any shader's widest load).
const SLOT_ALIGN: u64 = 256;

/// The workgroups a decode matmul aims for (see `split_rows`; 0 keeps the largest rows per
/// workgroup that shared memory allows). A decode step's matmuls are latency-bound: with fewer
/// rows per workgroup each invocation has fewer items to load and chain. H100, tg128 Gemma 3
/// 270M / SmolLM2 without prologues: 0 → 556 / 398, 256 → 690 / 544, 512 → 663 / 541 tokens/s.
const SPLIT_WG: usize = 256;

/// Recorded step shapes kept: enough for a streamed model's per-layer submissions (one shape per
/// layer for decode, one for prefill) next to the whole-step ones.
const SHAPES: usize = 160;
/// Step words of one sequence's span: (row, len, cache_row, pos0, ring_row), as the shaders read them.
const SPAN_WORDS: usize = 5;

impl std::fmt::Debug for Vulkan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vulkan").field("device", &self.gpu.info.name).field("buffers", &self.bufs.len()).finish()
    }
}

impl Vulkan {
    /// A backend on the device `opts` picks (default: the best one).
    pub fn new(opts: &VulkanOptions) -> Result<Vulkan> {
        let vk_err = |e: VkError| VulkanError::Vk { device: "vulkan".into(), source: e };
        let inst = Instance::shared(opts.validation).map_err(vk_err)?;
        let devs = inst.devices().map_err(vk_err)?;
        let usable = |d: &DeviceInfo| d.buffer_device_address && (opts.allow_cpu || d.is_gpu());
        let chosen = match &opts.device {
            Some(sel) => {
                let by_index = sel.parse::<usize>().ok().and_then(|i| devs.iter().find(|(_, d)| d.index == i));
                let lower = sel.to_lowercase();
                by_index.or_else(|| devs.iter().find(|(_, d)| d.name.to_lowercase().contains(&lower))).ok_or_else(
                    || {
                        let names: Vec<String> = devs.iter().map(|(_, d)| format!("{}: {}", d.index, d.name)).collect();
                        vk_err(VkError::NoDevice(format!(
                            "PUREHW_VK_DEVICE={sel:?} matches none of [{}]",
                            names.join(", ")
                        )))
                    },
                )?
            }
            None => devs
                .iter()
                .filter(|(_, d)| usable(d))
                .min_by_key(|(_, d)| (rank(d.kind), d.index))
                .ok_or_else(|| vk_err(VkError::NoDevice("no Vulkan device with buffer device address".into())))?,
        };
        let (pd, info) = (chosen.0, chosen.1.clone());
        let cache_path = cache_file(&info);
        let cache_data = cache_path.as_ref().and_then(|p| std::fs::read(p).ok()).unwrap_or_default();
        let name = info.name.clone();
        let gpu = Gpu::new(inst, pd, info, &cache_data).map_err(|e| VulkanError::Vk { device: name, source: e })?;
        let split = opts.split_matvec.unwrap_or(gpu.info.is_gpu());
        let int_wide = opts.int_wide.unwrap_or(false);
        let exact_f64 = opts.exact_f64.unwrap_or(true) && gpu.info.float64;
        let dot = gpu.info.int8_dot && std::env::var("PUREHW_VK_DOT").map_or(true, |v| v != "0");
        let prologues = opts.prologues.unwrap_or(PROLOGUES);
        let budget = gpu.info.heaps.iter().filter(|h| h.1).map(|h| h.0).max().unwrap_or(0);
        let dev = |e: VkError| VulkanError::Vk { device: gpu.info.name.clone(), source: e };
        let fence = gpu.fence().map_err(dev)?;
        let ahead_fences = [gpu.fence().map_err(dev)?, gpu.fence().map_err(dev)?];
        let once = gpu.command_buffer().map_err(dev)?;
        Ok(Vulkan {
            gpu,
            pipelines: HashMap::new(),
            new_pipelines: false,
            cache_path,
            bufs: Vec::new(),
            weights: Vec::new(),
            wstore: Vec::new(),
            imported: Vec::new(),
            staging: None,
            readback: None,
            step_up: None,
            step_dev: None,
            scratch: None,
            shapes: Vec::new(),
            fence,
            pending: false,
            ahead: [Ahead::new(ahead_fences[0]), Ahead::new(ahead_fences[1])],
            ahead_n: 0,
            ahead_next: 0,
            ahead_on: std::env::var("PUREHW_VK_AHEAD").map_or(true, |v| v != "0"),
            once,
            host_step: Vec::new(),
            rope_freqs: Vec::new(),
            mem_used: 0,
            budget,
            lost: false,
            fault: None,
            fault_after: fault_from_env(),
            last_step_ns: None,
            steps_time: (0.0, 0),
            last_counts: (0, 0),
            split,
            dot,
            prologues,
            split_wg: std::env::var("PUREHW_VK_SPLIT_WG").ok().and_then(|v| v.parse().ok()).unwrap_or(SPLIT_WG),
            batch_tile: opts.batch_tile.unwrap_or(BATCH_TILE),
            tile: match std::env::var("PUREHW_VK_TILE").as_deref() {
                Ok("0") => None,
                Ok(v) => Some(parse_tile(v)),
                Err(_) => Some(None),
            },
            attn_blk: std::env::var("PUREHW_VK_ATTN_BLK").map_or(true, |v| v != "0"),
            int_chunks: std::env::var("PUREHW_VK_INT_CHUNKS").map_or(true, |v| v != "0"),
            int_wide,
            exact_f64,
            int_wg: std::env::var("PUREHW_VK_INT_WG")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|w| [64, 256].contains(w)),
            int_depth: std::env::var("PUREHW_VK_INT_DEPTH")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|d| (1..=8).contains(d))
                .unwrap_or(INT_DEPTH),
            attn_qb: opts.attention_rows,
            import: opts.import.unwrap_or(true),
            ring: None,
            copy_sync: None,
            tails: if split { opts.tails.unwrap_or(Tails::DEFAULT) } else { Tails::NONE },
            counters: None,
            rec_tails: 0,
            trace: std::env::var("PUREHW_VK_TRACE").is_ok_and(|v| v == "1"),
            profile: std::env::var("PUREHW_VK_PROFILE").is_ok_and(|v| v == "1" || v == "2").then(HashMap::new),
            profile_shapes: std::env::var("PUREHW_VK_PROFILE").is_ok_and(|v| v == "2"),
            prof_names: Vec::new(),
            rec_rows: 0,
        })
    }

    /// The device in use.
    pub fn info(&self) -> &DeviceInfo {
        &self.gpu.info
    }

    /// Make the next submit or allocation fail as `fault` would (tests).
    pub fn inject_fault(&mut self, fault: Fault) {
        self.fault = Some(fault);
    }

    /// Whether a fault is set to strike (`PUREHW_VK_FAULT`, or [`inject_fault`](Self::inject_fault)).
    pub fn fault_armed(&self) -> bool {
        self.fault.is_some() || self.fault_after.is_some()
    }

    /// Dispatches and barriers of the last step recorded.
    pub fn last_step_counts(&self) -> (usize, usize) {
        self.last_counts
    }

    /// The device memory's read bandwidth in bytes/s, for a decode roofline: the best of `reps`
    /// rounds of a kernel reading a buffer of `bytes` (`bandwidth.comp`), timed on the device.
    /// `None` where the device is the CPU or uses the host's memory for weights (the host's probe
    /// measures that), has no timestamps, or could not hold the buffer. (A copy between two
    /// buffers read 851 GB/s on an H100, a quarter of what its kernels read.)
    pub fn memory_bandwidth(&mut self, bytes: u64, reps: usize) -> Result<Option<f64>> {
        if self.weights_in_place() || !self.gpu.info.is_gpu() {
            return Ok(None);
        }
        self.read_bandwidth(bytes, reps)
    }

    /// [`memory_bandwidth`](Self::memory_bandwidth)'s probe on any device with timestamps.
    pub fn read_bandwidth(&mut self, bytes: u64, reps: usize) -> Result<Option<f64>> {
        if !self.gpu.info.timestamps {
            return Ok(None);
        }
        let bytes = bytes.min(u64::from(u32::MAX) * 16) & !15;
        let Ok(src) = self.raw_buffer(bytes, Mem::Device, || "bandwidth probe".into()) else { return Ok(None) };
        let pipeline = match self.pipeline("bandwidth", &[]) {
            Ok(p) => p,
            Err(e) => {
                self.free(src, true);
                return Err(e);
            }
        };
        let push = BandwidthPush { src: addr(src.addr), quads: (bytes / 16) as u32, pad: 0 };
        // Each submission reads the buffer `READS` times, so a timed stretch lasts milliseconds
        // (a GPU leaving its idle clocks needs that); the first is not counted.
        const READS: u64 = 8;
        let mut best: Option<f64> = None;
        let mut run = || -> Result<()> {
            self.one_shot(|g, cb| g.fill_zero(cb, &src))?;
            for i in 0..=reps {
                self.one_shot(|g, cb| {
                    g.reset_queries(cb);
                    g.timestamp(cb, 0);
                    for _ in 0..READS {
                        g.dispatch(cb, pipeline, push_bytes(&push), [4096, 1, 1]);
                    }
                    g.timestamp(cb, 1);
                })?;
                if let Some(ns) = self.gpu.step_ns().filter(|ns| i > 0 && *ns > 0.0) {
                    let rate = (READS * bytes) as f64 / (ns * 1e-9);
                    best = Some(best.map_or(rate, |b| b.max(rate)));
                }
            }
            Ok(())
        };
        let r = run();
        self.free(src, true);
        r.map(|_| best)
    }

    /// `exact.glsl`'s division and square root on the device, for tests: (a[i] / b[i],
    /// sqrt(a[i])) as the shaders compute them (on the f64 or the integer path, as
    /// [`VulkanOptions::exact_f64`] chose).
    pub fn probe_exact(&mut self, a: &[f32], b: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = a.len().min(b.len());
        let mut q = vec![0.0; n];
        let mut r = vec![0.0; n];
        if n == 0 {
            return Ok((q, r));
        }
        let bufs = [self.alloc(n)?, self.alloc(n)?, self.alloc(n)?, self.alloc(n)?];
        self.write(View::new(bufs[0], 0), &a[..n])?;
        self.write(View::new(bufs[1], 0), &b[..n])?;
        let pipeline = self.pipeline("exact_probe", &[])?;
        let push = ExactPush {
            a: self.addr_of(bufs[0]),
            b: self.addr_of(bufs[1]),
            q: self.addr_of(bufs[2]),
            r: self.addr_of(bufs[3]),
            n: n as u32,
            chain: 0,
        };
        self.one_shot(|g, cb| {
            g.dispatch(cb, pipeline, push_bytes(&push), [(n as u32).div_ceil(64), 1, 1]);
            // Before the copies `read` makes.
            g.barrier(cb);
        })?;
        self.read(View::new(bufs[2], 0), &mut q)?;
        self.read(View::new(bufs[3], 0), &mut r)?;
        Ok((q, r))
    }

    /// Device time in ns of one invocation's dependent chain of `chain` exact division + square
    /// root steps (`exact_probe.comp`), the best of `reps`; `None` without timestamps. For
    /// `benches/exact.rs`.
    pub fn exact_chain_ns(&mut self, chain: u32, reps: usize) -> Result<Option<f64>> {
        if !self.gpu.info.timestamps {
            return Ok(None);
        }
        let bufs = [self.alloc(1)?, self.alloc(1)?];
        self.write(View::new(bufs[0], 0), &[1.75])?;
        self.write(View::new(bufs[1], 0), &[1.3])?;
        let pipeline = self.pipeline("exact_probe", &[])?;
        let push = ExactPush {
            a: self.addr_of(bufs[0]),
            b: self.addr_of(bufs[1]),
            q: self.addr_of(bufs[0]),
            r: self.addr_of(bufs[1]),
            n: 1,
            chain,
        };
        let mut best: Option<f64> = None;
        for i in 0..=reps {
            self.one_shot(|g, cb| {
                g.reset_queries(cb);
                g.timestamp(cb, 0);
                g.dispatch(cb, pipeline, push_bytes(&push), [1, 1, 1]);
                g.timestamp(cb, 1);
            })?;
            if let Some(ns) = self.gpu.step_ns().filter(|_| i > 0) {
                best = Some(best.map_or(ns, |b: f64| b.min(ns)));
            }
        }
        Ok(best)
    }

    fn err(&self, e: VkError) -> VulkanError {
        match e {
            VkError::DeviceLost => VulkanError::DeviceLost { device: self.gpu.info.name.clone() },
            e => VulkanError::Vk { device: self.gpu.info.name.clone(), source: e },
        }
    }

    fn oom(&self, what: String, need: u64) -> VulkanError {
        VulkanError::OutOfMemory {
            device: self.gpu.info.name.clone(),
            what,
            need,
            used: self.mem_used,
            budget: self.budget,
        }
    }

    fn check_alive(&self) -> Result<()> {
        if self.lost { Err(VulkanError::DeviceLost { device: self.gpu.info.name.clone() }) } else { Ok(()) }
    }

    /// Count down an environment-injected fault of kind `f`.
    fn tick_fault(&mut self, f: Fault) {
        if let Some((kind, n)) = &mut self.fault_after
            && *kind == f
        {
            if *n <= 1 {
                self.fault = Some(f);
                self.fault_after = None;
            } else {
                *n -= 1;
            }
        }
    }

    /// A buffer of `bytes`, counting device memory; an out-of-memory error names `what`.
    fn raw_buffer(&mut self, bytes: u64, kind: Mem, what: impl FnOnce() -> String) -> Result<RawBuffer> {
        self.tick_fault(Fault::OutOfMemory);
        if self.fault == Some(Fault::OutOfMemory) {
            self.fault = None;
            return Err(self.oom(what(), bytes));
        }
        match self.gpu.create_buffer(bytes, kind) {
            Ok(b) => {
                if kind == Mem::Device {
                    self.mem_used += b.size;
                }
                Ok(b)
            }
            Err(VkError::OutOfMemory { .. }) | Err(VkError::NoMemoryType) => Err(self.oom(what(), bytes)),
            Err(e) => Err(self.err(e)),
        }
    }

    fn free(&mut self, b: RawBuffer, device: bool) {
        if device {
            self.mem_used = self.mem_used.saturating_sub(b.size);
        }
        self.gpu.destroy_buffer(b);
    }

    /// Wait for the last submission, if any. Steps submitted ahead finish first; their reads
    /// stay for `wait_ahead`.
    fn settle(&mut self) -> Result<()> {
        self.settle_ahead(0)?;
        self.settle_ahead(1)?;
        self.settle_main()
    }

    /// Wait for `fence`; a lost device is remembered.
    fn wait_fence(&mut self, fence: raw::Fence) -> Result<()> {
        let r = self.gpu.wait(fence);
        if let Err(e) = r {
            self.lost |= e == VkError::DeviceLost;
            return Err(self.err(e));
        }
        Ok(())
    }

    /// Wait for the step ahead of parity `p`, if it is still running.
    fn settle_ahead(&mut self, p: usize) -> Result<()> {
        if self.ahead[p].pending {
            self.ahead[p].pending = false;
            self.wait_fence(self.ahead[p].fence)?;
            self.note_step(self.gpu.step_ns_at(AHEAD_QUERY + 2 * p as u32));
        }
        Ok(())
    }

    /// Wait for the one step not submitted ahead, if it is still running.
    fn settle_main(&mut self) -> Result<()> {
        if self.pending {
            self.pending = false;
            self.wait_fence(self.fence)?;
            self.note_step(self.gpu.step_ns());
        }
        Ok(())
    }

    /// Run `f` on the one-shot command buffer, submit it and wait.
    fn one_shot(&mut self, f: impl FnOnce(&Gpu, raw::CommandBuffer)) -> Result<()> {
        self.settle()?;
        let cb = self.once;
        self.gpu.begin(cb).map_err(|e| self.err(e))?;
        f(&self.gpu, cb);
        self.gpu.end(cb).map_err(|e| self.err(e))?;
        self.gpu.submit(cb, self.fence).map_err(|e| self.err(e))?;
        // Not a step: its timestamps (if any) are the caller's, not a step's device time.
        self.wait_fence(self.fence)
    }

    /// An upload-side staging buffer of at least `bytes`.
    fn staging(&mut self, bytes: u64) -> Result<()> {
        if self.staging.as_ref().is_none_or(|s| s.size < bytes) {
            if let Some(old) = self.staging.take() {
                self.free(old, false);
            }
            let b = self.raw_buffer(bytes.max(1 << 20), Mem::Upload, || "staging".into())?;
            self.staging = Some(b);
        }
        Ok(())
    }

    /// A readback buffer of at least `bytes` (recorded steps copy into it, so a new one
    /// invalidates them).
    fn readback(&mut self, bytes: u64) -> Result<()> {
        if self.readback.as_ref().is_none_or(|s| s.size < bytes) {
            self.drop_shapes()?;
            if let Some(old) = self.readback.take() {
                self.free(old, false);
            }
            let b = self.raw_buffer(bytes.max(1 << 16).next_power_of_two(), Mem::Readback, || "readback".into())?;
            self.readback = Some(b);
        }
        Ok(())
    }

    fn drop_shapes(&mut self) -> Result<()> {
        self.settle()?;
        for s in self.shapes.drain(..) {
            self.gpu.free_command_buffer(s.cb);
        }
        Ok(())
    }

    /// Copy host bytes into device buffer `dst` at byte `at`, through staging when not mapped.
    fn upload(&mut self, dst: &RawBuffer, at: u64, src: &[u8]) -> Result<()> {
        if dst.is_mapped() {
            self.settle()?;
            return self.gpu.write_mapped(dst, at, src).map_err(|e| self.err(e));
        }
        self.upload_parts(dst, [(src, at)])
    }

    /// Copy each `(bytes, at)` into device buffer `dst` at `at`, through the two halves of the
    /// staging buffer in turn: the host fills one half while the device copies the other.
    fn upload_parts<'a>(&mut self, dst: &RawBuffer, parts: impl IntoIterator<Item = (&'a [u8], u64)>) -> Result<()> {
        const HALF: usize = 16 << 20;
        self.settle()?;
        self.staging(2 * HALF as u64)?;
        if self.copy_sync.is_none() {
            let make = || -> std::result::Result<_, VkError> { Ok((self.gpu.command_buffer()?, self.gpu.fence()?)) };
            let (a, b) = (make().map_err(|e| self.err(e))?, make().map_err(|e| self.err(e))?);
            self.copy_sync = Some(([a.0, b.0], [a.1, b.1]));
        }
        let (cbs, fences) = self.copy_sync.expect("made above");
        let st = self.staging.take().expect("staging");
        let mut busy = [false; 2];
        let mut k = 0;
        let mut r: std::result::Result<(), VkError> = Ok(());
        'parts: for (bytes, at) in parts {
            for (i, piece) in bytes.chunks(HALF).enumerate() {
                let h = k % 2;
                k += 1;
                let g = &self.gpu;
                let region = [raw::BufferCopy {
                    src_offset: (h * HALF) as u64,
                    dst_offset: at + (i * HALF) as u64,
                    size: piece.len() as u64,
                }];
                r = (|| {
                    if busy[h] {
                        busy[h] = false;
                        g.wait(fences[h])?;
                    }
                    g.write_mapped(&st, (h * HALF) as u64, piece)?;
                    g.begin(cbs[h])?;
                    g.copy(cbs[h], &st, dst, &region);
                    g.end(cbs[h])?;
                    g.submit(cbs[h], fences[h])?;
                    busy[h] = true;
                    Ok(())
                })();
                if r.is_err() {
                    break 'parts;
                }
            }
        }
        for h in 0..2 {
            if busy[h] {
                let w = self.gpu.wait(fences[h]);
                r = r.and(w);
            }
        }
        self.staging = Some(st);
        r.map_err(|e| {
            self.lost |= e == VkError::DeviceLost;
            self.err(e)
        })
    }

    /// The pipeline of shader variant `name` with specialization constants `spec`.
    fn pipeline(&mut self, name: &str, spec: &[u32]) -> Result<Pipeline> {
        let key = (name.to_string(), spec.to_vec());
        if let Some(&p) = self.pipelines.get(&key) {
            return Ok(p);
        }
        let twin = self.exact_f64.then(|| spirv(&format!("{name}.x64"))).flatten();
        let bytes =
            twin.or_else(|| spirv(name)).ok_or_else(|| VulkanError::Unsupported(format!("no shader {name}")))?;
        let words: Vec<u32> = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let p = self.gpu.create_pipeline(&words, spec).map_err(|e| self.err(e))?;
        self.pipelines.insert(key, p);
        self.new_pipelines = true;
        Ok(p)
    }

    /// Keep the pipeline cache on disk so a second start does not recompile.
    fn save_pipeline_cache(&mut self) {
        if !self.new_pipelines {
            return;
        }
        self.new_pipelines = false;
        let Some(path) = &self.cache_path else { return };
        let data = self.gpu.pipeline_cache_data();
        if data.is_empty() {
            return;
        }
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &data).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }

    fn buf(&self, b: BufId) -> &DevBuf {
        &self.bufs[b.0 as usize]
    }

    fn weight_ref(&self, w: WeightId) -> &DevWeight {
        &self.weights[w.0 as usize]
    }

    /// A compressed-tensors weight's format and the addresses of its scales and zero points
    /// (zero points: the scales' address when symmetric, never read).
    fn int_parts(&self, w: WeightId) -> Option<(purehw_kernels::quant::PackedInt, Addr, Addr)> {
        let wt = self.weight_ref(w);
        let (Format::Int(p), Some(parts)) = (wt.format, wt.int) else { return None };
        let at = |(store, byte): (usize, u64)| addr(self.wstore[store].addr + byte);
        let scales = at(parts.scales);
        Some((p, scales, parts.zeros.map_or(scales, at)))
    }
}

/// `PUREHW_VK_FAULT=lost:N` or `oom:N` (tests of the error paths through the binary).
fn fault_from_env() -> Option<(Fault, usize)> {
    let v = std::env::var("PUREHW_VK_FAULT").ok()?;
    let (kind, n) = v.split_once(':')?;
    let n = n.parse().ok()?;
    match kind {
        "lost" => Some((Fault::DeviceLost, n)),
        "oom" => Some((Fault::OutOfMemory, n)),
        _ => None,
    }
}

/// `$PUREHW_VK_PIPELINE_CACHE`, else `$XDG_CACHE_HOME/purehw/vulkan/<pipeline cache uuid>.bin`,
/// else under `~/.cache`.
fn cache_file(info: &DeviceInfo) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PUREHW_VK_PIPELINE_CACHE") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let uuid: String = info.uuid.iter().map(|b| format!("{b:02x}")).collect();
    Some(base.join("purehw").join("vulkan").join(format!("{uuid}.bin")))
}

impl Drop for Vulkan {
    fn drop(&mut self) {
        let _ = self.settle();
        if let Some(p) = &self.profile {
            let mut v: Vec<_> = p.iter().collect();
            v.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
            let total: f64 = v.iter().map(|e| e.1.0).sum();
            eprintln!("purehw vulkan profile ({}): {:.3} ms in kernels", self.gpu.info.name, total * 1e-6);
            for (k, (ns, n)) in v {
                eprintln!("  {k:<28} {:>10.3} ms {:>5.1}% {n:>8} dispatches", ns * 1e-6, 100.0 * ns / total.max(1.0));
            }
        }
        self.gpu.wait_idle();
        self.save_pipeline_cache();
        for s in self.shapes.drain(..) {
            self.gpu.free_command_buffer(s.cb);
        }
        let bufs: Vec<RawBuffer> = self
            .bufs
            .drain(..)
            .map(|b| b.raw)
            .chain(self.wstore.drain(..))
            .chain(
                [
                    self.staging.take(),
                    self.readback.take(),
                    self.step_up.take(),
                    self.step_dev.take(),
                    self.scratch.take(),
                    self.counters.take(),
                ]
                .into_iter()
                .flatten(),
            )
            .collect();
        for b in bufs {
            self.gpu.destroy_buffer(b);
        }
        for a in &mut self.ahead {
            for b in [a.up.take(), a.readback.take()].into_iter().flatten() {
                self.gpu.destroy_buffer(b);
            }
            self.gpu.destroy_fence(a.fence);
        }
        self.gpu.free_command_buffer(self.once);
        self.gpu.destroy_fence(self.fence);
        if let Some((cbs, fences)) = self.copy_sync.take() {
            for (cb, f) in cbs.into_iter().zip(fences) {
                self.gpu.free_command_buffer(cb);
                self.gpu.destroy_fence(f);
            }
        }
    }
}

impl Resources<BufId, WeightId> for Vulkan {
    fn buffer_len(&self, b: BufId) -> Option<usize> {
        self.bufs.get(b.0 as usize).map(|b| b.len)
    }
    fn weight_info(&self, w: WeightId) -> Option<WeightInfo> {
        self.weights.get(w.0 as usize).map(|w| WeightInfo { format: w.format, rows: w.rows, cols: w.cols })
    }
}

impl ErrorType for Vulkan {
    type Error = VulkanError;
}

fn push_bytes<T: Pod>(p: &T) -> &[u8] {
    bytemuck::bytes_of(p)
}

/// Page size for host imports.
const PAGE: usize = 4096;

impl Backend for Vulkan {
    type Buffer = BufId;
    type Weight = WeightId;

    fn name(&self) -> &str {
        "vulkan"
    }

    fn supports(&self, op: OpKind) -> bool {
        match op {
            // compressed-tensors integer weights: f32 activations (mm_int, embed_int).
            OpKind::Embed(_) | OpKind::EmbedIds(_) | OpKind::MatMul(_) => true,
            OpKind::MatMulQ8(f) => f.act_layout().is_some(),
            OpKind::KvCache(_) => true,
            k => k.is_format_free(),
        }
    }

    fn alloc(&mut self, len: usize) -> Result<BufId> {
        self.check_alive()?;
        let bytes = (len as u64).checked_mul(4).ok_or_else(|| self.oom(format!("a buffer of {len} f32"), u64::MAX))?;
        let raw = self.raw_buffer(bytes, Mem::Device, || format!("a buffer of {len} f32 ({bytes} bytes)"))?;
        // Device memory starts undefined; buffers start zeroed, as on the CPU.
        let r = self.one_shot(|g, cb| g.fill_zero(cb, &raw));
        if let Err(e) = r {
            self.free(raw, true);
            return Err(e);
        }
        self.bufs.push(DevBuf { raw, len });
        Ok(BufId(self.bufs.len() as u32 - 1))
    }

    fn load_weight(&mut self, w: &HostWeight) -> Result<WeightId> {
        self.check_weight(w)?;
        self.load_at(w, None)
    }

    fn write(&mut self, dst: View<BufId>, src: &[f32]) -> Result<()> {
        self.check_alive()?;
        let len = self.buffer_len(dst.buf).ok_or(purehw_hal::check::CheckError::UnknownBuffer { what: "write" })?;
        purehw_hal::check::in_range(dst, src.len(), len, "write")?;
        let raw = std::mem::replace(&mut self.bufs[dst.buf.0 as usize].raw, placeholder());
        let r = self.upload(&raw, 4 * dst.offset as u64, bytemuck::cast_slice(src));
        self.bufs[dst.buf.0 as usize].raw = raw;
        r
    }

    fn read(&mut self, src: View<BufId>, dst: &mut [f32]) -> Result<()> {
        self.check_alive()?;
        let len = self.buffer_len(src.buf).ok_or(purehw_hal::check::CheckError::UnknownBuffer { what: "read" })?;
        purehw_hal::check::in_range(src, dst.len(), len, "read")?;
        let bytes = 4 * dst.len() as u64;
        if self.buf(src.buf).raw.is_mapped() {
            self.settle()?;
            let b = &self.bufs[src.buf.0 as usize].raw;
            return self
                .gpu
                .read_mapped(b, 4 * src.offset as u64, bytemuck::cast_slice_mut(dst))
                .map_err(|e| self.err(e));
        }
        self.readback(bytes)?;
        let rb = self.readback.take().expect("readback");
        let region = [raw::BufferCopy { src_offset: 4 * src.offset as u64, dst_offset: 0, size: bytes }];
        let sb = std::mem::replace(&mut self.bufs[src.buf.0 as usize].raw, placeholder());
        let r = self.one_shot(|g, cb| {
            g.copy(cb, &sb, &rb, &region);
            g.host_barrier(cb);
        });
        self.bufs[src.buf.0 as usize].raw = sb;
        let r = r.and_then(|_| self.gpu.read_mapped(&rb, 0, bytemuck::cast_slice_mut(dst)).map_err(|e| self.err(e)));
        self.readback = Some(rb);
        r
    }

    fn submit(&mut self, step: &Step<'_>, ops: &[Op<BufId, WeightId>]) -> Result<()> {
        self.run_step(step, ops, &mut [], false)
    }

    fn submit_read(
        &mut self,
        step: &Step<'_>,
        ops: &[Op<BufId, WeightId>],
        reads: &mut [(View<BufId>, &mut [f32])],
    ) -> Result<()> {
        self.run_step(step, ops, reads, true)
    }

    fn submit_ahead(
        &mut self,
        step: &Step<'_>,
        ops: &[Op<BufId, WeightId>],
        reads: &[(View<BufId>, usize)],
    ) -> Result<bool> {
        let read_bytes: u64 = reads.iter().map(|r| 4 * r.1 as u64).sum();
        // Profiling times each step alone; a copy-only step takes another path.
        if !self.ahead_on
            || self.profile.is_some()
            || reads.len() > AHEAD_READS
            || read_bytes > AHEAD_READ_BYTES
            || ops.is_empty()
            || ops.iter().all(|o| matches!(o, Op::Copy { .. }))
        {
            return Ok(false);
        }
        self.check_alive()?;
        if self.ahead_n >= 2 {
            return Err(VulkanError::Unsupported("two steps are ahead already (wait_ahead first)".into()));
        }
        purehw_hal::check::ops(self, step, ops)?;
        for &(v, n) in reads {
            let len = self.buffer_len(v.buf).ok_or(purehw_hal::check::CheckError::UnknownBuffer { what: "read" })?;
            purehw_hal::check::in_range(v, n, len, "read")?;
        }
        self.settle_main()?;
        let p = self.ahead_next;
        let si = self.shape_for(step, ops, reads, Some(p))?;
        self.replay(step, si, Some(p))?;
        let a = &mut self.ahead[p];
        a.nreads = reads.len();
        for (i, (&at, r)) in self.shapes[si].read_at.iter().zip(reads).enumerate() {
            a.reads[i] = (at, r.1);
        }
        self.ahead_n += 1;
        self.ahead_next = 1 - p;
        let s = self.shapes.remove(si);
        self.shapes.push(s);
        Ok(true)
    }

    fn wait_ahead(&mut self, dst: &mut [&mut [f32]]) -> Result<()> {
        if self.ahead_n == 0 {
            return Err(VulkanError::Unsupported("wait_ahead with no step ahead".into()));
        }
        let p = (self.ahead_next + 2 - self.ahead_n) % 2;
        self.ahead_n -= 1;
        self.settle_ahead(p)?;
        let a = &self.ahead[p];
        let rb = a.readback.as_ref().expect("readback");
        for (d, &(at, n)) in dst.iter_mut().zip(&a.reads[..a.nreads]) {
            let n = n.min(d.len());
            self.gpu.read_mapped(rb, at, bytemuck::cast_slice_mut(&mut d[..n])).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// On a device that shares memory with the host and imports mapped files (lavapipe, an
    /// integrated GPU), the weights are the file's pages; elsewhere they are device copies.
    fn weights_in_place(&self) -> bool {
        let info = &self.gpu.info;
        self.import && info.unified() && info.external_memory_host && info.min_import_align as usize <= PAGE
    }

    fn finish(&mut self) -> Result<()> {
        self.settle()
    }

    fn stream_slots(&mut self, slots: usize, slot_bytes: usize) -> Result<bool> {
        self.check_alive()?;
        // Room for each weight's alignment (a layer has a handful of matrices).
        let size = (slot_bytes as u64 + 64 * SLOT_ALIGN).next_multiple_of(4);
        let mut ring = Ring {
            slots: Vec::new(),
            slot_bytes: size,
            layers: HashMap::new(),
            holds: vec![None; slots],
            copied: (0, 0.0),
        };
        for i in 0..slots {
            let raw =
                self.raw_buffer(size, Mem::Device, || format!("streamed-layer slot {i} of {slots} ({size} bytes)"))?;
            self.wstore.push(raw);
            ring.slots.push(self.wstore.len() - 1);
        }
        self.ring = Some(ring);
        Ok(true)
    }

    fn load_streamed(&mut self, w: &HostWeight, layer: usize, slot: usize) -> Result<WeightId> {
        self.check_weight(w)?;
        let Some(ring) = self.ring.as_mut().filter(|r| slot < r.slots.len()) else {
            return Err(VulkanError::Unsupported(format!("no streaming slot {slot} (stream_slots first)")));
        };
        let e = ring.layers.entry(layer).or_insert((slot, 0, Vec::new()));
        if e.0 != slot {
            return Err(VulkanError::Unsupported(format!("layer {layer} given two streaming slots")));
        }
        // Codes, scales and zero points each at the next aligned byte of the layer's slot.
        let store = ring.slots[slot];
        let mut placed = [(store, 0); 3];
        for (i, b) in w.byte_parts().into_iter().enumerate() {
            let Some(b) = b else { continue };
            let at = e.1.next_multiple_of(SLOT_ALIGN);
            if at + b.len() as u64 > ring.slot_bytes {
                return Err(VulkanError::Unsupported(format!(
                    "layer {layer}'s weights do not fit its streaming slot of {} bytes",
                    ring.slot_bytes
                )));
            }
            e.1 = at + b.len() as u64;
            e.2.push((b.clone(), at));
            placed[i] = (store, at);
        }
        self.load_at(w, Some(placed))
    }

    fn fill_slot(&mut self, layer: usize) -> Result<()> {
        let Some(ring) = self.ring.as_mut() else { return Ok(()) };
        let Some(&(slot, _, _)) = ring.layers.get(&layer) else { return Ok(()) };
        if ring.holds[slot] == Some(layer) {
            return Ok(());
        }
        ring.holds[slot] = None;
        // Lent out of the ring while copying (no allocation: the entry goes back in place).
        let (k, entry) = ring.layers.remove_entry(&layer).expect("present");
        let store = ring.slots[slot];
        // Every submitted op is done with the slot's previous layer before it is overwritten.
        let raw = std::mem::replace(&mut self.wstore[store], placeholder());
        let t = std::time::Instant::now();
        let r = self.upload_parts(&raw, entry.2.iter().map(|(b, at)| (b.as_slice(), *at)));
        self.wstore[store] = raw;
        let ring = self.ring.as_mut().expect("ring");
        ring.copied.0 += entry.2.iter().map(|(b, _)| b.len() as u64).sum::<u64>();
        ring.copied.1 += t.elapsed().as_secs_f64();
        ring.layers.insert(k, entry);
        if r.is_ok() {
            ring.holds[slot] = Some(layer);
        }
        r
    }

    fn stats(&self) -> Stats {
        Stats {
            device: Some(self.gpu.info.name.clone()),
            memory_used: Some(self.mem_used),
            memory_budget: Some(self.budget),
            last_step_seconds: self.last_step_ns.map(|ns| ns * 1e-9),
            steps_seconds: Some(self.steps_time),
            streamed: self.ring.as_ref().map(|r| r.copied),
        }
    }
}

/// A stand-in while a buffer is lent out of `bufs` (never used by the device).
fn placeholder() -> RawBuffer {
    vk::placeholder_buffer()
}

impl Vulkan {
    /// A weight this backend can hold and compute with (its parts consistent, under 2 GiB).
    fn check_weight(&self, w: &HostWeight) -> Result<()> {
        self.check_alive()?;
        if matches!(w.format, Format::Int(_)) {
            w.check().map_err(|e| VulkanError::Unsupported(format!("a {}x{} weight: {e}", w.rows, w.cols)))?;
        }
        if !w.is_consistent() {
            return Err(VulkanError::BadWeight {
                format: w.format.name(),
                rows: w.rows,
                cols: w.cols,
                bytes: w.data.len(),
            });
        }
        if w.data.len() as u64 >= 1 << 31 {
            return Err(VulkanError::Unsupported(format!(
                "a weight of {} bytes (more than 2 GiB in one tensor is not supported yet)",
                w.data.len()
            )));
        }
        Ok(())
    }

    /// Place a checked weight: at `placed` (its codes, scales and zero points in a streaming
    /// slot, copied in later), else imported in place or copied to a buffer of its own; then its
    /// scales, zero points or f32 vector copy.
    fn load_at(&mut self, w: &HostWeight, placed: Option<[(usize, u64); 3]>) -> Result<WeightId> {
        let bytes = w.data.as_slice();
        let (store, byte) = match placed {
            Some(at) => at[0],
            None => match self.import(w)? {
                Some(at) => at,
                None => {
                    let size = (bytes.len() as u64).next_multiple_of(4);
                    let raw = self.raw_buffer(size, Mem::Device, || {
                        format!("a {}x{} {} weight ({} bytes)", w.rows, w.cols, w.format.name(), bytes.len())
                    })?;
                    self.upload(&raw, 0, bytes)?;
                    self.wstore.push(raw);
                    (self.wstore.len() - 1, 0)
                }
            },
        };
        // An integer weight's scales and zero points: small, always copied.
        let int = match w.format {
            Format::Int(_) => {
                let mut part = |b: &purehw_hal::HostBytes, what: &str, i: usize| -> Result<(usize, u64)> {
                    if let Some(at) = placed {
                        return Ok(at[i]);
                    }
                    let bytes = b.as_slice();
                    let raw = self.raw_buffer((bytes.len() as u64).next_multiple_of(4).max(4), Mem::Device, || {
                        format!("the {what} of a {}x{} weight ({} bytes)", w.rows, w.cols, bytes.len())
                    })?;
                    self.upload(&raw, 0, bytes)?;
                    self.wstore.push(raw);
                    Ok((self.wstore.len() - 1, 0))
                };
                let missing =
                    || VulkanError::Unsupported(format!("a {}x{} integer weight without scales", w.rows, w.cols));
                let scales = part(w.parts.scales.as_ref().ok_or_else(missing)?, "scales", 1)?;
                let zeros = match &w.parts.zeros {
                    Some(z) => Some(part(z, "zero points", 2)?),
                    None => None,
                };
                Some(IntParts { scales, zeros })
            }
            _ => None,
        };
        let f32_store = if w.rows == 1 && w.format != Format::F32 && int.is_none() {
            let mut v = vec![0f32; w.cols];
            purehw_kernels::quant::dequantize_row(w.format, bytes, &mut v);
            let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let raw = self.raw_buffer(b.len() as u64, Mem::Device, || "a norm weight".into())?;
            self.upload(&raw, 0, &b)?;
            self.wstore.push(raw);
            Some(self.wstore.len() - 1)
        } else {
            None
        };
        self.weights.push(DevWeight { format: w.format, rows: w.rows, cols: w.cols, store, byte, f32_store, int });
        Ok(WeightId(self.weights.len() as u32 - 1))
    }

    /// Import the mapped pages holding `w` in place, when the device shares memory with the host.
    /// Returns (store, byte offset of the weight in it).
    fn import(&mut self, w: &HostWeight) -> Result<Option<(usize, u64)>> {
        let info = &self.gpu.info;
        if !w.data.is_mapped() || !self.weights_in_place() {
            return Ok(None);
        }
        let (owner, range) = w.data.owner();
        let base = owner.as_ptr() as usize;
        let (start, end) = (base + range.start, base + range.end);
        if let Some((s, _, i, _)) = self.imported.iter().find(|(s, e, _, _)| *s <= start && end <= *e) {
            return Ok(Some((*i, (start - s) as u64)));
        }
        // Import from this weight's page on, as far as the mapping (rounded up to its last page)
        // and one allocation reach: later weights of the file usually land in the same range.
        let lo = start & !(PAGE - 1);
        let map_end = (base + owner.len()).next_multiple_of(PAGE);
        let max = (info.max_alloc as usize).min(1 << 31) & !(PAGE - 1);
        let hi = map_end.min(lo + max);
        if end > hi {
            return Ok(None);
        }
        // The pages lo..hi lie inside the file's mapping (its start is page-aligned and the kernel
        // maps whole pages), which the weight's HostBytes keeps alive while this backend holds it;
        // the import reads them in place.
        let bytes = page_range(owner, lo - base, hi - base);
        match self.gpu.import_host(bytes) {
            Ok(raw) => {
                self.wstore.push(raw);
                let i = self.wstore.len() - 1;
                self.imported.push((lo, hi, i, w.data.clone()));
                Ok(Some((i, (start - lo) as u64)))
            }
            Err(_) => Ok(None),
        }
    }
}

/// `owner[lo..hi]` where `hi` may run past `owner.len()` up to its last page (still mapped).
fn page_range(owner: &[u8], lo: usize, hi: usize) -> &[u8] {
    vk::extend_to_page(owner, lo, hi)
}

// ---------------------------------------------------------------------------------------------
// Recording steps

/// What one step needs recorded (the op list may be expanded first).
impl Vulkan {
    fn run_step(
        &mut self,
        step: &Step<'_>,
        ops: &[Op<BufId, WeightId>],
        reads: &mut [(View<BufId>, &mut [f32])],
        wait: bool,
    ) -> Result<()> {
        self.check_alive()?;
        purehw_hal::check::ops(self, step, ops)?;
        for (v, dst) in reads.iter() {
            let len = self.buffer_len(v.buf).ok_or(purehw_hal::check::CheckError::UnknownBuffer { what: "read" })?;
            purehw_hal::check::in_range(*v, dst.len(), len, "read")?;
        }
        self.settle()?;
        if reads.is_empty() && !ops.is_empty() && ops.iter().all(|o| matches!(o, Op::Copy { .. })) {
            return self.copy_step(ops);
        }
        let si = self.shape_for(step, ops, reads, None)?;
        self.replay(step, si, None)?;
        // Most recently used last.
        let s = self.shapes.remove(si);
        self.shapes.push(s);
        if !wait && reads.is_empty() && self.profile.is_none() {
            return Ok(());
        }
        self.settle()?;
        self.collect_profile();
        if reads.is_empty() {
            return Ok(());
        }
        let rb = self.readback.as_ref().expect("readback");
        let at = &self.shapes.last().expect("shape").read_at;
        for ((_, dst), &off) in reads.iter_mut().zip(at) {
            self.gpu.read_mapped(rb, off, bytemuck::cast_slice_mut(dst)).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Submit recorded shape `si` for `step`: the step's data into its step buffer (the
    /// parity's for a step ahead), then the command buffer, signalling the matching fence.
    fn replay(&mut self, step: &Step<'_>, si: usize, parity: Option<usize>) -> Result<()> {
        // Lent out of the shape (no copy: a decode step allocates nothing).
        let layout = std::mem::take(&mut self.shapes[si].layout);
        self.fill_step(step, &layout);
        self.shapes[si].layout = layout;
        let up = match parity {
            Some(p) => self.ahead[p].up.as_ref(),
            None => self.step_up.as_ref(),
        };
        let up = up.expect("step buffer");
        self.gpu.write_mapped(up, 0, bytemuck::cast_slice(&self.host_step)).map_err(|e| self.err(e))?;
        self.tick_fault(Fault::DeviceLost);
        if self.fault == Some(Fault::DeviceLost) {
            self.fault = None;
            self.lost = true;
            return Err(VulkanError::DeviceLost { device: self.gpu.info.name.clone() });
        }
        let (cb, fence) = (self.shapes[si].cb, parity.map_or(self.fence, |p| self.ahead[p].fence));
        if let Err(e) = self.gpu.submit(cb, fence) {
            self.lost |= e == VkError::DeviceLost;
            return Err(self.err(e));
        }
        match parity {
            Some(p) => self.ahead[p].pending = true,
            None => self.pending = true,
        }
        Ok(())
    }

    /// Add the last step's per-dispatch timestamps to the profile.
    fn collect_profile(&mut self) {
        let Some(p) = &mut self.profile else { return };
        let Some(s) = self.shapes.last() else { return };
        let Some(t) = self.gpu.timestamps(2 + s.prof.len() as u32) else { return };
        let period = self.gpu.info.timestamp_period as f64;
        let mut prev = t[0];
        for (i, name) in s.prof.iter().enumerate() {
            let now = t[2 + i];
            let e = p.entry(name.clone()).or_insert((0.0, 0));
            e.0 += now.wrapping_sub(prev) as f64 * period;
            e.1 += 1;
            prev = now;
        }
    }

    /// Index of the recorded shape for this step, recording it if new.
    fn shape_for<R: ReadSpec>(
        &mut self,
        step: &Step<'_>,
        ops: &[Op<BufId, WeightId>],
        reads: &[R],
        parity: Option<usize>,
    ) -> Result<usize> {
        let same_reads = |s: &Shape| {
            s.reads.len() == reads.len() && s.reads.iter().zip(reads).all(|(a, b)| a.0 == b.view() && a.1 == b.len())
        };
        if let Some(i) = self.shapes.iter().position(|s| {
            s.rows == step.rows()
                && s.positions == step.positions.len()
                && s.nseq == step.seqs.len()
                && s.parity == parity
                && same_reads(s)
                && s.ops.as_slice() == ops
        }) {
            return Ok(i);
        }
        if self.shapes.len() >= SHAPES {
            let s = self.shapes.remove(0);
            self.gpu.free_command_buffer(s.cb);
        }
        let layout = self.step_layout(step, ops);
        self.ensure_step_buffers(layout.words)?;
        let read_bytes: u64 = reads.iter().map(|r| 4 * r.len() as u64).sum();
        match parity {
            Some(p) => self.ensure_ahead(p, layout.words, read_bytes)?,
            None if read_bytes > 0 => self.readback(read_bytes)?,
            None => {}
        }
        self.ensure_scratch(step, ops)?;
        self.ensure_counters()?;
        let cb = self.gpu.command_buffer().map_err(|e| self.err(e))?;
        let mut read_at = Vec::with_capacity(reads.len());
        let r = self.record(cb, step, ops, reads, &layout, &mut read_at, parity);
        if let Err(e) = r {
            self.gpu.free_command_buffer(cb);
            return Err(e);
        }
        self.save_pipeline_cache();
        let prof = std::mem::take(&mut self.prof_names);
        self.shapes.push(Shape {
            prof,
            rows: step.rows(),
            positions: step.positions.len(),
            nseq: step.seqs.len(),
            ops: ops.to_vec(),
            reads: reads.iter().map(|r| (r.view(), r.len())).collect(),
            cb,
            parity,
            layout,
            read_at,
        });
        Ok(self.shapes.len() - 1)
    }

    /// Where this step's data goes in the step buffer.
    fn step_layout(&self, step: &Step<'_>, ops: &[Op<BufId, WeightId>]) -> StepLayout {
        let rows = step.rows() as u32;
        let mut l = StepLayout { tokens: 0, positions: rows, row_seq: 2 * rows, seqs: 3 * rows, ..Default::default() };
        let mut at = 3 * rows + SPAN_WORDS as u32 * step.seqs.len() as u32;
        let prows = step.positions.len();
        let mut add_rope = |theta: f32, scale: f32, head_dim: usize| {
            let key = (theta.to_bits(), scale.to_bits(), head_dim);
            if !l.rope.iter().any(|r| (r.0, r.1, r.2) == key) {
                l.rope.push((key.0, key.1, key.2, at));
                at += (prows * head_dim) as u32; // (rows, head_dim/2) pairs of (cos, sin)
            }
        };
        for op in ops {
            let _ = op.expand(|o| {
                if let Op::Rope { theta, scale, head_dim, .. } = o {
                    add_rope(theta, scale, head_dim);
                }
                Ok::<(), ()>(())
            });
        }
        l.words = at as usize;
        l
    }

    /// Parity `p`'s step buffer (room for `words`) and readback buffer, for a step ahead. The
    /// parity is free (its last step collected); shapes recorded with a buffer it outgrew go.
    fn ensure_ahead(&mut self, p: usize, words: usize, read_bytes: u64) -> Result<()> {
        if read_bytes > AHEAD_READ_BYTES {
            return Err(VulkanError::Unsupported(format!("{read_bytes} bytes of reads for a step ahead")));
        }
        let bytes = (4 * words as u64).max(256).next_power_of_two();
        if self.ahead[p].up.as_ref().is_none_or(|b| b.size < bytes) {
            self.settle()?;
            let mut i = 0;
            while i < self.shapes.len() {
                if self.shapes[i].parity == Some(p) {
                    let s = self.shapes.remove(i);
                    self.gpu.free_command_buffer(s.cb);
                } else {
                    i += 1;
                }
            }
            if let Some(old) = self.ahead[p].up.take() {
                self.free(old, false);
            }
            self.ahead[p].up = Some(self.raw_buffer(bytes, Mem::Upload, || "a step buffer of steps ahead".into())?);
        }
        if self.ahead[p].readback.is_none() {
            let rb = self.raw_buffer(AHEAD_READ_BYTES, Mem::Readback, || "the readback of steps ahead".into())?;
            self.ahead[p].readback = Some(rb);
        }
        Ok(())
    }

    /// A finished step's device time (from its timestamps).
    fn note_step(&mut self, ns: Option<f64>) {
        self.last_step_ns = ns;
        if let Some(ns) = ns {
            self.steps_time.0 += ns * 1e-9;
            self.steps_time.1 += 1;
        }
    }

    fn ensure_step_buffers(&mut self, words: usize) -> Result<()> {
        let bytes = (4 * words as u64).max(256);
        if self.step_up.as_ref().is_none_or(|b| b.size < bytes) {
            self.drop_shapes()?;
            for b in [self.step_up.take(), self.step_dev.take()].into_iter().flatten() {
                let dev = !b.is_mapped();
                self.free(b, dev);
            }
            let bytes = bytes.next_power_of_two();
            self.step_up = Some(self.raw_buffer(bytes, Mem::Upload, || "the step buffer".into())?);
            self.step_dev = Some(self.raw_buffer(bytes, Mem::Device, || "the step buffer".into())?);
        }
        Ok(())
    }

    /// The tails' counters, zeroed once (each tail leaves its counter at zero).
    fn ensure_counters(&mut self) -> Result<()> {
        if self.counters.is_some() || !self.tails.any() {
            return Ok(());
        }
        let buf = self.raw_buffer(4 * TAIL_COUNTERS as u64, Mem::Device, || "the tail counters".into())?;
        self.one_shot(|g, cb| g.fill_zero(cb, &buf))?;
        self.counters = Some(buf);
        Ok(())
    }

    /// Scratch for the quantized activations of the step's `MatMul { act: Int8 }` ops and the
    /// partial results of its `Argmax` ops.
    fn ensure_scratch(&mut self, _step: &Step<'_>, ops: &[Op<BufId, WeightId>]) -> Result<()> {
        let mut words = 0usize;
        for op in ops {
            let _ = op.expand(|o| {
                match o {
                    Op::MatMul { w, n, act: ActQuant::Int8, .. } => {
                        let wt = self.weight_ref(w);
                        if let Some(l) = wt.format.act_layout() {
                            words = words.max(n * (wt.cols / act_block(l)) * act_words(l));
                        }
                    }
                    // Two stages' pairs, or (the argmax as the LM head's tail) one per workgroup.
                    Op::Argmax { rows, cols, .. } => {
                        let tail = if self.tails.argmax && rows == 1 { cols } else { 0 };
                        words = words.max(2 * rows * cols.div_ceil(ARGMAX_CHUNK)).max(2 * tail)
                    }
                    _ => {}
                }
                Ok::<(), ()>(())
            });
        }
        let bytes = 4 * words as u64;
        if words > 0 && self.scratch.as_ref().is_none_or(|b| b.size < bytes) {
            self.drop_shapes()?;
            if let Some(b) = self.scratch.take() {
                self.free(b, true);
            }
            let bytes = bytes.next_power_of_two();
            self.scratch = Some(self.raw_buffer(bytes, Mem::Device, || "quantized activations".into())?);
        }
        Ok(())
    }

    /// The step's data as the shaders read it.
    fn fill_step(&mut self, step: &Step<'_>, l: &StepLayout) {
        let Vulkan { host_step: h, rope_freqs, .. } = self;
        h.clear();
        h.resize(l.words, 0);
        let rows = step.rows();
        h[l.tokens as usize..][..rows].copy_from_slice(step.tokens);
        h[l.positions as usize..][..step.positions.len().min(rows)]
            .copy_from_slice(&step.positions[..step.positions.len().min(rows)]);
        h[l.row_seq as usize..][..rows].fill(u32::MAX);
        for (i, s) in step.seqs.iter().enumerate() {
            let at = l.seqs as usize + SPAN_WORDS * i;
            h[at..at + SPAN_WORDS].copy_from_slice(&[s.row, s.len, s.cache_row, s.pos0, s.ring_row]);
            for r in s.row..(s.row + s.len).min(rows as u32) {
                h[l.row_seq as usize + r as usize] = i as u32;
            }
        }
        for &(theta, scale, hd, at) in &l.rope {
            let key = (theta, scale, hd);
            let i = match rope_freqs.iter().position(|(k, _)| *k == key) {
                Some(i) => i,
                None => {
                    let (th, sc) = (f32::from_bits(theta), f32::from_bits(scale));
                    let f = (0..hd / 2).map(|i| purehw_kernels::ops::rope_inv_freq(i, hd, th, sc)).collect();
                    rope_freqs.push((key, f));
                    rope_freqs.len() - 1
                }
            };
            let freqs = &rope_freqs[i].1;
            let half = freqs.len();
            for (t, &pos) in step.positions.iter().enumerate() {
                for (i, &f) in freqs.iter().enumerate() {
                    let (c, s) = purehw_kernels::ops::rope_cos_sin_at(f, pos);
                    let k = at as usize + 2 * (t * half + i);
                    h[k] = c.to_bits();
                    h[k + 1] = s.to_bits();
                }
            }
        }
    }

    /// Record a whole step into `cb`.
    #[allow(clippy::too_many_arguments)]
    fn record<R: ReadSpec>(
        &mut self,
        cb: raw::CommandBuffer,
        step: &Step<'_>,
        ops: &[Op<BufId, WeightId>],
        reads: &[R],
        layout: &StepLayout,
        read_at: &mut Vec<u64>,
        parity: Option<usize>,
    ) -> Result<()> {
        self.gpu.begin(cb).map_err(|e| self.err(e))?;
        // A step ahead may be submitted while the last one runs: it starts with a barrier on
        // everything submitted before it (its step data, the argmax it embeds, every buffer it
        // shares), and keeps its timestamps apart from the other parity's.
        let q0 = match parity {
            Some(p) => {
                self.gpu.barrier(cb);
                let q0 = AHEAD_QUERY + 2 * p as u32;
                self.gpu.reset_queries_range(cb, q0, 2);
                q0
            }
            None => {
                self.gpu.reset_queries(cb);
                0
            }
        };
        self.gpu.timestamp(cb, q0);
        {
            let up = match parity {
                Some(p) => self.ahead[p].up.as_ref(),
                None => self.step_up.as_ref(),
            };
            let (up, dev) = (up.expect("step"), self.step_dev.as_ref().expect("step"));
            let region = [raw::BufferCopy { src_offset: 0, dst_offset: 0, size: (4 * layout.words as u64).max(4) }];
            self.gpu.copy(cb, up, dev, &region);
            self.gpu.barrier(cb);
        }
        let mut hz = Hazards::default();
        self.prof_names.clear();
        self.rec_rows = step.rows();
        self.rec_tails = 0;
        // The step is submitted whole, so neighbouring ops may run as one kernel: the result is
        // both ops' by construction (each such pair is checked in the backend's tests).
        let mut i = 0;
        let mut pro: Option<Pro> = None;
        while i < ops.len() {
            let op = &ops[i];
            let next = ops.get(i + 1);
            i += 1;
            // Attention then the QuantizeAct of its output.
            if let (
                Op::Attention { out, heads, head_dim, .. },
                Some(&Op::QuantizeAct { out: qo, x, rows, cols, layout: ql }),
            ) = (*op, next)
                && x == out
                && rows == step.rows()
                && cols == heads * head_dim
                && head_dim <= 256
                && head_dim.is_multiple_of(act_block(ql))
                && pro.is_none()
            {
                self.attention(cb, step, op, Some((qo, ql)), layout, &mut hz)?;
                i += 1;
                continue;
            }
            // An output projection and the residual junction after it: the junction as its tail.
            if pro.is_none() && self.tail_norm(op, next, step) {
                self.matmul_tail_norm(cb, op, next.expect("checked"), &mut hz)?;
                i += 1;
                continue;
            }
            // The LM head and the argmax of its logits: the argmax as its tail.
            if pro.is_none() && self.tail_argmax(op, next, step) {
                self.matmul_tail_argmax(cb, op, next.expect("checked"), &mut hz)?;
                i += 1;
                continue;
            }
            // The q/k/v projections: their epilogue as the matmuls' tail.
            if pro.is_none() && self.tail_qkv(op, step, layout) {
                self.qkv_tail(cb, op, layout, &mut hz)?;
                continue;
            }
            // The gated MLP: its activation as the tail of the gate and up matmuls.
            if pro.is_none() && self.tail_gate(op, step) {
                self.gated_tail(cb, op, &mut hz)?;
                continue;
            }
            // A residual junction whose quantized output feeds the next matmuls: their prologue.
            if pro.is_none() && self.prologue_norm(op, next, step) {
                pro = Some(Pro::Norm(*op));
                continue;
            }
            // The gated MLP whose quantized output feeds the down projection: the projections
            // here, the activation in the down projection's prologue.
            let gate_next = self.prologue_gate(op, next, step);
            let native = match *op {
                Op::AddRmsNorm { dim, .. } => dim <= NORM_MAX_DIM,
                Op::Qkv { head_dim, .. } => head_dim <= QP_MAX_HEAD_DIM,
                Op::GatedFfn { .. } => true,
                _ => true,
            };
            if native || pro.is_some() {
                self.record_op(cb, step, op, layout, &mut hz, pro.take(), gate_next)?;
            } else {
                op.expand(|o| self.record_op(cb, step, &o, layout, &mut hz, None, false))?;
            }
            if gate_next {
                pro = Some(Pro::Gate(*op));
            }
        }
        if !reads.is_empty() {
            self.gpu.barrier(cb);
            hz.barriers += 1;
            let rb = match parity {
                Some(p) => self.ahead[p].readback.as_ref(),
                None => self.readback.as_ref(),
            };
            let rb = rb.expect("readback");
            let mut at = 0u64;
            for r in reads {
                let (v, size) = (r.view(), 4 * r.len() as u64);
                let region = [raw::BufferCopy { src_offset: 4 * v.offset as u64, dst_offset: at, size }];
                self.gpu.copy(cb, &self.bufs[v.buf.0 as usize].raw, rb, &region);
                read_at.push(at);
                at += size;
            }
            self.gpu.host_barrier(cb);
        }
        self.gpu.timestamp(cb, q0 + 1);
        self.gpu.end(cb).map_err(|e| self.err(e))?;
        self.last_counts = (hz.dispatches, hz.barriers);
        Ok(())
    }

    /// Record one dispatch, with a barrier first if it touches what earlier ones wrote.
    #[allow(clippy::too_many_arguments)]
    fn dispatch<T: Pod>(
        &mut self,
        cb: raw::CommandBuffer,
        hz: &mut Hazards,
        name: &str,
        spec: &[u32],
        push: &T,
        groups: [u32; 3],
        acc: Access,
    ) -> Result<()> {
        self.order(cb, hz, &acc);
        self.dispatch_raw(cb, hz, name, spec, push, groups)
    }

    /// Record one dispatch, ordered already (by [`order`](Self::order) on its group's accesses).
    fn dispatch_raw<T: Pod>(
        &mut self,
        cb: raw::CommandBuffer,
        hz: &mut Hazards,
        name: &str,
        spec: &[u32],
        push: &T,
        groups: [u32; 3],
    ) -> Result<()> {
        let p = self.pipeline(name, spec)?;
        hz.dispatches += 1;
        if self.trace {
            // One line per dispatch of each step shape recorded; `|`: a barrier before it.
            eprintln!("{} {name} {spec:?} {groups:?}", if std::mem::take(&mut hz.fresh) { "|" } else { " " });
        }
        if groups.iter().all(|&g| g > 0) {
            self.gpu.dispatch(cb, p, push_bytes(push), groups);
        }
        if self.profile.is_some() && self.prof_names.len() + 2 < vk::QUERIES as usize {
            self.gpu.barrier(cb);
            self.gpu.timestamp(cb, 2 + self.prof_names.len() as u32);
            let key = if self.profile_shapes {
                format!("{name} n={} {spec:?} {groups:?}", self.rec_rows)
            } else {
                format!("{name} n={}", self.rec_rows)
            };
            self.prof_names.push(key);
            hz.written.clear();
            hz.read.clear();
        }
        Ok(())
    }

    /// Record `acc`'s regions as touched, after a barrier when a command since the last one
    /// wrote what they touch or read what they write (the barrier orders transfers and
    /// dispatches both ways).
    fn order(&self, cb: raw::CommandBuffer, hz: &mut Hazards, acc: &Access) {
        let (reads, writes) = (&acc.reads[..acc.nr], &acc.writes[..acc.nw]);
        if hz.conflicts(reads, writes) {
            self.gpu.barrier(cb);
            hz.barriers += 1;
            hz.fresh = true;
            hz.written.clear();
            hz.read.clear();
        }
        hz.read.extend_from_slice(reads);
        hz.written.extend_from_slice(writes);
    }

    /// A step of copies only (KV-cache rows moved between slots): recorded afresh into the
    /// one-shot command buffer and not kept as a shape, since its regions differ from call to
    /// call and would push the decode steps' recordings out of the cache.
    fn copy_step(&mut self, ops: &[Op<BufId, WeightId>]) -> Result<()> {
        let cb = self.once;
        self.gpu.begin(cb).map_err(|e| self.err(e))?;
        let mut hz = Hazards::default();
        for op in ops {
            if let Op::Copy { out, src, len } = *op {
                self.record_copy(cb, &mut hz, out, src, len);
            }
        }
        self.gpu.end(cb).map_err(|e| self.err(e))?;
        if let Err(e) = self.gpu.submit(cb, self.fence) {
            self.lost |= e == VkError::DeviceLost;
            return Err(self.err(e));
        }
        self.pending = true;
        Ok(())
    }

    /// `vkCmdCopyBuffer` of `len` f32 from `src` to `out` (checked: in range, not overlapping),
    /// ordered as a dispatch is.
    fn record_copy(&self, cb: raw::CommandBuffer, hz: &mut Hazards, out: View<BufId>, src: View<BufId>, len: usize) {
        if len == 0 {
            return; // a zero-sized region is invalid in Vulkan
        }
        let acc = Access::new().r(src.buf.0, src.offset, len).w(out.buf.0, out.offset, len);
        self.order(cb, hz, &acc);
        let (src_offset, dst_offset, size) = (4 * src.offset as u64, 4 * out.offset as u64, 4 * len as u64);
        let region = [raw::BufferCopy { src_offset, dst_offset, size }];
        self.gpu.copy(cb, &self.bufs[src.buf.0 as usize].raw, &self.bufs[out.buf.0 as usize].raw, &region);
    }

    fn addr_of(&self, b: BufId) -> Addr {
        addr(self.buf(b).raw.addr)
    }

    fn step_addr(&self) -> Addr {
        addr(self.step_dev.as_ref().expect("step").addr)
    }

    /// Device address and byte offset of a weight's rows.
    fn weight_at(&self, w: WeightId) -> (Addr, u32) {
        let wt = self.weight_ref(w);
        (addr(self.wstore[wt.store].addr), wt.byte as u32)
    }

    /// The f32 values of a vector weight (norms).
    fn vector_at(&self, w: WeightId) -> Addr {
        let wt = self.weight_ref(w);
        match wt.f32_store {
            Some(s) => addr(self.wstore[s].addr),
            None => addr(self.wstore[wt.store].addr + wt.byte),
        }
    }

    /// Record one op. `pro`: the op before, run as the prologue of this op's matmuls; `skip_tail`:
    /// a GatedFfn whose activation the next op's prologue computes.
    #[allow(clippy::too_many_arguments)]
    fn record_op(
        &mut self,
        cb: raw::CommandBuffer,
        step: &Step<'_>,
        op: &Op<BufId, WeightId>,
        l: &StepLayout,
        hz: &mut Hazards,
        pro: Option<Pro>,
        skip_tail: bool,
    ) -> Result<()> {
        if let Some(p) = pro
            && !matches!(op, Op::Qkv { .. } | Op::GatedFfn { .. } | Op::MatMulQ8 { .. })
        {
            let _ = p;
            return Err(VulkanError::Unsupported("a prologue for an op without matmuls".into()));
        }
        let rows = step.rows();
        let id = |b: BufId| b.0;
        match *op {
            Op::Embed { out, table, scale } | Op::EmbedIds { out, table, scale, .. } => {
                let wt = self.weight_ref(table);
                let (cols, vocab, fmt, row_bytes) =
                    (wt.cols, wt.rows, wt.format, wt.format.bytes_for(wt.cols).unwrap_or(0));
                // EmbedIds: the tokens are f32 ids in a buffer, read in place of the step's.
                let ids = match *op {
                    Op::EmbedIds { ids, .. } => Some(ids),
                    _ => None,
                };
                let (src, src_off) = match ids {
                    Some(v) => (self.addr_of(v.buf), v.offset as u32),
                    None => (self.step_addr(), l.tokens),
                };
                let spec = [u32::from(ids.is_some())];
                let reads = |a: Access| match ids {
                    Some(v) => a.r(id(v.buf), v.offset, rows),
                    None => a,
                };
                let (ta, tb) = self.weight_at(table);
                if let Some((p, scales, zeros)) = self.int_parts(table) {
                    let push = EmbedIntPush {
                        table: ta,
                        out: self.addr_of(out.buf),
                        step: src,
                        scales,
                        zeros,
                        t_byte: tb,
                        row_bytes: row_bytes as u32,
                        cols: cols as u32,
                        rows: rows as u32,
                        out_off: out.offset as u32,
                        tokens_off: src_off,
                        scale,
                        group: p.group.unwrap_or(cols) as u32,
                        groups: p.groups(cols).unwrap_or(1) as u32,
                        iflags: int_flags(p),
                        vocab: vocab as u32,
                    };
                    let acc = reads(Access::new()).w(id(out.buf), out.offset, rows * cols);
                    return self.dispatch(cb, hz, "embed_int", &spec, &push, [groups(cols, 256), rows as u32, 1], acc);
                }
                let push = EmbedPush {
                    table: ta,
                    out: self.addr_of(out.buf),
                    step: src,
                    t_byte: tb,
                    row_bytes: row_bytes as u32,
                    cols: cols as u32,
                    rows: rows as u32,
                    out_off: out.offset as u32,
                    tokens_off: src_off,
                    scale,
                    vocab: vocab as u32,
                };
                let acc = reads(Access::new()).w(id(out.buf), out.offset, rows * cols);
                self.dispatch(
                    cb,
                    hz,
                    &format!("embed.{}", fmt_name(fmt)),
                    &spec,
                    &push,
                    [groups(cols, 256), rows as u32, 1],
                    acc,
                )
            }
            Op::RmsNorm { out, x, w, rows: nr, dim, eps } => {
                let push = NormPush {
                    x: self.addr_of(x.buf),
                    branch: [0; 2],
                    out: self.addr_of(out.buf),
                    w: self.vector_at(w),
                    post: [0; 2],
                    q: [0; 2],
                    x_out: [0; 2],
                    x_off: x.offset as u32,
                    br_off: 0,
                    out_off: out.offset as u32,
                    q_off: 0,
                    x_out_off: 0,
                    dim: dim as u32,
                    flags: 0,
                    eps,
                };
                let acc = Access::new().r(id(x.buf), x.offset, nr * dim).w(id(out.buf), out.offset, nr * dim);
                self.dispatch(cb, hz, "norm", &[], &push, [nr as u32, 1, 1], acc)
            }
            Op::AddRmsNorm { x, x_out, branch, post, out, w, quant, rows: nr, dim, eps } => {
                let len = nr * dim;
                let mut flags = NORM_SHARED;
                let mut acc = Access::new().r(id(x.buf), x.offset, len).w(id(x_out.buf), x_out.offset, len).w(
                    id(out.buf),
                    out.offset,
                    len,
                );
                if let Some(b) = branch {
                    flags |= NORM_BRANCH;
                    acc = acc.r(id(b.buf), b.offset, len);
                    if post.is_some() {
                        flags |= NORM_POST;
                    }
                }
                let (q, q_off) = match quant {
                    Some(qo) => {
                        flags |= if qo.layout == ActLayout::Q8A { NORM_QA } else { NORM_QK };
                        let words = nr * (dim / act_block(qo.layout)) * act_words(qo.layout);
                        acc = acc.w(id(qo.out.buf), qo.out.offset, words);
                        (self.addr_of(qo.out.buf), qo.out.offset as u32)
                    }
                    None => ([0; 2], 0),
                };
                if acc.nw > 4 {
                    return Err(VulkanError::Unsupported("AddRmsNorm writes too many regions".into()));
                }
                let push = NormPush {
                    x: self.addr_of(x.buf),
                    branch: branch.map_or([0; 2], |b| self.addr_of(b.buf)),
                    out: self.addr_of(out.buf),
                    w: self.vector_at(w),
                    post: post.map_or([0; 2], |p| self.vector_at(p)),
                    q,
                    x_out: self.addr_of(x_out.buf),
                    x_off: x.offset as u32,
                    br_off: branch.map_or(0, |b| b.offset as u32),
                    out_off: out.offset as u32,
                    q_off,
                    x_out_off: x_out.offset as u32,
                    dim: dim as u32,
                    flags,
                    eps,
                };
                self.dispatch(cb, hz, "norm", &[], &push, [nr as u32, 1, 1], acc)
            }
            Op::MatMul { out, x, w, n, act } => {
                let wt = self.weight_ref(w);
                let (fmt, wrows, cols) = (wt.format, wt.rows, wt.cols);
                match (act, fmt.act_layout()) {
                    (ActQuant::Int8, Some(layout)) => {
                        // Quantize into scratch (the activation op), then the integer matmul.
                        let sc = addr(self.scratch.as_ref().expect("scratch").addr);
                        self.quantize(
                            cb,
                            hz,
                            (self.addr_of(x.buf), id(x.buf), x.offset),
                            (sc, SCRATCH_ID, 0),
                            n,
                            cols,
                            layout,
                        )?;
                        self.matmul(cb, hz, w, (sc, SCRATCH_ID, 0), true, n, out)
                    }
                    _ => {
                        let _ = (wrows, cols);
                        self.matmul(cb, hz, w, (self.addr_of(x.buf), id(x.buf), x.offset), false, n, out)
                    }
                }
            }
            Op::QuantizeAct { out, x, rows: nr, cols, layout } => self.quantize(
                cb,
                hz,
                (self.addr_of(x.buf), id(x.buf), x.offset),
                (self.addr_of(out.buf), id(out.buf), out.offset),
                nr,
                cols,
                layout,
            ),
            Op::MatMulQ8 { out, xq, w, n } => match pro {
                Some(p) => self.matmul_pro(cb, hz, w, out, p, true),
                None => self.matmul(cb, hz, w, (self.addr_of(xq.buf), id(xq.buf), xq.offset), true, n, out),
            },
            Op::Rope { x, rows: nr, heads, head_dim, theta, scale, mode } => {
                let key = (theta.to_bits(), scale.to_bits(), head_dim);
                let table = l.rope.iter().find(|r| (r.0, r.1, r.2) == key).map_or(0, |r| r.3);
                let push = RopePush {
                    x: self.addr_of(x.buf),
                    step: self.step_addr(),
                    x_off: x.offset as u32,
                    rows: nr as u32,
                    heads: heads as u32,
                    head_dim: head_dim as u32,
                    table_off: table,
                    neox: (mode == RopeMode::Neox) as u32,
                };
                let len = nr * heads * head_dim;
                let acc = Access::new().w(id(x.buf), x.offset, len);
                self.dispatch(cb, hz, "rope", &[], &push, [groups(head_dim / 2, 128), heads as u32, nr as u32], acc)
            }
            Op::StoreKv { cache, src, width, ring, kv } => {
                let push = StoreKvPush {
                    cache: self.addr_of(cache.buf),
                    src: self.addr_of(src.buf),
                    step: self.step_addr(),
                    cache_off: cache.offset as u32,
                    src_off: src.offset as u32,
                    width: width as u32,
                    rows: rows as u32,
                    row_seq_off: l.row_seq,
                    seqs_off: l.seqs,
                    ring: ring as u32,
                };
                let clen = self.buf(cache.buf).len - cache.offset;
                let acc = Access::new().r(id(src.buf), src.offset, rows * width).w(id(cache.buf), cache.offset, clen);
                let kv16 = (kv == KvType::F16) as u32;
                self.dispatch(cb, hz, "store_kv", &[kv16], &push, [groups(width, 256), rows as u32, 1], acc)
            }
            Op::Attention { .. } => self.attention(cb, step, op, None, l, hz),
            Op::Add { out, a, b, len } => self.eltwise(cb, hz, ELT_ADD, out, a, Some(b), len, 0.0),
            Op::GeluTanhMul { out, gate, up, len } => self.eltwise(cb, hz, ELT_GELU_MUL, out, gate, Some(up), len, 0.0),
            Op::SiluMul { out, gate, up, len } => self.eltwise(cb, hz, ELT_SILU_MUL, out, gate, Some(up), len, 0.0),
            Op::Softcap { x, len, cap } => self.eltwise(cb, hz, ELT_SOFTCAP, x, x, None, len, cap),
            Op::Argmax { out, x, rows: nr, cols } => {
                // Stage 1: best (key, index) per chunk of columns into scratch; stage 2: per row.
                let chunks = cols.div_ceil(ARGMAX_CHUNK);
                let push = ArgmaxPush {
                    out: self.addr_of(out.buf),
                    x: self.addr_of(x.buf),
                    part: addr(self.scratch.as_ref().expect("scratch").addr),
                    out_off: out.offset as u32,
                    x_off: x.offset as u32,
                    part_off: 0,
                    cols: cols as u32,
                };
                let acc = Access::new().r(id(x.buf), x.offset, nr * cols).w(SCRATCH_ID, 0, 2 * nr * chunks);
                self.dispatch(cb, hz, "argmax.1", &[], &push, [chunks as u32, nr as u32, 1], acc)?;
                let acc = Access::new().r(SCRATCH_ID, 0, 2 * nr * chunks).w(id(out.buf), out.offset, nr);
                self.dispatch(cb, hz, "argmax.2", &[], &push, [1, nr as u32, 1], acc)
            }
            Op::Copy { out, src, len } => {
                self.record_copy(cb, hz, out, src, len);
                Ok(())
            }
            Op::Qkv {
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
                eps,
                rope: _,
                k_cache,
                v_cache,
                ring,
                kv,
            } => {
                // The three projections (independent: no barrier between them), then the epilogue.
                let input = match x {
                    MatIn::Q8(xq) => Some((self.addr_of(xq.buf), id(xq.buf), xq.offset)),
                    MatIn::F32 { .. } => None,
                };
                for (j, (out, w)) in [(q, wq), (k, wk), (v, wv)].into_iter().enumerate() {
                    if let Some(p) = pro {
                        self.matmul_pro(cb, hz, w, out, p, j == 0)?;
                        continue;
                    }
                    match (x, input) {
                        (_, Some(xq)) => self.matmul(cb, hz, w, xq, true, n, out)?,
                        (MatIn::F32 { x, act }, None) => {
                            self.record_op(cb, step, &Op::MatMul { out, x, w, n, act }, l, hz, None, false)?
                        }
                        _ => unreachable!("MatIn is F32 or Q8"),
                    }
                }
                let (flags, table) = qkv_flags(op, l);
                let (qd, kvd) = (heads * head_dim, kv_heads * head_dim);
                let acc = Access::new().w(id(q.buf), q.offset, n * qd).w(id(k.buf), k.offset, n * kvd).r(
                    id(v.buf),
                    v.offset,
                    n * kvd,
                );
                let acc = self.cache_writes(acc, [k_cache, v_cache]);
                let push = QkvPostPush {
                    q: self.addr_of(q.buf),
                    k: self.addr_of(k.buf),
                    v: self.addr_of(v.buf),
                    qn: q_norm.map_or([0; 2], |w| self.vector_at(w)),
                    kn: k_norm.map_or([0; 2], |w| self.vector_at(w)),
                    kc: k_cache.map_or([0; 2], |c| self.addr_of(c.buf)),
                    vc: v_cache.map_or([0; 2], |c| self.addr_of(c.buf)),
                    step: self.step_addr(),
                    q_off: q.offset as u32,
                    k_off: k.offset as u32,
                    v_off: v.offset as u32,
                    kc_off: k_cache.map_or(0, |c| c.offset as u32),
                    vc_off: v_cache.map_or(0, |c| c.offset as u32),
                    row_seq_off: l.row_seq,
                    seqs_off: l.seqs,
                    heads: heads as u32,
                    kv_heads: kv_heads as u32,
                    head_dim: head_dim as u32,
                    flags,
                    table_off: table,
                    eps,
                    ring: ring as u32,
                };
                let wgs = (heads + 2 * kv_heads) as u32;
                self.dispatch(cb, hz, "qkv_post", &[(kv == KvType::F16) as u32], &push, [wgs, n as u32, 1], acc)
            }
            Op::GatedFfn { x, w_gate, w_up, gate, up, out: act_out, n, ffn, kind, quant } => {
                for (j, (out, w)) in [(gate, w_gate), (up, w_up)].into_iter().enumerate() {
                    if let Some(p) = pro {
                        self.matmul_pro(cb, hz, w, out, p, j == 0)?;
                        continue;
                    }
                    let mm = match x {
                        MatIn::F32 { x, act } => Op::MatMul { out, x, w, n, act },
                        MatIn::Q8(xq) => Op::MatMulQ8 { out, xq, w, n },
                    };
                    self.record_op(cb, step, &mm, l, hz, None, false)?;
                }
                if skip_tail {
                    return Ok(());
                }
                let op = match kind {
                    Gate::GeluTanh => AQ_GELU,
                    Gate::Silu => AQ_SILU,
                };
                match quant {
                    // The gate and its quantization in one pass.
                    Some(qo) if ffn.is_multiple_of(act_block(qo.layout)) => self.act_quant(
                        cb,
                        hz,
                        op,
                        (self.addr_of(gate.buf), id(gate.buf), gate.offset),
                        Some((self.addr_of(up.buf), id(up.buf), up.offset)),
                        Some((self.addr_of(act_out.buf), id(act_out.buf), act_out.offset)),
                        (self.addr_of(qo.out.buf), id(qo.out.buf), qo.out.offset),
                        n,
                        ffn,
                        qo.layout,
                    ),
                    _ => {
                        let len = n * ffn;
                        let elt = if op == AQ_GELU { ELT_GELU_MUL } else { ELT_SILU_MUL };
                        self.eltwise(cb, hz, elt, act_out, gate, Some(up), len, 0.0)?;
                        if let Some(qo) = quant {
                            let qa = Op::QuantizeAct { out: qo.out, x: act_out, rows: n, cols: ffn, layout: qo.layout };
                            self.record_op(cb, step, &qa, l, hz, None, false)?;
                        }
                        Ok(())
                    }
                }
            }
            _ => Err(VulkanError::Unsupported(format!("op {:?}", op.kind(|w| self.weight_ref(w).format)))),
        }
    }

    /// An attention op; with `quant`, the QuantizeAct of its output in the same kernel.
    fn attention(
        &mut self,
        cb: raw::CommandBuffer,
        step: &Step<'_>,
        op: &Op<BufId, WeightId>,
        quant: Option<(View<BufId>, ActLayout)>,
        l: &StepLayout,
        hz: &mut Hazards,
    ) -> Result<()> {
        let Op::Attention { out, q, k, v, heads, kv_heads, head_dim, scale, window, softcap, ring, kv } = *op else {
            return Err(VulkanError::Unsupported("not an attention op".into()));
        };
        let kv16 = (kv == KvType::F16) as u32;
        let rows = step.rows();
        let id = |b: BufId| b.0;

        if head_dim > ATTN_MAX_HEAD_DIM {
            return Err(VulkanError::Unsupported(format!("attention with head_dim {head_dim} > {ATTN_MAX_HEAD_DIM}")));
        }
        let push = AttnPush {
            out: self.addr_of(out.buf),
            q: self.addr_of(q.buf),
            k: self.addr_of(k.buf),
            v: self.addr_of(v.buf),
            step: self.step_addr(),
            out_off: out.offset as u32,
            q_off: q.offset as u32,
            k_off: k.offset as u32,
            v_off: v.offset as u32,
            heads: heads as u32,
            kv_heads: kv_heads as u32,
            head_dim: head_dim as u32,
            window: window as u32,
            row_seq_off: l.row_seq,
            seqs_off: l.seqs,
            scale,
            softcap,
            qout: quant.map_or([0; 2], |(qo, _)| self.addr_of(qo.buf)),
            qout_off: quant.map_or(0, |(qo, _)| qo.offset as u32),
            qmode: match quant {
                None => 0,
                Some((_, ActLayout::Q8A)) => 1,
                Some((_, ActLayout::Q8K)) => 2,
            },
            rows: rows as u32,
            ring: ring as u32,
        };
        let qlen = rows * heads * head_dim;
        let (kl, vl) = (self.buf(k.buf).len - k.offset, self.buf(v.buf).len - v.offset);
        let mut acc = Access::new()
            .r(id(q.buf), q.offset, qlen)
            .r(id(k.buf), k.offset, kl)
            .r(id(v.buf), v.offset, vl)
            .w(id(out.buf), out.offset, qlen);
        if let Some((qo, layout)) = quant {
            acc = acc.w(id(qo.buf), qo.offset, rows * heads * head_dim / act_block(layout) * act_words(layout));
        }
        // Prefill rows in blocks (each key and value loaded serves a block's queries), for
        // the head sizes its value chains tile.
        if self.attn_blk && rows >= ATTN_BLK_MIN_ROWS && (32..=256).contains(&head_dim) && 256 % head_dim == 0 {
            // Rows per workgroup: 8; with `attention_rows` 0, fewer where that leaves few
            // workgroups (QB·head_dim ≥ 256). H100, pp512 Gemma 3 270M / SmolLM2: 8 →
            // 33.9k / 31.0k tokens/s, chosen per step → 33.0k / 31.9k (within noise).
            let mut qb = self.attn_qb.unwrap_or(ATTN_BLK_ROWS);
            if qb == 0 {
                qb = ATTN_BLK_ROWS;
                while qb > 1 && rows.div_ceil(qb) * heads < 1024 && (qb / 2) * head_dim >= 256 {
                    qb /= 2;
                }
            }
            let qb = qb.clamp((256 / head_dim).max(1), ATTN_BLK_ROWS);
            let grid = [groups(rows, qb), heads as u32, 1];
            return self.dispatch(cb, hz, "attention_blk", &[head_dim as u32, qb as u32, kv16], &push, grid, acc);
        }
        self.dispatch(cb, hz, "attention", &[head_dim as u32, kv16], &push, [rows as u32, heads as u32, 1], acc)
    }

    /// `x` (address, resource id, word offset) quantized into `q` for `n` rows of `cols`.
    #[allow(clippy::too_many_arguments)]
    fn quantize(
        &mut self,
        cb: raw::CommandBuffer,
        hz: &mut Hazards,
        x: (Addr, u32, usize),
        q: (Addr, u32, usize),
        n: usize,
        cols: usize,
        layout: ActLayout,
    ) -> Result<()> {
        self.act_quant(cb, hz, AQ_PLAIN, x, None, None, q, n, cols, layout)
    }

    /// `act_quant.comp`: optionally the gate (`op`, with `up`, writing `g`), then quantization.
    #[allow(clippy::too_many_arguments)]
    fn act_quant(
        &mut self,
        cb: raw::CommandBuffer,
        hz: &mut Hazards,
        op: u32,
        x: (Addr, u32, usize),
        up: Option<(Addr, u32, usize)>,
        g: Option<(Addr, u32, usize)>,
        q: (Addr, u32, usize),
        n: usize,
        cols: usize,
        layout: ActLayout,
    ) -> Result<()> {
        let zero = ([0u32; 2], 0u32, 0usize);
        let (u, gg) = (up.unwrap_or(zero), g.unwrap_or(zero));
        let push = ActQuantPush {
            x: x.0,
            up: u.0,
            g: gg.0,
            q: q.0,
            x_off: x.2 as u32,
            up_off: u.2 as u32,
            g_off: gg.2 as u32,
            q_off: q.2 as u32,
            cols: cols as u32,
            op,
        };
        let blocks = n * (cols / act_block(layout));
        let mut acc = Access::new().r(x.1, x.2, n * cols).w(q.1, q.2, blocks * act_words(layout));
        if let Some(u) = up {
            acc = acc.r(u.1, u.2, n * cols);
        }
        if let Some(g) = g {
            acc = acc.w(g.1, g.2, n * cols);
        }
        let name = if layout == ActLayout::Q8A { "act_quant.A" } else { "act_quant.K" };
        self.dispatch(cb, hz, name, &[], &push, [groups(cols, 256), n as u32, 1], acc)
    }

    /// Whether `op` (an AddRmsNorm) can run as the prologue of `next`'s matmuls: one token, the
    /// split kernel, a separate `x_out` (the matmuls' workgroups read `x` while one writes it), a
    /// row that fits the prologue, and `next` reading exactly its quantized output.
    /// Whether `op` (a one-token split matmul) can take `next` (the AddRmsNorm whose branch it
    /// writes) as its tail.
    fn tail_norm(&self, op: &Op<BufId, WeightId>, next: Option<&Op<BufId, WeightId>>, step: &Step<'_>) -> bool {
        let Op::MatMulQ8 { out, w, n: 1, .. } = *op else { return false };
        let Some(&Op::AddRmsNorm { branch: Some(b), quant: Some(q), rows: 1, dim, .. }) = next else { return false };
        let wt = self.weight_ref(w);
        self.tails.norm
            && self.tails_here(step)
            && b == out
            && wt.rows == dim
            && dim <= PRO_MAX_DIM
            && dim.is_multiple_of(act_block(q.layout))
            && wt.format.act_layout().is_some()
            && self.int_parts(w).is_none()
    }

    /// Whether `op` (a one-token split matmul) can take `next` (the Argmax of its output) as its
    /// tail.
    fn tail_argmax(&self, op: &Op<BufId, WeightId>, next: Option<&Op<BufId, WeightId>>, step: &Step<'_>) -> bool {
        let Op::MatMulQ8 { out, w, n: 1, .. } = *op else { return false };
        let Some(&Op::Argmax { x, rows: 1, cols, .. }) = next else { return false };
        let wt = self.weight_ref(w);
        self.tails.argmax
            && self.tails_here(step)
            && x == out
            && wt.rows == cols
            && wt.format.act_layout().is_some()
            && self.int_parts(w).is_none()
    }

    /// Whether `op` (a one-token GatedFfn on split matmuls, quantized output) takes its
    /// activation as the matmuls' tail.
    fn tail_gate(&self, op: &Op<BufId, WeightId>, step: &Step<'_>) -> bool {
        let Op::GatedFfn { x: MatIn::Q8(_), w_gate, w_up, n: 1, ffn, quant: Some(q), .. } = *op else { return false };
        let split = |w: WeightId| self.weight_ref(w).format.act_layout().is_some() && self.int_parts(w).is_none();
        let be = act_block(q.layout);
        self.tails.gate
            && self.tails_here(step)
            && split(w_gate)
            && split(w_up)
            && ffn.is_multiple_of(be)
            && ffn / be <= TAIL_GROUP_MAX
            && [w_gate, w_up].iter().all(|&w| be.is_multiple_of(self.split_shape(w).0[1] as usize))
    }

    /// `acc` with the caches given written (from their offsets to the buffers' ends: the rows
    /// a step stores depend on its spans).
    fn cache_writes(&self, mut acc: Access, caches: [Option<View<BufId>>; 2]) -> Access {
        for c in caches.into_iter().flatten() {
            acc = acc.w(c.buf.0, c.offset, self.buf(c.buf).len - c.offset);
        }
        acc
    }

    /// Whether `op` (a one-token Qkv on split matmuls) takes its epilogue as the matmuls' tail.
    fn tail_qkv(&self, op: &Op<BufId, WeightId>, step: &Step<'_>, l: &StepLayout) -> bool {
        let Op::Qkv { x: MatIn::Q8(_), wq, wk, wv, n: 1, heads, kv_heads, head_dim, .. } = *op else { return false };
        // The weight's byte offset joins its address (a multiple of 4, as the GGUF's alignment is).
        let split = |w: WeightId| {
            self.weight_ref(w).format.act_layout().is_some()
                && self.int_parts(w).is_none()
                && self.weight_at(w).1.is_multiple_of(4)
        };
        self.tails.qkv
            && self.tails_here(step)
            && split(wq)
            && split(wk)
            && split(wv)
            && (l.row_seq, l.seqs) == (2, 3)
            && heads < 256
            && kv_heads < 256
            && heads + 2 * kv_heads <= TAIL_GROUP_MAX
            && head_dim <= QP_MAX_HEAD_DIM
            && head_dim.is_multiple_of(2)
            && [wq, wk, wv].iter().all(|&w| head_dim.is_multiple_of(self.split_shape(w).0[1] as usize))
    }

    fn tails_here(&self, step: &Step<'_>) -> bool {
        self.split
            && step.rows() == 1
            && self.rec_tails + TAIL_GROUP_MAX <= TAIL_COUNTERS
            && self.gpu.info.max_shared >= 32768
    }

    /// `(spec, workgroups)` of a one-token split matmul over `w`.
    fn split_shape(&self, w: WeightId) -> ([u32; 3], u32) {
        let wt = self.weight_ref(w);
        let nbc = (wt.cols / wt.format.block_elems()).min(32);
        let r = self.split_rows(wt.rows, 1usize << (32usize).min(512 / nbc).max(1).ilog2());
        ([1, r as u32, nbc as u32], groups(wt.rows, r))
    }

    /// Device address of a view's first element.
    fn addr_at(&self, v: View<BufId>) -> Addr {
        addr(self.buf(v.buf).raw.addr + 4 * v.offset as u64)
    }

    /// The next tail group's `n` counters (one a segment).
    fn next_counters(&mut self, n: usize) -> Addr {
        let at = self.counters.as_ref().expect("counters").addr + 4 * self.rec_tails as u64;
        self.rec_tails += n;
        addr(at)
    }

    /// A one-token matmul with the AddRmsNorm after it (`norm`, its branch the matmul's output)
    /// as its tail.
    fn matmul_tail_norm(
        &mut self,
        cb: raw::CommandBuffer,
        op: &Op<BufId, WeightId>,
        norm: &Op<BufId, WeightId>,
        hz: &mut Hazards,
    ) -> Result<()> {
        let (
            &Op::MatMulQ8 { out, xq, w, .. },
            &Op::AddRmsNorm { x, x_out, post, out: nout, w: nw, quant: Some(q), dim, eps, .. },
        ) = (op, norm)
        else {
            return Err(VulkanError::Unsupported("not a matmul and its junction".into()));
        };
        let wt = self.weight_ref(w);
        let (fmt, cols) = (wt.format, wt.cols);
        let layout = fmt.act_layout().expect("checked");
        let (wa, wb) = self.weight_at(w);
        let (spec, total) = self.split_shape(w);
        let qk = q.layout == ActLayout::Q8K;
        let push = TailNormPush {
            w: wa,
            x: self.addr_at(xq),
            out: self.addr_at(out),
            q: self.addr_at(q.out),
            x_in: self.addr_at(x),
            post: post.map_or([0; 2], |p| self.vector_at(p)),
            nw: self.vector_at(nw),
            x_out: self.addr_at(x_out),
            nout: self.addr_at(nout),
            ctr: self.next_counters(1),
            w_byte: wb,
            rows: dim as u32,
            cols: cols as u32,
            row_bytes: fmt.bytes_for(cols).unwrap_or(0) as u32,
            total,
            flags: if post.is_some() { PRO_POST } else { 0 } | if qk { PRO_QK } else { 0 },
            eps,
        };
        let id = |b: BufId| b.0;
        let words = dim / act_block(q.layout) * act_words(q.layout);
        let acc = Access::new()
            .r(id(xq.buf), xq.offset, cols / act_block(layout) * act_words(layout))
            .r(id(x.buf), x.offset, dim)
            .w(id(out.buf), out.offset, dim)
            .w(id(x_out.buf), x_out.offset, dim)
            .w(id(nout.buf), nout.offset, dim)
            .w(id(q.out.buf), q.out.offset, words);
        let name = format!("mm_split.{}.{}.3", fmt_name(fmt), self.dot as u32);
        self.dispatch(cb, hz, &name, &spec, &push, [total, 1, 1], acc)
    }

    /// A one-token matmul with the Argmax of its output as its tail: each workgroup leaves its
    /// best (key, index) in scratch, the last reduces them.
    fn matmul_tail_argmax(
        &mut self,
        cb: raw::CommandBuffer,
        op: &Op<BufId, WeightId>,
        am: &Op<BufId, WeightId>,
        hz: &mut Hazards,
    ) -> Result<()> {
        let (&Op::MatMulQ8 { out, xq, w, .. }, &Op::Argmax { out: aout, cols, .. }) = (op, am) else {
            return Err(VulkanError::Unsupported("not a matmul and its argmax".into()));
        };
        let wt = self.weight_ref(w);
        let (fmt, wcols) = (wt.format, wt.cols);
        let layout = fmt.act_layout().expect("checked");
        let (wa, wb) = self.weight_at(w);
        let (spec, total) = self.split_shape(w);
        let push = TailArgmaxPush {
            w: wa,
            x: self.addr_at(xq),
            out: self.addr_at(out),
            part: addr(self.scratch.as_ref().expect("scratch").addr),
            amax: self.addr_at(aout),
            ctr: self.next_counters(1),
            w_byte: wb,
            rows: cols as u32,
            cols: wcols as u32,
            row_bytes: fmt.bytes_for(wcols).unwrap_or(0) as u32,
            total,
        };
        let id = |b: BufId| b.0;
        let acc = Access::new()
            .r(id(xq.buf), xq.offset, wcols / act_block(layout) * act_words(layout))
            .w(id(out.buf), out.offset, cols)
            .w(id(aout.buf), aout.offset, 1)
            .w(SCRATCH_ID, 0, 2 * total as usize);
        let name = format!("mm_split.{}.{}.6", fmt_name(fmt), self.dot as u32);
        self.dispatch(cb, hz, &name, &spec, &push, [total, 1, 1], acc)
    }

    /// A one-token Qkv: the q, k and v matmuls (no barrier between them), the epilogue (norms,
    /// RoPE, the caches) as the tail of whichever of their workgroups finishes last.
    fn qkv_tail(
        &mut self,
        cb: raw::CommandBuffer,
        op: &Op<BufId, WeightId>,
        l: &StepLayout,
        hz: &mut Hazards,
    ) -> Result<()> {
        let &Op::Qkv {
            x: MatIn::Q8(xq),
            wq,
            wk,
            wv,
            q,
            k,
            v,
            heads,
            kv_heads,
            head_dim,
            q_norm,
            k_norm,
            eps,
            rope: _,
            k_cache,
            v_cache,
            ring,
            kv,
            ..
        } = op
        else {
            return Err(VulkanError::Unsupported("not a Qkv".into()));
        };
        let (flags, table) = qkv_flags(op, l);
        let shapes = [wq, wk, wv].map(|w| self.split_shape(w));
        // One counter a head: q's, then k's, then v's.
        let ctr0 = self.next_counters(heads + 2 * kv_heads);
        let base = u64::from(ctr0[0]) | u64::from(ctr0[1]) << 32;
        let id = |b: BufId| b.0;
        let (qd, kvd) = (heads * head_dim, kv_heads * head_dim);
        let cols = self.weight_ref(wq).cols;
        let layout = self.weight_ref(wq).format.act_layout().expect("checked");
        let acc = Access::new()
            .r(id(xq.buf), xq.offset, cols / act_block(layout) * act_words(layout))
            .w(id(q.buf), q.offset, qd)
            .w(id(k.buf), k.offset, kvd)
            .w(id(v.buf), v.offset, kvd);
        let acc = self.cache_writes(acc, [k_cache, v_cache]);
        self.order(cb, hz, &acc);
        let firsts = [0, heads, heads + kv_heads];
        for (kind, ((w, out), (spec, groups))) in [(wq, q), (wk, k), (wv, v)].into_iter().zip(shapes).enumerate() {
            let wt = self.weight_ref(w);
            let (fmt, cols) = (wt.format, wt.cols);
            let (wa, wb) = self.weight_at(w);
            let push = TailQkvPush {
                w: addr(addr_u64(wa) + wb as u64),
                x: self.addr_at(xq),
                out: self.addr_at(out),
                q: self.addr_at(q),
                k: self.addr_at(k),
                v: self.addr_at(v),
                qn: q_norm.map_or([0; 2], |w| self.vector_at(w)),
                kn: k_norm.map_or([0; 2], |w| self.vector_at(w)),
                kc: k_cache.map_or([0; 2], |c| self.addr_at(c)),
                vc: v_cache.map_or([0; 2], |c| self.addr_at(c)),
                step: self.step_addr(),
                ctr: addr(base + 4 * firsts[kind] as u64),
                rows: wt.rows as u32,
                cols: cols as u32,
                row_bytes: fmt.bytes_for(cols).unwrap_or(0) as u32,
                total: (head_dim / spec[1] as usize) as u32,
                shape: heads as u32 | (kv_heads as u32) << 8 | (head_dim as u32) << 16,
                flags_table: flags | (kind as u32) << 6 | table << 8,
                eps,
                ring: ring as u32,
            };
            let name = format!("mm_split.{}.{}.5", fmt_name(fmt), self.dot as u32);
            let spec = [spec[0], spec[1], spec[2], (kv == KvType::F16) as u32];
            self.dispatch_raw(cb, hz, &name, &spec, &push, [groups, 1, 1])?;
        }
        Ok(())
    }

    /// A one-token GatedFfn: the gate and up matmuls (no barrier between them), the activation
    /// and its quantization as the tail of whichever workgroup of the two finishes last.
    fn gated_tail(&mut self, cb: raw::CommandBuffer, op: &Op<BufId, WeightId>, hz: &mut Hazards) -> Result<()> {
        let &Op::GatedFfn { x: MatIn::Q8(xq), w_gate, w_up, gate, up, out: act, ffn, kind, quant: Some(q), .. } = op
        else {
            return Err(VulkanError::Unsupported("not a gated MLP".into()));
        };
        let (sg, tg) = self.split_shape(w_gate);
        let (su, tu) = self.split_shape(w_up);
        let be = act_block(q.layout) as u32;
        let ctr = self.next_counters(ffn / be as usize);
        // The workgroups of one block's rows: the gate dispatch's and the up dispatch's.
        let total = be / sg[1] + be / su[1];
        let qk = q.layout == ActLayout::Q8K;
        let flags = if kind == Gate::Silu { PRO_SILU } else { 0 } | if qk { PRO_QK } else { 0 };
        let id = |b: BufId| b.0;
        let cols = self.weight_ref(w_gate).cols;
        let layout = self.weight_ref(w_gate).format.act_layout().expect("checked");
        let words = ffn / act_block(q.layout) * act_words(q.layout);
        let acc = Access::new()
            .r(id(xq.buf), xq.offset, cols / act_block(layout) * act_words(layout))
            .w(id(gate.buf), gate.offset, ffn)
            .w(id(up.buf), up.offset, ffn)
            .w(id(act.buf), act.offset, ffn)
            .w(id(q.out.buf), q.out.offset, words);
        self.order(cb, hz, &acc);
        for (w, out, spec, groups) in [(w_gate, gate, sg, tg), (w_up, up, su, tu)] {
            let wt = self.weight_ref(w);
            let (fmt, cols) = (wt.format, wt.cols);
            let (wa, wb) = self.weight_at(w);
            let push = TailGatePush {
                w: wa,
                x: self.addr_at(xq),
                out: self.addr_at(out),
                q: self.addr_at(q.out),
                gate: self.addr_at(gate),
                up: self.addr_at(up),
                act: self.addr_at(act),
                ctr,
                w_byte: wb,
                rows: ffn as u32,
                cols: cols as u32,
                row_bytes: fmt.bytes_for(cols).unwrap_or(0) as u32,
                total,
                flags,
            };
            let name = format!("mm_split.{}.{}.4", fmt_name(fmt), self.dot as u32);
            self.dispatch_raw(cb, hz, &name, &spec, &push, [groups, 1, 1])?;
        }
        Ok(())
    }

    fn prologue_norm(&self, op: &Op<BufId, WeightId>, next: Option<&Op<BufId, WeightId>>, step: &Step<'_>) -> bool {
        let Op::AddRmsNorm { x, x_out, branch: Some(_), quant: Some(q), rows: 1, dim, .. } = *op else { return false };
        if !self.prologues.0
            || !self.split
            || step.rows() != 1
            || x_out == x
            || dim > PRO_MAX_DIM
            || self.gpu.info.max_shared < 32768
        {
            return false;
        }
        // Every workgroup repeats the prologue: worth it for the layers' matrices, not for the
        // LM head's thousands of workgroups.
        let reads = |xq: View<BufId>, w: WeightId| {
            let wt = self.weight_ref(w);
            xq == q.out && wt.format.act_layout() == Some(q.layout) && wt.rows <= PRO_MAX_ROWS
        };
        match next {
            Some(&Op::Qkv { x: MatIn::Q8(xq), wq, wk, wv, n: 1, head_dim, .. }) => {
                head_dim <= QP_MAX_HEAD_DIM && reads(xq, wq) && reads(xq, wk) && reads(xq, wv)
            }
            Some(&Op::GatedFfn { x: MatIn::Q8(xq), w_gate, w_up, n: 1, .. }) => reads(xq, w_gate) && reads(xq, w_up),
            Some(&Op::MatMulQ8 { xq, w, n: 1, .. }) => reads(xq, w),
            _ => false,
        }
    }

    /// Whether `op` (a GatedFfn) can leave its activation to the prologue of `next` (the down
    /// projection reading its quantized output): one token, a separate `out`, a row that fits.
    fn prologue_gate(&self, op: &Op<BufId, WeightId>, next: Option<&Op<BufId, WeightId>>, step: &Step<'_>) -> bool {
        let Op::GatedFfn { gate, out, quant: Some(q), n: 1, ffn, .. } = *op else { return false };
        if !self.prologues.1
            || !self.split
            || step.rows() != 1
            || out == gate
            || ffn > PRO_MAX_DIM
            || self.gpu.info.max_shared < 32768
        {
            return false;
        }
        matches!(next, Some(&Op::MatMulQ8 { xq, w, n: 1, .. })
            if xq == q.out && self.weight_ref(w).format.act_layout() == Some(q.layout))
    }

    /// One token's matmul on `mm_split.comp` with `p` as its prologue; `writer`: this dispatch's
    /// first workgroup also stores the prologue op's outputs.
    fn matmul_pro(
        &mut self,
        cb: raw::CommandBuffer,
        hz: &mut Hazards,
        w: WeightId,
        out: View<BufId>,
        p: Pro,
        writer: bool,
    ) -> Result<()> {
        let wt = self.weight_ref(w);
        let (fmt, wrows, cols) = (wt.format, wt.rows, wt.cols);
        let row_bytes = fmt.bytes_for(cols).unwrap_or(0) as u32;
        let (wa, wb) = self.weight_at(w);
        let (spec, total) = self.split_shape(w);
        let grid = [total, 1, 1];
        let id = |b: BufId| b.0;
        let wflag = if writer { PRO_WRITER } else { 0 };
        match p {
            Pro::Norm(Op::AddRmsNorm {
                x, x_out, branch, post, out: nout, w: nw, quant: Some(q), dim, eps, ..
            }) => {
                let b = branch.ok_or_else(|| VulkanError::Unsupported("a norm prologue without a branch".into()))?;
                let qk = q.layout == ActLayout::Q8K;
                let flags =
                    PRO_BRANCH | if post.is_some() { PRO_POST } else { 0 } | if qk { PRO_QK } else { 0 } | wflag;
                let push = SplitNormPush {
                    w: wa,
                    q: self.addr_of(q.out.buf),
                    out: self.addr_of(out.buf),
                    x_in: self.addr_of(x.buf),
                    branch: self.addr_of(b.buf),
                    post: post.map_or([0; 2], |p| self.vector_at(p)),
                    nw: self.vector_at(nw),
                    x_out: self.addr_of(x_out.buf),
                    nout: self.addr_of(nout.buf),
                    w_byte: wb,
                    q_off: q.out.offset as u32,
                    out_off: out.offset as u32,
                    rows: wrows as u32,
                    cols: cols as u32,
                    row_bytes,
                    x_in_off: x.offset as u32,
                    br_off: b.offset as u32,
                    x_out_off: x_out.offset as u32,
                    nout_off: nout.offset as u32,
                    flags,
                    eps,
                };
                let mut acc = Access::new().r(id(x.buf), x.offset, dim).r(id(b.buf), b.offset, dim).w(
                    id(out.buf),
                    out.offset,
                    wrows,
                );
                if writer {
                    let words = dim / act_block(q.layout) * act_words(q.layout);
                    acc = acc.w(id(x_out.buf), x_out.offset, dim).w(id(nout.buf), nout.offset, dim).w(
                        id(q.out.buf),
                        q.out.offset,
                        words,
                    );
                }
                let name = format!("mm_split.{}.{}.1", fmt_name(fmt), self.dot as u32);
                self.dispatch(cb, hz, &name, &spec, &push, grid, acc)
            }
            Pro::Gate(Op::GatedFfn { gate, up, out: act, kind, quant: Some(q), ffn, .. }) => {
                let qk = q.layout == ActLayout::Q8K;
                let flags = if kind == Gate::Silu { PRO_SILU } else { 0 } | if qk { PRO_QK } else { 0 } | wflag;
                let push = SplitGatePush {
                    w: wa,
                    q: self.addr_of(q.out.buf),
                    out: self.addr_of(out.buf),
                    gate: self.addr_of(gate.buf),
                    up: self.addr_of(up.buf),
                    act: self.addr_of(act.buf),
                    w_byte: wb,
                    q_off: q.out.offset as u32,
                    out_off: out.offset as u32,
                    rows: wrows as u32,
                    cols: cols as u32,
                    row_bytes,
                    gate_off: gate.offset as u32,
                    up_off: up.offset as u32,
                    act_off: act.offset as u32,
                    flags,
                };
                let mut acc = Access::new().r(id(gate.buf), gate.offset, ffn).r(id(up.buf), up.offset, ffn).w(
                    id(out.buf),
                    out.offset,
                    wrows,
                );
                if writer {
                    let words = ffn / act_block(q.layout) * act_words(q.layout);
                    acc = acc.w(id(act.buf), act.offset, ffn).w(id(q.out.buf), q.out.offset, words);
                }
                let name = format!("mm_split.{}.{}.2", fmt_name(fmt), self.dot as u32);
                self.dispatch(cb, hz, &name, &spec, &push, grid, acc)
            }
            _ => Err(VulkanError::Unsupported("an unknown prologue".into())),
        }
    }

    /// Rows per workgroup of a split matmul over `rows`: at most `cap` (a power of two), halved
    /// while the dispatch would have fewer than `split_wg` workgroups.
    fn split_rows(&self, rows: usize, cap: usize) -> usize {
        let mut r = cap;
        while r > 1 && rows.div_ceil(r) < self.split_wg {
            r /= 2;
        }
        r
    }

    /// `out = w · x` for `n` tokens; `x` f32 rows, or quantized blocks when `q8`.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &mut self,
        cb: raw::CommandBuffer,
        hz: &mut Hazards,
        w: WeightId,
        x: (Addr, u32, usize),
        q8: bool,
        n: usize,
        out: View<BufId>,
    ) -> Result<()> {
        let wt = self.weight_ref(w);
        let (fmt, wrows, cols) = (wt.format, wt.rows, wt.cols);
        let row_bytes = fmt.bytes_for(cols).unwrap_or(0);
        let (wa, wb) = self.weight_at(w);
        let x_stride = match (q8, fmt.act_layout()) {
            (true, Some(l)) => cols / act_block(l) * act_words(l),
            _ => cols,
        };
        let push = MmPush {
            w: wa,
            x: x.0,
            out: self.addr_of(out.buf),
            w_byte: wb,
            x_off: x.2 as u32,
            out_off: out.offset as u32,
            rows: wrows as u32,
            cols: cols as u32,
            n: n as u32,
            row_bytes: row_bytes as u32,
            x_stride: x_stride as u32,
        };
        let acc = Access::new().r(x.1, x.2, n * x_stride).w(out.buf.0, out.offset, n * wrows);
        if let Some((p, scales, zeros)) = self.int_parts(w) {
            let push = MmIntPush {
                mm: push,
                scales,
                zeros,
                group: p.group.unwrap_or(cols) as u32,
                groups: p.groups(cols).unwrap_or(1) as u32,
                iflags: int_flags(p),
            };
            let tokens = n.clamp(1, 16).next_power_of_two() as u32;
            let wg: u32 = if wrows * n.min(16) < 32768 { 64 } else { 256 };
            let wg = if n == 1 { self.int_wg.unwrap_or(wg) } else { wg };
            let grid = [groups(wrows, wg as usize / 8), groups(n, tokens as usize), 1];
            let at = addr_u64(wa) + wb as u64;
            if let Some((bits, group)) = int_chunked(p, cols, at, row_bytes).filter(|_| n == 1 && self.int_chunks) {
                let spec = [1, wg, bits, group, u32::from(self.int_wide), self.int_depth];
                return self.dispatch(cb, hz, "mm_int", &spec, &push, grid, acc);
            }
            return self.dispatch(cb, hz, "mm_int", &[tokens, wg], &push, grid, acc);
        }
        let be = fmt.block_elems();
        let batch_tile = q8
            && (self.batch_tile.0.max(2)..=16).contains(&n)
            && wrows >= self.batch_tile.1
            && self.tile.is_some()
            && matches!(be, 32 | 256);
        if q8 && n <= 16 && self.split && !batch_tile {
            // Decode: the split kernel loads a workgroup's weights in one wave (mm_split.comp).
            let t = n.next_power_of_two();
            let nb = cols / fmt.block_elems();
            let nbc = nb.min(32);
            let r = (32 / t).min(512 / (t * nbc)).max(1);
            let r = self.split_rows(wrows, 1usize << r.ilog2());
            let name = format!("mm_split.{}.{}.0", fmt_name(fmt), self.dot as u32);
            let spec = [t as u32, r as u32, nbc as u32];
            return self.dispatch(cb, hz, &name, &spec, &push, [groups(wrows, r), groups(n, t), 1], acc);
        }
        if let (true, Some(forced), 32 | 256) = (q8 && (n > 16 || batch_tile), self.tile, be) {
            // A batched decode step: one tile of tokens, 32 lane groups along the rows.
            let batch = [if wrows >= 16384 { 2 } else { 1 }, n.next_power_of_two() as u32, 32, 8, 1];
            let [r, t, gr, mut kc, magic] = match forced {
                Some(f) => f,
                None if n <= 16 => batch,
                None => tile_for(wrows, n),
            };
            // The staged chunk must fit shared memory: fewer blocks per chunk where it would not.
            let bw = if be == 256 { 73 } else { 10 };
            while kc > 1 && (32 / gr) * t * kc * bw > TILE_SA_WORDS {
                kc /= 2;
            }
            let [r, t, gr, kc] = if (32 / gr) * t * kc * bw > TILE_SA_WORDS { [1, 8, 32, 1] } else { [r, t, gr, kc] };
            let name = format!("mm_tile.{}.{}", fmt_name(fmt), self.dot as u32);
            let grid = [groups(wrows, (r * gr) as usize), groups(n, (t * 32 / gr) as usize), 1];
            return self.dispatch(cb, hz, &name, &[r, t, gr, kc, magic], &push, grid, acc);
        }
        let name = if q8 {
            format!("mm_q8.{}.{}", fmt_name(fmt), self.dot as u32)
        } else {
            format!("mm_f32.{}", fmt_name(fmt))
        };
        // Tokens per workgroup: the fewest of 1, 2, 4, 8, 16 that hold n (16 beyond). Small
        // matrices take workgroups of 8 rows, so that more of them are in flight.
        let tokens = n.clamp(1, 16).next_power_of_two() as u32;
        let wg: u32 = if wrows * n.min(16) < 32768 { 64 } else { 256 };
        let grid = [groups(wrows, wg as usize / 8), groups(n, tokens as usize), 1];
        self.dispatch(cb, hz, &name, &[tokens, wg], &push, grid, acc)
    }

    #[allow(clippy::too_many_arguments)]
    fn eltwise(
        &mut self,
        cb: raw::CommandBuffer,
        hz: &mut Hazards,
        op: u32,
        out: View<BufId>,
        a: View<BufId>,
        b: Option<View<BufId>>,
        len: usize,
        cap: f32,
    ) -> Result<()> {
        let push = EltPush {
            out: self.addr_of(out.buf),
            a: self.addr_of(a.buf),
            b: b.map_or([0; 2], |b| self.addr_of(b.buf)),
            out_off: out.offset as u32,
            a_off: a.offset as u32,
            b_off: b.map_or(0, |b| b.offset as u32),
            len: len as u32,
            op,
            cap,
        };
        let mut acc = Access::new().w(out.buf.0, out.offset, len);
        if a != out {
            acc = acc.r(a.buf.0, a.offset, len);
        }
        if let Some(b) = b.filter(|&b| b != out) {
            acc = acc.r(b.buf.0, b.offset, len);
        }
        let total = len.div_ceil(256) as u32;
        let gx = total.clamp(1, 65535);
        self.dispatch(cb, hz, "eltwise", &[], &push, [gx, total.div_ceil(gx).max(1), 1], acc)
    }
}

/// Chunks of codes `mm_int.comp`'s wide variant loads at once (its DEPTH).
const INT_DEPTH: u32 = 4;

/// `mm_int.comp`'s chunked path for a one-token matmul, as its spec constants (bits, columns
/// per scale or 0 per row): a chunk is 32 code words a row (256 4-bit or 128 8-bit columns), so
/// the rows must be whole chunks starting 16-byte aligned, and a chunk whole groups of 8-column
/// steps.
fn int_chunked(p: purehw_kernels::quant::PackedInt, cols: usize, at: u64, row_bytes: usize) -> Option<(u32, u32)> {
    let ce: usize = if p.bits == 4 { 256 } else { 128 };
    let group = match p.group {
        None => 0,
        Some(g) if g.is_multiple_of(8) && ce.is_multiple_of(g) => g,
        Some(_) => return None,
    };
    let whole = cols > 0 && cols.is_multiple_of(ce) && at.is_multiple_of(16) && row_bytes.is_multiple_of(16);
    whole.then_some((u32::from(p.bits), group as u32))
}

/// A Qkv's epilogue flags (`QP_*`) and the word offset of its RoPE table in the step buffer.
fn qkv_flags(op: &Op<BufId, WeightId>, l: &StepLayout) -> (u32, u32) {
    let Op::Qkv { head_dim, q_norm, k_norm, rope, k_cache, v_cache, .. } = *op else { return (0, 0) };
    let mut flags = 0;
    let table = match rope {
        Some(r) => {
            flags |= QP_ROPE | if r.mode == RopeMode::Neox { QP_NEOX } else { 0 };
            let key = (r.theta.to_bits(), r.scale.to_bits(), head_dim);
            l.rope.iter().find(|e| (e.0, e.1, e.2) == key).map_or(0, |e| e.3)
        }
        None => 0,
    };
    flags |= if q_norm.is_some() { QP_QNORM } else { 0 } | if k_norm.is_some() { QP_KNORM } else { 0 };
    flags |= if k_cache.is_some() { QP_KCACHE } else { 0 } | if v_cache.is_some() { QP_VCACHE } else { 0 };
    (flags, table)
}

/// Words of shared memory `mm_tile.comp` stages activations in (its `SA_WORDS`).
const TILE_SA_WORDS: u32 = 5120;

/// Where batched decode matmuls take the tiled kernel by default: 8–16 tokens, 16384 rows or
/// more. H100, Gemma 3 270M, a step of 16 sequences: the LM head (262144 rows) 0.91 ms split,
/// 0.38 ms tiled; the layers' matmuls (640–2048 rows: 64 workgroups or fewer) slower tiled.
/// At 4 sequences the split kernel was the faster overall.
const BATCH_TILE: (usize, usize) = (8, 16384);

/// `PUREHW_VK_BATCH_TILE`: `N` or `N,ROWS`; `off` never.
fn parse_batch_tile(v: &str) -> Option<(usize, usize)> {
    if v == "off" {
        return Some((17, 0));
    }
    let mut it = v.split(',').map(|p| p.trim().parse::<usize>().ok());
    let n = it.next()??;
    let rows = it.next().map_or(Some(0), |r| r)?;
    Some((n, rows))
}

/// `R,T,GR,KC,MAGIC` for `mm_tile.comp`, or the default choice when it does not parse or is out
/// of range (R, T ≤ 16; GR a power of two dividing 32; KC is lowered where the chunk would not
/// fit shared memory).
fn parse_tile(v: &str) -> Option<[u32; 5]> {
    let p: Vec<u32> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
    let t: [u32; 5] = p.try_into().ok()?;
    let [r, tk, gr, kc, _] = t;
    let ok = (1..=16).contains(&r) && (1..=16).contains(&tk) && gr.is_power_of_two() && gr <= 32 && kc >= 1;
    ok.then_some(t)
}

/// The prefill tile for a matmul of `rows` × `n` tokens: 16 rows × 64 tokens (2 rows × 16 tokens
/// per lane group), 1 row per group while that leaves under 256 workgroups. H100, pp512 Gemma 3
/// 270M / SmolLM2 (R,T,GR,KC): 2,16,8,4 → 31.9k / 31.3k tokens/s; 4,8,16,8 → 30.7k / 28.4k;
/// 2,8,32,8 → 30.5k / 30.6k; 8,8,32,8 → 27.8k / 21.3k. Before block attention, the 4,8,16,8
/// tile gave 27.1k / 25.9k where mm_q8.comp gave 23.7k / 17.3k.
fn tile_for(rows: usize, n: usize) -> [u32; 5] {
    let r = if rows.div_ceil(16) * n.div_ceil(64) < 256 { 1 } else { 2 };
    [r, 16, 8, 4, 1]
}

/// Workgroups covering `n` items `per` group.
fn groups(n: usize, per: usize) -> u32 {
    n.div_ceil(per) as u32
}

#[cfg(test)]
mod tests {
    use super::parse_batch_tile;

    #[test]
    fn batch_tile_settings() {
        assert_eq!(parse_batch_tile("8"), Some((8, 0)));
        assert_eq!(parse_batch_tile("8,16384"), Some((8, 16384)));
        assert_eq!(parse_batch_tile("off"), Some((17, 0)));
        assert_eq!(parse_batch_tile("x"), None);
        assert_eq!(parse_batch_tile("8,y"), None);
    }
}

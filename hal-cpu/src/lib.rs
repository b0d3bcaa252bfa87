//! The fast CPU backend: hal's ops run by a persistent thread pool on SIMD twins of the
//! `purehw-kernels` math.
//!
//! * Buffers and weights live in a [`Host`] (shared with `hal-cpu-ref`, which holds no op code):
//!   every op is checked against hal's contract ([`purehw_hal::check`]) before it runs, and a
//!   fused op runs as its expansion.
//! * Each primitive op is written here on `purehw-kernels` alone: rows (or elements, or weight
//!   rows) are split across the [`pool`] threads and each thread calls the [`simd::Kernels`]
//!   chosen at start (AVX2+FMA, AVX-512, NEON, scalar). Weights stay the stored blocks (the memory
//!   map). With `ActQuant::Int8` a matmul first quantizes its activations once (reused by the
//!   next matmuls that read the same rows), then runs integer dots.
//!
//! Every kernel is bit-exact with its reference and rows are independent, so this backend's
//! results equal `cpu-ref`'s bit for bit in both activation modes (checked in `conformance`).

mod error;
mod exec;
pub mod pool;
pub mod simd;
#[cfg(test)]
mod tests;
pub mod topology;

use std::sync::Mutex;

use purehw_hal::{Backend, ErrorType, Format, HostWeight, Op, OpKind, Step, View};
use purehw_hal_host::Host;
pub use purehw_hal_host::{BufId, WeightId};
use purehw_kernels::quant::{BlockQ8A, BlockQ8K};

pub use crate::error::CpuError;
use crate::pool::Pool;
use crate::simd::Kernels;

/// What the quantized-activation scratch holds: `n` rows of `cols` from `x`, in one layout.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct ActKey {
    pub x: View<BufId>,
    pub n: usize,
    pub cols: usize,
    pub k: bool,
}

/// Per-thread scratch: a matmul output tile and attention scores. Grown on first use only.
#[derive(Default)]
pub(crate) struct Scratch {
    pub tile: Vec<f32>,
    pub scores: Vec<f32>,
    /// A block of an f16 cache's keys or values, widened.
    pub kv: Vec<f32>,
}

/// `cos_sin[(t·half + i)·2 ..]` = `rope_cos_sin(i, positions[t], …)` for the step's rows.
#[derive(Default)]
pub(crate) struct RopeTable {
    pub key: (u32, u32, usize),
    pub valid: bool,
    pub cos_sin: Vec<f32>,
}

/// The fast CPU backend.
pub struct Cpu {
    pub(crate) host: Host,
    /// One dequantized norm weight; as wide as the widest loaded weight (sized at load).
    pub(crate) row: Vec<f32>,
    pub(crate) pool: Pool,
    pub(crate) k: Kernels,
    /// Quantized activations, `(n, cols/32)` or `(n, cols/256)` blocks, and what they hold.
    pub(crate) qa: Vec<BlockQ8A>,
    pub(crate) qk: Vec<BlockQ8K>,
    pub(crate) held: Option<ActKey>,
    /// One per pool thread.
    pub(crate) scratch: Vec<Mutex<Scratch>>,
    /// `Op::HeadArgmax`'s bounds per chunk of rows and token (see `Cpu::head_argmax`).
    pub(crate) head: Vec<f32>,
    /// `Op::HeadArgmax` through estimates where it can (`PUREHW_CPU_HEAD_EST=0`: always the
    /// expansion, to measure what the estimates save).
    pub(crate) head_est: bool,
    /// RoPE `(cos, sin)` tables of the current step, one per `(theta, scale, head_dim)`: every
    /// layer of a step rotates the same positions, so each table is computed once per step.
    pub(crate) rope: Vec<RopeTable>,
    /// `PUREHW_PROFILE=1`: seconds and calls per op kind (and matmul format), printed on drop.
    profile: Option<Vec<(String, f64, usize)>>,
    /// The fused decode paths (`Cpu::fused`); `PUREHW_CPU_FUSED=0` turns them off, to measure
    /// what they save.
    fused: bool,
}

impl Drop for Cpu {
    fn drop(&mut self) {
        if let Some(p) = &mut self.profile {
            p.sort_by(|a, b| b.1.total_cmp(&a.1));
            let total: f64 = p.iter().map(|e| e.1).sum();
            eprintln!("purehw cpu profile: {total:.3} s in ops");
            for (k, t, n) in p.iter() {
                eprintln!("  {k:<24} {t:>9.4} s {:>5.1}% {n:>8} calls", 100.0 * t / total);
            }
        }
    }
}

impl std::fmt::Debug for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cpu").field("threads", &self.threads()).field("simd", &self.k.name).finish()
    }
}

impl Cpu {
    /// A backend on `threads` threads (0: one per available physical core) with the best SIMD
    /// kernels.
    pub fn new(threads: usize) -> Result<Cpu, CpuError> {
        Cpu::with_options(CpuOptions { threads, pin: false })
    }

    /// A backend as `opts` says, with the best SIMD kernels.
    pub fn with_options(opts: CpuOptions) -> Result<Cpu, CpuError> {
        Cpu::build(opts, Kernels::detect())
    }

    /// As [`new`](Self::new) with a given kernel set (tests compare sets).
    pub fn with_kernels(threads: usize, k: Kernels) -> Result<Cpu, CpuError> {
        Cpu::build(CpuOptions { threads, pin: false }, k)
    }

    fn build(opts: CpuOptions, k: Kernels) -> Result<Cpu, CpuError> {
        let threads = if opts.threads == 0 { default_threads() } else { opts.threads };
        let pins = match opts.pin {
            false => Vec::new(),
            true => topology::detect().map(|t| t.pin_order()).ok_or(CpuError::Pin { threads })?,
        };
        let pool = Pool::pinned(threads, &pins)
            .map_err(|_| if opts.pin { CpuError::Pin { threads } } else { CpuError::Threads { threads } })?;
        let scratch = (0..threads).map(|_| Mutex::new(Scratch::default())).collect();
        let profile = std::env::var("PUREHW_PROFILE").is_ok_and(|v| v == "1").then(Vec::new);
        Ok(Cpu {
            host: Host::new(),
            row: Vec::new(),
            pool,
            k,
            qa: Vec::new(),
            qk: Vec::new(),
            held: None,
            scratch,
            head: Vec::new(),
            head_est: std::env::var("PUREHW_CPU_HEAD_EST").map_or(true, |v| v != "0"),
            profile,
            rope: Vec::new(),
            fused: std::env::var("PUREHW_CPU_FUSED").map_or(true, |v| v != "0"),
        })
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// The SIMD kernel set in use (`"avx2"`, `"neon"`, `"scalar"`).
    pub fn simd(&self) -> &'static str {
        self.k.name
    }

    /// A buffer's contents (for inspection and tests).
    pub fn buffer(&self, b: BufId) -> Option<&[f32]> {
        self.host.buffer(b)
    }

    /// The weight behind a handle.
    pub fn weight(&self, w: WeightId) -> Option<&HostWeight> {
        self.host.weight(w)
    }
}

/// The weight formats this backend computes with (every GGUF and float format, and valid
/// [`Format::Int`] layouts; a format added later stays unsupported until its kernels are checked
/// here). `load_weight` refuses the others, so every loaded weight is in one of these.
fn format_supported(f: Format) -> bool {
    matches!(
        f,
        Format::F32
            | Format::F16
            | Format::BF16
            | Format::Q4_0
            | Format::Q4_1
            | Format::Q5_0
            | Format::Q5_1
            | Format::Q8_0
            | Format::Q4_K
            | Format::Q5_K
            | Format::Q6_K
    ) || matches!(f, Format::Int(p) if p.is_valid())
}

/// How the [`Cpu`] backend's pool is set up.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuOptions {
    /// Threads in all (0: [`default_threads`]).
    pub threads: usize,
    /// Bind thread `i` to the `i`-th CPU of [`topology::Topology::pin_order`] (also set by
    /// `PUREHW_PIN=1` where the caller reads it).
    pub pin: bool,
}

/// One thread per physical core this process may run on (SMT siblings not counted), at most
/// what the OS offers the process (`available_parallelism` also counts a cgroup CPU quota);
/// every available CPU where the topology is unreadable.
pub fn default_threads() -> usize {
    let offered = std::thread::available_parallelism().map_or(1, |n| n.get());
    match topology::detect() {
        Some(t) => t.physical_cores().clamp(1, offered),
        None => offered,
    }
}

impl ErrorType for Cpu {
    type Error = CpuError;
}

impl Backend for Cpu {
    type Buffer = BufId;
    type Weight = WeightId;

    fn name(&self) -> &str {
        "cpu"
    }

    fn supports(&self, op: OpKind) -> bool {
        match op {
            OpKind::Embed(f) | OpKind::EmbedIds(f) | OpKind::MatMul(f) => format_supported(f),
            OpKind::MatMulQ8(f) | OpKind::HeadArgmax(f) => format_supported(f) && f.act_layout().is_some(),
            OpKind::KvCache(_) => true,
            k => k.is_format_free(),
        }
    }

    fn alloc(&mut self, len: usize) -> Result<BufId, CpuError> {
        Ok(self.host.alloc(len)?)
    }

    fn load_weight(&mut self, w: &HostWeight) -> Result<WeightId, CpuError> {
        if !format_supported(w.format) {
            return Err(CpuError::UnsupportedFormat(w.format));
        }
        match w.check() {
            Ok(()) => {}
            Err(err) if matches!(w.format, Format::Int(_)) => {
                return Err(CpuError::BadParts { format: w.format, rows: w.rows, cols: w.cols, err });
            }
            Err(_) => {
                return Err(CpuError::BadWeight { format: w.format, rows: w.rows, cols: w.cols, bytes: w.data.len() });
            }
        }
        // Size the norm-weight row now so that submit never has to grow it (two side by side: a
        // junction's norms).
        exec::grow(&mut self.row, 2 * w.cols)?;
        Ok(self.host.add_weight(w)?)
    }

    fn write(&mut self, dst: View<BufId>, src: &[f32]) -> Result<(), CpuError> {
        self.held = None;
        Ok(self.host.write(dst, src)?)
    }

    fn read(&mut self, src: View<BufId>, dst: &mut [f32]) -> Result<(), CpuError> {
        Ok(self.host.read(src, dst)?)
    }

    fn submit(&mut self, step: &Step<'_>, ops: &[Op<BufId, WeightId>]) -> Result<(), CpuError> {
        self.held = None;
        self.rope.iter_mut().for_each(|t| t.valid = false);
        for op in ops {
            purehw_hal::check::op(&self.host, step, op)?;
            if self.profile.is_none() {
                if !(self.fused && self.fused(step, op)?) {
                    op.expand(|o| self.run(step, &o))?;
                }
            } else if self.fused && op.is_fused() {
                // The fused path (or the expansion where there is none) timed as one.
                let t = std::time::Instant::now();
                if !self.fused(step, op)? {
                    op.expand(|o| self.run(step, &o))?;
                }
                let n = if step.rows() > 1 { " n>1" } else { "" };
                self.record(format!("{:?}{n}", self.kind_of(op)), t.elapsed().as_secs_f64());
            } else {
                op.expand(|o| self.run_profiled(step, &o))?;
            }
        }
        Ok(())
    }
}

impl Cpu {
    /// [`run`](Self::run), timed into the profile under the op's kind (and matmul format).
    fn run_profiled(&mut self, step: &Step<'_>, op: &Op<BufId, WeightId>) -> Result<(), CpuError> {
        let t = std::time::Instant::now();
        self.run(step, op)?;
        let dt = t.elapsed().as_secs_f64();
        let key = match self.kind_of(op) {
            OpKind::MatMul(f) if step.rows() > 1 => format!("MatMul {f:?} n>1"),
            OpKind::MatMulQ8(f) if step.rows() > 1 => format!("MatMulQ8 {f:?} n>1"),
            k => format!("{k:?}"),
        };
        self.record(key, dt);
        Ok(())
    }

    /// The op's kind with its weight's format, for the profile's keys.
    fn kind_of(&self, op: &Op<BufId, WeightId>) -> OpKind {
        op.kind(|w| self.host.weight(w).map_or(Format::F32, |w| w.format))
    }

    /// Add `dt` seconds and a call to the profile's entry `key`.
    fn record(&mut self, key: String, dt: f64) {
        let Some(p) = self.profile.as_mut() else { return };
        match p.iter_mut().find(|e| e.0 == key) {
            Some(e) => {
                e.1 += dt;
                e.2 += 1;
            }
            None => p.push((key, dt, 1)),
        }
    }
}

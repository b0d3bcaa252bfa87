//! The reference backend: every op plainly, single-threaded, straight from `purehw-kernels`.
//! The definition of correct that faster backends are compared against.
//!
//! Buffers live in a [`Host`] arena addressed by [`BufId`]; weights stay as the [`HostWeight`]
//! they were loaded from (a view of the mmap) and are dequantized one row at a time into a
//! scratch row sized when weights load, so [`Backend::submit`] never allocates. Every op is first
//! checked against hal's contract ([`purehw_hal::check`]); a fused op runs as its expansion.

mod error;
mod exec;

use core::fmt;

use purehw_hal::{Backend, ErrorType, Format, HostWeight, Op, OpKind, Step, View};
use purehw_hal_host::Host;
pub use purehw_hal_host::{BufId, WeightId};
use purehw_kernels::quant::{BlockQ8A, BlockQ8K, Codes32, CodesK};

pub use error::CpuRefError;

/// The reference CPU backend.
#[derive(Default)]
pub struct CpuRef {
    host: Host,
    /// One dequantized weight row; at least as long as the widest loaded weight.
    row: Vec<f32>,
    /// `ActQuant::Int8` scratch.
    act: ActScratch,
}

/// `ActQuant::Int8` scratch: quantized activations of a step's tokens (grown to the largest step
/// on first use) and one decoded weight row (sized at load).
#[derive(Default)]
pub(crate) struct ActScratch {
    pub(crate) a: Vec<BlockQ8A>,
    pub(crate) k: Vec<BlockQ8K>,
    pub(crate) codes_a: Vec<Codes32>,
    pub(crate) codes_k: Vec<CodesK>,
}

impl fmt::Debug for CpuRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuRef").field("host", &self.host).field("scratch_row", &self.row.len()).finish()
    }
}

impl CpuRef {
    pub fn new() -> Self {
        Self::default()
    }

    /// The weight behind a handle (its format and shape, for `Op::kind`).
    pub fn weight(&self, w: WeightId) -> Option<&HostWeight> {
        self.host.weight(w)
    }

    /// The format of a loaded weight.
    pub fn format_of(&self, w: WeightId) -> Option<Format> {
        self.weight(w).map(|w| w.format)
    }

    /// A buffer's contents (for inspection and tests).
    pub fn buffer(&self, b: BufId) -> Option<&[f32]> {
        self.host.buffer(b)
    }
}

/// The weight formats this backend computes with (every GGUF and float format, and valid
/// [`Format::Int`] layouts; a format added later stays unsupported until it is checked here).
/// `load_weight` refuses the others, so every loaded weight is in one of these.
pub(crate) fn format_supported(f: Format) -> bool {
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

impl ErrorType for CpuRef {
    type Error = CpuRefError;
}

impl Backend for CpuRef {
    type Buffer = BufId;
    type Weight = WeightId;

    fn name(&self) -> &str {
        "cpu-ref"
    }

    fn supports(&self, op: OpKind) -> bool {
        match op {
            OpKind::Embed(f) | OpKind::EmbedIds(f) | OpKind::MatMul(f) => format_supported(f),
            // HeadArgmax: its expansion, like every fused op here.
            OpKind::MatMulQ8(f) | OpKind::HeadArgmax(f) => format_supported(f) && f.act_layout().is_some(),
            OpKind::KvCache(_) => true,
            k => k.is_format_free(),
        }
    }

    fn alloc(&mut self, len: usize) -> Result<BufId, CpuRefError> {
        Ok(self.host.alloc(len)?)
    }

    fn load_weight(&mut self, w: &HostWeight) -> Result<WeightId, CpuRefError> {
        if !format_supported(w.format) {
            return Err(CpuRefError::UnsupportedFormat(w.format));
        }
        match w.check() {
            Ok(()) => {}
            Err(err) if matches!(w.format, Format::Int(_)) => {
                return Err(CpuRefError::BadParts { format: w.format, rows: w.rows, cols: w.cols, err });
            }
            Err(_) => {
                return Err(CpuRefError::BadWeight {
                    format: w.format,
                    rows: w.rows,
                    cols: w.cols,
                    bytes: w.data.len(),
                });
            }
        }
        // Size the scratch row now so that submit never has to grow it.
        if w.cols > self.row.len() {
            let oom = |_| CpuRefError::OutOfMemory { elems: w.cols };
            self.row.try_reserve_exact(w.cols - self.row.len()).map_err(oom)?;
            self.row.resize(w.cols, 0.0);
            let (a, k) = (w.cols.div_ceil(32), w.cols.div_ceil(256));
            self.act.codes_a.try_reserve_exact(a.saturating_sub(self.act.codes_a.len())).map_err(oom)?;
            self.act.codes_k.try_reserve_exact(k.saturating_sub(self.act.codes_k.len())).map_err(oom)?;
            self.act.codes_a.resize(a, Codes32::default());
            self.act.codes_k.resize(k, CodesK::default());
        }
        Ok(self.host.add_weight(w)?)
    }

    fn write(&mut self, dst: View<BufId>, src: &[f32]) -> Result<(), CpuRefError> {
        Ok(self.host.write(dst, src)?)
    }

    fn read(&mut self, src: View<BufId>, dst: &mut [f32]) -> Result<(), CpuRefError> {
        Ok(self.host.read(src, dst)?)
    }

    fn submit(&mut self, step: &Step<'_>, ops: &[Op<BufId, WeightId>]) -> Result<(), CpuRefError> {
        for op in ops {
            purehw_hal::check::op(&self.host, step, op)?;
            op.expand(|o| self.run(step, &o))?;
        }
        Ok(())
    }
}

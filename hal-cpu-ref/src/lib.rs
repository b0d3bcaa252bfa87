//! The reference backend: every op plainly, single-threaded, straight from `purehw-kernels`.
//! The definition of correct that faster backends are compared against.
//!
//! Buffers live in an arena (`Vec<Vec<f32>>`) addressed by [`BufId`]; weights stay as the
//! [`HostWeight`] they were loaded from (a view of the mmap) and are dequantized one row at a
//! time into a scratch row sized when weights load, so [`Backend::submit`] never allocates.

mod error;
mod exec;

/// The arena plumbing, for backends that build on this one (`hal-cpu` runs its cold ops here and
/// resolves its hot ops' views with the same aliasing rules).
pub mod arena {
    pub use crate::error::invalid;
    pub use crate::exec::{Inputs, Src, cache_rows_needed, grow, mul, weight, with_out};
    pub use crate::{checked_range, view_range};
}

use core::fmt;
use core::ops::Range;

use purehw_hal::{Backend, ErrorType, Format, HostWeight, Op, OpKind, Step, View};
use purehw_kernels::quant::{BlockQ8A, BlockQ8K, Codes32, CodesK};

pub use error::CpuRefError;

/// Handle of a buffer in a [`CpuRef`]'s arena.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct BufId(pub(crate) u32);

/// Handle of a weight loaded into a [`CpuRef`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct WeightId(pub(crate) u32);

/// The reference CPU backend.
#[derive(Default)]
pub struct CpuRef {
    bufs: Vec<Vec<f32>>,
    weights: Vec<HostWeight>,
    /// One dequantized weight row; at least as long as the widest loaded weight.
    row: Vec<f32>,
    /// One token's int8 activations (`ActQuant::Int8`), as wide as the widest loaded weight.
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
        f.debug_struct("CpuRef")
            .field("buffers", &self.bufs.len())
            .field("weights", &self.weights.len())
            .field("scratch_row", &self.row.len())
            .finish()
    }
}

impl CpuRef {
    pub fn new() -> Self {
        Self::default()
    }

    /// The weight behind a handle (its format and shape, for `Op::kind`).
    pub fn weight(&self, w: WeightId) -> Option<&HostWeight> {
        self.weights.get(w.0 as usize)
    }

    /// The format of a loaded weight.
    pub fn format_of(&self, w: WeightId) -> Option<Format> {
        self.weight(w).map(|w| w.format)
    }

    /// The arena and the weights, for a backend built on this one.
    pub fn parts_mut(&mut self) -> (&mut [Vec<f32>], &[HostWeight]) {
        (&mut self.bufs, &self.weights)
    }

    /// A buffer's contents (for inspection and tests).
    pub fn buffer(&self, b: BufId) -> Option<&[f32]> {
        self.bufs.get(b.0 as usize).map(Vec::as_slice)
    }
}

/// The weight formats this backend computes with (all of `Format` as of writing; a format added
/// later stays unsupported until it is checked here). `load_weight` refuses the others, so every
/// loaded weight is in one of these.
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
    )
}

/// `v.offset .. v.offset + len`, checked against a buffer of `buf_len` elements.
pub fn checked_range(
    v: View<BufId>,
    len: usize,
    buf_len: usize,
    what: &'static str,
) -> Result<Range<usize>, CpuRefError> {
    match v.offset.checked_add(len) {
        Some(end) if end <= buf_len => Ok(v.offset..end),
        end => Err(CpuRefError::OutOfRange {
            what,
            buf: v.buf,
            start: v.offset,
            end: end.unwrap_or(usize::MAX),
            len: buf_len,
        }),
    }
}

/// The arena index of `v.buf` and `v.offset .. v.offset + len`, checked against the arena.
pub fn view_range(
    bufs: &[Vec<f32>],
    v: View<BufId>,
    len: usize,
    what: &'static str,
) -> Result<(usize, Range<usize>), CpuRefError> {
    let idx = v.buf.0 as usize;
    let buf = bufs.get(idx).ok_or(CpuRefError::UnknownBuffer(v.buf))?;
    Ok((idx, checked_range(v, len, buf.len(), what)?))
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
            OpKind::Embed(f) | OpKind::MatMul(f) => format_supported(f),
            OpKind::RmsNorm
            | OpKind::Rope(_)
            | OpKind::StoreKv
            | OpKind::Attention
            | OpKind::Add
            | OpKind::GeluTanhMul
            | OpKind::SiluMul
            | OpKind::Softcap => true,
            _ => false,
        }
    }

    fn alloc(&mut self, len: usize) -> Result<BufId, CpuRefError> {
        let id = u32::try_from(self.bufs.len()).map_err(|_| CpuRefError::OutOfMemory { elems: len })?;
        // Probe that the memory can be had (an error, not an abort, when it cannot), then take it
        // zeroed: `vec![0.0; n]` asks the allocator for zeroed pages, which the OS maps lazily, so a
        // large KV cache costs nothing until it is used.
        let mut probe: Vec<f32> = Vec::new();
        probe.try_reserve_exact(len).map_err(|_| CpuRefError::OutOfMemory { elems: len })?;
        drop(probe);
        let v = vec![0.0f32; len];
        self.bufs.try_reserve(1).map_err(|_| CpuRefError::OutOfMemory { elems: len })?;
        self.bufs.push(v);
        Ok(BufId(id))
    }

    fn load_weight(&mut self, w: &HostWeight) -> Result<WeightId, CpuRefError> {
        if !format_supported(w.format) {
            return Err(CpuRefError::UnsupportedFormat(w.format));
        }
        if !w.is_consistent() {
            return Err(CpuRefError::BadWeight { format: w.format, rows: w.rows, cols: w.cols, bytes: w.data.len() });
        }
        let id = u32::try_from(self.weights.len()).map_err(|_| CpuRefError::OutOfMemory { elems: 0 })?;
        // Size the scratch row now so that submit never has to grow it.
        if w.cols > self.row.len() {
            self.row
                .try_reserve_exact(w.cols - self.row.len())
                .map_err(|_| CpuRefError::OutOfMemory { elems: w.cols })?;
            self.row.resize(w.cols, 0.0);
            let (a, k) = (w.cols.div_ceil(32), w.cols.div_ceil(256));
            let oom = |_| CpuRefError::OutOfMemory { elems: w.cols };
            self.act.codes_a.try_reserve_exact(a.saturating_sub(self.act.codes_a.len())).map_err(oom)?;
            self.act.codes_k.try_reserve_exact(k.saturating_sub(self.act.codes_k.len())).map_err(oom)?;
            self.act.codes_a.resize(a, Codes32::default());
            self.act.codes_k.resize(k, CodesK::default());
        }
        self.weights.try_reserve(1).map_err(|_| CpuRefError::OutOfMemory { elems: 0 })?;
        self.weights.push(w.clone());
        Ok(WeightId(id))
    }

    fn write(&mut self, dst: View<BufId>, src: &[f32]) -> Result<(), CpuRefError> {
        let (idx, r) = view_range(&self.bufs, dst, src.len(), "write")?;
        self.bufs[idx][r].copy_from_slice(src);
        Ok(())
    }

    fn read(&mut self, src: View<BufId>, dst: &mut [f32]) -> Result<(), CpuRefError> {
        let (idx, r) = view_range(&self.bufs, src, dst.len(), "read")?;
        dst.copy_from_slice(&self.bufs[idx][r]);
        Ok(())
    }

    fn submit(&mut self, step: &Step<'_>, ops: &[Op<BufId, WeightId>]) -> Result<(), CpuRefError> {
        for op in ops {
            self.run(step, op)?;
        }
        Ok(())
    }
}

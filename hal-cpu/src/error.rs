//! The backend's error type. Variants carry only `Copy` data so that reporting an error never
//! allocates (a failing `submit` stays allocation-free too).

use purehw_hal::check::CheckError;
use purehw_hal::{ErrorKind, Format};

/// Everything [`Cpu`](crate::Cpu) can fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CpuError {
    /// Host memory ran out while allocating `elems` elements.
    #[error("out of memory allocating {elems} elements")]
    OutOfMemory { elems: usize },
    /// A weight format this backend does not implement.
    #[error("unsupported weight format {0:?}")]
    UnsupportedFormat(Format),
    /// An op this backend does not implement (one added to hal after this backend).
    #[error("unsupported op")]
    UnsupportedOp,
    /// A weight whose byte length disagrees with its shape and format.
    #[error("weight {rows}x{cols} {format:?} does not match its {bytes} bytes")]
    BadWeight { format: Format, rows: usize, cols: usize, bytes: usize },
    /// A weight with parts (scales, zero points) whose sizes disagree with its shape and format.
    #[error("weight {rows}x{cols} {format:?}: {err}")]
    BadParts { format: Format, rows: usize, cols: usize, err: purehw_hal::WeightError },
    /// The op breaks hal's contract (a region out of range, an overlap, a bad shape, …).
    #[error(transparent)]
    Contract(#[from] CheckError),
    /// The worker threads could not be started.
    #[error("could not start {threads} worker threads")]
    Threads { threads: usize },
    /// `--pin`: no CPU topology to pin by (not Linux, or `/sys` hidden), or the OS refused a
    /// binding.
    #[error("could not pin {threads} worker threads to CPUs (no readable CPU topology, or the OS refused the binding)")]
    Pin { threads: usize },
}

impl From<purehw_hal_host::OutOfMemory> for CpuError {
    fn from(e: purehw_hal_host::OutOfMemory) -> Self {
        CpuError::OutOfMemory { elems: e.elems }
    }
}

impl purehw_hal::Error for CpuError {
    fn kind(&self) -> ErrorKind {
        match self {
            CpuError::OutOfMemory { .. } => ErrorKind::OutOfMemory,
            CpuError::UnsupportedFormat(_) | CpuError::UnsupportedOp => ErrorKind::Unsupported,
            _ => ErrorKind::Other,
        }
    }
}

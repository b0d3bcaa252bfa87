//! The backend's error type. Variants carry only `Copy` data so that reporting an error never
//! allocates (a failing `submit` stays allocation-free too).

use purehw_hal::check::CheckError;
use purehw_hal::{ErrorKind, Format};

/// Everything [`CpuRef`](crate::CpuRef) can fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CpuRefError {
    /// Host memory ran out while allocating `elems` f32 elements.
    #[error("out of memory allocating {elems} f32 elements")]
    OutOfMemory { elems: usize },
    /// A weight format this backend does not implement.
    #[error("unsupported weight format {0:?}")]
    UnsupportedFormat(Format),
    /// An op this backend does not implement.
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
}

impl From<purehw_hal_host::OutOfMemory> for CpuRefError {
    fn from(e: purehw_hal_host::OutOfMemory) -> Self {
        CpuRefError::OutOfMemory { elems: e.elems }
    }
}

impl purehw_hal::Error for CpuRefError {
    fn kind(&self) -> ErrorKind {
        match self {
            CpuRefError::OutOfMemory { .. } => ErrorKind::OutOfMemory,
            CpuRefError::UnsupportedFormat(_) | CpuRefError::UnsupportedOp => ErrorKind::Unsupported,
            _ => ErrorKind::Other,
        }
    }
}

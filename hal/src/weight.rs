//! Weights as they sit in host memory (usually a view into a memory-mapped file).

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ops::Range;

use crate::Format;

/// Bytes owned elsewhere (an mmap, a `Vec`), kept alive by reference counting.
#[derive(Clone)]
pub struct HostBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
    mapped: bool,
}

impl HostBytes {
    /// `range` of `owner`, or `None` when it does not lie inside.
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Option<Self> {
        let len = (*owner).as_ref().len();
        (range.start <= range.end && range.end <= len).then_some(HostBytes { owner, range, mapped: false })
    }

    /// As [`new`](Self::new) for an owner that is a memory map of a whole file: its start is
    /// page-aligned and the pages around any range of it are mapped, so a device that shares
    /// memory with the host may import them in place instead of copying.
    pub fn new_mapped(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Option<Self> {
        Self::new(owner, range).map(|b| HostBytes { mapped: true, ..b })
    }

    /// Owned bytes (small tensors converted at load time, tests).
    pub fn from_vec(v: Vec<u8>) -> Self {
        let range = 0..v.len();
        HostBytes { owner: Arc::new(v), range, mapped: false }
    }

    /// Whether the owner is a file's memory map (see [`new_mapped`](Self::new_mapped)).
    pub fn is_mapped(&self) -> bool {
        self.mapped
    }

    /// All of the owner's bytes (the whole file for a mapped owner) and where this range lies in
    /// them.
    pub fn owner(&self) -> (&[u8], Range<usize>) {
        ((*self.owner).as_ref(), self.range.clone())
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }

    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

impl core::fmt::Debug for HostBytes {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "HostBytes({:?})", self.range)
    }
}

/// A weight matrix `[rows, cols]` in `format`, row-major; a vector is `rows == 1`.
#[derive(Clone, Debug)]
pub struct HostWeight {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    /// Exactly `rows * format.bytes_for(cols)` bytes.
    pub data: HostBytes,
}

impl HostWeight {
    /// Checks the byte length against the shape; `None` if they disagree.
    pub fn new(format: Format, rows: usize, cols: usize, data: HostBytes) -> Option<Self> {
        let w = HostWeight { format, rows, cols, data };
        w.is_consistent().then_some(w)
    }

    /// Whether `data` is exactly `rows` whole rows of `cols` elements in `format` (what
    /// [`new`](Self::new) checks; the fields are public, so a weight built directly may not be).
    pub fn is_consistent(&self) -> bool {
        self.format.bytes_for(self.cols).and_then(|row| row.checked_mul(self.rows)) == Some(self.data.len())
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.format.bytes_for(self.cols).unwrap_or(0)
    }

    /// The stored bytes of row `r`, for `r < rows` of a weight that
    /// [`is_consistent`](Self::is_consistent); panics when the row lies past `data`.
    pub fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data.as_slice()[r * n..(r + 1) * n]
    }
}

//! Host-memory buffers and weights for the CPU backends.
//!
//! [`Host`] owns an arena of f32 buffers and the weights loaded so far (views of the memory map),
//! answers [`purehw_hal::check::Resources`] so a backend checks every op against the contract
//! before it runs, and lends one op's output region mutably beside its inputs
//! ([`Host::with_out`]). It holds no op code: the reference and the fast backend each run their
//! own, and share only `kernels` and `hal`.

use std::ops::Range;

use purehw_hal::check::{CheckError, Resources, WeightInfo};
use purehw_hal::{HostWeight, View};
use purehw_kernels::quant::{BlockQ8A, BlockQ8K};

/// Most buffers [`Host::with_lent`] lends at once.
pub const MAX_LENT: usize = 5;

/// Handle of a buffer in a [`Host`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct BufId(pub u32);

/// Handle of a weight loaded into a [`Host`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct WeightId(pub u32);

/// Host memory ran out.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("out of host memory allocating {elems} f32 elements")]
pub struct OutOfMemory {
    pub elems: usize,
}

/// Buffers and weights in host memory.
#[derive(Default)]
pub struct Host {
    bufs: Vec<Vec<f32>>,
    weights: Vec<HostWeight>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("buffers", &self.bufs.len()).field("weights", &self.weights.len()).finish()
    }
}

impl Resources<BufId, WeightId> for Host {
    fn buffer_len(&self, b: BufId) -> Option<usize> {
        self.bufs.get(b.0 as usize).map(Vec::len)
    }
    fn weight_info(&self, w: WeightId) -> Option<WeightInfo> {
        self.weight(w).map(|w| WeightInfo { format: w.format, rows: w.rows, cols: w.cols })
    }
}

impl Host {
    pub fn new() -> Self {
        Self::default()
    }

    /// A zeroed buffer of `len` elements. Probes that the memory can be had (an error, not an
    /// abort, when it cannot); `vec![0.0; n]` then takes zeroed pages the OS maps lazily, so a
    /// large KV cache costs nothing until it is used.
    pub fn alloc(&mut self, len: usize) -> Result<BufId, OutOfMemory> {
        let oom = OutOfMemory { elems: len };
        let id = u32::try_from(self.bufs.len()).map_err(|_| oom)?;
        let mut probe: Vec<f32> = Vec::new();
        probe.try_reserve_exact(len).map_err(|_| oom)?;
        drop(probe);
        self.bufs.try_reserve(1).map_err(|_| oom)?;
        self.bufs.push(vec![0.0f32; len]);
        Ok(BufId(id))
    }

    /// Keep a weight (the caller checked its format and consistency).
    pub fn add_weight(&mut self, w: &HostWeight) -> Result<WeightId, OutOfMemory> {
        let id = u32::try_from(self.weights.len()).map_err(|_| OutOfMemory { elems: 0 })?;
        self.weights.try_reserve(1).map_err(|_| OutOfMemory { elems: 0 })?;
        self.weights.push(w.clone());
        Ok(WeightId(id))
    }

    /// The weight behind a handle.
    pub fn weight(&self, w: WeightId) -> Option<&HostWeight> {
        self.weights.get(w.0 as usize)
    }

    /// Every weight, indexed by handle.
    pub fn weights(&self) -> &[HostWeight] {
        &self.weights
    }

    /// A buffer's contents.
    pub fn buffer(&self, b: BufId) -> Option<&[f32]> {
        self.bufs.get(b.0 as usize).map(Vec::as_slice)
    }

    /// `v.offset .. v.offset + len` of buffer `v.buf`, checked.
    fn range(&self, v: View<BufId>, len: usize, what: &'static str) -> Result<Range<usize>, CheckError> {
        let n = self.buffer_len(v.buf).ok_or(CheckError::UnknownBuffer { what })?;
        purehw_hal::check::in_range(v, len, n, what)
    }

    /// Copy `src` into `dst[0..src.len()]`.
    pub fn write(&mut self, dst: View<BufId>, src: &[f32]) -> Result<(), CheckError> {
        let r = self.range(dst, src.len(), "write")?;
        self.bufs[dst.buf.0 as usize][r].copy_from_slice(src);
        Ok(())
    }

    /// Copy `src[0..dst.len()]` out.
    pub fn read(&self, src: View<BufId>, dst: &mut [f32]) -> Result<(), CheckError> {
        let r = self.range(src, dst.len(), "read")?;
        dst.copy_from_slice(&self.bufs[src.buf.0 as usize][r]);
        Ok(())
    }

    /// Lend the output region `out .. out + len` mutably, with every other region readable through
    /// [`Inputs`], to `f`. The op must have passed [`purehw_hal::check::op`]: then every region
    /// lies inside its buffer and inputs touch the output only exactly (in place).
    /// `mem::take` leaves an empty `Vec` while the buffer is out: no allocation.
    pub fn with_out<R>(
        &mut self,
        out: View<BufId>,
        len: usize,
        f: impl FnOnce(&mut [f32], &Inputs<'_>, &[HostWeight]) -> R,
    ) -> Result<R, CheckError> {
        let range = self.range(out, len, "output")?;
        let idx = out.buf.0 as usize;
        let mut ob = std::mem::take(&mut self.bufs[idx]);
        let result = {
            let (head, rest) = ob.split_at_mut(range.start);
            let (o, tail) = rest.split_at_mut(range.len());
            f(o, &Inputs { bufs: &self.bufs, out_idx: idx, out: range, head, tail }, &self.weights)
        };
        self.bufs[idx] = ob;
        Ok(result)
    }

    /// Lend whole buffers `ids` (distinct, at most [`MAX_LENT`]) mutably to `f`, in that order,
    /// beside the rest of the arena (where the lent ones read as empty) and the weights; they go
    /// back when `f` returns. For a fused job that writes several outputs at once.
    /// `mem::take` leaves an empty `Vec` while a buffer is out: no allocation.
    pub fn with_lent<R>(
        &mut self,
        ids: &[BufId],
        f: impl FnOnce(&mut [Vec<f32>], &[Vec<f32>], &[HostWeight]) -> R,
    ) -> R {
        assert!(ids.len() <= MAX_LENT, "at most {MAX_LENT} buffers lent at once");
        debug_assert!(ids.iter().enumerate().all(|(i, b)| !ids[..i].contains(b)), "lent buffers repeat");
        let mut lent: [Vec<f32>; MAX_LENT] = Default::default();
        for (t, b) in lent.iter_mut().zip(ids) {
            *t = std::mem::take(&mut self.bufs[b.0 as usize]);
        }
        let result = f(&mut lent[..ids.len()], &self.bufs, &self.weights);
        for (t, b) in lent.iter_mut().zip(ids) {
            self.bufs[b.0 as usize] = std::mem::take(t);
        }
        result
    }

    /// Both the buffers (mutably) and the weights, for a backend that schedules its own borrows.
    pub fn parts_mut(&mut self) -> (&mut [Vec<f32>], &[HostWeight]) {
        (&mut self.bufs, &self.weights)
    }
}

/// An input region as seen while the output region is lent out.
pub enum Src<'a> {
    /// A region that does not overlap the output.
    Slice(&'a [f32]),
    /// Exactly the output region (in place).
    Out,
}

/// The arena while one output region is lent: inputs come from the other buffers, or from the
/// parts of the output's buffer before (`head`) and after (`tail`) the region.
pub struct Inputs<'a> {
    bufs: &'a [Vec<f32>],
    out_idx: usize,
    out: Range<usize>,
    head: &'a [f32],
    tail: &'a [f32],
}

impl<'a> Inputs<'a> {
    /// Region `v .. v + len`. Panics if the op was not checked (a region outside its buffer, or
    /// one that partly overlaps the output): that is a backend bug, not bad input.
    pub fn src(&self, v: View<BufId>, len: usize) -> Src<'a> {
        let idx = v.buf.0 as usize;
        let r = v.offset..v.offset + len;
        if idx != self.out_idx {
            return Src::Slice(&self.bufs[idx][r]);
        }
        if r == self.out {
            Src::Out
        } else if r.end <= self.out.start {
            Src::Slice(&self.head[r])
        } else if r.start >= self.out.end {
            Src::Slice(&self.tail[r.start - self.out.end..r.end - self.out.end])
        } else {
            panic!("unchecked op: an input partly overlaps the output")
        }
    }

    /// An input the contract keeps apart from the output.
    pub fn slice(&self, v: View<BufId>, len: usize) -> &'a [f32] {
        match self.src(v, len) {
            Src::Slice(s) => s,
            Src::Out => panic!("unchecked op: an input aliases the output"),
        }
    }
}

/// Quantized activation blocks stored in an f32 buffer region (`purehw_hal::act_words` words each).
pub fn q8a_blocks(words: &[f32]) -> &[BlockQ8A] {
    bytemuck::cast_slice(words)
}

/// Mutable [`q8a_blocks`].
pub fn q8a_blocks_mut(words: &mut [f32]) -> &mut [BlockQ8A] {
    bytemuck::cast_slice_mut(words)
}

/// Quantized k-quant activation blocks stored in an f32 buffer region.
pub fn q8k_blocks(words: &[f32]) -> &[BlockQ8K] {
    bytemuck::cast_slice(words)
}

/// Mutable [`q8k_blocks`].
pub fn q8k_blocks_mut(words: &mut [f32]) -> &mut [BlockQ8K] {
    bytemuck::cast_slice_mut(words)
}

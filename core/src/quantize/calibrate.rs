//! Calibration for [`gptq`](super::gptq): the model runs over a text on a backend wrapped so
//! that the input rows of chosen linear layers are summed into each one's [`Hessian`] as the
//! step reaches them. The wrapper declines the fused ops, so the step is built from plain
//! `MatMul`s whose inputs exist in buffers, and runs each step in pieces, reading a tapped
//! matmul's input just before it.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use purehw_hal::{ActQuant, Backend, ErrorKind, ErrorType, HostWeight, Op, OpKind, Step, View};

use super::gptq::Hessian;
use crate::model::{Model, ModelOptions};
use crate::source::{ModelSource, Role};

/// Each tapped layer's Hessian, by role and layer.
pub type Hessians = BTreeMap<(Role, usize), Hessian>;

/// Run `src` over `tokens` (one sequence, from position 0) on `backend` with f32 activations,
/// and return the Hessians of the inputs of `roles` in every layer.
pub fn calibrate<B: Backend>(backend: B, src: &ModelSource, tokens: &[u32], roles: &[Role]) -> crate::Result<Hessians> {
    let c = &src.config;
    let mut taps = Vec::new();
    for &role in roles {
        for layer in 0..c.layers {
            if let Some(w) = src.weight(role, Some(layer))? {
                let p = w.data.as_slice();
                taps.push(Tapped { at: (p.as_ptr() as usize, p.len()), key: (role, layer), h: Hessian::new(w.cols) });
            }
        }
    }
    let tap = Tap { inner: backend, taps, pieces: Vec::new(), x: Vec::new() };
    let opts =
        ModelOptions { ctx: tokens.len().max(1), slots: 1, logit_rows: 1, act: ActQuant::F32, ..Default::default() };
    let mut model = Model::load(tap, src, opts)?;
    if !tokens.is_empty() {
        model.forward(0, 0, tokens)?;
    }
    let tap = model.into_backend();
    Ok(tap.taps.into_iter().map(|t| (t.key, t.h)).collect())
}

/// A weight as the wrapper hands it to the model: the inner handle and its tap, if any.
#[derive(Copy, Clone, Debug)]
struct TapWeight<W> {
    w: W,
    tap: Option<usize>,
}

/// What the wrapper adds to the inner backend's errors.
#[derive(Debug, thiserror::Error)]
enum TapError<E> {
    #[error(transparent)]
    Inner(E),
    #[error("calibration: the step used an op the calibration backend declines ({0})")]
    Declined(&'static str),
}

impl<E: purehw_hal::Error> purehw_hal::Error for TapError<E> {
    fn kind(&self) -> ErrorKind {
        match self {
            TapError::Inner(e) => e.kind(),
            TapError::Declined(_) => ErrorKind::Unsupported,
        }
    }
}

/// One tapped weight: where its bytes are (address, length), which it is, its inputs' Hessian.
struct Tapped {
    at: (usize, usize),
    key: (Role, usize),
    h: Hessian,
}

struct Tap<B: Backend> {
    inner: B,
    taps: Vec<Tapped>,
    /// The ops of the current piece, with inner handles.
    pieces: Vec<Op<B::Buffer, B::Weight>>,
    /// A tapped matmul's input rows.
    x: Vec<f32>,
}

impl<B: Backend> ErrorType for Tap<B> {
    type Error = TapError<B::Error>;
}

impl<B: Backend> Backend for Tap<B> {
    type Buffer = B::Buffer;
    type Weight = TapWeight<B::Weight>;

    fn name(&self) -> &str {
        "calibration"
    }

    fn supports(&self, op: OpKind) -> bool {
        !matches!(op, OpKind::AddRmsNorm | OpKind::Qkv | OpKind::GatedFfn) && self.inner.supports(op)
    }

    fn alloc(&mut self, len: usize) -> Result<B::Buffer, Self::Error> {
        self.inner.alloc(len).map_err(TapError::Inner)
    }

    fn load_weight(&mut self, w: &HostWeight) -> Result<Self::Weight, Self::Error> {
        let p = w.data.as_slice();
        let tap = self.taps.iter().position(|t| t.at == (p.as_ptr() as usize, p.len()));
        Ok(TapWeight { w: self.inner.load_weight(w).map_err(TapError::Inner)?, tap })
    }

    fn write(&mut self, dst: View<B::Buffer>, src: &[f32]) -> Result<(), Self::Error> {
        self.inner.write(dst, src).map_err(TapError::Inner)
    }

    fn read(&mut self, src: View<B::Buffer>, dst: &mut [f32]) -> Result<(), Self::Error> {
        self.inner.read(src, dst).map_err(TapError::Inner)
    }

    fn submit(&mut self, step: &Step<'_>, ops: &[Op<B::Buffer, Self::Weight>]) -> Result<(), Self::Error> {
        self.pieces.clear();
        for op in ops {
            if let Op::MatMul { x, w: TapWeight { tap: Some(t), .. }, n, .. } = *op {
                // Everything before this matmul runs first, so its input is there to read.
                self.inner.submit(step, &self.pieces).map_err(TapError::Inner)?;
                self.pieces.clear();
                let cols = self.taps[t].h.cols;
                self.x.resize(n * cols, 0.0);
                self.inner.read(x, &mut self.x).map_err(TapError::Inner)?;
                self.taps[t].h.add(&self.x);
            }
            self.pieces.push(strip(op).ok_or(TapError::Declined("a fused op"))?);
        }
        self.inner.submit(step, &self.pieces).map_err(TapError::Inner)
    }
}

/// `op` with the inner weight handles; `None` for the fused ops (declined in `supports`).
fn strip<Bf: Copy, W: Copy>(op: &Op<Bf, TapWeight<W>>) -> Option<Op<Bf, W>> {
    (!op.is_fused()).then(|| op.map(|b| b, |w| w.w))
}

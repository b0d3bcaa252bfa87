//! How an appliance plugs in its own backend: implement `purehw_hal::Backend` and hand it to
//! `Model::load`. This one wraps the reference backend and counts the ops each step runs —
//! a real one would map buffers to its device and `submit` to its command queue.
//!
//!     cargo run --release -p purehw-examples --example custom_backend -- MODEL [PROMPT]

use std::collections::BTreeMap;

use purehw_core::model::{Model, ModelOptions};
use purehw_core::source::ModelSource;
use purehw_hal::{Backend, ErrorType, HostWeight, Op, OpKind, Step, View};
use purehw_hal_cpu_ref::CpuRef;

/// Delegates everything to `CpuRef`, tallying ops by name.
struct Counting {
    inner: CpuRef,
    counts: BTreeMap<&'static str, u64>,
}

impl ErrorType for Counting {
    type Error = <CpuRef as ErrorType>::Error;
}

impl Backend for Counting {
    type Buffer = <CpuRef as Backend>::Buffer;
    type Weight = <CpuRef as Backend>::Weight;

    fn name(&self) -> &str {
        "counting(cpu-ref)"
    }
    // Refuse nothing the wrapped backend can do; an NPU would answer per op and format here.
    fn supports(&self, op: OpKind) -> bool {
        self.inner.supports(op)
    }
    fn alloc(&mut self, len: usize) -> Result<Self::Buffer, Self::Error> {
        self.inner.alloc(len)
    }
    fn load_weight(&mut self, w: &HostWeight) -> Result<Self::Weight, Self::Error> {
        self.inner.load_weight(w)
    }
    fn write(&mut self, dst: View<Self::Buffer>, src: &[f32]) -> Result<(), Self::Error> {
        self.inner.write(dst, src)
    }
    fn read(&mut self, src: View<Self::Buffer>, dst: &mut [f32]) -> Result<(), Self::Error> {
        self.inner.read(src, dst)
    }
    fn submit(&mut self, step: &Step<'_>, ops: &[Op<Self::Buffer, Self::Weight>]) -> Result<(), Self::Error> {
        for op in ops {
            let name = match op {
                Op::Embed { .. } => "embed",
                Op::RmsNorm { .. } => "rms_norm",
                Op::MatMul { .. } => "mat_mul",
                Op::Rope { .. } => "rope",
                Op::StoreKv { .. } => "store_kv",
                Op::Attention { .. } => "attention",
                Op::Add { .. } => "add",
                Op::GeluTanhMul { .. } => "gelu_tanh_mul",
                Op::SiluMul { .. } => "silu_mul",
                Op::Softcap { .. } => "softcap",
                _ => "other",
            };
            *self.counts.entry(name).or_default() += 1;
        }
        self.inner.submit(step, ops)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: custom_backend MODEL [IDS…]")?;
    let src = ModelSource::open(std::path::Path::new(&path))?;
    let backend = Counting { inner: CpuRef::new(), counts: BTreeMap::new() };
    let mut model = Model::load(backend, &src, ModelOptions::default())?;
    let prompt: Vec<u32> = match args.next() {
        Some(ids) => ids.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![src.config.bos.unwrap_or(0)],
    };
    let logits = model.forward(0, 0, &prompt)?;
    let best = logits.iter().enumerate().fold(0, |b, (i, &v)| if v > logits[b] { i } else { b });
    println!("next token after {prompt:?}: {best}");
    for (op, n) in &model.backend().counts {
        println!("{op:>14}: {n}");
    }
    Ok(())
}

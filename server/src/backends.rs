//! The backend registry: every `--backend` value, its default `--act`, how it is built, and what
//! `purehw devices` says of it. Nothing else in the binary names a backend type.
//!
//! A command writes its body once, generic over the backend, as a [`WithBackend`] visitor;
//! [`dispatch`] resolves `--backend` (`auto` included) and calls it with a [`Maker`] for the
//! chosen type. A `Maker` builds the backend as often as asked (the server builds a new one after
//! a lost device) and is `Send`, so the backend itself is made on the thread that uses it.
//!
//! Adding a backend: an arm of [`BackendKind`], a [`Registered`] impl, its arm in [`dispatch`],
//! and its entry in [`devices`].

use std::fmt::Write as _;
use std::marker::PhantomData;

use clap::{Args, ValueEnum};
use purehw_core::model::{Model, ModelOptions};
use purehw_core::source::ModelSource;
use purehw_hal::{ActQuant, Backend, KvType};
use purehw_hal_cpu::{Cpu, CpuOptions};
use purehw_hal_cpu_ref::CpuRef;
use purehw_hal_vulkan::{DeviceInfo, Vulkan, VulkanOptions};
use serde_json::json;

use crate::error::{CliResult, Context};
use crate::out;

/// `--backend`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The fast CPU backend: a thread pool and SIMD kernels.
    Cpu,
    /// The plain single-threaded reference backend.
    CpuRef,
    /// A Vulkan device (`PUREHW_VK_DEVICE` picks one; CPU devices such as lavapipe allowed).
    Vulkan,
    /// A discrete or integrated GPU through Vulkan when there is one, else `cpu`.
    Auto,
}

/// `--act`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ActArg {
    /// f32 activations against dequantized weights.
    F32,
    /// Activations quantized to int8 per block, integer dot products.
    Int8,
}

/// `--kv-type`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum KvArg {
    /// f32 keys and values: exact.
    F32,
    /// Each key and value rounded to f16 when stored: half the cache's memory.
    F16,
}

/// Which backend computes, and how.
#[derive(Args, Debug, Clone)]
pub struct BackendArgs {
    /// Compute backend (`purehw devices` lists what this machine has).
    #[arg(long = "backend", value_name = "NAME", value_enum, default_value = "cpu")]
    pub kind: BackendKind,
    /// Worker threads for `cpu` (0 = one per physical core; `cpu-ref` is single-threaded, `vulkan`
    /// ignores it).
    #[arg(short = 't', long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
    /// Pin the `cpu` backend's threads to CPUs: one per physical core, spread across NUMA nodes,
    /// SMT siblings last (also `PUREHW_PIN=1`).
    #[arg(long)]
    pub pin: bool,
    /// Matmul activations (default: int8 on `cpu` and `vulkan`, f32 on `cpu-ref`).
    #[arg(long, value_enum)]
    pub act: Option<ActArg>,
    /// Most bytes of a model kept in memory (e.g. 800M, 2GiB): the shared weights, the KV cache
    /// and as many decoder layers as fit stay resident, the other layers are read per token
    /// (host memory on `cpu`/`cpu-ref`, device memory on `vulkan`; per model when serving
    /// several).
    #[arg(long, value_name = "SIZE", value_parser = parse_budget)]
    pub memory_budget: Option<usize>,
    /// What the KV cache stores: f32 (exact) or f16 (half the memory).
    #[arg(long, value_enum, default_value = "f32")]
    pub kv_type: KvArg,
}

/// `--memory-budget SIZE`.
fn parse_budget(s: &str) -> Result<usize, String> {
    crate::quantize::parse_size(s)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| format!("{s:?} is not a size such as 800M, 2G or 4GiB"))
}

/// What the CLI shows of a backend's hardware.
#[derive(Clone, Debug, Default)]
pub struct Hw {
    /// Host threads that compute (the pool of `cpu`; 1 for the others).
    pub threads: usize,
    /// The SIMD kernel set (`cpu`).
    pub simd: Option<&'static str>,
    /// The device's name (`vulkan`).
    pub device: Option<String>,
}

/// What the registry knows of each backend type beyond [`Backend`].
pub trait Registered: Backend + Sized + 'static {
    /// The `--backend` name.
    const NAME: &'static str;
    /// `--act` when not given.
    const DEFAULT_ACT: ActQuant;
    /// What [`build`](Registered::build) needs (sendable: the server builds on its own thread).
    type Config: Clone + Send + Sync + 'static;

    fn build(cfg: &Self::Config) -> CliResult<Self>;

    fn hw(&self) -> Hw;

    /// Dispatches and barriers of the last step recorded, where the backend counts them.
    fn step_counts(&self) -> Option<(usize, usize)> {
        None
    }

    /// The bandwidth (bytes/s) of the memory the weights are read from, where that is the
    /// device's own (a discrete GPU); `None`: the host's memory, probed by the caller.
    fn device_bandwidth(&mut self) -> CliResult<Option<f64>> {
        Ok(None)
    }

    /// Whether a server should run the first step shapes before serving (`Model::warm_up`): a
    /// GPU records command buffers and compiles kernel variants the first time it meets them.
    fn warms_up(&self) -> bool {
        false
    }
}

impl Registered for Cpu {
    const NAME: &'static str = "cpu";
    const DEFAULT_ACT: ActQuant = ActQuant::Int8;
    /// Threads (0: one per physical core) and pinning.
    type Config = CpuOptions;

    fn build(opts: &CpuOptions) -> CliResult<Self> {
        Cpu::with_options(*opts).context(|| "starting the cpu backend".into())
    }

    fn hw(&self) -> Hw {
        Hw { threads: self.threads(), simd: Some(self.simd()), device: None }
    }
}

impl Registered for CpuRef {
    const NAME: &'static str = "cpu-ref";
    const DEFAULT_ACT: ActQuant = ActQuant::F32;
    type Config = ();

    fn build(_: &()) -> CliResult<Self> {
        Ok(CpuRef::new())
    }

    fn hw(&self) -> Hw {
        Hw { threads: 1, ..Hw::default() }
    }
}

impl Registered for Vulkan {
    const NAME: &'static str = "vulkan";
    const DEFAULT_ACT: ActQuant = ActQuant::Int8;
    type Config = VulkanOptions;

    fn build(opts: &VulkanOptions) -> CliResult<Self> {
        Vulkan::new(opts).context(|| "starting the vulkan backend".into())
    }

    fn hw(&self) -> Hw {
        Hw { threads: 1, simd: None, device: Some(self.info().name.clone()) }
    }

    fn step_counts(&self) -> Option<(usize, usize)> {
        Some(self.last_step_counts())
    }

    fn device_bandwidth(&mut self) -> CliResult<Option<f64>> {
        self.memory_bandwidth(1 << 30, 5).context(|| "measuring the device's memory bandwidth".into())
    }

    /// GPUs only: on a CPU device (lavapipe) the warm-up's prompt chunk would take longer than
    /// the compiling it saves. Not with a fault set to strike at the N-th step
    /// (`PUREHW_VK_FAULT`): the warm-up's steps would take it.
    fn warms_up(&self) -> bool {
        self.info().is_gpu() && !self.fault_armed()
    }
}

/// Builds backends of type `B`, as often as asked.
pub struct Maker<B: Registered> {
    cfg: B::Config,
    /// `--act`, or the backend's default.
    pub act: ActQuant,
    /// `--memory-budget` in bytes (for `Model::load_with_budget`).
    pub budget: Option<usize>,
    /// `--kv-type`: every model this maker loads gets it.
    pub kv: KvType,
    _b: PhantomData<fn() -> B>,
}

impl<B: Registered> Clone for Maker<B> {
    fn clone(&self) -> Self {
        Maker { cfg: self.cfg.clone(), act: self.act, budget: self.budget, kv: self.kv, _b: PhantomData }
    }
}

impl<B: Registered> Maker<B> {
    fn new(cfg: B::Config, act: Option<ActArg>) -> Self {
        let act = match act {
            Some(ActArg::F32) => ActQuant::F32,
            Some(ActArg::Int8) => ActQuant::Int8,
            None => B::DEFAULT_ACT,
        };
        Maker { cfg, act, budget: None, kv: KvType::F32, _b: PhantomData }
    }

    /// With `--kv-type`.
    fn with_kv(self, kv: KvType) -> Self {
        Maker { kv, ..self }
    }

    /// With `--memory-budget` (a backend that copies its weights refuses it at load).
    fn with_budget(self, budget: Option<usize>) -> CliResult<Self> {
        Ok(Maker { budget, ..self })
    }

    pub fn make(&self) -> CliResult<B> {
        B::build(&self.cfg)
    }

    /// Load `src` on a new backend, within `--memory-budget` when given.
    pub fn load(&self, src: &ModelSource, opts: ModelOptions) -> CliResult<Model<B>> {
        Ok(Model::load_with_budget(self.make()?, src, ModelOptions { kv: self.kv, ..opts }, self.budget)?)
    }

    pub fn name(&self) -> &'static str {
        B::NAME
    }
}

/// A command's body, generic over the backend.
pub trait WithBackend {
    type Out;
    fn run<B: Registered>(self, make: Maker<B>) -> CliResult<Self::Out>;
}

/// Resolve `--backend` and run `v` with a maker for it.
pub fn dispatch<V: WithBackend>(b: &BackendArgs, v: V) -> CliResult<V::Out> {
    let budget = b.memory_budget;
    let kv = kv_type(b);
    match b.kind {
        BackendKind::Cpu => v.run(Maker::<Cpu>::new(cpu_options(b), b.act).with_budget(budget)?.with_kv(kv)),
        BackendKind::CpuRef => v.run(Maker::<CpuRef>::new((), b.act).with_budget(budget)?.with_kv(kv)),
        BackendKind::Vulkan => {
            v.run(Maker::<Vulkan>::new(VulkanOptions::from_env(), b.act).with_budget(budget)?.with_kv(kv))
        }
        BackendKind::Auto => match auto_gpu() {
            Ok(opts) => v.run(Maker::<Vulkan>::new(opts, b.act).with_budget(budget)?.with_kv(kv)),
            Err(why) => {
                eprintln!("purehw: --backend auto: {why}; using cpu");
                v.run(Maker::<Cpu>::new(cpu_options(b), b.act).with_budget(budget)?.with_kv(kv))
            }
        },
    }
}

/// The `cpu` backend the server falls back to when a lost device cannot be made again.
pub fn cpu_fallback(b: &BackendArgs) -> Maker<Cpu> {
    let kv = kv_type(b);
    Maker { budget: b.memory_budget, kv, ..Maker::new(cpu_options(b), b.act) }
}

/// `--kv-type` as the core takes it.
fn kv_type(b: &BackendArgs) -> KvType {
    match b.kv_type {
        KvArg::F32 => KvType::F32,
        KvArg::F16 => KvType::F16,
    }
}

/// The `cpu` backend's options: `-t`, and `--pin` or `PUREHW_PIN=1`.
fn cpu_options(b: &BackendArgs) -> CpuOptions {
    let env_pin = std::env::var("PUREHW_PIN").is_ok_and(|v| v == "1");
    CpuOptions { threads: b.threads, pin: b.pin || env_pin }
}

/// Vulkan options that take a discrete or integrated GPU (never a CPU device), or why there is
/// none.
fn auto_gpu() -> Result<VulkanOptions, String> {
    let opts = VulkanOptions { allow_cpu: false, ..VulkanOptions::from_env() };
    let devs = purehw_hal_vulkan::devices().map_err(|e| format!("Vulkan is unavailable ({e})"))?;
    let usable = |d: &&DeviceInfo| d.is_gpu() && d.buffer_device_address;
    let found = match &opts.device {
        // PUREHW_VK_DEVICE picks the device; auto still takes it only if it is a GPU.
        Some(sel) => {
            let lower = sel.to_lowercase();
            devs.iter()
                .find(|d| sel.parse::<usize>().ok() == Some(d.index))
                .or_else(|| devs.iter().find(|d| d.name.to_lowercase().contains(&lower)))
                .filter(usable)
        }
        None => devs.iter().find(usable),
    };
    match found {
        Some(_) => Ok(opts),
        None if devs.is_empty() => Err("no Vulkan device".into()),
        None => {
            let names: Vec<String> = devs.iter().map(|d| format!("{} ({})", d.name, d.kind_name())).collect();
            Err(format!("no discrete or integrated GPU among the Vulkan devices [{}]", names.join(", ")))
        }
    }
}

/// `major.minor.patch` of a Vulkan version number.
fn vk_version(v: u32) -> String {
    format!("{}.{}.{}", (v >> 22) & 0x7f, (v >> 12) & 0x3ff, v & 0xfff)
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// One Vulkan device for `purehw devices --json`.
fn device_json(d: &DeviceInfo) -> serde_json::Value {
    json!({
        "index": d.index,
        "name": d.name,
        "type": d.kind_name(),
        "gpu": d.is_gpu(),
        "api_version": vk_version(d.api_version),
        "driver": d.driver,
        "subgroup_size": d.subgroup_size,
        "subgroup_shuffle": d.subgroup_shuffle,
        "float16": d.float16,
        "float64": d.float64,
        "int8_dot": d.int8_dot,
        "coopmat": d.coopmat,
        "coopmat2": d.coopmat2,
        "buffer_device_address": d.buffer_device_address,
        "denorm_preserve_f32": d.denorm_preserve,
        "external_memory_host": d.external_memory_host,
        "unified_memory": d.unified(),
        "timestamps": d.timestamps,
        "max_alloc": d.max_alloc,
        "heaps": d.heaps.iter().map(|&(bytes, local)| json!({"bytes": bytes, "device_local": local})).collect::<Vec<_>>(),
    })
}

/// One Vulkan device for `purehw devices`: a line for what it is, then what it can do.
fn device_text(s: &mut String, d: &DeviceInfo) {
    let auto_note = if d.is_gpu() { "" } else { " (not taken by --backend auto)" };
    let _ = writeln!(s, "  {}: {}, {}{auto_note}", d.index, d.name, d.kind_name());
    let _ = writeln!(s, "     driver {}, Vulkan {}", d.driver, vk_version(d.api_version));
    let _ = writeln!(
        s,
        "     subgroup size {} (shuffle {}), fp16 {}, fp64 {}, int8 dot product {}, cooperative matrix {} (NV coopmat2 {})",
        d.subgroup_size,
        yes(d.subgroup_shuffle),
        yes(d.float16),
        yes(d.float64),
        yes(d.int8_dot),
        yes(d.coopmat),
        yes(d.coopmat2)
    );
    let heaps: Vec<String> =
        d.heaps.iter().map(|&(b, local)| format!("{}{}", gib(b), if local { " device-local" } else { "" })).collect();
    let shared = if d.unified() { "; shares memory with the host" } else { "" };
    let _ = writeln!(s, "     memory heaps: {}; largest allocation {}{shared}", heaps.join(", "), gib(d.max_alloc));
    let mut missing = Vec::new();
    if !d.buffer_device_address {
        missing.push("buffer device address (purehw needs it)");
    }
    if !d.denorm_preserve {
        missing.push("a promise to keep f32 denormals in shaders (results may then differ from the CPU's)");
    }
    if !d.timestamps {
        missing.push("timestamps (no device time in metrics)");
    }
    if !missing.is_empty() {
        let _ = writeln!(s, "     lacks: {}", missing.join(", "));
    }
}

/// `purehw devices`: every backend, each Vulkan device with what matters, and why a backend is
/// unavailable.
pub fn devices(as_json: bool) -> CliResult {
    let cpu = Cpu::new(0);
    let vk = purehw_hal_vulkan::devices();
    let auto = match auto_gpu() {
        Ok(_) => "vulkan",
        Err(_) => "cpu",
    };
    if as_json {
        let cpu_v = match &cpu {
            Ok(c) => json!({"name": "cpu", "available": true, "threads": c.threads(), "simd": c.simd()}),
            Err(e) => json!({"name": "cpu", "available": false, "error": e.to_string()}),
        };
        let vk_v = match &vk {
            Ok(devs) if devs.is_empty() => {
                json!({"name": "vulkan", "available": false, "error": "no Vulkan device", "devices": []})
            }
            Ok(devs) => {
                json!({"name": "vulkan", "available": true, "devices": devs.iter().map(device_json).collect::<Vec<_>>()})
            }
            Err(e) => json!({"name": "vulkan", "available": false, "error": e.to_string(), "devices": []}),
        };
        let v = json!({
            "default": "cpu",
            "auto": auto,
            "backends": [cpu_v, {"name": "cpu-ref", "available": true, "threads": 1}, vk_v],
        });
        return out::print_all(&format!("{v}\n"));
    }
    let mut s = String::new();
    match &cpu {
        Ok(c) => {
            let _ = writeln!(s, "cpu      {} threads, SIMD {} (the default)", c.threads(), c.simd());
        }
        Err(e) => {
            let _ = writeln!(s, "cpu      unavailable: {e}");
        }
    }
    let _ = writeln!(s, "cpu-ref  1 thread, plain scalar code (the reference)");
    match &vk {
        Err(e) => {
            let _ = writeln!(s, "vulkan   unavailable: {e}");
        }
        Ok(devs) if devs.is_empty() => {
            let _ = writeln!(s, "vulkan   unavailable: no Vulkan device");
        }
        Ok(devs) => {
            let _ = writeln!(s, "vulkan   {} device{}", devs.len(), if devs.len() == 1 { "" } else { "s" });
            for d in devs {
                device_text(&mut s, d);
            }
        }
    }
    let _ = writeln!(s, "--backend auto here: {auto}");
    out::print_all(&s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vulkan_versions_decode() {
        // VK_MAKE_API_VERSION(0, 1, 3, 239)
        assert_eq!(vk_version((1 << 22) | (3 << 12) | 239), "1.3.239");
    }

    /// Each backend's default `--act`, and `--act` overriding it.
    #[test]
    fn act_defaults() {
        assert_eq!(Maker::<Cpu>::new(CpuOptions { threads: 1, pin: false }, None).act, ActQuant::Int8);
        assert_eq!(Maker::<CpuRef>::new((), None).act, ActQuant::F32);
        assert_eq!(Maker::<Vulkan>::new(VulkanOptions::default(), None).act, ActQuant::Int8);
        assert_eq!(Maker::<Vulkan>::new(VulkanOptions::default(), Some(ActArg::F32)).act, ActQuant::F32);
        assert_eq!(Maker::<CpuRef>::new((), Some(ActArg::Int8)).act, ActQuant::Int8);
    }
}

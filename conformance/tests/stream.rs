//! Layer streaming (`Model::load_with_budget`): a model loaded with a weight budget too small for
//! its layers gives the same logits, bit for bit, as one loaded whole, on both CPU backends; a
//! budget below what every step needs is an error naming the numbers; and what the model keeps
//! of its file in memory stays within the budget after decoding.

use purehw_conformance::{matrix, model_file};
use purehw_core::Error;
use purehw_core::model::{Model, ModelOptions};
use purehw_core::source::{ModelSource, Role};
use purehw_core::stream::Needs;
use purehw_hal::KvType;
use purehw_hal::{ActQuant, Backend, Stats};
use purehw_hal_cpu_ref::CpuRef;

fn gemma3() -> std::path::PathBuf {
    model_file("gemma3-270m", "gemma-3-270m-q4_k_m.gguf")
}

fn smollm2() -> std::path::PathBuf {
    model_file("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn open(path: &std::path::Path) -> ModelSource {
    ModelSource::open(path).unwrap_or_else(|e| panic!("{e}"))
}

fn opts(act: ActQuant) -> ModelOptions {
    ModelOptions { ctx: 64, slots: 1, max_batch: 16, logit_rows: 1, act, swa_ring: true, kv: KvType::F32 }
}

/// What a budget must hold for `src` (from the error a budget of 0 gives).
fn needs<B: Backend>(backend: B, src: &ModelSource, o: ModelOptions) -> Needs {
    match Model::load_with_budget(backend, src, o, Some(0)) {
        Err(Error::Budget { budget: 0, needs }) => needs,
        Err(e) => panic!("expected a budget error, got {e}"),
        Ok(_) => panic!("a budget of 0 bytes was accepted"),
    }
}

/// Prefill a prompt, then decode a few tokens greedily; every step's logits.
fn run<B: Backend>(m: &mut Model<B>) -> Vec<Vec<f32>> {
    let vocab = m.config().vocab as u32;
    let prompt = [1u32, 415, 5279, 302, 4843, 349, 264, 1486].map(|t| t % vocab);
    let mut out = vec![m.forward(0, 0, &prompt).unwrap_or_else(|e| panic!("{e}")).to_vec()];
    for i in 0..4 {
        let last = out.last().expect("a step");
        let id = purehw_conformance::argmax(last) as u32;
        out.push(m.forward(0, prompt.len() + i, &[id]).unwrap_or_else(|e| panic!("{e}")).to_vec());
    }
    out
}

/// Logits with the smallest budget (nothing pinned, one layer read ahead) and with one that
/// pins some layers equal the whole model's, bit for bit. The backends' stats after decoding,
/// whole and with the smallest budget, and what a budget must hold.
fn check_same_logits<B: Backend>(path: &std::path::Path, act: ActQuant, make: impl Fn() -> B) -> (Stats, Stats, Needs) {
    let src = open(path);
    let o = opts(act);
    let mut m = Model::load(make(), &src, o).unwrap_or_else(|e| panic!("{e}"));
    let whole = run(&mut m);
    let whole_stats = m.backend().stats();
    drop(m);
    let n = needs(make(), &src, o);
    let layers = src.config.layers;
    let mut least_stats = None;
    for (budget, plan) in [(n.least(), (0, 1)), (n.least() + 4 * n.layer, (3, 2))] {
        let mut m = Model::load_with_budget(make(), &src, o, Some(budget)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.streaming(), Some(plan), "budget {budget} of {n:?}, {layers} layers");
        assert_same_logits(&run(&mut m), &whole, &format!("budget {budget}"));
        least_stats.get_or_insert_with(|| m.backend().stats());
    }
    // A budget that holds every layer streams nothing.
    let all = n.fixed() + layers * n.layer;
    let m = Model::load_with_budget(make(), &src, o, Some(all)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.streaming(), None);
    (whole_stats, least_stats.expect("the smallest budget ran"), n)
}

/// Every step's logits bit for bit equal (`what` names the streamed run).
fn assert_same_logits(streamed: &[Vec<f32>], whole: &[Vec<f32>], what: &str) {
    for (step, (a, b)) in streamed.iter().zip(whole).enumerate() {
        if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
            panic!("{what}: step {step} logit {i}: streamed {} whole {}", a[i], b[i]);
        }
    }
}

#[test]
fn gemma3_cpu_streamed_logits_equal_whole() {
    check_same_logits(&gemma3(), ActQuant::Int8, || matrix::cpu(2));
}

#[test]
fn smollm2_cpu_streamed_logits_equal_whole() {
    check_same_logits(&smollm2(), ActQuant::Int8, || matrix::cpu(2));
}

/// On a device that shares memory with the host (lavapipe in CI), Vulkan computes on the file's
/// pages in place, so it streams them as the CPU backends do.
#[test]
fn gemma3_vulkan_streamed_logits_equal_whole() {
    if vulkan_in_place("gemma3_vulkan_streamed_logits_equal_whole") {
        check_same_logits(&gemma3(), ActQuant::Int8, matrix::vulkan);
    }
}

/// A device present and using the weights in place (a discrete GPU copies them).
fn vulkan_in_place(test: &str) -> bool {
    if !matrix::vulkan_present(test) {
        return false;
    }
    let in_place = matrix::vulkan().weights_in_place();
    if !in_place {
        eprintln!("{test}: SKIPPED, the Vulkan device copies weights (a discrete GPU)");
    }
    in_place
}

/// Where Vulkan copies weights (a discrete GPU; here lavapipe told to copy), streamed layers take
/// turns in device buffers of its own, each copied in before its layer runs: the logits are the
/// whole model's, and the device holds far less than the whole model's copies.
#[test]
fn gemma3_vulkan_copied_streamed_logits_equal_whole() {
    if !matrix::vulkan_present("gemma3_vulkan_copied_streamed_logits_equal_whole") {
        return;
    }
    assert!(!matrix::vulkan_copying().weights_in_place());
    let (whole, least, n) = check_same_logits(&gemma3(), ActQuant::Int8, matrix::vulkan_copying);
    let used = |s: Stats| s.memory_used.expect("device memory in use");
    let (whole, streamed) = (used(whole), used(least));
    let layers = open(&gemma3()).config.layers;
    eprintln!("device memory after decoding: streamed {streamed}, whole {whole} ({n:?})");
    // Two slots instead of every layer (each slot a little larger for alignment).
    assert!(streamed + ((layers - 3) * n.layer) as u64 <= whole, "streamed {streamed}, whole {whole}, {n:?}");
}

/// A compressed-tensors checkpoint (codes, scales and zero points: three parts a matrix) streams
/// too: on the CPU, and on Vulkan copying every part into the slots.
#[test]
fn int_checkpoint_streamed_logits_equal_whole() {
    let path = purehw_conformance::fixtures_dir().join("compressed-tensors/w4a16-g32-asym");
    smallest_budget_same_logits(&path, || matrix::cpu(2));
    if matrix::vulkan_present("int_checkpoint_streamed_logits_equal_whole") {
        smallest_budget_same_logits(&path, matrix::vulkan_copying);
    }
}

/// The logits with the smallest budget `make`'s backend accepts equal the whole model's.
fn smallest_budget_same_logits<B: Backend>(path: &std::path::Path, make: impl Fn() -> B) {
    let (src, o) = (open(path), opts(ActQuant::F32));
    let whole = run(&mut Model::load(make(), &src, o).unwrap_or_else(|e| panic!("{e}")));
    let budget = needs(make(), &src, o).least();
    let mut m = Model::load_with_budget(make(), &src, o, Some(budget)).unwrap_or_else(|e| panic!("{e}"));
    assert!(m.streaming().is_some());
    assert_same_logits(&run(&mut m), &whole, &format!("budget {budget}"));
}

/// A backend that copies its weights and cannot stream them refuses a budget at load, saying
/// why, instead of holding more than the budget.
#[test]
fn a_backend_that_copies_weights_refuses_a_budget() {
    let src = open(&smollm2());
    let n = needs(CpuRef::new(), &src, opts(ActQuant::F32));
    let e = match Model::load_with_budget(Copying(CpuRef::new()), &src, opts(ActQuant::F32), Some(n.least())) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a budget was accepted by a backend that copies its weights"),
    };
    for part in ["memory budget", "does neither", "cpu-ref"] {
        assert!(e.contains(part), "{part:?} not in {e:?}");
    }
}

/// `CpuRef` claiming to copy its weights.
struct Copying(CpuRef);

impl purehw_hal::ErrorType for Copying {
    type Error = <CpuRef as purehw_hal::ErrorType>::Error;
}

impl Backend for Copying {
    type Buffer = <CpuRef as Backend>::Buffer;
    type Weight = <CpuRef as Backend>::Weight;
    fn name(&self) -> &str {
        self.0.name()
    }
    fn supports(&self, op: purehw_hal::OpKind) -> bool {
        self.0.supports(op)
    }
    fn alloc(&mut self, len: usize) -> Result<Self::Buffer, Self::Error> {
        self.0.alloc(len)
    }
    fn load_weight(&mut self, w: &purehw_hal::HostWeight) -> Result<Self::Weight, Self::Error> {
        self.0.load_weight(w)
    }
    fn write(&mut self, dst: purehw_hal::View<Self::Buffer>, src: &[f32]) -> Result<(), Self::Error> {
        self.0.write(dst, src)
    }
    fn read(&mut self, src: purehw_hal::View<Self::Buffer>, dst: &mut [f32]) -> Result<(), Self::Error> {
        self.0.read(src, dst)
    }
    fn submit(
        &mut self,
        step: &purehw_hal::Step<'_>,
        ops: &[purehw_hal::Op<Self::Buffer, Self::Weight>],
    ) -> Result<(), Self::Error> {
        self.0.submit(step, ops)
    }
    fn weights_in_place(&self) -> bool {
        false
    }
}

#[test]
fn gemma3_cpu_ref_streamed_logits_equal_whole() {
    check_same_logits(&gemma3(), ActQuant::F32, CpuRef::new);
}

#[test]
fn smollm2_cpu_ref_streamed_logits_equal_whole() {
    check_same_logits(&smollm2(), ActQuant::F32, CpuRef::new);
}

#[test]
fn too_small_a_budget_is_an_error_naming_the_numbers() {
    let src = open(&smollm2());
    let o = opts(ActQuant::F32);
    let n = needs(CpuRef::new(), &src, o);
    assert!(n.shared > 0 && n.kv_cache > 0 && n.buffers > 0 && n.layer > 0, "{n:?}");
    // The KV cache counts: 2 (keys, values) × layers × ctx × kv_heads·head_dim × 4 bytes.
    let c = &src.config;
    assert_eq!(n.kv_cache, 2 * c.layers * 64 * c.kv_heads * c.head_dim * 4);
    let budget = n.least() - 1;
    let e = match Model::load_with_budget(CpuRef::new(), &src, o, Some(budget)) {
        Err(e) => e,
        Ok(_) => panic!("budget {budget} below {} accepted", n.least()),
    };
    let msg = e.to_string();
    for part in [
        budget.to_string(),
        n.least().to_string(),
        format!("shared weights {}", n.shared),
        format!("KV cache {}", n.kv_cache),
        format!("two decoder layers of {}", n.layer),
    ] {
        assert!(msg.contains(&part), "{part:?} not in {msg:?}");
    }
    assert!(Model::load_with_budget(CpuRef::new(), &src, o, Some(n.least())).is_ok());
}

/// `Rss` (bytes) of the mapping holding `addr`, from /proc/self/smaps: the pages of the model's
/// file this process has mapped in. Unlike the process's VmRSS it does not move with the heap,
/// other tests' threads or the page cache.
fn mapping_rss(addr: usize) -> usize {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            inside = (a..b).contains(&addr);
        } else if inside && let Some(kb) = line.strip_prefix("Rss:") {
            return kb.trim().trim_end_matches("kB").trim().parse::<usize>().expect("Rss in kB") * 1024;
        }
    }
    panic!("no mapping holds {addr:#x}")
}

/// After a decode with the smallest budget, the model's file is resident only as far as the
/// budget allows (shared weights, the layer computing, the one read ahead), with slack for the
/// file's header (read at open), a page at each end of each layer's ranges and one more layer
/// (a prefetch the background thread may be part-way through); loaded whole, it is all
/// resident, far above that bound.
#[cfg(target_os = "linux")]
fn check_resident_pages<B: Backend>(make: impl Fn() -> B) {
    let path = smollm2();
    let o = opts(ActQuant::Int8);
    let src = open(&path);
    let n = needs(make(), &src, o);
    let mut m = Model::load_with_budget(make(), &src, o, Some(n.least())).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.streaming(), Some((0, 1)));
    run(&mut m);
    let embd = src.weight(Role::TokenEmbd, None).expect("embedding").expect("embedding");
    let (file, _) = embd.data.owner();
    // Everything before the first tensor's data is the header (metadata, vocabulary).
    let header_bytes = first_tensor_offset(&src);
    let slack = header_bytes + src.config.layers * 2 * 2 * 4096 + (1 << 20);
    let bound = n.shared + 3 * n.layer + slack;
    let rss = mapping_rss(file.as_ptr() as usize);
    assert!(rss <= bound, "streamed: {rss} bytes of the file resident, bound {bound} ({n:?}, slack {slack})");

    let src_whole = open(&path);
    let mut whole = Model::load(make(), &src_whole, o).unwrap_or_else(|e| panic!("{e}"));
    run(&mut whole);
    let embd = src_whole.weight(Role::TokenEmbd, None).expect("embedding").expect("embedding");
    let rss_whole = mapping_rss(embd.data.owner().0.as_ptr() as usize);
    assert!(rss_whole > bound + 8 * n.layer, "whole: {rss_whole} bytes resident, streamed bound {bound}");
    eprintln!("file pages resident after decoding: streamed {rss} (bound {bound}), whole {rss_whole}");
}

#[test]
#[cfg(target_os = "linux")]
fn resident_file_pages_stay_within_the_budget() {
    check_resident_pages(|| matrix::cpu(2));
}

/// The same on Vulkan where it imports the file: the device's weights are those pages.
#[test]
#[cfg(target_os = "linux")]
fn vulkan_resident_file_pages_stay_within_the_budget() {
    if vulkan_in_place("vulkan_resident_file_pages_stay_within_the_budget") {
        check_resident_pages(matrix::vulkan);
    }
}

/// Where the first tensor's bytes start in the file: what lies before is the header.
fn first_tensor_offset(src: &ModelSource) -> usize {
    let c = &src.config;
    let mut first = usize::MAX;
    for l in 0..c.layers {
        for role in [Role::AttnQ, Role::AttnK, Role::AttnV, Role::AttnOut, Role::FfnGate, Role::FfnUp, Role::FfnDown] {
            if let Ok(Some(w)) = src.weight(role, Some(l)) {
                first = first.min(w.data.owner().1.start);
            }
        }
    }
    for role in [Role::TokenEmbd, Role::Output, Role::OutputNorm] {
        if let Ok(Some(w)) = src.weight(role, None) {
            first = first.min(w.data.owner().1.start);
        }
    }
    first
}

/// A streamed decode step allocates nothing either (per-layer submissions, prefetch requests
/// through a bounded channel, residency calls).
#[test]
fn streamed_decode_step_allocates_nothing() {
    let src = open(&smollm2());
    let o = opts(ActQuant::Int8);
    let n = needs(matrix::cpu(2), &src, o);
    let mut m = Model::load_with_budget(matrix::cpu(2), &src, o, Some(n.least())).unwrap_or_else(|e| panic!("{e}"));
    assert!(m.streaming().is_some());
    m.forward(0, 0, &[1, 10, 20, 30]).unwrap();
    m.forward(0, 4, &[40]).unwrap(); // warm-up: the first decode-shaped step
    let info = allocation_counter::measure(|| {
        for p in 5..12 {
            let l = m.forward(0, p, &[p as u32]).unwrap();
            assert!(l[0].is_finite());
        }
    });
    assert_eq!(info.count_total, 0, "streamed decode allocated: {info:?}");
}

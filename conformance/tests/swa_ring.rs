//! A sliding-window layer's KV cache holds only its window: a ring of `window + max_batch - 1`
//! rows per slot (`ModelOptions::swa_ring`). Generating far past the window, in prompt chunks and
//! batched decode steps over two slots, gives bit for bit the logits of the same model with
//! every layer's cache `ctx` long, on every backend. And prefix reuse asks whether the ring
//! still holds what the next query sees.

use purehw_conformance::golden::{prompt, run};
use purehw_conformance::{fixture, golden, matrix, model_file};
use purehw_core::model::ModelOptions;
use purehw_core::source::ModelSource;
use purehw_hal::KvType;
use purehw_hal::{ActQuant, Backend, Op, SeqSpan, Step, View};
use purehw_hal_cpu_ref::CpuRef;

/// The tiny random Gemma 3 (6 layers, window 16).
fn tiny() -> ModelSource {
    golden::open(&fixture("tiny-gemma3"))
}

/// Gemma 3 270M with its window cut to 12 (a 512-position one would need long runs).
fn gemma3_270m() -> ModelSource {
    let mut src = golden::open(&model_file("gemma3-270m", "gemma-3-270m-q4_k_m.gguf"));
    src.config.sliding_window = 12;
    src
}

/// The ring model against the full-cache one, on fresh backends from `make`.
fn check<B: Backend>(src: &ModelSource, act: ActQuant, mut make: impl FnMut() -> B, prompt_len: usize, decode: usize) {
    let opts = ModelOptions { ctx: 128, slots: 2, max_batch: 8, logit_rows: 8, act, swa_ring: true, kv: KvType::F32 };
    let mut ring = golden::load(make(), src, opts);
    let mut full = golden::load(make(), src, ModelOptions { swa_ring: false, ..opts });
    let window = src.config.sliding_window;
    assert_eq!(ring.kv_ring(), Some(window + 8 - 1));
    assert_eq!(full.kv_ring(), None);
    assert!(ring.kv_bytes() < full.kv_bytes(), "{} vs {}", ring.kv_bytes(), full.kv_bytes());
    assert!(prompt_len + decode > 3 * (window + 7), "the run must wrap the ring several times");
    let (got, want) = (run(&mut ring, prompt_len, decode), run(&mut full, prompt_len, decode));
    let name = ring.backend().name().to_string();
    assert_eq!(got.len(), want.len());
    assert!(want.iter().all(|x| x.is_finite()));
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        let vocab = ring.config().vocab;
        panic!(
            "{name} {act:?}: logit row {} column {}: ring {:e}, full cache {:e}",
            i / vocab,
            i % vocab,
            got[i],
            want[i]
        );
    }
}

#[test]
fn cpu_ref_tiny_gemma3() {
    check(&tiny(), ActQuant::F32, CpuRef::new, 45, 40);
}

#[test]
fn cpu_tiny_gemma3_1_2_7_threads() {
    for threads in [1, 2, 7] {
        check(&tiny(), ActQuant::F32, || matrix::cpu(threads), 45, 40);
    }
}

#[test]
fn cpu_gemma3_270m_both_modes() {
    check(&gemma3_270m(), ActQuant::F32, || matrix::cpu(2), 40, 24);
    check(&gemma3_270m(), ActQuant::Int8, || matrix::cpu(2), 40, 24);
}

#[test]
fn vulkan_tiny_gemma3_and_gemma3_270m() {
    if !matrix::vulkan_present("vulkan_tiny_gemma3_and_gemma3_270m") {
        return;
    }
    check(&tiny(), ActQuant::F32, matrix::vulkan, 45, 40);
    check(&gemma3_270m(), ActQuant::Int8, matrix::vulkan, 40, 24);
    let m = purehw_hal_vulkan::validation_messages();
    assert!(m.is_empty(), "{} validation-layer messages:\n{}", m.len(), m.join("\n"));
}

/// Prefix reuse with a ring: a slot that went on far past a prefix no longer holds the window
/// before it, so neither going on from it in place nor copying it out is allowed (an error, not
/// wrong keys); a slot that has not gone that far still serves it, bit for bit.
#[test]
fn prefix_reuse_needs_the_window_still_in_the_ring() {
    let src = tiny();
    let opts = ModelOptions {
        ctx: 128,
        slots: 3,
        max_batch: 8,
        logit_rows: 8,
        act: ActQuant::F32,
        swa_ring: true,
        kv: KvType::F32,
    };
    let mut m = golden::load(CpuRef::new(), &src, opts);
    let (vocab, window) = (m.config().vocab, src.config.sliding_window);
    let ring = m.kv_ring().unwrap();
    assert_eq!(ring, 23);
    let long = prompt(60, vocab, 4);
    let rest = prompt(4, vocab, 5);
    let prefix = 30;

    // The logits of prefix + rest computed from scratch, in slot 2.
    let mut want = Vec::new();
    m.forward(2, 0, &long[..prefix]).unwrap();
    m.forward_all(2, prefix, &rest, &mut want).unwrap();

    // Slot 0 holds 0..30 and can go on from 30, or from any prefix whose last window it holds.
    m.forward(0, 0, &long[..prefix]).unwrap();
    assert_eq!(m.kv_resumable(0, prefix), prefix);
    assert!(m.kv_holds(0, prefix - ring..prefix) && !m.kv_holds(0, prefix - ring - 1..prefix));
    // 30 - 23 = 7: the ring lost positions 0..7, so a prefix of 20 (needing 4..20) is gone, one
    // of 23 (needing 7..23) is not.
    assert_eq!(m.kv_resumable(0, 20), 0);
    assert_eq!(m.kv_resumable(0, 23), 23);
    // Copying 0..30 out of slot 0 is fine: it holds 14..30.
    m.copy_kv(0, 1, 0..prefix).unwrap();
    let mut got = Vec::new();
    m.forward_all(1, prefix, &rest, &mut got).unwrap();
    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "copied prefix");

    // Slot 0 goes on to 60: positions before 37 are overwritten. Position 30's window (14..30)
    // is gone: no reuse in place, and copying it out is an error that copies nothing.
    m.forward(0, prefix, &long[prefix..]).unwrap();
    assert!(long.len() - prefix > ring - window);
    assert_eq!(m.kv_resumable(0, prefix), 0);
    let e = m.copy_kv(0, 1, 0..prefix).unwrap_err().to_string();
    assert!(e.contains("no longer holds"), "{e}");
    // Slot 1 still holds its copy: going on from it still gives the from-scratch logits.
    let mut again = Vec::new();
    m.forward_all(1, prefix, &rest, &mut again).unwrap();
    assert!(again.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "slot 1 after the refused copy");
    // A prefix whose window slot 0 still holds (50 needs 34..50, it holds 37..60: no; 55 needs
    // 39..55: yes) is served.
    assert_eq!(m.kv_resumable(0, 50), 0);
    assert_eq!(m.kv_resumable(0, 55), 55);
    m.copy_kv(0, 2, 0..55).unwrap();
    let mut from_copy = Vec::new();
    m.forward_all(2, 55, &rest, &mut from_copy).unwrap();
    let mut scratch = Vec::new();
    m.forward(1, 0, &long[..55]).unwrap();
    m.forward_all(1, 55, &rest, &mut scratch).unwrap();
    assert!(from_copy.iter().zip(&scratch).all(|(a, b)| a.to_bits() == b.to_bits()), "copied 0..55");
    assert!(from_copy.iter().all(|x| x.is_finite()));
}

/// The real Gemma 3 270M's KV cache: 18 layers of one 256-wide kv head, 15 of them sliding
/// (window 512): a ring of 639 rows instead of `ctx`.
#[test]
fn gemma3_270m_kv_bytes() {
    let c = golden::open(&model_file("gemma3-270m", "gemma-3-270m-q4_k_m.gguf")).config;
    assert_eq!((c.layers, c.kv_heads, c.head_dim, c.sliding_window), (18, 1, 256, 512));
    let row = 2 * 4 * 256;
    for ctx in [4096, 32_768] {
        let o = ModelOptions { ctx, ..ModelOptions::default() };
        assert_eq!(o.kv_ring(&c), Some(639));
        assert_eq!(ModelOptions { swa_ring: false, ..o }.kv_bytes(&c), 18 * ctx * row);
        assert_eq!(o.kv_bytes(&c), (3 * ctx + 15 * 639) * row);
    }
}

/// A ring too short for what a step's queries see, or one without a window, is the op
/// contract's error on every backend (`hal::check`), never a panic or wrong numbers.
fn short_ring_errors<B: Backend>(mut b: B) {
    let name = b.name().to_string();
    let buf = b.alloc(4096).unwrap();
    let seqs = [SeqSpan { row: 0, len: 4, cache_row: 0, pos0: 30, ring_row: 0 }];
    let (tokens, positions) = ([0u32; 4], [30u32, 31, 32, 33]);
    let step = Step { tokens: &tokens, positions: &positions, seqs: &seqs };
    let attn = |window, ring| Op::Attention {
        out: View::new(buf, 0),
        q: View::new(buf, 100),
        k: View::new(buf, 200),
        v: View::new(buf, 400),
        heads: 1,
        kv_heads: 1,
        head_dim: 8,
        scale: 1.0,
        window,
        softcap: 0.0,
        ring,
        kv: KvType::F32,
    };
    for (op, want) in [
        (attn(5, 7), "ring too short"),
        (attn(0, 16), "needs a sliding window"),
        (
            Op::StoreKv { cache: View::new(buf, 0), src: View::new(buf, 100), width: 8, ring: 3, kv: KvType::F32 },
            "more rows in one step",
        ),
    ] {
        let e = b.submit(&step, &[op]).expect_err("a bad ring must be refused").to_string();
        assert!(e.contains(want), "{name}: {e}");
    }
    b.submit(&step, &[attn(5, 8)]).unwrap();
    b.finish().unwrap();
}

#[test]
fn a_short_ring_is_an_error_on_every_backend() {
    short_ring_errors(CpuRef::new());
    short_ring_errors(matrix::cpu(2));
    if matrix::vulkan_present("a_short_ring_is_an_error_on_every_backend") {
        short_ring_errors(matrix::vulkan());
    }
}

//! A decode step allocates nothing once the model is loaded and warmed up.

use purehw_conformance::{fixture, golden};
use purehw_core::model::ModelOptions;
use purehw_hal_cpu_ref::CpuRef;

#[test]
fn decode_step_allocates_nothing() {
    let src = golden::open(&fixture("tiny-gemma3"));
    let opts = ModelOptions { ctx: 64, slots: 2, max_batch: 8, logit_rows: 2 };
    let mut m = golden::load(CpuRef::new(), &src, opts);
    m.forward(0, 0, &[2, 10, 20, 30]).unwrap();
    m.forward(0, 4, &[40]).unwrap(); // warm-up: first decode-shaped step
    let info = allocation_counter::measure(|| {
        for p in 5..12 {
            let l = m.forward(0, p, &[p as u32]).unwrap();
            assert!(l[0].is_finite());
        }
    });
    assert_eq!(info.count_total, 0, "single-sequence decode allocated: {info:?}");

    // A batched decode step over two slots, too.
    m.forward(1, 0, &[2, 7]).unwrap();
    use purehw_core::model::SeqInput;
    let batch =
        |p: usize| [SeqInput { slot: 0, pos: p, tokens: &[3] }, SeqInput { slot: 1, pos: p - 10, tokens: &[4] }];
    m.forward_batch(&batch(12)).unwrap();
    let info = allocation_counter::measure(|| {
        for p in 13..20 {
            m.forward_batch(&batch(p)).unwrap();
        }
    });
    assert_eq!(info.count_total, 0, "batched decode allocated: {info:?}");
}

//! Steps submitted ahead (`Backend::submit_ahead`): each step embeds the id the last one's
//! argmax left on the device (`Op::EmbedIds`), two run at once, and each one's read comes back
//! in order from `wait_ahead`.

use purehw_hal::{Backend, Format, HostBytes, HostWeight, Op, SeqSpan, Step, View};
use purehw_hal_vulkan::{Vulkan, VulkanOptions};

#[test]
fn steps_ahead_feed_their_argmax_on() {
    let mut vk = Vulkan::new(&VulkanOptions::from_env()).unwrap_or_else(|e| panic!("{e}"));
    // Row r of the table peaks at column (3r + 1) mod 8: the argmax after id r is 3r + 1.
    let n = 8;
    let table: Vec<u8> =
        (0..n * n).flat_map(|i| if i % n == (3 * (i / n) + 1) % n { 1.0f32 } else { 0.0 }.to_le_bytes()).collect();
    let table = vk.load_weight(&HostWeight::new(Format::F32, n, n, HostBytes::from_vec(table)).unwrap()).unwrap();
    let (x, ids) = (vk.alloc(n).unwrap(), vk.alloc(1).unwrap());
    vk.write(View::new(ids, 0), &[2.0]).unwrap();
    let ops = [
        Op::EmbedIds { out: View::new(x, 0), table, scale: 1.0, ids: View::new(ids, 0) },
        Op::Argmax { out: View::new(ids, 0), x: View::new(x, 0), rows: 1, cols: n },
    ];
    let seqs = [SeqSpan { row: 0, len: 1, cache_row: 0, pos0: 0, ring_row: 0 }];
    let step = Step { tokens: &[0], positions: &[0], seqs: &seqs };
    let reads = [(View::new(ids, 0), 1)];
    let mut want = 2u32;
    let mut next = || {
        want = (3 * want + 1) % n as u32;
        want as f32
    };
    let mut got = [0.0f32];
    assert!(vk.submit_ahead(&step, &ops, &reads).unwrap(), "lavapipe and GPUs run steps ahead");
    for _ in 0..6 {
        assert!(vk.submit_ahead(&step, &ops, &reads).unwrap());
        // A third step ahead must wait for the oldest.
        assert!(vk.submit_ahead(&step, &ops, &reads).is_err());
        vk.wait_ahead(&mut [&mut got]).unwrap();
        assert_eq!(got[0], next());
    }
    vk.wait_ahead(&mut [&mut got]).unwrap();
    assert_eq!(got[0], next());
    // Nothing is left ahead; the buffer holds the last id.
    assert!(vk.wait_ahead(&mut [&mut got]).is_err());
    let mut last = [0.0f32];
    vk.read(View::new(ids, 0), &mut last).unwrap();
    assert_eq!(last[0], got[0]);
    let m = purehw_hal_vulkan::validation_messages();
    assert!(m.is_empty(), "{} validation-layer messages:\n{}", m.len(), m.join("\n"));
}

use half::f16;
use purehw_hal::{Backend, Format, HostBytes, HostWeight, Op, Step, View};
use purehw_hal_vulkan::{Vulkan, VulkanOptions};

#[test]
#[ignore]
fn mm_speed() {
    let mut b = Vulkan::new(&VulkanOptions::from_env()).unwrap();
    let step = Step { tokens: &[0], positions: &[0], seqs: &[] };
    for (fmt, rows, cols, n) in [(Format::Q8_0, 65536usize, 640usize, 1usize), (Format::Q5_0, 2048, 640, 1), (Format::Q5_0, 2048, 640, 16)] {
        let rb = fmt.bytes_for(cols).unwrap();
        let mut bytes: Vec<u8> = (0..rows * rb).map(|i| (i * 7 + 3) as u8).collect();
        for blk in bytes.chunks_exact_mut(fmt.block_bytes()) {
            blk[0..2].copy_from_slice(&f16::from_f32(0.02).to_le_bytes());
        }
        let w = HostWeight::new(fmt, rows, cols, HostBytes::from_vec(bytes)).unwrap();
        let wid = b.load_weight(&w).unwrap();
        let x = b.alloc(n * cols).unwrap();
        let xq = b.alloc(n * cols / 32 * 10).unwrap();
        let out = b.alloc(n * rows).unwrap();
        let layout = fmt.act_layout().unwrap();
        let ops = [
            Op::QuantizeAct { out: View::new(xq, 0), x: View::new(x, 0), rows: n, cols, layout },
            Op::MatMulQ8 { out: View::new(out, 0), xq: View::new(xq, 0), w: wid, n },
        ];
        let mut r = vec![0f32; 1];
        for i in 0..3 {
            let t = std::time::Instant::now();
            b.submit_read(&step, &ops, &mut [(View::new(out, 0), &mut r[..])]).unwrap();
            eprintln!("{fmt:?} {rows}x{cols} n={n}: {:?} ({i})", t.elapsed());
        }
    }
}

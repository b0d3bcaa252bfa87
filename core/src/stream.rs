//! Layer streaming: a model loaded with a weight budget keeps the weights every token uses
//! resident and moves decoder layers in and out around the step that uses them.
//!
//! The budget is split once at load ([`Plan::new`]): the shared weights (embeddings, LM head,
//! norms), the KV cache and the activations come first; what is left holds whole layers. Of those
//! slots, one is the layer being computed, up to [`MAX_AHEAD`] are layers read ahead, and the rest
//! pin the first layers for good (each pinned layer is one layer less to read per token). Before a
//! streamed layer runs, the next ones are prefetched; after it ran, it is released. Residency
//! goes through the weights' owners ([`HostBytes::prefetch`] / [`HostBytes::release`]: `madvise`
//! on a file's map, nothing for bytes in a `Vec`), so the bytes a backend reads never change, only
//! whether they are in memory.
//!
//! Under `std` the prefetches run on a background thread (fed through a bounded channel, so
//! asking neither blocks nor allocates); without `std` they run inline.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use purehw_hal::HostBytes;

use crate::{Error, Result};

/// Most layers read ahead of the one computing. Two hide a layer's read behind the next one's
/// compute; more slots are better spent pinning layers, which are then never read again.
pub const MAX_AHEAD: usize = 2;

/// Gap (bytes) between two tensors of a layer that residency calls cover as one range: a file's
/// alignment padding (GGUF aligns to 32 bytes by default; safetensors packs tightly).
const MERGE_GAP: usize = 64;

/// What the budget must hold, in bytes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Needs {
    /// Weights every token reads: embeddings, LM head, norms.
    pub shared: usize,
    /// Every layer's KV cache, for every slot and position.
    pub kv_cache: usize,
    /// Activations and logits.
    pub buffers: usize,
    /// The largest decoder layer's weights.
    pub layer: usize,
}

/// How a budget is spent.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Every layer fits: nothing moves, the step runs as without a budget.
    Resident,
    /// Layers `0..pinned` stay; the others are streamed, `ahead` of them read ahead of use.
    Stream { pinned: usize, ahead: usize },
}

impl Needs {
    /// What stays resident whatever the budget: shared weights, KV cache, activations.
    pub fn fixed(&self) -> usize {
        self.shared.saturating_add(self.kv_cache).saturating_add(self.buffers)
    }

    /// The smallest budget: [`fixed`](Self::fixed) and two layers (the one computing and the
    /// next, read meanwhile).
    pub fn least(&self) -> usize {
        self.fixed().saturating_add(self.layer.saturating_mul(2))
    }
}

impl Plan {
    /// Split `budget` bytes for a model of `layers` layers needing `n`; [`Error::Budget`] when
    /// it is below [`Needs::least`].
    pub fn new(budget: usize, layers: usize, n: Needs) -> Result<Plan> {
        if budget < n.least() {
            return Err(Error::Budget { budget, needs: n });
        }
        let fixed = n.fixed();
        let slots = (budget - fixed) / n.layer.max(1);
        if slots >= layers {
            return Ok(Plan::Resident);
        }
        let ahead = (slots - 1).min(MAX_AHEAD);
        Ok(Plan::Stream { pinned: slots - 1 - ahead, ahead })
    }
}

/// The byte ranges of each layer's streamed weights, merged where they touch.
pub struct LayerSpans(Vec<Vec<HostBytes>>);

impl LayerSpans {
    /// From each layer's weight parts (codes, scales, zero points), in any order.
    pub fn new(layers: Vec<Vec<HostBytes>>) -> LayerSpans {
        LayerSpans(layers.into_iter().map(merge).collect())
    }

    /// Bytes of layer `l`'s weights (the merged ranges, padding included).
    pub fn bytes(&self, l: usize) -> usize {
        self.0.get(l).map_or(0, |s| s.iter().map(HostBytes::len).sum())
    }

    fn prefetch(&self, l: usize) {
        self.0.get(l).into_iter().flatten().for_each(HostBytes::prefetch);
    }

    fn release(&self, l: usize) {
        self.0.get(l).into_iter().flatten().for_each(HostBytes::release);
    }
}

/// Sort ranges by owner and start, and merge neighbours of one owner.
fn merge(mut parts: Vec<HostBytes>) -> Vec<HostBytes> {
    // Same owner first (its bytes' address), then by place in it.
    parts.sort_by_key(|b| {
        let (all, r) = b.owner();
        (all.as_ptr() as usize, r.start)
    });
    let mut out: Vec<HostBytes> = Vec::with_capacity(parts.len());
    for p in parts {
        match out.last().and_then(|last| last.merged(&p, MERGE_GAP)) {
            Some(m) => *out.last_mut().expect("merged with the last") = m,
            None => out.push(p),
        }
    }
    out
}

/// Moves layers in and out around the step: [`before`](Streamer::before) a layer runs, the next
/// streamed layers are prefetched; [`after`](Streamer::after), it is released unless pinned.
pub struct Streamer {
    spans: Arc<LayerSpans>,
    layers: usize,
    pinned: usize,
    ahead: usize,
    /// Streamed layers begun so far: the `d`-th streamed layer after the one running now
    /// begins at `ticks + d`, so a prefetch that comes too late is skipped.
    ticks: Arc<AtomicUsize>,
    prefetcher: Prefetcher,
}

impl Streamer {
    /// Start streaming `spans` by `plan` (which must be [`Plan::Stream`]); asks for the first
    /// streamed layers at once.
    pub fn new(spans: LayerSpans, pinned: usize, ahead: usize) -> Result<Streamer> {
        let layers = spans.0.len();
        let spans = Arc::new(spans);
        let ticks = Arc::new(AtomicUsize::new(0));
        let prefetcher = Prefetcher::new(spans.clone(), ticks.clone(), layers)?;
        let s = Streamer { spans, layers, pinned, ahead, ticks, prefetcher };
        for (d, l) in (pinned..layers).take(ahead).enumerate() {
            s.prefetcher.ask(Ask { layer: l, due: d + 1 });
        }
        Ok(s)
    }

    /// Layers `0..pinned` stay resident; the rest stream.
    pub fn pinned(&self) -> usize {
        self.pinned
    }

    /// Layers read ahead of the one computing.
    pub fn ahead(&self) -> usize {
        self.ahead
    }

    /// Layer `l` is about to run: ask for the `ahead` streamed layers after it (wrapping to the
    /// next step's first ones).
    pub fn before(&self, l: usize) {
        if l < self.pinned {
            return;
        }
        let now = self.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        let n = self.layers - self.pinned;
        let j = l - self.pinned;
        for d in 1..=self.ahead {
            self.prefetcher.ask(Ask { layer: self.pinned + (j + d) % n, due: now + d });
        }
    }

    /// Layer `l` has run: give its memory back unless it is pinned.
    pub fn after(&self, l: usize) {
        if l >= self.pinned {
            self.spans.release(l);
        }
    }
}

/// A prefetch request: `layer`, which begins when the streamer's ticks reach `due`.
#[derive(Copy, Clone, Debug)]
#[cfg_attr(not(feature = "std"), allow(dead_code))]
struct Ask {
    layer: usize,
    due: usize,
}

/// Runs prefetches off the computing thread.
#[cfg(feature = "std")]
struct Prefetcher {
    tx: Option<std::sync::mpsc::SyncSender<Ask>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[cfg(feature = "std")]
impl Prefetcher {
    fn new(spans: Arc<LayerSpans>, ticks: Arc<AtomicUsize>, layers: usize) -> Result<Prefetcher> {
        // Room for every layer: a request is dropped only when that many are already waiting.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Ask>(layers.max(1));
        let thread = std::thread::Builder::new()
            .name("purehw-prefetch".into())
            .spawn(move || {
                while let Ok(a) = rx.recv() {
                    // A layer already begun faults in as it is used (and may be released by now:
                    // reading it again would only hold memory past the budget).
                    if ticks.load(Ordering::Relaxed) < a.due {
                        spans.prefetch(a.layer);
                    }
                }
            })
            .map_err(|e| Error::Invalid(alloc::format!("starting the layer prefetch thread: {e}")))?;
        Ok(Prefetcher { tx: Some(tx), thread: Some(thread) })
    }

    /// Queue a request without waiting (a full queue drops it: the layer then faults in as used).
    fn ask(&self, a: Ask) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(a);
        }
    }
}

#[cfg(feature = "std")]
impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.tx = None; // ends the thread's loop
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Without threads, prefetches run inline (the owners of `no_std` bytes ignore them anyway).
#[cfg(not(feature = "std"))]
struct Prefetcher(Arc<LayerSpans>);

#[cfg(not(feature = "std"))]
impl Prefetcher {
    fn new(spans: Arc<LayerSpans>, _ticks: Arc<AtomicUsize>, _layers: usize) -> Result<Prefetcher> {
        Ok(Prefetcher(spans))
    }

    fn ask(&self, a: Ask) {
        self.0.prefetch(a.layer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    const N: Needs = Needs { shared: 1000, kv_cache: 200, buffers: 100, layer: 50 };

    #[test]
    fn too_small_a_budget_names_every_number() {
        let e = Plan::new(1399, 10, N).unwrap_err().to_string();
        for part in
            ["1399", "1400", "shared weights 1000", "KV cache 200", "activations 100", "two decoder layers of 50"]
        {
            assert!(e.contains(part), "{part:?} not in {e:?}");
        }
        assert_eq!(Plan::new(1400, 10, N).unwrap(), Plan::Stream { pinned: 0, ahead: 1 });
    }

    #[test]
    fn spare_slots_read_ahead_then_pin() {
        assert_eq!(Plan::new(1450, 10, N).unwrap(), Plan::Stream { pinned: 0, ahead: 2 });
        assert_eq!(Plan::new(1600, 10, N).unwrap(), Plan::Stream { pinned: 3, ahead: 2 });
        assert_eq!(Plan::new(1300 + 9 * 50 + 49, 10, N).unwrap(), Plan::Stream { pinned: 6, ahead: 2 });
        assert_eq!(Plan::new(1300 + 10 * 50, 10, N).unwrap(), Plan::Resident);
    }

    #[test]
    fn neighbouring_ranges_of_one_owner_merge() {
        let owner: Arc<dyn purehw_hal::ByteOwner> = Arc::new(alloc::vec![0u8; 1000]);
        let other: Arc<dyn purehw_hal::ByteOwner> = Arc::new(alloc::vec![0u8; 1000]);
        let b = |o: &Arc<dyn purehw_hal::ByteOwner>, r| HostBytes::from_owner(o.clone(), r, false).unwrap();
        let spans = LayerSpans::new(alloc::vec![alloc::vec![
            b(&owner, 500..600),
            b(&owner, 0..100),
            b(&owner, 132..200), // 32 bytes of padding after 0..100
            b(&other, 0..10),
            b(&owner, 300..400), // 100 bytes away: apart
        ]]);
        let mut got: Vec<_> = spans.0[0].iter().map(|h| h.owner().1).collect();
        got.sort_by_key(|r| (r.start, r.end));
        assert_eq!(got, [0..10, 0..200, 300..400, 500..600]);
    }
}

//! Counters and histograms the engine and the HTTP layer update, rendered in the Prometheus text
//! format at `GET /metrics`. Lock-free except the per-route request table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

/// A fixed-bucket histogram of seconds.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if s <= *b {
                c.fetch_add(1, Relaxed);
            }
        }
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{b}\"}} {}", c.load(Relaxed));
        }
        let n = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum{{{}}} {}",
            labels.trim_end_matches(','),
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{}}} {n}", labels.trim_end_matches(','));
    }
}

const TTFT: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const ITL: &[f64] = &[0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28];
const E2E: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Everything `/metrics` reports for one served model.
pub struct Stats {
    /// Jobs accepted but not yet in a KV slot.
    pub queue_depth: AtomicUsize,
    /// Sequences in KV slots.
    pub active: AtomicUsize,
    /// KV-cache positions in use, over all slots.
    pub kv_used: AtomicUsize,
    /// KV-cache positions in all (slots × context).
    pub kv_capacity: AtomicUsize,
    /// Bytes of KV cache and activations the backend holds (its device memory).
    pub backend_bytes: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub finished: AtomicU64,
    pub cancelled: AtomicU64,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            queue_depth: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            kv_used: AtomicUsize::new(0),
            kv_capacity: AtomicUsize::new(0),
            backend_bytes: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            ttft: Histogram::new(TTFT),
            itl: Histogram::new(ITL),
            e2e: Histogram::new(E2E),
        }
    }
}

/// HTTP requests by route and status, over all models.
#[derive(Default)]
pub struct Requests(Mutex<BTreeMap<(String, u16), u64>>);

impl Requests {
    pub fn count(&self, route: &str, status: u16) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((route.to_string(), status)).or_insert(0) += 1;
    }
}

/// The whole `/metrics` page.
pub fn render(requests: &Requests, models: &[(&str, &str, &Stats)]) -> String {
    let mut out = String::new();
    out.push_str(
        "# HELP purehw_requests_total HTTP requests by route and status.\n# TYPE purehw_requests_total counter\n",
    );
    for ((route, status), n) in requests.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = writeln!(out, "purehw_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
    }
    let gauge = |out: &mut String, name: &str, help: &str, kind: &str, f: &dyn Fn(&Stats) -> f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (model, backend, s) in models {
            let _ = writeln!(out, "{name}{{model=\"{model}\",backend=\"{backend}\"}} {}", f(s));
        }
    };
    gauge(&mut out, "purehw_prompt_tokens_total", "Prompt tokens processed.", "counter", &|s| {
        s.prompt_tokens.load(Relaxed) as f64
    });
    gauge(&mut out, "purehw_generation_tokens_total", "Tokens generated.", "counter", &|s| {
        s.completion_tokens.load(Relaxed) as f64
    });
    gauge(&mut out, "purehw_requests_finished_total", "Generations finished.", "counter", &|s| {
        s.finished.load(Relaxed) as f64
    });
    gauge(&mut out, "purehw_requests_cancelled_total", "Generations cancelled by a disconnect.", "counter", &|s| {
        s.cancelled.load(Relaxed) as f64
    });
    gauge(&mut out, "purehw_queue_depth", "Requests waiting for a KV-cache slot.", "gauge", &|s| {
        s.queue_depth.load(Relaxed) as f64
    });
    gauge(&mut out, "purehw_running_sequences", "Sequences decoding in the batch.", "gauge", &|s| {
        s.active.load(Relaxed) as f64
    });
    gauge(&mut out, "purehw_kv_cache_used_ratio", "KV-cache positions in use / capacity.", "gauge", &|s| {
        s.kv_used.load(Relaxed) as f64 / s.kv_capacity.load(Relaxed).max(1) as f64
    });
    gauge(&mut out, "purehw_kv_cache_used_tokens", "KV-cache positions in use.", "gauge", &|s| {
        s.kv_used.load(Relaxed) as f64
    });
    gauge(
        &mut out,
        "purehw_backend_memory_bytes",
        "Memory the backend holds (KV cache and activations).",
        "gauge",
        &|s| s.backend_bytes.load(Relaxed) as f64,
    );
    for (model, backend, s) in models {
        let labels = format!("model=\"{model}\",backend=\"{backend}\",");
        s.ttft.render(&mut out, "purehw_time_to_first_token_seconds", "Time to first token.", &labels);
        s.itl.render(&mut out, "purehw_inter_token_latency_seconds", "Time between streamed tokens.", &labels);
        s.e2e.render(&mut out, "purehw_request_duration_seconds", "Time from accept to last token.", &labels);
    }
    out
}

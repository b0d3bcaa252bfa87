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
const STEP: &[f64] = &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// The backend computing for a model and what it last said of its device
/// (`Backend::stats` after each step). `None` where the backend does not tell.
#[derive(Clone, Debug, Default)]
pub struct Device {
    /// `cpu`, `vulkan`, ... (changes when a lost device falls back to another backend).
    pub backend: String,
    pub name: Option<String>,
    pub memory_used: Option<u64>,
    pub memory_budget: Option<u64>,
}

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
    /// Of the prompt tokens, those a slot's KV cache already held (prompt caching).
    pub prompt_tokens_cached: AtomicU64,
    /// Of the prompt tokens, those computed.
    pub prompt_tokens_computed: AtomicU64,
    /// Of the cached prompt tokens, those copied from another slot's KV cache on the device.
    pub prompt_tokens_copied: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub finished: AtomicU64,
    pub cancelled: AtomicU64,
    /// Times the device was lost (each followed by loading the model again).
    pub device_lost: AtomicU64,
    pub device: Mutex<Device>,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    /// Device time per step, where the backend measures it (timestamp queries).
    pub step_device: Histogram,
    /// Wall time of each step's forward pass (submission to results, the host's view).
    pub step: Histogram,
    /// Steps run, and the sequences they carried (the mean batch is their ratio).
    pub steps: AtomicU64,
    pub step_rows: AtomicU64,
}

impl Stats {
    /// The backend now computing, and what it says of its device.
    pub fn set_backend(&self, name: &str, s: &purehw_hal::Stats) {
        let mut d = self.device.lock().unwrap_or_else(|e| e.into_inner());
        d.backend = name.to_string();
        d.name = s.device.clone();
        d.memory_used = s.memory_used;
        d.memory_budget = s.memory_budget;
    }

    /// After a step of `rows` sequences whose forward pass took `wall`: that, the device's
    /// memory and the step's device time.
    pub fn observe_step(&self, s: &purehw_hal::Stats, rows: usize, wall: Duration) {
        self.step.observe(wall);
        self.steps.fetch_add(1, Relaxed);
        self.step_rows.fetch_add(rows as u64, Relaxed);
        self.observe_device(s);
    }

    /// The device's memory and its last step's time (after a run of steps whose device times
    /// came back together).
    pub fn observe_device(&self, s: &purehw_hal::Stats) {
        if let Some(t) = s.last_step_seconds.and_then(|t| Duration::try_from_secs_f64(t).ok()) {
            self.step_device.observe(t);
        }
        if s.device.is_none() && s.memory_used.is_none() && s.memory_budget.is_none() {
            return;
        }
        let mut d = self.device.lock().unwrap_or_else(|e| e.into_inner());
        if d.name != s.device {
            d.name = s.device.clone();
        }
        d.memory_used = s.memory_used;
        d.memory_budget = s.memory_budget;
    }

    /// The backend's name, for labels.
    pub fn backend(&self) -> String {
        self.device.lock().unwrap_or_else(|e| e.into_inner()).backend.clone()
    }
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
            prompt_tokens_cached: AtomicU64::new(0),
            prompt_tokens_computed: AtomicU64::new(0),
            prompt_tokens_copied: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            device_lost: AtomicU64::new(0),
            device: Mutex::new(Device::default()),
            ttft: Histogram::new(TTFT),
            itl: Histogram::new(ITL),
            e2e: Histogram::new(E2E),
            step_device: Histogram::new(STEP),
            step: Histogram::new(STEP),
            steps: AtomicU64::new(0),
            step_rows: AtomicU64::new(0),
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
    gauge(
        &mut out,
        "purehw_prompt_tokens_cached_total",
        "Prompt tokens whose K/V a slot already held (prompt caching): not computed.",
        "counter",
        &|s| s.prompt_tokens_cached.load(Relaxed) as f64,
    );
    gauge(&mut out, "purehw_prompt_tokens_computed_total", "Prompt tokens computed.", "counter", &|s| {
        s.prompt_tokens_computed.load(Relaxed) as f64
    });
    gauge(
        &mut out,
        "purehw_prompt_tokens_copied_total",
        "Cached prompt tokens copied from another slot's KV cache on the device (counted in cached too).",
        "counter",
        &|s| s.prompt_tokens_copied.load(Relaxed) as f64,
    );
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
    gauge(&mut out, "purehw_steps_total", "Engine steps run.", "counter", &|s| s.steps.load(Relaxed) as f64);
    gauge(
        &mut out,
        "purehw_step_sequences_total",
        "Sequences the steps carried, summed (over purehw_steps_total: the mean batch).",
        "counter",
        &|s| s.step_rows.load(Relaxed) as f64,
    );
    gauge(
        &mut out,
        "purehw_backend_memory_bytes",
        "Memory the backend holds (KV cache and activations).",
        "gauge",
        &|s| s.backend_bytes.load(Relaxed) as f64,
    );
    gauge(
        &mut out,
        "purehw_device_lost_total",
        "Times the device was lost and the model loaded again.",
        "counter",
        &|s| s.device_lost.load(Relaxed) as f64,
    );
    for (model, backend, s) in models {
        let labels = format!("model=\"{model}\",backend=\"{backend}\",");
        s.ttft.render(&mut out, "purehw_time_to_first_token_seconds", "Time to first token.", &labels);
        s.itl.render(&mut out, "purehw_inter_token_latency_seconds", "Time between streamed tokens.", &labels);
        s.e2e.render(&mut out, "purehw_request_duration_seconds", "Time from accept to last token.", &labels);
        s.step.render(
            &mut out,
            "purehw_step_seconds",
            "Wall time of each engine step's forward pass (submission to results).",
            &labels,
        );
    }
    // Per device, where the backend tells (the CPU backends do not).
    let devices: Vec<(String, Device, &Stats)> = models
        .iter()
        .filter_map(|(model, backend, s)| {
            let d = s.device.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let name = d.name.as_deref()?;
            Some((format!("model=\"{model}\",backend=\"{backend}\",device=\"{}\",", escape(name)), d, *s))
        })
        .collect();
    let device_gauge = |out: &mut String, name: &str, help: &str, f: &dyn Fn(&Device) -> Option<u64>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, d, _) in &devices {
            if let Some(v) = f(d) {
                let _ = writeln!(out, "{name}{{{}}} {v}", labels.trim_end_matches(','));
            }
        }
    };
    device_gauge(
        &mut out,
        "purehw_device_memory_used_bytes",
        "Device memory the backend holds (weights, KV cache, activations).",
        &|d| d.memory_used,
    );
    device_gauge(&mut out, "purehw_device_memory_budget_bytes", "Device memory there is.", &|d| d.memory_budget);
    for (labels, _, s) in &devices {
        s.step_device.render(
            &mut out,
            "purehw_step_device_seconds",
            "Device time per step (timestamp queries).",
            labels,
        );
    }
    out
}

/// A label value in the text format: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

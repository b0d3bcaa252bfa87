//! The page at `/` (one static file built into the binary: a chat box and live plots of the
//! server) and `/v1/stats`, the JSON snapshot it polls. No CDN, no build step: the page's only
//! requests go back to this server, which its Content-Security-Policy also enforces.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;

const INDEX: &str = include_str!("../../static/index.html");

/// Nothing but this server may be reached: scripts and styles are the page's own inline ones.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'";

pub async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX,
    )
        .into_response()
}

/// Counters and gauges of every served model, with the server's clock (the page turns counter
/// differences into rates).
pub async fn stats(State(st): State<Arc<AppState>>) -> Json<Value> {
    let time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let models: Vec<Value> = st
        .models
        .iter()
        .map(|m| {
            let s = &m.engine.stats;
            let d = s.device.lock().unwrap_or_else(|e| e.into_inner()).clone();
            json!({
                "id": m.id,
                "backend": d.backend,
                "device": d.name,
                "memory_used": d.memory_used,
                "memory_budget": d.memory_budget,
                "running": s.active.load(Relaxed),
                "queued": s.queue_depth.load(Relaxed),
                "kv_used": s.kv_used.load(Relaxed),
                "kv_capacity": s.kv_capacity.load(Relaxed),
                "prompt_tokens": s.prompt_tokens.load(Relaxed),
                "cached_prompt_tokens": s.prompt_tokens_cached.load(Relaxed),
                "computed_prompt_tokens": s.prompt_tokens_computed.load(Relaxed),
                "copied_prompt_tokens": s.prompt_tokens_copied.load(Relaxed),
                "completion_tokens": s.completion_tokens.load(Relaxed),
                "finished": s.finished.load(Relaxed),
                "cancelled": s.cancelled.load(Relaxed),
            })
        })
        .collect();
    Json(json!({ "object": "stats", "time": time, "models": models }))
}

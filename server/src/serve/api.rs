//! The HTTP layer: OpenAI-compatible routes over the engines.
//!
//! [`app`] builds the router (no socket, so tests drive it with `oneshot`); [`run`] binds it and
//! serves until SIGINT/SIGTERM. Request bodies are read as bytes and parsed here, so every client
//! mistake (bad JSON, a wrong field, a body over the limit) is a 4xx in OpenAI's
//! `{"error": {"message", "type", "param", "code"}}` shape, never a 500 or a panic.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures_util::stream;
use purehw_core::sampling::SamplingParams;
use purehw_core::tokenizer::Tokenizer;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::engine::{Event, Finish, GenParams, Job, Loaded, SubmitError, TokenLogprob};
use super::json_guard::JsonGuard;
use super::json_schema::Schema;
use super::tools::{self, ForcedStream, ToolCall, ToolStream};
use super::{AppState, ServedModel, metrics};
use crate::error::{CliError, CliResult};

type Obj = Map<String, Value>;

/// How long running streams may go on after a shutdown signal.
const GRACE: Duration = Duration::from_secs(10);
/// Most stop strings a request may give.
const MAX_STOP: usize = 16;
/// Most alternatives per position for logprobs.
const MAX_TOP_LOGPROBS: i128 = 20;

// ---------------------------------------------------------------------------------------------
// Errors

/// Every failure a client sees, as OpenAI's `{"error": {...}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub type_: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, type_: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), type_, param: None, code: None, retry_after: None }
    }

    /// 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the offending parameter.
    pub fn param(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.into()), ..Self::invalid(message) }
    }

    pub fn server(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    fn unavailable(message: impl Into<String>, code: &'static str, retry_after: u64) -> Self {
        ApiError {
            code: Some(code),
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable_error", message)
        }
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.type_, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

type ApiResult<T = Response> = Result<T, ApiError>;

// ---------------------------------------------------------------------------------------------
// Router, middleware, serving

/// What the middleware knows of a request; handlers read it as an extension.
#[derive(Clone, Debug)]
struct ReqCtx {
    id: String,
    start: Instant,
    method: Method,
    route: &'static str,
}

/// What a handler reports for the request's log line (a response extension).
#[derive(Clone, Debug, Default)]
struct ReqLog {
    model: String,
    prompt_tokens: usize,
    /// Of the prompt tokens, those taken from the KV cache.
    cached_tokens: usize,
    completion_tokens: usize,
    /// The stream logs itself when it ends.
    streamed: bool,
}

/// The router, with state; no socket.
pub fn app(state: Arc<AppState>) -> Router {
    let limit = state.max_body;
    Router::new()
        .route("/", get(super::page::index))
        .route("/v1/stats", get(super::page::stats))
        .route("/health", get(health))
        .route("/metrics", get(metrics_page))
        .route("/v1/models", get(list_models))
        .route("/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/models/{id}", get(get_model))
        .route("/v1/chat/completions", post(chat))
        .route("/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), around))
        .with_state(state)
}

/// Bind, serve, and on SIGINT/SIGTERM stop accepting and let running streams finish (up to
/// [`GRACE`]).
pub async fn run(state: Arc<AppState>, host: &str, port: u16) -> CliResult {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .map_err(|e| CliError(format!("cannot listen on {host}:{port}: {e}")))?;
    let shown = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
    let port = listener.local_addr().map_or(port, |a| a.port());
    tracing::info!("listening on http://{shown}:{port}");
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let st = state.clone();
    let shutdown = async move {
        shutdown_signal().await;
        tracing::info!("shutting down: no new requests; running ones get up to {} s", GRACE.as_secs());
        for m in &st.models {
            m.engine.stop_accepting();
        }
        let _ = tx.send(true);
    };
    let server = axum::serve(listener, app(state)).with_graceful_shutdown(shutdown);
    let grace = async move {
        if rx.wait_for(|v| *v).await.is_ok() {
            tokio::time::sleep(GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = server.into_future() => r.map_err(|e| CliError(format!("serving on {shown}:{port}: {e}")))?,
        () = grace => tracing::warn!("requests still running after {} s; closing them", GRACE.as_secs()),
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// The metrics label of a path: its route, or `other` (so unknown URLs cannot grow the table).
fn route_of(path: &str) -> &'static str {
    const ROUTES: [&str; 14] = [
        "/",
        "/v1/stats",
        "/health",
        "/metrics",
        "/v1/models",
        "/models",
        "/v1/chat/completions",
        "/chat/completions",
        "/v1/completions",
        "/completions",
        "/tokenize",
        "/detokenize",
        "/v1/models/{id}",
        "/models/{id}",
    ];
    let path = if path.len() > 1 { path.trim_end_matches('/') } else { path };
    if let Some(r) = ROUTES.iter().find(|r| **r == path) {
        return r;
    }
    if path.strip_prefix("/v1/models/").is_some_and(|r| !r.is_empty() && !r.contains('/')) {
        return "/v1/models/{id}";
    }
    if path.strip_prefix("/models/").is_some_and(|r| !r.is_empty() && !r.contains('/')) {
        return "/models/{id}";
    }
    "other"
}

/// Request id, auth, the per-route counter and the one log line per request.
async fn around(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let ctx =
        ReqCtx { id: new_id(), start: Instant::now(), method: req.method().clone(), route: route_of(req.uri().path()) };
    // The page itself is open (it asks for the key); everything it then fetches is not.
    let open = matches!(ctx.route, "/" | "/health" | "/metrics");
    // Logs and counts the request if the client goes away before the response (hyper then drops
    // this future): status 499, as nginx logs it.
    let mut pending = Pending { ctx: ctx.clone(), state: state.clone(), done: false };
    let mut resp = match &state.api_key {
        Some(key) if !open && !authorized(key, req.headers()) => {
            let msg = if req.headers().contains_key(header::AUTHORIZATION) {
                "Incorrect API key provided."
            } else {
                "You didn't provide an API key. Send it as `Authorization: Bearer KEY`."
            };
            ApiError {
                code: Some("invalid_api_key"),
                ..ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", msg)
            }
            .into_response()
        }
        _ => {
            req.extensions_mut().insert(ctx.clone());
            next.run(req).await
        }
    };
    pending.done = true;
    let status = resp.status().as_u16();
    state.requests.count(ctx.route, status);
    let log = resp.extensions().get::<ReqLog>().cloned().unwrap_or_default();
    if !log.streamed {
        tracing::info!(
            id = %ctx.id,
            method = %ctx.method,
            route = ctx.route,
            model = %log.model,
            status,
            prompt_tokens = log.prompt_tokens,
            cached_tokens = log.cached_tokens,
            completion_tokens = log.completion_tokens,
            latency_ms = ctx.start.elapsed().as_millis() as u64,
            "request"
        );
    }
    if let Ok(v) = HeaderValue::from_str(&ctx.id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// See [`around`].
struct Pending {
    ctx: ReqCtx,
    state: Arc<AppState>,
    done: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let c = &self.ctx;
        self.state.requests.count(c.route, 499);
        tracing::info!(
            id = %c.id,
            method = %c.method,
            route = c.route,
            status = 499u16,
            latency_ms = c.start.elapsed().as_millis() as u64,
            "request cancelled: the client went away"
        );
    }
}

/// `Authorization: Bearer KEY`, compared in constant time.
fn authorized(key: &str, headers: &HeaderMap) -> bool {
    let Some(given) = headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes) else { return false };
    let given = given.strip_prefix(b"Bearer ").or_else(|| given.strip_prefix(b"bearer ")).unwrap_or(b"");
    let want = key.as_bytes();
    given.len() == want.len() && given.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("Unknown request URL: {method} {}. Please check the URL for typos.", uri.path()),
    )
    .code("unknown_url")
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("Method {method} is not allowed for {}.", uri.path()),
    )
    .code("method_not_allowed")
}

// ---------------------------------------------------------------------------------------------
// Small helpers

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Different on every call: the clock mixed with a counter.
pub(super) fn fresh_u64() -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    splitmix(nanos ^ splitmix(COUNTER.fetch_add(1, Relaxed)))
}

fn new_id() -> String {
    format!("{:016x}", fresh_u64())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A field, with `null` counted as absent.
fn field<'a>(o: &'a Obj, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

fn get_bool(o: &Obj, k: &str, name: &str) -> ApiResult<Option<bool>> {
    match field(o, k) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(ApiError::param(name, format!("{name} must be a boolean, got {}", kind(v)))),
    }
}

fn get_num(o: &Obj, k: &str) -> ApiResult<Option<f64>> {
    match field(o, k) {
        None => Ok(None),
        Some(v) => {
            v.as_f64().map(Some).ok_or_else(|| ApiError::param(k, format!("{k} must be a number, got {}", kind(v))))
        }
    }
}

/// A number in `[lo, hi]` (`lo` excluded when `open_lo`).
fn get_ranged(o: &Obj, k: &str, lo: f64, hi: f64, open_lo: bool) -> ApiResult<Option<f32>> {
    let Some(x) = get_num(o, k)? else { return Ok(None) };
    let ok = if open_lo { x > lo } else { x >= lo } && x <= hi;
    if !ok {
        let l = if open_lo { "(" } else { "[" };
        return Err(ApiError::param(k, format!("{k} must be in {l}{lo}, {hi}], got {x}")));
    }
    Ok(Some(x as f32))
}

/// An integer (also an integral float such as `5.0`), any i64 or u64.
fn as_int(v: &Value) -> Option<i128> {
    v.as_i64()
        .map(i128::from)
        .or_else(|| v.as_u64().map(i128::from))
        .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15).map(|f| f as i128))
}

fn get_int(o: &Obj, k: &str) -> ApiResult<Option<i128>> {
    match field(o, k) {
        None => Ok(None),
        Some(v) => as_int(v)
            .map(Some)
            .ok_or_else(|| ApiError::param(k, format!("{k} must be an integer, got {}", describe(v)))),
    }
}

/// `kind(v)`, with the value itself for numbers.
fn describe(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        _ => kind(v).to_string(),
    }
}

fn to_usize(x: i128) -> usize {
    usize::try_from(x).unwrap_or(usize::MAX)
}

/// The body as a JSON object, whatever the Content-Type.
fn parse_body(st: &AppState, body: Result<Bytes, BytesRejection>) -> ApiResult<Obj> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("request body is larger than the limit of {} bytes", st.max_body),
            )
            .code("request_too_large")
        } else {
            ApiError::invalid(format!("could not read the request body: {}", r.body_text()))
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid("the request body is empty; expected a JSON object"));
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(v) => Err(ApiError::invalid(format!("the request body must be a JSON object, got {}", kind(&v)))),
        Err(e) => Err(ApiError::invalid(format!("the request body is not valid JSON: {e}"))),
    }
}

/// The model a request names; with one model served, `model` may be left out.
fn resolve_model<'a>(st: &'a AppState, o: &Obj) -> ApiResult<&'a ServedModel> {
    let served = || st.models.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(", ");
    match field(o, "model") {
        None => match st.models.as_slice() {
            [m] => Ok(m),
            _ => Err(ApiError::param("model", format!("you must provide a model parameter (served: {})", served()))),
        },
        Some(Value::String(s)) if s.is_empty() && st.models.len() == 1 => Ok(&st.models[0]),
        Some(Value::String(s)) => st.model(s).ok_or_else(|| model_not_found(s, &served())),
        Some(v) => Err(ApiError::param("model", format!("model must be a string, got {}", kind(v)))),
    }
}

fn model_not_found(id: &str, served: &str) -> ApiError {
    ApiError {
        param: Some("model".into()),
        code: Some("model_not_found"),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{id}` does not exist (served: {served})"),
        )
    }
}

/// The loaded model, or 503 while it loads or after it failed.
fn ready(m: &ServedModel) -> ApiResult<Arc<Loaded>> {
    if let Some(l) = m.engine.loaded.get() {
        return Ok(l.clone());
    }
    if let Some(e) = m.engine.failed.get() {
        return Err(ApiError::unavailable(format!("model {} failed to load: {e}", m.id), "model_unavailable", 60));
    }
    Err(ApiError::unavailable(format!("Loading model {}", m.id), "model_loading", 5))
}

// ---------------------------------------------------------------------------------------------
// Request parsing

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Text,
}

/// The options common to both generation routes.
struct Options {
    params: GenParams,
    stream: bool,
    include_usage: bool,
    /// Completions: the prompt's text comes before the generated text.
    echo: bool,
}

fn parse_options(o: &Obj, kind_: Kind) -> ApiResult<Options> {
    let mut s = SamplingParams { temperature: 1.0, ..SamplingParams::default() };
    if let Some(t) = get_ranged(o, "temperature", 0.0, 2.0, false)? {
        s.temperature = t;
    }
    if let Some(p) = get_ranged(o, "top_p", 0.0, 1.0, true)? {
        s.top_p = p;
    }
    if let Some(p) = get_ranged(o, "min_p", 0.0, 1.0, false)? {
        s.min_p = p;
    }
    if let Some(k) = get_int(o, "top_k")? {
        if k < 0 {
            return Err(ApiError::param("top_k", format!("top_k must be >= 0, got {k}")));
        }
        s.top_k = to_usize(k);
    }
    if let Some(p) = get_ranged(o, "presence_penalty", -2.0, 2.0, false)? {
        s.presence_penalty = p;
    }
    if let Some(p) = get_ranged(o, "frequency_penalty", -2.0, 2.0, false)? {
        s.frequency_penalty = p;
    }
    if let Some(p) = get_num(o, "repetition_penalty")? {
        if !(p > 0.0 && p <= 1e6) {
            return Err(ApiError::param("repetition_penalty", format!("repetition_penalty must be > 0, got {p}")));
        }
        s.repetition_penalty = p as f32;
    }
    s.seed = match field(o, "seed") {
        None => fresh_u64(),
        Some(v) => match (v.as_u64(), v.as_i64()) {
            (Some(u), _) => u,
            (None, Some(i)) => i as u64,
            _ => return Err(ApiError::param("seed", format!("seed must be an integer, got {}", describe(v)))),
        },
    };
    s.validate().map_err(|m| ApiError::param(m.split(' ').next().unwrap_or(""), m))?;

    let mut max_tokens = None;
    for k in ["max_tokens", "max_completion_tokens"] {
        if let Some(n) = get_int(o, k)? {
            if n < 1 {
                return Err(ApiError::param(k, format!("{k} must be at least 1, got {n}")));
            }
            max_tokens = Some(to_usize(n));
        }
    }
    let stop = match field(o, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            if a.len() > MAX_STOP {
                return Err(ApiError::param(
                    "stop",
                    format!("stop may have at most {MAX_STOP} strings, got {}", a.len()),
                ));
            }
            a.iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(ApiError::param("stop", format!("stop[{i}] must be a string, got {}", kind(v)))),
                })
                .collect::<ApiResult<Vec<_>>>()?
        }
        Some(v) => {
            return Err(ApiError::param(
                "stop",
                format!("stop must be a string or an array of strings, got {}", kind(v)),
            ));
        }
    }
    .into_iter()
    .filter(|s| !s.is_empty())
    .collect();
    for k in ["n", "best_of"] {
        if let Some(n) = get_int(o, k)?
            && n != 1
        {
            return Err(ApiError::param(k, format!("only {k} = 1 is supported, got {n}")));
        }
    }
    let logit_bias = match field(o, "logit_bias") {
        None => Vec::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                let id = k.trim().parse::<u32>().map_err(|_| {
                    ApiError::param("logit_bias", format!("logit_bias keys must be token ids, got '{k}'"))
                })?;
                let b = v.as_f64().filter(|b| (-100.0..=100.0).contains(b)).ok_or_else(|| {
                    ApiError::param(
                        "logit_bias",
                        format!("logit_bias[\"{k}\"] must be a number in [-100, 100], got {}", describe(v)),
                    )
                })?;
                Ok((id, b as f32))
            })
            .collect::<ApiResult<Vec<_>>>()?,
        Some(v) => {
            return Err(ApiError::param(
                "logit_bias",
                format!("logit_bias must be an object of token id -> bias, got {}", kind(v)),
            ));
        }
    };
    let logprobs = match kind_ {
        Kind::Chat => {
            let on = get_bool(o, "logprobs", "logprobs")?.unwrap_or(false);
            let top = get_int(o, "top_logprobs")?;
            if let Some(k) = top {
                if !(0..=MAX_TOP_LOGPROBS).contains(&k) {
                    return Err(ApiError::param(
                        "top_logprobs",
                        format!("top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {k}"),
                    ));
                }
                if !on {
                    return Err(ApiError::param("top_logprobs", "top_logprobs requires logprobs to be true"));
                }
            }
            on.then(|| top.map_or(0, to_usize))
        }
        // The legacy API: `logprobs` is how many alternatives to return.
        Kind::Text => match field(o, "logprobs") {
            None | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some(0),
            Some(v) => match as_int(v) {
                Some(k) if (0..=MAX_TOP_LOGPROBS).contains(&k) => Some(to_usize(k)),
                _ => {
                    return Err(ApiError::param(
                        "logprobs",
                        format!("logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {}", describe(v)),
                    ));
                }
            },
        },
    };
    let mut schema = None;
    let mut json_mode = match field(o, "response_format") {
        None => false,
        Some(Value::Object(rf)) => match rf.get("type") {
            Some(Value::String(t)) if t == "text" => false,
            Some(Value::String(t)) if t == "json_object" => {
                // llama.cpp's server takes a schema here too.
                if let Some(v) = rf.get("schema") {
                    schema = Some(compile_schema(v, "response_format.schema")?);
                }
                true
            }
            Some(Value::String(t)) if t == "json_schema" => {
                schema = parse_json_schema(rf)?;
                true
            }
            Some(Value::String(t)) => {
                return Err(ApiError::param(
                    "response_format.type",
                    format!("response_format.type must be text, json_object or json_schema, got '{t}'"),
                ));
            }
            _ => return Err(ApiError::param("response_format.type", "response_format.type must be a string")),
        },
        Some(v) => {
            return Err(ApiError::param(
                "response_format",
                format!("response_format must be an object, got {}", kind(v)),
            ));
        }
    };
    // vLLM's `guided_json` and llama.cpp's top-level `json_schema` (a schema, or its JSON text).
    for key in ["guided_json", "json_schema"] {
        let Some(v) = field(o, key) else { continue };
        let parsed;
        let v = match v {
            Value::String(text) => {
                parsed = serde_json::from_str::<Value>(text)
                    .map_err(|e| ApiError::param(key, format!("{key} is not a JSON schema: {e}")))?;
                &parsed
            }
            v => v,
        };
        schema = Some(compile_schema(v, key)?);
        json_mode = true;
    }
    let stream = get_bool(o, "stream", "stream")?.unwrap_or(false);
    let include_usage = match field(o, "stream_options") {
        None => false,
        Some(Value::Object(so)) => get_bool(so, "include_usage", "stream_options.include_usage")?.unwrap_or(false),
        Some(v) => {
            return Err(ApiError::param(
                "stream_options",
                format!("stream_options must be an object, got {}", kind(v)),
            ));
        }
    };
    if let Some(v) = field(o, "user")
        && !v.is_string()
    {
        return Err(ApiError::param("user", format!("user must be a string, got {}", kind(v))));
    }
    let echo = kind_ == Kind::Text && get_bool(o, "echo", "echo")?.unwrap_or(false);
    if echo && logprobs.is_some() {
        return Err(ApiError::param(
            "echo",
            "echo together with logprobs is not supported (prompt logprobs are not computed)",
        ));
    }
    Ok(Options {
        params: GenParams {
            sampling: s,
            max_tokens,
            stop,
            stop_ids: Vec::new(),
            logprobs,
            json: json_mode,
            logit_bias,
            call: Vec::new(),
            schema,
        },
        stream,
        include_usage: stream && include_usage,
        echo,
    })
}

const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];

/// `messages`, checked; `developer` becomes `system` (templates know only the latter).
fn parse_messages(o: &Obj) -> ApiResult<Vec<Value>> {
    let a = match o.get("messages") {
        None | Some(Value::Null) => return Err(ApiError::param("messages", "messages is required")),
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(ApiError::param("messages", format!("messages must be an array of messages, got {}", kind(v))));
        }
    };
    if a.is_empty() {
        return Err(ApiError::param("messages", "messages must not be empty"));
    }
    let mut out = Vec::with_capacity(a.len());
    for (i, m) in a.iter().enumerate() {
        let Value::Object(mo) = m else {
            return Err(ApiError::param(
                format!("messages[{i}]"),
                format!("messages[{i}] must be an object, got {}", kind(m)),
            ));
        };
        let p = |f: &str| format!("messages[{i}].{f}");
        let role = match mo.get("role") {
            Some(Value::String(r)) => r.as_str(),
            None | Some(Value::Null) => return Err(ApiError::param(p("role"), format!("{} is required", p("role")))),
            Some(v) => {
                return Err(ApiError::param(p("role"), format!("{} must be a string, got {}", p("role"), kind(v))));
            }
        };
        if !ROLES.contains(&role) {
            return Err(ApiError::param(
                p("role"),
                format!("{} must be one of {}; got '{role}'", p("role"), ROLES.join(", ")),
            ));
        }
        match mo.get("content") {
            None if role != "assistant" => {
                return Err(ApiError::param(p("content"), format!("{} is required", p("content"))));
            }
            None | Some(Value::Null | Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    let pp = format!("{}[{j}]", p("content"));
                    let Value::Object(po) = part else {
                        return Err(ApiError::param(pp.clone(), format!("{pp} must be an object, got {}", kind(part))));
                    };
                    match po.get("type").and_then(Value::as_str) {
                        Some("text") | None => {
                            if !po.get("text").is_some_and(Value::is_string) {
                                return Err(ApiError::param(
                                    format!("{pp}.text"),
                                    format!("{pp}.text must be a string"),
                                ));
                            }
                        }
                        Some(t) => {
                            return Err(ApiError::param(
                                format!("{pp}.type"),
                                format!("content parts of type '{t}' are not supported: this server takes text only"),
                            ));
                        }
                    }
                }
            }
            Some(v) => {
                return Err(ApiError::param(
                    p("content"),
                    format!("{} must be a string, null or an array of content parts, got {}", p("content"), kind(v)),
                ));
            }
        }
        let mut m = m.clone();
        if role == "developer"
            && let Some(mo) = m.as_object_mut()
        {
            mo.insert("role".into(), Value::String("system".into()));
        }
        out.push(m);
    }
    Ok(out)
}

/// `response_format.json_schema.schema`, compiled (`None` without a schema: any object).
fn parse_json_schema(rf: &Obj) -> ApiResult<Option<Arc<Schema>>> {
    let js = match rf.get("json_schema") {
        None => return Ok(None),
        Some(Value::Object(js)) => js,
        Some(v) => {
            return Err(ApiError::param(
                "response_format.json_schema",
                format!("response_format.json_schema must be an object, got {}", kind(v)),
            ));
        }
    };
    let Some(schema) = js.get("schema") else { return Ok(None) };
    compile_schema(schema, "response_format.json_schema.schema").map(Some)
}

/// One reply schema, compiled; errors name `param`.
fn compile_schema(v: &Value, param: &str) -> ApiResult<Arc<Schema>> {
    Schema::compile(&[Some(v)]).map(Arc::new).map_err(|(_, e)| ApiError::param(param, format!("{param}: {e}")))
}

/// The argument schemas of a forced call's functions (`parameters` of each named tool), compiled
/// with root `i` for `names[i]`.
fn call_schemas(names: &[String], tools: Option<&[Value]>) -> ApiResult<Arc<Schema>> {
    let params = |name: &str| {
        let f = tools?
            .iter()
            .filter_map(|t| t.get("function"))
            .find(|f| f.get("name").and_then(Value::as_str) == Some(name));
        f?.get("parameters")
    };
    let schemas: Vec<Option<&Value>> = names.iter().map(|n| params(n)).collect();
    Schema::compile(&schemas)
        .map(Arc::new)
        .map_err(|(i, e)| ApiError::param("tools", format!("the parameters of tool '{}': {e}", names[i])))
}

/// The functions a reply must call: `tool_choice` (or legacy `function_call`) `"required"` (any
/// of the tools) or a named function; empty for `"auto"`, `"none"` or no choice.
fn parse_tool_choice(o: &Obj, tools: Option<&[Value]>) -> ApiResult<Vec<String>> {
    let (key, choice) = match (field(o, "tool_choice"), field(o, "function_call")) {
        (Some(c), _) => ("tool_choice", c),
        (None, Some(c)) => ("function_call", c),
        (None, None) => return Ok(Vec::new()),
    };
    let names = tools.map(tools::tool_names).unwrap_or_default();
    let wanted = match choice {
        Value::String(s) if s == "auto" || s == "none" => return Ok(Vec::new()),
        Value::String(s) if s == "required" || s == "any" => {
            if names.is_empty() {
                return Err(ApiError::param(key, format!("{key} \"required\" needs tools")));
            }
            names.clone()
        }
        Value::Object(c) => {
            // `{"type": "function", "function": {"name": …}}`, or legacy `{"name": …}`.
            let name = c.get("function").and_then(|f| f.get("name")).or_else(|| c.get("name")).and_then(Value::as_str);
            let Some(name) = name else {
                return Err(ApiError::param(
                    key,
                    format!("{key} must name a function: {{\"type\": \"function\", \"function\": {{\"name\": …}}}}"),
                ));
            };
            if !names.iter().any(|n| n == name) {
                return Err(ApiError::param(key, format!("{key} names '{name}', which is not one of the tools")));
            }
            vec![name.to_string()]
        }
        v => {
            return Err(ApiError::param(
                key,
                format!("{key} must be \"none\", \"auto\", \"required\" or a named function, got {}", describe(v)),
            ));
        }
    };
    if wanted.len() > 64 {
        return Err(ApiError::param(
            key,
            format!("a forced call can choose among at most 64 tools, got {}", wanted.len()),
        ));
    }
    let plain = |n: &str| {
        (1..=64).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    };
    if let Some(bad) = wanted.iter().find(|n| !plain(n)) {
        return Err(ApiError::param(
            "tools",
            format!("function name {bad:?} must be 1 to 64 letters, digits, '_', '-' or '.' to be forced"),
        ));
    }
    Ok(wanted)
}

/// Tool definitions for the template: `tools` (or legacy `functions`), unless `tool_choice` is
/// `none`.
fn parse_tools(o: &Obj) -> ApiResult<Option<Vec<Value>>> {
    let choice_none = matches!(field(o, "tool_choice"), Some(Value::String(s)) if s == "none");
    let tools = match (field(o, "tools"), field(o, "functions")) {
        (Some(Value::Array(t)), _) => t.clone(),
        (Some(v), _) => return Err(ApiError::param("tools", format!("tools must be an array, got {}", kind(v)))),
        (None, Some(Value::Array(f))) => f.iter().map(|f| json!({"type": "function", "function": f})).collect(),
        (None, Some(v)) => {
            return Err(ApiError::param("functions", format!("functions must be an array, got {}", kind(v))));
        }
        (None, None) => return Ok(None),
    };
    Ok((!choice_none && !tools.is_empty()).then_some(tools))
}

/// `/v1/completions`' `prompt`.
enum PromptIn {
    Text(String),
    Ids(Vec<u32>),
}

fn parse_ids(a: &[Value], name: &str) -> ApiResult<Vec<u32>> {
    a.iter()
        .enumerate()
        .map(|(i, v)| {
            as_int(v).and_then(|x| u32::try_from(x).ok()).ok_or_else(|| {
                ApiError::param(name, format!("{name}[{i}] must be a token id (an integer >= 0), got {}", describe(v)))
            })
        })
        .collect()
}

fn parse_prompt(o: &Obj) -> ApiResult<PromptIn> {
    let a = match field(o, "prompt") {
        None => return Err(ApiError::param("prompt", "prompt is required")),
        Some(Value::String(s)) => return Ok(PromptIn::Text(s.clone())),
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(ApiError::param(
                "prompt",
                format!("prompt must be a string, an array of token ids or an array of one string, got {}", kind(v)),
            ));
        }
    };
    match a.as_slice() {
        [] => Err(ApiError::param("prompt", "prompt must not be empty")),
        [Value::String(s)] => Ok(PromptIn::Text(s.clone())),
        [Value::Array(ids)] => Ok(PromptIn::Ids(parse_ids(ids, "prompt")?)),
        [Value::Number(_), ..] => Ok(PromptIn::Ids(parse_ids(a, "prompt")?)),
        _ if a.len() > 1 && a.iter().all(|v| v.is_string() || v.is_array()) => {
            Err(ApiError::param("prompt", "several prompts in one request are not supported; send one per request"))
        }
        _ => Err(ApiError::param("prompt", "prompt must be a string, an array of token ids or an array of one string")),
    }
}

/// Token ids of `text`, with BOS when the model wants it and the text does not start with it.
fn encode(tok: &Tokenizer, text: &str, want_bos: bool) -> ApiResult<Vec<u32>> {
    let bos_piece = tok.bos_id().and_then(|i| tok.token_to_piece(i)).unwrap_or_default();
    let has_bos = !bos_piece.is_empty() && text.starts_with(&bos_piece);
    let add_bos = want_bos && tok.bos_id().is_some() && !has_bos;
    tok.encode(text, add_bos).map_err(|e| ApiError::invalid(format!("cannot tokenize the prompt: {e}")))
}

/// The prompt of a chat request: `messages` (and `tools`, when the template takes them) through
/// the model's chat template, then tokenized. Also the tool names replies are parsed for.
fn chat_prompt(
    model: &ServedModel,
    tok: &Tokenizer,
    messages: &[Value],
    tools: Option<Vec<Value>>,
    add_generation_prompt: bool,
) -> ApiResult<(Vec<u32>, Option<Vec<String>>)> {
    let template = match model.template() {
        Some(Ok(t)) => t,
        Some(Err(e)) => return Err(ApiError::invalid(e.clone()).code("no_chat_template")),
        None => return Err(ready(model).err().unwrap_or_else(|| ApiError::server("model not loaded"))),
    };
    let tools = tools.filter(|_| template.supports_tools());
    let text = template
        .render_lenient(messages, tools.as_deref(), add_generation_prompt)
        .map_err(|e| ApiError::param("messages", e.to_string()))?;
    // Templates usually print `{{ bos_token }}` themselves.
    Ok((encode(tok, &text, tok.add_bos_default())?, tools.as_deref().map(tools::tool_names)))
}

fn check_ids(ids: &[u32], vocab: usize, name: &str) -> ApiResult<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(ApiError::param(name, format!("token id {id} is out of range (vocabulary of {vocab})"))),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Generation routes

async fn chat(
    State(st): State<Arc<AppState>>,
    Extension(rc): Extension<ReqCtx>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(st, rc, body, Kind::Chat).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(
    State(st): State<Arc<AppState>>,
    Extension(rc): Extension<ReqCtx>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(st, rc, body, Kind::Text).await.unwrap_or_else(IntoResponse::into_response)
}

/// What every response chunk repeats.
struct Meta {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    include_usage: bool,
    /// The request's tool names when replies are parsed for tool calls (the request gave tools,
    /// `tool_choice` is not `none` and the template takes tools).
    tools: Option<Vec<String>>,
    /// Completions with `echo`: the prompt's text, sent before the generated text.
    echo: Option<String>,
    /// A forced tool call (`tools` holds its names): the reply is parsed by `tools::parse_forced`.
    forced: bool,
}

async fn generate(st: Arc<AppState>, rc: ReqCtx, body: Result<Bytes, BytesRejection>, kind_: Kind) -> ApiResult {
    let o = parse_body(&st, body)?;
    let model = resolve_model(&st, &o)?;
    let Options { mut params, stream, include_usage, echo } = parse_options(&o, kind_)?;
    enum Input {
        Chat(Vec<Value>, Option<Vec<Value>>),
        Text(PromptIn),
    }
    let input = match kind_ {
        Kind::Chat => {
            let tools = parse_tools(&o)?;
            params.call = parse_tool_choice(&o, tools.as_deref())?;
            if !params.call.is_empty() {
                params.schema = Some(call_schemas(&params.call, tools.as_deref())?);
            }
            Input::Chat(parse_messages(&o)?, tools)
        }
        Kind::Text => Input::Text(parse_prompt(&o)?),
    };
    let loaded = ready(model)?;
    let tok = &*loaded.tokenizer;
    let mut tool_names = None;
    let echo = match (&input, echo) {
        (Input::Text(PromptIn::Text(s)), true) => Some(s.clone()),
        (Input::Text(PromptIn::Ids(ids)), true) => Some(
            tok.decode(ids)
                .map_err(|e| ApiError::param("prompt", format!("cannot decode the prompt to echo it: {e}")))?,
        ),
        _ => None,
    };
    let prompt = match input {
        Input::Chat(messages, tools) => {
            let (ids, names) = chat_prompt(model, tok, &messages, tools, true)?;
            // A forced call is parsed whether or not the template showed the tools.
            tool_names = if params.call.is_empty() { names } else { Some(params.call.clone()) };
            ids
        }
        Input::Text(PromptIn::Text(s)) => encode(tok, &s, tok.add_bos_default())?,
        Input::Text(PromptIn::Ids(ids)) => {
            check_ids(&ids, tok.vocab_size().min(loaded.vocab), "prompt")?;
            ids
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::param("prompt", "the prompt is empty"));
    }
    if prompt.len() >= loaded.ctx {
        return Err(ApiError::param(
            if kind_ == Kind::Chat { "messages" } else { "prompt" },
            format!(
                "this model's maximum context length is {} tokens; the prompt has {} (and at least one token must be generated)",
                loaded.ctx,
                prompt.len()
            ),
        )
        .code("context_length_exceeded"));
    }
    let vocab = tok.vocab_size().min(loaded.vocab);
    if let Some(&(id, _)) = params.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
        return Err(ApiError::param("logit_bias", format!("token id {id} is out of range (vocabulary of {vocab})")));
    }
    if !params.call.is_empty() || params.schema.is_some() {
        let need = JsonGuard::min_tokens(&params.rules());
        let room = loaded.ctx - prompt.len();
        if params.max_tokens.unwrap_or(usize::MAX).min(room) < need {
            let (param, what) = match params.max_tokens {
                Some(m) if m < room => ("max_tokens", format!("max_tokens {m}")),
                _ => (
                    if kind_ == Kind::Chat { "messages" } else { "prompt" },
                    format!("the context left after the prompt ({room} tokens)"),
                ),
            };
            let reply = if params.call.is_empty() { "a reply matching the schema" } else { "a forced tool call" };
            return Err(ApiError::param(
                param,
                format!("{what} is too small for {reply}, which may need {need} tokens"),
            ));
        }
    }
    params.stop_ids = match kind_ {
        Kind::Chat => loaded.stop_ids.clone(),
        Kind::Text => tok.eos_ids().to_vec(),
    };
    let (tx, rx) = unbounded_channel();
    let prompt_len = prompt.len();
    let forced = !params.call.is_empty();
    model.engine.submit(Job { prompt, params, events: tx, accepted: Instant::now() }).map_err(|e| match e {
        SubmitError::QueueFull => ApiError {
            code: Some("rate_limit_exceeded"),
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                format!("model {} is busy: its queue is full; retry shortly", model.id),
            )
        },
        SubmitError::Unavailable => match model.engine.failed.get() {
            Some(e) => {
                ApiError::unavailable(format!("model {} is unavailable: {e}", model.id), "model_unavailable", 60)
            }
            None => ready(model)
                .err()
                .unwrap_or_else(|| ApiError::unavailable("the server is shutting down", "service_unavailable", 5)),
        },
    })?;
    let meta = Meta {
        kind: kind_,
        id: match kind_ {
            Kind::Chat => format!("chatcmpl-{}", rc.id),
            Kind::Text => format!("cmpl-{}", rc.id),
        },
        created: unix_now(),
        model: model.id.clone(),
        fingerprint: format!("purehw-{}-{}", env!("CARGO_PKG_VERSION"), model.backend()),
        include_usage,
        tools: tool_names,
        echo,
        forced,
    };
    if stream { Ok(stream_response(rx, meta, rc, prompt_len)) } else { collect(rx, meta).await }
}

/// A logprob as JSON: finite (OpenAI writes -9999 for impossible tokens).
fn lp(x: f32) -> f64 {
    if x.is_finite() { f64::from(x) } else { -9999.0 }
}

fn chat_logprob(l: &TokenLogprob) -> Value {
    let top: Vec<Value> = l.top.iter().map(|(t, b, p)| json!({"token": t, "logprob": lp(*p), "bytes": b})).collect();
    json!({"token": l.token, "logprob": lp(l.logprob), "bytes": l.bytes, "top_logprobs": top})
}

/// The legacy completions logprobs object, built token by token.
#[derive(Default)]
struct TextLogprobs {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<Value>,
}

impl TextLogprobs {
    fn push(&mut self, l: &TokenLogprob, offset: usize) {
        self.tokens.push(l.token.clone().into());
        self.token_logprobs.push(lp(l.logprob).into());
        let top: Obj = l.top.iter().map(|(t, _, p)| (t.clone(), lp(*p).into())).collect();
        self.top_logprobs.push(Value::Object(top));
        self.text_offset.push(offset.into());
    }

    fn to_json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

/// OpenAI's `usage`: `cached` of the `prompt` tokens came from the KV cache (prompt caching).
fn usage(prompt: usize, cached: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// `finish_reason` of a reply with tool calls: `tool_calls`, unless it ran out of tokens.
fn tool_finish(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "tool_calls",
        Finish::Length => "length",
    }
}

/// A generation's failure: 503 where the device was lost (the engine serves a retry), else 500.
fn engine_error(message: String, unavailable: bool) -> ApiError {
    if unavailable { ApiError::unavailable(message, "device_lost", 1) } else { ApiError::server(message) }
}

/// Wait for the whole generation and answer in one JSON object.
async fn collect(mut rx: UnboundedReceiver<Event>, m: Meta) -> ApiResult {
    let mut text = m.echo.clone().unwrap_or_default();
    let mut chat_lps: Vec<Value> = Vec::new();
    let mut text_lps = TextLogprobs::default();
    let mut any_lp = false;
    let (finish, prompt_tokens, cached_tokens, completion_tokens) = loop {
        match rx.recv().await {
            Some(Event::Token { text: t, logprob }) => {
                if let Some(l) = logprob {
                    any_lp = true;
                    match m.kind {
                        Kind::Chat => chat_lps.push(chat_logprob(&l)),
                        Kind::Text => text_lps.push(&l, text.len()),
                    }
                }
                text.push_str(&t);
            }
            Some(Event::Done { finish, prompt_tokens, cached_tokens, completion_tokens }) => {
                break (finish, prompt_tokens, cached_tokens, completion_tokens);
            }
            Some(Event::Error { message, unavailable }) => return Err(engine_error(message, unavailable)),
            None => return Err(ApiError::server("the engine stopped before the generation finished")),
        }
    };
    let body = match m.kind {
        Kind::Chat => {
            let parsed = m.tools.as_deref().and_then(|names| {
                if m.forced {
                    tools::parse_forced(&text, names).map(|call| tools::Parsed { content: None, calls: vec![call] })
                } else {
                    tools::parse(&text, names)
                }
            });
            let (message, finish) = match parsed {
                Some(p) => (
                    json!({
                        "role": "assistant",
                        "content": p.content,
                        "tool_calls": p.calls.iter().map(ToolCall::to_json).collect::<Vec<_>>(),
                    }),
                    tool_finish(finish),
                ),
                None => (json!({"role": "assistant", "content": text}), finish.as_str()),
            };
            json!({
                "id": m.id,
                "object": "chat.completion",
                "created": m.created,
                "model": m.model,
                "choices": [{
                    "index": 0,
                    "message": message,
                    "logprobs": if any_lp { json!({"content": chat_lps}) } else { Value::Null },
                    "finish_reason": finish,
                }],
                "usage": usage(prompt_tokens, cached_tokens, completion_tokens),
                "system_fingerprint": m.fingerprint,
            })
        }
        Kind::Text => json!({
            "id": m.id,
            "object": "text_completion",
            "created": m.created,
            "model": m.model,
            "choices": [{
                "text": text,
                "index": 0,
                "logprobs": if any_lp { text_lps.to_json() } else { Value::Null },
                "finish_reason": finish.as_str(),
            }],
            "usage": usage(prompt_tokens, cached_tokens, completion_tokens),
            "system_fingerprint": m.fingerprint,
        }),
    };
    let mut r = Json(body).into_response();
    r.extensions_mut().insert(ReqLog {
        model: m.model,
        prompt_tokens,
        cached_tokens,
        completion_tokens,
        streamed: false,
    });
    Ok(r)
}

/// Logs a streamed request when its stream ends or is dropped (the client went away).
struct StreamLog {
    rc: ReqCtx,
    model: String,
    prompt_tokens: usize,
    cached_tokens: usize,
    completion_tokens: usize,
    outcome: &'static str,
}

impl Drop for StreamLog {
    fn drop(&mut self) {
        tracing::info!(
            id = %self.rc.id,
            method = %self.rc.method,
            route = self.rc.route,
            model = %self.model,
            status = 200u16,
            prompt_tokens = self.prompt_tokens,
            cached_tokens = self.cached_tokens,
            completion_tokens = self.completion_tokens,
            latency_ms = self.rc.start.elapsed().as_millis() as u64,
            outcome = self.outcome,
            "request (stream)"
        );
    }
}

/// The state of one SSE stream: engine events in, SSE events out.
struct Streamer {
    rx: UnboundedReceiver<Event>,
    m: Meta,
    queue: VecDeque<SseEvent>,
    ended: bool,
    /// Bytes of text sent so far (completions' `text_offset`).
    offset: usize,
    log: StreamLog,
    /// Holds back text that may be a tool call (when tools are parsed).
    tools: Option<ToolStream>,
    /// A forced call, streamed as it is written.
    forced: Option<ForcedStream>,
}

impl Streamer {
    fn push(&mut self, v: &Value) {
        self.queue.push_back(SseEvent::default().data(v.to_string()));
    }

    /// A chunk whose delta is one `tool_calls` entry.
    fn push_tool_delta(&mut self, d: Value) {
        let mut c = self.chunk(None, Value::Null, Value::Null);
        c["choices"][0]["delta"] = json!({"tool_calls": [d]});
        self.push(&c);
    }

    /// One chunk: `delta` (chat) or `text` (completions).
    fn chunk(&self, content: Option<&str>, logprobs: Value, finish: Value) -> Value {
        let m = &self.m;
        let mut v = match m.kind {
            Kind::Chat => {
                let delta = match content {
                    Some(c) => json!({"content": c}),
                    None => json!({}),
                };
                json!({
                    "id": m.id,
                    "object": "chat.completion.chunk",
                    "created": m.created,
                    "model": m.model,
                    "system_fingerprint": m.fingerprint,
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                })
            }
            Kind::Text => json!({
                "id": m.id,
                "object": "text_completion",
                "created": m.created,
                "model": m.model,
                "system_fingerprint": m.fingerprint,
                "choices": [{"text": content.unwrap_or(""), "index": 0, "logprobs": logprobs, "finish_reason": finish}],
            }),
        };
        if m.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn on_event(&mut self, ev: Option<Event>) {
        match ev {
            Some(Event::Token { text, logprob }) => {
                // About one event per token (`Done` gives the exact count); for the log if the
                // client goes away.
                self.log.completion_tokens += 1;
                if let Some(f) = &mut self.forced {
                    if let Some(d) = f.feed(&text) {
                        self.push_tool_delta(d);
                    }
                    return;
                }
                let text = match &mut self.tools {
                    Some(t) => t.feed(&text),
                    None => text,
                };
                if text.is_empty() && logprob.is_none() {
                    return;
                }
                let lps = match (&logprob, self.m.kind) {
                    (None, _) => Value::Null,
                    (Some(l), Kind::Chat) => json!({"content": [chat_logprob(l)]}),
                    (Some(l), Kind::Text) => {
                        let mut t = TextLogprobs::default();
                        t.push(l, self.offset);
                        t.to_json()
                    }
                };
                self.offset += text.len();
                let c = self.chunk(Some(&text), lps, Value::Null);
                self.push(&c);
            }
            Some(Event::Done { finish: fin, prompt_tokens, cached_tokens, completion_tokens }) => {
                self.log.prompt_tokens = prompt_tokens;
                self.log.cached_tokens = cached_tokens;
                self.log.completion_tokens = completion_tokens;
                self.log.outcome = "done";
                let mut finish = fin.as_str();
                if let Some(mut f) = self.forced.take() {
                    let (last, sent) = f.finish();
                    if let Some(d) = last {
                        self.push_tool_delta(d);
                    }
                    match sent {
                        Ok(()) => finish = tool_finish(fin),
                        Err(text) if !text.is_empty() => {
                            let c = self.chunk(Some(&text), Value::Null, Value::Null);
                            self.push(&c);
                        }
                        Err(_) => {}
                    }
                } else if let Some(mut t) = self.tools.take() {
                    let (rest, calls) = t.finish();
                    if !rest.is_empty() {
                        let c = self.chunk(Some(&rest), Value::Null, Value::Null);
                        self.push(&c);
                    }
                    for (i, call) in calls.iter().enumerate() {
                        self.push_tool_delta(call.to_delta(i));
                    }
                    if !calls.is_empty() {
                        finish = tool_finish(fin);
                    }
                }
                let content = if self.m.kind == Kind::Chat { None } else { Some("") };
                let c = self.chunk(content, Value::Null, finish.into());
                self.push(&c);
                if self.m.include_usage {
                    let mut u = self.chunk(None, Value::Null, Value::Null);
                    u["choices"] = json!([]);
                    u["usage"] = usage(prompt_tokens, cached_tokens, completion_tokens);
                    self.push(&u);
                }
                self.queue.push_back(SseEvent::default().data("[DONE]"));
                self.ended = true;
            }
            Some(Event::Error { message, unavailable }) => {
                self.log.outcome = "error";
                tracing::error!(id = %self.log.rc.id, "generation failed: {message}");
                self.push(&engine_error(message, unavailable).body());
                self.ended = true;
            }
            None => {
                self.log.outcome = "error";
                self.push(&ApiError::server("the engine stopped before the generation finished").body());
                self.ended = true;
            }
        }
    }
}

fn stream_response(rx: UnboundedReceiver<Event>, m: Meta, rc: ReqCtx, prompt_tokens: usize) -> Response {
    let log = StreamLog {
        rc,
        model: m.model.clone(),
        prompt_tokens,
        cached_tokens: 0,
        completion_tokens: 0,
        outcome: "cancelled",
    };
    let model = m.model.clone();
    let forced = m.forced.then(ForcedStream::new);
    let tools = if m.forced { None } else { m.tools.clone().map(ToolStream::new) };
    let mut s = Streamer { rx, m, queue: VecDeque::new(), ended: false, offset: 0, log, tools, forced };
    if s.m.kind == Kind::Chat {
        let mut first = s.chunk(Some(""), Value::Null, Value::Null);
        first["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
        s.push(&first);
    }
    if let Some(e) = s.m.echo.take() {
        s.offset = e.len();
        let c = s.chunk(Some(&e), Value::Null, Value::Null);
        s.push(&c);
    }
    let events = stream::unfold(s, |mut s| async move {
        loop {
            if let Some(e) = s.queue.pop_front() {
                return Some((Ok::<_, Infallible>(e), s));
            }
            if s.ended {
                return None;
            }
            let ev = s.rx.recv().await;
            s.on_event(ev);
        }
    });
    let mut r = Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response();
    r.extensions_mut().insert(ReqLog { model, prompt_tokens, cached_tokens: 0, completion_tokens: 0, streamed: true });
    r
}

// ---------------------------------------------------------------------------------------------
// Other routes

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let mut overall = "ok";
    let mut first_error = None;
    let models: Vec<Value> = st
        .models
        .iter()
        .map(|m| {
            // (An engine that loaded may fail later: no backend left after a lost device.)
            let (status, error) = if let Some(e) = m.engine.failed.get() {
                ("error", Some(e.clone()))
            } else if m.engine.loaded.get().is_some() {
                ("ok", None)
            } else {
                ("loading", None)
            };
            match status {
                "error" => {
                    overall = "error";
                    first_error.get_or_insert_with(|| {
                        format!("model {} failed to load: {}", m.id, error.clone().unwrap_or_default())
                    });
                }
                "loading" if overall == "ok" => overall = "loading",
                _ => {}
            }
            let mut v =
                json!({"id": m.id, "path": m.path.display().to_string(), "status": status, "busy": m.engine.busy()});
            if let Some(e) = error {
                v["error"] = e.into();
            }
            v
        })
        .collect();
    let mut body = json!({
        "status": overall,
        "model": st.models.first().map(|m| m.id.clone()),
        "models": models,
        "backend": st.models.first().map(|m| m.backend()),
        "uptime_s": st.started.elapsed().as_secs(),
    });
    match overall {
        "ok" => Json(body).into_response(),
        _ => {
            let (message, retry) = match first_error {
                Some(e) => (e, 60u64),
                None => ("Loading model".to_string(), 5),
            };
            body["error"] = json!({"code": 503, "message": message, "type": "unavailable_error"});
            let mut r = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry));
            r
        }
    }
}

async fn metrics_page(State(st): State<Arc<AppState>>) -> Response {
    let backends: Vec<String> = st.models.iter().map(|m| m.backend()).collect();
    let models: Vec<(&str, &str, &metrics::Stats)> =
        st.models.iter().zip(&backends).map(|(m, b)| (m.id.as_str(), b.as_str(), &*m.engine.stats)).collect();
    let text = metrics::render(&st.requests, &models);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

fn model_json(m: &ServedModel) -> Value {
    json!({"id": m.id, "object": "model", "created": m.created, "owned_by": "purehw"})
}

async fn list_models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": st.models.iter().map(model_json).collect::<Vec<_>>()}))
}

async fn get_model(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    match st.model(&id) {
        Some(m) => Ok(Json(model_json(m))),
        None => {
            let served = st.models.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(", ");
            Err(model_not_found(&id, &served))
        }
    }
}

/// `content` (or `prompt`) as text, or `messages` (with `tools`, `add_generation_prompt`) through
/// the chat template exactly as a chat request would see them (vLLM's two forms).
async fn tokenize(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> ApiResult<Json<Value>> {
    let o = parse_body(&st, body)?;
    let model = resolve_model(&st, &o)?;
    let with_pieces = get_bool(&o, "with_pieces", "with_pieces")?.unwrap_or(false);
    let ids = if field(&o, "messages").is_some() {
        let (messages, tools) = (parse_messages(&o)?, parse_tools(&o)?);
        let add_gen = get_bool(&o, "add_generation_prompt", "add_generation_prompt")?.unwrap_or(true);
        let loaded = ready(model)?;
        chat_prompt(model, &loaded.tokenizer, &messages, tools, add_gen)?.0
    } else {
        tokenize_text(model, &o)?
    };
    let loaded = ready(model)?;
    let tok = &*loaded.tokenizer;
    let tokens: Vec<Value> = if with_pieces {
        ids.iter().map(|&id| json!({"id": id, "piece": tok.decode(&[id]).unwrap_or_default()})).collect()
    } else {
        ids.iter().map(|&id| id.into()).collect()
    };
    Ok(Json(json!({"tokens": tokens, "count": ids.len(), "max_model_len": loaded.ctx})))
}

fn tokenize_text(model: &ServedModel, o: &Obj) -> ApiResult<Vec<u32>> {
    let (key, text) = match (field(o, "content"), field(o, "prompt")) {
        (Some(Value::String(s)), _) => ("content", s),
        (Some(v), _) => return Err(ApiError::param("content", format!("content must be a string, got {}", kind(v)))),
        (None, Some(Value::String(s))) => ("prompt", s),
        (None, Some(v)) => return Err(ApiError::param("prompt", format!("prompt must be a string, got {}", kind(v)))),
        (None, None) => return Err(ApiError::param("content", "content is required")),
    };
    let add_special = get_bool(o, "add_special", "add_special")?.unwrap_or(false);
    let loaded = ready(model)?;
    let tok = &*loaded.tokenizer;
    encode(tok, text, add_special && tok.add_bos_default()).map_err(|e| ApiError { param: Some(key.into()), ..e })
}

async fn detokenize(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> ApiResult<Json<Value>> {
    let o = parse_body(&st, body)?;
    let model = resolve_model(&st, &o)?;
    let ids = match field(&o, "tokens") {
        Some(Value::Array(a)) => parse_ids(a, "tokens")?,
        Some(v) => {
            return Err(ApiError::param("tokens", format!("tokens must be an array of token ids, got {}", kind(v))));
        }
        None => return Err(ApiError::param("tokens", "tokens is required")),
    };
    let loaded = ready(model)?;
    let tok = &*loaded.tokenizer;
    check_ids(&ids, tok.vocab_size(), "tokens")?;
    let content = tok.decode(&ids).map_err(|e| ApiError::param("tokens", format!("cannot decode: {e}")))?;
    Ok(Json(json!({"content": content})))
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use axum::body::Body;
    use purehw_hal_cpu_ref::CpuRef;
    use tower::ServiceExt;

    use super::super::engine::{Engine, EngineConfig};
    use super::*;

    fn state(api_key: Option<&str>, max_body: usize) -> Arc<AppState> {
        let cfg = EngineConfig { parallel: 1, ctx: 64, prefill_chunk: 16, queue: 1, prompt_cache: true };
        let engine = Engine::start::<CpuRef, _>(cfg, || Err("no model in tests".into()));
        Arc::new(AppState {
            models: vec![ServedModel {
                id: "m".into(),
                path: "m.gguf".into(),
                engine,
                created: 1,
                template: OnceLock::new(),
            }],
            api_key: api_key.map(String::from),
            requests: metrics::Requests::default(),
            started: Instant::now(),
            max_body,
        })
    }

    async fn call(
        st: &Arc<AppState>,
        method: &str,
        uri: &str,
        body: impl Into<Body>,
        auth: Option<&str>,
    ) -> (u16, Value) {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        let resp = app(st.clone()).oneshot(b.body(body.into()).unwrap()).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    fn post(st: &Arc<AppState>, uri: &str, body: &str) -> impl Future<Output = (u16, Value)> {
        call(st, "POST", uri, body.to_string(), None)
    }

    fn err_param(v: &Value) -> Option<&str> {
        v["error"]["param"].as_str()
    }

    #[tokio::test]
    async fn unknown_routes_and_methods_are_openai_errors() {
        let st = state(None, 1 << 20);
        let (s, v) = call(&st, "GET", "/v1/nope", Body::empty(), None).await;
        assert_eq!(s, 404);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let (s, v) = call(&st, "GET", "/v1/chat/completions", Body::empty(), None).await;
        assert_eq!(s, 405);
        assert!(v["error"]["message"].as_str().unwrap().contains("GET"));
    }

    #[tokio::test]
    async fn bad_bodies_are_400_naming_the_problem() {
        let st = state(None, 1 << 20);
        let (s, v) = post(&st, "/v1/chat/completions", "{not json").await;
        assert_eq!(s, 400);
        assert!(v["error"]["message"].as_str().unwrap().contains("not valid JSON"), "{v}");
        let (s, _) = call(&st, "POST", "/v1/chat/completions", vec![0xffu8, 0xfe, 0x00], None).await;
        assert_eq!(s, 400);
        let (s, _) = post(&st, "/v1/chat/completions", "[1,2]").await;
        assert_eq!(s, 400);
        let (s, _) = post(&st, "/v1/chat/completions", "").await;
        assert_eq!(s, 400);
        let deep = "[".repeat(10_000);
        let (s, _) = post(&st, "/v1/chat/completions", &deep).await;
        assert_eq!(s, 400);
        let msg = r#""messages":[{"role":"user","content":"hi"}]"#;
        for (body, param) in [
            (r#"{"messages":[]}"#.to_string(), "messages"),
            (r#"{"messages":"hi"}"#.into(), "messages"),
            (r#"{"messages":[{"role":"wizard","content":"hi"}]}"#.into(), "messages[0].role"),
            (r#"{"messages":[{"role":"user","content":5}]}"#.into(), "messages[0].content"),
            (format!(r#"{{{msg},"temperature":3}}"#), "temperature"),
            (format!(r#"{{{msg},"temperature":"hot"}}"#), "temperature"),
            (format!(r#"{{{msg},"top_p":0}}"#), "top_p"),
            (format!(r#"{{{msg},"top_k":-1}}"#), "top_k"),
            (format!(r#"{{{msg},"max_tokens":0}}"#), "max_tokens"),
            (format!(r#"{{{msg},"max_tokens":1e30}}"#), "max_tokens"),
            (format!(r#"{{{msg},"n":2}}"#), "n"),
            (format!(r#"{{{msg},"seed":1.5}}"#), "seed"),
            (format!(r#"{{{msg},"stop":[1]}}"#), "stop"),
            (format!(r#"{{{msg},"presence_penalty":5}}"#), "presence_penalty"),
            (format!(r#"{{{msg},"repetition_penalty":0}}"#), "repetition_penalty"),
            (format!(r#"{{{msg},"top_logprobs":3}}"#), "top_logprobs"),
            (format!(r#"{{{msg},"response_format":{{"type":"xml"}}}}"#), "response_format.type"),
            (format!(r#"{{{msg},"stream":"yes"}}"#), "stream"),
        ] {
            let (s, v) = post(&st, "/v1/chat/completions", &body).await;
            assert_eq!((s, err_param(&v)), (400, Some(param)), "{body} -> {v}");
        }
        let (s, v) = post(&st, "/v1/completions", r#"{"prompt":["a","b"]}"#).await;
        assert_eq!((s, err_param(&v)), (400, Some("prompt")));
    }

    #[tokio::test]
    async fn unknown_model_is_404_and_unloaded_model_503() {
        let st = state(None, 1 << 20);
        let (s, v) =
            post(&st, "/v1/chat/completions", r#"{"model":"x","messages":[{"role":"user","content":"hi"}]}"#).await;
        assert_eq!(s, 404);
        assert_eq!(v["error"]["code"], "model_not_found");
        let (s, _) = call(&st, "GET", "/v1/models/x", Body::empty(), None).await;
        assert_eq!(s, 404);
        let (s, v) = call(&st, "GET", "/v1/models/m", Body::empty(), None).await;
        assert_eq!((s, v["object"].as_str()), (200, Some("model")));
        let (s, v) = post(&st, "/v1/chat/completions", r#"{"messages":[{"role":"user","content":"hi"}]}"#).await;
        assert_eq!(s, 503, "{v}");
        let (s, v) = call(&st, "GET", "/health", Body::empty(), None).await;
        assert_eq!(s, 503);
        assert!(v["status"] == "loading" || v["status"] == "error", "{v}");
        let (s, v) = call(&st, "GET", "/v1/models", Body::empty(), None).await;
        assert_eq!((s, v["data"][0]["id"].as_str()), (200, Some("m")));
    }

    #[tokio::test]
    async fn api_key_guards_v1_but_not_health_or_metrics() {
        let st = state(Some("sekrit"), 1 << 20);
        let (s, v) = call(&st, "GET", "/v1/models", Body::empty(), None).await;
        assert_eq!((s, v["error"]["code"].as_str()), (401, Some("invalid_api_key")));
        let (s, _) = call(&st, "GET", "/v1/models", Body::empty(), Some("Bearer wrong")).await;
        assert_eq!(s, 401);
        let (s, _) = call(&st, "GET", "/v1/models", Body::empty(), Some("Bearer sekrit")).await;
        assert_eq!(s, 200);
        let (s, _) = call(&st, "GET", "/health", Body::empty(), None).await;
        assert_ne!(s, 401);
        let resp = app(st.clone()).oneshot(Request::get("/metrics").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(resp.status(), 200);
        let text = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        assert!(
            String::from_utf8_lossy(&text).contains("purehw_requests_total{route=\"/v1/models\",status=\"401\"} 2")
        );
    }

    #[tokio::test]
    async fn oversized_body_is_413() {
        let st = state(None, 64);
        let body = format!(r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(200));
        let (s, v) = post(&st, "/v1/chat/completions", &body).await;
        assert_eq!(s, 413, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
}

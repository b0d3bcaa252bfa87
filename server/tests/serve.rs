//! `purehw serve` end to end: the real binary on a loopback port, driven by the official `openai`
//! Python SDK (server/tests/openai_client.py; .ci/run installs the package).
//!
//! Each test starts its own server (killed on drop, even when the test fails) and runs a group of
//! the client's cases against it. The tests take a lock so only one server runs at a time: they
//! measure throughput, and the CI machine has few cores.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const SMOL: &str = "smollm2-135m";
const GEMMA: &str = "gemma3-270m";
const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
/// How long a server may take to load its model and answer `/health` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serialize() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running `purehw serve`; killed (and reaped) on drop.
struct Server {
    child: Child,
    port: u16,
    model: &'static str,
    log: tempfile::NamedTempFile,
    /// The flags it was started with (for the client: --api-key, --max-body, --ctx-size).
    flags: Vec<String>,
    _lock: MutexGuard<'static, ()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a free loopback port");
    l.local_addr().expect("local_addr").port()
}

/// One GET over a fresh connection: (status, body). `None` if nothing answers.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split(' ').nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Some((status, body))
}

impl Server {
    /// `purehw serve -m MODEL --port P EXTRA...` (no `-m` when MODEL is ""), waited for until
    /// `/health` says ok.
    fn start(model: &'static str, extra: &[&str]) -> Server {
        Server::start_env(model, extra, &[])
    }

    /// As [`start`](Server::start), with environment variables for the server.
    fn start_env(model: &'static str, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let lock = serialize();
        let port = free_port();
        let log = tempfile::NamedTempFile::new().expect("temp file for the server log");
        let err = log.reopen().expect("reopening the log");
        let mut flags: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        // `PUREHW_TEST_BACKEND=vulkan` reruns the whole suite on another backend (by hand: on
        // lavapipe the full suite takes the better part of an hour).
        if let Ok(b) = std::env::var("PUREHW_TEST_BACKEND")
            && !flags.iter().any(|f| f == "--backend")
        {
            flags.extend(["--backend".to_string(), b]);
        }
        let child = Command::new(env!("CARGO_BIN_EXE_purehw"))
            .arg("serve")
            .args(if model.is_empty() { vec![] } else { vec!["-m", model] })
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(&flags)
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(err.try_clone().expect("dup log")))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("starting purehw serve");
        let mut srv = Server { child, port, model, log, flags, _lock: lock };
        srv.wait_ready();
        srv
    }

    fn log_text(&self) -> String {
        let mut s = String::new();
        let _ = File::open(self.log.path()).and_then(|mut f| f.read_to_string(&mut s));
        // The text log format colours its fields; strip the escapes for readability.
        let mut out = String::with_capacity(s.len());
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    fn wait_ready(&mut self) {
        let t = Instant::now();
        let mut last = None;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("purehw serve exited ({st}) before it was ready; its log:\n{}", self.log_text());
            }
            match get(self.port, "/health") {
                Some((200, body)) if body.contains("\"ok\"") => {
                    eprintln!("{} ready on port {} in {:.1}s", self.model, self.port, t.elapsed().as_secs_f64());
                    return;
                }
                r => last = r.or(last),
            }
            if t.elapsed() > READY_TIMEOUT {
                panic!(
                    "purehw serve -m {} not ready after {} s (last /health: {last:?}); its log:\n{}",
                    self.model,
                    READY_TIMEOUT.as_secs(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn flag(&self, name: &str) -> Option<&str> {
        self.flags.iter().position(|f| f == name).and_then(|i| self.flags.get(i + 1)).map(String::as_str)
    }

    /// Run the Python client's `cases` against this server; panics (with both outputs) unless it
    /// exits 0.
    #[track_caller]
    fn run(&self, cases: &[&str]) {
        self.run_env(cases, &[]);
    }

    #[track_caller]
    fn run_env(&self, cases: &[&str], env: &[(&str, &str)]) {
        self.run_with(&[], cases, env);
    }

    /// Run `cases` with extra client arguments (`--max-tokens N`) and environment.
    #[track_caller]
    fn run_with(&self, client_args: &[&str], cases: &[&str], env: &[(&str, &str)]) {
        assert!(Path::new(CLIENT).exists(), "{CLIENT} is missing");
        let base = format!("http://127.0.0.1:{}/v1", self.port);
        let mut cmd = Command::new("python3");
        cmd.arg(CLIENT).args(["--base-url", &base, "--model", self.model]);
        for (ours, theirs) in [("--api-key", "--api-key"), ("--max-body", "--max-body"), ("--ctx-size", "--ctx-size")] {
            if let Some(v) = self.flag(ours) {
                cmd.args([theirs, v]);
            }
        }
        // `PUREHW_TEST_MAX_TOKENS=N` caps every reply (slow backends), unless the test caps it.
        let cap = std::env::var("PUREHW_TEST_MAX_TOKENS").ok().filter(|_| client_args.is_empty());
        if let Some(n) = &cap {
            cmd.args(["--max-tokens", n]);
        }
        // A slow backend (lavapipe) takes minutes for what the CPU does in seconds: the client's
        // per-request timeout follows `PUREHW_TEST_TIMEOUT`, else 20 minutes on another backend.
        let timeout = std::env::var("PUREHW_TEST_TIMEOUT")
            .ok()
            .or_else(|| std::env::var("PUREHW_TEST_BACKEND").ok().map(|_| "1200".to_string()));
        if let Some(t) = &timeout {
            cmd.args(["--timeout", t]);
        }
        cmd.args(client_args).args(cases).env("PYTHONUNBUFFERED", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let t = Instant::now();
        let out = cmd.output().expect("running python3 (is it installed?)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Always show what the client saw (cargo test prints it for failing tests, or with
        // --nocapture).
        println!("$ python3 openai_client.py --base-url {base} --model {} {}", self.model, cases.join(" "));
        println!("{stdout}{stderr}");
        println!("({:.1}s)", t.elapsed().as_secs_f64());
        if !out.status.success() {
            let log = self.log_text();
            // Skip the client's /metrics polling.
            let tail: Vec<&str> = log.lines().rev().filter(|l| !l.contains("route=\"/metrics\"")).take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "openai_client.py {} failed (exit {:?}):\n{stdout}{stderr}\n--- last lines of the server log:\n{}",
                cases.join(" "),
                out.status.code(),
                tail.join("\n")
            );
        }
    }
}

/// /health, /v1/models, /metrics and /tokenize + /detokenize.
#[test]
fn health_models_metrics_tokenize() {
    Server::start(SMOL, &[]).run(&["health", "models", "tokenize", "metrics"]);
}

/// Without `-m`: the chat model first in /v1/models, answering a plain question; Gemma beside it.
#[test]
fn default_models_chat_first() {
    let srv = Server::start("", &[]);
    let mut cmd = Command::new("python3");
    let base = format!("http://127.0.0.1:{}/v1", srv.port);
    let out = cmd.arg(CLIENT).args(["--base-url", &base, "--model", SMOL, "default_models"]).output().expect("python3");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "default_models failed:\n{text}\n--- server log:\n{}", srv.log_text());
}

/// Chat (plain and streamed, equal under greedy), usage, completions (text and token ids),
/// max_tokens.
#[test]
fn chat_stream_completions() {
    Server::start(SMOL, &[]).run(&["chat", "stream", "completions", "length"]);
}

/// logprobs, logit_bias, stop sequences, seeded sampling, response_format json_object and
/// json_schema (the SDK's `parse` with a pydantic model; forced-call arguments per schema).
#[test]
fn sampling_controls() {
    Server::start(SMOL, &[]).run(&["logprobs", "logit_bias", "stop", "seed", "json", "json_schema"]);
}

/// What OpenWebUI sends: ~36 tools + stream, and a title request without max_tokens; tool-call
/// history and a forced tool call on a template without tools.
#[test]
fn openwebui_requests() {
    Server::start(SMOL, &[]).run(&["openwebui", "tool_history", "tool_choice"]);
}

/// Qwen2.5-Instruct's chat template: it takes tools, renders tool calls and tool results.
const QWEN25_TEMPLATE: &str = include_str!("data/qwen25.jinja");

/// `--chat-template` with a template that takes tools (SmolLM2 speaks the same ChatML): tool-call
/// history reaches the template; a plain reply and a tool call (after a few-shot history) come
/// back in OpenAI's shape, the same streamed as not. The parser's formats are tested in
/// `serve::tools`.
#[test]
fn tool_calls_with_a_tools_template() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("qwen25.jinja");
    std::fs::write(&path, QWEN25_TEMPLATE).expect("writing the template");
    let path = path.to_str().expect("a UTF-8 temp path").to_string();
    Server::start(SMOL, &["--chat-template", &path]).run(&["tools", "tool_choice"]);
}

/// OpenAI-shaped 4xx errors for bad requests, never a 500; then a client hanging up mid-stream
/// frees its sequence and the server goes on.
#[test]
fn errors_and_disconnect() {
    Server::start(SMOL, &[]).run(&["errors", "disconnect"]);
}

/// `--max-body`: 413.
#[test]
fn body_limit_413() {
    Server::start(SMOL, &["--max-body", "4096"]).run(&["body_limit"]);
}

/// `--api-key`: 401 without or with a wrong key, 200 with it; /health stays open.
#[test]
fn api_key_401() {
    Server::start(SMOL, &["--api-key", "secret"]).run(&["auth", "chat"]);
}

/// `--parallel 1 --queue 1` under a burst: 429 with Retry-After, the rest served.
#[test]
fn queue_full_429() {
    Server::start(SMOL, &["--parallel", "1", "--queue", "1"]).run(&["queue"]);
}

/// `--ctx-size 256`: a longer prompt is a 400 naming the limit.
#[test]
fn context_limit_400() {
    Server::start(SMOL, &["--ctx-size", "256"]).run(&["context"]);
}

/// 8 concurrent streams on gemma3-270m: all complete, greedy output is the same as alone, and the
/// aggregate tokens/s vs one request (printed; asserted >= 3x with PUREHW_ASSERT_SPEEDUP=1).
#[test]
fn concurrency_gemma() {
    let srv = Server::start(GEMMA, &["--parallel", "8"]);
    let assert = std::env::var("PUREHW_ASSERT_SPEEDUP").unwrap_or_default();
    srv.run_env(&["concurrency"], &[("PUREHW_ASSERT_SPEEDUP", assert.as_str())]);
}

/// Prompt caching through the SDK: a 6-turn conversation at temperature 0, alone and three at
/// once, on a server with the cache and on one with `--no-prompt-cache`: the same replies; with
/// the cache turns 2-6 report `prompt_tokens_details.cached_tokens` > 0, without it 0.
#[test]
fn prompt_cache_same_replies_on_and_off() {
    same_replies_on_and_off("prompt_cache");
}

/// Run the client's `case` on a server with the prompt cache and on one with
/// `--no-prompt-cache`; the replies it writes must be the same.
fn same_replies_on_and_off(case: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut replies = Vec::new();
    for (flags, mode) in [(&[][..], "on"), (&["--no-prompt-cache"][..], "off")] {
        let out = dir.path().join(format!("{mode}.json"));
        let out_s = out.to_str().expect("a UTF-8 temp path");
        let srv = Server::start(SMOL, flags);
        srv.run_env(&[case], &[("PUREHW_PROMPT_CACHE", mode), ("PUREHW_REPLIES_OUT", out_s)]);
        replies.push(std::fs::read_to_string(&out).expect("the client's replies"));
    }
    assert_eq!(replies[0], replies[1], "{case}: the replies differ with the prompt cache on and off");
}

/// A prefix copied between KV slots through the SDK: a chat arriving while another sharing its
/// long system prompt still replies gets that prefix copied from the other's slot
/// (`cached_tokens` > 0, `purehw_prompt_tokens_copied_total` as many); the temperature-0 replies
/// equal those of a server with `--no-prompt-cache`.
#[test]
fn prompt_copy_same_replies_on_and_off() {
    same_replies_on_and_off("prompt_copy");
}

/// Whether `purehw devices` finds a Vulkan device for `test`. Without one the test is skipped
/// with a printed line, unless `PUREHW_REQUIRE_VULKAN=1`, where that is a failure.
fn vulkan_present(test: &str) -> bool {
    let out = Command::new(env!("CARGO_BIN_EXE_purehw")).args(["devices", "--json"]).output().expect("purehw devices");
    assert!(out.status.success(), "purehw devices --json failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("purehw devices --json is JSON");
    let vk = v["backends"].as_array().and_then(|b| b.iter().find(|b| b["name"] == "vulkan")).cloned();
    let vk = vk.expect("purehw devices lists vulkan");
    if vk["available"] == true {
        return true;
    }
    let why = vk["error"].as_str().unwrap_or("unavailable");
    let required = std::env::var("PUREHW_REQUIRE_VULKAN").is_ok_and(|v| v == "1");
    assert!(!required, "{test}: PUREHW_REQUIRE_VULKAN=1 but Vulkan is unavailable: {why}");
    eprintln!("{test}: skipped: Vulkan is unavailable ({why})");
    false
}

/// Options for a server on Vulkan: lavapipe (Mesa's CPU driver) where there is no GPU, which
/// runs SmolLM2 at about a second per step on 2 cores; a small KV cache keeps loading quick.
const VULKAN: &[&str] = &["--backend", "vulkan", "--ctx-size", "1024", "--parallel", "2"];

/// `--backend vulkan` through the SDK: the chat, stream and completions cases (their `max_tokens`
/// capped at 4: on lavapipe a step takes about a second, a chat prompt's prefill ten), then the
/// device's memory and step time in /metrics. About two minutes on lavapipe with 2 cores.
#[test]
fn vulkan_chat_stream_completions() {
    if !vulkan_present("vulkan_chat_stream_completions") {
        return;
    }
    let srv = Server::start(SMOL, VULKAN);
    srv.run_with(&["--max-tokens", "4"], &["health", "chat", "stream", "completions", "device_metrics"], &[]);
}

/// A lost device (injected: `PUREHW_VK_FAULT=lost:4` loses each device made at its 4th step):
/// the requests in flight get 503 (streamed: an error event), the engine makes the device again
/// and loads the model again, and the next request is served.
#[test]
fn vulkan_device_lost_503_then_served() {
    if !vulkan_present("vulkan_device_lost_503_then_served") {
        return;
    }
    let srv = Server::start_env(SMOL, VULKAN, &[("PUREHW_VK_FAULT", "lost:4")]);
    srv.run(&["device_lost"]);
    let log = srv.log_text();
    assert!(log.contains("loading the model again"), "{log}");
}

const PAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/page_browser.py");

/// Debian's Chromium, if installed; without it the browser test is skipped with a line, unless
/// `PUREHW_REQUIRE_BROWSER=1` (CI installs it), where that is a failure.
fn chromium(test: &str) -> Option<String> {
    let found = ["chromium", "chromium-browser"].into_iter().find(|c| {
        Command::new(c).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    });
    if found.is_none() {
        assert!(std::env::var("PUREHW_REQUIRE_BROWSER").as_deref() != Ok("1"), "{test}: chromium is not installed");
        eprintln!("{test}: SKIPPED, chromium is not installed");
    }
    found.map(String::from)
}

/// The page at `/` in headless Chromium, on a server with `--api-key`: it asks for the key, its
/// requests all go to the server, a message gets a streamed reply, markup stays text, the plots
/// show the request. The screenshot lands in the test's temporary directory.
#[test]
fn page_in_a_browser() {
    let Some(browser) = chromium("page_in_a_browser") else { return };
    let srv = Server::start(SMOL, &["--api-key", "page-key"]);
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("page.png");
    let out = Command::new("python3")
        .arg(PAGE)
        .args(["--base-url", &format!("http://127.0.0.1:{}", srv.port), "--chromium", &browser])
        .args(["--api-key", "page-key", "--screenshot"])
        .arg(&shot)
        .env("PYTHONUNBUFFERED", "1")
        .output()
        .expect("running python3");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(
        out.status.success() && text.contains("PASS"),
        "page_browser.py failed:\n{text}\n--- server log:\n{}",
        srv.log_text()
    );
    assert!(shot.metadata().is_ok_and(|m| m.len() > 1000), "no screenshot at {}", shot.display());
}

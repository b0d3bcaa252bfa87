//! `purehw chat`: a conversation in the terminal, as `ollama run` has one.
//!
//! Each turn renders the whole conversation through the model's chat template (the one the
//! server uses, [`ChatTemplate`]), tokenizes it, and generates the reply into KV-cache slot 0,
//! streamed as it comes. The slot keeps the tokens of the previous turns: a new prompt that
//! starts with them (the usual case: the history plus a new user message) computes only the new
//! suffix ([`generate_from`]); where the tokens differ (the reply's text tokenized otherwise than
//! it was generated, `/clear`, `/system`, an old turn dropped to fit the context) the prompt is
//! computed from the first differing position. The stats line after each reply says how many
//! prompt tokens came from the cache.
//!
//! Input is plain stdin lines (no line-editing crate: the terminal's own line discipline gives
//! backspace and Ctrl-U, which is what a chat prompt needs). A line ending in `\` continues on the
//! next; `"""` opens a block that a line ending in `"""` closes. `/clear`, `/system TEXT`,
//! `/exit` (`/bye`), `/help`; EOF (Ctrl-D) leaves too.
//!
//! Ctrl-C (SIGINT) goes through tokio's signal handling, already a dependency for `serve`, so no
//! new crate and no `unsafe` here: a thread running a small current-thread runtime owns the
//! handler (installing it replaces the default action, which would end the process). While a
//! reply is being generated, SIGINT sets a flag the token callback reads, so the reply stops
//! after the token being computed (a long prompt's prefill is not interrupted midway); the part
//! already printed is kept in the conversation as the assistant's message (its tokens are in the
//! cache already, and the user saw it; a reply stopped before any text drops the turn). At the
//! prompt, SIGINT drops a half-typed message and prints a hint; a second one in a row leaves.

use std::io::{self, BufRead, IsTerminal as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Instant;

use purehw_core::model::{Model, ModelOptions, generate_from};
use purehw_core::sampling::{Sampler, SamplingParams};
use purehw_core::source::ModelSource;
use purehw_core::tokenizer::Tokenizer;
use purehw_hal::Backend;
use serde_json::{Value as Json, json};

use crate::ChatArgs;
use crate::backends::{self, Maker, Registered, WithBackend};
use crate::commands::tokenizer_for;
use crate::error::{CliError, CliResult, Context, err};
use crate::models;
use crate::out;
use crate::serve::template::ChatTemplate;
use crate::serve::{compile_template, model_chat_template, stop_ids};

const HELP: &str = "\
/clear         forget the conversation (the system prompt stays)
/system TEXT   set the system prompt and start over (/system alone: the template's default)
/exit, /bye    leave (so do Ctrl-D, and Ctrl-C twice at the prompt)
/help, /?      this list
A line ending in \\ continues on the next; \"\"\" opens a block that a line ending in \"\"\" closes.
Ctrl-C stops a reply; what it printed stays in the conversation.";

pub fn chat(a: &ChatArgs) -> CliResult {
    let params = a.sampling.params()?;
    let r = models::resolve(&a.model)?;
    let src = ModelSource::open(&r.path)?;
    let tok = tokenizer_for(a.tokenizer.as_deref(), &r, &src)?;
    let source = match &a.chat_template {
        Some(p) => std::fs::read_to_string(p).context(|| format!("reading {}", p.display()))?,
        None => match model_chat_template(&src, &r.path, a.tokenizer.as_deref()) {
            Some(t) => t,
            None => return err(format!("{} has no chat template; pass --chat-template FILE", a.model)),
        },
    };
    let template = compile_template(&a.model, &source, &tok).map_err(|e| CliError(e.to_string()))?;
    let max = src.config.max_ctx;
    let ctx = match a.ctx_size {
        0 => max.clamp(1, 4096),
        n if max > 0 && n > max => return err(format!("--ctx-size {n} exceeds the model's context of {max} tokens")),
        n => n,
    };
    backends::dispatch(&a.backend, ChatOn { a, src: &src, tok: &tok, template: &template, ctx, params })
}

/// `chat`'s body on one backend.
struct ChatOn<'a> {
    a: &'a ChatArgs,
    src: &'a ModelSource,
    tok: &'a Tokenizer,
    template: &'a ChatTemplate,
    ctx: usize,
    params: SamplingParams,
}

impl WithBackend for ChatOn<'_> {
    type Out = ();

    fn run<B: Registered>(self, make: Maker<B>) -> CliResult {
        let ChatOn { a, src, tok, template, ctx, params } = self;
        let opts = ModelOptions { ctx, slots: 1, act: make.act, ..ModelOptions::default() };
        let model = make.load(src, opts)?;
        let vocab = model.config().vocab;
        let mut chat = Chat {
            model,
            tok,
            template,
            stop_ids: stop_ids(tok),
            sampler: Sampler::new(params, vocab),
            n_predict: a.n_predict,
            reuse_cache: !a.no_prompt_cache,
            system: a.system.clone().filter(|s| !s.trim().is_empty()),
            history: Vec::new(),
            cached: Vec::new(),
            style: Style::of_stderr(),
        };
        let term = Terminal::start()?;
        chat.style.note(&format!(
            "{} on {} (context {ctx} tokens). /help for commands, Ctrl-D or /exit to leave.",
            a.model,
            make.name()
        ));
        chat.repl(&term)
    }
}

/// How notes and stats are written to stderr: dimmed on a terminal (unless `NO_COLOR`).
struct Style {
    dim: bool,
}

impl Style {
    fn of_stderr() -> Style {
        Style { dim: io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) }
    }

    fn note(&self, s: &str) {
        if self.dim {
            eprintln!("\x1b[2m{s}\x1b[0m");
        } else {
            eprintln!("{s}");
        }
    }
}

/// What the input threads send the chat loop.
#[derive(Debug)]
enum Input {
    /// One line of stdin, without its line ending.
    Line(String),
    /// stdin ended (Ctrl-D) or failed.
    Eof,
    /// SIGINT while no reply is being generated.
    Interrupt,
}

/// The input side: a thread reading stdin lines and a thread owning the SIGINT handler, both
/// feeding one channel; and the flags that route SIGINT to a running reply instead.
struct Terminal {
    rx: Receiver<Input>,
    /// A reply is being generated: SIGINT sets `stop` instead of sending [`Input::Interrupt`].
    replying: Arc<AtomicBool>,
    /// SIGINT arrived during the current reply.
    stop: Arc<AtomicBool>,
    /// Prompts are printed only when a person types (stdin is a terminal).
    interactive: bool,
}

impl Terminal {
    fn start() -> CliResult<Terminal> {
        let (tx, rx) = mpsc::channel();
        let replying = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        watch_sigint(tx.clone(), replying.clone(), stop.clone())?;
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || read_lines(&tx))
            .context(|| "starting the stdin thread".into())?;
        Ok(Terminal { rx, replying, stop, interactive: io::stdin().is_terminal() })
    }
}

fn read_lines(tx: &Sender<Input>) {
    let stdin = io::stdin();
    let mut line = String::new();
    loop {
        line.clear();
        let msg = match stdin.lock().read_line(&mut line) {
            Ok(0) | Err(_) => Input::Eof,
            Ok(_) => {
                let l = line.strip_suffix('\n').unwrap_or(&line);
                Input::Line(l.strip_suffix('\r').unwrap_or(l).to_string())
            }
        };
        let eof = matches!(msg, Input::Eof);
        if tx.send(msg).is_err() || eof {
            return;
        }
    }
}

/// Install the SIGINT handler on a thread of its own (see the module doc); returns once it is
/// installed, so no Ctrl-C after the first prompt can end the process.
fn watch_sigint(tx: Sender<Input>, replying: Arc<AtomicBool>, stop: Arc<AtomicBool>) -> CliResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context(|| "starting the signal handler's runtime".into())?;
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
    std::thread::Builder::new()
        .name("sigint".into())
        .spawn(move || {
            // Routes one SIGINT; false once the chat loop has gone.
            let on_sigint = || {
                if replying.load(SeqCst) {
                    stop.store(true, SeqCst);
                    true
                } else {
                    tx.send(Input::Interrupt).is_ok()
                }
            };
            rt.block_on(async move {
                #[cfg(unix)]
                {
                    use tokio::signal::unix::{SignalKind, signal};
                    let mut sig = match signal(SignalKind::interrupt()) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    while sig.recv().await.is_some() && on_sigint() {}
                }
                // Elsewhere tokio's portable ctrl_c() (a listener per call).
                #[cfg(not(unix))]
                {
                    let _ = ready_tx.send(Ok(()));
                    while tokio::signal::ctrl_c().await.is_ok() && on_sigint() {}
                }
            });
        })
        .context(|| "starting the signal thread".into())?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => err(format!("handling Ctrl-C: {e}")),
        Err(_) => err("handling Ctrl-C: the signal thread ended"),
    }
}

/// Joins input lines into one message: a line ending in `\` continues on the next (the `\`
/// becomes a line break); a message starting with `"""` runs until a line ending in `"""`
/// (`"""text"""` on one line is a message too).
#[derive(Debug, Default)]
struct Lines {
    buf: String,
    /// Inside a `"""` block.
    block: bool,
    /// The last line ended in `\`.
    more: bool,
}

const QUOTES: &str = "\"\"\"";

impl Lines {
    /// Add a line; the whole message once it is complete.
    fn push(&mut self, line: &str) -> Option<String> {
        if self.block {
            if let Some(head) = line.strip_suffix(QUOTES) {
                self.buf.push_str(head);
                self.block = false;
                return Some(std::mem::take(&mut self.buf));
            }
            self.buf.push_str(line);
            self.buf.push('\n');
            return None;
        }
        if !self.more
            && let Some(rest) = line.trim_start().strip_prefix(QUOTES)
        {
            if let Some(inner) = rest.strip_suffix(QUOTES) {
                return Some(inner.to_string());
            }
            self.block = true;
            if !rest.is_empty() {
                self.buf.push_str(rest);
                self.buf.push('\n');
            }
            return None;
        }
        if let Some(head) = line.strip_suffix('\\') {
            self.buf.push_str(head);
            self.buf.push('\n');
            self.more = true;
            return None;
        }
        self.buf.push_str(line);
        self.more = false;
        Some(std::mem::take(&mut self.buf))
    }

    /// A message is half-typed (the prompt shows `...`).
    fn continuing(&self) -> bool {
        self.block || self.more
    }

    fn reset(&mut self) {
        *self = Lines::default();
    }
}

/// A slash command.
#[derive(Debug, PartialEq, Eq)]
enum Command<'a> {
    Exit,
    Clear,
    /// `/system TEXT`; empty: back to the template's default.
    System(&'a str),
    Help,
    Unknown(&'a str),
}

/// The command a message is, if it starts with `/`.
fn command(msg: &str) -> Option<Command<'_>> {
    let rest = msg.strip_prefix('/')?;
    let (name, arg) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    Some(match name {
        "exit" | "bye" | "quit" => Command::Exit,
        "clear" => Command::Clear,
        "system" => Command::System(arg.trim()),
        "help" | "?" => Command::Help,
        _ => Command::Unknown(name),
    })
}

/// How many leading tokens `a` and `b` share.
pub(crate) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The conversation and the model it runs on.
struct Chat<'a, B: Backend> {
    model: Model<B>,
    tok: &'a Tokenizer,
    template: &'a ChatTemplate,
    /// EOS and end-of-turn ids: a reply ends at one (not printed).
    stop_ids: Vec<u32>,
    sampler: Sampler,
    /// Most tokens per reply; 0: no limit but the context.
    n_predict: usize,
    /// Continue from the cached tokens (off: `--no-prompt-cache`).
    reuse_cache: bool,
    system: Option<String>,
    /// User and assistant messages, oldest first.
    history: Vec<Json>,
    /// The tokens whose keys and values slot 0 holds, in order.
    cached: Vec<u32>,
    style: Style,
}

/// How a reply ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum End {
    /// At an end-of-turn token.
    Stop,
    /// At `-n` tokens or the end of the context.
    Length,
    /// By Ctrl-C.
    Interrupted,
}

impl<B: Backend> Chat<'_, B> {
    /// Read, answer, repeat, until `/exit`, EOF or a second Ctrl-C at the prompt.
    fn repl(&mut self, term: &Terminal) -> CliResult {
        let mut lines = Lines::default();
        let mut interrupts = 0;
        loop {
            if term.interactive {
                let prompt = if lines.continuing() { "... " } else { ">>> " };
                if out::print(prompt)?.is_err() {
                    return Ok(());
                }
            }
            let line = match term.rx.recv() {
                Ok(Input::Line(l)) => l,
                Ok(Input::Interrupt) => {
                    interrupts += 1;
                    if interrupts >= 2 {
                        out::print_all("\n")?;
                        return Ok(());
                    }
                    lines.reset();
                    out::print_all("\n")?;
                    self.style.note("(Ctrl-C again, Ctrl-D or /exit to leave)");
                    continue;
                }
                Ok(Input::Eof) | Err(_) => {
                    if term.interactive {
                        out::print_all("\n")?;
                    }
                    return Ok(());
                }
            };
            interrupts = 0;
            let Some(msg) = lines.push(&line) else { continue };
            let msg = msg.trim();
            if msg.is_empty() {
                continue;
            }
            match command(msg) {
                Some(Command::Exit) => return Ok(()),
                Some(Command::Clear) => {
                    self.history.clear();
                    self.style.note("(conversation cleared)");
                }
                Some(Command::System(text)) => {
                    self.system = (!text.is_empty()).then(|| text.to_string());
                    self.history.clear();
                    self.style.note(if text.is_empty() {
                        "(system prompt removed; conversation cleared)"
                    } else {
                        "(system prompt set; conversation cleared)"
                    });
                }
                Some(Command::Help) => self.style.note(HELP),
                Some(Command::Unknown(name)) => self.style.note(&format!("unknown command /{name}; /help lists them")),
                None => {
                    if !self.turn(msg, term)? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// The messages the template renders: the system prompt, then the history.
    fn messages(&self) -> Vec<Json> {
        let system = self.system.iter().map(|s| json!({"role": "system", "content": s}));
        system.chain(self.history.iter().cloned()).collect()
    }

    /// The prompt's tokens, dropping the oldest exchanges until it leaves room in the context for
    /// a reply (`-n` tokens, or a quarter of the context; at most half of it). `Ok(None)`: even
    /// the new message alone does not fit (said on stderr; the message is dropped).
    fn prompt(&mut self) -> CliResult<Option<Vec<u32>>> {
        let ctx = self.model.options().ctx;
        let room = if self.n_predict > 0 { self.n_predict } else { ctx / 4 }.clamp(1, (ctx / 2).max(1));
        let mut dropped = 0;
        loop {
            let text = match self.template.render_lenient(&self.messages(), None, true) {
                Ok(t) => t,
                Err(e) => {
                    self.style.note(&format!("purehw: {e}"));
                    self.history.pop();
                    return Ok(None);
                }
            };
            let ids = encode(self.tok, &text)?;
            // The new message alone may take more of the room, as long as a token can follow.
            let alone = self.history.len() <= 1;
            if ids.len() + room <= ctx || (alone && ids.len() < ctx) {
                if dropped > 0 {
                    self.style.note(&format!("(the context is full: dropped the {dropped} oldest messages)"));
                }
                return Ok(Some(ids));
            }
            if self.history.len() <= 1 {
                self.style
                    .note(&format!("purehw: the prompt is {} tokens; the context holds {ctx} (-c sets it)", ids.len()));
                self.history.pop();
                return Ok(None);
            }
            // Up to the next user message, so the history still starts with one.
            let next_user = self.history.iter().skip(1).position(|m| m["role"] == "user").map_or(1, |i| i + 1);
            let n = next_user.min(self.history.len() - 1);
            self.history.drain(..n);
            dropped += n;
        }
    }

    /// Answer `msg`, streaming the reply; `Ok(false)` when stdout has closed.
    fn turn(&mut self, msg: &str, term: &Terminal) -> CliResult<bool> {
        self.history.push(json!({"role": "user", "content": msg}));
        let Some(prompt) = self.prompt()? else { return Ok(true) };
        let ctx = self.model.options().ctx;
        // (A sliding-window layer's ring may no longer hold the window before the common prefix.)
        let reuse = if self.reuse_cache {
            self.model.kv_resumable(0, common_prefix(&self.cached, &prompt).min(prompt.len() - 1))
        } else {
            0
        };
        let max_new = if self.n_predict == 0 { ctx } else { self.n_predict };

        let tok = self.tok;
        let Chat { model, stop_ids, sampler, .. } = &mut *self;
        let mut decoder = tok.decode_stream();
        let mut printed: Vec<u32> = Vec::new();
        let mut end = End::Length;
        let mut io_err: Option<CliError> = None;
        let mut closed = false;
        let (mut first, mut last) = (None, None);
        term.stop.store(false, SeqCst);
        term.replying.store(true, SeqCst);
        let t0 = Instant::now();
        let ids = generate_from(model, &prompt, reuse, max_new, sampler, false, |id| {
            let now = Instant::now();
            first.get_or_insert(now);
            last = Some(now);
            if term.stop.load(SeqCst) {
                end = End::Interrupted;
                return false;
            }
            if stop_ids.contains(&id) {
                end = End::Stop;
                return false;
            }
            printed.push(id);
            let piece = match decoder.push(id) {
                Ok(p) => p,
                Err(e) => {
                    io_err = Some(e.into());
                    return false;
                }
            };
            match out::print(&piece) {
                Ok(Ok(())) => true,
                Ok(Err(out::Closed)) => {
                    closed = true;
                    false
                }
                Err(e) => {
                    io_err = Some(e);
                    false
                }
            }
        });
        term.replying.store(false, SeqCst);
        let ids = match ids {
            Ok(ids) => ids,
            Err(e) => {
                // The slot's contents are unknown now: start the next turn from scratch.
                self.cached.clear();
                self.history.pop();
                return Err(e.into());
            }
        };
        // The slot holds the prompt and every id chosen but the last (never fed).
        self.cached.clear();
        self.cached.extend_from_slice(&prompt);
        self.cached.extend_from_slice(&ids[..ids.len().saturating_sub(1)]);
        if let Some(e) = io_err {
            return Err(e);
        }
        if closed {
            return Ok(false);
        }
        let rest = decoder.finish()?;
        if out::print(&format!("{rest}\n"))?.is_err() {
            return Ok(false);
        }

        if end == End::Interrupted && printed.is_empty() {
            // Nothing was said: the turn is undone.
            self.history.pop();
        } else {
            let text = self.tok.decode(&printed)?;
            self.history.push(json!({"role": "assistant", "content": text}));
        }

        // Stats: the prompt's rate over its prefill (up to the first token), the reply's over the
        // tokens after the first.
        let computed = prompt.len() - reuse;
        let rate = |n: usize, secs: f64| if secs > 0.0 { format!("{:.1} tok/s", n as f64 / secs) } else { "-".into() };
        let prefill = first.map_or(0.0, |f: Instant| (f - t0).as_secs_f64());
        let decode = match (first, last) {
            (Some(f), Some(l)) => (l - f).as_secs_f64(),
            _ => 0.0,
        };
        let why = match end {
            End::Stop => "",
            End::Interrupted => ", stopped",
            End::Length if prompt.len() + ids.len() > ctx => ", the context is full (/clear starts over)",
            End::Length => ", cut at -n",
        };
        self.style.note(&format!(
            "prompt {computed} tokens ({reuse} cached), {} · reply {} tokens, {}{why}",
            rate(computed, prefill),
            ids.len(),
            rate(ids.len().saturating_sub(1), decode),
        ));
        Ok(true)
    }
}

/// The prompt text's tokens, with BOS where the model wants one and the text lacks it
/// (templates usually print `{{ bos_token }}` themselves), as the server does.
fn encode(tok: &Tokenizer, text: &str) -> CliResult<Vec<u32>> {
    let bos = tok.bos_id().and_then(|i| tok.token_to_piece(i)).unwrap_or_default();
    let has_bos = !bos.is_empty() && text.starts_with(&bos);
    Ok(tok.encode(text, tok.add_bos_default() && tok.bos_id().is_some() && !has_bos)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(lines: &[&str]) -> Vec<String> {
        let mut l = Lines::default();
        lines.iter().filter_map(|s| l.push(s)).collect()
    }

    #[test]
    fn lines_join_backslash_and_blocks() {
        assert_eq!(feed(&["hello"]), ["hello"]);
        assert_eq!(feed(&["one \\", "two\\", "three", "next"]), ["one \ntwo\nthree", "next"]);
        assert_eq!(feed(&["\"\"\"", "a", "  b", "\"\"\"", "c"]), ["a\n  b\n", "c"]);
        assert_eq!(feed(&["\"\"\"first", "last\"\"\""]), ["first\nlast"]);
        assert_eq!(feed(&["\"\"\"inline\"\"\""]), ["inline"]);
        // A backslash inside a block is text.
        assert_eq!(feed(&["\"\"\"", "x \\", "\"\"\""]), ["x \\\n"]);
        let mut l = Lines::default();
        assert!(l.push("\"\"\"").is_none() && l.continuing());
        l.reset();
        assert!(!l.continuing());
        assert_eq!(l.push("fresh").as_deref(), Some("fresh"));
    }

    #[test]
    fn commands_parse() {
        assert_eq!(command("/exit"), Some(Command::Exit));
        assert_eq!(command("/bye"), Some(Command::Exit));
        assert_eq!(command("/clear"), Some(Command::Clear));
        assert_eq!(command("/system  Be brief. "), Some(Command::System("Be brief.")));
        assert_eq!(command("/system"), Some(Command::System("")));
        assert_eq!(command("/?"), Some(Command::Help));
        assert_eq!(command("/nope x"), Some(Command::Unknown("nope")));
        assert_eq!(command("no command"), None);
    }

    #[test]
    fn prefix_of_the_cache() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 3, 4]), 3);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 5, 3]), 1);
        assert_eq!(common_prefix(&[], &[1]), 0);
    }
}

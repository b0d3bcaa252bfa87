//! Chat templates: the model's Jinja `chat_template` rendered as HF transformers'
//! `tokenizer.apply_chat_template(messages, tools=…, add_generation_prompt=…)` does, on minijinja.
//!
//! What HF's renderer (`transformers.utils.chat_template_utils`) sets up, and what we mirror:
//! - an environment with `trim_blocks=True, lstrip_blocks=True`, the `loopcontrols` extension, no
//!   autoescaping and no kept trailing newline;
//! - lenient undefined values (Jinja2's default `Undefined`: prints empty, iterates empty, tests
//!   false; only reading an attribute of an undefined value fails);
//! - the globals `raise_exception(msg)` and `strftime_now(fmt)`, and a `tojson` filter that is
//!   Python's `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`
//!   (so `", "`/`": "` separators and no HTML escaping, unlike Jinja2's and minijinja's own);
//! - the context `messages`, `tools` (None when not given), `documents` (None),
//!   `add_generation_prompt`, `bos_token`, `eos_token`;
//! - Python's way of printing: `None`, `True`, `False`; Python string and dict methods
//!   (`.strip()`, `.startswith()`, `.split()`, `.items()`, `.get()`, …) through minijinja-contrib's
//!   `pycompat`.
//!
//! Differences that remain: `strftime_now` formats the current time in UTC (HF uses local time), and
//! only the directives listed at [`strftime`]; sequences print as minijinja does (`[1, "a"]`), not as
//! Python's repr; `{% generation %}` blocks are not supported.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior, Value, context};
use serde_json::Value as Json;

use super::tools;

/// Why a chat template could not be compiled or rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template does not compile.
    #[error("chat template of {label} does not compile: {message}")]
    Syntax {
        /// Where the template came from (a model name or file).
        label: String,
        /// What the parser says, with the line.
        message: String,
    },
    /// Rendering failed. For `raise_exception("…")` in the template, `message` is exactly that text.
    #[error("chat template: {message}")]
    Render {
        /// What went wrong.
        message: String,
    },
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template's name in `env`: the origin label given to [`ChatTemplate::new`].
    name: String,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("label", &self.name).field("len", &self.source.len()).finish()
    }
}

/// The error `raise_exception` raises, kept as the source of minijinja's error so that the message
/// comes back unchanged.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// How deep `tojson` goes before giving up (request JSON is already limited to 128 by serde_json).
const JSON_MAX_DEPTH: usize = 256;

impl ChatTemplate {
    /// Compile; a syntax error is an Err naming the problem (and the template origin `label`).
    pub fn new(label: &str, source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_debug(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        let name = if label.is_empty() { "chat_template".to_string() } else { label.to_string() };
        env.add_template_owned(name.clone(), source.to_string())
            .map_err(|e| TemplateError::Syntax { label: name.clone(), message: describe(&e) })?;
        Ok(ChatTemplate {
            env,
            name,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Render the conversation; `messages` and `tools` are the raw JSON values from the request
    /// (serde_json::Value) so unknown fields pass through to the template.
    ///
    /// `tools` reaches the template only when it is given and the template mentions tools
    /// ([`ChatTemplate::supports_tools`]); otherwise the template sees `tools = None`, as HF passes
    /// it (so both `tools is defined` / `tools is not none` and `if tools` checks behave as there).
    pub fn render(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let tools = match tools {
            Some(t) if self.supports_tools() => Value::from_serialize(t),
            _ => Value::from(()),
        };
        let ctx = context! {
            messages => Value::from_serialize(messages),
            tools => tools,
            documents => Value::from(()),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        let template = self.env.get_template(&self.name).map_err(|e| render_error(&e))?;
        template.render(ctx).map_err(|e| render_error(&e))
    }

    /// Render, coping with templates that take only string content or know nothing of tools.
    ///
    /// Tool history first: for a template that takes tools, `tool_calls` arguments given as JSON
    /// strings become objects ([`tools::object_arguments`]); for one that does not, tool calls and
    /// `tool` messages become text and `null` content `""` ([`tools::polyfill`]). Then content
    /// parts:
    ///
    /// 1. No message has list content: render the messages as given; errors are returned as-is.
    /// 2. Some message has list content (`[{"type":"text","text":…}, …]`) and the template does not
    ///    look at content parts (it mentions none of `'text'`, `.text`, `is string`, `is iterable`,
    ///    `is sequence`, `is mapping`): render [`flatten_content`]'s messages directly, since such
    ///    a template would otherwise fail or print the list's repr into the prompt.
    /// 3. Otherwise render the messages as given; if that fails with a render error (a type error
    ///    such as `str + list`, or the template's own `raise_exception` about content), retry with
    ///    flattened content and return that if it succeeds, or else the *first* error.
    pub fn render_lenient(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let adapted = if self.supports_tools() { tools::object_arguments(messages) } else { tools::polyfill(messages) };
        let messages = adapted.as_deref().unwrap_or(messages);
        let has_parts = messages.iter().any(|m| m.get("content").is_some_and(Json::is_array));
        if !has_parts {
            return self.render(messages, tools, add_generation_prompt);
        }
        if !self.handles_content_parts() {
            return self.render(&flatten_content(messages), tools, add_generation_prompt);
        }
        match self.render(messages, tools, add_generation_prompt) {
            Ok(s) => Ok(s),
            Err(first) => self.render(&flatten_content(messages), tools, add_generation_prompt).map_err(|_| first),
        }
    }

    /// Whether the template mentions tools (so tool definitions can be passed to it).
    pub fn supports_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// Whether the template seems to read list-of-parts content (see [`ChatTemplate::render_lenient`]).
    fn handles_content_parts(&self) -> bool {
        const MARKS: [&str; 8] =
            ["'text'", "\"text\"", ".text", "is string", "is not string", "is iterable", "is sequence", "is mapping"];
        MARKS.iter().any(|m| self.source.contains(m))
    }
}

/// Messages with list content (`[{"type":"text","text":"a"}, {"type":"image_url",…}, …]`) turned
/// into string content: the text parts' texts joined with `"\n"`; other parts are dropped (a part
/// with no `type` but a string `text` counts as text). Messages whose content is not a list, and
/// values that are not objects, are copied unchanged.
pub fn flatten_content(messages: &[Json]) -> Vec<Json> {
    messages
        .iter()
        .map(|m| {
            let Some(Json::Array(parts)) = m.get("content") else { return m.clone() };
            let texts: Vec<&str> = parts
                .iter()
                .filter(|p| p.get("type").is_none_or(|t| t.as_str() == Some("text")))
                .filter_map(|p| p.get("text").and_then(Json::as_str))
                .collect();
            let mut m = m.clone();
            if let Some(obj) = m.as_object_mut() {
                obj.insert("content".into(), Json::String(texts.join("\n")));
            }
            m
        })
        .collect()
}

/// A minijinja error as one line: kind, detail and line.
fn describe(e: &Error) -> String {
    let mut s = e.kind().to_string();
    if let Some(d) = e.detail() {
        let _ = write!(s, ": {d}");
    }
    if let Some(line) = e.line() {
        let _ = write!(s, " (line {line})");
    }
    s
}

/// A render failure: the message of `raise_exception` exactly when that is the cause.
fn render_error(e: &Error) -> TemplateError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<Raised>() {
            return TemplateError::Render { message: r.0.clone() };
        }
        cause = c.source();
    }
    TemplateError::Render { message: describe(e) }
}

/// `raise_exception(msg)`: fail the render with `msg`.
fn raise_exception(msg: Option<Value>) -> Result<Value, Error> {
    let msg = match msg {
        Some(v) => v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()),
        None => String::new(),
    };
    Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Raised(msg)))
}

/// `strftime_now(fmt)`: the current time (UTC) formatted by [`strftime`].
fn strftime_now(fmt: String) -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime(&fmt, secs)
}

/// Print values as Python does: `None`, `True`, `False`; everything else as minijinja does.
fn python_formatter(out: &mut minijinja::Output, state: &minijinja::State, value: &Value) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.write_str("None").map_err(Error::from),
        ValueKind::Bool => out.write_str(if value.is_true() { "True" } else { "False" }).map_err(Error::from),
        _ => minijinja::escape_formatter(out, state, value),
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// The civil date (year, month 1..=12, day 1..=31) of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// C's `strftime` for the UTC time `secs` after the Unix epoch. Directives: `%Y %y %m %d %e %j %B
/// %b %h %A %a %u %w %H %I %M %S %p %F %T %D %%`; glibc's `-` flag (`%-d`) drops the padding.
/// Anything else is copied as written.
pub fn strftime(fmt: &str, secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, sod / 60 % 60, sod % 60);
    let wd = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday; 0 = Monday
    const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(m - 1) as usize] + d + u32::from(m > 2 && is_leap(y));
    let month = MONTHS[(m - 1) as usize];
    let weekday = WEEKDAYS[wd];
    let h12 = if hh % 12 == 0 { 12 } else { hh % 12 };

    let mut out = String::with_capacity(fmt.len() + 16);
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let num = |out: &mut String, v: i64, width: usize| {
            let _ = if unpadded { write!(out, "{v}") } else { write!(out, "{v:0width$}") };
        };
        match chars.next() {
            Some('Y') => {
                let _ = write!(out, "{y}");
            }
            Some('y') => num(&mut out, y.rem_euclid(100), 2),
            Some('m') => num(&mut out, i64::from(m), 2),
            Some('d') => num(&mut out, i64::from(d), 2),
            Some('e') => {
                let _ = if unpadded { write!(out, "{d}") } else { write!(out, "{d:>2}") };
            }
            Some('j') => num(&mut out, i64::from(yday), 3),
            Some('B') => out.push_str(month),
            Some('b' | 'h') => out.push_str(&month[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('u') => num(&mut out, wd as i64 + 1, 1),
            Some('w') => num(&mut out, ((wd + 1) % 7) as i64, 1),
            Some('H') => num(&mut out, hh, 2),
            Some('I') => num(&mut out, h12, 2),
            Some('M') => num(&mut out, mm, 2),
            Some('S') => num(&mut out, ss, 2),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('F') => {
                let _ = write!(out, "{y}-{m:02}-{d:02}");
            }
            Some('T') => {
                let _ = write!(out, "{hh:02}:{mm:02}:{ss:02}");
            }
            Some('D') => {
                let _ = write!(out, "{m:02}/{d:02}/{:02}", y.rem_euclid(100));
            }
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
            }
        }
    }
    out
}

/// How `tojson` lays out its output (Python's `json.dumps` arguments).
struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

/// The `tojson` filter as HF defines it: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, each settable by keyword.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                let n = v.as_i64().ok_or_else(|| {
                    Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an integer or a string")
                })?;
                Some(" ".repeat(n.clamp(0, 64) as usize))
            }
        },
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Value>>("separators")? {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .filter(|p: &Vec<String>| p.len() == 2)
                .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, "tojson: separators must be two strings"))?;
            (parts[0].clone(), parts[1].clone())
        }
        _ => (if indent.is_some() { "," } else { ", " }.to_string(), ": ".to_string()),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let style = JsonStyle { indent, item_sep, key_sep, sort_keys, ensure_ascii };
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(out: &mut String, v: &Value, style: &JsonStyle, depth: usize) -> Result<(), Error> {
    if depth > JSON_MAX_DEPTH {
        return Err(Error::new(ErrorKind::InvalidOperation, "tojson: value nested too deeply"));
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(ind) = &style.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number if v.is_integer() => {
            let _ = write!(out, "{v}");
        }
        ValueKind::Number => match f64::try_from(v.clone()) {
            Ok(f) => write_float(out, f),
            Err(_) => {
                let _ = write!(out, "{v}");
            }
        },
        ValueKind::String => write_json_str(out, v.as_str().unwrap_or_default(), style.ensure_ascii),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            let key_text = |k: &Value| match k.kind() {
                ValueKind::String => k.as_str().unwrap_or_default().to_string(),
                ValueKind::None => "null".to_string(),
                ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).to_string(),
                _ => k.to_string(),
            };
            if style.sort_keys {
                keys.sort_by_key(|k| key_text(k));
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                write_json_str(out, &key_text(k), style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_json(out, &v.get_item(k)?, style, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, style, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Bytes | ValueKind::Plain | ValueKind::Invalid | _ => {
            write_json_str(out, &v.to_string(), style.ensure_ascii);
        }
    }
    Ok(())
}

/// A float as Python's `repr` (which `json.dumps` uses): `1.0`, `0.5`, `1e-05`, `1e+16`.
fn write_float(out: &mut String, f: f64) {
    if f.is_nan() {
        out.push_str("NaN");
    } else if f.is_infinite() {
        out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
    } else if f != 0.0 && (f.abs() < 1e-4 || f.abs() >= 1e16) {
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        let _ = write!(out, "{mantissa}e{sign}{digits:0>2}");
    } else {
        let s = format!("{f}");
        out.push_str(&s);
        if !s.contains('.') {
            out.push_str(".0");
        }
    }
}

/// A JSON string as Python's `json.dumps` writes it.
fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    const GEMMA_DIR: &str = "/root/.cache/purehw/models/gemma3-270m";
    const SMOL_GGUF: &str = "/root/.cache/purehw/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf";

    fn gemma() -> Option<ChatTemplate> {
        let path = Path::new(GEMMA_DIR).join("tokenizer_config.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            eprintln!("skipping: {} is absent", path.display());
            return None;
        };
        let cfg: Json = serde_json::from_str(&text).expect("tokenizer_config.json parses");
        let source = cfg["chat_template"].as_str().expect("chat_template is a string");
        Some(ChatTemplate::new("gemma3-270m", source, "<bos>", "<end_of_turn>").expect("gemma template compiles"))
    }

    fn smollm2() -> Option<ChatTemplate> {
        let path = Path::new(SMOL_GGUF);
        if !path.is_file() {
            eprintln!("skipping: {} is absent", path.display());
            return None;
        }
        let source = purehw_core::source::ModelSource::open(path).expect("gguf opens");
        let template = source.chat_template().expect("the gguf has tokenizer.chat_template");
        Some(ChatTemplate::new("smollm2-135m", &template, "<|im_start|>", "<|im_end|>").expect("smollm2 compiles"))
    }

    fn render_err(r: Result<String, TemplateError>) -> String {
        match r {
            Err(TemplateError::Render { message }) => message,
            other => panic!("expected a render error, got {other:?}"),
        }
    }

    #[test]
    fn gemma_system_and_user() {
        let Some(t) = gemma() else { return };
        let msgs =
            [json!({"role": "system", "content": "You are terse."}), json!({"role": "user", "content": " Hi! \n"})];
        assert_eq!(
            t.render(&msgs, None, true).unwrap(),
            "<bos><start_of_turn>user\nYou are terse.\n\nHi!<end_of_turn>\n<start_of_turn>model\n"
        );
        assert_eq!(
            t.render(&msgs, None, false).unwrap(),
            "<bos><start_of_turn>user\nYou are terse.\n\nHi!<end_of_turn>\n"
        );
        assert!(!t.supports_tools());
    }

    #[test]
    fn gemma_multi_turn_and_parts() {
        let Some(t) = gemma() else { return };
        let msgs = [
            json!({"role": "user", "content": [{"type": "text", "text": "Look "}, {"type": "image"}, {"type": "text", "text": " here"}]}),
            json!({"role": "assistant", "content": "Sure."}),
            json!({"role": "user", "content": "Thanks", "name": "ignored-extra-field"}),
        ];
        let want = "<bos><start_of_turn>user\nLook<start_of_image>here<end_of_turn>\n<start_of_turn>model\nSure.<end_of_turn>\n<start_of_turn>user\nThanks<end_of_turn>\n<start_of_turn>model\n";
        assert_eq!(t.render(&msgs, None, true).unwrap(), want);
        // The template reads parts, so render_lenient passes them through unchanged.
        assert_eq!(t.render_lenient(&msgs, None, true).unwrap(), want);
        // A system message given as parts: the template takes its first part's text.
        let msgs = [
            json!({"role": "system", "content": [{"type": "text", "text": "Sys"}]}),
            json!({"role": "user", "content": "Q"}),
        ];
        assert_eq!(
            t.render(&msgs, None, true).unwrap(),
            "<bos><start_of_turn>user\nSys\n\nQ<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn gemma_errors() {
        let Some(t) = gemma() else { return };
        let msgs = [json!({"role": "user", "content": "a"}), json!({"role": "user", "content": "b"})];
        let msg = render_err(t.render(&msgs, None, true));
        assert_eq!(msg, "Conversation roles must alternate user/assistant/user/assistant/...");
        let e = t.render(&msgs, None, true).unwrap_err();
        assert_eq!(e.to_string(), "chat template: Conversation roles must alternate user/assistant/user/assistant/...");
        // render_lenient gives back the first error when flattening does not help.
        assert!(render_err(t.render_lenient(&msgs, None, true)).contains("Conversation roles must alternate"));
        // Malformed messages: the template decides, we do not panic.
        let msg = render_err(t.render(&[json!({"role": "user", "content": 3})], None, true));
        assert_eq!(msg, "Invalid content type");
        assert!(t.render(&[], None, true).is_err()); // messages[0]['role'] of an empty list
        let _ = t.render(&[json!({"content": "no role"})], None, true);
        let _ = t.render(&[json!("not an object"), json!(null), json!([1, 2])], None, true);
        let _ = t.render_lenient(&[json!({"role": "user", "content": [1, {"type": "text"}]})], None, true);
    }

    #[test]
    fn smollm2_chatml() {
        let Some(t) = smollm2() else { return };
        let default_sys =
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";
        let msgs = [json!({"role": "user", "content": "Hello"})];
        assert_eq!(
            t.render(&msgs, None, true).unwrap(),
            format!("{default_sys}<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
        );
        let msgs = [json!({"role": "system", "content": "Be brief."}), json!({"role": "user", "content": "Hi"})];
        assert_eq!(
            t.render(&msgs, None, false).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
        // List content: this template only takes strings (`str + list` fails), so render_lenient
        // flattens the text parts.
        let msgs = [
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "b"}]}),
        ];
        assert!(t.render(&msgs, None, true).is_err());
        assert_eq!(
            t.render_lenient(&msgs, None, true).unwrap(),
            format!("{default_sys}<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n")
        );
        assert!(!t.supports_tools());
    }

    const CHATML_TOOLS: &str = r#"{%- if tools %}
<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You are helpful.' }}

# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% elif messages[0].role == 'system' %}
<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
  {%- if message.role == 'system' %}{% continue %}{% endif %}
  {%- if message.tool_calls is defined %}
<|im_start|>{{ message.role }}
{%- for call in message.tool_calls %}
<tool_call>{{ call.function | tojson }}</tool_call>
{%- endfor %}<|im_end|>
  {% else %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
  {% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"#;

    #[test]
    fn chatml_with_tools() {
        let t = ChatTemplate::new("chatml-tools", CHATML_TOOLS, "", "<|im_end|>").unwrap();
        assert!(t.supports_tools());
        // Keys in sorted order, so the test holds with or without serde_json's `preserve_order`.
        let tools = [
            json!({"function": {"description": "Weather <now> & \"later\"", "name": "get_weather", "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}}, "type": "function"}),
        ];
        let msgs = [
            json!({"role": "user", "content": "Weather in Paris?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"function": {"arguments": {"city": "Paris"}, "name": "get_weather"}, "id": "c1", "type": "function"}]}),
            json!({"role": "tool", "content": "18C"}),
        ];
        let want = concat!(
            "<|im_start|>system\nYou are helpful.\n\n# Tools\n<tools>",
            r#"{"function": {"description": "Weather <now> & \"later\"", "name": "get_weather", "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}}, "type": "function"}"#,
            "</tools><|im_end|>\n",
            "<|im_start|>user\nWeather in Paris?<|im_end|>\n",
            "<|im_start|>assistant",
            r#"<tool_call>{"arguments": {"city": "Paris"}, "name": "get_weather"}</tool_call><|im_end|>"#,
            "\n<|im_start|>tool\n18C<|im_end|>\n<|im_start|>assistant\n",
        );
        assert_eq!(t.render(&msgs, Some(&tools), true).unwrap(), want);
        // No tools: `tools` is None; the system block is skipped.
        let out = t.render(&msgs[..1], None, false).unwrap();
        assert_eq!(out, "<|im_start|>user\nWeather in Paris?<|im_end|>\n");
        let out = t.render(&[json!({"role": "system", "content": "S"}), msgs[0].clone()], Some(&[]), false).unwrap();
        assert_eq!(out, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n");
    }

    /// Qwen2.5-Instruct's chat template (tool calls and tool results as Qwen renders them).
    const QWEN25: &str = include_str!("../../tests/data/qwen25.jinja");

    /// A conversation with a tool call and its results, as an OpenAI client sends it (arguments
    /// as a JSON string, `content: null`).
    fn tool_history() -> Vec<Json> {
        vec![
            json!({"role": "user", "content": "Weather in Paris and Rome?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}},
            ]}),
            json!({"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18C"}),
            json!({"role": "tool", "tool_call_id": "call_2", "name": "get_weather", "content": "25C"}),
        ]
    }

    #[test]
    fn qwen25_tool_calls_and_results() {
        let t = ChatTemplate::new("qwen2.5", QWEN25, "", "<|im_end|>").unwrap();
        assert!(t.supports_tools());
        let tools =
            [json!({"function": {"name": "get_weather", "parameters": {"type": "object"}}, "type": "function"})];
        let mut msgs = tool_history();
        msgs[1]["content"] = "Checking.".into();
        let want = concat!(
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n",
            "You may call one or more functions to assist with the user query.\n\n",
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
            r#"{"function": {"name": "get_weather", "parameters": {"type": "object"}}, "type": "function"}"#,
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments within ",
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n",
            "</tool_call><|im_end|>\n",
            "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n",
            "<|im_start|>assistant\nChecking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            "\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call><|im_end|>\n",
            "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n25C\n</tool_response><|im_end|>\n",
            "<|im_start|>assistant\n",
        );
        assert_eq!(t.render_lenient(&msgs, Some(&tools), true).unwrap(), want);
        // As given, the string arguments would print quoted: render_lenient makes them objects.
        let raw = t.render(&msgs, Some(&tools), true).unwrap();
        assert!(raw.contains(r#""arguments": "{\"city\": \"Paris\"}""#), "{raw}");
        // `content: null` on the assistant turn; no tools in this request.
        let out = t.render_lenient(&tool_history(), None, false).unwrap();
        assert!(out.contains("<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\""), "{out}");
        assert!(out.ends_with("</tool_response><|im_end|>\n"), "{out}");
    }

    #[test]
    fn tool_history_on_templates_without_tools() {
        // A template that concatenates string content and insists on alternating roles, like
        // Gemma's: tool results become one user turn, tool calls text, `null` content "".
        let src = "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}";
        let t = ChatTemplate::new("alt", src, "", "").unwrap();
        assert!(!t.supports_tools());
        assert!(t.render(&tool_history(), None, false).is_err());
        let out = t.render_lenient(&tool_history(), None, false).unwrap();
        assert_eq!(
            out,
            concat!(
                "user: Weather in Paris and Rome?\n",
                r#"assistant: {"tool_calls":[{"arguments":{"city":"Paris"},"id":"call_1","name":"get_weather"},{"arguments":{"city":"Rome"},"id":"call_2","name":"get_weather"}]}"#,
                "\n",
                r#"user: {"tool_response":{"content":"18C","tool":"get_weather","tool_call_id":"call_1"}}"#,
                "\n",
                r#"{"tool_response":{"content":"25C","tool":"get_weather","tool_call_id":"call_2"}}"#,
                "\n",
            )
        );
        // An assistant turn with `content: null` and no tool calls.
        let msgs = [json!({"role": "user", "content": "a"}), json!({"role": "assistant", "content": null})];
        assert_eq!(t.render_lenient(&msgs, None, false).unwrap(), "user: a\nassistant: \n");
        // The served models' own templates take it too.
        if let Some(t) = smollm2() {
            let out = t.render_lenient(&tool_history(), None, true).unwrap();
            assert!(out.contains("<|im_start|>user\n{\"tool_response\""), "{out}");
        }
        if let Some(t) = gemma() {
            let out = t.render_lenient(&tool_history(), None, true).unwrap();
            assert!(out.ends_with("<start_of_turn>model\n"), "{out}");
        }
    }

    #[test]
    fn tojson_like_python() {
        let t = ChatTemplate::new(
            "j",
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(separators=(',', ':'), sort_keys=true) }}|{{ 'é' | tojson(ensure_ascii=true) }}|{{ [1.0, 0.5, 1e-7, 1e20, none, true] | tojson }}|{{ {} | tojson }}",
            "",
            "",
        )
        .unwrap();
        let env = &t.env;
        let tmpl = env.get_template("j").unwrap();
        let out = tmpl.render(context! { x => Value::from_serialize(json!({"b": [1, "a\n"], "a": {}})) }).unwrap();
        // Keys keep the order they were given in (serde_json's preserve_order), as a Python dict
        // does; sort_keys sorts them.
        assert_eq!(
            out,
            "{\"b\": [1, \"a\\n\"], \"a\": {}}|{\n  \"b\": [\n    1,\n    \"a\\n\"\n  ],\n  \"a\": {}\n}|{\"a\":{},\"b\":[1,\"a\\n\"]}|\"\\u00e9\"|[1.0, 0.5, 1e-07, 1e+20, null, true]|{}"
        );
    }

    #[test]
    fn python_methods_and_printing() {
        let src = "{% for m in messages %}[{{ m.content.strip() }}|{{ m.content.lstrip() }}|{{ m.content.rstrip() }}|{{ m.content.strip().upper() }}|{{ m.content.startswith('  he') }}|{{ m.content.strip().split(' ') | join(',') }}|{{ m.content.replace('l', 'L') }}|{{ m.get('missing', 'dflt') }}|{{ m.get('x') }}|{% for k, v in m.items() %}{{ k }}={{ v | trim }};{% endfor %}]{% endfor %}";
        let t = ChatTemplate::new("py", src, "", "").unwrap();
        let out = t.render(&[json!({"content": "  hello world  "})], None, false).unwrap();
        assert_eq!(
            out,
            "[hello world|hello world  |  hello world|HELLO WORLD|True|hello,world|  heLLo worLd  |dflt|None|content=hello world;]"
        );
        // Trim/lstrip blocks as HF sets them, and undefined values print empty.
        let t = ChatTemplate::new("ws", "  {% if true %}\nA{{ nothing }}\n  {% endif %}\nB\n", "", "").unwrap();
        assert_eq!(t.render(&[], None, false).unwrap(), "A\nB");
        // `bos_token`/`eos_token`/`add_generation_prompt` are there.
        let t = ChatTemplate::new("tok", "{{ bos_token }}{{ add_generation_prompt }}{{ eos_token }}", "<s>", "</s>")
            .unwrap();
        assert_eq!(t.render(&[], None, true).unwrap(), "<s>True</s>");
    }

    #[test]
    fn strftime_formats() {
        // 2024-07-26 09:05:03 UTC, a Friday.
        let secs = 1_721_984_703;
        assert_eq!(strftime("%d %b %Y", secs), "26 Jul 2024");
        assert_eq!(
            strftime("%B %-d, %Y %H:%M:%S %a %A %j %p %I %y %m %e|%q%%", secs),
            "July 26, 2024 09:05:03 Fri Friday 208 AM 09 24 07 26|%q%"
        );
        assert_eq!(strftime("%F %T %-m/%-d %u %w", 0), "1970-01-01 00:00:00 1/1 4 4");
        assert_eq!(strftime("%Y-%m-%d %a", 951_782_400), "2000-02-29 Tue");
        assert_eq!(strftime("%Y-%m-%d", -86_400), "1969-12-31");
        assert_eq!(strftime("trailing %", 0), "trailing %");
        // Through the template: today's date, in the shape asked for.
        let t = ChatTemplate::new("date", "Today: {{ strftime_now('%Y-%m-%d') }}", "", "").unwrap();
        let out = t.render(&[], None, false).unwrap();
        let date = out.strip_prefix("Today: ").unwrap();
        assert_eq!(date.len(), 10, "{out}");
        assert!(date.starts_with("20") && date.as_bytes()[4] == b'-' && date.as_bytes()[7] == b'-', "{out}");
    }

    #[test]
    fn errors() {
        match ChatTemplate::new("broken", "{% for m in messages %}{{ m.content }", "", "") {
            Err(e @ TemplateError::Syntax { .. }) => {
                let s = e.to_string();
                assert!(s.starts_with("chat template of broken does not compile: syntax error"), "{s}");
                assert!(s.contains("(line 1)"), "{s}");
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
        let t =
            ChatTemplate::new("raise", "{{ raise_exception('Only user and assistant roles are supported!') }}", "", "")
                .unwrap();
        assert_eq!(render_err(t.render(&[], None, true)), "Only user and assistant roles are supported!");
        // Raised from inside a macro and a loop, it still comes back unchanged.
        let src = "{% macro check(m) %}{% for x in [m] %}{% if x.role != 'user' %}{{ raise_exception('bad role: ' + x.role) }}{% endif %}{% endfor %}{% endmacro %}{% for m in messages %}{{ check(m) }}{% endfor %}";
        let t = ChatTemplate::new("macro", src, "", "").unwrap();
        assert_eq!(render_err(t.render(&[json!({"role": "bot"})], None, true)), "bad role: bot");
        // A type error names itself and its line.
        let t = ChatTemplate::new("type", "x\n{{ 'a' + messages[0].content }}", "", "").unwrap();
        let msg = render_err(t.render(&[json!({"content": [1]})], None, true));
        assert!(msg.starts_with("invalid operation") && msg.ends_with("(line 2)"), "{msg}");
        // Attribute of an undefined value fails, as in Jinja2.
        let t = ChatTemplate::new("undef", "{{ nothing.attr }}", "", "").unwrap();
        assert!(t.render(&[], None, true).is_err());
    }

    #[test]
    fn flatten() {
        let msgs = [
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}, {"text": "b"}, {"type": "text"}]}),
            json!({"role": "assistant", "content": "plain"}),
            json!({"role": "user", "content": []}),
            json!("odd"),
        ];
        let flat = flatten_content(&msgs);
        assert_eq!(flat[0], json!({"role": "user", "content": "a\nb"}));
        assert_eq!(flat[1], msgs[1]);
        assert_eq!(flat[2], json!({"role": "user", "content": ""}));
        assert_eq!(flat[3], msgs[3]);
    }
}

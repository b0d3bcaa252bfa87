//! Tool calls: OpenAI's `tool_calls` out of the text a model writes, and tool history into the
//! shape chat templates expect.
//!
//! Replies are parsed only when the request gave tools, `tool_choice` is not `none` and the chat
//! template takes tools (a forced call, below, whatever the template). The formats of the common open models:
//! - Hermes / Qwen2.5 / Qwen3: `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, repeated;
//! - Mistral: `[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`, and the newer
//!   `[TOOL_CALLS]name[ARGS]{…}` (one marker per call);
//! - Llama 3.1/3.2: the whole reply (after an optional `<|python_tag|>`) is
//!   `{"name": …, "parameters": {…}}`, an array of such, or several separated by `;`. Taken only
//!   when every name is one of the request's tools, so an ordinary JSON answer stays content.
//!
//! `arguments` may be an object or a string holding JSON; either way the call carries it as compact
//! JSON text. Markup that does not parse stays content: a reply never fails because of it.
//!
//! [`ToolStream`] does the same for a streamed reply: text goes out as it comes until it may be
//! the start of a tool call, then the rest is held back and parsed at the end.
//!
//! A forced call (`tool_choice` "required" or a named function) is shaped by the JSON guard as
//! `{"name": …, "arguments": {…}}` whatever the template: [`parse_forced`] takes it whole, and
//! [`ForcedStream`] streams it as OpenAI does, the name first, then the arguments in pieces.

use serde_json::{Deserializer, Map, Value, json};

use super::api::fresh_u64;
use super::engine::partial_tail;
use super::json_guard::{CALL_HEAD, CALL_MID};

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";
const MISTRAL_CALL_ID: &str = "[CALL_ID]";
const PYTHON_TAG: &str = "<|python_tag|>";
/// Markers that may start a tool call anywhere in a reply.
const MARKERS: [&str; 2] = [HERMES_OPEN, MISTRAL];

/// One call, as OpenAI returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    /// `call_` and 24 hex digits, unique per call.
    pub id: String,
    pub name: String,
    /// JSON text: compact, except a forced call's, kept as the model wrote it.
    pub arguments: String,
}

impl ToolCall {
    fn new(name: String, arguments: String) -> Self {
        ToolCall { id: format!("call_{:016x}{:08x}", fresh_u64(), fresh_u64() as u32), name, arguments }
    }

    /// An entry of `message.tool_calls`.
    pub fn to_json(&self) -> Value {
        json!({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}})
    }

    /// An entry of a streamed `delta.tool_calls`: the whole call in one chunk.
    pub fn to_delta(&self, index: usize) -> Value {
        let mut v = self.to_json();
        v["index"] = index.into();
        v
    }
}

/// A reply that held tool calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// The text around the calls; `None` when only whitespace.
    pub content: Option<String>,
    /// At least one.
    pub calls: Vec<ToolCall>,
}

/// The tool calls in `text`, or `None` when it has none (or its markup does not parse): then the
/// whole text is content. `names`: the request's tool names, which the bare-JSON form must use.
pub fn parse(text: &str, names: &[String]) -> Option<Parsed> {
    if text.contains(HERMES_OPEN)
        && let Some(p) = parse_hermes(text)
    {
        return Some(p);
    }
    if text.contains(MISTRAL)
        && let Some(p) = parse_mistral(text)
    {
        return Some(p);
    }
    parse_bare(text, names)
}

/// `lead` and `tail` as one content; `tail` (text between and after calls) counts only if it has
/// more than whitespace.
fn content_of(lead: &str, tail: &str) -> Option<String> {
    let mut s = lead.to_string();
    if !tail.trim().is_empty() {
        s.push_str(tail);
    }
    (!s.trim().is_empty()).then_some(s)
}

fn done(lead: &str, tail: &str, calls: Vec<ToolCall>) -> Option<Parsed> {
    (!calls.is_empty()).then(|| Parsed { content: content_of(lead, tail), calls })
}

/// `<tool_call>JSON</tool_call>` blocks; the last may lack its closing tag (generation ended).
fn parse_hermes(text: &str) -> Option<Parsed> {
    let start = text.find(HERMES_OPEN)?;
    let lead = &text[..start];
    let mut rest = &text[start..];
    let mut tail = String::new();
    let mut calls = Vec::new();
    while let Some(i) = rest.find(HERMES_OPEN) {
        tail.push_str(&rest[..i]);
        let body = &rest[i + HERMES_OPEN.len()..];
        let (inner, next) = match body.find(HERMES_CLOSE) {
            Some(j) => (&body[..j], &body[j + HERMES_CLOSE.len()..]),
            None => (body, ""),
        };
        let v: Value = serde_json::from_str(inner.trim()).ok()?;
        calls.push(call_of(&v, None)?);
        rest = next;
    }
    tail.push_str(rest);
    done(lead, &tail, calls)
}

/// `[TOOL_CALLS][{…}, …]` or `[TOOL_CALLS]name[ARGS]{…}` (optionally `name[CALL_ID]id[ARGS]{…}`),
/// each call with its own marker in the latter form.
fn parse_mistral(text: &str) -> Option<Parsed> {
    let start = text.find(MISTRAL)?;
    let lead = &text[..start];
    let mut tail = String::new();
    let mut calls = Vec::new();
    for seg in text[start + MISTRAL.len()..].split(MISTRAL) {
        let seg = seg.trim_start();
        let rest = if seg.starts_with('[') {
            let (v, rest) = first_json(seg)?;
            for item in v.as_array()? {
                calls.push(call_of(item, None)?);
            }
            rest
        } else {
            let (head, args) = seg.split_once(MISTRAL_ARGS)?;
            let name = head.split_once(MISTRAL_CALL_ID).map_or(head, |(n, _)| n).trim();
            if !is_name(name) {
                return None;
            }
            let (v, rest) = first_json(args)?;
            calls.push(ToolCall::new(name.to_string(), arguments_of(Some(&v))?));
            rest
        };
        tail.push_str(rest);
    }
    done(lead, &tail, calls)
}

/// The whole reply as JSON call(s), with names from the request's tools only.
fn parse_bare(text: &str, names: &[String]) -> Option<Parsed> {
    let t = text.trim();
    let mut rest = t.strip_prefix(PYTHON_TAG).unwrap_or(t).trim_start();
    if !rest.starts_with(['{', '[']) {
        return None;
    }
    let mut calls = Vec::new();
    while !rest.is_empty() {
        let (v, r) = first_json(rest)?;
        match &v {
            Value::Array(items) if !items.is_empty() => {
                for item in items {
                    calls.push(call_of(item, Some(names))?);
                }
            }
            Value::Object(_) => calls.push(call_of(&v, Some(names))?),
            _ => return None,
        }
        // Llama 3.2 separates several calls with `;`.
        rest = r.trim_start().trim_start_matches(';').trim_start();
    }
    done("", "", calls)
}

/// The first JSON value in `s` (after whitespace) and the text after it.
fn first_json(s: &str) -> Option<(Value, &str)> {
    let mut it = Deserializer::from_str(s).into_iter::<Value>();
    let v = it.next()?.ok()?;
    Some((v, &s[it.byte_offset()..]))
}

/// `{"name", "arguments"|"parameters"}` (also wrapped as `{"function": {…}}`) as a call; with
/// `names`, the name must be one of them.
fn call_of(v: &Value, names: Option<&[String]>) -> Option<ToolCall> {
    let o = v.as_object()?;
    let o = match (o.get("name"), o.get("function")) {
        (None, Some(Value::Object(f))) => f,
        _ => o,
    };
    let name = o.get("name")?.as_str()?.trim();
    if !is_name(name) || names.is_some_and(|ns| !ns.iter().any(|n| n == name)) {
        return None;
    }
    let args = arguments_of(o.get("arguments").or_else(|| o.get("parameters")))?;
    Some(ToolCall::new(name.to_string(), args))
}

/// Arguments as compact JSON: an object (or any JSON value) as is, a string holding JSON parsed
/// first, absent or empty as `{}`. A string that is not JSON is malformed.
fn arguments_of(v: Option<&Value>) -> Option<String> {
    match v {
        None | Some(Value::Null) => Some("{}".into()),
        Some(Value::String(s)) if s.trim().is_empty() => Some("{}".into()),
        Some(Value::String(s)) => serde_json::from_str::<Value>(s).ok().map(|v| v.to_string()),
        Some(v) => Some(v.to_string()),
    }
}

/// A plausible function name: not empty, no whitespace or markup.
fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && !s.contains(|c: char| c.is_whitespace() || matches!(c, '[' | ']' | '<' | '>'))
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Only whitespace so far: the reply may still be a bare JSON call.
    Start,
    /// Ordinary text, watched for a marker.
    Text,
    /// From a possible tool call on: held until the end.
    Held,
}

/// A streamed reply's tool calls: [`ToolStream::feed`] each piece of text and send what it returns;
/// at the end, [`ToolStream::finish`] gives the rest. What is sent in all equals what [`parse`]
/// makes of the whole text.
#[derive(Debug)]
pub struct ToolStream {
    names: Vec<String>,
    held: String,
    phase: Phase,
}

impl ToolStream {
    pub fn new(names: Vec<String>) -> Self {
        ToolStream { names, held: String::new(), phase: Phase::Start }
    }

    /// Add `text`; returns the content that may be sent now.
    pub fn feed(&mut self, text: &str) -> String {
        self.held.push_str(text);
        if self.phase == Phase::Start {
            let t = self.held.trim_start();
            if t.is_empty() || PYTHON_TAG.starts_with(t) {
                return String::new();
            }
            self.phase = if t.starts_with(['{', '[']) || t.starts_with(PYTHON_TAG) { Phase::Held } else { Phase::Text };
        }
        if self.phase == Phase::Held {
            return String::new();
        }
        let cut = match MARKERS.iter().filter_map(|m| self.held.find(m)).min() {
            Some(i) => {
                self.phase = Phase::Held;
                i
            }
            None => self.held.len() - partial_tail(&self.held, MARKERS),
        };
        self.held.drain(..cut).collect()
    }

    /// The end of the reply: content still to send, and the calls (empty if none parsed).
    pub fn finish(&mut self) -> (String, Vec<ToolCall>) {
        let held = std::mem::take(&mut self.held);
        if self.phase == Phase::Held
            && let Some(p) = parse(&held, &self.names)
        {
            return (p.content.unwrap_or_default(), p.calls);
        }
        (held, Vec::new())
    }
}

/// A forced call's reply (`tool_choice` "required" or named), shaped by the JSON guard as
/// `{"name": "N", "arguments": A}`: the call, with `A` exactly as the model wrote it (valid JSON
/// by construction, so streamed pieces and the whole agree). `None` if the text is not one.
pub fn parse_forced(text: &str, names: &[String]) -> Option<ToolCall> {
    let (name, rest) = text.strip_prefix(CALL_HEAD)?.split_once(CALL_MID)?;
    let args = rest.strip_suffix('}')?;
    let ok = names.iter().any(|n| n == name) && serde_json::from_str::<Value>(args).is_ok_and(|v| v.is_object());
    ok.then(|| ToolCall::new(name.to_string(), args.to_string()))
}

/// [`parse_forced`] for a streamed reply: the call goes out as soon as its name is known, then its
/// arguments piece by piece (the last byte held back: the reply's final `}` is not theirs).
#[derive(Default)]
pub struct ForcedStream {
    held: String,
    /// Set once the name is known (and sent).
    call: Option<ToolCall>,
}

impl ForcedStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `text`; the `delta.tool_calls` entry to send now, if any.
    pub fn feed(&mut self, text: &str) -> Option<Value> {
        self.held.push_str(text);
        let start = self.call.is_none();
        if start {
            let (name, rest) = self.held.strip_prefix(CALL_HEAD)?.split_once(CALL_MID)?;
            let call = ToolCall::new(name.to_string(), String::new());
            self.held = rest.to_string();
            self.call = Some(call);
        }
        let keep = self.held.char_indices().next_back().map_or(0, |(i, _)| i);
        let piece: String = self.held.drain(..keep).collect();
        let call = self.call.as_ref()?;
        if start {
            let mut d = call.to_delta(0);
            d["function"]["arguments"] = piece.into();
            return Some(d);
        }
        (!piece.is_empty()).then(|| json!({"index": 0, "function": {"arguments": piece}}))
    }

    /// The end of the reply: the last arguments piece (or `None`), and whether a call was sent;
    /// when none was, the text to send as content instead.
    pub fn finish(&mut self) -> (Option<Value>, Result<(), String>) {
        let held = std::mem::take(&mut self.held);
        if self.call.is_none() {
            return (None, Err(held));
        }
        let piece = held.strip_suffix('}').unwrap_or(&held);
        ((!piece.is_empty()).then(|| json!({"index": 0, "function": {"arguments": piece}})), Ok(()))
    }
}

/// The request's tool names (`tools[].function.name`).
pub fn tool_names(tools: &[Value]) -> Vec<String> {
    tools.iter().filter_map(|t| t.get("function")?.get("name")?.as_str().map(String::from)).collect()
}

// ---------------------------------------------------------------------------------------------
// History

/// For templates that take tools: `tool_calls[].function.arguments` given as a JSON string (as
/// OpenAI clients send them) become objects, as HF templates expect (they print them with
/// `tojson`; vLLM does the same). `None` when nothing changes.
pub fn object_arguments(messages: &[Value]) -> Option<Vec<Value>> {
    let parsed = |c: &Value| {
        let s = c.get("function")?.get("arguments")?.as_str()?;
        serde_json::from_str::<Value>(s).ok().filter(Value::is_object)
    };
    let calls = |m: &Value| m.get("tool_calls").and_then(Value::as_array).cloned().unwrap_or_default();
    if !messages.iter().any(|m| calls(m).iter().any(|c| parsed(c).is_some())) {
        return None;
    }
    let out = messages
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if let Some(Value::Array(cs)) = m.get_mut("tool_calls") {
                for c in cs.iter_mut() {
                    if let Some(args) = parsed(c)
                        && let Some(f) = c.get_mut("function").and_then(Value::as_object_mut)
                    {
                        f.insert("arguments".into(), args);
                    }
                }
            }
            m
        })
        .collect();
    Some(out)
}

/// For templates that know nothing of tools (so they neither fail nor drop the history, as
/// llama.cpp does it): an assistant message's `tool_calls` become JSON text in its content
/// (`{"tool_calls": [{"name", "arguments", "id"}]}` after any text), a run of `tool` messages
/// becomes one `user` message of `{"tool_response": {"tool", "tool_call_id", "content"}}` lines,
/// and `null` or missing content becomes `""`. `None` when nothing changes.
pub fn polyfill(messages: &[Value]) -> Option<Vec<Value>> {
    let needs = |m: &Value| {
        m.get("role").and_then(Value::as_str) == Some("tool")
            || m.get("tool_calls").is_some()
            || m.get("content").is_none_or(Value::is_null)
    };
    if !messages.iter().any(needs) {
        return None;
    }
    let mut out: Vec<Value> = Vec::with_capacity(messages.len());
    let mut last_was_tool = false;
    for m in messages {
        let Some(o) = m.as_object() else {
            out.push(m.clone());
            last_was_tool = false;
            continue;
        };
        let mut o = o.clone();
        let is_tool = o.get("role").and_then(Value::as_str) == Some("tool");
        if is_tool {
            // Keys in sorted order, so the text is the same with or without serde_json's
            // `preserve_order`.
            let mut r = Map::new();
            r.insert("content".into(), text_of(o.get("content")).into());
            if let Some(n) = o.get("name").filter(|n| n.is_string()) {
                r.insert("tool".into(), n.clone());
            }
            if let Some(id) = o.get("tool_call_id").filter(|n| n.is_string()) {
                r.insert("tool_call_id".into(), id.clone());
            }
            let line = json!({"tool_response": r}).to_string();
            if last_was_tool && let Some(Value::String(prev)) = out.last_mut().and_then(|p| p.get_mut("content")) {
                prev.push('\n');
                prev.push_str(&line);
                continue;
            }
            o.remove("name");
            o.remove("tool_call_id");
            o.insert("role".into(), "user".into());
            o.insert("content".into(), line.into());
        } else if let Some(calls) = o.remove("tool_calls") {
            let calls: Vec<Value> =
                calls.as_array().map(Vec::as_slice).unwrap_or_default().iter().map(flat_call).collect();
            let mut text = text_of(o.get("content"));
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(&json!({"tool_calls": calls}).to_string());
            o.insert("content".into(), text.into());
        } else if o.get("content").is_none_or(Value::is_null) {
            o.insert("content".into(), "".into());
        }
        out.push(Value::Object(o));
        last_was_tool = is_tool;
    }
    Some(out)
}

/// A message's content as text: a string, the text parts of a list joined by newlines, else `""`.
fn text_of(c: Option<&Value>) -> String {
    match c {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n")
        }
        _ => String::new(),
    }
}

/// An OpenAI `tool_calls` entry as `{"name", "arguments", "id"}` (arguments as an object when the
/// string holds JSON).
fn flat_call(c: &Value) -> Value {
    let f = c.get("function").unwrap_or(c);
    let args = match f.get("arguments") {
        Some(Value::String(s)) => serde_json::from_str::<Value>(s).unwrap_or_else(|_| s.clone().into()),
        Some(v) => v.clone(),
        None => json!({}),
    };
    let mut v = Map::new();
    v.insert("arguments".into(), args);
    if let Some(id) = c.get("id").filter(|i| i.is_string()) {
        v.insert("id".into(), id.clone());
    }
    v.insert("name".into(), f.get("name").cloned().unwrap_or(Value::Null));
    Value::Object(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["get_weather".into(), "search".into()]
    }

    /// `(name, arguments)` of each call.
    type Calls = Vec<(String, String)>;

    /// (content, calls) of `parse`, for short assertions.
    fn calls(text: &str) -> Option<(Option<String>, Calls)> {
        let p = parse(text, &names())?;
        for c in &p.calls {
            assert!(c.id.starts_with("call_") && c.id.len() == 29, "{}", c.id);
            assert!(c.id[5..].chars().all(|c| c.is_ascii_hexdigit()), "{}", c.id);
        }
        Some((p.content, p.calls.into_iter().map(|c| (c.name, c.arguments)).collect()))
    }

    fn call(name: &str, args: &str) -> (String, String) {
        (name.to_string(), args.to_string())
    }

    #[test]
    fn hermes_single_and_multiple() {
        let t = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        assert_eq!(calls(t), Some((None, vec![call("get_weather", r#"{"city":"Paris"}"#)])));
        // Arguments as a JSON string; two calls; text before them is content.
        let t = concat!(
            "Let me check both.\n",
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Rome\\\"}\"}\n</tool_call>\n",
            "<tool_call>\n{\"name\": \"search\", \"arguments\": {\"n\": [1, 2], \"q\": \"x\"}}\n</tool_call>\n",
        );
        assert_eq!(
            calls(t),
            Some((
                Some("Let me check both.\n".into()),
                vec![call("get_weather", r#"{"city":"Rome"}"#), call("search", r#"{"n":[1,2],"q":"x"}"#)]
            ))
        );
        // Qwen3: thinking before the call; names need not be in the list for marked calls.
        let t = "<think>\nhm\n</think>\n\n<tool_call>\n{\"name\": \"other\", \"arguments\": {}}\n</tool_call>";
        assert_eq!(calls(t), Some((Some("<think>\nhm\n</think>\n\n".into()), vec![call("other", "{}")])));
        // The last block unclosed (generation ended), `parameters` and a missing arguments.
        let t = "<tool_call>{\"name\": \"search\", \"parameters\": {\"q\": 1}}</tool_call><tool_call>{\"name\": \"search\"}";
        assert_eq!(calls(t), Some((None, vec![call("search", r#"{"q":1}"#), call("search", "{}")])));
        // Text after the calls is kept.
        let t = "<tool_call>{\"name\": \"search\", \"arguments\": {}}</tool_call> done";
        assert_eq!(calls(t), Some((Some(" done".into()), vec![call("search", "{}")])));
    }

    #[test]
    fn mistral_forms() {
        let t = r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "search", "arguments": "{\"q\": \"a\"}"}]"#;
        assert_eq!(
            calls(t),
            Some((None, vec![call("get_weather", r#"{"city":"Paris"}"#), call("search", r#"{"q":"a"}"#)]))
        );
        let t = r#"Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]search[CALL_ID]abc123456[ARGS]{}"#;
        assert_eq!(
            calls(t),
            Some((Some("Sure.".into()), vec![call("get_weather", r#"{"city":"Oslo"}"#), call("search", "{}")]))
        );
        // Malformed: not JSON, no [ARGS], a bad name.
        assert_eq!(calls("[TOOL_CALLS] [{\"name\": \"x\", "), None);
        assert_eq!(calls("[TOOL_CALLS]get_weather{\"city\": \"Oslo\"}"), None);
        assert_eq!(calls("[TOOL_CALLS]get weather[ARGS]{}"), None);
    }

    #[test]
    fn llama_bare_json() {
        let t = " {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}} ";
        assert_eq!(calls(t), Some((None, vec![call("get_weather", r#"{"city":"Paris"}"#)])));
        let t = "<|python_tag|>{\"name\": \"search\", \"parameters\": {\"q\": \"a\"}}";
        assert_eq!(calls(t), Some((None, vec![call("search", r#"{"q":"a"}"#)])));
        let t = r#"[{"name": "search", "arguments": {}}, {"name": "get_weather", "parameters": {"city": "X"}}]"#;
        assert_eq!(calls(t), Some((None, vec![call("search", "{}"), call("get_weather", r#"{"city":"X"}"#)])));
        let t = r#"{"name": "search", "parameters": {}}; {"name": "get_weather", "parameters": {}}"#;
        assert_eq!(calls(t), Some((None, vec![call("search", "{}"), call("get_weather", "{}")])));
        // Ordinary JSON answers, and names that are not the request's tools, stay content.
        assert_eq!(calls(r#"{"name": "Alice", "age": 3}"#), None);
        assert_eq!(calls(r#"{"name": "delete_all", "parameters": {}}"#), None);
        assert_eq!(calls(r#"[{"name": "search", "arguments": {}}, {"name": "nope", "arguments": {}}]"#), None);
        assert_eq!(calls(r#"[1, 2]"#), None);
        assert_eq!(calls(r#"[]"#), None);
        assert_eq!(parse(r#"{"name": "search", "parameters": {}}"#, &[]), None);
        // Text around the JSON: not a call.
        assert_eq!(calls(r#"Here: {"name": "search", "parameters": {}}"#), None);
        assert_eq!(calls(r#"{"name": "search", "parameters": {}} and more"#), None);
    }

    #[test]
    fn malformed_and_plain_text_stay_content() {
        for t in [
            "",
            "   ",
            "Hello there.",
            "<tool_call>not json</tool_call>",
            "<tool_call>{\"name\": \"search\", \"arguments\": {}}</tool_call><tool_call>{oops}</tool_call>",
            "<tool_call>{\"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": 5}</tool_call>",
            "<tool_call>[1]</tool_call>",
            "<tool_call>{\"name\": \"search\", \"arguments\": \"not json\"}</tool_call>",
            "<tool_call>",
            "<tool_call></tool_call>",
            "[TOOL_CALLS]",
            "[TOOL_CALLS][ARGS]",
            "{\"name\": \"search\", \"parameters\": ",
            "<|python_tag|>brave_search.call(query=\"x\")",
            "{{{{[[[[",
            "\u{0}<tool_call>\u{ffff}</tool_call>é",
        ] {
            assert_eq!(parse(t, &names()), None, "{t:?}");
        }
        // Deep nesting is an error of serde_json, not a crash.
        let deep = format!("<tool_call>{}</tool_call>", "[".repeat(100_000));
        assert_eq!(parse(&deep, &names()), None);
    }

    #[test]
    fn ids_are_unique_and_json_shapes() {
        let t = "<tool_call>{\"name\": \"a\"}</tool_call><tool_call>{\"name\": \"a\"}</tool_call>";
        let p = parse(t, &[]).unwrap();
        assert_ne!(p.calls[0].id, p.calls[1].id);
        let v = p.calls[1].to_delta(1);
        assert_eq!(v["index"], 1);
        assert_eq!(v["type"], "function");
        assert_eq!(v["function"], json!({"name": "a", "arguments": "{}"}));
        assert_eq!(p.calls[0].to_json()["id"], p.calls[0].id.as_str());
    }

    /// Feed `pieces` to a ToolStream: (content sent, calls).
    fn stream(pieces: &[&str]) -> (String, Calls) {
        let mut s = ToolStream::new(names());
        let mut out = String::new();
        for p in pieces {
            out.push_str(&s.feed(p));
        }
        let (rest, cs) = s.finish();
        out.push_str(&rest);
        (out, cs.into_iter().map(|c| (c.name, c.arguments)).collect())
    }

    #[test]
    fn stream_matches_parse() {
        let cases: &[&[&str]] = &[
            &["Hello", " world", "."],
            &["Let me look.", "\n<tool", "_call>\n{\"name\": \"search\",", " \"arguments\": {\"q\": 1}}\n</tool_call>"],
            &["<", "tool_call>{\"name\": \"search\"}</tool_call>"],
            &["a < b and [TOOL", "] x"],
            &["ok[TOOL_", "CALLS]search[ARGS]{}"],
            &[" ", "\n", "{\"name\": \"get_weather\", ", "\"parameters\": {}}"],
            &["<|python", "_tag|>", "{\"name\": \"search\", \"parameters\": {}}"],
            &["{\"answer\": 42}"],
            &["[1, 2, 3]"],
            &["<tool_call>broken", "</tool_call> tail"],
            &["<b>bold</b>"],
            &["   "],
            &["<|pyth"],
            &[],
        ];
        for pieces in cases {
            let whole: String = pieces.concat();
            let want = match parse(&whole, &names()) {
                Some(p) => {
                    (p.content.unwrap_or_default(), p.calls.into_iter().map(|c| (c.name, c.arguments)).collect())
                }
                None => (whole.clone(), Vec::new()),
            };
            assert_eq!(stream(pieces), want, "{pieces:?}");
        }
    }

    #[test]
    fn stream_sends_text_early_and_holds_markers() {
        let mut s = ToolStream::new(names());
        assert_eq!(s.feed("Hi "), "Hi ");
        assert_eq!(s.feed("there <tool"), "there ");
        assert_eq!(s.feed("kit>"), "<toolkit>");
        assert_eq!(s.feed(" [TOOL_C"), " ");
        assert_eq!(s.feed("ALLS]x"), "");
        assert_eq!(s.feed(" anything"), "");
        assert_eq!(s.finish(), ("[TOOL_CALLS]x anything".into(), Vec::new()));
        // A reply that opens with `{` is held from the start.
        let mut s = ToolStream::new(names());
        assert_eq!(s.feed("  "), "");
        assert_eq!(s.feed("{\"a\""), "");
        assert_eq!(s.finish(), ("  {\"a\"".into(), Vec::new()));
    }

    #[test]
    fn history_for_tool_templates() {
        let msgs = [
            json!({"role": "user", "content": "hi"}),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "search", "arguments": "{\"q\": \"a\"}"}},
                {"id": "c2", "type": "function", "function": {"name": "search", "arguments": "not json"}},
            ]}),
        ];
        let out = object_arguments(&msgs).unwrap();
        assert_eq!(out[0], msgs[0]);
        assert_eq!(out[1]["tool_calls"][0]["function"]["arguments"], json!({"q": "a"}));
        assert_eq!(out[1]["tool_calls"][1]["function"]["arguments"], "not json");
        assert_eq!(out[1]["content"], Value::Null);
        assert_eq!(object_arguments(&msgs[..1]), None);
    }

    #[test]
    fn history_polyfill() {
        let msgs = [
            json!({"role": "user", "content": "weather?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
            ]}),
            json!({"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "18C"}),
            json!({"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "x"}]}),
            json!({"role": "assistant", "content": "Warm."}),
            json!({"role": "assistant"}),
        ];
        let out = polyfill(&msgs).unwrap();
        assert_eq!(out.len(), 5);
        assert_eq!(out[0], msgs[0]);
        assert_eq!(
            out[1],
            json!({"role": "assistant", "content": r#"{"tool_calls":[{"arguments":{"city":"Paris"},"id":"c1","name":"get_weather"}]}"#})
        );
        assert_eq!(
            out[2],
            json!({"role": "user", "content": concat!(
                r#"{"tool_response":{"content":"18C","tool":"get_weather","tool_call_id":"c1"}}"#, "\n",
                r#"{"tool_response":{"content":"x","tool_call_id":"c2"}}"#)})
        );
        assert_eq!(out[3], msgs[4]);
        assert_eq!(out[4], json!({"role": "assistant", "content": ""}));
        assert_eq!(polyfill(&msgs[..1]), None);
        // Odd values pass through.
        let odd = [json!("x"), json!({"role": "assistant", "content": "a", "tool_calls": 5})];
        let out = polyfill(&odd).unwrap();
        assert_eq!(out[0], odd[0]);
        assert_eq!(out[1]["content"], "a\n{\"tool_calls\":[]}");
    }

    #[test]
    fn forced_calls_whole_and_streamed() {
        let names = vec!["get_time".to_string(), "get_weather".to_string()];
        let text = r#"{"name": "get_weather", "arguments": {"city": "Rome", "days": [1, 2], "note": "a}b"}}"#;
        let call = parse_forced(text, &names).expect("a forced call");
        assert_eq!(
            (call.name.as_str(), call.arguments.as_str()),
            ("get_weather", r#"{"city": "Rome", "days": [1, 2], "note": "a}b"}"#)
        );
        assert!(parse_forced(text, &names[..1]).is_none(), "a name outside the tools");
        assert!(parse_forced(&text[..text.len() - 1], &names).is_none(), "cut short");
        assert!(parse_forced("plain text", &names).is_none());
        // Streamed in pieces cut anywhere (including inside a multi-byte character's pieces of text):
        // one start delta with id and name, then arguments that add up to the same text.
        let text = r#"{"name": "get_time", "arguments": {"tz": "Europe/Zürich ✓"}}"#;
        let whole = parse_forced(text, &names).unwrap();
        for cut in 1..8 {
            let mut f = ForcedStream::new();
            let (mut args, mut starts) = (String::new(), 0);
            let chars: Vec<char> = text.chars().collect();
            let mut deltas = Vec::new();
            for piece in chars.chunks(cut) {
                deltas.extend(f.feed(&piece.iter().collect::<String>()));
            }
            let (last, sent) = f.finish();
            deltas.extend(last);
            assert_eq!(sent, Ok(()));
            for d in &deltas {
                assert_eq!(d["index"], 0);
                if d.get("id").is_some() {
                    starts += 1;
                    assert_eq!(d["function"]["name"], "get_time");
                    assert_eq!(d["type"], "function");
                }
                args.push_str(d["function"]["arguments"].as_str().unwrap());
            }
            assert_eq!(starts, 1, "cut {cut}: {deltas:?}");
            assert!(deltas[0].get("id").is_some(), "the first delta names the call");
            assert_eq!(args, whole.arguments, "cut {cut}");
        }
        // Not a call (the guard fell back): the text comes back as content.
        let mut f = ForcedStream::new();
        assert_eq!(f.feed("hello"), None);
        assert_eq!(f.finish(), (None, Err("hello".to_string())));
    }
}

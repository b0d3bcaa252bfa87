//! Constrained decoding for OpenAI `response_format: {"type": "json_object"}`.
//!
//! * [`TokenTexts`]: for every token id, the exact bytes it appends to the output text when decoded
//!   in the middle of a sequence (`None` for special tokens: they carry no text and are never
//!   allowed inside JSON).
//! * [`JsonGuard`]: an incremental JSON validator over bytes (a pushdown automaton) that accepts
//!   exactly the prefixes of one JSON text whose top-level value is an object, under a few limits
//!   that keep a model from wandering (see the constants). It never accepts a dead end: every
//!   accepted prefix can still be completed into a valid object.
//! * [`pick`]: rejection sampling against the guard, falling back to a full mask
//!   ([`allowed_mask`]) after [`MAX_REJECTIONS`] rejected samples.
//!
//! The guard also only accepts valid UTF-8 inside strings (no overlong forms, no surrogates, no
//! bytes past U+10FFFF; a token may carry part of a character, the rest must follow), so the bytes
//! the guard accepted are exactly the text the streaming decoder prints: no byte ever turns into
//! U+FFFD. The one difference is harmless: a SentencePiece decoder drops a leading space at the
//! very start of the output, and whitespace before the top-level `{` means nothing.

use std::sync::{Arc, OnceLock};

use purehw_core::tokenizer::Tokenizer;

use super::json_schema::{ANY, INF, LEVELS, Schema, Sign, T_NUMBER, admits, start_kind};

/// Deepest nesting of objects and arrays, the top-level object included.
pub const MAX_DEPTH: u8 = 32;
/// Longest run of whitespace bytes outside strings (enough for a newline and pretty-printed
/// indentation ten levels deep at two spaces, five at four).
pub const MAX_WS_RUN: u8 = 24;
/// Longest number, in bytes (sign, digits, fraction and exponent together).
pub const MAX_NUMBER_LEN: u8 = 32;
/// Samples [`pick`] rejects before it computes the full mask.
pub const MAX_REJECTIONS: usize = 16;

// ---------------------------------------------------------------------------------------------
// Token texts
// ---------------------------------------------------------------------------------------------

/// How token pieces spell their bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scheme {
    /// GPT-2 byte-level BPE: every char of a piece stands for one byte (`Ġ` = space).
    ByteLevel,
    /// SentencePiece: `▁` is a space (when `metaspace`), `<0xNN>` is byte NN (when `byte_fallback`),
    /// anything else is its own UTF-8.
    Pieces { metaspace: bool, byte_fallback: bool },
    /// Neither recognised: each token's text is what decoding it after a neutral token adds.
    Decode,
}

/// Flag bits per token.
const HAS_TEXT: u8 = 1;
/// End of generation (has no text).
const EOS: u8 = 2;
/// Whole UTF-8 without `"`, `\` or control characters: accepted anywhere inside a string.
const PLAIN: u8 = 4;

/// The bytes each token appends to the output; built once per model.
pub struct TokenTexts {
    /// All texts, concatenated.
    bytes: Vec<u8>,
    /// Token `id`'s text is `bytes[offsets[id]..offsets[id + 1]]`.
    offsets: Vec<u32>,
    /// `HAS_TEXT` | `PLAIN` for a token with text; `EOS` for an end-of-generation token.
    flags: Vec<u8>,
    /// Tokens with text sorted by text, for [`allowed_mask`]; built on its first call.
    order: OnceLock<Order>,
}

/// Ids with text in the order of their first eight bytes (so that tokens sharing a prefix are
/// mostly adjacent), their texts in that order, and each one's common prefix with the one before.
struct Order {
    ids: Vec<u32>,
    /// Text `k` is `bytes[ends[k - 1]..ends[k]]`.
    bytes: Vec<u8>,
    ends: Vec<u32>,
    lcp: Vec<u32>,
    max_len: usize,
}

impl core::fmt::Debug for TokenTexts {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TokenTexts").field("tokens", &self.len()).field("bytes", &self.bytes.len()).finish()
    }
}

impl TokenTexts {
    /// Texts of every token of `tok`. Special tokens (`is_special`) get none; of them, the
    /// end-of-generation ones (`eos_ids`) are remembered so that [`pick`] can allow them once the
    /// object is complete.
    pub fn new(tok: &Tokenizer) -> TokenTexts {
        let n = tok.vocab_size();
        let neutral = neutral_token(tok);
        let scheme = detect_scheme(tok, neutral);
        let inverse = gpt2_unicode_to_byte();
        let mut texts = TokenTexts {
            bytes: Vec::with_capacity(n * 8),
            offsets: Vec::with_capacity(n + 1),
            flags: vec![0; n],
            order: OnceLock::new(),
        };
        texts.offsets.push(0);
        let mut buf = Vec::new();
        for id in 0..n as u32 {
            buf.clear();
            let ok = !tok.is_special(id)
                && match tok.token_to_piece(id) {
                    None => false,
                    Some(piece) => piece_bytes(tok, scheme, neutral, &inverse, id, &piece, &mut buf),
                };
            if ok && !buf.is_empty() {
                texts.bytes.extend_from_slice(&buf);
                let plain =
                    !buf.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\') && core::str::from_utf8(&buf).is_ok();
                texts.flags[id as usize] = if plain { HAS_TEXT | PLAIN } else { HAS_TEXT };
            }
            texts.offsets.push(texts.bytes.len() as u32);
        }
        for &id in tok.eos_ids() {
            if let Some(f) = texts.flags.get_mut(id as usize)
                && *f == 0
            {
                *f = EOS;
            }
        }
        texts.bytes.shrink_to_fit();
        texts
    }

    /// Number of token ids.
    pub fn len(&self) -> usize {
        self.flags.len()
    }

    /// (Clippy pairs it with `len`.)
    #[allow(dead_code)]
    pub fn is_empty(&self) -> bool {
        self.flags.is_empty()
    }

    /// The bytes token `id` appends mid-sequence; `None` for special tokens, tokens that decode to
    /// nothing, and ids out of range.
    pub fn get(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        (self.flags.get(i).is_some_and(|f| f & HAS_TEXT != 0)).then(|| self.text(id))
    }

    /// Whether `id` ends generation (EOS, end-of-turn).
    pub fn is_eos(&self, id: u32) -> bool {
        self.flags.get(id as usize).is_some_and(|f| f & EOS != 0)
    }

    /// Whether the guard allows token `id` next: a token with text the guard accepts, or an
    /// end-of-generation token once the object is complete. Other special tokens never.
    pub fn allowed(&self, guard: &JsonGuard, id: u32, rules: &Rules) -> bool {
        match self.get(id) {
            Some(text) => guard.accepts_token(text, rules),
            None => self.is_eos(id) && guard.is_complete(),
        }
    }

    fn order(&self) -> &Order {
        self.order.get_or_init(|| {
            // Sorting by an integer key is several times faster than comparing slices; any order is
            // correct (the common prefixes are measured), this one shares most of them.
            let mut keyed: Vec<(u64, u32)> = (0..self.len() as u32)
                .filter(|&id| self.get(id).is_some())
                .map(|id| {
                    let mut key = [0u8; 8];
                    let t = self.text(id);
                    let k = t.len().min(8);
                    key[..k].copy_from_slice(&t[..k]);
                    (u64::from_be_bytes(key), id)
                })
                .collect();
            keyed.sort_unstable();
            let mut order = Order {
                ids: Vec::with_capacity(keyed.len()),
                bytes: Vec::with_capacity(self.bytes.len()),
                ends: Vec::with_capacity(keyed.len()),
                lcp: Vec::with_capacity(keyed.len()),
                max_len: 0,
            };
            let mut prev: &[u8] = &[];
            for &(_, id) in &keyed {
                let t = self.text(id);
                order.ids.push(id);
                order.bytes.extend_from_slice(t);
                order.ends.push(order.bytes.len() as u32);
                order.lcp.push(prev.iter().zip(t).take_while(|(a, b)| a == b).count() as u32);
                order.max_len = order.max_len.max(t.len());
                prev = t;
            }
            order
        })
    }

    /// Raw text slice (empty for tokens without text).
    fn text(&self, id: u32) -> &[u8] {
        let i = id as usize;
        &self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }
}

/// A token whose text is one ASCII letter and that decodes to itself: put before a token, it
/// makes its text appear as mid-sequence text (no leading-space stripping).
fn neutral_token(tok: &Tokenizer) -> Option<u32> {
    ["a", "x", "A", "0", "."].iter().find_map(|p| {
        let id = tok.id_of(p)?;
        (!tok.is_special(id) && tok.decode(&[id]).ok()?.as_str() == *p).then_some(id)
    })
}

/// What decoding `id` after the neutral token adds to the neutral token's text.
fn decode_after(tok: &Tokenizer, neutral: Option<u32>, id: u32) -> Option<String> {
    match neutral {
        Some(x) => {
            let before = tok.decode(&[x]).ok()?;
            let after = tok.decode(&[x, id]).ok()?;
            after.strip_prefix(before.as_str()).map(str::to_owned)
        }
        None => tok.decode(&[id]).ok(),
    }
}

/// Whether the vocabulary holds `piece` and it decodes (mid-sequence) to `text`.
fn probe(tok: &Tokenizer, neutral: Option<u32>, piece: &str, text: &str) -> bool {
    tok.id_of(piece).is_some_and(|id| !tok.is_special(id) && decode_after(tok, neutral, id).as_deref() == Some(text))
}

fn detect_scheme(tok: &Tokenizer, neutral: Option<u32>) -> Scheme {
    // Gemma's vocabulary holds `Ġ` as a character too: it is byte-level only if `Ġ` decodes to a
    // space.
    if probe(tok, neutral, "Ġ", " ") || probe(tok, neutral, "Ċ", "\n") {
        return Scheme::ByteLevel;
    }
    let metaspace = probe(tok, neutral, "\u{2581}", " ");
    let byte_fallback = probe(tok, neutral, "<0x41>", "A");
    if metaspace || byte_fallback { Scheme::Pieces { metaspace, byte_fallback } } else { Scheme::Decode }
}

/// GPT-2's byte-to-unicode map inverted: `table[c]` is the byte char `c` stands for.
fn gpt2_unicode_to_byte() -> [Option<u8>; 324] {
    let mut table = [None; 324];
    let mut next = 256usize;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            b as usize
        } else {
            next += 1;
            next - 1
        };
        table[c] = Some(b);
    }
    table
}

/// Token `id`'s mid-sequence bytes into `out`; false if it has no usable text.
fn piece_bytes(
    tok: &Tokenizer,
    scheme: Scheme,
    neutral: Option<u32>,
    inverse: &[Option<u8>; 324],
    id: u32,
    piece: &str,
    out: &mut Vec<u8>,
) -> bool {
    match scheme {
        Scheme::ByteLevel => {
            for c in piece.chars() {
                match inverse.get(c as usize).copied().flatten() {
                    Some(b) => out.push(b),
                    // Not a byte-level piece (an added token that is not special): decode it.
                    None => {
                        out.clear();
                        return decoded_bytes(tok, neutral, id, out);
                    }
                }
            }
            true
        }
        Scheme::Pieces { metaspace, byte_fallback } => {
            if byte_fallback && let Some(b) = byte_piece(piece) {
                out.push(b);
                return true;
            }
            if metaspace {
                for c in piece.chars() {
                    let c = if c == '\u{2581}' { ' ' } else { c };
                    out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                }
            } else {
                out.extend_from_slice(piece.as_bytes());
            }
            true
        }
        Scheme::Decode => decoded_bytes(tok, neutral, id, out),
    }
}

/// The decoded text of `id` after the neutral token; false if it holds U+FFFD (a partial
/// character we cannot recover this way).
fn decoded_bytes(tok: &Tokenizer, neutral: Option<u32>, id: u32, out: &mut Vec<u8>) -> bool {
    match decode_after(tok, neutral, id) {
        Some(text) if !text.contains('\u{FFFD}') => {
            out.extend_from_slice(text.as_bytes());
            true
        }
        _ => false,
    }
}

/// `<0xAB>` → 0xAB (as the SentencePiece decoder reads byte-fallback pieces).
fn byte_piece(piece: &str) -> Option<u8> {
    if piece.len() == 6 && piece.starts_with("<0x") && piece.ends_with('>') {
        u8::from_str_radix(piece.get(3..5)?, 16).ok()
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------------
// The validator
// ---------------------------------------------------------------------------------------------

/// Fewest bytes that end a string from sub-state `s`, the closing quote included.
fn str_end(s: Str) -> usize {
    match s {
        Str::Plain => 1,
        Str::Esc => 2,
        Str::Utf8 { need, .. } => need as usize + 1,
        // `\uDC00"`, `uDC00"`.
        Str::LowEsc => 7,
        Str::LowU => 6,
        Str::Hex { left, val, low } => {
            // A high surrogate, fixed by its first two digits, needs its low half.
            let high_byte = match left {
                2 => Some(val),
                1 => Some(val >> 4),
                _ => None,
            };
            let high = !low && high_byte.is_some_and(|h| (0xD8..=0xDB).contains(&h));
            left as usize + 1 + if high { 6 } else { 0 }
        }
    }
}

/// Where the validator is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Before the top-level `{`.
    Start,
    /// After `{`: a key or `}`.
    ObjOpen,
    /// After `,` in an object: a key.
    ObjKey,
    /// After a key: `:`.
    Colon,
    /// After `:`, or `,` in an array: a value.
    Value,
    /// After `[`: a value or `]`.
    ArrOpen,
    /// After a value inside a container: `,` or the container's close.
    After,
    /// The top-level object is closed.
    Done,
    Str {
        key: bool,
        s: Str,
    },
    Num {
        n: Num,
        len: u8,
    },
    /// Inside `true` / `false` / `null` (`lit` indexes [`LITERALS`]), `pos` bytes matched.
    Lit {
        lit: u8,
        pos: u8,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Str {
    Plain,
    /// After `\`.
    Esc,
    /// `left` hex digits of `\u` to go; `val` so far; `low`: a low surrogate must come.
    Hex {
        left: u8,
        val: u16,
        low: bool,
    },
    /// After a high surrogate escape: `\` of its low half must come.
    LowEsc,
    /// After that `\`: `u`.
    LowU,
    /// Inside a multi-byte character: `need` continuation bytes to go, the next in `lo..=hi`.
    Utf8 {
        need: u8,
        lo: u8,
        hi: u8,
    },
}

/// RFC 8259 number grammar, `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`, with at
/// most two exponent digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    /// One exponent digit.
    ExpInt,
    /// Two: the last.
    ExpInt2,
}

impl Num {
    /// Whether a number may end here.
    fn terminal(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpInt | Num::ExpInt2)
    }

    fn next(self, b: u8) -> Option<Num> {
        Some(match (self, b) {
            (Num::Minus, b'0') => Num::Zero,
            (Num::Minus, b'1'..=b'9') => Num::Int,
            (Num::Int, b'0'..=b'9') => Num::Int,
            (Num::Zero | Num::Int, b'.') => Num::Dot,
            (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::Exp,
            (Num::Exp, b'+' | b'-') => Num::ExpSign,
            (Num::Exp | Num::ExpSign, b'0'..=b'9') => Num::ExpInt,
            (Num::ExpInt, b'0'..=b'9') => Num::ExpInt2,
            _ => return None,
        })
    }
}

const LITERALS: [&[u8]; 3] = [b"true", b"false", b"null"];

/// A forced tool call's text before the function name, and between the name and the arguments.
pub const CALL_HEAD: &str = "{\"name\": \"";
pub const CALL_MID: &str = "\", \"arguments\": ";
const HEAD: &[u8] = CALL_HEAD.as_bytes();
const MID: &[u8] = CALL_MID.as_bytes();

/// Where a forced tool call is, outside its arguments object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    /// Not a forced call, or the call is complete.
    Off,
    /// `pos` bytes of [`CALL_HEAD`] matched; `live`: the names allowed (bit `i` = `names[i]`).
    Head {
        pos: u8,
        live: u64,
    },
    /// `pos` bytes of the name matched; `live`: the names that start with them.
    Name {
        pos: u16,
        live: u64,
    },
    Mid {
        pos: u8,
    },
    /// Inside the arguments object (the plain guard's state).
    Args,
    /// After the arguments: the closing `}`.
    Tail,
}

/// Incremental validator: accepts exactly the byte prefixes of one JSON text whose top-level
/// value is an object, within these limits (each keeps a model from producing output forever
/// without progress, and none can strand it: whatever was accepted can still be completed):
///
/// * nesting at most [`MAX_DEPTH`] deep (the top-level object counts);
/// * whitespace outside strings in runs of at most [`MAX_WS_RUN`] bytes, each run holding at most
///   one `\n` and one `\r`;
/// * numbers at most [`MAX_NUMBER_LEN`] bytes, with at most two exponent digits: every number
///   then is a finite f64 (`serde_json` refuses `1e400`, other parsers turn it into infinity);
/// * strings: valid UTF-8 only, no raw control characters (< 0x20), escapes per RFC 8259, and
///   `\u` surrogates only as a high-low pair (so `serde_json` and every strict parser take it);
/// * after the closing `}` only whitespace (the caller stops generation there anyway).
///
/// Strings are not length-limited: `max_tokens` bounds those. With a token budget
/// ([`JsonGuard::with_budget`]) a token is allowed only if what it leaves can still be closed in
/// the tokens left, one byte per token at worst ([`JsonGuard::bytes_to_close`]), so a reply cut by
/// `max_tokens` or the context still parses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsonGuard {
    /// Tokens that may still be generated, the next one included (`u32::MAX`: no limit).
    left: u32,
    /// A forced tool call's fixed text around its arguments object ([`JsonGuard::for_call`]).
    call: Call,
    mode: Mode,
    /// Bit `i`: the container at depth `i` (0 = top level) is an object.
    stack: u64,
    depth: u8,
    /// Length of the current whitespace run outside strings.
    ws: u8,
    /// Bit 0: the run holds a `\n`; bit 1: a `\r`.
    breaks: u8,
    // Schema state (inert without one, [`Rules::schema`]).
    /// Per open container (index = depth − 1): its node, and the next property's index (objects)
    /// or the items begun (arrays).
    frames: [(u16, u16); MAX_DEPTH as usize],
    /// The node of the value that starts next, or is being written.
    node: u16,
    /// Matching a literal (an `enum` / `const` value) rather than a free value of a kind.
    lit: bool,
    /// The candidates of the key or literal being matched (bit `i`: literal `i`, or property
    /// `idx + i` of the object's frame), and the bytes of it matched so far.
    live: u64,
    mpos: u32,
}

/// What a guard checks beyond JSON syntax; the same for every token of a reply.
#[derive(Debug, Default)]
pub struct Rules {
    /// A forced call's function names (else empty).
    pub names: Vec<String>,
    /// The reply's schema (root 0), or, for a forced call, each name's arguments schema (root
    /// `i` for `names[i]`).
    pub schema: Option<Arc<Schema>>,
}

impl Rules {
    /// No names, no schema: plain JSON.
    #[cfg(test)]
    pub const NONE: Rules = Rules { names: Vec::new(), schema: None };
}

impl Default for JsonGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonGuard {
    pub fn new() -> Self {
        JsonGuard {
            left: u32::MAX,
            call: Call::Off,
            mode: Mode::Start,
            stack: 0,
            depth: 0,
            ws: 0,
            breaks: 0,
            frames: [(ANY, 0); MAX_DEPTH as usize],
            node: ANY,
            lit: false,
            live: 0,
            mpos: 0,
        }
    }

    /// The same guard for a reply that must match `rules`' schema (root 0); a forced call picks
    /// its arguments' root when its name is written.
    pub fn with_schema(self, rules: &Rules) -> Self {
        match &rules.schema {
            Some(s) if self.call == Call::Off => JsonGuard { node: s.root(0), ..self },
            _ => self,
        }
    }

    /// A guard for a forced tool call of at most `tokens` tokens: `{"name": "N", "arguments": {…}}`
    /// where `N` is one of the `names` later passed with each token (at most 64, each non-empty
    /// and free of `"` and `\`), and `{…}` any object the plain guard allows.
    pub fn for_call(names: usize, tokens: usize) -> Self {
        debug_assert!((1..=64).contains(&names));
        let live = if names >= 64 { u64::MAX } else { (1u64 << names) - 1 };
        JsonGuard { call: Call::Head { pos: 0, live }, ..Self::with_budget(tokens) }
    }

    /// A guard for a reply of at most `tokens` tokens.
    pub fn with_budget(tokens: usize) -> Self {
        JsonGuard { left: u32::try_from(tokens).unwrap_or(u32::MAX), ..Self::new() }
    }

    /// The least budget a reply under `rules` is given: one token per byte of the shortest
    /// complete one (a forced call's `{"name": "N", "arguments": {}}`, a schema's required keys).
    pub fn min_tokens(rules: &Rules) -> usize {
        let g = if rules.names.is_empty() {
            Self::new().with_schema(rules)
        } else {
            Self::for_call(rules.names.len().clamp(1, 64), usize::MAX)
        };
        g.bytes_to_close(rules)
    }

    /// Whether `t` is a number the guard's grammar takes whole (for `enum` values).
    pub fn is_number_text(t: &[u8]) -> bool {
        let mut g = JsonGuard::new();
        g.mode = Mode::Value;
        g.depth = 1;
        g.stack = 1;
        t.first().is_some_and(|b| matches!(b, b'-' | b'0'..=b'9'))
            && t.iter().chain(b"}").all(|&b| g.step(b))
            && g.mode == Mode::Done
    }

    /// Whether a token that leaves the guard as `after` fits the budget: `after` can be closed in
    /// the tokens left once it is taken.
    fn fits(&self, after: &JsonGuard, rules: &Rules) -> bool {
        self.left == u32::MAX || after.bytes_to_close(rules) < self.left as usize
    }

    /// Take a token's text: false (and the state unchanged) if the guard rejects it or it does
    /// not fit the budget. `names`: a forced call's function names (else empty).
    pub fn push_token(&mut self, bytes: &[u8], rules: &Rules) -> bool {
        let mut g = *self;
        if !(bytes.iter().all(|&b| g.step_in(b, rules)) && self.fits(&g, rules)) {
            return false;
        }
        if g.left != u32::MAX {
            g.left = g.left.saturating_sub(1);
        }
        *self = g;
        true
    }

    /// Whether a token with this text is allowed next (see [`JsonGuard::push_token`]).
    pub fn accepts_token(&self, bytes: &[u8], rules: &Rules) -> bool {
        let mut g = *self;
        bytes.iter().all(|&b| g.step_in(b, rules)) && self.fits(&g, rules)
    }

    /// One byte, the forced call's fixed text and name included.
    #[inline]
    fn step_in(&mut self, b: u8, rules: &Rules) -> bool {
        match self.call {
            Call::Off | Call::Args => {}
            Call::Head { pos, live } => {
                if HEAD[pos as usize] != b {
                    return false;
                }
                let pos = pos + 1;
                self.call =
                    if pos as usize == HEAD.len() { Call::Name { pos: 0, live } } else { Call::Head { pos, live } };
                return true;
            }
            Call::Name { pos, live } => {
                let (mut next, mut ends) = (0u64, None);
                for (i, n) in rules.names.iter().enumerate().take(64) {
                    if live >> i & 1 == 1 {
                        if n.len() == pos as usize {
                            ends = Some(i);
                        }
                        if n.as_bytes().get(pos as usize) == Some(&b) {
                            next |= 1 << i;
                        }
                    }
                }
                self.call = if b == MID[0]
                    && let Some(i) = ends
                {
                    if let Some(s) = &rules.schema {
                        self.node = s.root(i);
                    }
                    Call::Mid { pos: 1 }
                } else if next != 0 {
                    Call::Name { pos: pos.saturating_add(1), live: next }
                } else {
                    return false;
                };
                return true;
            }
            Call::Mid { pos } => {
                if MID[pos as usize] != b {
                    return false;
                }
                let pos = pos + 1;
                self.call = if pos as usize == MID.len() { Call::Args } else { Call::Mid { pos } };
                return true;
            }
            Call::Tail => {
                if b != b'}' {
                    return false;
                }
                self.call = Call::Off;
                return true;
            }
        }
        if let Some(s) = &rules.schema
            && !self.schema_byte(b, s)
        {
            return false;
        }
        if !self.step(b) {
            return false;
        }
        if self.call == Call::Args && self.mode == Mode::Done {
            self.call = Call::Tail;
        }
        true
    }

    /// The fewest bytes that complete the object from here. Each state has a next byte that
    /// lowers this by exactly one (`}` `]` `"` `0` `:` and the rest of an escape or literal), so
    /// a budget of this many single-byte tokens always suffices.
    pub fn bytes_to_close(&self, rules: &Rules) -> usize {
        let schema = rules.schema.as_deref();
        // Shortest arguments object of name `i`: `{}`, or its schema's required keys.
        let args = |i: usize| schema.map_or(2, |s| s.object_min(s.root(i), LEVELS));
        // After the name: the rest of `", "arguments": `, the arguments and the final `}`.
        let after_name = |i: usize| MID.len() + args(i) + 1;
        let shortest = |pos: u16, live: u64| {
            let names = rules.names.iter().enumerate().take(64).filter(|(i, _)| live >> i & 1 == 1);
            names.map(|(i, n)| n.len().saturating_sub(pos as usize) + after_name(i)).min().unwrap_or(0)
        };
        match self.call {
            Call::Off | Call::Args => {}
            Call::Head { pos, live } => return HEAD.len() - pos as usize + shortest(0, live),
            Call::Name { pos, live } => return shortest(pos, live),
            Call::Mid { pos } => {
                let a = schema.map_or(2, |s| s.object_min(self.node, LEVELS));
                return MID.len() - pos as usize + a + 1;
            }
            Call::Tail => return 1,
        }
        let tail = usize::from(self.call == Call::Args);
        if let Some(s) = schema {
            return self.schema_close(s) + tail;
        }
        let local = match self.mode {
            Mode::Done => return tail,
            Mode::Start => return 2 + tail,
            Mode::ObjOpen | Mode::ArrOpen | Mode::After => 0,
            // `"":0`, `:0`, `0`.
            Mode::ObjKey => 4,
            Mode::Colon => 2,
            Mode::Value => 1,
            Mode::Num { n, .. } => usize::from(!n.terminal()),
            Mode::Lit { lit, pos } => LITERALS[lit as usize].len() - pos as usize,
            Mode::Str { key, s } => str_end(s) + if key { 2 } else { 0 },
        };
        local + self.depth as usize + tail
    }

    /// Whether appending `bytes` keeps the output a valid prefix (no budget, no call).
    #[cfg(test)]
    pub fn accepts(&self, bytes: &[u8]) -> bool {
        let mut g = *self;
        bytes.iter().all(|&b| g.step(b))
    }

    /// Append `bytes`; false (and the state unchanged) if they are rejected (no budget, no call).
    #[cfg(test)]
    pub fn push(&mut self, bytes: &[u8]) -> bool {
        let mut g = *self;
        if bytes.iter().all(|&b| g.step(b)) {
            *self = g;
            true
        } else {
            false
        }
    }

    /// Whether the top-level object has been closed.
    pub fn is_complete(&self) -> bool {
        self.mode == Mode::Done && self.call == Call::Off
    }

    /// One byte; may leave `self` half-updated when it returns false (callers work on copies).
    #[inline]
    fn step(&mut self, b: u8) -> bool {
        match self.mode {
            Mode::Str { key, s } => return self.string_byte(key, s, b),
            Mode::Num { n, len } => {
                if let Some(next) = n.next(b) {
                    let len = len + 1;
                    // The last allowed byte must leave a number that can end.
                    if len < MAX_NUMBER_LEN || (len == MAX_NUMBER_LEN && next.terminal()) {
                        self.mode = Mode::Num { n: next, len };
                        return true;
                    }
                    return false;
                }
                if !n.terminal() {
                    return false;
                }
                // The number ends; `b` is read as what follows it.
                self.mode = Mode::After;
            }
            Mode::Lit { lit, pos } => {
                let word = LITERALS[lit as usize];
                if word[pos as usize] != b {
                    return false;
                }
                let pos = pos + 1;
                self.mode = if pos as usize == word.len() { Mode::After } else { Mode::Lit { lit, pos } };
                return true;
            }
            _ => {}
        }

        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            let bit = match b {
                b'\n' => 1,
                b'\r' => 2,
                _ => 0,
            };
            if self.ws >= MAX_WS_RUN || self.breaks & bit != 0 {
                return false;
            }
            self.ws += 1;
            self.breaks |= bit;
            return true;
        }

        let ok = match (self.mode, b) {
            (Mode::Start, b'{') => self.open(true),
            (Mode::ObjOpen, b'}') => self.close(),
            (Mode::ObjOpen | Mode::ObjKey, b'"') => {
                self.mode = Mode::Str { key: true, s: Str::Plain };
                true
            }
            (Mode::Colon, b':') => {
                self.mode = Mode::Value;
                true
            }
            (Mode::ArrOpen, b']') => self.close(),
            (Mode::Value | Mode::ArrOpen, _) => self.value_start(b),
            (Mode::After, b',') => {
                self.mode = if self.top_is_object() { Mode::ObjKey } else { Mode::Value };
                true
            }
            (Mode::After, b'}') if self.top_is_object() => self.close(),
            (Mode::After, b']') if !self.top_is_object() => self.close(),
            _ => false,
        };
        if ok {
            self.ws = 0;
            self.breaks = 0;
        }
        ok
    }

    fn top_is_object(&self) -> bool {
        self.depth > 0 && (self.stack >> (self.depth - 1)) & 1 == 1
    }

    /// The innermost open container's schema frame (node, index), if any is open.
    fn top_frame(&self) -> Option<(u16, u16)> {
        self.frames.get((self.depth as usize).wrapping_sub(1)).copied()
    }

    fn open(&mut self, object: bool) -> bool {
        if self.depth >= MAX_DEPTH {
            return false;
        }
        let bit = 1u64 << self.depth;
        self.stack = if object { self.stack | bit } else { self.stack & !bit };
        self.depth += 1;
        self.mode = if object { Mode::ObjOpen } else { Mode::ArrOpen };
        true
    }

    fn close(&mut self) -> bool {
        self.depth -= 1;
        self.mode = if self.depth == 0 { Mode::Done } else { Mode::After };
        true
    }

    fn value_start(&mut self, b: u8) -> bool {
        match b {
            b'{' => return self.open(true),
            b'[' => return self.open(false),
            b'"' => self.mode = Mode::Str { key: false, s: Str::Plain },
            b'-' => self.mode = Mode::Num { n: Num::Minus, len: 1 },
            b'0' => self.mode = Mode::Num { n: Num::Zero, len: 1 },
            b'1'..=b'9' => self.mode = Mode::Num { n: Num::Int, len: 1 },
            b't' => self.mode = Mode::Lit { lit: 0, pos: 1 },
            b'f' => self.mode = Mode::Lit { lit: 1, pos: 1 },
            b'n' => self.mode = Mode::Lit { lit: 2, pos: 1 },
            _ => return false,
        }
        true
    }

    #[inline]
    fn string_byte(&mut self, key: bool, s: Str, b: u8) -> bool {
        let next = match s {
            Str::Plain => match b {
                b'"' => {
                    self.mode = if key { Mode::Colon } else { Mode::After };
                    return true;
                }
                b'\\' => Str::Esc,
                0x00..=0x1F => return false,
                0x20..=0x7F => return true,
                0xC2..=0xDF => Str::Utf8 { need: 1, lo: 0x80, hi: 0xBF },
                0xE0 => Str::Utf8 { need: 2, lo: 0xA0, hi: 0xBF },
                0xE1..=0xEC | 0xEE..=0xEF => Str::Utf8 { need: 2, lo: 0x80, hi: 0xBF },
                // No UTF-16 surrogates.
                0xED => Str::Utf8 { need: 2, lo: 0x80, hi: 0x9F },
                0xF0 => Str::Utf8 { need: 3, lo: 0x90, hi: 0xBF },
                0xF1..=0xF3 => Str::Utf8 { need: 3, lo: 0x80, hi: 0xBF },
                0xF4 => Str::Utf8 { need: 3, lo: 0x80, hi: 0x8F },
                // Continuation bytes without a lead, overlong leads, past U+10FFFF.
                _ => return false,
            },
            Str::Utf8 { need, lo, hi } => {
                if !(lo..=hi).contains(&b) {
                    return false;
                }
                if need == 1 { Str::Plain } else { Str::Utf8 { need: need - 1, lo: 0x80, hi: 0xBF } }
            }
            Str::Esc => match b {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Str::Plain,
                b'u' => Str::Hex { left: 4, val: 0, low: false },
                _ => return false,
            },
            Str::LowEsc if b == b'\\' => Str::LowU,
            Str::LowU if b == b'u' => Str::Hex { left: 4, val: 0, low: true },
            Str::LowEsc | Str::LowU => return false,
            Str::Hex { left, val, low } => {
                let Some(d) = (b as char).to_digit(16) else { return false };
                let val = val << 4 | d as u16;
                let left = left - 1;
                // Two digits in, the high byte decides whether this is a low surrogate
                // (DC00..DFFF): required after a high one, refused anywhere else.
                if (left == 3 && low && val != 0xD) || (left == 2 && (0xDC..=0xDF).contains(&val) != low) {
                    return false;
                }
                if left > 0 {
                    Str::Hex { left, val, low }
                } else if !low && (0xD800..=0xDBFF).contains(&val) {
                    Str::LowEsc
                } else {
                    Str::Plain
                }
            }
        };
        self.mode = Mode::Str { key, s: next };
        true
    }
}

// ---------------------------------------------------------------------------------------------
// The schema layer: checked before the syntax for each byte (which may still reject it).
// ---------------------------------------------------------------------------------------------

/// The bits set in `live`, lowest first.
fn bits(mut live: u64) -> impl Iterator<Item = usize> {
    core::iter::from_fn(move || {
        (live != 0).then(|| {
            let i = live.trailing_zeros() as usize;
            live &= live - 1;
            i
        })
    })
}

/// Properties a key may name at `idx`: the next ones up to and including the first required one
/// (keys go in the schema's order), at most 64.
fn key_window(props: &[super::json_schema::Prop], idx: usize) -> u64 {
    let mut live = 0u64;
    for (i, p) in props.iter().enumerate().skip(idx).take(64) {
        live |= 1 << (i - idx);
        if p.required {
            break;
        }
    }
    live
}

impl JsonGuard {
    /// The schema's verdict on byte `b` (whitespace and syntax are the syntax's business).
    fn schema_byte(&mut self, b: u8, s: &Schema) -> bool {
        let mut mode = self.mode;
        match mode {
            Mode::Str { key: true, s: st } => return self.key_byte(b, st, s),
            Mode::Str { key: false, s: st } => {
                if self.lit {
                    return self.lit_byte(b, st == Str::Plain && b == b'"', s);
                }
                // A character begins at each byte read in the plain state (a lead byte, an
                // escape's `\`); `mpos` counts them.
                if st != Str::Plain {
                    return true;
                }
                let n = s.node(self.node);
                if b == b'"' {
                    return self.mpos >= n.min_chars;
                }
                self.mpos = self.mpos.saturating_add(1);
                return self.mpos <= n.max_chars;
            }
            Mode::Lit { lit, pos } => {
                return !self.lit || self.lit_byte(b, pos as usize + 1 == LITERALS[lit as usize].len(), s);
            }
            Mode::Num { n, .. } => {
                if n.next(b).is_some() {
                    if self.lit {
                        return self.lit_byte(b, false, s);
                    }
                    // Integers: no fraction, no exponent.
                    return !matches!(b, b'.' | b'e' | b'E') || s.node(self.node).types & T_NUMBER != 0;
                }
                // The number ends before `b`, which follows it.
                if self.lit && !self.lit_done(s) {
                    return false;
                }
                self.lit = false;
                mode = Mode::After;
            }
            _ => {}
        }
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            return true;
        }
        let d = self.depth as usize;
        match (mode, b) {
            (Mode::Start, b'{') => self.schema_value(b, s),
            (Mode::ObjOpen | Mode::After, b'}') | (Mode::ArrOpen | Mode::After, b']') => self.may_close(s),
            (Mode::ObjOpen | Mode::ObjKey, b'"') => self.key_start(s),
            (Mode::After, b',') if d > 0 => {
                let (node, idx) = self.frames[d - 1];
                let n = s.node(node);
                if self.top_is_object() {
                    n.props.as_ref().is_none_or(|p| (idx as usize) < p.len())
                } else {
                    u32::from(idx) < n.max_items
                }
            }
            (Mode::Value | Mode::ArrOpen, _) => {
                if d > 0 && !self.top_is_object() {
                    // An array item: its node, and one more begun.
                    let (node, count) = self.frames[d - 1];
                    let n = s.node(node);
                    if u32::from(count) >= n.max_items {
                        return false;
                    }
                    self.frames[d - 1].1 = count.saturating_add(1);
                    self.node = n.items;
                }
                self.schema_value(b, s)
            }
            _ => true,
        }
    }

    /// A value of `self.node` starting with `b`: a kind it allows, or the first byte of one of its
    /// literals. A container gets its frame.
    fn schema_value(&mut self, b: u8, s: &Schema) -> bool {
        let n = s.node(self.node);
        let k = start_kind(b);
        if admits(n.types, k) {
            self.mpos = 0;
            match (b, n.sign) {
                (b'-', Sign::NonNegative | Sign::Positive) | (b'0', Sign::Positive) => return false,
                _ => {}
            }
            if b == b'{' || b == b'[' {
                let Some(f) = self.frames.get_mut(self.depth as usize) else { return false };
                *f = (self.node, 0);
            }
            return true;
        }
        let live = n.lits.iter().enumerate().filter(|(_, l)| l[0] == b).fold(0u64, |m, (i, _)| m | 1 << i);
        self.lit = live != 0;
        self.live = live;
        self.mpos = 1;
        live != 0
    }

    /// The next byte of a literal; `end`: it closes the value, so a literal must end with it.
    fn lit_byte(&mut self, b: u8, end: bool, s: &Schema) -> bool {
        let lits = &s.node(self.node).lits;
        let p = self.mpos as usize;
        let live = bits(self.live)
            .filter(|&i| lits[i].get(p) == Some(&b) && (!end || lits[i].len() == p + 1))
            .fold(0u64, |m, i| m | 1 << i);
        self.live = live;
        self.mpos += 1;
        if end {
            self.lit = false;
        }
        live != 0
    }

    /// Whether a literal ends where the value (a number) just did.
    fn lit_done(&self, s: &Schema) -> bool {
        let lits = &s.node(self.node).lits;
        bits(self.live).any(|i| lits[i].len() == self.mpos as usize)
    }

    /// The opening quote of a key: the properties it may name.
    fn key_start(&mut self, s: &Schema) -> bool {
        let Some((node, idx)) = self.top_frame() else { return true };
        let Some(props) = &s.node(node).props else { return true };
        self.live = key_window(props, idx as usize);
        self.mpos = 0;
        self.live != 0
    }

    /// A byte of a key: it must go on spelling a candidate, or close one (which then gives the
    /// value's node and moves the object past that property).
    fn key_byte(&mut self, b: u8, st: Str, s: &Schema) -> bool {
        let d = self.depth as usize;
        let Some((node, idx)) = self.top_frame() else { return true };
        let n = s.node(node);
        let closing = st == Str::Plain && b == b'"';
        let Some(props) = &n.props else {
            if closing {
                self.node = n.values;
            }
            return true;
        };
        let (idx, p) = (idx as usize, self.mpos as usize);
        if closing {
            let Some(i) = bits(self.live).find(|&i| props[idx + i].key.len() == p) else { return false };
            self.frames[d - 1].1 = (idx + i + 1) as u16;
            self.node = props[idx + i].node;
            return true;
        }
        self.live = bits(self.live).filter(|&i| props[idx + i].key.get(p) == Some(&b)).fold(0, |m, i| m | 1 << i);
        self.mpos += 1;
        self.live != 0
    }

    /// Whether the top container may close: no required property left, enough items.
    fn may_close(&self, s: &Schema) -> bool {
        let Some((node, idx)) = self.top_frame() else { return true };
        if self.top_is_object() {
            s.rest(node, LEVELS - 1, idx as usize) == 0
        } else {
            u32::from(idx) >= s.node(node).min_items
        }
    }

    /// Bytes after frame `i`'s current value, or (`first`) in it before any: the required
    /// properties or items left, with their commas, and the close.
    fn frame_rest(&self, i: usize, s: &Schema, first: bool) -> usize {
        let (node, idx) = self.frames[i];
        // Levels left for the frame's values.
        let c = LEVELS - (i + 1);
        let rest = if (self.stack >> i) & 1 == 1 {
            s.rest(node, c, idx as usize)
        } else {
            let n = s.node(node);
            let need = n.min_items.saturating_sub(u32::from(idx)) as usize;
            need.saturating_mul(s.min_len(n.items, c).saturating_add(1))
        };
        // The first property or item has no comma.
        (1 + if first && rest > 0 { rest - 1 } else { rest }).min(INF)
    }

    /// `bytes_to_close` under a schema: the shortest completion the schema allows within the
    /// nesting limit ([`INF`] if there is none).
    fn schema_close(&self, s: &Schema) -> usize {
        let d = self.depth as usize;
        let outer = (0..d.saturating_sub(1)).fold(0usize, |a, i| a.saturating_add(self.frame_rest(i, s, false)));
        let top = |first| if d == 0 { 0 } else { self.frame_rest(d - 1, s, first) };
        // Levels left for a value inside the top container.
        let c = LEVELS - d;
        let free_values = || s.min_len(s.node(self.frames[d - 1].0).values, c);
        let value_rest = |own: usize| -> usize {
            let own = if self.lit {
                let lits = &s.node(self.node).lits;
                bits(self.live).map(|i| lits[i].len().saturating_sub(self.mpos as usize)).min().unwrap_or(INF)
            } else {
                own
            };
            own.saturating_add(top(false))
        };
        let local = match self.mode {
            Mode::Done => 0,
            Mode::Start => s.object_min(self.node, LEVELS),
            Mode::ObjOpen | Mode::ArrOpen => top(true),
            Mode::After => top(false),
            Mode::ObjKey => {
                let (node, idx) = self.frames[d - 1];
                match &s.node(node).props {
                    // `"":` + a value + `}`.
                    None => (3 + free_values()).saturating_add(1),
                    Some(props) => {
                        let mut g = *self;
                        g.live = key_window(props, idx as usize);
                        1 + g.schema_key(s, 0)
                    }
                }
            }
            Mode::Str { key: true, s: st } => match &s.node(self.frames[d - 1].0).props {
                None => (str_end(st) + 1 + free_values()).saturating_add(1),
                Some(_) => self.schema_key(s, self.mpos as usize),
            },
            Mode::Colon => (1 + s.min_len(self.node, c)).saturating_add(top(false)),
            Mode::Value if d > 0 && !self.top_is_object() => {
                // The next item, not begun yet: it, then the array's rest with it counted.
                let mut g = *self;
                g.frames[d - 1].1 = g.frames[d - 1].1.saturating_add(1);
                s.min_len(s.node(self.frames[d - 1].0).items, c).saturating_add(g.frame_rest(d - 1, s, false))
            }
            Mode::Value => s.min_len(self.node, c).saturating_add(top(false)),
            Mode::Str { key: false, s: st } => {
                // Characters still owed to `minLength`, a byte each at least.
                let owed = s.node(self.node).min_chars.saturating_sub(self.mpos) as usize;
                value_rest(str_end(st) + owed)
            }
            Mode::Num { n, .. } => value_rest(usize::from(!n.terminal())),
            Mode::Lit { lit, pos } => value_rest(LITERALS[lit as usize].len() - pos as usize),
        };
        local.saturating_add(outer).min(INF)
    }

    /// The shortest close from inside a key of the top object, `from` bytes of it written: the
    /// rest of the key, `":`, its value, the required properties after it and `}`.
    fn schema_key(&self, s: &Schema, from: usize) -> usize {
        let d = self.depth as usize;
        let (node, idx) = self.frames[d - 1];
        let Some(props) = &s.node(node).props else { return INF };
        let c = LEVELS - d;
        bits(self.live)
            .map(|i| {
                let j = idx as usize + i;
                (props[j].key.len().saturating_sub(from) + 2)
                    .saturating_add(s.min_len(props[j].node, c))
                    .saturating_add(s.rest(node, c, j + 1))
                    .saturating_add(1)
            })
            .min()
            .unwrap_or(INF)
            .min(INF)
    }
}

// ---------------------------------------------------------------------------------------------
// Masks and sampling
// ---------------------------------------------------------------------------------------------

/// `out[id]` = whether `guard` allows token `id` next (see [`TokenTexts::allowed`]); `out` is
/// resized to the vocabulary.
///
/// Tokens are visited in the order of their texts, so a shared prefix is validated once and a
/// rejected prefix rejects every token that starts with it; inside a string, tokens known to stay
/// in it are allowed without a look. Under a millisecond for Gemma's 262k tokens. The order is
/// made on the first call (about 60 ms for Gemma) and kept.
pub fn allowed_mask(guard: &JsonGuard, texts: &TokenTexts, rules: &Rules, out: &mut Vec<bool>) {
    out.clear();
    out.resize(texts.len(), false);
    if guard.is_complete() {
        for (id, ok) in out.iter_mut().enumerate() {
            *ok = texts.is_eos(id as u32);
        }
    }
    // (Under a schema, only inside a free string: declared keys and literals are spelled out.)
    let free = |key: bool, s: &Schema| {
        let unbounded = s.node(guard.node).max_chars == u32::MAX;
        !guard.lit && if key { guard.top_frame().is_none_or(|f| s.node(f.0).props.is_none()) } else { unbounded }
    };
    if let Mode::Str { s: Str::Plain, key } = guard.mode
        && rules.schema.as_deref().is_none_or(|s| free(key, s))
    {
        // Inside a string nearly every token is allowed: those that stay in it without a look
        // (and leave as much to close, so they fit the budget if staying put does).
        let plain = guard.fits(guard, rules);
        for (id, (ok, &f)) in out.iter_mut().zip(&texts.flags).enumerate() {
            if f & PLAIN != 0 {
                *ok = plain;
            } else if f & HAS_TEXT != 0 {
                *ok = guard.accepts_token(texts.text(id as u32), rules);
            }
        }
        return;
    }
    let order = texts.order();
    // states[i]: the guard after the first i bytes of the previous token.
    let mut states: Vec<JsonGuard> = Vec::with_capacity(order.max_len + 1);
    states.push(*guard);
    // The previous token was rejected at this byte (usize::MAX: accepted).
    let mut dead = usize::MAX;
    let mut start = 0;
    for ((&id, &lcp), &end) in order.ids.iter().zip(&order.lcp).zip(&order.ends) {
        let text = &order.bytes[start..end as usize];
        start = end as usize;
        let lcp = lcp as usize;
        if dead != usize::MAX && lcp > dead {
            // Starts with the rejected prefix.
            continue;
        }
        states.truncate(lcp + 1);
        let mut g = states[lcp];
        dead = usize::MAX;
        for (i, &b) in text.iter().enumerate().skip(lcp) {
            if !g.step_in(b, rules) {
                dead = i;
                break;
            }
            states.push(g);
        }
        if dead == usize::MAX {
            out[id as usize] = guard.fits(&g, rules);
        }
    }
}

/// Sample a token the guard allows, advance `guard` by its text, and return it.
///
/// Rejection sampling: `sample` picks from `logits`; a rejected id gets `-inf` and `sample` runs
/// again. After [`MAX_REJECTIONS`] rejections the full mask ([`allowed_mask`]) sets every
/// disallowed logit (and any logit past the vocabulary) to `-inf` and `sample` runs once more.
/// `logits` is modified.
///
/// EOS and other special tokens are rejected until `guard.is_complete()`; then only EOS tokens
/// and whitespace are allowed, but the caller is expected to stop generation as soon as the
/// object is complete. If nothing at all is allowed (impossible for vocabularies that hold every
/// byte, as byte-fallback SentencePiece and byte-level BPE ones do), the first sample comes back
/// and `guard` is unchanged.
pub fn pick(
    guard: &mut JsonGuard,
    texts: &TokenTexts,
    rules: &Rules,
    logits: &mut [f32],
    mut sample: impl FnMut(&[f32]) -> u32,
) -> u32 {
    let mut first = None;
    for _ in 0..MAX_REJECTIONS {
        let id = sample(logits);
        first.get_or_insert(id);
        if texts.allowed(guard, id, rules) {
            advance(guard, texts, id, rules);
            return id;
        }
        match logits.get_mut(id as usize) {
            // A sampler that returns an id it was told is impossible: stop asking.
            Some(l) if *l != f32::NEG_INFINITY => *l = f32::NEG_INFINITY,
            _ => break,
        }
    }
    let mut mask = Vec::new();
    allowed_mask(guard, texts, rules, &mut mask);
    let mut any = false;
    for (i, l) in logits.iter_mut().enumerate() {
        if mask.get(i).copied().unwrap_or(false) {
            any |= *l != f32::NEG_INFINITY && !l.is_nan();
        } else {
            *l = f32::NEG_INFINITY;
        }
    }
    if !any {
        return first.unwrap_or(0);
    }
    let id = sample(logits);
    if texts.allowed(guard, id, rules) {
        advance(guard, texts, id, rules);
    }
    id
}

fn advance(guard: &mut JsonGuard, texts: &TokenTexts, id: u32, rules: &Rules) {
    if let Some(text) = texts.get(id) {
        let pushed = guard.push_token(text, rules);
        debug_assert!(pushed);
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::OnceLock;
    use std::time::Instant;

    use purehw_core::source::ModelSource;

    /// splitmix64.
    pub(in crate::serve) struct Rng(pub u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn f32(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32
        }
    }

    fn valid_prefix(bytes: &[u8]) -> bool {
        JsonGuard::new().accepts(bytes)
    }

    fn complete(bytes: &[u8]) -> bool {
        let mut g = JsonGuard::new();
        g.push(bytes) && g.is_complete()
    }

    const EXAMPLE: &str = r#"{"a": [1, -2.5e3, true, null, "x\n\u00e9"]}"#;

    #[test]
    fn example_prefixes_accepted() {
        let b = EXAMPLE.as_bytes();
        for i in 0..=b.len() {
            assert!(valid_prefix(&b[..i]), "prefix {:?}", &EXAMPLE[..i]);
            assert_eq!(complete(&b[..i]), i == b.len(), "prefix {:?}", &EXAMPLE[..i]);
        }
        // Byte by byte gives the same.
        let mut g = JsonGuard::new();
        for &c in b {
            assert!(g.push(&[c]));
        }
        assert!(g.is_complete());
    }

    #[test]
    fn rejects() {
        let cases: &[&[u8]] = &[
            b"[",
            b"1",
            b"\"a\"",
            b"{\"a\" 1",
            b"{,",
            b"{\"a\":01",
            b"{\"a\":-01",
            b"{\"a\":1.}",
            b"{\"a\":1e}",
            b"{\"a\":.5}",
            b"{\"a\":+1}",
            b"{\"a\":-}",
            b"{\"a\":\"x\ny\"}",
            b"{\"a\":\"x\ty\"}",
            b"{\"a\":tru e}",
            b"{\"a\":True}",
            b"{\"a\":nul}",
            b"{}x",
            b"{}}",
            b"{} {",
            b"{\"a\":1}}",
            b"{\"a\":1,}",
            b"{\"a\":[1,]}",
            b"{\"a\":[1 2]}",
            b"{\"a\":[}",
            b"{\"a\":{]}",
            b"{\"a\"::1}",
            b"{1:2}",
            b"{'a':1}",
            b"{\"a\":\"\\x\"}",
            b"{\"a\":\"\\u12G4\"}",
            b"{\"a\":\"\\udc00\"}",
            b"{\"a\":\"\\ud800\"}",
            b"{\"a\":\"\\ud800\\u0041\"}",
            b"{\"a\":\"\xC3\"}",
            b"{\"a\":\"\xC0\x80\"}",
            b"{\"a\":\"\xED\xA0\x80\"}",
            b"{\"a\":\"\xF4\x90\x80\x80\"}",
            b"{\"a\":\"\x80\"}",
            b"{\"a\":NaN}",
            b"{\"a\":1e123}",
            b"{\"a\":1E-100}",
            b"\n\n{",
            b"{\n\n}",
        ];
        for c in cases {
            assert!(!complete(c), "{:?} completed", String::from_utf8_lossy(c));
            let first_bad = (0..=c.len()).find(|&i| !valid_prefix(&c[..i]));
            assert!(first_bad.is_some(), "{:?} accepted as a prefix", String::from_utf8_lossy(c));
        }
        // Specific rejection points: state unchanged after a rejected push.
        let mut g = JsonGuard::new();
        assert!(g.push(b"{\"a\": tru"));
        let before = g;
        assert!(!g.push(b" e"));
        assert_eq!(g, before);
        assert!(g.push(b"e}"));
        assert!(g.is_complete());
        assert!(g.push(b" \n"));
        assert!(!g.push(b"x"));
    }

    #[test]
    fn limits() {
        // Depth.
        let deep = "[".repeat(MAX_DEPTH as usize - 1);
        let mut g = JsonGuard::new();
        assert!(g.push(format!("{{\"a\":{deep}").as_bytes()));
        assert!(!g.accepts(b"["));
        assert!(!g.accepts(b"{"));
        assert!(g.push(b"1"));
        assert!(g.push("]".repeat(MAX_DEPTH as usize - 1).as_bytes()));
        assert!(g.push(b"}"));
        assert!(g.is_complete());
        // Whitespace runs.
        let mut g = JsonGuard::new();
        assert!(g.push(&vec![b' '; MAX_WS_RUN as usize]));
        assert!(!g.accepts(b" "));
        assert!(g.push(b"{"));
        assert!(g.push(b"\r\n    "));
        assert!(!g.accepts(b"\n"));
        assert!(g.push(b"\"k\"\n:\n1\n,\n\"x\"\n:\n2"));
        // Numbers: the last byte must leave a number that can end.
        let mut g = JsonGuard::new();
        assert!(g.push(b"{\"a\":"));
        assert!(g.push(&vec![b'9'; MAX_NUMBER_LEN as usize - 1]));
        assert!(!g.accepts(b"."));
        assert!(!g.accepts(b"e"));
        assert!(g.push(b"9"));
        assert!(!g.accepts(b"9"));
        assert!(g.push(b"}"));
        assert!(g.is_complete());
        assert!(complete(b"{\"a\":-1.5E-99,\"b\":1e+09,\"c\":0e0}"));
        let mut g = JsonGuard::new();
        assert!(g.push(b"{\"a\":"));
        assert!(g.push(&vec![b'9'; MAX_NUMBER_LEN as usize - 2]));
        assert!(g.push(b"e"));
        assert!(!g.accepts(b"+"));
        assert!(g.push(b"5"));
    }

    #[test]
    fn strings() {
        for s in [
            r#"{"é€𝄞": "ünï \"q\" \\ \/ \b\f\n\r\t \u0000 \uFFFF \uD834\uDD1E \ud83d\ude00"}"#,
            "{\"\u{10FFFF}\u{800}\u{7FF}\u{80}\":\"\u{E000}\u{D7FF}\"}",
        ] {
            assert!(complete(s.as_bytes()), "{s}");
            serde_json::from_str::<serde_json::Value>(s).unwrap();
        }
        // A character split over pushes.
        let mut g = JsonGuard::new();
        assert!(g.push(b"{\"a\":\"\xF0"));
        assert!(!g.accepts(b"\""));
        assert!(g.push(b"\x9D"));
        assert!(g.push(b"\x84\x9E\"}"));
        assert!(g.is_complete());
    }

    fn random_value(rng: &mut Rng, depth: usize) -> serde_json::Value {
        use serde_json::Value;
        let pick = rng.below(if depth >= 5 { 6 } else { 8 });
        match pick {
            0 => Value::Null,
            1 => Value::Bool(rng.below(2) == 0),
            2 => Value::from(rng.next() as i64 >> rng.below(64)),
            3 => Value::from((rng.f32() as f64 - 0.5) * 10f64.powi(rng.below(40) as i32 - 20)),
            4 | 5 => Value::String(random_string(rng)),
            6 => Value::Array((0..rng.below(4)).map(|_| random_value(rng, depth + 1)).collect()),
            _ => random_object(rng, depth + 1),
        }
    }

    fn random_object(rng: &mut Rng, depth: usize) -> serde_json::Value {
        serde_json::Value::Object(
            (0..rng.below(4)).map(|_| (random_string(rng), random_value(rng, depth + 1))).collect(),
        )
    }

    fn random_string(rng: &mut Rng) -> String {
        const CHARS: &[char] =
            &['a', 'Z', ' ', '"', '\\', '\n', '\t', '\u{1}', 'é', '€', '𝄞', '/', '\u{7f}', '\u{FFFD}'];
        (0..rng.below(6)).map(|_| CHARS[rng.below(CHARS.len())]).collect()
    }

    /// Every prefix of many valid objects is accepted, split anywhere, and the whole is complete.
    #[test]
    fn prefixes_of_valid_objects() {
        let mut rng = Rng(7);
        let mut texts: Vec<String> = [
            "{}",
            " {\"a\":{}}",
            "{\"a\":[[],[{}],{\"b\":[0,-0,0.5,1E+2,-3e-04,123456789]}]}",
            "{\n  \"name\": \"Ada\",\n  \"tags\": [\"x\", \"y\"],\n  \"ok\": false\n}",
            "{\"s\":\"\\\"\\\\\\/\\b\\f\\n\\r\\t\\u0041\\ud800\\udc00\"}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for _ in 0..300 {
            let v = random_object(&mut rng, 0);
            texts.push(serde_json::to_string(&v).unwrap());
            texts.push(serde_json::to_string_pretty(&v).unwrap());
        }
        for t in &texts {
            let b = t.as_bytes();
            let mut g = JsonGuard::new();
            for i in 0..b.len() {
                assert!(!g.is_complete(), "{t:?} complete early at {i}");
                assert!(g.push(&b[i..i + 1]), "{t:?} rejected at byte {i}");
            }
            assert!(g.is_complete(), "{t:?}");
            // Random chunking.
            let mut g = JsonGuard::new();
            let mut i = 0;
            while i < b.len() {
                let j = (i + 1 + rng.below(8)).min(b.len());
                assert!(g.accepts(&b[i..j]));
                assert!(g.push(&b[i..j]));
                i = j;
            }
            assert!(g.is_complete());
        }
    }

    /// Finish any accepted prefix: the guard has no dead ends.
    fn finish(mut g: JsonGuard, out: &mut Vec<u8>) {
        let order: Vec<u8> = b"\"}]0".iter().copied().chain(0..=255u8).collect();
        for _ in 0..2000 {
            if g.is_complete() {
                return;
            }
            let b = *order.iter().find(|&&b| g.accepts(&[b])).expect("dead end");
            assert!(g.push(&[b]));
            out.push(b);
        }
        panic!("no completion in 2000 bytes: {:?}", String::from_utf8_lossy(out));
    }

    /// Random walks over accepted bytes: never a dead end, and every completion parses.
    #[test]
    fn random_walks_complete_and_parse() {
        let mut rng = Rng(11);
        let alphabet: Vec<u8> = b"{}[]\":,0123456789-+.eEtruefalsn \n\t\\/bu\xC3\xA9\xE2\x82\xAC\xF0\x9D\x84\x9EaDdC"
            .iter()
            .copied()
            .chain([0x01, 0x80, 0xFF, b'x', 0xE0, 0xED, 0xF4, 0x90, 0xBF, 0xA0, 0x9F, 0x8F, 0xC2, 0xC0])
            .collect();
        let mut completed_early = 0;
        for _ in 0..20000 {
            let mut g = JsonGuard::new();
            let mut out = Vec::new();
            let steps = rng.below(200);
            for _ in 0..steps {
                if g.is_complete() {
                    completed_early += 1;
                    break;
                }
                let allowed: Vec<u8> = alphabet.iter().copied().filter(|&b| g.accepts(&[b])).collect();
                assert!(!allowed.is_empty(), "{:?} {g:?}", String::from_utf8_lossy(&out));
                let b = allowed[rng.below(allowed.len())];
                assert!(g.push(&[b]));
                out.push(b);
            }
            finish(g, &mut out);
            let v: serde_json::Value = serde_json::from_slice(&out)
                .unwrap_or_else(|e| panic!("{:?} does not parse: {e}", String::from_utf8_lossy(&out)));
            assert!(v.is_object());
        }
        assert!(completed_early > 0);
    }

    /// `to_close` is exact: from random prefixes, a byte lowering it by one always exists and
    /// the walk ends complete in exactly that many bytes; and a budgeted byte walk (one byte per
    /// token) that samples at random always ends in an object within its budget.
    #[test]
    fn budget_closes_in_time() {
        let mut rng = Rng(23);
        let alphabet: Vec<u8> =
            b"{}[]\":,0123456789-.eEtrufalsn \n\\/buDdC8\xC3\xA9\xE2\x82\xAC\xF0\x9D\x84\x9E".to_vec();
        let closers: Vec<u8> = b"{\"}]0:\\nuDCtrufalsn0123456789abcdef".iter().copied().chain(0x80..=0xBF).collect();
        for _ in 0..20000 {
            let mut g = JsonGuard::new();
            let mut out = Vec::new();
            for _ in 0..rng.below(120) {
                let allowed: Vec<u8> = alphabet.iter().copied().filter(|&b| g.accepts(&[b])).collect();
                if g.is_complete() || allowed.is_empty() {
                    break;
                }
                let b = allowed[rng.below(allowed.len())];
                assert!(g.push(&[b]));
                out.push(b);
            }
            let need = g.bytes_to_close(&Rules::NONE);
            for k in 0..need {
                let want = need - k - 1;
                let b = *closers
                    .iter()
                    .find(|&&b| {
                        let mut h = g;
                        h.push(&[b]) && h.bytes_to_close(&Rules::NONE) == want
                    })
                    .unwrap_or_else(|| panic!("no closing byte after {:?} ({g:?})", String::from_utf8_lossy(&out)));
                assert!(g.push(&[b]));
                out.push(b);
            }
            assert!(g.is_complete(), "{:?}", String::from_utf8_lossy(&out));
            assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok(), "{:?}", String::from_utf8_lossy(&out));
        }
        for budget in [2usize, 3, 5, 8, 13, 40] {
            for _ in 0..2000 {
                let mut g = JsonGuard::with_budget(budget);
                let mut out = Vec::new();
                for _ in 0..budget {
                    let allowed: Vec<u8> =
                        alphabet.iter().copied().filter(|&b| g.accepts_token(&[b], &Rules::NONE)).collect();
                    if g.is_complete() {
                        break;
                    }
                    assert!(!allowed.is_empty(), "stuck at {:?} ({g:?})", String::from_utf8_lossy(&out));
                    let b = allowed[rng.below(allowed.len())];
                    assert!(g.push_token(&[b], &Rules::NONE));
                    out.push(b);
                }
                assert!(g.is_complete(), "budget {budget}: {:?} not closed", String::from_utf8_lossy(&out));
                assert!(out.len() <= budget);
                assert!(
                    serde_json::from_slice::<serde_json::Value>(&out).is_ok(),
                    "{:?}",
                    String::from_utf8_lossy(&out)
                );
            }
        }
    }

    /// A forced call: random byte walks (one byte per token, within a budget) always end in
    /// `{"name": N, "arguments": {…}}` with `N` one of the names, and never leave it early.
    #[test]
    fn forced_call_shape() {
        let names: Vec<String> = ["get_weather", "get_time", "g", "lookup.v2"].iter().map(|n| n.to_string()).collect();
        let rules = Rules { names: names.clone(), schema: None };
        let min = JsonGuard::min_tokens(&rules);
        assert_eq!(min, br#"{"name": "g", "arguments": {}}"#.len());
        let mut alphabet: Vec<u8> = b"{}[]\":,0123456789-.etrufalsn \n\\/".to_vec();
        alphabet.extend(names.iter().flat_map(|n| n.bytes()));
        let mut rng = Rng(31);
        for budget in [min, min + 1, min + 5, min + 40, usize::MAX] {
            for _ in 0..3000 {
                let mut g = JsonGuard::for_call(names.len(), budget);
                let mut out = Vec::new();
                for _ in 0..budget.min(300) {
                    if g.is_complete() {
                        break;
                    }
                    let allowed: Vec<u8> =
                        alphabet.iter().copied().filter(|&b| g.accepts_token(&[b], &rules)).collect();
                    assert!(!allowed.is_empty(), "stuck at {:?} ({g:?})", String::from_utf8_lossy(&out));
                    let b = allowed[rng.below(allowed.len())];
                    assert!(g.push_token(&[b], &rules));
                    out.push(b);
                }
                if budget == usize::MAX && !g.is_complete() {
                    continue;
                }
                assert!(g.is_complete(), "budget {budget}: {:?} not closed", String::from_utf8_lossy(&out));
                let v: serde_json::Value = serde_json::from_slice(&out)
                    .unwrap_or_else(|e| panic!("{:?} does not parse: {e}", String::from_utf8_lossy(&out)));
                let name = v["name"].as_str().expect("a name");
                assert!(names.iter().any(|n| n == name), "{name}");
                assert!(v["arguments"].is_object(), "{v}");
                assert_eq!(v.as_object().unwrap().len(), 2);
            }
        }
        // A name must be finished before its closing quote, and no other text fits.
        let g = JsonGuard::for_call(names.len(), usize::MAX);
        assert!(g.accepts_token(br#"{"name": "get_time", "arguments": {"tz": "UTC"}}"#, &rules));
        assert!(!g.accepts_token(br#"{"name": "get_", "#, &rules));
        assert!(!g.accepts_token(br#"{"name": "other"#, &rules));
        assert!(!g.accepts_token(br#" {"name""#, &rules));
        assert!(!g.accepts_token(br#"{"name": "g", "arguments": {}, "x": 1"#, &rules));
        assert!(!g.accepts_token(br#"{"name": "g", "arguments": []"#, &rules));
    }

    // ---- Real vocabularies ----

    fn model_path(rel: &str) -> Option<PathBuf> {
        let base = std::env::var_os("PUREHW_MODELS")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/purehw/models")))?;
        let path = base.join(rel);
        if path.is_file() {
            Some(path)
        } else {
            eprintln!("skipping: {} not found", path.display());
            None
        }
    }

    fn load(rel: &str) -> Option<Tokenizer> {
        let path = model_path(rel)?;
        let source = ModelSource::open(&path).unwrap();
        Some(Tokenizer::from_gguf(&path.display().to_string(), source.gguf().unwrap()).unwrap())
    }

    fn timed_texts(name: &str, tok: &Tokenizer) -> TokenTexts {
        let (mut best, mut best_order) = (f64::MAX, f64::MAX);
        let mut texts = None;
        for _ in 0..3 {
            let t = Instant::now();
            let built = TokenTexts::new(tok);
            best = best.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            built.order();
            best_order = best_order.min(t.elapsed().as_secs_f64());
            texts = Some(built);
        }
        let texts = texts.unwrap();
        eprintln!(
            "{name}: TokenTexts::new over {} tokens: {:.1} ms; the mask's sorted order (first allowed_mask): {:.1} ms (best of 3)",
            texts.len(),
            best * 1e3,
            best_order * 1e3
        );
        texts
    }

    fn gemma() -> Option<&'static (Tokenizer, TokenTexts)> {
        static M: OnceLock<Option<(Tokenizer, TokenTexts)>> = OnceLock::new();
        M.get_or_init(|| {
            let tok = load("gemma3-270m/gemma-3-270m-q4_k_m.gguf")?;
            let texts = timed_texts("gemma3-270m", &tok);
            Some((tok, texts))
        })
        .as_ref()
    }

    fn smollm() -> Option<&'static (Tokenizer, TokenTexts)> {
        static M: OnceLock<Option<(Tokenizer, TokenTexts)>> = OnceLock::new();
        M.get_or_init(|| {
            let tok = load("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")?;
            let texts = timed_texts("smollm2-135m", &tok);
            Some((tok, texts))
        })
        .as_ref()
    }

    fn check_texts(name: &str, tok: &Tokenizer, texts: &TokenTexts) {
        assert_eq!(texts.len(), tok.vocab_size());
        let n = texts.len() as u32;
        // Special tokens have no text; EOS is marked.
        for id in 0..n {
            if tok.is_special(id) {
                assert!(texts.get(id).is_none(), "{name}: special {id} has text");
            }
        }
        for &id in tok.eos_ids() {
            assert!(texts.is_eos(id) && texts.get(id).is_none(), "{name}: EOS {id}");
        }
        let with_text = (0..n).filter(|&id| texts.get(id).is_some()).count();
        eprintln!("{name}: {with_text} of {n} tokens have text");
        assert!(with_text > n as usize * 9 / 10);

        // Every token whose text is whole UTF-8: what decoding it mid-sequence adds.
        let x = neutral_token(tok).expect("a neutral token");
        let before = tok.decode(&[x]).unwrap();
        let mut checked = 0;
        for id in 0..n {
            let Some(t) = texts.get(id) else { continue };
            if let Ok(s) = std::str::from_utf8(t) {
                let after = tok.decode(&[x, id]).unwrap();
                assert_eq!(
                    after.strip_prefix(before.as_str()),
                    Some(s),
                    "{name}: token {id} {:?}",
                    tok.token_to_piece(id)
                );
                checked += 1;
            }
        }
        eprintln!("{name}: {checked} tokens checked one by one");

        // Random sequences: the concatenated texts are the decoded text. Tokens carrying part of
        // a character come in whole-character runs (the bytes of random characters).
        let whole: Vec<u32> =
            (0..n).filter(|&id| texts.get(id).is_some_and(|t| std::str::from_utf8(t).is_ok())).collect();
        let mut by_byte: Vec<Vec<u32>> = vec![Vec::new(); 256];
        for id in 0..n {
            if let Some(&[b]) = texts.get(id) {
                by_byte[b as usize].push(id);
            }
        }
        let mut rng = Rng(3);
        let chars = ['é', '€', '𝄞', 'ß', '中', '\u{10FFFF}'];
        let mut sequences = 0;
        for _ in 0..2000 {
            let mut ids = vec![x];
            let mut expect: Vec<u8> = before.clone().into_bytes();
            for _ in 0..1 + rng.below(40) {
                if rng.below(8) == 0 {
                    let c = chars[rng.below(chars.len())];
                    let mut buf = [0; 4];
                    let bytes = c.encode_utf8(&mut buf).as_bytes();
                    if bytes.iter().all(|&b| !by_byte[b as usize].is_empty()) {
                        for &b in bytes {
                            let cands = &by_byte[b as usize];
                            ids.push(cands[rng.below(cands.len())]);
                            expect.push(b);
                        }
                        continue;
                    }
                }
                let id = whole[rng.below(whole.len())];
                ids.push(id);
                expect.extend_from_slice(texts.get(id).unwrap());
            }
            let decoded = tok.decode(&ids).unwrap();
            assert_eq!(decoded.as_bytes(), expect.as_slice(), "{name}: {ids:?}");
            sequences += 1;
        }
        eprintln!("{name}: {sequences} random sequences match decode");
    }

    #[test]
    fn token_texts_gemma() {
        let Some((tok, texts)) = gemma() else { return };
        check_texts("gemma3-270m", tok, texts);
    }

    #[test]
    fn token_texts_smollm() {
        let Some((tok, texts)) = smollm() else { return };
        check_texts("smollm2-135m", tok, texts);
    }

    /// The same on Gemma's `tokenizer.json` (the `tokenizers` engine, Metaspace + ByteFallback).
    #[test]
    fn token_texts_gemma_tokenizer_json() {
        let Some(path) = model_path("gemma3-270m/tokenizer.json") else { return };
        let tok = Tokenizer::from_file(&path).unwrap();
        let texts = timed_texts("gemma3-270m tokenizer.json", &tok);
        check_texts("gemma3-270m tokenizer.json", &tok, &texts);
    }

    fn naive_mask(guard: &JsonGuard, texts: &TokenTexts) -> Vec<bool> {
        (0..texts.len() as u32).map(|id| texts.allowed(guard, id, &Rules::NONE)).collect()
    }

    fn check_masks(name: &str, texts: &TokenTexts) {
        let prefixes: &[&[u8]] = &[
            b"",
            b"{",
            b"{\"ke",
            b"{\"key\"",
            b"{\"key\":",
            b"{\"key\": -1",
            b"{\"key\": 0.5e",
            b"{\"key\": [tr",
            b"{\"key\": \"va\\",
            b"{\"key\": \"va\\ud83d",
            b"{\"key\": \"va\xE2\x82",
            b"{\"key\": [1, {\"a\": null}",
            b"{\"key\": 1}",
        ];
        let mut mask = Vec::new();
        let t = Instant::now();
        allowed_mask(&JsonGuard::new(), texts, &Rules::NONE, &mut mask);
        eprintln!("{name}: first allowed_mask (sorts the vocabulary): {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        for p in prefixes {
            let mut g = JsonGuard::new();
            assert!(g.push(p));
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                allowed_mask(&g, texts, &Rules::NONE, &mut mask);
                best = best.min(t.elapsed().as_secs_f64());
            }
            let t = Instant::now();
            let naive = naive_mask(&g, texts);
            let naive_time = t.elapsed().as_secs_f64();
            let allowed = mask.iter().filter(|&&a| a).count();
            eprintln!(
                "{name}: allowed_mask after {:?}: {:.2} ms (naive {:.2} ms), {allowed} allowed",
                String::from_utf8_lossy(p),
                best * 1e3,
                naive_time * 1e3
            );
            assert!(mask == naive, "{name}: mask differs after {:?}", String::from_utf8_lossy(p));
            assert!(allowed > 0);
        }
        // A forced call, in its fixed text, its name and its arguments, with a budget.
        let names: Vec<String> = ["get_weather".to_string(), "get_time".to_string()].into();
        let rules = Rules { names: names.clone(), schema: None };
        let call: &[&[u8]] = &[
            b"",
            b"{\"na",
            b"{\"name\": \"get_",
            b"{\"name\": \"get_time",
            b"{\"name\": \"get_time\", \"arg",
            b"{\"name\": \"get_time\", \"arguments\": {\"tz\": \"U",
            b"{\"name\": \"get_time\", \"arguments\": {}",
        ];
        for p in call {
            for budget in [usize::MAX, 60] {
                let mut g = JsonGuard::for_call(names.len(), budget);
                assert!(g.push_token(p, &rules));
                allowed_mask(&g, texts, &rules, &mut mask);
                let naive: Vec<bool> = (0..texts.len() as u32).map(|id| texts.allowed(&g, id, &rules)).collect();
                let allowed = mask.iter().filter(|&&a| a).count();
                assert!(mask == naive, "{name}: call mask differs after {:?}", String::from_utf8_lossy(p));
                assert!(allowed > 0, "{name}: nothing allowed after {:?}", String::from_utf8_lossy(p));
            }
        }
    }

    /// Under a schema: keys, literals and free strings, with and without a budget.
    fn check_schema_masks(name: &str, texts: &TokenTexts) {
        let doc = crate::serve::json_schema::tests::person_schema();
        let rules = Rules { names: Vec::new(), schema: Some(Arc::new(Schema::compile(&[Some(&doc)]).unwrap())) };
        let head = r#"{"name": "A", "age": 4, "role": "user""#;
        let prefixes = [
            String::new(),
            "{".into(),
            r#"{"na"#.into(),
            r#"{"name": "Al"#.into(),
            r#"{"name": "A", "age": 4"#.into(),
            r#"{"name": "A", "age": 4, "role": "us"#.into(),
            r#"{"name": "A", "age": 4, "role": "用"#.into(),
            format!("{head}, \"level\": 1"),
            format!("{head}, \"tags\": ["),
            format!("{head}, \"tags\": [\"a\"], \"a\\\"b\": \""),
            format!("{head}, \"tags\": [\"a\"], \"a\\\"b\": \"x\", \"meta\": {{\"k"),
            format!("{head}, \"tags\": [\"a\"], \"a\\\"b\": \"x\", \"kids\": [{{\"id\": 1}}"),
        ];
        let mut mask = Vec::new();
        for p in &prefixes {
            for budget in [usize::MAX, 120] {
                let mut g = JsonGuard::with_budget(budget).with_schema(&rules);
                assert!(g.push_token(p.as_bytes(), &rules), "{p}");
                let t = Instant::now();
                allowed_mask(&g, texts, &rules, &mut mask);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let naive: Vec<bool> = (0..texts.len() as u32).map(|id| texts.allowed(&g, id, &rules)).collect();
                let allowed = mask.iter().filter(|&&a| a).count();
                if budget == usize::MAX {
                    eprintln!("{name}: schema mask after {p:?}: {ms:.2} ms, {allowed} allowed");
                }
                assert!(mask == naive, "{name}: schema mask differs after {p:?}");
                assert!(allowed > 0, "{name}: nothing allowed after {p:?}");
            }
        }
    }

    #[test]
    fn masks_gemma() {
        let Some((_, texts)) = gemma() else { return };
        check_masks("gemma3-270m", texts);
        check_schema_masks("gemma3-270m", texts);
    }

    #[test]
    fn masks_smollm() {
        let Some((_, texts)) = smollm() else { return };
        check_masks("smollm2-135m", texts);
        check_schema_masks("smollm2-135m", texts);
    }

    fn argmax(logits: &[f32]) -> u32 {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        best as u32
    }

    /// Greedy picks from random logits: the output is always a valid prefix, and every completed
    /// output parses as an object. `bias` favours structural tokens so that objects complete.
    fn end_to_end(name: &str, tok: &Tokenizer, texts: &TokenTexts) {
        let n = texts.len();
        let closing: Vec<bool> = (0..n as u32)
            .map(|id| texts.get(id).is_some_and(|t| t.iter().any(|b| b"\"}]0123456789".contains(b))))
            .collect();
        let mut rng = Rng(5);
        let mut completions = 0;
        let mut masked = 0;
        let mut steps_total = 0;
        let mut logits = vec![0f32; n];
        for run in 0..24 {
            let bias = if run % 2 == 0 { 0.0 } else { 0.6 };
            let mut g = JsonGuard::new();
            let mut out: Vec<u8> = Vec::new();
            let mut ids = Vec::new();
            for _ in 0..200 {
                for (i, l) in logits.iter_mut().enumerate() {
                    *l = rng.f32() + if closing[i] { bias } else { 0.0 };
                }
                let mut samples = 0;
                let id = pick(&mut g, texts, &Rules::NONE, &mut logits, |l| {
                    samples += 1;
                    argmax(l)
                });
                masked += usize::from(samples > MAX_REJECTIONS);
                steps_total += 1;
                if g.is_complete() && texts.is_eos(id) {
                    break;
                }
                let text = texts.get(id).unwrap_or_else(|| panic!("{name}: picked {id} without text"));
                out.extend_from_slice(text);
                ids.push(id);
                assert!(valid_prefix(&out), "{name}: {:?}", String::from_utf8_lossy(&out));
                if g.is_complete() {
                    break;
                }
            }
            // The bytes are the decoded text (whole UTF-8, nothing lost).
            let x = neutral_token(tok).unwrap();
            let mut with_x = vec![x];
            with_x.extend(&ids);
            let decoded = tok.decode(&with_x).unwrap();
            assert_eq!(decoded.as_bytes()[decoded.len() - out.len()..], out[..], "{name}");
            if g.is_complete() {
                completions += 1;
                let v: serde_json::Value = serde_json::from_slice(&out)
                    .unwrap_or_else(|e| panic!("{name}: {:?}: {e}", String::from_utf8_lossy(&out)));
                assert!(v.is_object());
                if completions <= 3 {
                    eprintln!("{name}: completed: {}", String::from_utf8_lossy(&out));
                }
            }
        }
        eprintln!("{name}: {completions} of 24 runs completed; {masked} of {steps_total} steps needed the full mask");
        assert!(completions > 0);
    }

    /// Random logits under the schema with a budget: every reply closes in time, parses and
    /// matches the schema.
    fn end_to_end_schema(name: &str, texts: &TokenTexts) {
        let doc = crate::serve::json_schema::tests::person_schema();
        let rules = Rules { names: Vec::new(), schema: Some(Arc::new(Schema::compile(&[Some(&doc)]).unwrap())) };
        let mut rng = Rng(9);
        let mut logits = vec![0f32; texts.len()];
        let min = JsonGuard::min_tokens(&rules);
        for (run, budget) in [min, min + 20, min + 80, min + 250].iter().cycle().take(8).enumerate() {
            let mut g = JsonGuard::with_budget(*budget).with_schema(&rules);
            let mut out: Vec<u8> = Vec::new();
            for _ in 0..*budget {
                for l in logits.iter_mut() {
                    *l = rng.f32();
                }
                let id = pick(&mut g, texts, &rules, &mut logits, argmax);
                out.extend_from_slice(texts.get(id).unwrap_or_else(|| panic!("{name}: picked {id} without text")));
                if g.is_complete() {
                    break;
                }
            }
            assert!(g.is_complete(), "{name}: budget {budget}: {:?} not closed", String::from_utf8_lossy(&out));
            let v: serde_json::Value = serde_json::from_slice(&out)
                .unwrap_or_else(|e| panic!("{name}: {:?}: {e}", String::from_utf8_lossy(&out)));
            assert!(crate::serve::json_schema::tests::valid(&v, &doc, &doc), "{name}: {v}");
            if run < 2 {
                eprintln!("{name}: schema reply in {budget} tokens: {}", String::from_utf8_lossy(&out));
            }
        }
    }

    #[test]
    fn end_to_end_gemma() {
        let Some((tok, texts)) = gemma() else { return };
        end_to_end("gemma3-270m", tok, texts);
        end_to_end_schema("gemma3-270m", texts);
    }

    #[test]
    fn end_to_end_smollm() {
        let Some((tok, texts)) = smollm() else { return };
        end_to_end("smollm2-135m", tok, texts);
        end_to_end_schema("smollm2-135m", texts);
    }
}

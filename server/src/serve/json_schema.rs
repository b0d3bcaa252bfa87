//! JSON Schema, compiled into the rules the JSON guard checks byte by byte: for
//! `response_format: {"type": "json_schema", …}` and for the arguments of forced tool calls.
//!
//! The subset is what structured-output clients send (OpenAI's strict mode, pydantic via the SDK
//! and LangChain): `type` (one or a list), `properties` + `required` (keys are written in the
//! schema's order, each at most once, the required ones always; no other keys; a key only
//! `required` names comes last), an object without either takes any keys with values per
//! `additionalProperties`, `items`, `minItems`,
//! `maxItems`, `enum`, `const`, `anyOf` / `oneOf` whose alternatives start differently (a string
//! or null, an object or an array, …), a one-element `allOf`, and `$ref` to `#…` pointers
//! (`$defs`, `definitions`, recursion included), OpenAPI's `nullable`, `minLength` / `maxLength`
//! (in code points, as Python counts), and numeric bounds at zero (`minimum: 0`; `exclusiveMinimum:
//! 0`, which on integers also refuses 0): pydantic's `ge=0` / `gt=0`. Other keywords (`pattern`,
//! `format`, other bounds, …) are not enforced. Alternatives that cannot be told
//! apart by their first byte (two different object shapes, say) fall back to any JSON value of
//! those kinds, so the reply still parses.

use std::collections::HashMap;

use serde_json::Value;

use super::json_guard::MAX_DEPTH;

/// Levels of nesting a reply may use (the top-level object takes one).
pub(super) const LEVELS: usize = MAX_DEPTH as usize;

/// The node that accepts any JSON value.
pub const ANY: u16 = 0;

/// Value kinds, as bits of [`Node::types`].
pub const T_OBJECT: u8 = 1;
pub const T_ARRAY: u8 = 2;
pub const T_STRING: u8 = 4;
/// Integers only (no fraction or exponent).
pub const T_INTEGER: u8 = 8;
/// Any number (integers included).
pub const T_NUMBER: u8 = 16;
pub const T_BOOL: u8 = 32;
pub const T_NULL: u8 = 64;
const T_ALL: u8 = 127;

/// Unreachable length (a schema that cannot be completed).
pub const INF: usize = usize::MAX / 4;
/// Most nodes one request may compile to.
const MAX_NODES: usize = 4096;
/// Deepest nesting of schema objects (outside `$ref`s) the compiler follows.
const MAX_NESTING: usize = 64;
/// Most `enum` values (a choice is tracked as a bitmask).
pub const MAX_LITERALS: usize = 64;
/// Most properties one object may declare, and all objects together (each costs a row of
/// lengths per nesting level).
pub const MAX_PROPERTIES: usize = 1024;
const MAX_TOTAL_PROPERTIES: usize = 16384;

/// Compiled schemas: a node arena and the root node of each schema compiled into it.
#[derive(Debug, Default)]
pub struct Schema {
    pub(super) nodes: Vec<Node>,
    pub(super) roots: Vec<u16>,
}

/// What one schema position allows.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Node {
    /// `T_*` bits: the kinds a value may be (beside `lits`).
    pub types: u8,
    /// Objects: `Some`: only these keys, in this order; `None`: any keys, values per `values`.
    pub props: Option<Vec<Prop>>,
    pub values: u16,
    /// Arrays.
    pub items: u16,
    pub min_items: u32,
    pub max_items: u32,
    /// Exact value texts (compact JSON) also allowed, for kinds not in `types`.
    pub lits: Vec<Vec<u8>>,
    /// Strings: characters (code points) at least and at most.
    pub min_chars: u32,
    pub max_chars: u32,
    /// Numbers: `minimum: 0` (no sign), `exclusiveMinimum: 0` on integers (nor a leading 0).
    pub sign: Sign,
    /// `min[a]`: fewest bytes of a value of this node with `a` levels of nesting left for it
    /// (containers need one; [`INF`]: none fits).
    pub min: Vec<usize>,
    /// `rest[c·(props + 1) + i]`: bytes of the required properties from `i` on, each as
    /// `,"key":` + its shortest value with `c` levels left for the values.
    pub rest: Vec<usize>,
}

/// What a number's sign may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sign {
    Any,
    /// No `-`.
    NonNegative,
    /// No `-`, and (integers) not `0`.
    Positive,
}

/// One declared property.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Prop {
    /// The key as it appears between the quotes (JSON-escaped).
    pub key: Vec<u8>,
    pub node: u16,
    pub required: bool,
}

impl Node {
    fn any() -> Node {
        Node {
            types: T_ALL,
            props: None,
            values: ANY,
            items: ANY,
            min_items: 0,
            max_items: u32::MAX,
            lits: Vec::new(),
            min_chars: 0,
            max_chars: u32::MAX,
            sign: Sign::Any,
            min: Vec::new(),
            rest: Vec::new(),
        }
    }

    fn of_types(types: u8) -> Node {
        Node { types, ..Node::any() }
    }
}

/// The first byte's kind: `T_*` for typed starts (numbers as `T_NUMBER`).
pub(super) fn start_kind(b: u8) -> u8 {
    match b {
        b'{' => T_OBJECT,
        b'[' => T_ARRAY,
        b'"' => T_STRING,
        b'-' | b'0'..=b'9' => T_NUMBER,
        b't' | b'f' => T_BOOL,
        b'n' => T_NULL,
        _ => 0,
    }
}

/// Whether `types` admits a value starting with a byte of kind `k`.
pub(super) fn admits(types: u8, k: u8) -> bool {
    let t = if types & T_INTEGER != 0 { types | T_NUMBER } else { types };
    k != 0 && t & k != 0
}

impl Schema {
    /// Compile each schema into one arena (`roots[i]` is `schemas[i]`'s root); `None` entries
    /// accept any object. On error, the index of the schema and what is wrong with it.
    pub fn compile(schemas: &[Option<&Value>]) -> Result<Schema, (usize, String)> {
        let mut s = Schema { nodes: vec![Node::any()], roots: Vec::new() };
        let mut props = 0;
        for (i, v) in schemas.iter().enumerate() {
            let root = match v {
                None => ANY,
                Some(v) => {
                    let mut c = Compiler { doc: v, schema: &mut s, refs: HashMap::new(), nesting: 0, props };
                    let root = c.node(v).map_err(|e| (i, e))?;
                    props = c.props;
                    root
                }
            };
            s.roots.push(root);
        }
        s.lengths();
        for (i, &r) in s.roots.iter().enumerate() {
            if s.nodes[r as usize].types & T_OBJECT == 0 {
                return Err((i, "the top-level schema must describe an object (\"type\": \"object\")".into()));
            }
            if s.object_min(r, LEVELS) >= INF {
                return Err((
                    i,
                    format!(
                        "the schema cannot be satisfied within {LEVELS} levels of nesting (a required property nests itself?)"
                    ),
                ));
            }
        }
        Ok(s)
    }

    /// The root node of schema `i`.
    pub fn root(&self, i: usize) -> u16 {
        self.roots.get(i).copied().unwrap_or(ANY)
    }

    pub(super) fn node(&self, id: u16) -> &Node {
        &self.nodes[id as usize]
    }

    /// Fewest bytes of a value of `node` with `a` levels left for it.
    pub(super) fn min_len(&self, node: u16, a: usize) -> usize {
        self.nodes[node as usize].min[a.min(LEVELS)]
    }

    /// Bytes of `node`'s required properties from `i` on (`,"key":value` each), with `c` levels
    /// left for the values; 0 for an object without declared properties.
    pub(super) fn rest(&self, node: u16, c: usize, i: usize) -> usize {
        let n = &self.nodes[node as usize];
        match &n.props {
            None => 0,
            Some(p) => n.rest[c.min(LEVELS - 1) * (p.len() + 1) + i],
        }
    }

    /// Fewest bytes of an object of `node` (`{` + required properties + `}`) with `a` levels left.
    pub(super) fn object_min(&self, node: u16, a: usize) -> usize {
        if a == 0 {
            return INF;
        }
        // The first property has no comma.
        let r = self.rest(node, a - 1, 0);
        (2 + if r > 0 { r - 1 } else { 0 }).min(INF)
    }

    /// Fewest bytes of an array of `node` with `a` levels left.
    pub(super) fn array_min(&self, node: u16, a: usize) -> usize {
        let n = &self.nodes[node as usize];
        match (a, n.min_items) {
            (0, _) => INF,
            (_, 0) => 2,
            (a, k) => {
                (k as usize).saturating_mul(self.min_len(n.items, a - 1).saturating_add(1)).saturating_add(1).min(INF)
            }
        }
    }

    /// `min` and `rest` of every node, level by level: a container's values have one level less,
    /// so each level reads only the one below (recursive schemas need no fixed point).
    fn lengths(&mut self) {
        for n in &mut self.nodes {
            n.min = vec![INF; LEVELS + 1];
            n.rest = match &n.props {
                None => Vec::new(),
                Some(p) => vec![0; LEVELS * (p.len() + 1)],
            };
        }
        for a in 0..=LEVELS {
            if a > 0 {
                // Properties' values at `c = a - 1` levels, from `min` of that level.
                let c = a - 1;
                for i in 0..self.nodes.len() {
                    let Some(props) = &self.nodes[i].props else { continue };
                    let w = props.len() + 1;
                    let mut acc = 0usize;
                    let mut col = vec![0usize; w];
                    for (j, p) in props.iter().enumerate().rev() {
                        if p.required {
                            acc =
                                acc.saturating_add((p.key.len() + 4).saturating_add(self.min_len(p.node, c))).min(INF);
                        }
                        col[j] = acc;
                    }
                    self.nodes[i].rest[c * w..(c + 1) * w].copy_from_slice(&col);
                }
            }
            for i in 0..self.nodes.len() {
                let n = &self.nodes[i];
                let t = n.types;
                let mut m = INF;
                if t & T_STRING != 0 {
                    m = m.min(2 + n.min_chars as usize);
                }
                if t & (T_NUMBER | T_INTEGER) != 0 {
                    m = m.min(1);
                }
                if t & (T_BOOL | T_NULL) != 0 {
                    m = m.min(4);
                }
                if let Some(l) = n.lits.iter().map(Vec::len).min() {
                    m = m.min(l);
                }
                if t & T_OBJECT != 0 {
                    m = m.min(self.object_min(i as u16, a));
                }
                if t & T_ARRAY != 0 {
                    m = m.min(self.array_min(i as u16, a));
                }
                self.nodes[i].min[a] = m;
            }
        }
    }
}

struct Compiler<'a> {
    /// The whole schema document (`$ref` targets are pointers into it).
    doc: &'a Value,
    schema: &'a mut Schema,
    /// `$ref` pointer → node (filled in after it was reserved, so recursion finds it).
    refs: HashMap<String, u16>,
    nesting: usize,
    /// Properties declared so far (by every schema of the arena).
    props: usize,
}

impl Compiler<'_> {
    fn push(&mut self, n: Node) -> Result<u16, String> {
        if self.schema.nodes.len() >= MAX_NODES {
            return Err(format!("the schema is too large (more than {MAX_NODES} nodes)"));
        }
        self.schema.nodes.push(n);
        Ok((self.schema.nodes.len() - 1) as u16)
    }

    fn node(&mut self, v: &Value) -> Result<u16, String> {
        if let Some(r) = v.get("$ref") {
            let Some(r) = r.as_str() else { return Err("$ref must be a string".into()) };
            if let Some(&id) = self.refs.get(r) {
                return Ok(id);
            }
            let target = resolve(self.doc, r).ok_or_else(|| format!("$ref '{r}' does not point into this schema"))?;
            let id = self.push(Node::any())?;
            self.refs.insert(r.to_string(), id);
            let n = self.compile(target)?;
            self.schema.nodes[id as usize] = n;
            return Ok(id);
        }
        let n = self.compile(v)?;
        if n == Node::any() { Ok(ANY) } else { self.push(n) }
    }

    fn compile(&mut self, v: &Value) -> Result<Node, String> {
        self.nesting += 1;
        if self.nesting > MAX_NESTING {
            return Err(format!("the schema nests deeper than {MAX_NESTING} levels"));
        }
        let n = self.compile_inner(v);
        self.nesting -= 1;
        n
    }

    fn compile_inner(&mut self, v: &Value) -> Result<Node, String> {
        let o = match v {
            Value::Bool(true) => return Ok(Node::any()),
            Value::Bool(false) => return Err("a schema of false accepts nothing".into()),
            Value::Object(o) => o,
            v => return Err(format!("a schema must be an object or a boolean, got {v}")),
        };
        if o.contains_key("$ref") {
            // Inside `anyOf` / `allOf`: the target's rules (a recursive one is still being
            // compiled and reads as any value).
            let id = self.node(v)?;
            return Ok(self.schema.nodes[id as usize].clone());
        }
        if let Some(all) = o.get("allOf") {
            match all.as_array().map(Vec::as_slice) {
                Some([one]) => return self.compile(one),
                Some(_) => return Ok(Node::any()),
                None => return Err("allOf must be an array".into()),
            }
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(alts) = o.get(key) {
                let Some(alts) = alts.as_array().filter(|a| !a.is_empty()) else {
                    return Err(format!("{key} must be a non-empty array"));
                };
                let mut acc: Option<Node> = None;
                for a in alts {
                    let n = self.compile(a)?;
                    acc = Some(match acc {
                        None => n,
                        Some(m) => merge(m, n),
                    });
                }
                return Ok(acc.unwrap_or_else(Node::any));
            }
        }
        if let Some(c) = o.get("const") {
            return Ok(literals(std::slice::from_ref(c)).unwrap_or_else(Node::any));
        }
        if let Some(e) = o.get("enum") {
            let Some(vals) = e.as_array().filter(|a| !a.is_empty()) else {
                return Err("enum must be a non-empty array".into());
            };
            return Ok(literals(vals).unwrap_or_else(Node::any));
        }
        let types = match o.get("type") {
            None => {
                if o.contains_key("properties") || o.contains_key("required") {
                    T_OBJECT
                } else if o.contains_key("items") {
                    T_ARRAY
                } else {
                    T_ALL
                }
            }
            Some(Value::String(t)) => type_bit(t)?,
            Some(Value::Array(ts)) => {
                let mut bits = 0;
                for t in ts {
                    bits |= type_bit(t.as_str().ok_or("type entries must be strings")?)?;
                }
                if bits == 0 {
                    return Err("type must name at least one type".into());
                }
                bits
            }
            Some(_) => return Err("type must be a string or an array of strings".into()),
        };
        // OpenAPI's `nullable`.
        let types = if o.get("nullable") == Some(&Value::Bool(true)) { types | T_NULL } else { types };
        let mut n = Node::of_types(types);
        if types & T_OBJECT != 0 {
            let empty = serde_json::Map::new();
            let props = match o.get("properties") {
                None => &empty,
                Some(Value::Object(p)) => p,
                Some(_) => return Err("properties must be an object".into()),
            };
            let required: Vec<&str> = match o.get("required") {
                None => Vec::new(),
                Some(Value::Array(r)) => r.iter().filter_map(Value::as_str).collect(),
                Some(_) => return Err("required must be an array of strings".into()),
            };
            // Values of keys not declared: `additionalProperties` (any when absent or true).
            let extra = match o.get("additionalProperties") {
                None | Some(Value::Bool(true)) => Some(ANY),
                Some(Value::Bool(false)) => None,
                Some(ap) => Some(self.node(ap)?),
            };
            let undeclared: Vec<&str> = required.iter().copied().filter(|r| !props.contains_key(*r)).collect();
            if o.contains_key("properties") || !undeclared.is_empty() {
                let Some(extra) = extra.or(undeclared.is_empty().then_some(ANY)) else {
                    return Err(format!(
                        "required names '{}', which is not among the properties (and additionalProperties is false)",
                        undeclared[0]
                    ));
                };
                let count = props.len() + undeclared.len();
                if count > MAX_PROPERTIES {
                    return Err(format!("an object may declare at most {MAX_PROPERTIES} properties"));
                }
                self.props += count;
                if self.props > MAX_TOTAL_PROPERTIES {
                    return Err(format!("the schema declares more than {MAX_TOTAL_PROPERTIES} properties in all"));
                }
                let escaped = |k: &str| {
                    let key = serde_json::to_string(k).unwrap_or_default();
                    key.as_bytes()[1..key.len() - 1].to_vec()
                };
                let mut list = Vec::with_capacity(count);
                for (k, pv) in props {
                    list.push(Prop { key: escaped(k), node: self.node(pv)?, required: required.contains(&k.as_str()) });
                }
                // Required keys declared only by `required`: after the declared ones.
                for k in undeclared {
                    if !list.iter().any(|p| p.key == escaped(k)) {
                        list.push(Prop { key: escaped(k), node: extra, required: true });
                    }
                }
                n.props = Some(list);
            } else {
                n.values = extra.unwrap_or(ANY);
                if extra.is_none() {
                    // No properties and no others: only `{}`.
                    n.props = Some(Vec::new());
                }
            }
        }
        if types & T_STRING != 0 {
            let chars = |key: &str| match o.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|&c| c <= u64::from(u32::MAX - 1))
                    .map(|c| Some(c as u32))
                    .ok_or_else(|| format!("{key} must be a non-negative integer")),
            };
            n.min_chars = chars("minLength")?.unwrap_or(0);
            n.max_chars = chars("maxLength")?.unwrap_or(u32::MAX);
            if n.max_chars < n.min_chars {
                return Err("maxLength is below minLength".into());
            }
        }
        if types & (T_NUMBER | T_INTEGER) != 0 {
            // Only the bounds at zero (pydantic's ge=0 / gt=0) are enforced.
            let zero = |key: &str| o.get(key).and_then(Value::as_f64) == Some(0.0);
            n.sign = if zero("exclusiveMinimum") && types & T_NUMBER == 0 {
                Sign::Positive
            } else if zero("minimum") || zero("exclusiveMinimum") {
                Sign::NonNegative
            } else {
                Sign::Any
            };
        }
        if types & T_ARRAY != 0 {
            if let Some(items) = o.get("items") {
                match items {
                    Value::Object(_) | Value::Bool(true) => n.items = self.node(items)?,
                    Value::Bool(false) => n.max_items = 0,
                    // Tuple forms: any items.
                    _ => {}
                }
            }
            let count = |key: &str| match o.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|c| Some(c.min(u32::MAX as u64) as u32))
                    .ok_or_else(|| format!("{key} must be a non-negative integer")),
            };
            n.min_items = count("minItems")?.unwrap_or(0);
            n.max_items = n.max_items.min(count("maxItems")?.unwrap_or(u32::MAX));
            if n.max_items < n.min_items {
                return Err("maxItems is below minItems".into());
            }
            if n.min_items > u32::from(u16::MAX) {
                return Err(format!("minItems may be at most {}", u16::MAX));
            }
            if n.max_items > u32::from(u16::MAX) {
                n.max_items = u32::MAX;
            }
        }
        Ok(n)
    }
}

fn type_bit(t: &str) -> Result<u8, String> {
    Ok(match t {
        "object" => T_OBJECT,
        "array" => T_ARRAY,
        "string" => T_STRING,
        "integer" => T_INTEGER,
        "number" => T_NUMBER,
        "boolean" => T_BOOL,
        "null" => T_NULL,
        t => return Err(format!("unknown type '{t}'")),
    })
}

/// A node allowing exactly these values (their compact JSON texts); `None` if there are too many
/// or one is not a scalar (objects and arrays as enum values: any value of their kinds instead).
fn literals(vals: &[Value]) -> Option<Node> {
    if vals.len() > MAX_LITERALS || vals.iter().any(|v| v.is_object() || v.is_array()) {
        return None;
    }
    let mut lits: Vec<Vec<u8>> = Vec::new();
    for v in vals {
        let t = serde_json::to_string(v).ok()?.into_bytes();
        // The guard's number grammar (at most two exponent digits, 32 bytes) must take it.
        if v.is_number() && !super::json_guard::JsonGuard::is_number_text(&t) {
            return None;
        }
        if !lits.contains(&t) {
            lits.push(t);
        }
    }
    Some(Node { types: 0, lits, ..Node::any() })
}

/// One node allowing what either allows, where that can be decided at the value's first byte;
/// otherwise any value of the kinds they share.
fn merge(a: Node, b: Node) -> Node {
    let (types, mut a, mut b) = (a.types | b.types, a, b);
    // Literals the other allows outright are covered by it.
    let covered = |types: u8, l: &[u8]| match start_kind(l[0]) {
        T_NUMBER => {
            types & T_NUMBER != 0 || (types & T_INTEGER != 0 && !l.iter().any(|b| matches!(b, b'.' | b'e' | b'E')))
        }
        k => admits(types, k),
    };
    a.lits.retain(|l| !covered(b.types, l));
    b.lits.retain(|l| !covered(a.types, l));
    let mut n = Node::of_types(types);
    for (x, y) in [(&a, &b), (&b, &a)] {
        if x.types & T_OBJECT != 0 {
            if y.types & T_OBJECT == 0 || (x.props == y.props && x.values == y.values) {
                n.props = x.props.clone();
                n.values = x.values;
            } else {
                // Two object shapes: any object.
                n.props = None;
                n.values = ANY;
            }
        }
        if x.types & T_ARRAY != 0 {
            let same = x.items == y.items && x.min_items == y.min_items && x.max_items == y.max_items;
            if y.types & T_ARRAY == 0 || same {
                (n.items, n.min_items, n.max_items) = (x.items, x.min_items, x.max_items);
            } else {
                (n.items, n.min_items, n.max_items) = (ANY, 0, u32::MAX);
            }
        }
    }
    if types & T_NUMBER != 0 {
        n.types &= !T_INTEGER;
    }
    // Bounds hold only where both alternatives have them.
    let strs = |x: &Node| x.types & T_STRING != 0;
    (n.min_chars, n.max_chars) = match (strs(&a), strs(&b)) {
        (true, true) => (a.min_chars.min(b.min_chars), a.max_chars.max(b.max_chars)),
        (true, false) => (a.min_chars, a.max_chars),
        (false, true) => (b.min_chars, b.max_chars),
        (false, false) => (0, u32::MAX),
    };
    let nums = |x: &Node| x.types & (T_NUMBER | T_INTEGER) != 0;
    n.sign = match (nums(&a), nums(&b)) {
        (true, true) if a.sign == b.sign => a.sign,
        (true, false) => a.sign,
        (false, true) => b.sign,
        _ => Sign::Any,
    };
    let mut lits = a.lits;
    for l in b.lits {
        if !lits.contains(&l) {
            lits.push(l);
        }
    }
    if lits.len() > MAX_LITERALS {
        // Too many choices: any value of their kinds.
        for l in &lits {
            n.types |= start_kind(l[0]);
        }
        lits.clear();
    }
    n.lits = lits;
    n
}

/// The value at a `$ref` such as `#/$defs/Item` (JSON pointer, `~0`/`~1` escapes) or `#`.
fn resolve<'v>(doc: &'v Value, r: &str) -> Option<&'v Value> {
    let p = r.strip_prefix('#')?;
    if p.is_empty() {
        return Some(doc);
    }
    let mut v = doc;
    for part in p.strip_prefix('/')?.split('/') {
        let part = part.replace("~1", "/").replace("~0", "~");
        v = match v {
            Value::Object(o) => o.get(&part)?,
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::serve::json_guard::tests::Rng;
    use crate::serve::json_guard::{JsonGuard, MAX_DEPTH, Rules};
    use serde_json::json;
    use std::sync::Arc;

    /// A schema with every supported keyword: required and optional keys (one needing an
    /// escape), string / number / integer enums sharing prefixes, a const, `anyOf` with null, a
    /// free map, bounded arrays and recursion through `$defs`.
    pub fn person_schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "score": {"type": "number"},
                "role": {"enum": ["admin", "user", "guest", "用户"]},
                "level": {"enum": [1, 10, 2.5, true, null]},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
                "nick": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "a\"b": {"const": "x"},
                "meta": {"type": "object", "additionalProperties": {"type": "integer"}},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/Kid"}, "maxItems": 2},
                "ok": {"type": "boolean"},
                "code": {"type": "string", "minLength": 2, "maxLength": 4},
                "count": {"type": "integer", "minimum": 0},
                "rank": {"type": "integer", "exclusiveMinimum": 0},
                "weight": {"type": "number", "minimum": 0}
            },
            "required": ["name", "age", "role", "tags", "a\"b", "kids", "code", "rank"],
            "additionalProperties": false,
            "$defs": {
                "Kid": {
                    "type": "object",
                    "properties": {"id": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/Kid"}}},
                    "required": ["id"]
                }
            }
        })
    }

    fn resolve_ref<'v>(doc: &'v Value, s: &'v Value) -> &'v Value {
        match s.get("$ref").and_then(Value::as_str) {
            Some(r) => resolve_ref(doc, resolve(doc, r).unwrap()),
            None => s,
        }
    }

    /// An independent check of `v` against the subset (keys in the schema's order).
    pub fn valid(v: &Value, s: &Value, doc: &Value) -> bool {
        let s = resolve_ref(doc, s);
        let Some(o) = s.as_object() else { return s == &Value::Bool(true) };
        if let Some(alts) = o.get("anyOf").and_then(Value::as_array) {
            return alts.iter().any(|a| valid(v, a, doc));
        }
        if let Some(c) = o.get("const") {
            return v == c;
        }
        if let Some(e) = o.get("enum").and_then(Value::as_array) {
            return e.contains(v);
        }
        let ty_ok = |t: &str| match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.as_f64().is_some_and(|f| f.fract() == 0.0),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => false,
        };
        match o.get("type") {
            Some(Value::String(t)) if !ty_ok(t) => return false,
            Some(Value::Array(ts)) if !ts.iter().any(|t| ty_ok(t.as_str().unwrap())) => return false,
            _ => {}
        }
        if let Some(t) = v.as_str() {
            let chars = t.chars().count() as u64;
            if o.get("minLength").and_then(Value::as_u64).is_some_and(|m| chars < m)
                || o.get("maxLength").and_then(Value::as_u64).is_some_and(|m| chars > m)
            {
                return false;
            }
        }
        if let Some(x) = v.as_f64()
            && (o.get("minimum").and_then(Value::as_f64).is_some_and(|m| x < m)
                || o.get("exclusiveMinimum").and_then(Value::as_f64).is_some_and(|m| x <= m))
        {
            return false;
        }
        if let Value::Object(m) = v {
            if let Some(props) = o.get("properties").and_then(Value::as_object) {
                let order: Vec<&String> = props.keys().collect();
                let mut last = None;
                for (k, x) in m {
                    let Some(pos) = order.iter().position(|p| *p == k) else { return false };
                    if last.is_some_and(|l| pos <= l) || !valid(x, &props[k], doc) {
                        return false;
                    }
                    last = Some(pos);
                }
                let req = o.get("required").and_then(Value::as_array).cloned().unwrap_or_default();
                if !req.iter().all(|r| m.contains_key(r.as_str().unwrap())) {
                    return false;
                }
            } else if let Some(ap) = o.get("additionalProperties").filter(|a| a.is_object())
                && !m.values().all(|x| valid(x, ap, doc))
            {
                return false;
            }
        }
        if let Value::Array(a) = v {
            let min = o.get("minItems").and_then(Value::as_u64).unwrap_or(0) as usize;
            let max = o.get("maxItems").and_then(Value::as_u64).unwrap_or(u64::MAX) as usize;
            if a.len() < min || a.len() > max {
                return false;
            }
            if let Some(items) = o.get("items")
                && !a.iter().all(|x| valid(x, items, doc))
            {
                return false;
            }
        }
        true
    }

    fn rules(schema: &Value) -> Rules {
        let s = Schema::compile(&[Some(schema)]).expect("compiles");
        Rules { names: Vec::new(), schema: Some(Arc::new(s)) }
    }

    /// JSON's bytes, and every byte of the schema's text (its keys and literals).
    fn alphabet(doc: &Value) -> Vec<u8> {
        let mut a: Vec<u8> = b"{}[]\":,0123456789-.eE tfrueanls\\/\n".to_vec();
        a.extend(doc.to_string().bytes());
        a.extend("é".bytes());
        a.sort_unstable();
        a.dedup();
        a
    }

    /// Budgeted byte walks (one byte per token) always end in a reply that parses and matches
    /// the schema, within the budget; from every state each allowed byte lowers `bytes_to_close`
    /// by at most one and one of them by exactly one (so it is the exact shortest completion).
    #[test]
    fn walks_match_the_schema() {
        let doc = person_schema();
        let r = rules(&doc);
        let min = JsonGuard::min_tokens(&r);
        let alphabet = alphabet(&doc);
        let mut rng = Rng(7);
        let mut lengths = Vec::new();
        for budget in [min, min + 1, min + 3, min + 10, min + 40, min + 150] {
            for _ in 0..600 {
                let mut g = JsonGuard::with_budget(budget).with_schema(&r);
                let mut out = Vec::new();
                while !g.is_complete() {
                    let need = g.bytes_to_close(&r);
                    assert!(need < INF, "{:?}", String::from_utf8_lossy(&out));
                    let allowed: Vec<u8> = alphabet.iter().copied().filter(|&b| g.accepts_token(&[b], &r)).collect();
                    assert!(!allowed.is_empty(), "stuck at {:?}", String::from_utf8_lossy(&out));
                    let mut down = false;
                    for &b in &allowed {
                        let mut h = g;
                        assert!(h.push_token(&[b], &r));
                        let after = h.bytes_to_close(&r);
                        assert!(
                            after + 1 >= need,
                            "{:?} + {:?}: {need} → {after}",
                            String::from_utf8_lossy(&out),
                            b as char
                        );
                        down |= after + 1 == need;
                    }
                    assert!(down, "no byte brings {:?} closer", String::from_utf8_lossy(&out));
                    let b = allowed[rng.below(allowed.len())];
                    assert!(g.push_token(&[b], &r));
                    out.push(b);
                }
                assert!(out.len() <= budget);
                let v: Value = serde_json::from_slice(&out)
                    .unwrap_or_else(|e| panic!("{:?} does not parse: {e}", String::from_utf8_lossy(&out)));
                assert!(valid(&v, &doc, &doc), "{:?} does not match", String::from_utf8_lossy(&out));
                lengths.push(out.len());
            }
        }
        // The shortest reply is exactly the minimum budget.
        assert_eq!(lengths.iter().min(), Some(&min));
    }

    #[test]
    fn what_is_refused() {
        let doc = person_schema();
        let r = rules(&doc);
        let g = JsonGuard::new().with_schema(&r);
        let ok = r#"{"name": "Ann", "age": 3, "role": "user", "level": 10, "tags": ["a"], "nick": null, "a\"b": "x", "meta": {"k": 1}, "kids": [{"id": 1, "kids": []}], "ok": true, "code": "é\u00e9\ud83d\ude00", "count": 0, "rank": 7, "weight": 0.5}"#.as_bytes();
        let mut h = g;
        assert!(h.push_token(ok, &r) && h.is_complete());
        for bad in [
            &br#"{"nam": "#[..],
            br#"{"age""#,
            br#"{"name": 1"#,
            br#"{"name": "A", "age": 1.5"#,
            br#"{"name": "A", "age": 1e3"#,
            br#"{"name": "A", "age": 1, "role": "root"#,
            br#"{"name": "A", "age": 1, "role": "use""#,
            br#"{"name": "A", "age": 1, "role": "user", "level": 100"#,
            br#"{"name": "A", "age": 1, "role": "user", "level": 1."#,
            br#"{"name": "A", "age": 1, "role": "user", "tags": []"#,
            br#"{"name": "A", "age": 1, "role": "user", "tags": ["a", "b", "c", "#,
            br#"{"name": "A", "age": 1, "role": "user", "tags": ["a"], "a\"b": "y"#,
            br#"{"name": "A", "age": 1, "role": "user", "tags": ["a"], "a\"b": "x", "meta": {"k": "v"#,
            br#"{"name": "A", "age": 1, "role": "user", "tags": ["a"], "a\"b": "x", "kids": [{}"#,
            br#"{"name": "A", "age": 1, "role": "user", "tags": ["a"], "a\"b": "x"}"#,
            br#"{"age": 1, "name": "A""#,
            br#"{"name": "A", "age": 1, "role": "user", "tags": ["a"], "a\"b": "x", "kids": [], "code": "a""#,
            br#"{"name": "A", "age": 1, "role": "user", "tags": ["a"], "a\"b": "x", "kids": [], "code": "abcde"#,
            br#"{"name": "A", "age": 1, "role": "user", "tags": ["a"], "a\"b": "x", "kids": [], "code": "ab\n\u0041\t"#,
            br#"{"name": "A", "age": 1, "role": "user", "tags": ["a"], "a\"b": "x", "kids": [], "code": "ab", "count": -"#,
            br#"{"name": "A", "age": 1, "role": "user", "tags": ["a"], "a\"b": "x", "kids": [], "code": "ab", "rank": 0"#,
            br#"{"name": "A", "age": 1, "role": "user", "tags": ["a"], "a\"b": "x", "kids": [], "code": "ab", "rank": -"#,
            br#"{"name": "A", "age": 1, "role": "user", "tags": ["a"], "a\"b": "x", "kids": [], "code": "ab", "rank": 1, "weight": -"#,
            br#"{"name": "A", "name""#,
        ] {
            assert!(!g.accepts_token(bad, &r), "{:?} accepted", String::from_utf8_lossy(bad));
        }
        // Tool-call style: no schema for a name means any object.
        let none = Schema::compile(&[None]).unwrap();
        assert_eq!(none.root(0), ANY);
    }

    #[test]
    fn compile_errors_name_the_problem() {
        let err = |v: Value| Schema::compile(&[Some(&v)]).unwrap_err().1;
        assert!(err(json!({"type": "string"})).contains("object"));
        assert!(err(json!({"type": "object", "properties": {"a": {"type": "text"}}})).contains("unknown type 'text'"));
        assert!(err(json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/X"}}})).contains("$ref"));
        assert!(
            err(json!({"type": "object", "properties": {}, "required": ["a"], "additionalProperties": false}))
                .contains("'a'")
        );
        assert!(err(json!({"properties": {"a": {"$ref": "#"}}, "required": ["a"]})).contains("nesting"));
        assert!(err(json!({"type": "object", "properties": {"a": false}})).contains("false"));
        assert!(
            err(json!({"type": "object", "properties": {"a": {"type": "array", "minItems": 3, "maxItems": 1}}}))
                .contains("maxItems")
        );
        assert!(err(json!(5)).contains("object or a boolean"));
        // A key only `required` names takes `additionalProperties`' values.
        let r = rules(&json!({"type": "object", "required": ["a"], "additionalProperties": {"type": "integer"}}));
        let mut g = JsonGuard::new().with_schema(&r);
        assert!(!g.accepts_token(b"{}", &r) && !g.accepts_token(br#"{"a": "x""#, &r));
        assert!(g.push_token(br#"{"a": 1}"#, &r) && g.is_complete());
        // Optional recursion and `#` refs compile.
        assert!(Schema::compile(&[Some(&json!({"properties": {"a": {"$ref": "#"}}}))]).is_ok());
    }

    /// Optional recursion walked to the nesting limit: a key whose value could no longer be
    /// completed within 32 levels is refused, and what was taken still closes and matches.
    #[test]
    fn recursion_stops_at_the_nesting_limit() {
        let doc = json!({"type": "object", "properties": {
            "c": {"$ref": "#"},
            "x": {"type": "object", "properties": {"y": {"type": "object", "properties": {"z": {"type": "integer"}}, "required": ["z"]}}, "required": ["y"]}
        }, "required": ["x"]});
        let r = rules(&doc);
        let mut g = JsonGuard::with_budget(100_000).with_schema(&r);
        let mut out = b"{".to_vec();
        assert!(g.push_token(b"{", &r));
        let mut levels = 1;
        while g.push_token(br#""c": {"#, &r) {
            out.extend_from_slice(br#""c": {"#);
            levels += 1;
        }
        // Each level needs its `x.y` two more levels down.
        assert_eq!(levels, MAX_DEPTH as usize - 2);
        let alphabet = alphabet(&doc);
        while !g.is_complete() {
            let need = g.bytes_to_close(&r);
            let b = *alphabet
                .iter()
                .find(|&&b| {
                    let mut h = g;
                    h.push_token(&[b], &r) && h.bytes_to_close(&r) + 1 == need
                })
                .unwrap_or_else(|| panic!("stuck at {:?}", String::from_utf8_lossy(&out)));
            assert!(g.push_token(&[b], &r));
            out.push(b);
        }
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert!(valid(&v, &doc, &doc));
    }

    /// Alternatives that start alike fall back to any value of their kinds: still JSON.
    #[test]
    fn ambiguous_alternatives_fall_back() {
        let doc = json!({"type": "object", "properties": {"x": {"anyOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]},
            {"type": "integer"}, {"type": "number"}, {"enum": ["p", "q"]}, {"type": "string"}
        ]}}, "required": ["x"]});
        let r = rules(&doc);
        let g = JsonGuard::new().with_schema(&r);
        for ok in [&br#"{"x": {"c": [1]}}"#[..], br#"{"x": 2.5}"#, br#"{"x": "z"}"#, br#"{"x": -1}"#] {
            let mut h = g;
            assert!(h.push_token(ok, &r) && h.is_complete(), "{:?}", String::from_utf8_lossy(ok));
        }
        assert!(!g.accepts_token(br#"{"x": true"#, &r));
    }
}

//! compressed-tensors `quantization_config` (HF `config.json`): which modules are quantized and
//! how. Layout of the tensors: `shared/fixtures/compressed-tensors/FORMAT.md`; the weights
//! themselves load in [`crate::source`].

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use serde_json::{Map, Value};

use crate::{Error, Result};

/// How a group's modules store their weights.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum CtFormat {
    /// `pack-quantized`: `weight_packed` (int32 words), `weight_scale`, `weight_shape`, and
    /// `weight_zero_point` when asymmetric.
    PackQuantized,
    /// `int-quantized` (also `naive-quantized`): `weight` as int8 and `weight_scale`.
    IntQuantized,
}

/// One config group's weight scheme.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CtScheme {
    pub format: CtFormat,
    /// 4 or 8.
    pub bits: u8,
    pub symmetric: bool,
    /// Columns per scale; `None` per output channel.
    pub group: Option<usize>,
}

/// A config group: the modules it targets and their scheme.
#[derive(Clone, Debug, PartialEq)]
pub struct CtGroup {
    pub targets: Vec<String>,
    pub scheme: CtScheme,
}

/// A checkpoint's compressed-tensors quantization.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantization {
    pub groups: Vec<CtGroup>,
    /// Modules left unquantized (names, class names or `re:` patterns).
    pub ignore: Vec<String>,
}

impl Quantization {
    /// The scheme of module `name` (e.g. `model.layers.0.self_attn.q_proj`) of class `class`
    /// (`Linear`, `Embedding`, …): the first group that targets it, unless it is ignored.
    pub fn scheme_for(&self, name: &str, class: &str) -> Option<CtScheme> {
        if self.ignore.iter().any(|t| target_matches(t, name, class)) {
            return None;
        }
        self.groups.iter().find(|g| g.targets.iter().any(|t| target_matches(t, name, class))).map(|g| g.scheme)
    }

    /// Parse a config's `quantization_config` (top level, or under `text_config`); `None` when
    /// there is none. Anything but a compressed-tensors integer weight scheme we compute with is
    /// an error naming the field.
    pub fn from_hf_config(file: &str, top: &Map<String, Value>) -> Result<Option<Quantization>> {
        let q = top
            .get("quantization_config")
            .or_else(|| top.get("text_config").and_then(|t| t.get("quantization_config")))
            .filter(|v| !v.is_null());
        let Some(q) = q else { return Ok(None) };
        let err = |msg: String| Error::format(file, msg);
        let q = q.as_object().ok_or_else(|| err("`quantization_config` is not an object".into()))?;
        let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("unknown");
        if method != "compressed-tensors" {
            let fmt = q.get("format").and_then(Value::as_str).map(|f| format!(", format {f}")).unwrap_or_default();
            return Err(err(format!(
                "unsupported quantization `{method}`{fmt}: only compressed-tensors `pack-quantized` and `int-quantized` are supported"
            )));
        }
        if let Some(s) = q.get("quantization_status").and_then(Value::as_str)
            && s != "compressed"
        {
            return Err(err(format!("quantization_status `{s}`: only `compressed` checkpoints are supported")));
        }
        // Parts of the scheme that change the math and that we do not implement.
        for key in ["kv_cache_scheme", "sparsity_config", "transform_config"] {
            if q.get(key).is_some_and(|v| !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty())) {
                return Err(err(format!("quantization_config.{key} is not supported")));
            }
        }
        let top_format = q.get("format").and_then(Value::as_str);
        let strings = |v: Option<&Value>, what: &str| -> Result<Vec<String>> {
            match v {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|s| {
                        s.as_str().map(String::from).ok_or_else(|| err(format!("{what} is not a list of strings")))
                    })
                    .collect(),
                Some(_) => Err(err(format!("{what} is not a list of strings"))),
            }
        };
        let ignore = strings(q.get("ignore"), "quantization_config.ignore")?;
        let groups_obj = q
            .get("config_groups")
            .and_then(Value::as_object)
            .ok_or_else(|| err("quantization_config.config_groups is missing".into()))?;
        let mut groups = Vec::new();
        for (name, g) in groups_obj {
            let at = format!("quantization_config.config_groups.{name}");
            let g = g.as_object().ok_or_else(|| err(format!("{at} is not an object")))?;
            let targets = strings(g.get("targets"), &format!("{at}.targets"))?;
            for t in targets.iter().filter_map(|t| t.strip_prefix("re:")) {
                Pattern::parse(t).map_err(|m| err(format!("{at}.targets: pattern `{t}`: {m}")))?;
            }
            let format = match g.get("format").and_then(Value::as_str).or(top_format) {
                Some("pack-quantized") => CtFormat::PackQuantized,
                Some("int-quantized" | "naive-quantized") => CtFormat::IntQuantized,
                f => {
                    return Err(err(format!(
                        "{at}: format {} is not supported (pack-quantized and int-quantized are)",
                        f.map_or("(none)".to_string(), |f| format!("`{f}`"))
                    )));
                }
            };
            let w = g
                .get("weights")
                .and_then(Value::as_object)
                .ok_or_else(|| err(format!("{at}.weights is missing (weight-only schemes are supported)")))?;
            let field = |k: &str| w.get(k).filter(|v| !v.is_null());
            let bits = match field("num_bits").and_then(Value::as_u64) {
                Some(b @ (4 | 8)) => b as u8,
                b => return Err(err(format!("{at}.weights.num_bits {b:?}: only 4 and 8 are supported"))),
            };
            if let Some(t) = field("type").and_then(Value::as_str)
                && t != "int"
            {
                return Err(err(format!("{at}.weights.type `{t}`: only `int` is supported")));
            }
            if format == CtFormat::IntQuantized && bits != 8 {
                return Err(err(format!("{at}: int-quantized with {bits} bits: only 8 is supported")));
            }
            let symmetric = field("symmetric").map(|v| v.as_bool()).unwrap_or(Some(true));
            let symmetric = symmetric.ok_or_else(|| err(format!("{at}.weights.symmetric is not a boolean")))?;
            if field("dynamic").and_then(Value::as_bool) == Some(true) {
                return Err(err(format!("{at}.weights.dynamic: dynamic weight quantization is not supported")));
            }
            if let Some(a) = field("actorder")
                && a.as_str() != Some("static")
            {
                return Err(err(format!("{at}.weights.actorder {a}: activation reordering is not supported")));
            }
            let group = match field("strategy").and_then(Value::as_str) {
                Some("channel") => None,
                Some("group") => match field("group_size").and_then(Value::as_u64) {
                    Some(g @ 1..) => Some(usize::try_from(g).map_err(|_| err(format!("{at}: group_size too large")))?),
                    g => return Err(err(format!("{at}.weights.group_size {g:?} is not a positive integer"))),
                },
                s => {
                    return Err(err(format!("{at}.weights.strategy {s:?}: only `channel` and `group` are supported")));
                }
            };
            if group.is_some_and(|g| !g.is_multiple_of(32 / bits as usize)) && format == CtFormat::PackQuantized {
                return Err(err(format!("{at}: group_size {group:?} is not a whole number of {bits}-bit words")));
            }
            groups.push(CtGroup { targets, scheme: CtScheme { format, bits, symmetric, group } });
        }
        for t in ignore.iter().filter_map(|t| t.strip_prefix("re:")) {
            Pattern::parse(t).map_err(|m| err(format!("quantization_config.ignore: pattern `{t}`: {m}")))?;
        }
        Ok(Some(Quantization { groups, ignore }))
    }
}

/// compressed-tensors' matching: `re:<pattern>` is a regex matched at the start of the module
/// name (Python's `re.match`); anything else is the module's name or its class name.
pub fn target_matches(target: &str, name: &str, class: &str) -> bool {
    match target.strip_prefix("re:") {
        Some(p) => Pattern::parse(p).is_ok_and(|p| p.matches_start(name)),
        None => target == name || target == class,
    }
}

/// One atom of a [`Pattern`] with its repetition bounds.
#[derive(Clone, Debug)]
struct Piece {
    /// `None`: `.` (any character).
    ch: Option<char>,
    min: usize,
    max: usize,
}

/// The regex subset seen in compressed-tensors configs: literals, `.`, `\`-escapes, `*`, `+`,
/// `?`, top-level `|`, and `^`/`$` anchors. Anything else (groups, classes, counts) is refused.
#[derive(Clone, Debug)]
struct Pattern {
    alternatives: Vec<(Vec<Piece>, bool)>,
}

impl Pattern {
    fn parse(p: &str) -> core::result::Result<Pattern, &'static str> {
        let mut alternatives = Vec::new();
        for alt in p.split('|') {
            let alt = alt.strip_prefix('^').unwrap_or(alt);
            let (alt, anchored) = match alt.strip_suffix('$') {
                Some(a) if !a.ends_with('\\') => (a, true),
                _ => (alt, false),
            };
            let mut pieces: Vec<Piece> = Vec::new();
            let mut chars = alt.chars();
            while let Some(c) = chars.next() {
                let atom = match c {
                    '.' => None,
                    '\\' => Some(chars.next().ok_or("a trailing backslash")?),
                    '*' | '+' | '?' => {
                        let last =
                            pieces.last_mut().filter(|l| l.min == 1 && l.max == 1).ok_or("a dangling quantifier")?;
                        (last.min, last.max) = match c {
                            '*' => (0, usize::MAX),
                            '+' => (1, usize::MAX),
                            _ => (0, 1),
                        };
                        continue;
                    }
                    '(' | ')' | '[' | ']' | '{' | '}' | '^' | '$' => return Err("unsupported regex syntax"),
                    c => Some(c),
                };
                pieces.push(Piece { ch: atom, min: 1, max: 1 });
            }
            alternatives.push((pieces, anchored));
        }
        Ok(Pattern { alternatives })
    }

    fn matches_start(&self, s: &str) -> bool {
        let chars: Vec<char> = s.chars().collect();
        self.alternatives.iter().any(|(p, anchored)| match_here(p, &chars, *anchored))
    }
}

/// Backtracking match of `p` at the start of `s` (the whole of `s` when `anchored`).
fn match_here(p: &[Piece], s: &[char], anchored: bool) -> bool {
    let Some((first, rest)) = p.split_first() else { return !anchored || s.is_empty() };
    let fits = |c: &char| first.ch.is_none_or(|x| x == *c);
    let most = s.iter().take_while(|c| fits(c)).count().min(first.max);
    (first.min..=most).rev().any(|n| match_here(rest, &s[n..], anchored))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let n = "model.layers.0.self_attn.q_proj";
        assert!(target_matches("Linear", n, "Linear"));
        assert!(target_matches(n, n, "Linear"));
        assert!(!target_matches("lm_head", n, "Linear"));
        assert!(target_matches("re:.*q_proj", n, "Linear"));
        assert!(target_matches("re:.*self_attn.*", n, "Linear"));
        assert!(target_matches("re:.*k_proj|.*q_proj$", n, "Linear"));
        assert!(!target_matches("re:.*k_proj$", n, "Linear"));
        assert!(!target_matches("re:q_proj", n, "Linear"), "re.match anchors at the start");
        assert!(target_matches("re:model\\.layers\\.0\\.", n, "Linear"));
        assert!(!target_matches("re:model\\.layers\\.1\\.", n, "Linear"));
        assert!(Pattern::parse(".*(q|k)_proj").is_err());
    }
}

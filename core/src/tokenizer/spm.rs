//! SentencePiece vocabularies (GGUF `llama`), encoded exactly as HF encodes them once converted:
//! a BPE over characters with byte fallback, whose merges are every split of a vocabulary piece
//! into two vocabulary pieces. Done natively rather than through `tokenizers`, whose BPE builder
//! spends over a second turning Gemma's 515k merges into strings and back into ids.
//!
//! Matches `tokenizers` 0.22 step for step: added tokens (CONTROL, USER_DEFINED) split the raw
//! text leftmost-longest; each remaining segment has ' ' → '▁' (and a leading '▁' on the text's
//! first segment when `add_space_prefix`, like `Metaspace` with `prepend_scheme: first`); then
//! the BPE merges lowest rank first, leftmost first among equal ranks. Decoding is `Replace('▁',
//! ' ')`, `ByteFallback`, `Fuse` (and `Strip(' ', 1, 0)` with the prefix).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::format;
use std::string::String;
use std::vec;
use std::vec::Vec;

const SPACE_MARK: char = '\u{2581}';
const NONE: u32 = u32::MAX;

/// Priority of a merge, smallest first: the merged piece's score (descending), then the longer
/// left part, then the longer right part, then the smaller id — HF's merge order, as a key.
type Rank = (u32, u32, u32, u32);

pub(super) struct Spm {
    /// All pieces back to back; `spans[id]` is a piece's byte range.
    arena: String,
    spans: Vec<(u32, u32)>,
    table: PieceTable,
    /// Per id: matched whole in the raw text.
    added: Vec<bool>,
    /// Byte lengths of added tokens by first byte, longest first.
    added_lens: Vec<Vec<u32>>,
    /// Merge score per id (NaN as -inf, -0 as 0): the first key of a merge's rank.
    scores: Vec<f32>,
    /// Per id: it is the piece its spelling looks up to (of duplicates, the last).
    owner: Vec<bool>,
    byte_ids: [Option<u32>; 256],
    unk: Option<u32>,
    add_space_prefix: bool,
}

/// What [`Spm::new`] needs per token.
pub(super) struct SpmVocab<'a> {
    /// Names the file in warnings.
    pub label: &'a str,
    pub tokens: &'a [String],
    /// Score used for ranking merges (USER_DEFINED pieces rank as 0, see `gguf.rs`).
    pub rank_score: &'a dyn Fn(usize) -> f32,
    pub added: &'a dyn Fn(usize) -> bool,
    pub unk: Option<u32>,
    pub add_space_prefix: bool,
}

impl Spm {
    pub(super) fn new(v: SpmVocab<'_>) -> Result<Spm, String> {
        let n = v.tokens.len();
        // Respelling ' ' as '▁' at most triples a piece; the arena is indexed with u32.
        let total = v.tokens.iter().fold(0usize, |acc, t| acc.saturating_add(t.len().saturating_mul(3)));
        if total > u32::MAX as usize || n >= NONE as usize {
            return Err("vocabulary too large".into());
        }

        let mut spm = Spm {
            arena: String::with_capacity(total),
            spans: Vec::with_capacity(n),
            table: PieceTable::with_capacity(n),
            added: vec![false; n],
            added_lens: vec![Vec::new(); 256],
            scores: Vec::new(),
            owner: Vec::new(),
            byte_ids: [None; 256],
            unk: v.unk,
            add_space_prefix: v.add_space_prefix,
        };

        // Pieces, with Gemma's runs of real spaces spelled as '▁' (the text side's spelling).
        // `owner[id]`: this id is the one its spelling looks up to. Of duplicates the last wins,
        // as in llama.cpp and HF.
        let mut owner = vec![false; n];
        let mut duplicates = 0usize;
        for (id, token) in v.tokens.iter().enumerate() {
            let spelled = spell_spaces(token);
            let start = spm.arena.len();
            let text: &str = match &spelled {
                Some(s) if spm.lookup(s).is_none() => s,
                // Respelling must not merge two entries: keep the stored form then.
                _ => token,
            };
            spm.arena.push_str(text);
            let span = (start as u32, spm.arena.len() as u32);
            spm.spans.push(span);
            if let Some(old) = spm.table.insert(id as u32, span, &spm.arena) {
                owner[old as usize] = false;
                duplicates += 1;
            }
            owner[id] = true;
        }
        spm.arena.shrink_to_fit();
        if duplicates > 0 {
            log::warn!("{}: {duplicates} duplicate vocabulary entries; only the last of each is encodable", v.label);
        }

        // Merges are every split of a piece into two pieces, ranked by the merged piece's score,
        // then the longer left part, then the longer right part, then the id (HF's conversion).
        // Rather than listing Gemma's ~515k of them at load (1.2M lookups and a sort), a pair is
        // ranked when the encoder meets it: its concatenation looked up, the same key computed.
        spm.scores = (0..n)
            .map(|id| {
                let score = (v.rank_score)(id);
                // NaN ranks last; -0.0 ties with 0.0 as in HF's Python sort.
                if score.is_nan() { f32::NEG_INFINITY } else { score + 0.0 }
            })
            .collect();
        spm.owner = owner;

        for b in 0..=255u8 {
            spm.byte_ids[b as usize] = spm.lookup(&format!("<0x{b:02X}>"));
        }
        for id in (0..n).filter(|&id| spm.owner[id] && (v.added)(id)) {
            let piece = spm.piece(id as u32);
            if let Some(&first) = piece.as_bytes().first() {
                let len = piece.len() as u32;
                spm.added[id] = true;
                spm.added_lens[first as usize].push(len);
            }
        }
        for lens in &mut spm.added_lens {
            lens.sort_unstable_by(|a, b| b.cmp(a));
            lens.dedup();
        }
        Ok(spm)
    }

    /// The merge of `left` and `right`, if their concatenation is a vocabulary piece that is
    /// the owner of its spelling and each part is the owner of its own: its rank and id.
    fn pair(&self, left: u32, right: u32, buf: &mut String) -> Option<(Rank, u32)> {
        let (l, r) = (self.piece(left), self.piece(right));
        if !self.owner[left as usize] || !self.owner[right as usize] || l.is_empty() || r.is_empty() {
            return None;
        }
        buf.clear();
        buf.push_str(l);
        buf.push_str(r);
        let id = self.lookup(buf)?;
        // Descending score as an ascending key: order-preserving bits of -score.
        let bits = (-self.scores[id as usize]).to_bits();
        let score_key = if bits >> 31 == 1 { !bits } else { bits | 1 << 31 };
        let (lc, rc) = (l.chars().count() as u32, r.chars().count() as u32);
        Some(((score_key, u32::MAX - lc, u32::MAX - rc, id), id))
    }

    pub(super) fn len(&self) -> usize {
        self.spans.len()
    }

    /// The piece of `id` (caller checks the range).
    pub(super) fn piece(&self, id: u32) -> &str {
        let (s, e) = self.spans[id as usize];
        &self.arena[s as usize..e as usize]
    }

    pub(super) fn lookup(&self, piece: &str) -> Option<u32> {
        self.table.get(piece, &self.arena)
    }

    pub(super) fn is_added(&self, id: u32) -> bool {
        self.added.get(id as usize).copied().unwrap_or(false)
    }

    pub(super) fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let bytes = text.as_bytes();
        let (mut start, mut p) = (0, 0);
        while p < bytes.len() {
            if let Some((id, len)) = self.added_at(text, p) {
                if start < p {
                    self.encode_segment(&text[start..p], start == 0, out);
                }
                out.push(id);
                p += len;
                start = p;
            } else {
                p += utf8_len(bytes[p]);
            }
        }
        if start < bytes.len() {
            self.encode_segment(&text[start..], start == 0, out);
        }
    }

    /// The longest added token starting at byte `p`.
    fn added_at(&self, text: &str, p: usize) -> Option<(u32, usize)> {
        for &len in &self.added_lens[text.as_bytes()[p] as usize] {
            let end = p + len as usize;
            if end <= text.len()
                && text.is_char_boundary(end)
                && let Some(id) = self.lookup(&text[p..end])
                && self.added[id as usize]
            {
                return Some((id, len as usize));
            }
        }
        None
    }

    fn encode_segment(&self, segment: &str, first: bool, out: &mut Vec<u32>) {
        let mut norm = String::with_capacity(segment.len() + 3 * 4);
        if self.add_space_prefix && first && !segment.starts_with([' ', SPACE_MARK]) {
            norm.push(SPACE_MARK);
        }
        norm.extend(segment.chars().map(|c| if c == ' ' { SPACE_MARK } else { c }));

        let mut syms: Vec<Sym> = Vec::with_capacity(norm.len());
        let mut unk: Option<(u32, u32)> = None;
        let push = |syms: &mut Vec<Sym>, id: u32, len: u32| syms.push(Sym { id, prev: NONE, next: NONE, len });
        for (i, c) in norm.char_indices() {
            let ch = &norm[i..i + c.len_utf8()];
            if let Some(id) = self.lookup(ch) {
                if let Some((u, l)) = unk.take() {
                    push(&mut syms, u, l);
                }
                push(&mut syms, id, ch.len() as u32);
                continue;
            }
            let bytes: Option<Vec<u32>> = ch.bytes().map(|b| self.byte_ids[b as usize]).collect();
            if let Some(bytes) = bytes {
                // As `tokenizers` does: a pending unknown is not flushed before byte pieces.
                for id in bytes {
                    push(&mut syms, id, 1);
                }
                continue;
            }
            // Unknowns fuse; without an unknown token the character is dropped (as in HF).
            if let Some(u) = self.unk {
                unk = Some(match unk {
                    Some((u, l)) => (u, l + ch.len() as u32),
                    None => (u, ch.len() as u32),
                });
            }
        }
        if let Some((u, l)) = unk {
            push(&mut syms, u, l);
        }
        let count = syms.len();
        for (i, s) in syms.iter_mut().enumerate() {
            s.prev = if i == 0 { NONE } else { i as u32 - 1 };
            s.next = if i + 1 == count { NONE } else { i as u32 + 1 };
        }
        self.merge_all(&mut syms);
        out.extend(syms.iter().filter(|s| s.len != 0).map(|s| s.id));
    }

    /// Apply merges lowest rank first, leftmost first on ties; stale queue entries are skipped.
    fn merge_all(&self, syms: &mut [Sym]) {
        let mut buf = String::new();
        let mut pair = |l: u32, r: u32| self.pair(l, r, &mut buf);
        let mut queue: BinaryHeap<Reverse<(Rank, u32, u32)>> = syms
            .windows(2)
            .enumerate()
            .filter_map(|(pos, w)| pair(w[0].id, w[1].id).map(|(rank, id)| Reverse((rank, pos as u32, id))))
            .collect();
        while let Some(Reverse((_, pos, new_id))) = queue.pop() {
            let pos = pos as usize;
            let cur = syms[pos];
            if cur.len == 0 || cur.next == NONE {
                continue;
            }
            let next = cur.next as usize;
            let right = syms[next];
            if pair(cur.id, right.id).is_none_or(|(_, id)| id != new_id) {
                continue;
            }
            syms[pos] = Sym { id: new_id, prev: cur.prev, next: right.next, len: cur.len + right.len };
            syms[next].len = 0;
            if right.next != NONE {
                syms[right.next as usize].prev = pos as u32;
            }
            if cur.prev != NONE
                && let Some((rank, id)) = pair(syms[cur.prev as usize].id, new_id)
            {
                queue.push(Reverse((rank, cur.prev, id)));
            }
            if right.next != NONE
                && let Some((rank, id)) = pair(new_id, syms[right.next as usize].id)
            {
                queue.push(Reverse((rank, pos as u32, id)));
            }
        }
    }

    /// Caller checks ids are in range.
    pub(super) fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        let mut bytes: Vec<u8> = Vec::new();
        for &id in ids {
            let piece = self.piece(id);
            if let Some(b) = byte_piece(piece) {
                bytes.push(b);
                continue;
            }
            flush_bytes(&mut bytes, &mut out);
            out.extend(piece.chars().map(|c| if c == SPACE_MARK { ' ' } else { c }));
        }
        flush_bytes(&mut bytes, &mut out);
        if self.add_space_prefix && out.starts_with(' ') {
            out.remove(0);
        }
        out
    }
}

#[derive(Clone, Copy)]
struct Sym {
    id: u32,
    prev: u32,
    next: u32,
    /// Bytes covered; 0 once merged into its left neighbour.
    len: u32,
}

/// `<0xAB>` → 0xAB, with `tokenizers`' `ByteFallback` test.
fn byte_piece(piece: &str) -> Option<u8> {
    if piece.len() == 6 && piece.starts_with("<0x") && piece.ends_with('>') {
        u8::from_str_radix(piece.get(3..5)?, 16).ok()
    } else {
        None
    }
}

/// Pending byte pieces: their UTF-8 text, or one U+FFFD per byte if invalid (as `ByteFallback`).
fn flush_bytes(bytes: &mut Vec<u8>, out: &mut String) {
    if bytes.is_empty() {
        return;
    }
    match core::str::from_utf8(bytes) {
        Ok(s) => out.push_str(s),
        Err(_) => out.extend(core::iter::repeat_n('\u{FFFD}', bytes.len())),
    }
    bytes.clear();
}

/// A whitespace-only token holding spaces, its spaces written as '▁' (Gemma stores runs of spaces
/// with real spaces; HF's vocabulary and the normalized text spell them '▁').
fn spell_spaces(token: &str) -> Option<String> {
    (token.contains(' ') && token.chars().all(char::is_whitespace)).then(|| token.replace(' ', "\u{2581}"))
}

fn utf8_len(lead: u8) -> usize {
    match lead {
        0x00..=0x7F => 1,
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hash_bytes(b: &[u8]) -> u64 {
    let mut h = mix64(b.len() as u64 ^ 0x9e37_79b9_7f4a_7c15);
    let mut chunks = b.chunks_exact(8);
    let mut w = [0u8; 8];
    for c in &mut chunks {
        w.copy_from_slice(c);
        h = mix64(h ^ u64::from_le_bytes(w));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        w = [0; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = mix64(h ^ u64::from_le_bytes(w));
    }
    h
}

/// Open-addressing map from piece text (in the arena) to id, without a second copy of the text.
/// A slot holds `hash tag << 32 | id` and the piece's byte range, so a lookup touches the arena
/// only on a tag match, and nothing else.
struct PieceTable {
    slots: Vec<Slot>,
    mask: usize,
}

#[derive(Clone, Copy)]
struct Slot {
    key: u64,
    span: (u32, u32),
}

const EMPTY: Slot = Slot { key: u64::MAX, span: (0, 0) };

impl PieceTable {
    fn with_capacity(n: usize) -> Self {
        let cap = (n * 2).max(16).next_power_of_two();
        PieceTable { slots: vec![EMPTY; cap], mask: cap - 1 }
    }

    /// The slot holding `text` (hash `h`), or the empty slot where it would go.
    fn find(&self, text: &[u8], h: u64, arena: &str) -> usize {
        let mut i = h as usize & self.mask;
        loop {
            let slot = self.slots[i];
            if slot.key == EMPTY.key {
                return i;
            }
            if slot.key >> 32 == h >> 32 && &arena.as_bytes()[slot.span.0 as usize..slot.span.1 as usize] == text {
                return i;
            }
            i = (i + 1) & self.mask;
        }
    }

    fn get(&self, s: &str, arena: &str) -> Option<u32> {
        let slot = self.slots[self.find(s.as_bytes(), hash_bytes(s.as_bytes()), arena)];
        (slot.key != EMPTY.key).then_some(slot.key as u32)
    }

    /// Map `id`'s text (already in the arena at `span`) to `id`; returns the id it replaces, if
    /// any. The table holds at most half its slots, so probing always ends.
    fn insert(&mut self, id: u32, span: (u32, u32), arena: &str) -> Option<u32> {
        let text = &arena.as_bytes()[span.0 as usize..span.1 as usize];
        let h = hash_bytes(text);
        let i = self.find(text, h, arena);
        let old = self.slots[i];
        // A tag of all ones with id u32::MAX would read as EMPTY; ids stay below u32::MAX.
        self.slots[i] = Slot { key: (h >> 32) << 32 | id as u64, span };
        (old.key != EMPTY.key).then_some(old.key as u32)
    }
}

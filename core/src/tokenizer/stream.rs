//! Streaming decode: text for each new id, never half a UTF-8 character.
//!
//! Decoding a token alone is wrong in general (a character may span several byte tokens, and
//! decoders such as `Strip` look at the whole sequence), so the decoder re-decodes a short window:
//! the last token already printed (context) plus the pending ones, and emits what the window's text
//! adds to the context's text once it no longer ends in an incomplete character.

use std::string::String;
use std::vec::Vec;

use super::Tokenizer;
use crate::Result;

/// A UTF-8 character is at most 4 bytes, and every token carries at least one.
const MAX_PENDING: usize = 8;

/// Incremental decoder from [`Tokenizer::decode_stream`].
#[derive(Debug)]
pub struct Decoder<'a> {
    tok: &'a Tokenizer,
    /// `window[..context]` has been printed; the rest is pending.
    window: Vec<u32>,
    context: usize,
    /// Decoded text of `window[..context]`.
    printed: String,
}

impl<'a> Decoder<'a> {
    pub(super) fn new(tok: &'a Tokenizer) -> Self {
        Decoder { tok, window: Vec::new(), context: 0, printed: String::new() }
    }

    /// Add one id; returns the text it completes (often empty while a character is unfinished).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.tok.check_ids(&[id])?;
        self.window.push(id);
        let text = self.tok.decode(&self.window)?;
        // U+FFFD at the end: the last bytes may still become a character, unless more tokens are
        // pending than any character needs (then the bytes are garbage: print them lossily).
        let pending = self.window.len() - self.context;
        if text.len() <= self.printed.len() || (text.ends_with('\u{FFFD}') && pending < MAX_PENDING) {
            return Ok(String::new());
        }
        let new = self.take_new(&text);
        // Keep the last token as context for the next step.
        let last = self.window.len() - 1;
        self.window.drain(..last);
        self.context = 1;
        self.printed = self.tok.decode(&self.window)?;
        Ok(new)
    }

    /// [`Decoder::push`] in the shape of `tokenizers`' `DecodeStream::step`: `None` while nothing
    /// is complete.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        let text = self.push(id)?;
        Ok((!text.is_empty()).then_some(text))
    }

    /// Flush whatever is pending (an incomplete character comes out as U+FFFD) and reset.
    pub fn finish(&mut self) -> Result<String> {
        let out = if self.window.len() > self.context {
            let text = self.tok.decode(&self.window)?;
            self.take_new(&text)
        } else {
            String::new()
        };
        self.window.clear();
        self.context = 0;
        self.printed.clear();
        Ok(out)
    }

    /// `text` minus what was already printed. Decoders only ever append here, but if one rewrote
    /// the context, print from where they diverge rather than fail.
    fn take_new(&self, text: &str) -> String {
        if let Some(rest) = text.strip_prefix(self.printed.as_str()) {
            return rest.into();
        }
        let common = text
            .char_indices()
            .zip(self.printed.chars())
            .find(|((_, a), b)| a != b)
            .map_or(text.len().min(self.printed.len()), |((i, _), _)| i);
        let common = (0..=common).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        text[common..].into()
    }
}

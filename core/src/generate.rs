//! Generation: prefill a prompt, then sample and decode one token at a time.

use alloc::vec::Vec;
use purehw_hal::Backend;

use crate::model::Model;
use crate::sampling::Sampler;
use crate::{Error, Result};

/// Generate up to `max_new` tokens after `prompt` in slot 0 (which is overwritten).
///
/// `on_token` sees each new id as it is chosen and returns `false` to stop. With `stop_at_eos`,
/// generation stops after the model's end-of-sequence token, which the result then ends with (as
/// HF `generate` does). Returns the new ids.
pub fn generate<B: Backend>(
    model: &mut Model<B>,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    stop_at_eos: bool,
    on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    generate_from(model, prompt, 0, max_new, sampler, stop_at_eos, on_token)
}

/// [`generate`] continuing a sequence: slot 0's KV cache already holds `prompt[..cached]` (an
/// earlier call's prompt and reply that this prompt extends), so only `prompt[cached..]` is
/// computed. At least the last prompt token is always computed (its logits pick the first new
/// token), so `cached` is capped at `prompt.len() - 1`, and at what the cache can still go on
/// from ([`Model::kv_resumable`]); `cached = 0` is [`generate`].
///
/// After a call that returns `n > 0` ids, the slot holds `prompt` followed by the first `n - 1`
/// of them: that is the `cached` prefix a next call can pass. (Greedy decoding that ran a step
/// ahead has also fed the last id; a next call computes that position again.)
/// Positions computed from the cache give the same logits as a fresh prefill (every kernel
/// computes each row on its own), so the tokens are the same as [`generate`]'s.
pub fn generate_from<B: Backend>(
    model: &mut Model<B>,
    prompt: &[u32],
    cached: usize,
    max_new: usize,
    sampler: &mut Sampler,
    stop_at_eos: bool,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::Invalid("empty prompt: nothing to condition on".into()));
    }
    let ctx = model.options().ctx;
    if prompt.len() > ctx {
        return Err(Error::Invalid(alloc::format!(
            "prompt of {} tokens exceeds the context of {ctx} tokens",
            prompt.len()
        )));
    }
    // Less where a sliding-window layer's ring no longer holds the window before it.
    let cached = model.kv_resumable(0, cached.min(prompt.len() - 1));
    // Never run past the context.
    let max_new = max_new.min(ctx - prompt.len() + 1);
    let eos = model.config().eos.clone();
    let mut history = Vec::with_capacity(prompt.len() + max_new);
    history.extend_from_slice(prompt);
    let mut out = Vec::with_capacity(max_new);
    if max_new == 0 {
        return Ok(out);
    }
    // Plain greedy decoding reads back only the device's argmax, not the logits, and after the
    // prompt lets the device feed each token to the next step (a step ahead where it can).
    let greedy = sampler.is_plain_greedy();
    if greedy {
        let id = model.forward_argmax(0, cached, &prompt[cached..])?;
        out.push(id);
        if !on_token(id) || (stop_at_eos && eos.contains(&id)) || out.len() == max_new {
            return Ok(out);
        }
        model.decode_greedy(0, prompt.len(), id, max_new - 1, |t| {
            out.push(t);
            on_token(t) && !(stop_at_eos && eos.contains(&t))
        })?;
        return Ok(out);
    }
    let mut next = |model: &mut Model<B>, pos: usize, tokens: &[u32], history: &[u32]| -> Result<u32> {
        Ok(sampler.sample(model.forward(0, pos, tokens)?, history))
    };
    let mut pos = prompt.len();
    let mut id = next(model, cached, &prompt[cached..], &history)?;
    loop {
        out.push(id);
        history.push(id);
        if !on_token(id) || (stop_at_eos && eos.contains(&id)) || out.len() == max_new {
            return Ok(out);
        }
        id = next(model, pos, &[id], &history)?;
        pos += 1;
    }
}

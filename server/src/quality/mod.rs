//! `purehw quality`: how far a quantized model's next-token distributions are from a reference
//! model's over one text: top-1 agreement, mean KL(reference ‖ quantized) and each model's
//! perplexity. Both models run on the engine `logits` uses, with f32 activations unless `--act`
//! says otherwise (so the figures are the weights' cost alone), over the same token ids (the
//! reference's tokenizer), position by position.

use std::path::PathBuf;

use clap::Args;
use purehw_core::model::ModelOptions;
use purehw_core::source::ModelSource;
use serde_json::json;

use crate::backends::{self, ActArg, BackendArgs, Maker, Registered, WithBackend};
use crate::commands::tokenizer_for;
use crate::error::{CliResult, Context, err};
use crate::models;
use crate::out;

/// The built-in text: an original English passage of ~500 tokens.
const TEXT: &str = include_str!("text.txt");

#[derive(Args, Debug)]
pub struct QualityArgs {
    /// The quantized model (a checkpoint folder, a .gguf file or a known model name).
    #[arg(short = 'm', long)]
    pub model: String,
    /// The model it was made from.
    #[arg(long)]
    pub reference: String,
    /// A text file to use instead of the built-in English text.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// tokenizer.json to use (default: the reference's, else the quantized model's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The figures over `positions` predicted tokens.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Stats {
    pub positions: usize,
    pub top1_agree: usize,
    pub kl_sum: f64,
    pub nll_ref: f64,
    pub nll_quant: f64,
}

impl Stats {
    /// Add one position: the two models' logits and the token that came next.
    pub fn add(&mut self, reference: &[f32], quant: &[f32], next: usize) {
        let lr = log_softmax(reference);
        let lq = log_softmax(quant);
        self.kl_sum += lr.iter().zip(&lq).map(|(&r, &q)| if r > -700.0 { r.exp() * (r - q) } else { 0.0 }).sum::<f64>();
        self.top1_agree += usize::from(argmax(reference) == argmax(quant));
        self.nll_ref -= lr[next];
        self.nll_quant -= lq[next];
        self.positions += 1;
    }
    pub fn top1(&self) -> f64 {
        self.top1_agree as f64 / self.positions.max(1) as f64
    }
    pub fn mean_kl(&self) -> f64 {
        self.kl_sum / self.positions.max(1) as f64
    }
    pub fn ppl_ref(&self) -> f64 {
        (self.nll_ref / self.positions.max(1) as f64).exp()
    }
    pub fn ppl_quant(&self) -> f64 {
        (self.nll_quant / self.positions.max(1) as f64).exp()
    }
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    x.iter().map(|&v| v as f64 - lse).collect()
}

/// The first index of the largest value.
fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

pub fn quality(a: &QualityArgs) -> CliResult {
    let text = match &a.text {
        Some(p) => std::fs::read_to_string(p).context(|| format!("reading {}", p.display()))?,
        None => TEXT.to_string(),
    };
    let rr = models::resolve(&a.reference)?;
    let rq = models::resolve(&a.model)?;
    let reference = ModelSource::open(&rr.path)?;
    let quant = ModelSource::open(&rq.path)?;
    let (cr, cq) = (&reference.config, &quant.config);
    if cr.vocab != cq.vocab || cr.arch != cq.arch {
        return err(format!(
            "the models differ: {:?} with {} tokens vs {:?} with {} tokens",
            cr.arch, cr.vocab, cq.arch, cq.vocab
        ));
    }
    let tok = match tokenizer_for(a.tokenizer.as_deref(), &rr, &reference) {
        Ok(t) => t,
        Err(_) => tokenizer_for(None, &rq, &quant)?,
    };
    let ids = tok.encode(&text, cr.add_bos)?;
    if ids.len() < 2 {
        return err("the text is shorter than two tokens");
    }
    let ctx = ids.len().min(cr.max_ctx.max(2)).min(cq.max_ctx.max(2));
    let ids = &ids[..ctx];
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= cr.vocab) {
        return err(format!("the tokenizer gave id {bad}, outside the vocabulary ({})", cr.vocab));
    }
    let mut backend = a.backend.clone();
    backend.act = Some(backend.act.unwrap_or(ActArg::F32));
    let stats = backends::dispatch(&backend, QualityOn { reference: &reference, quant: &quant, ids })?;
    if a.json {
        let v = json!({
            "positions": stats.positions,
            "top1_agreement": stats.top1(),
            "mean_kl": stats.mean_kl(),
            "perplexity_reference": stats.ppl_ref(),
            "perplexity_quantized": stats.ppl_quant(),
        });
        return out::print_all(&format!("{v}\n"));
    }
    out::print_all(&format!(
        "positions:        {}\ntop-1 agreement:  {:.2}%\nmean KL:          {:.5} (reference || quantized, nats)\nperplexity:       reference {:.3}, quantized {:.3}\n",
        stats.positions,
        100.0 * stats.top1(),
        stats.mean_kl(),
        stats.ppl_ref(),
        stats.ppl_quant()
    ))
}

/// Both models on one backend, chunk by chunk (a chunk's logits of both at a time).
struct QualityOn<'a> {
    reference: &'a ModelSource,
    quant: &'a ModelSource,
    ids: &'a [u32],
}

impl WithBackend for QualityOn<'_> {
    type Out = Stats;

    fn run<B: Registered>(self, make: Maker<B>) -> CliResult<Stats> {
        let QualityOn { reference, quant, ids } = self;
        let d = ModelOptions::default();
        let opts = ModelOptions { ctx: ids.len(), slots: 1, logit_rows: d.max_batch, act: make.act, ..d };
        let mut mr = make.load(reference, opts)?;
        let mut mq = make.load(quant, opts)?;
        let vocab = reference.config.vocab;
        // Positions 0 .. n-1 each predict the next token.
        let inputs = &ids[..ids.len() - 1];
        let mut stats = Stats::default();
        let (mut lr, mut lq) = (Vec::new(), Vec::new());
        let mut pos = 0;
        for chunk in inputs.chunks(d.max_batch) {
            lr.clear();
            lq.clear();
            mr.forward_all(0, pos, chunk, &mut lr)?;
            mq.forward_all(0, pos, chunk, &mut lq)?;
            for i in 0..chunk.len() {
                let row = i * vocab..(i + 1) * vocab;
                stats.add(&lr[row.clone()], &lq[row], ids[pos + i + 1] as usize);
            }
            pos += chunk.len();
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_models_agree() {
        let mut s = Stats::default();
        let l = [1.0f32, 2.0, 0.5, -1.0];
        s.add(&l, &l, 1);
        assert_eq!(s.top1(), 1.0);
        assert!(s.mean_kl().abs() < 1e-12);
        assert!((s.ppl_ref() - s.ppl_quant()).abs() < 1e-12);
        let mut t = Stats::default();
        t.add(&l, &[2.0, 1.0, 0.5, -1.0], 1);
        assert_eq!(t.top1(), 0.0);
        assert!(t.mean_kl() > 0.0);
    }

    #[test]
    fn builtin_text_is_long_enough() {
        assert!(TEXT.split_whitespace().count() > 300);
    }
}

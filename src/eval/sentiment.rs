//! ConvSent's sentiment-editing metrics (SPEC-eval §2.8): edit success `es` on the edited topic's
//! opinion sentences and drawdown `dd` (a KL divergence) on the next topic's.
//!
//! EasyEdit computes them with three quirks (SPEC-eval §8.7), reproduced by default
//! ([`SentimentProtocol::AsPublished`]): labels are not shifted against the logits, one question
//! mask is shared by every row (row aliasing: "position ≥ the largest separator index"), and the
//! "pre" model is the edited model itself, so `z_topic` is 1 and `dd` is 0 for in-place editors.
//! [`SentimentProtocol::Corrected`] scores each answer token by the logits before it, masks each
//! row's own question, and compares against the unedited model.
//!
//! One deliberate deviation in both modes: pad positions are never scored. (With left padding,
//! EasyEdit's shared mask can reach into the pads of short rows and score the model's output at a
//! masked-out position against token 0, which depends on how the attention kernel fills fully
//! masked rows.)

use candle_core::{DType, Tensor, D};

use crate::data::SentimentProbe;
use crate::error::Result;
use crate::model::{HookSpec, Model, TokenBatch};

/// EasyEdit tokenises the probe texts with `max_length=128, truncation=True`.
const MAX_TOKENS: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SentimentProtocol {
    #[default]
    AsPublished,
    Corrected,
}

/// What the unedited model said on a probe, kept from before the edit for
/// [`SentimentProtocol::Corrected`].
#[derive(Clone)]
pub struct SentimentBaseline {
    inner_log_probs: Vec<f64>,
    outer_log_probs: Tensor,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SentimentScores {
    pub es: f64,
    pub dd: f64,
}

/// The scored positions of a batch of probe texts.
struct Scoring {
    batch: TokenBatch,
    /// `(row, logit position)` per scored token.
    positions: Vec<(usize, usize)>,
    /// The token each position is scored against.
    labels: Vec<u32>,
    /// The row each scored token belongs to.
    rows: Vec<usize>,
}

fn prepare(model: &Model, qa: &[(String, String)], protocol: SentimentProtocol) -> Result<Scoring> {
    let sep = crate::data::convsent::SEPARATOR;
    let pad = model.spec().eos_id.or(model.spec().pad_id).unwrap_or(0);
    let mut rows = Vec::with_capacity(qa.len());
    for pair in qa {
        let text = SentimentProbe::text(pair);
        let (mut ids, mut offsets) = model.encode_with_offsets(&text)?;
        ids.truncate(MAX_TOKENS);
        offsets.truncate(MAX_TOKENS);
        let sep_start = pair.0.len() + 1;
        let sep_end = sep_start + sep.len();
        // The first token touching the separator, and the first token of the answer.
        let first_sep = offsets
            .iter()
            .position(|&(_, end)| end > sep_start)
            .unwrap_or(ids.len());
        let first_answer = offsets
            .iter()
            .position(|&(start, _)| start >= sep_end)
            .unwrap_or(ids.len());
        let sep_is_pad = first_answer == first_sep + 1 && ids.get(first_sep) == Some(&pad);
        rows.push((ids, first_sep, first_answer, sep_is_pad));
    }
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    // EasyEdit's shared mask: the largest separator index in left-padded coordinates, where a
    // padded row whose pad token is the separator finds it at position 0.
    let shared_start = rows
        .iter()
        .map(|(ids, first_sep, _, sep_is_pad)| {
            let left_pad = width - ids.len();
            if *sep_is_pad && left_pad > 0 {
                0
            } else {
                left_pad + first_sep
            }
        })
        .max()
        .unwrap_or(0);
    let mut scoring = Scoring {
        batch: TokenBatch::new(
            &rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
            pad,
            model.device(),
        )?,
        positions: Vec::new(),
        labels: Vec::new(),
        rows: Vec::new(),
    };
    for (row, (ids, _, first_answer, _)) in rows.iter().enumerate() {
        let left_pad = width - ids.len();
        for (t, &id) in ids.iter().enumerate() {
            let (scored, logit_pos) = match protocol {
                SentimentProtocol::AsPublished => (left_pad + t >= shared_start, t),
                SentimentProtocol::Corrected => (t >= (*first_answer).max(1), t.wrapping_sub(1)),
            };
            if scored {
                scoring.positions.push((row, logit_pos));
                scoring.labels.push(id);
                scoring.rows.push(row);
            }
        }
    }
    Ok(scoring)
}

/// `[n, vocab]` log-probabilities at the scored positions.
fn log_probs(model: &Model, scoring: &Scoring) -> Result<Tensor> {
    if scoring.positions.is_empty() {
        return Ok(Tensor::zeros(
            (0, model.spec().vocab_size),
            DType::F32,
            model.device(),
        )?);
    }
    let logits = model
        .forward_at(&scoring.batch, &HookSpec::new(), &scoring.positions)?
        .logits;
    Ok(Model::log_probs(&logits)?)
}

fn label_log_probs(log_probs: &Tensor, labels: &[u32]) -> Result<Vec<f64>> {
    if labels.is_empty() {
        return Ok(Vec::new());
    }
    let index = Tensor::new(labels, log_probs.device())?.unsqueeze(1)?;
    Ok(log_probs
        .gather(&index, 1)?
        .squeeze(1)?
        .to_dtype(DType::F64)?
        .to_vec1()?)
}

/// The unedited model's side of the metrics, measured before the edit.
pub fn baseline(
    model: &Model,
    probe: &SentimentProbe,
    protocol: SentimentProtocol,
) -> Result<SentimentBaseline> {
    let inner = prepare(model, &probe.inner_qa, protocol)?;
    let outer = prepare(model, &probe.outer_qa, protocol)?;
    Ok(SentimentBaseline {
        inner_log_probs: label_log_probs(&log_probs(model, &inner)?, &inner.labels)?,
        outer_log_probs: log_probs(model, &outer)?,
    })
}

/// `es` and `dd` of the edited `model`; `before` is the unedited model's baseline, or `None` to
/// compare the model with itself as EasyEdit does.
pub fn score(
    model: &Model,
    probe: &SentimentProbe,
    protocol: SentimentProtocol,
    before: Option<&SentimentBaseline>,
) -> Result<SentimentScores> {
    let inner = prepare(model, &probe.inner_qa, protocol)?;
    let outer = prepare(model, &probe.outer_qa, protocol)?;
    let inner_post = label_log_probs(&log_probs(model, &inner)?, &inner.labels)?;
    let outer_post = log_probs(model, &outer)?;
    let (inner_pre, outer_pre) = match before {
        Some(b) => (b.inner_log_probs.clone(), b.outer_log_probs.clone()),
        None => (inner_post.clone(), outer_post.clone()),
    };
    let same: Vec<bool> = inner
        .rows
        .iter()
        .map(|&r| probe.same_sentiment.get(r).copied().unwrap_or(false))
        .collect();
    Ok(SentimentScores {
        es: edit_success(&inner_pre, &inner_post, &same),
        dd: mean_kl(&outer_pre, &outer_post)?,
    })
}

fn masked_mean(values: &[f64], keep: impl Fn(usize) -> bool) -> f64 {
    let (sum, n) = values
        .iter()
        .enumerate()
        .filter(|(i, _)| keep(*i))
        .fold((0.0, 0usize), |(s, n), (_, v)| (s + v, n + 1));
    sum / n as f64
}

/// EasyEdit's `es`: `σ(mean_pos_post − mean_neg_post) · min(1, exp(mean_pos_post − mean_pos_pre))`,
/// means pooled over every scored token, split by whether the token's sentence carries the target
/// sentiment.
pub fn edit_success(pre: &[f64], post: &[f64], target_sentiment: &[bool]) -> f64 {
    let pos_pre = masked_mean(pre, |i| target_sentiment[i]);
    let pos_post = masked_mean(post, |i| target_sentiment[i]);
    let neg_post = masked_mean(post, |i| !target_sentiment[i]);
    let z_sent = 1.0 / (1.0 + (-(pos_post - neg_post)).exp());
    let z_topic = (pos_post - pos_pre).exp().min(1.0);
    z_sent * z_topic
}

/// Mean over rows of `KL(pre ‖ post)` for `[n, vocab]` log-probabilities (NaN for no rows).
pub fn mean_kl(pre: &Tensor, post: &Tensor) -> Result<f64> {
    let n = pre.dim(0)?;
    if n == 0 {
        return Ok(f64::NAN);
    }
    let pre = pre.to_dtype(DType::F64)?;
    let post = post.to_dtype(DType::F64)?;
    let kl = (pre.exp()? * (&pre - &post)?)?.sum(D::Minus1)?;
    Ok(kl.sum_all()?.to_scalar::<f64>()? / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn edit_success_by_hand() {
        // Target-sentiment tokens: pre log-probs -2, -2; post -1, -1. Other tokens: post -3.
        // z_sent = σ(-1 - -3) = σ(2) = 0.880797; z_topic = min(1, e^1) = 1.
        let pre = [-2.0, -2.0, -5.0];
        let post = [-1.0, -1.0, -3.0];
        let same = [true, true, false];
        assert!((edit_success(&pre, &post, &same) - 0.880_797_077_977_882_3).abs() < 1e-12);
        // A drop on the topic is penalised: z_topic = e^(-1 - 0) = 0.367879.
        let pre = [0.0, 0.0, -5.0];
        let expected = 0.880_797_077_977_882_3 * (-1.0f64).exp();
        assert!((edit_success(&pre, &post, &same) - expected).abs() < 1e-12);
    }

    #[test]
    fn kl_by_hand() -> Result<()> {
        // p = (0.5, 0.5), q = (0.25, 0.75): KL = 0.5 ln 2 + 0.5 ln(2/3) = 0.143841.
        let dev = Device::Cpu;
        let pre = Tensor::new(&[[0.5f64.ln(), 0.5f64.ln()]], &dev)?;
        let post = Tensor::new(&[[0.25f64.ln(), 0.75f64.ln()]], &dev)?;
        let expected = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((mean_kl(&pre, &post)? - expected).abs() < 1e-12);
        assert_eq!(mean_kl(&pre, &pre)?, 0.0);
        Ok(())
    }
}

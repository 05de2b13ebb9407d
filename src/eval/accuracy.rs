//! Teacher-forced token accuracy, EasyEdit's core primitive (SPEC-eval §2.1).

use candle_core::D;

use crate::error::{Error, Result};
use crate::model::{HookSpec, Model, TokenBatch};

/// The argmax predictions and the answer tokens at the answer positions of one `prompt + " " + answer`.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Argmax of the logits one position before each answer token.
    pub preds: Vec<u32>,
    /// The answer tokens of the joint tokenisation.
    pub labels: Vec<u32>,
}

impl Scored {
    /// Fraction of answer positions where the prediction is the answer token (NaN with no answer tokens).
    pub fn accuracy(&self) -> f64 {
        let hits = self
            .preds
            .iter()
            .zip(&self.labels)
            .filter(|(p, l)| p == l)
            .count();
        hits as f64 / self.labels.len() as f64
    }
}

/// Scores every `(prompt, answer)` pair in one forward pass.
///
/// The text is `prompt + " " + answer` (one ASCII space, nothing stripped), tokenised with the
/// tokenizer's default special tokens; the answer starts after as many tokens as the prompt alone
/// has (a count, not a string split, as EasyEdit does). kedit pads on the right, so a pair's
/// numbers are those it has alone.
pub fn teacher_forced(model: &Model, pairs: &[(&str, &str)]) -> Result<Vec<Scored>> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let mut sequences = Vec::with_capacity(pairs.len());
    let mut starts = Vec::with_capacity(pairs.len());
    for (prompt, answer) in pairs {
        let n_prompt = model.encode_with_special_tokens(prompt)?.len();
        if n_prompt == 0 {
            return Err(Error::Invalid(
                "cannot score an answer after an empty prompt".into(),
            ));
        }
        sequences.push(model.encode_with_special_tokens(&format!("{prompt} {answer}"))?);
        starts.push(n_prompt);
    }
    let pad = model.spec().eos_id.or(model.spec().pad_id).unwrap_or(0);
    let batch = TokenBatch::new(&sequences, pad, model.device())?;
    // Logits only where an answer token is predicted: position t-1 for each answer token t.
    let mut positions = Vec::new();
    for (row, (ids, &start)) in sequences.iter().zip(&starts).enumerate() {
        positions.extend((start.min(ids.len())..ids.len()).map(|t| (row, t - 1)));
    }
    if positions.is_empty() {
        return Ok(starts
            .iter()
            .map(|_| Scored {
                preds: Vec::new(),
                labels: Vec::new(),
            })
            .collect());
    }
    let logits = model
        .forward_at(&batch, &HookSpec::new(), &positions)?
        .logits;
    let mut argmax = logits.argmax(D::Minus1)?.to_vec1::<u32>()?.into_iter();
    Ok(sequences
        .iter()
        .zip(starts)
        .map(|(ids, start)| {
            let start = start.min(ids.len());
            Scored {
                labels: ids[start..].to_vec(),
                preds: argmax.by_ref().take(ids.len() - start).collect(),
            }
        })
        .collect())
}

/// Generation-based token match (EasyEdit's GRACE protocol, SPEC-eval §2.7.3): greedy-generate as
/// many tokens as the answer has (the answer tokenised alone, without a leading space or special
/// tokens) and compare them with it position by position.
pub fn generation_match(model: &Model, prompt: &str, answer: &str) -> Result<Scored> {
    let labels = model.encode(answer)?;
    let prompt_ids = model.encode_with_special_tokens(prompt)?;
    if labels.is_empty() {
        return Ok(Scored {
            preds: Vec::new(),
            labels,
        });
    }
    let generated =
        model.generate_ids(&prompt_ids, labels.len(), crate::model::Sampling::Greedy)?;
    let mut preds = generated.generated_ids;
    // An early end-of-sequence stops generation; the missing positions cannot match.
    preds.resize(labels.len(), u32::MAX);
    Ok(Scored { preds, labels })
}

/// Perplexity of the answer after the prompt (SPEC-eval §2.7.1): `exp` of the mean negative
/// log-likelihood of the answer tokens of `prompt + " " + answer`. Tokens equal to the pad id
/// (the end-of-sequence id) are not scored, as in EasyEdit, where pad = eos masks them.
pub fn perplexity(model: &Model, prompt: &str, answer: &str) -> Result<f64> {
    let n_prompt = model.encode_with_special_tokens(prompt)?.len();
    let ids = model.encode_with_special_tokens(&format!("{prompt} {answer}"))?;
    let pad = model.spec().eos_id.or(model.spec().pad_id);
    let scored: Vec<usize> = (n_prompt.max(1)..ids.len())
        .filter(|&t| Some(ids[t]) != pad)
        .collect();
    if scored.is_empty() {
        return Ok(f64::NAN);
    }
    let batch = TokenBatch::new(std::slice::from_ref(&ids), pad.unwrap_or(0), model.device())?;
    let positions: Vec<(usize, usize)> = scored.iter().map(|&t| (0, t - 1)).collect();
    let logits = model
        .forward_at(&batch, &HookSpec::new(), &positions)?
        .logits;
    let log_probs: Vec<Vec<f32>> = Model::log_probs(&logits)?.to_vec2()?;
    let nll: f64 = scored
        .iter()
        .zip(&log_probs)
        .map(|(&t, row)| -f64::from(row[ids[t] as usize]))
        .sum::<f64>()
        / scored.len() as f64;
    Ok(nll.exp())
}

/// Per-prompt accuracies as EasyEdit reports them: with several prompts, a prompt without answer
/// tokens (NaN) is dropped; a lone prompt keeps its NaN.
pub fn accuracies(scored: &[Scored]) -> Vec<f64> {
    let all: Vec<f64> = scored.iter().map(Scored::accuracy).collect();
    if all.len() > 1 {
        all.into_iter().filter(|a| !a.is_nan()).collect()
    } else {
        all
    }
}

/// Locality agreement: the fraction of answer positions whose post-edit argmax equals the
/// pre-edit one.
pub fn agreement(pre: &[u32], post: &[u32]) -> Result<f64> {
    if pre.len() != post.len() {
        return Err(Error::Invalid(format!(
            "locality outputs differ in length before ({}) and after ({}) the edit",
            pre.len(),
            post.len()
        )));
    }
    let same = pre.iter().zip(post).filter(|(a, b)| a == b).count();
    Ok(same as f64 / pre.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_counts_matching_positions() {
        let s = Scored {
            preds: vec![1, 2, 3],
            labels: vec![1, 5, 3],
        };
        assert!((s.accuracy() - 2.0 / 3.0).abs() < 1e-12);
        let empty = Scored {
            preds: vec![],
            labels: vec![],
        };
        assert!(empty.accuracy().is_nan());
        assert_eq!(accuracies(&[s.clone(), empty.clone()]).len(), 1);
        assert!(accuracies(&[empty])[0].is_nan());
    }

    #[test]
    fn agreement_is_knowedits_worked_example() {
        // KnowEdit README: pre [29, 234, 334] vs post [29, 234, 333] → 66.67
        let a = agreement(&[29, 234, 334], &[29, 234, 333]).unwrap();
        assert!((a * 100.0 - 66.6667).abs() < 1e-3);
        assert!(agreement(&[1], &[1, 2]).is_err());
    }
}

//! KnowEdit's Sanitation protocol (SPEC-eval §2.9, EasyEdit's `run_santinization_llama2.py`): edit
//! every selected question to answer "I don't know.", keep the edits, then judge by generation:
//! edit success is whether the target text appears in the generated answer, locality is how many
//! tokens of each locality answer the edited model still generates as the unedited one did, and
//! fluency is sampled from the locality questions.
//!
//! Two documented differences from the script: generation is greedy (the script samples with the
//! model's default generation config, which for LLaMA-2-chat is random), and it stops at the
//! end-of-sequence token (the script's batched `generate` pads finished rows with that token,
//! so how many it appends depends on the batch).

use serde::{Deserialize, Serialize};

use crate::data::{EditRequest, PromptSet};
use crate::editors::{Edit, EditCtx, Editor};
use crate::error::Result;
use crate::model::{Model, Sampling};

/// New tokens per answer (the script's `max_new_tokens=10`).
pub const ANSWER_TOKENS: usize = 10;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The prompt and what the model generated after it, special tokens kept.
    pub generation: String,
    /// Whether the target text occurs in the generation (case-insensitive).
    pub hit: bool,
}

/// One edited question, pre and post.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SanitationCase {
    pub case_id: usize,
    pub requested_rewrite: EditRequest,
    pub pre: Answer,
    pub post: Answer,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SanitationSummary {
    pub cases: usize,
    /// Percent of edited questions whose generation contains the target, before and after.
    pub edit_success_pre: f64,
    pub edit_success_post: f64,
    /// Percent: mean over locality questions of the generated-token agreement with the unedited model.
    pub locality: f64,
    pub locality_questions: usize,
    /// ×100 mean n-gram entropy of samples from the locality questions on the edited model.
    pub fluency: Option<f64>,
    /// Seconds of all edit calls together.
    pub edit_seconds: f64,
}

pub struct SanitationOptions {
    pub batch_size: usize,
    pub fluency_seed: Option<u64>,
    pub ctx: EditCtx,
}

/// The greedy answer to `prompt`: the prompt followed by up to [`ANSWER_TOKENS`] generated tokens.
pub fn answer(model: &Model, prompt: &str) -> Result<String> {
    let ids = model.encode_with_special_tokens(prompt)?;
    let gen = model.generate_ids(&ids, ANSWER_TOKENS, Sampling::Greedy)?;
    Ok(format!("{prompt}{}", gen.text))
}

/// Whether `target` occurs in `generation`, ignoring case.
pub fn contains_target(generation: &str, target: &str) -> bool {
    generation.to_lowercase().contains(&target.to_lowercase())
}

/// The script's locality score: tokenise both continuations, count the positions where they
/// agree until either ends, divide by the reference's length (NaN for an empty reference).
pub fn token_agreement(generated: &[u32], reference: &[u32]) -> f64 {
    let same = generated
        .iter()
        .zip(reference)
        .filter(|(a, b)| a == b)
        .count();
    same as f64 / reference.len() as f64
}

fn continuation<'a>(generation: &'a str, prompt: &str) -> &'a str {
    generation.strip_prefix(prompt).unwrap_or(generation)
}

/// Runs the protocol: answers before, all edits kept, answers after; the edits are undone before
/// returning, so `model` is left as it came. `on_case` sees each case as soon as it is scored.
pub fn run(
    model: &mut Model,
    editor: &mut dyn Editor,
    cases: &[(usize, EditRequest)],
    locality: &PromptSet,
    opts: &SanitationOptions,
    on_case: &mut dyn FnMut(&SanitationCase) -> Result<()>,
    progress: &mut dyn FnMut(&'static str, usize, usize),
) -> Result<SanitationSummary> {
    let total = cases.len() + locality.prompt.len();
    let mut before_cases = Vec::with_capacity(cases.len());
    for (n, (_, r)) in cases.iter().enumerate() {
        before_cases.push(answer(model, &r.prompt)?);
        progress("pre", n + 1, total);
    }
    let mut before_locality = Vec::with_capacity(locality.prompt.len());
    for (n, p) in locality.prompt.iter().enumerate() {
        before_locality.push(answer(model, p)?);
        progress("pre", cases.len() + n + 1, total);
    }

    let mut edits: Vec<Edit> = Vec::new();
    let start = std::time::Instant::now();
    let batch = opts.batch_size.clamp(1, editor.max_batch().max(1));
    let result = (|| -> Result<SanitationSummary> {
        for (n, chunk) in cases.chunks(batch).enumerate() {
            let requests: Vec<EditRequest> = chunk.iter().map(|(_, r)| r.clone()).collect();
            edits.push(editor.apply(model, &requests, &opts.ctx)?);
            progress("edit", ((n + 1) * batch).min(cases.len()), cases.len());
        }
        let edit_seconds = start.elapsed().as_secs_f64();

        let mut hits = (0usize, 0usize);
        for (n, ((case_id, r), pre)) in cases.iter().zip(before_cases).enumerate() {
            let post = answer(model, &r.prompt)?;
            let case = SanitationCase {
                case_id: *case_id,
                requested_rewrite: r.clone(),
                pre: Answer {
                    hit: contains_target(&pre, &r.target_new),
                    generation: pre,
                },
                post: Answer {
                    hit: contains_target(&post, &r.target_new),
                    generation: post,
                },
            };
            hits.0 += usize::from(case.pre.hit);
            hits.1 += usize::from(case.post.hit);
            on_case(&case)?;
            progress("post", n + 1, total);
        }
        let mut scores = Vec::with_capacity(locality.prompt.len());
        for (n, (p, pre)) in locality.prompt.iter().zip(&before_locality).enumerate() {
            let post = answer(model, p)?;
            let reference = model.encode_with_special_tokens(continuation(pre, p))?;
            let generated = model.encode_with_special_tokens(continuation(&post, p))?;
            scores.push(token_agreement(&generated, &reference));
            progress("post", cases.len() + n + 1, total);
        }
        let finite: Vec<f64> = scores.into_iter().filter(|s| s.is_finite()).collect();
        let fluency = match opts.fluency_seed {
            Some(seed) => {
                let mut sum = 0.0;
                for p in &locality.prompt {
                    sum += super::fluency::fluency(model, p, seed)?.ngram_entropy;
                }
                Some(100.0 * sum / locality.prompt.len().max(1) as f64)
            }
            None => None,
        };
        let pct = |k: usize| 100.0 * k as f64 / cases.len().max(1) as f64;
        Ok(SanitationSummary {
            cases: cases.len(),
            edit_success_pre: pct(hits.0),
            edit_success_post: pct(hits.1),
            locality: 100.0 * finite.iter().sum::<f64>() / finite.len().max(1) as f64,
            locality_questions: finite.len(),
            fluency,
            edit_seconds,
        })
    })();
    for edit in edits.into_iter().rev() {
        editor.undo(model, &edit)?;
    }
    result
}

impl SanitationSummary {
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<16}{:>10}{:>10}\n",
            format!("{} cases", self.cases),
            "pre",
            "post"
        );
        out.push_str(&format!(
            "{:<16}{:>10.2}{:>10.2}\n",
            "edit success", self.edit_success_pre, self.edit_success_post
        ));
        out.push_str(&format!(
            "{:<16}{:>10}{:>10.2}\n",
            "locality", "", self.locality
        ));
        if let Some(f) = self.fluency {
            out.push_str(&format!("{:<16}{:>10}{:>10.2}\n", "fluency", "", f));
        }
        out.push_str(&format!(
            "{:<16}{:>20}\n",
            "s / all edits",
            format!("{:.3}", self.edit_seconds)
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_agreement_by_hand() {
        assert_eq!(token_agreement(&[1, 2, 3], &[1, 9, 3, 4]), 0.5);
        // a generation shorter than the reference counts as misses for the rest
        assert_eq!(token_agreement(&[1], &[1, 2]), 0.5);
        assert_eq!(token_agreement(&[1, 2, 3], &[1]), 1.0);
        assert!(token_agreement(&[1], &[]).is_nan());
    }

    #[test]
    fn target_match_ignores_case() {
        assert!(contains_target(
            "Question:Who?\nAnswer: i don't know. Really",
            "I don't know."
        ));
        assert!(!contains_target("Answer: I do not know.", "I don't know."));
    }
}

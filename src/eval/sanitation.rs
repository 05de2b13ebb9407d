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

use crate::data::EditRequest;
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

/// An edited question judged after the edits, against its answer before them.
pub fn judge_case(
    model: &Model,
    case_id: usize,
    request: &EditRequest,
    pre: String,
) -> Result<SanitationCase> {
    let post = answer(model, &request.prompt)?;
    Ok(SanitationCase {
        case_id,
        requested_rewrite: request.clone(),
        pre: Answer {
            hit: contains_target(&pre, &request.target_new),
            generation: pre,
        },
        post: Answer {
            hit: contains_target(&post, &request.target_new),
            generation: post,
        },
    })
}

/// The locality score of one question: the agreement of the edited model's answer with the
/// unedited one's (`pre`), token by token.
pub fn locality_score(model: &Model, prompt: &str, pre: &str) -> Result<f64> {
    let post = answer(model, prompt)?;
    let reference = model.encode_with_special_tokens(continuation(pre, prompt))?;
    let generated = model.encode_with_special_tokens(continuation(&post, prompt))?;
    Ok(token_agreement(&generated, &reference))
}

/// ×100 mean n-gram entropy of samples from `prompts`.
pub fn mean_fluency(model: &Model, prompts: &[String], seed: u64) -> Result<f64> {
    let mut sum = 0.0;
    for p in prompts {
        sum += super::fluency::fluency(model, p, seed)?.ngram_entropy;
    }
    Ok(100.0 * sum / prompts.len().max(1) as f64)
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

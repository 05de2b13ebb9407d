//! Where a subject lives in a prompt: the token whose MLP key ROME, MEMIT and AlphaEdit rewrite
//! (SPEC-editors §2.2), and the span causal tracing corrupts. It reads only the tokenizer, so
//! editors and analyses share it. Positions count from the left of an unpadded sequence, so batches built
//! from them are right-padded.

use serde::Deserialize;

use super::Model;
use crate::error::{Error, Result};

/// EasyEdit's `fact_token` rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FactToken {
    SubjectFirst,
    SubjectLast,
    SubjectFirstAfterLast,
    /// The prompt's last token (ROME only).
    Last,
}

/// The placeholder the subject stands in for inside prompts and templates.
pub const SUBJECT: &str = "{}";

/// `prompt` with every occurrence of `subject` replaced by `{}` (a prompt that already has a
/// placeholder is kept), as EasyEdit normalises requests.
pub fn with_placeholder(prompt: &str, subject: &str) -> Result<String> {
    if prompt.contains(SUBJECT) {
        return Ok(prompt.to_string());
    }
    if subject.is_empty() || !prompt.contains(subject) {
        return Err(Error::Invalid(format!(
            "subject {subject:?} does not occur in prompt {prompt:?}"
        )));
    }
    Ok(prompt.replace(subject, SUBJECT))
}

/// The text of `template` (one `{}`) with the subject filled in, and the index of its fact token
/// under `rule`, found from the tokenizer's byte offsets: the first token that overlaps the
/// subject, the last one that does, the one after it, or the last token.
pub fn fact_token(
    model: &Model,
    template: &str,
    subject: &str,
    rule: FactToken,
) -> Result<(String, usize)> {
    let start = template.find(SUBJECT).ok_or_else(|| {
        Error::Invalid(format!("template {template:?} has no {{}} for the subject"))
    })?;
    let text = template.replacen(SUBJECT, subject, 1);
    let end = start + subject.len();
    let (ids, offsets) = model.encode_with_offsets(&text)?;
    if ids.is_empty() {
        return Err(Error::Invalid(format!("{text:?} has no tokens")));
    }
    // Special tokens (a BOS) have empty spans; they never overlap the subject.
    let overlaps = |&(a, b): &(usize, usize)| a < b && a < end && b > start;
    let first = offsets.iter().position(overlaps);
    let last = offsets.iter().rposition(overlaps);
    let index = match (rule, first, last) {
        (FactToken::Last, _, _) => ids.len() - 1,
        (FactToken::SubjectFirst, Some(f), _) => f,
        (FactToken::SubjectLast, _, Some(l)) => l,
        (FactToken::SubjectFirstAfterLast, _, Some(l)) => (l + 1).min(ids.len() - 1),
        _ => {
            return Err(Error::Invalid(format!(
                "subject {subject:?} has no token in {text:?}"
            )))
        }
    };
    Ok((text, index))
}

/// EasyEdit's own count-based rule, kept to check [`fact_token`] against: with `P`, `Q`, `R` the
/// token counts of the prefix, prefix + subject and the whole text.
pub fn fact_token_by_counts(
    model: &Model,
    template: &str,
    subject: &str,
    rule: FactToken,
) -> Result<usize> {
    let (prefix, suffix) = template
        .split_once(SUBJECT)
        .ok_or_else(|| Error::Invalid(format!("template {template:?} has no {{}}")))?;
    let count = |s: &str| -> Result<usize> { Ok(model.encode_with_special_tokens(s)?.len()) };
    let p = count(prefix)?;
    let q = count(&format!("{prefix}{subject}"))?;
    let r = count(&format!("{prefix}{subject}{suffix}"))?;
    Ok(match rule {
        FactToken::SubjectLast => q - 1,
        FactToken::SubjectFirst => p,
        FactToken::SubjectFirstAfterLast => {
            if r == q {
                q - 1
            } else {
                q
            }
        }
        FactToken::Last => r - 1,
    })
}

//! Context templates (SPEC-editors §2.1): short texts the model writes itself, used as left
//! contexts so that keys and values are averaged over several contexts and the edit generalises.
//! Every template ends in `{}`, where the prompt goes; the bare `"{}"` always comes first.

use unicode_normalization::UnicodeNormalization;

use crate::error::Result;
use crate::model::{Model, Sampling};

/// The words every generated context starts from.
const SEEDS: [&str; 5] = ["The", "Therefore", "Because", "I", "You"];

/// How a generated text becomes a template: ROME deletes braces, MEMIT turns them into spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Braces {
    Delete,
    Space,
}

/// Samples `count` continuations of every seed word with top-5 sampling until each text is
/// `length` tokens long (seed and special tokens included), and turns each into a template.
pub fn sample_templates(
    model: &Model,
    length: usize,
    count: usize,
    braces: Braces,
    seed: u64,
) -> Result<Vec<String>> {
    sample_groups(model, &[(length, count, seed)], braces)
}

/// [`sample_templates`] for several `(length, count, seed)` groups, concatenated in order. All
/// texts are sampled in as few batched passes as the seed words' token counts allow: one token
/// at a time for a batch of one reads every weight per token, for a batch of twenty just the same.
fn sample_groups(
    model: &Model,
    groups: &[(usize, usize, u64)],
    braces: Braces,
) -> Result<Vec<String>> {
    struct Row {
        ids: Vec<u32>,
        new_tokens: usize,
        seed: u64,
    }
    let mut rows = Vec::new();
    for &(length, count, seed) in groups {
        let mut draw = seed;
        for word in SEEDS {
            let ids = model.encode_with_special_tokens(word)?;
            for _ in 0..count {
                rows.push(Row {
                    new_tokens: length.saturating_sub(ids.len()),
                    ids: ids.clone(),
                    seed: draw,
                });
                draw = draw.wrapping_add(1);
            }
        }
    }
    let mut texts: Vec<Vec<u32>> = rows.iter().map(|r| r.ids.clone()).collect();
    let mut prompt_lengths: Vec<usize> = rows.iter().map(|r| r.ids.len()).collect();
    prompt_lengths.sort_unstable();
    prompt_lengths.dedup();
    for prompt_length in prompt_lengths {
        let members: Vec<usize> = (0..rows.len())
            .filter(|&i| rows[i].ids.len() == prompt_length && rows[i].new_tokens > 0)
            .collect();
        let Some(longest) = members.iter().map(|&i| rows[i].new_tokens).max() else {
            continue;
        };
        let prompts: Vec<Vec<u32>> = members.iter().map(|&i| rows[i].ids.clone()).collect();
        let samplings: Vec<Sampling> = members
            .iter()
            .map(|&i| Sampling::TopK {
                k: 5,
                seed: rows[i].seed,
            })
            .collect();
        let generated = model.generate_batch_ids(&prompts, longest, &samplings)?;
        for (&i, tokens) in members.iter().zip(generated) {
            texts[i].extend_from_slice(&tokens[..rows[i].new_tokens]);
        }
    }
    texts
        .iter()
        .map(|ids| Ok(template_from(&model.decode_skipping_special(ids)?, braces)))
        .collect()
}

/// A generated text as a template: NFKD-normalised, paragraph breaks to spaces, braces removed,
/// then `". {}"`.
pub fn template_from(text: &str, braces: Braces) -> String {
    let text: String = text.nfkd().collect();
    let text = text.replace("\n\n", " ").replace("<|endoftext|>", "");
    let text = match braces {
        Braces::Delete => text.replace(['{', '}'], ""),
        Braces::Space => text.replace(['{', '}'], " "),
    };
    format!("{text}. {{}}")
}

/// ROME's templates: `"{}"`, then for each `[length, n]` of `context_template_length_params`,
/// `n / 5` samples per seed word.
pub fn rome_templates(
    model: &Model,
    length_params: &[[usize; 2]],
    seed: u64,
) -> Result<Vec<String>> {
    let groups: Vec<(usize, usize, u64)> = length_params
        .iter()
        .enumerate()
        .map(|(i, &[length, n])| (length, n / SEEDS.len(), seed.wrapping_add(1000 * i as u64)))
        .collect();
    let mut templates = vec!["{}".to_string()];
    templates.extend(sample_groups(model, &groups, Braces::Delete)?);
    Ok(templates)
}

/// MEMIT's and AlphaEdit's grouped templates: `[["{}"], [one 10-token sample per seed word]]`.
pub fn memit_templates(model: &Model, seed: u64) -> Result<Vec<Vec<String>>> {
    Ok(vec![
        vec!["{}".to_string()],
        sample_templates(model, 10, 1, Braces::Space, seed)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_text_becomes_a_template() {
        assert_eq!(
            template_from("The {cat}\n\nsat", Braces::Delete),
            "The cat sat. {}"
        );
        assert_eq!(
            template_from("The {cat}<|endoftext|>", Braces::Space),
            "The  cat . {}"
        );
        // NFKD splits a ligature into its letters
        assert_eq!(template_from("\u{fb01}ne", Braces::Delete), "fine. {}");
    }
}

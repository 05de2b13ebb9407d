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
    let mut templates = Vec::with_capacity(count * SEEDS.len());
    let mut draw = seed;
    for word in SEEDS {
        let ids = model.encode_with_special_tokens(word)?;
        for _ in 0..count {
            let new_tokens = length.saturating_sub(ids.len());
            let mut all = ids.clone();
            if new_tokens > 0 {
                let gen = model.generate_ids_until(
                    &ids,
                    new_tokens,
                    Sampling::TopK { k: 5, seed: draw },
                    false,
                )?;
                all.extend(gen.generated_ids);
            }
            draw = draw.wrapping_add(1);
            templates.push(template_from(&model.decode_skipping_special(&all)?, braces));
        }
    }
    Ok(templates)
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
    let mut templates = vec!["{}".to_string()];
    for (i, &[length, n]) in length_params.iter().enumerate() {
        let per_seed = n / SEEDS.len();
        templates.extend(sample_templates(
            model,
            length,
            per_seed,
            Braces::Delete,
            seed.wrapping_add(1000 * i as u64),
        )?);
    }
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

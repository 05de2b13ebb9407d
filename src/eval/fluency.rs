//! Fluency: the weighted n-gram entropy of generated text (SPEC-eval §2.6).

use std::collections::HashMap;

use unicode_normalization::UnicodeNormalization;

use super::word_tokenize::word_tokenize;
use super::Fluency;
use crate::error::Result;
use crate::model::{Model, Sampling};

/// EasyEdit's fluency sample: top-5 sampling at temperature 1 until the sequence, prompt included,
/// holds `max_len` tokens (100), with no stop at end-of-sequence; the whole text is decoded without
/// special tokens, NFKD-normalised, with "\n\n" turned into a space and `<|endoftext|>` removed.
pub fn fluency_sample(model: &Model, prompt: &str, max_len: usize, seed: u64) -> Result<String> {
    let prompt_ids = model.encode_with_special_tokens(prompt)?;
    let new_tokens = max_len.saturating_sub(prompt_ids.len());
    let mut ids = prompt_ids.clone();
    if new_tokens > 0 {
        let gen = model.generate_ids_until(
            &prompt_ids,
            new_tokens,
            Sampling::TopK { k: 5, seed },
            false,
        )?;
        ids.extend(gen.generated_ids);
    }
    let text = model
        .tokenizer()
        .decode(&ids, true)
        .map_err(|e| crate::Error::Tokenizer(e.to_string()))?;
    Ok(text
        .nfkd()
        .collect::<String>()
        .replace("\n\n", " ")
        .replace("<|endoftext|>", ""))
}

/// The fluency of `prompt`'s continuation: n-gram entropy of NLTK word tokens of the sample.
pub fn fluency(model: &Model, prompt: &str, seed: u64) -> Result<Fluency> {
    let text = fluency_sample(model, prompt, 100, seed)?;
    let tokens = word_tokenize(&text)?;
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    Ok(Fluency {
        ngram_entropy: ngram_entropy(&refs),
    })
}

/// Entropy in bits of the n-gram distribution of `tokens` (0 when there are no n-grams).
pub fn ngram_entropy_n(tokens: &[&str], n: usize) -> f64 {
    if tokens.len() < n {
        return 0.0;
    }
    let mut counts: HashMap<&[&str], usize> = HashMap::new();
    for gram in tokens.windows(n) {
        *counts.entry(gram).or_default() += 1;
    }
    let total = (tokens.len() + 1 - n) as f64;
    // Summed in a fixed order: HashMap order changes from process to process, and float sums
    // with it, which would make the same text score differently in the last digit.
    let mut counts: Vec<usize> = counts.into_values().collect();
    counts.sort_unstable();
    counts
        .iter()
        .map(|&c| {
            let p = c as f64 / total;
            -p * p.log2()
        })
        .sum()
}

/// EasyEdit's score of one text: the mean of `2/3·H₂` and `4/3·H₃` over its word tokens.
pub fn ngram_entropy(tokens: &[&str]) -> f64 {
    let weighted = [
        2.0 / 3.0 * ngram_entropy_n(tokens, 2),
        4.0 / 3.0 * ngram_entropy_n(tokens, 3),
    ];
    weighted.iter().sum::<f64>() / weighted.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproduces_the_worked_examples_of_the_spec() {
        let cat: Vec<&str> = "the cat sat on the mat".split(' ').collect();
        assert!((ngram_entropy_n(&cat, 2) - 5f64.log2()).abs() < 1e-12);
        assert!((ngram_entropy_n(&cat, 3) - 2.0).abs() < 1e-12);
        assert!((ngram_entropy(&cat) - 2.1073).abs() < 1e-4);
        let rep: Vec<&str> = "the cat the cat the cat".split(' ').collect();
        assert!((ngram_entropy(&rep) - 0.9903).abs() < 1e-4);
        assert_eq!(ngram_entropy(&["one"]), 0.0);
    }
}

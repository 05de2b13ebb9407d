//! Fluency: the weighted n-gram entropy of generated text (SPEC-eval §2.6).

use std::collections::HashMap;

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
    counts
        .values()
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

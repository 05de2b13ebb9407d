//! kedit's port of NLTK's word_tokenize against NLTK 3.10.4 itself, on the texts
//! scripts/nltk/make_vectors.py lists (WikiBio passages, benchmark prompts, and hand-made
//! sentences with quotes, contractions, abbreviations, numbers and dashes).

mod common;

use common::*;
use kedit::eval::fluency::ngram_entropy;
use kedit::eval::word_tokenize::word_tokenize;

#[test]
fn word_tokenize_equals_nltk() {
    let reference = read_json("nltk/word_tokenize.json");
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() > 300);
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<String> = serde_json::from_value(case["tokens"].clone()).unwrap();
        let got = word_tokenize(text).unwrap();
        if got != want {
            failures.push(format!("{text:?}\n  nltk:  {want:?}\n  kedit: {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} differ:\n{}",
        failures.len(),
        cases.len(),
        failures[..failures.len().min(5)].join("\n")
    );
}

#[test]
fn entropy_of_nltk_tokens_matches_the_spec_example() {
    let tokens = word_tokenize("the cat sat on the mat").unwrap();
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    assert!((ngram_entropy(&refs) - 2.1073).abs() < 1e-4);
}

//! The tokenizer rebuilt from GGUF metadata against the fixture's tokenizer.json (made by
//! transformers from the same vocabulary) on real benchmark text.

mod common;

use candle_core::quantized::gguf_file::Content;
use common::*;
use kedit::model::load::tokenizer_from_gguf;
use tokenizers::Tokenizer;

/// Every prompt-like string of the CounterFact and ZsRE fixtures, plus digits, whitespace and
/// special tokens that exercise the pre-tokeniser.
fn texts() -> Vec<String> {
    let mut out = vec![
        "In 1987, 12345 people paid $3.50 each.".to_string(),
        "  two leading spaces\tand a tab\n\nnewlines".to_string(),
        "<|im_start|>user\nHi<|im_end|>".to_string(),
        "naïve café — “quotes” 東京 🙂".to_string(),
    ];
    for rec in read_json("data/counterfact_easyedit_edit.json")
        .as_array()
        .unwrap()
    {
        for key in [
            "prompt",
            "target_new",
            "ground_truth",
            "rephrase_prompt",
            "locality_prompt",
            "subject",
        ] {
            if let Some(s) = rec[key].as_str() {
                out.push(s.to_string());
                out.push(format!("{s} {}", rec["target_new"].as_str().unwrap_or("")));
            }
        }
    }
    for rec in read_json("data/knowedit_zsre_test.json")
        .as_array()
        .unwrap()
    {
        for key in ["prompt", "rephrase_prompt", "target_new"] {
            if let Some(s) = rec[key].as_str() {
                out.push(s.to_string());
            }
        }
    }
    out
}

#[test]
fn gguf_tokenizer_matches_tokenizer_json() {
    let mut file = std::fs::File::open(smollm2_path()).unwrap();
    let content = Content::read(&mut file).unwrap();
    let from_gguf = tokenizer_from_gguf(&content.metadata).unwrap();
    let reference = Tokenizer::from_file(fixture("smollm2/tokenizer.json")).unwrap();
    let texts = texts();
    assert!(texts.len() > 300, "only {} texts", texts.len());
    for text in &texts {
        let got = from_gguf.encode(text.as_str(), false).unwrap();
        let want = reference.encode(text.as_str(), false).unwrap();
        assert_eq!(got.get_ids(), want.get_ids(), "ids of {text:?}");
        assert_eq!(
            from_gguf.decode(got.get_ids(), false).unwrap(),
            *text,
            "decoding {text:?} does not give it back"
        );
    }
}

#[test]
fn gguf_tokenizer_keeps_special_tokens_whole() {
    let mut file = std::fs::File::open(smollm2_path()).unwrap();
    let content = Content::read(&mut file).unwrap();
    let tok = tokenizer_from_gguf(&content.metadata).unwrap();
    let ids = tok.encode("<|im_start|>", false).unwrap();
    assert_eq!(ids.get_ids(), [1]);
}

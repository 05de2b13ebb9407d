//! Tokenizers: a `tokenizer.json`, or one rebuilt from GGUF metadata (byte-level BPE).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::error::{Error, Result};

pub(super) fn tokenizer_from_file(path: &Path) -> Result<Tokenizer> {
    if !path.is_file() {
        return Err(Error::file(path, "tokenizer file is missing"));
    }
    Tokenizer::from_file(path).map_err(|e| Error::file(path, format!("invalid tokenizer: {e}")))
}

/// GGUF token types (llama.cpp's `llama_token_type`): control and user-defined tokens are special.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Rebuilds a byte-level BPE tokenizer from `tokenizer.ggml.*` metadata. No BOS is added: neither
/// GPT-2 nor SmolLM2 adds one, and the reference token ids are the plain tokenisation.
pub fn tokenizer_from_gguf(md: &HashMap<String, Value>) -> Result<Tokenizer> {
    let err = |m: String| Error::Tokenizer(m);
    let model = super::gguf::get_str(md, "tokenizer.ggml.model").map_err(err)?;
    if model != "gpt2" {
        return Err(err(format!(
            "tokenizer.ggml.model \"{model}\" is not supported (only byte-level BPE, \"gpt2\"); pass --tokenizer tokenizer.json"
        )));
    }
    let strings = |k: &str| -> Result<Vec<String>> {
        match md.get(k) {
            Some(Value::Array(vs)) => vs
                .iter()
                .map(|v| {
                    v.to_string()
                        .cloned()
                        .map_err(|e| err(format!("`{k}`: {e}")))
                })
                .collect(),
            _ => Err(err(format!("`{k}` is missing or not an array"))),
        }
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    err(format!(
                        "merge `{m}` is not two symbols separated by a space"
                    ))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| err(format!("cannot build BPE: {e}")))?;
    let byte_level = ByteLevel::new(false, true, true);
    let pre = super::gguf::get_str(md, "tokenizer.ggml.pre").unwrap_or_else(|_| "default".into());
    let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
        // SmolLM's pre-tokeniser splits every digit on its own before the byte-level regex.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "gpt2" | "gpt-2" | "default" => byte_level.into(),
        other => {
            return Err(err(format!(
                "tokenizer.ggml.pre \"{other}\" is not supported (expected gpt2 or smollm); pass --tokenizer tokenizer.json"
            )))
        }
    };
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    if let Some(Value::Array(types)) = md.get("tokenizer.ggml.token_type") {
        let special: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(t, _)| {
                matches!(
                    t.to_i32(),
                    Ok(TOKEN_TYPE_CONTROL) | Ok(TOKEN_TYPE_USER_DEFINED)
                )
            })
            .map(|(_, tok)| AddedToken::from(tok.clone(), true))
            .collect();
        tokenizer
            .add_special_tokens(special)
            .map_err(|e| err(format!("cannot add special tokens: {e}")))?;
    }
    Ok(tokenizer)
}

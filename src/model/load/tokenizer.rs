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
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
const TOKEN_TYPE_UNUSED: i32 = 5;

/// The byte-level pre-tokenisers kedit reads from `tokenizer.ggml.pre`, by llama.cpp's names
/// (the first name of each is the one written).
fn known_pre_tokenizer(name: &str) -> Option<PreTokenizerWrapper> {
    let byte_level = ByteLevel::new(false, true, true);
    match name {
        // SmolLM's pre-tokeniser splits every digit on its own before the byte-level regex.
        "smollm" => Some(Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()),
        "gpt-2" | "gpt2" | "default" => Some(byte_level.into()),
        _ => None,
    }
}

/// `tokenizer.ggml.*` metadata for a byte-level BPE tokenizer with one of the pre-tokenisers of
/// [`known_pre_tokenizer`] (GPT-2's, SmolLM2's), for a model with `vocab_size` embedding rows
/// (rows past the tokenizer's vocabulary become unused `[PAD{i}]` tokens, as llama.cpp's
/// converter writes them). The metadata is read back with [`tokenizer_from_gguf`] and must
/// tokenise a probe text as `tokenizer` does.
///
/// # Errors
/// Another tokenizer model (LLaMA-2's SentencePiece-style BPE with byte fallback, WordPiece, ...),
/// another pre-tokeniser, a normaliser, gaps in the ids.
pub fn tokenizer_to_gguf(tokenizer: &Tokenizer, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let err = |m: String| {
        Error::Tokenizer(format!(
            "{m}; GGUF is written for byte-level BPE tokenizers (GPT-2's, SmolLM2's): export a folder with --out and convert it with llama.cpp's convert_hf_to_gguf.py"
        ))
    };
    let json: serde_json::Value = serde_json::from_str(
        &tokenizer
            .to_string(false)
            .map_err(|e| err(format!("cannot serialise the tokenizer: {e}")))?,
    )
    .map_err(|e| err(format!("cannot read the tokenizer back: {e}")))?;
    let model = &json["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == true {
        return Err(err(format!(
            "the tokenizer is {} {}",
            model["type"],
            if model["byte_fallback"] == true {
                "with byte fallback"
            } else {
                ""
            }
        )));
    }
    if !json["normalizer"].is_null() {
        return Err(err("the tokenizer has a normaliser".into()));
    }
    if json["decoder"]["type"] != "ByteLevel" {
        return Err(err(format!(
            "the tokenizer's decoder is {}",
            json["decoder"]["type"]
        )));
    }
    let pre = ["smollm", "gpt-2"]
        .into_iter()
        .find(|name| {
            known_pre_tokenizer(name)
                .and_then(|p| serde_json::to_value(p).ok())
                .is_some_and(|p| p == json["pre_tokenizer"])
        })
        .ok_or_else(|| {
            err(format!(
                "its pre-tokeniser {} is not one kedit knows",
                json["pre_tokenizer"]
            ))
        })?;

    let vocab = tokenizer.get_vocab(true);
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size.max(vocab.len())];
    for (token, id) in vocab {
        let slot = tokens
            .get_mut(id as usize)
            .ok_or_else(|| err(format!("token id {id} is past the vocabulary")))?;
        *slot = Some(token);
    }
    if tokens.len() > vocab_size {
        return Err(err(format!(
            "the tokenizer has {} tokens, the model {vocab_size} embedding rows",
            tokens.len()
        )));
    }
    let added = tokenizer.get_added_tokens_decoder();
    let mut types = Vec::with_capacity(tokens.len());
    let mut names = Vec::with_capacity(tokens.len());
    for (id, token) in tokens.into_iter().enumerate() {
        let (name, kind) = match (token, added.get(&(id as u32))) {
            (Some(t), Some(a)) if a.special => (t, TOKEN_TYPE_CONTROL),
            (Some(t), Some(_)) => (t, TOKEN_TYPE_USER_DEFINED),
            (Some(t), None) => (t, TOKEN_TYPE_NORMAL),
            (None, _) => (format!("[PAD{id}]"), TOKEN_TYPE_UNUSED),
        };
        names.push(Value::String(name));
        types.push(Value::I32(kind));
    }
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| err("the tokenizer has no merges".into()))?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(Value::String(s.clone())),
            serde_json::Value::Array(pair) => match pair.as_slice() {
                [serde_json::Value::String(a), serde_json::Value::String(b)] => {
                    Ok(Value::String(format!("{a} {b}")))
                }
                _ => Err(err(format!("merge {m} is not a pair of symbols"))),
            },
            _ => Err(err(format!("merge {m} is not a pair of symbols"))),
        })
        .collect::<Result<Vec<_>>>()?;
    let adds_bos = {
        let plain = tokenizer
            .encode("a", false)
            .map_err(|e| err(e.to_string()))?;
        let with_special = tokenizer
            .encode("a", true)
            .map_err(|e| err(e.to_string()))?;
        with_special.get_ids().len() > plain.get_ids().len()
    };
    let metadata = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(names)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
        (
            "tokenizer.ggml.add_bos_token".to_string(),
            Value::Bool(adds_bos),
        ),
        // Byte-level pre-tokenisers mark spaces themselves (`add_prefix_space` is false in both).
        (
            "tokenizer.ggml.add_space_prefix".to_string(),
            Value::Bool(false),
        ),
    ];

    // What kedit reads back must tokenise as the tokenizer it was written from.
    let md: HashMap<String, Value> = metadata.iter().cloned().collect();
    let rebuilt = tokenizer_from_gguf(&md)?;
    let probe =
        "Danielle Darrieux's mother tongue is French, 1917–2017.\n  <|endoftext|> ünïcödé 12345";
    let ids = |t: &Tokenizer| {
        t.encode(probe, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| err(e.to_string()))
    };
    if ids(&rebuilt)? != ids(tokenizer)? {
        return Err(err(
            "the GGUF tokenizer would not tokenise as this one does".into(),
        ));
    }
    Ok(metadata)
}

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
    let pre = super::gguf::get_str(md, "tokenizer.ggml.pre").unwrap_or_else(|_| "default".into());
    let pre_tokenizer = known_pre_tokenizer(&pre).ok_or_else(|| {
        err(format!(
            "tokenizer.ggml.pre \"{pre}\" is not supported (expected gpt2 or smollm); pass --tokenizer tokenizer.json"
        ))
    })?;
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

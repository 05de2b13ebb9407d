//! A GPT-2 GGUF in llama.cpp's layout, written here from the tiny GPT-2's safetensors with the
//! names and orientation llama.cpp's converter uses (written out below, independently of kedit's
//! own mapping), must reproduce the transformers reference outputs like the original folder.

mod common;

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;

/// llama.cpp's tensor name for a Hugging Face GPT-2 tensor, and whether the converter transposes it
/// (HF `Conv1D` stores `[in, out]`; GGUF holds `[out, in]`).
fn gguf_name(hf: &str) -> (String, bool) {
    let hf = hf.strip_prefix("transformer.").unwrap_or(hf);
    let globals = [
        ("wte.weight", "token_embd.weight"),
        ("wpe.weight", "position_embd.weight"),
        ("ln_f.weight", "output_norm.weight"),
        ("ln_f.bias", "output_norm.bias"),
    ];
    if let Some((_, g)) = globals.iter().find(|(h, _)| *h == hf) {
        return (g.to_string(), false);
    }
    let rest = hf.strip_prefix("h.").unwrap();
    let (layer, local) = rest.split_once('.').unwrap();
    let (module, param) = local.rsplit_once('.').unwrap();
    let (name, conv1d) = match module {
        "ln_1" => ("attn_norm", false),
        "attn.c_attn" => ("attn_qkv", true),
        "attn.c_proj" => ("attn_output", true),
        "ln_2" => ("ffn_norm", false),
        "mlp.c_fc" => ("ffn_up", true),
        "mlp.c_proj" => ("ffn_down", true),
        other => panic!("unexpected module {other}"),
    };
    (
        format!("blk.{layer}.{name}.{param}"),
        conv1d && param == "weight",
    )
}

fn write_tiny_gpt2_gguf(path: &std::path::Path) {
    let dev = Device::Cpu;
    let tensors =
        candle_core::safetensors::load(fixture("tiny-gpt2/model.safetensors"), &dev).unwrap();
    let mut qtensors: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(hf, t)| {
            let (name, transpose) = gguf_name(hf);
            let t: Tensor = if transpose {
                t.t().unwrap().contiguous().unwrap()
            } else {
                t.clone()
            };
            (name, QTensor::quantize(&t, GgmlDType::F32).unwrap())
        })
        .collect();
    qtensors.sort_by(|a, b| a.0.cmp(&b.0));

    let config = read_json("tiny-gpt2/config.json");
    let tok = read_json("tiny-gpt2/tokenizer.json");
    let vocab: HashMap<String, u64> =
        serde_json::from_value(tok["model"]["vocab"].clone()).unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id as usize] = t;
    }
    let merges: Vec<Value> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            Value::String(format!(
                "{} {}",
                m[0].as_str().unwrap(),
                m[1].as_str().unwrap()
            ))
        })
        .collect();
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if i == 50256 { 3 } else { 1 }))
        .collect();
    let u = |k: &str| Value::U32(config[k].as_u64().unwrap() as u32);
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("gpt2".into())),
        ("gpt2.block_count", u("n_layer")),
        ("gpt2.context_length", u("n_positions")),
        ("gpt2.embedding_length", u("n_embd")),
        (
            "gpt2.feed_forward_length",
            Value::U32(4 * config["n_embd"].as_u64().unwrap() as u32),
        ),
        ("gpt2.attention.head_count", u("n_head")),
        ("gpt2.attention.layer_norm_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt-2".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", Value::Array(merges)),
        ("tokenizer.ggml.eos_token_id", Value::U32(50256)),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &md, &ts).unwrap();
}

#[test]
fn gpt2_gguf_matches_the_safetensors_folder_and_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny-gpt2.gguf");
    write_tiny_gpt2_gguf(&path);
    let from_gguf = load_as(&path, DType::F32);
    assert_eq!(from_gguf.origin().kind, "gguf");
    assert!(from_gguf.spec().tied_embeddings);
    let reference = read_json("tiny-gpt2/reference_outputs.json");
    for case in reference["prompts"].as_array().unwrap() {
        let ids = from_gguf.encode(case["prompt"].as_str().unwrap()).unwrap();
        assert_eq!(ids, u32s(&case["input_ids"]));
        let last = logits_alone(&from_gguf, &ids).i(ids.len() - 1).unwrap();
        let values: Vec<f32> = last.to_vec1().unwrap();
        for (id, want) in u32s(&case["top5_ids"])
            .into_iter()
            .zip(f32s(&case["top5_logits"]))
        {
            assert!((values[id as usize] - want).abs() < 1e-3, "logit of {id}");
        }
    }
}

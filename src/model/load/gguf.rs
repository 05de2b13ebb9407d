//! A GGUF file (llama.cpp's format): metadata gives the config and the tokenizer, every tensor is
//! dequantised to f32 and then cast to the requested dtype.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device};

use super::{assemble, Format, LoadOptions};
use crate::error::{Error, Result};
use crate::model::kernels;
use crate::model::packed::PackedRows;
use crate::model::{Activation, Arch, Model, ModelOrigin, ModelSpec, WeightId};

pub(super) fn load_gguf(path: &Path, source: &str, opts: &LoadOptions) -> Result<Model> {
    let bad = |msg: String| Error::file(path, msg);
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = Content::read(&mut file).map_err(|e| {
        bad(format!(
            "truncated or corrupt GGUF header: {}",
            Error::from(e)
        ))
    })?;
    let spec = spec_from_metadata(&content).map_err(bad)?;
    let tokenizer = match &opts.tokenizer {
        Some(p) => super::tokenizer::tokenizer_from_file(p)?,
        None => super::tokenizer::tokenizer_from_gguf(&content.metadata).map_err(|e| match e {
            Error::Tokenizer(msg) => bad(format!("tokenizer metadata: {msg}")),
            other => other,
        })?,
    };
    let dtype = opts.resolve_dtype(&spec).map_err(|e| bad(e.to_string()))?;
    // The blocks serve only the CPU's f32 kernels.
    let keep_blocks = dtype == DType::F32 && opts.device.is_cpu() && kernels::available();
    let mut blocks = HashMap::new();
    // GGUF stores every matrix `[out, in]`: nothing is asked transposed.
    let weights = assemble(&spec, Format::Gguf, dtype, &opts.device, |name, _| {
        if !content.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| bad(format!("tensor `{name}`: {}", Error::from(e))))?;
        if keep_blocks {
            if let Some(rows) = PackedRows::from_gguf(&q)
                .map_err(|e| bad(format!("tensor `{name}`: {}", Error::from(e))))?
            {
                blocks.insert(name.to_string(), rows);
            }
        }
        Ok(Some(q.dequantize(&Device::Cpu)?))
    })
    .map_err(|e| match e {
        Error::Invalid(msg) => bad(msg),
        other => other,
    })?;
    let origin = ModelOrigin {
        kind: "gguf",
        source: source.to_string(),
        files: vec![path.to_path_buf()],
        tokenizer_file: opts.tokenizer.clone(),
    };
    let mut model = Model::new(spec, weights, tokenizer, origin).map_err(|e| match e {
        Error::Invalid(msg) => bad(msg),
        other => other,
    })?;
    model.set_chat_template(get_str(&content.metadata, "tokenizer.chat_template").ok());
    keep_packed_rows(&mut model, blocks).map_err(|e| match e {
        Error::Invalid(msg) => bad(msg),
        other => other,
    })?;
    Ok(model)
}

/// Puts each weight's GGUF blocks beside it, in the row order the loader gave the weight, after
/// checking that they expand to the weight's first and last rows bit for bit.
fn keep_packed_rows(model: &mut Model, mut blocks: HashMap<String, PackedRows>) -> Result<()> {
    let ids: Vec<WeightId> = model.weight_ids().collect();
    for id in ids {
        let Some(rows) = super::checkpoint_name(model.spec(), id, Format::Gguf)
            .and_then(|name| blocks.remove(&name))
        else {
            continue;
        };
        let rows = match super::gguf_row_order(model.spec(), id, rows.rows())? {
            Some(order) => rows.with_rows_from(&order),
            None => rows,
        };
        let weight = model.weight(id)?;
        let last = rows.rows().saturating_sub(1);
        for r in [0, last] {
            let mut expanded = vec![0f32; rows.cols()];
            rows.dequantize_rows(r, r + 1, &mut expanded);
            let held = weight.get(r)?.to_vec1::<f32>()?;
            if expanded
                .iter()
                .zip(&held)
                .any(|(a, b)| a.to_bits() != b.to_bits())
            {
                return Err(Error::Invalid(format!(
                    "the blocks of {id} do not expand to its weights (row {r})"
                )));
            }
        }
        model.attach_packed(id, rows)?;
    }
    Ok(())
}

fn spec_from_metadata(content: &Content) -> std::result::Result<ModelSpec, String> {
    let md = &content.metadata;
    let arch_name = get_str(md, "general.architecture")?;
    let arch = match arch_name.as_str() {
        "llama" => Arch::Llama,
        "gpt2" => Arch::Gpt2,
        other => {
            return Err(format!(
                "architecture \"{other}\" is not supported (expected llama or gpt2)"
            ))
        }
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let usize_of = |k: &str| -> std::result::Result<usize, String> {
        md.get(&key(k))
            .ok_or_else(|| format!("metadata key `{}` is missing", key(k)))?
            .to_u64()
            .map(|v| v as usize)
            .map_err(|e| format!("metadata key `{}`: {}", key(k), Error::from(e)))
    };
    let f64_of =
        |k: &str| -> Option<f64> { md.get(&key(k)).and_then(|v| v.to_f32().ok()).map(f64::from) };
    let n_heads = usize_of("attention.head_count")?;
    let d_model = usize_of("embedding_length")?;
    let vocab_size = match md.get("tokenizer.ggml.tokens") {
        Some(Value::Array(tokens)) => tokens.len(),
        _ => usize_of("vocab_size")?,
    };
    let id_of = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
    let spec = ModelSpec {
        arch,
        n_layers: usize_of("block_count")?,
        d_model,
        d_mlp: usize_of("feed_forward_length")?,
        n_heads,
        n_kv_heads: usize_of("attention.head_count_kv").unwrap_or(n_heads),
        head_dim: usize_of("rope.dimension_count").unwrap_or(d_model / n_heads.max(1)),
        vocab_size,
        max_positions: usize_of("context_length")?,
        norm_eps: match arch {
            Arch::Llama => f64_of("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
            Arch::Gpt2 => f64_of("attention.layer_norm_epsilon").unwrap_or(1e-5),
        },
        rope_theta: f64_of("rope.freq_base").unwrap_or(10_000.0),
        activation: match arch {
            Arch::Llama => Activation::Silu,
            Arch::Gpt2 => Activation::GeluTanh,
        },
        tied_embeddings: !content.tensor_infos.contains_key("output.weight"),
        bos_id: id_of("tokenizer.ggml.bos_token_id"),
        eos_id: id_of("tokenizer.ggml.eos_token_id"),
        pad_id: id_of("tokenizer.ggml.padding_token_id"),
    };
    spec.validate()?;
    Ok(spec)
}

pub(super) fn get_str(md: &HashMap<String, Value>, k: &str) -> std::result::Result<String, String> {
    md.get(k)
        .ok_or_else(|| format!("metadata key `{k}` is missing"))?
        .to_string()
        .cloned()
        .map_err(|e| format!("metadata key `{k}`: {}", Error::from(e)))
}

//! LLaMA's block flavour: RMSNorm, separate Q/K/V projections with grouped key/value heads,
//! rotary positions, SwiGLU MLP. Checkpoint names for LLaMA appear only in this file.

use candle_core::{Result, Tensor};

use super::load::Format;
use super::{Model, ModelSpec, Module, Param, WeightId};

/// # Shapes
/// `h: [b, s, d]` → `q: [b, s, heads·head_dim]`, `k, v: [b, s, kv_heads·head_dim]`
pub(super) fn qkv(model: &Model, l: usize, h: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    Ok((
        model.proj(h, WeightId::layer(l, Module::AttnQ))?,
        model.proj(h, WeightId::layer(l, Module::AttnK))?,
        model.proj(h, WeightId::layer(l, Module::AttnV))?,
    ))
}

pub(super) fn required_weights(spec: &ModelSpec) -> Vec<(WeightId, Vec<usize>)> {
    let (d, m) = (spec.d_model, spec.d_mlp);
    let q = spec.n_heads * spec.head_dim;
    let kv = spec.n_kv_heads * spec.head_dim;
    let mut out = vec![
        (WeightId::global(Module::Embed), vec![spec.vocab_size, d]),
        (WeightId::global(Module::FinalNorm), vec![d]),
    ];
    if !spec.tied_embeddings {
        out.push((WeightId::global(Module::LmHead), vec![spec.vocab_size, d]));
    }
    for l in 0..spec.n_layers {
        let w = |m| WeightId::layer(l, m);
        out.extend([
            (w(Module::AttnNorm), vec![d]),
            (w(Module::AttnQ), vec![q, d]),
            (w(Module::AttnK), vec![kv, d]),
            (w(Module::AttnV), vec![kv, d]),
            (w(Module::AttnO), vec![d, q]),
            (w(Module::MlpNorm), vec![d]),
            (w(Module::MlpGate), vec![m, d]),
            (w(Module::MlpUp), vec![m, d]),
            (w(Module::MlpDown), vec![d, m]),
        ]);
    }
    out
}

/// Optional biases (`attention_bias`, `mlp_bias`) a LLaMA checkpoint may carry.
pub(super) fn optional_biases(spec: &ModelSpec) -> Vec<WeightId> {
    (0..spec.n_layers)
        .flat_map(|l| {
            [
                Module::AttnQ,
                Module::AttnK,
                Module::AttnV,
                Module::AttnO,
                Module::MlpGate,
                Module::MlpUp,
                Module::MlpDown,
            ]
            .map(|m| WeightId::layer(l, m).bias())
        })
        .collect()
}

pub(super) fn checkpoint_name(id: WeightId, format: Format) -> Option<String> {
    let suffix = match id.param {
        Param::Weight => "weight",
        Param::Bias => "bias",
    };
    let name = match (format, id.layer, id.module) {
        (Format::Hf, None, Module::Embed) => "model.embed_tokens".to_string(),
        (Format::Hf, None, Module::FinalNorm) => "model.norm".to_string(),
        (Format::Hf, None, Module::LmHead) => "lm_head".to_string(),
        (Format::Hf, Some(l), module) => {
            let local = match module {
                Module::AttnNorm => "input_layernorm",
                Module::AttnQ => "self_attn.q_proj",
                Module::AttnK => "self_attn.k_proj",
                Module::AttnV => "self_attn.v_proj",
                Module::AttnO => "self_attn.o_proj",
                Module::MlpNorm => "post_attention_layernorm",
                Module::MlpGate => "mlp.gate_proj",
                Module::MlpUp => "mlp.up_proj",
                Module::MlpDown => "mlp.down_proj",
                _ => return None,
            };
            format!("model.layers.{l}.{local}")
        }
        (Format::Gguf, None, Module::Embed) => "token_embd".to_string(),
        (Format::Gguf, None, Module::FinalNorm) => "output_norm".to_string(),
        (Format::Gguf, None, Module::LmHead) => "output".to_string(),
        (Format::Gguf, Some(l), module) => {
            let local = match module {
                Module::AttnNorm => "attn_norm",
                Module::AttnQ => "attn_q",
                Module::AttnK => "attn_k",
                Module::AttnV => "attn_v",
                Module::AttnO => "attn_output",
                Module::MlpNorm => "ffn_norm",
                Module::MlpGate => "ffn_gate",
                Module::MlpUp => "ffn_up",
                Module::MlpDown => "ffn_down",
                _ => return None,
            };
            format!("blk.{l}.{local}")
        }
        _ => return None,
    };
    Some(format!("{name}.{suffix}"))
}

/// llama.cpp's converter permutes the rows of Q and K so that rotary pairs are adjacent
/// (`rope_i`). This puts them back in the Hugging Face order, where the pairs are half a head
/// apart, so one rotary convention serves both sources.
///
/// # Shapes
/// `w: [heads·head_dim, in]` (or `[heads·head_dim]` for a bias) → same
pub(super) fn unpermute_rotary_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let head_dim = rows / heads;
    let rest: usize = dims[1..].iter().product();
    w.reshape((heads, head_dim / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The inverse of [`unpermute_rotary_rows`]: llama.cpp's row order, for writing GGUF.
pub(super) fn permute_rotary_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let head_dim = rows / heads;
    let rest: usize = dims[1..].iter().product();
    w.reshape((heads, 2, head_dim / 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// Which heads count a GGUF Q or K tensor was permuted with, if any.
pub(super) fn gguf_rotary_heads(id: WeightId, spec: &ModelSpec) -> Option<usize> {
    match id.module {
        Module::AttnQ => Some(spec.n_heads),
        Module::AttnK => Some(spec.n_kv_heads),
        _ => None,
    }
}

//! GPT-2's block flavour: learned positions, LayerNorm with biases, fused QKV, `gelu_new` MLP.
//! Checkpoint names for GPT-2 appear only in this file.

use candle_core::{DType, Device, Result, Tensor};

use super::load::Format;
use super::{Model, ModelSpec, Module, Param, WeightId};

/// Adds the learned position embeddings for positions `offsets[r]..offsets[r] + s` of row `r`.
///
/// # Shapes
/// `xs: [b, s, d]`, `table: [positions, d]` → `[b, s, d]`
pub(super) fn add_positions(xs: &Tensor, table: &Tensor, offsets: &[usize]) -> Result<Tensor> {
    let (b, s, d) = xs.dims3()?;
    match offsets {
        [first, rest @ ..] if rest.iter().all(|o| o == first) => {
            xs.broadcast_add(&table.narrow(0, *first, s)?)
        }
        _ => {
            let positions: Vec<u32> = offsets
                .iter()
                .flat_map(|&o| (o..o + s).map(|p| p as u32))
                .collect();
            let positions = Tensor::from_vec(positions, b * s, xs.device())?;
            xs.add(&table.index_select(&positions, 0)?.reshape((b, s, d))?)
        }
    }
}

/// Splits the fused projection into queries, keys and values.
///
/// # Shapes
/// `h: [b, s, d]` → three `[b, s, d]`
pub(super) fn qkv(model: &Model, l: usize, h: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let d = model.spec.d_model;
    let fused = model.proj(h, WeightId::layer(l, Module::AttnQkv))?;
    Ok((
        fused.narrow(2, 0, d)?,
        fused.narrow(2, d, d)?,
        fused.narrow(2, 2 * d, d)?,
    ))
}

pub(super) fn required_weights(spec: &ModelSpec) -> Vec<(WeightId, Vec<usize>)> {
    let (d, m) = (spec.d_model, spec.d_mlp);
    let mut out = vec![
        (WeightId::global(Module::Embed), vec![spec.vocab_size, d]),
        (
            WeightId::global(Module::PosEmbed),
            vec![spec.max_positions, d],
        ),
        (WeightId::global(Module::FinalNorm), vec![d]),
        (WeightId::global(Module::FinalNorm).bias(), vec![d]),
    ];
    if !spec.tied_embeddings {
        out.push((WeightId::global(Module::LmHead), vec![spec.vocab_size, d]));
    }
    for l in 0..spec.n_layers {
        let w = |m| WeightId::layer(l, m);
        out.extend([
            (w(Module::AttnNorm), vec![d]),
            (w(Module::AttnNorm).bias(), vec![d]),
            (w(Module::AttnQkv), vec![3 * d, d]),
            (w(Module::AttnQkv).bias(), vec![3 * d]),
            (w(Module::AttnO), vec![d, d]),
            (w(Module::AttnO).bias(), vec![d]),
            (w(Module::MlpNorm), vec![d]),
            (w(Module::MlpNorm).bias(), vec![d]),
            (w(Module::MlpUp), vec![m, d]),
            (w(Module::MlpUp).bias(), vec![m]),
            (w(Module::MlpDown), vec![d, m]),
            (w(Module::MlpDown).bias(), vec![d]),
        ]);
    }
    out
}

/// The checkpoint name of a weight, without the optional `transformer.` prefix of Hugging Face files.
pub(super) fn checkpoint_name(id: WeightId, format: Format) -> Option<String> {
    let suffix = match id.param {
        Param::Weight => "weight",
        Param::Bias => "bias",
    };
    let name = match (format, id.layer, id.module) {
        (Format::Hf, None, Module::Embed) => "wte".to_string(),
        (Format::Hf, None, Module::PosEmbed) => "wpe".to_string(),
        (Format::Hf, None, Module::FinalNorm) => "ln_f".to_string(),
        (Format::Hf, None, Module::LmHead) => "lm_head".to_string(),
        (Format::Hf, Some(l), module) => {
            let local = match module {
                Module::AttnNorm => "ln_1",
                Module::AttnQkv => "attn.c_attn",
                Module::AttnO => "attn.c_proj",
                Module::MlpNorm => "ln_2",
                Module::MlpUp => "mlp.c_fc",
                Module::MlpDown => "mlp.c_proj",
                _ => return None,
            };
            format!("h.{l}.{local}")
        }
        (Format::Gguf, None, Module::Embed) => "token_embd".to_string(),
        (Format::Gguf, None, Module::PosEmbed) => "position_embd".to_string(),
        (Format::Gguf, None, Module::FinalNorm) => "output_norm".to_string(),
        (Format::Gguf, None, Module::LmHead) => "output".to_string(),
        (Format::Gguf, Some(l), module) => {
            let local = match module {
                Module::AttnNorm => "attn_norm",
                Module::AttnQkv => "attn_qkv",
                Module::AttnO => "attn_output",
                Module::MlpNorm => "ffn_norm",
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

/// Hugging Face GPT-2 stores its `Conv1D` matrices `[in, out]`.
pub(super) fn stored_transposed(id: WeightId, format: Format) -> bool {
    format == Format::Hf && is_conv1d(id)
}

fn is_conv1d(id: WeightId) -> bool {
    id.param == Param::Weight
        && id.layer.is_some()
        && matches!(
            id.module,
            Module::AttnQkv | Module::AttnO | Module::MlpUp | Module::MlpDown
        )
}

/// Whether the model holds a `Conv1D` matrix as the transposed view of an `[in, out]` matrix,
/// whatever file it came from: in f32 on the CPU, where the products read either layout and a
/// Hugging Face checkpoint is then loaded without a transposing copy (half of GPT2-XL's load
/// time). One layout for every source, so the same model computes the same bits however it was
/// loaded (an exported model reloads bit for bit). Elsewhere the matrices are held `[out, in]`.
pub(crate) fn held_as_input_major(id: WeightId, dtype: DType, device: &Device) -> bool {
    is_conv1d(id) && dtype == DType::F32 && device.is_cpu()
}

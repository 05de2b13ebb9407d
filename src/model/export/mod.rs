//! Writing a model, edits included, as a Hugging Face folder that transformers and kedit load:
//! safetensors (sharded past a size, with the index the Hub publishes), `config.json` and the
//! tokenizer. Overlays are folded into the weights where the architecture can hold them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

mod gguf;

pub use gguf::GgufBlocks;

use super::load::Format;
use super::{Activation, Arch, Model, Module, WeightForm, WeightId};
use crate::error::{Error, Result};

/// What [`export_hf`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Exported {
    /// The folder (or GGUF file) written.
    pub path: PathBuf,
    pub files: Vec<String>,
    pub tensors: usize,
    pub bytes: usize,
    /// Neurons appended to every MLP to hold calibration neurons (0: the MLPs kept their width).
    pub added_mlp_neurons: usize,
}

/// The files beside a Hugging Face checkpoint that describe its tokenizer and generation, copied
/// as they are when the model came from such a folder.
const TOKENIZER_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
];

/// The files of [`TOKENIZER_FILES`] that hold the source's own vocabulary: left out when the model
/// was loaded with another `tokenizer.json`, which the loaders would otherwise be offered beside it.
const VOCABULARY_FILES: [&str; 3] = ["vocab.json", "merges.txt", "tokenizer.model"];

/// An export is written where nothing is: `what` (folder, file) names what it would have been.
pub fn refuse_existing(out: &Path, what: &str) -> Result<()> {
    if out.exists() {
        return Err(Error::file(
            out,
            format!("already exists; kedit export writes a new {what} and never overwrites one"),
        ));
    }
    Ok(())
}

/// Writes `model` as it is now (weights, overlays folded in) to the new folder `out` in `dtype`,
/// with safetensors files of at most `max_shard_bytes` each (one tensor may exceed it alone).
/// `provenance` is written beside as `kedit-export.json`. The folder appears whole or not at all.
///
/// # Errors
/// `out` exists; an overlay no weights can express (GRACE's codebook) or whose activation is not
/// the MLP's; an I/O error, naming the file.
pub fn export_hf(
    model: &Model,
    out: &Path,
    dtype: DType,
    max_shard_bytes: usize,
    provenance: &serde_json::Value,
) -> Result<Exported> {
    refuse_existing(out, "folder")?;
    let (weights, added) = folded_weights(model)?;
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::file(out, "not a folder name"))?;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let partial = parent.join(format!(".{name}.partial"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    }
    std::fs::create_dir(&partial).map_err(|e| Error::io(&partial, e))?;

    let fill = || -> Result<Exported> {
        let mut exported = write_shards(model, &weights, dtype, max_shard_bytes, &partial)?;
        exported.added_mlp_neurons = added;
        let config = config_json(model, dtype, added)?;
        let config_path = partial.join("config.json");
        crate::files::write_atomically(&config_path, pretty(&config)?.as_bytes())?;
        exported.files.push("config.json".into());
        exported.files.extend(write_tokenizer(model, &partial)?);
        crate::files::write_atomically(
            &partial.join("kedit-export.json"),
            pretty(provenance)?.as_bytes(),
        )?;
        exported.files.push("kedit-export.json".into());
        // Checked again: a folder made at `out` during the write (even an empty one, which a
        // rename would replace) is left alone.
        if out.exists() {
            return Err(Error::file(
                out,
                "appeared while the export was being written; kedit export never overwrites a folder",
            ));
        }
        std::fs::rename(&partial, out).map_err(|e| Error::io(out, e))?;
        Ok(exported)
    };
    // A failed write (a full disk, say) leaves nothing behind.
    let mut exported = fill().inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&partial);
    })?;
    exported.path = out.to_path_buf();
    Ok(exported)
}

/// Writes `model` as it is now (weights, overlays folded in) to the new GGUF file `out` in
/// `dtype` (f32, f16 or bf16; matrices in quantised `blocks` if given), with the metadata of the GGUF it was loaded from (or, from a
/// folder, llama.cpp's metadata made from its configuration and tokenizer) and `provenance` under
/// `kedit.export`. The file appears whole or not at all.
///
/// # Errors
/// As [`export_hf`]; a folder's tokenizer that is not byte-level BPE (LLaMA-2's SentencePiece
/// kind), or a GGUF source loaded with another tokenizer.
pub fn export_gguf(
    model: &Model,
    out: &Path,
    dtype: DType,
    blocks: Option<GgufBlocks>,
    provenance: &serde_json::Value,
) -> Result<Exported> {
    refuse_existing(out, "file")?;
    let (weights, added) = folded_weights(model)?;
    let bytes = gguf::write_gguf(model, &weights, added, dtype, blocks, out, provenance)?;
    Ok(Exported {
        path: out.to_path_buf(),
        files: vec![out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()],
        tensors: weights.len(),
        bytes,
        added_mlp_neurons: added,
    })
}

fn pretty(value: &serde_json::Value) -> Result<String> {
    serde_json::to_string_pretty(value)
        .map(|s| s + "\n")
        .map_err(|e| Error::Invalid(format!("cannot serialise JSON: {e}")))
}

/// Every weight with the low-rank changes and overlays added in, and how many neurons each MLP
/// gained.
fn folded_weights(model: &Model) -> Result<(BTreeMap<WeightId, Tensor>, usize)> {
    let mut weights: BTreeMap<WeightId, Tensor> = model
        .weight_ids()
        .map(|id| Ok((id, model.weight(id)?)))
        .collect::<Result<_>>()?;
    let add = |weights: &mut BTreeMap<WeightId, Tensor>, id: WeightId, delta: &Tensor| {
        let w = weights
            .get(&id)
            .ok_or_else(|| Error::UnknownWeight(id.to_string()))?;
        let sum = (w.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?.to_device(w.device())?)?;
        weights.insert(id, sum.to_dtype(w.dtype())?);
        Ok::<_, Error>(())
    };
    for (id, change) in model.low_rank_changes() {
        add(&mut weights, id, &change.dense()?)?;
    }
    let mut neurons: BTreeMap<usize, Vec<NeuronRows>> = BTreeMap::new();
    for (site, overlay) in model.overlays() {
        let form = overlay.as_weights(site).map_err(|why| Error::Unsupported {
            what: "exporting this edited model".into(),
            why,
        })?;
        match form {
            WeightForm::Added { id, delta } => add(&mut weights, id, &delta)?,
            WeightForm::Neurons {
                layer,
                activation,
                up,
                gate,
                down,
            } => {
                if activation != model.spec().activation {
                    return Err(Error::Unsupported {
                        what: "exporting this edited model".into(),
                        why: format!(
                            "the calibration neurons at layer {layer} use {activation:?}, the model's MLP {:?}",
                            model.spec().activation
                        ),
                    });
                }
                neurons.entry(layer).or_default().push(NeuronRows {
                    up,
                    gate,
                    down_t: down.t()?,
                });
            }
        }
    }
    let added = neurons
        .values()
        .map(|parts| parts.iter().map(|p| p.up.dims()[0]).sum::<usize>())
        .max()
        .unwrap_or(0);
    if added > 0 {
        for layer in 0..model.spec().n_layers {
            widen_mlp(
                model,
                &mut weights,
                layer,
                neurons.get(&layer).map_or(&[][..], Vec::as_slice),
                added,
            )?;
        }
    }
    Ok((weights, added))
}

/// Calibration neurons as rows: of the up projection, of LLaMA's gate projection, and of the
/// down projection's transpose.
struct NeuronRows {
    up: Tensor,
    gate: Option<Tensor>,
    down_t: Tensor,
}

/// Appends `parts`' neurons to layer `layer`'s MLP, then zero neurons up to `added`: a neuron
/// whose input rows and output column are zero adds exactly zero (GELU(0) = SiLU(0)·0 = 0), so
/// every layer keeps the one `intermediate_size` a config can state.
fn widen_mlp(
    model: &Model,
    weights: &mut BTreeMap<WeightId, Tensor>,
    layer: usize,
    parts: &[NeuronRows],
    added: usize,
) -> Result<()> {
    let own: usize = parts.iter().map(|p| p.up.dims()[0]).sum();
    let padding = added - own;
    let append = |w: &Tensor, rows: Vec<Tensor>| -> Result<Tensor> {
        let mut blocks = vec![w.clone()];
        for r in rows {
            blocks.push(r.to_dtype(w.dtype())?.to_device(w.device())?);
        }
        if padding > 0 {
            blocks.push(Tensor::zeros((padding, w.dim(1)?), w.dtype(), w.device())?);
        }
        Ok(Tensor::cat(&blocks, 0)?)
    };
    let current = |weights: &BTreeMap<WeightId, Tensor>, id: WeightId| {
        weights
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::UnknownWeight(id.to_string()))
    };
    let up_id = WeightId::layer(layer, Module::MlpUp);
    let up = append(
        &current(weights, up_id)?,
        parts.iter().map(|p| p.up.clone()).collect(),
    )?;
    weights.insert(up_id, up);
    if model.spec().arch == Arch::Llama {
        let gate_id = WeightId::layer(layer, Module::MlpGate);
        let rows = parts
            .iter()
            .map(|p| {
                p.gate.clone().ok_or_else(|| {
                    Error::Invalid(format!(
                        "the calibration neurons at layer {layer} have no gate projection, the MLP has"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let gate = append(&current(weights, gate_id)?, rows)?;
        weights.insert(gate_id, gate);
    }
    // The down projection is `[d_model, d_mlp]`: its new neurons are columns.
    let down_id = WeightId::layer(layer, Module::MlpDown);
    let down_t = append(
        &current(weights, down_id)?.t()?,
        parts.iter().map(|p| p.down_t.clone()).collect(),
    )?;
    weights.insert(down_id, down_t.t()?.contiguous()?);
    let bias_id = WeightId::layer(layer, Module::MlpUp).bias();
    if let Some(bias) = weights.get(&bias_id) {
        let zeros = Tensor::zeros(added, bias.dtype(), bias.device())?;
        let widened = Tensor::cat(&[bias.clone(), zeros], 0)?;
        weights.insert(bias_id, widened);
    }
    Ok(())
}

/// Writes the weights under their Hugging Face names and layouts, in shards of at most
/// `max_shard_bytes`, converting one shard at a time.
fn write_shards(
    model: &Model,
    weights: &BTreeMap<WeightId, Tensor>,
    dtype: DType,
    max_shard_bytes: usize,
    folder: &Path,
) -> Result<Exported> {
    let arch = model.spec().arch;
    let mut shards: Vec<Vec<(String, WeightId)>> = vec![Vec::new()];
    let mut shard_bytes = 0usize;
    let mut total = 0usize;
    for (&id, w) in weights {
        let name = model
            .checkpoint_name(id)
            .ok_or_else(|| Error::UnknownWeight(id.to_string()))?;
        let bytes = w.elem_count() * dtype.size_in_bytes();
        let current = shards
            .last_mut()
            .ok_or_else(|| Error::Invalid("no shard".into()))?;
        if !current.is_empty() && shard_bytes + bytes > max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += bytes;
        total += bytes;
        shards
            .last_mut()
            .ok_or_else(|| Error::Invalid("no shard".into()))?
            .push((name, id));
    }
    let count = shards.len();
    let file_name = |i: usize| {
        if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        }
    };
    let mut weight_map = serde_json::Map::new();
    let mut files = Vec::new();
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    for (i, shard) in shards.iter().enumerate() {
        let file = file_name(i);
        let mut tensors = Vec::with_capacity(shard.len());
        for (name, id) in shard {
            let mut w = weights[id].to_device(&candle_core::Device::Cpu)?;
            if arch == Arch::Gpt2 && super::gpt2::stored_transposed(*id, Format::Hf) {
                w = w.t()?;
            }
            tensors.push((name.clone(), w.to_dtype(dtype)?.contiguous()?));
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
        }
        crate::files::write_safetensors(&folder.join(&file), &tensors, metadata.clone())?;
        files.push(file);
    }
    if count > 1 {
        let index = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        let path = folder.join("model.safetensors.index.json");
        crate::files::write_atomically(&path, pretty(&index)?.as_bytes())?;
        files.push("model.safetensors.index.json".into());
    }
    Ok(Exported {
        path: folder.to_path_buf(),
        files,
        tensors: weights.len(),
        bytes: total,
        added_mlp_neurons: 0,
    })
}

fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// The source folder's `config.json` with the dtype and MLP width brought up to date, or, for a
/// GGUF source, one written from the model's spec with the field names transformers reads.
fn config_json(model: &Model, dtype: DType, added: usize) -> Result<serde_json::Value> {
    let spec = model.spec();
    let d_mlp = spec.d_mlp + added;
    let mut config = match source_folder(model) {
        Some(folder) => {
            let path = folder.join("config.json");
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?
        }
        None => config_from_spec(model),
    };
    let object = config
        .as_object_mut()
        .ok_or_else(|| Error::Invalid("config.json is not an object".into()))?;
    object.insert("torch_dtype".into(), torch_dtype_name(dtype).into());
    let width_field = match spec.arch {
        Arch::Gpt2 => "n_inner",
        Arch::Llama => "intermediate_size",
    };
    if added > 0 || spec.arch == Arch::Llama {
        object.insert(width_field.into(), d_mlp.into());
    }
    Ok(config)
}

fn config_from_spec(model: &Model) -> serde_json::Value {
    let s = model.spec();
    let mut config = match s.arch {
        Arch::Gpt2 => serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": s.d_model,
            "n_head": s.n_heads,
            "n_layer": s.n_layers,
            "n_positions": s.max_positions,
            "n_ctx": s.max_positions,
            "n_inner": s.d_mlp,
            "layer_norm_epsilon": s.norm_eps,
            "vocab_size": s.vocab_size,
            "activation_function": match s.activation {
                Activation::GeluErf => "gelu",
                _ => "gelu_new",
            },
            "tie_word_embeddings": s.tied_embeddings,
        }),
        Arch::Llama => serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": s.d_model,
            "intermediate_size": s.d_mlp,
            "num_hidden_layers": s.n_layers,
            "num_attention_heads": s.n_heads,
            "num_key_value_heads": s.n_kv_heads,
            "head_dim": s.head_dim,
            "max_position_embeddings": s.max_positions,
            "rms_norm_eps": s.norm_eps,
            "rope_theta": s.rope_theta,
            "hidden_act": "silu",
            "vocab_size": s.vocab_size,
            "tie_word_embeddings": s.tied_embeddings,
            "attention_bias": model.weight(WeightId::layer(0, Module::AttnQ).bias()).is_ok(),
            "mlp_bias": false,
        }),
    };
    if let Some(object) = config.as_object_mut() {
        for (field, id) in [
            ("bos_token_id", s.bos_id),
            ("eos_token_id", s.eos_id),
            ("pad_token_id", s.pad_id),
        ] {
            if let Some(id) = id {
                object.insert(field.into(), id.into());
            }
        }
    }
    config
}

/// The folder a Hugging Face model was read from (`None` for GGUF).
fn source_folder(model: &Model) -> Option<PathBuf> {
    if model.origin().kind == "gguf" {
        return None;
    }
    model
        .origin()
        .files
        .first()?
        .parent()
        .map(Path::to_path_buf)
}

/// Copies the source folder's tokenizer files (with the `--tokenizer` file the model was loaded
/// with as `tokenizer.json`, and none of the source's own vocabularies), or writes the tokenizer
/// kedit rebuilt from GGUF metadata as `tokenizer.json` with a `tokenizer_config.json` that names
/// its special tokens.
fn write_tokenizer(model: &Model, folder: &Path) -> Result<Vec<String>> {
    let mut written = Vec::new();
    if let Some(source) = source_folder(model) {
        let given = model.origin().tokenizer_file.as_deref();
        for name in TOKENIZER_FILES {
            let from = match given {
                Some(file) if name == "tokenizer.json" => file.to_path_buf(),
                Some(_) if VOCABULARY_FILES.contains(&name) => continue,
                _ => source.join(name),
            };
            if from.is_file() {
                let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
                crate::files::write_atomically(&folder.join(name), &bytes)?;
                written.push(name.to_string());
            }
        }
        if !written.is_empty() {
            return Ok(written);
        }
    }
    let tokenizer = model
        .tokenizer()
        .to_string(true)
        .map_err(|e| Error::Tokenizer(format!("cannot serialise the tokenizer: {e}")))?;
    crate::files::write_atomically(&folder.join("tokenizer.json"), tokenizer.as_bytes())?;
    let token = |id: Option<u32>| id.and_then(|id| model.tokenizer().id_to_token(id));
    let mut config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model.spec().max_positions,
        "add_bos_token": false,
    });
    if let Some(object) = config.as_object_mut() {
        for (field, id) in [
            ("bos_token", model.spec().bos_id),
            ("eos_token", model.spec().eos_id),
            ("pad_token", model.spec().pad_id),
        ] {
            if let Some(t) = token(id) {
                object.insert(field.into(), t.into());
            }
        }
        if let Some(template) = model.chat_template() {
            object.insert("chat_template".into(), template.into());
        }
    }
    crate::files::write_atomically(
        &folder.join("tokenizer_config.json"),
        pretty(&config)?.as_bytes(),
    )?;
    Ok(vec![
        "tokenizer.json".into(),
        "tokenizer_config.json".into(),
    ])
}

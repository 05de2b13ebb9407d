//! A Hugging Face model folder: `config.json`, `tokenizer.json`, and `model.safetensors` or a
//! sharded `model.safetensors.index.json`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::safetensors::{Load, SliceSafetensors};
use candle_core::{DType, Device};

use super::{assemble, Format, LoadOptions};
use crate::error::{Error, Result};
use crate::model::{Model, ModelOrigin, ModelSpec};

pub(super) fn load_folder(
    folder: &Path,
    source: &str,
    kind: &'static str,
    opts: &LoadOptions,
) -> Result<Model> {
    let config_path = folder.join("config.json");
    let json = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let spec = ModelSpec::from_hf_config(&json, &config_path)?;
    let tokenizer_path = opts
        .tokenizer
        .clone()
        .unwrap_or_else(|| folder.join("tokenizer.json"));
    let tokenizer = super::tokenizer::tokenizer_from_file(&tokenizer_path)?;

    let files = safetensors_files(folder)?;
    let maps = files
        .iter()
        .map(|p| map_file(p))
        .collect::<Result<Vec<_>>>()?;
    let views = maps
        .iter()
        .zip(&files)
        .map(|(m, p)| {
            SliceSafetensors::new(m).map_err(|e| {
                Error::file(
                    p,
                    format!("truncated or corrupt safetensors file: {}", Error::from(e)),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let dtype = opts
        .resolve_dtype(&spec)
        .map_err(|e| Error::file(folder, e.to_string()))?;
    let weights = assemble(&spec, Format::Hf, dtype, &opts.device, |name, layout| {
        // GPT-2 checkpoints name their tensors with or without the `transformer.` prefix.
        for candidate in [name.to_string(), format!("transformer.{name}")] {
            for ((view, path), map) in views.iter().zip(&files).zip(&maps) {
                if let Ok(t) = view.get(&candidate) {
                    read_ahead(map, t.data());
                    let unreadable = |e: Error| {
                        Error::file(path, format!("tensor `{candidate}` cannot be read: {e}"))
                    };
                    // An `[in, out]` matrix the model holds as its transposed view is read as
                    // it lies, in the held dtype, and viewed transposed: transposing GPT2-XL's
                    // Conv1D weights was half of its load time.
                    let as_view = layout.stored_input_major && layout.held_input_major;
                    let transpose = layout.stored_input_major && !as_view;
                    let tensor = match transposed_view(&t, transpose) {
                        Some(read) => read.map_err(unreadable)?,
                        None => t.load(&Device::Cpu).map_err(|e| unreadable(e.into()))?,
                    };
                    let tensor = if as_view && tensor.rank() == 2 {
                        tensor.to_dtype(dtype)?.t()?
                    } else {
                        to_float(tensor)?
                    };
                    release_pages(map, t.data());
                    return Ok(Some(tensor));
                }
            }
        }
        Ok(None)
    })
    .map_err(|e| match e {
        Error::Invalid(msg) => Error::file(folder, msg),
        other => other,
    })?;
    let origin = ModelOrigin {
        kind,
        source: source.to_string(),
        files,
        tokenizer_file: opts.tokenizer.clone(),
    };
    let mut model = Model::new(spec, weights, tokenizer, origin).map_err(|e| match e {
        Error::Invalid(msg) => Error::file(folder, msg),
        other => other,
    })?;
    model.set_chat_template(chat_template(&folder.join("tokenizer_config.json"))?);
    Ok(model)
}

/// A 2-D float tensor stored `[in, out]`, read straight into its `[out, in]` transpose: one
/// buffer instead of a copy and then a transposed copy (GPT2-XL: 4 of every layer's 6 matrices).
/// `None` when no transpose is wanted or the layout is not one this reads (the caller loads it
/// as it is).
fn transposed_view(
    view: &safetensors::tensor::TensorView<'_>,
    transpose: bool,
) -> Option<Result<candle_core::Tensor>> {
    use safetensors::Dtype as St;
    let &[rows, cols] = view.shape() else {
        return None;
    };
    if !transpose {
        return None;
    }
    let data = view.data();
    if data.len() * 8 != rows * cols * view.dtype().bitsize() {
        return Some(Err(Error::Invalid(format!(
            "{} bytes for a {rows}x{cols} {:?} tensor",
            data.len(),
            view.dtype()
        ))));
    }
    let word = |k: usize, n: usize| &data[k * n..k * n + n];
    let shape = (cols, rows);
    let built = match view.dtype() {
        St::F32 => candle_core::Tensor::from_vec(
            super::transposed(rows, cols, |k| {
                f32::from_le_bytes(word(k, 4).try_into().unwrap_or_default())
            }),
            shape,
            &Device::Cpu,
        ),
        St::F16 => candle_core::Tensor::from_vec(
            super::transposed(rows, cols, |k| {
                half::f16::from_le_bytes(word(k, 2).try_into().unwrap_or_default())
            }),
            shape,
            &Device::Cpu,
        ),
        St::BF16 => candle_core::Tensor::from_vec(
            super::transposed(rows, cols, |k| {
                half::bf16::from_le_bytes(word(k, 2).try_into().unwrap_or_default())
            }),
            shape,
            &Device::Cpu,
        ),
        _ => return None,
    };
    Some(built.map_err(Error::from))
}

fn to_float(t: candle_core::Tensor) -> Result<candle_core::Tensor> {
    Ok(match t.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => t,
        _ => t.to_dtype(DType::F32)?,
    })
}

/// The weight files of a folder: the shards its index names, or the single `model.safetensors`.
fn safetensors_files(folder: &Path) -> Result<Vec<PathBuf>> {
    let index = folder.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let parsed: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&index, format!("invalid JSON: {e}")))?;
        let map: BTreeMap<String, String> = parsed
            .get("weight_map")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| {
                Error::file(
                    &index,
                    format!("\"weight_map\" is not a name → file map: {e}"),
                )
            })?
            .ok_or_else(|| Error::file(&index, "field \"weight_map\" is missing"))?;
        let shards: BTreeSet<String> = map.into_values().collect();
        return shards
            .into_iter()
            .map(|s| {
                let p = folder.join(&s);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(Error::file(
                        &index,
                        format!("names shard `{s}`, which does not exist"),
                    ))
                }
            })
            .collect();
    }
    let single = folder.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::file(
        folder,
        "no model.safetensors or model.safetensors.index.json in this folder",
    ))
}

/// Drops this process's pages of `bytes`, a slice of `map` already copied out, so that loading
/// holds the copy and not the mapped file as well: without it the peak RSS of loading an f32
/// folder was 2.0× its weights (SmolLM2: 1,080 MB for 538 MB), which for a 7B model in bf16 is
/// more than this 24 GiB machine has.
fn release_pages(map: &memmap2::Mmap, bytes: &[u8]) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let from = bytes.as_ptr() as usize - map.as_ptr() as usize;
        let start = from.next_multiple_of(page);
        let end = (from + bytes.len()) / page * page;
        if end > start {
            // SAFETY: the range lies inside this read-only map and nothing reads it again (a
            // read would fault the same bytes back in from the file). Failure only keeps pages.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

/// Asks the kernel to read `bytes`, a slice of `map`, in one sequential pass before they are
/// copied out: from a cold page cache, faulting them in page by page (and column by column for a
/// transposed weight, which defeats readahead) made loading GPT2-XL 2.4–2.7× a `cat` of its files.
fn read_ahead(map: &memmap2::Mmap, bytes: &[u8]) {
    let from = bytes.as_ptr() as usize - map.as_ptr() as usize;
    // Failure only leaves the pages to be faulted in as before.
    let _ = map.advise_range(memmap2::Advice::WillNeed, from, bytes.len());
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and lives only while the weights are copied out of it; a
    // checkpoint changed on disk during that time gives wrong numbers, not memory unsafety in our code.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// The chat template of `tokenizer_config.json`: a string, or a list of named templates of which
/// `default` is the one `apply_chat_template` uses. No file or no template is not an error.
fn chat_template(path: &Path) -> Result<Option<String>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(None);
    };
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
    Ok(match config.get("chat_template") {
        Some(serde_json::Value::String(t)) => Some(t.clone()),
        Some(serde_json::Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    })
}

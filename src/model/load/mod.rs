//! Model sources: a Hugging Face folder (single or sharded safetensors), a GGUF file, or a Hub id
//! resolved through the Hugging Face cache.

mod gguf;
mod hf;
mod hub;
mod tokenizer;
pub mod torch_file;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::Model;
use crate::error::{Error, Result};

pub use hub::{resolve_hub, HubOptions};
pub use tokenizer::{tokenizer_from_gguf, tokenizer_to_gguf};

/// Where `scripts/fetch-model.sh` keeps the SmolLM2-135M-Instruct GGUF (the model tests and
/// benchmarks run on), given the variables `var` looks up (tests and benches pass the
/// environment): `$KEDIT_SMOLLM2_GGUF`, else `SmolLM2-135M-Instruct.Q4_1.gguf` in `$KEDIT_MODELS`
/// (default `~/.cache/kedit/models`). The file may not exist yet.
pub fn fetched_smollm2(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    if let Some(p) = var("KEDIT_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    let dir = var("KEDIT_MODELS").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(var("HOME").unwrap_or_default()).join(".cache/kedit/models")
    });
    dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Which naming scheme a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Hf,
    Gguf,
}

/// The dtype to hold the weights in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    /// f32 when the f32 weights take at most half the available memory, else bf16.
    #[default]
    Auto,
    Exact(DType),
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DTypeChoice,
    /// A `tokenizer.json` to use instead of the one the source provides.
    pub tokenizer: Option<PathBuf>,
    /// Where Hub ids are looked for; `None` refuses them.
    pub hub: Option<HubOptions>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DTypeChoice::Auto,
            tokenizer: None,
            hub: None,
        }
    }
}

impl LoadOptions {
    /// The dtype to hold the weights in, after checking that they fit in the memory available
    /// now (on the CPU; a GPU's free memory is not visible through candle).
    pub(crate) fn resolve_dtype(&self, spec: &super::ModelSpec) -> Result<DType> {
        let dtype = match self.dtype {
            DTypeChoice::Exact(d) => d,
            DTypeChoice::Auto if self.device.is_cpu() => spec.auto_dtype(available_memory()),
            // 8 GiB of f32 weights is a safe bound for a GPU whose free memory is unknown.
            DTypeChoice::Auto => spec.auto_dtype(Some(16 << 30)),
        };
        if let (true, Some(available)) = (self.device.is_cpu(), available_memory()) {
            spec.check_fits(dtype, available)?;
        }
        Ok(dtype)
    }
}

/// Loads a model from a path (folder or `.gguf` file) or a Hub id such as `openai-community/gpt2`
/// (optionally `id@revision`).
pub fn load(source: &str, opts: &LoadOptions) -> Result<Model> {
    let path = Path::new(source);
    if path.is_dir() {
        return hf::load_folder(path, source, "hf-folder", opts);
    }
    if path.is_file() {
        return if is_gguf(path)? {
            gguf::load_gguf(path, source, opts)
        } else {
            Err(Error::file(
                path,
                "not a GGUF file (bad magic) and not a model folder; give a Hugging Face folder, a .gguf file or a Hub id",
            ))
        };
    }
    if looks_like_hub_id(source) {
        let hub = opts.hub.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "{source} looks like a Hub id, but no Hugging Face cache is configured to find it in"
            ))
        })?;
        let folder = resolve_hub(source, hub)?;
        return hf::load_folder(&folder, source, "hub", opts);
    }
    Err(Error::file(
        path,
        "no such file or folder, and not a Hub id of the form owner/name",
    ))
}

fn is_gguf(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    Ok(f.read_exact(&mut magic).is_ok() && &magic == b"GGUF")
}

fn looks_like_hub_id(s: &str) -> bool {
    let id = s.split('@').next().unwrap_or(s);
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// `MemAvailable` from /proc/meminfo, in bytes.
pub(crate) fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// How a checkpoint stores a matrix and how the model will hold it, for a reader that can give
/// the held layout straight away (a Hugging Face GPT-2 Conv1D weight in f32 on the CPU: stored
/// `[in, out]` and held as that matrix's transposed view, no copy).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    /// The checkpoint stores the matrix `[in, out]` (GPT-2's Conv1D weights).
    pub stored_input_major: bool,
    /// The model holds it as the transposed view of an `[in, out]` matrix
    /// (`gpt2::held_as_input_major`).
    pub held_input_major: bool,
}

/// Reads every weight the architecture needs (plus the optional ones present) through `fetch`,
/// which returns a checkpoint tensor by name in `[out, in]` shape, as a copy or (when its
/// [`Layout`] says the model holds it so) as a view, and brings each into the requested dtype and
/// device and the layout the model holds it in.
pub(crate) fn assemble(
    spec: &super::ModelSpec,
    format: Format,
    dtype: DType,
    device: &Device,
    mut fetch: impl FnMut(&str, Layout) -> Result<Option<candle_core::Tensor>>,
) -> Result<std::collections::BTreeMap<super::WeightId, candle_core::Tensor>> {
    use super::{gpt2, llama, Arch};
    let required = super::required_weights(spec);
    let optional = match spec.arch {
        Arch::Gpt2 => Vec::new(),
        Arch::Llama => llama::optional_biases(spec),
    };
    let wanted = required
        .iter()
        .map(|(id, _)| (*id, true))
        .chain(optional.into_iter().map(|id| (id, false)));
    let mut weights = std::collections::BTreeMap::new();
    for (id, is_required) in wanted {
        let name = checkpoint_name(spec, id, format)
            .ok_or_else(|| Error::UnknownWeight(id.to_string()))?;
        let gpt2 = spec.arch == Arch::Gpt2;
        let layout = Layout {
            stored_input_major: gpt2 && gpt2::stored_transposed(id, format),
            held_input_major: gpt2 && gpt2::held_as_input_major(id, dtype, device),
        };
        let Some(mut w) = fetch(&name, layout)? else {
            if is_required {
                return Err(Error::Invalid(format!(
                    "checkpoint has no tensor `{name}` ({id})"
                )));
            }
            continue;
        };
        if spec.arch == Arch::Llama && format == Format::Gguf {
            if let Some(heads) = llama::gguf_rotary_heads(id, spec) {
                w = llama::unpermute_rotary_rows(&w, heads)?;
            }
        }
        let mut w = w.to_dtype(dtype)?.to_device(device)?;
        if gpt2 && w.rank() == 2 {
            let input_major = !w.is_contiguous() && w.t()?.is_contiguous();
            if layout.held_input_major != input_major {
                w = if input_major {
                    w.contiguous()?
                } else {
                    w.t()?.contiguous()?.t()?
                };
            }
        }
        weights.insert(id, w);
    }
    Ok(weights)
}

/// A weight's tensor name in a GGUF file (`blk.5.ffn_down.weight`).
pub(crate) fn gguf_name(spec: &super::ModelSpec, id: super::WeightId) -> Option<String> {
    checkpoint_name(spec, id, Format::Gguf)
}

/// `[rows, cols]` elements, row-major, that `read(k)` gives by index, as their transpose
/// `[cols, rows]`: written in blocks (a plain strided copy misses the cache on every element) over
/// the kernels' threads, and into the one buffer that becomes the weight.
pub(crate) fn transposed<T: Copy + Default + Send + Sync>(
    rows: usize,
    cols: usize,
    read: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    const BLOCK: usize = 64;
    let mut out = vec![T::default(); rows * cols];
    if rows == 0 || cols == 0 {
        return out;
    }
    // Each task writes BLOCK output rows (input columns).
    super::parallel::for_each_chunk_mut(&mut out, BLOCK * rows, |task, chunk| {
        let first_col = task * BLOCK;
        let n_cols = chunk.len() / rows;
        for row_block in (0..rows).step_by(BLOCK) {
            let row_end = (row_block + BLOCK).min(rows);
            for c in 0..n_cols {
                let col = first_col + c;
                for r in row_block..row_end {
                    chunk[c * rows + r] = read(r * cols + col);
                }
            }
        }
    });
    out
}

fn checkpoint_name(spec: &super::ModelSpec, id: super::WeightId, format: Format) -> Option<String> {
    match spec.arch {
        super::Arch::Gpt2 => super::gpt2::checkpoint_name(id, format),
        super::Arch::Llama => super::llama::checkpoint_name(id, format),
    }
}

/// Where [`assemble`] takes each row of a GGUF weight from (`None`: where it lies), found by
/// sending row numbers through the same reordering.
fn gguf_row_order(
    spec: &super::ModelSpec,
    id: super::WeightId,
    rows: usize,
) -> Result<Option<Vec<usize>>> {
    let heads = match spec.arch {
        super::Arch::Llama => super::llama::gguf_rotary_heads(id, spec),
        super::Arch::Gpt2 => None,
    };
    let Some(heads) = heads else {
        return Ok(None);
    };
    let numbers = candle_core::Tensor::arange(0u32, rows as u32, &Device::Cpu)?;
    let order = super::llama::unpermute_rotary_rows(&numbers, heads)?.to_vec1::<u32>()?;
    Ok(Some(order.into_iter().map(|r| r as usize).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_transpose_moves_every_element_to_its_mirror() {
        // Sizes across and off the 64-element blocks, and degenerate ones.
        for (rows, cols) in [(70, 130), (1, 200), (200, 1), (64, 64), (0, 5)] {
            let out = transposed(rows, cols, |k| k as u32);
            assert_eq!(out.len(), rows * cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        out[c * rows + r],
                        (r * cols + c) as u32,
                        "{rows}x{cols} ({r}, {c})"
                    );
                }
            }
        }
    }

    #[test]
    fn hub_ids_are_told_apart_from_paths() {
        assert!(looks_like_hub_id("openai-community/gpt2-xl"));
        assert!(looks_like_hub_id("meta-llama/Llama-2-7b-hf@main"));
        assert!(!looks_like_hub_id("gpt2"));
        assert!(!looks_like_hub_id("./models/gpt2"));
        assert!(!looks_like_hub_id("/abs/path/x"));
        assert!(!looks_like_hub_id("a/b/c"));
    }
}

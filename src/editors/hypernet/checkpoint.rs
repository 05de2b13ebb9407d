//! A trained hypernetwork editor on disk: one safetensors file with the editor's tensors (and,
//! for a run to resume, the optimiser's moments) and a JSON header in its metadata, written
//! atomically; and the editor `eval` and `apply` build from the `archive` an hparams file names.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{apply_trained, EditedWeight, Hypernet};
use crate::data::EditRequest;
use crate::editors::{Edit, EditCtx, Editor};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::run::train::{EarlyStopping, Outcome};

/// The editor's best state, written at every validation that improves on the best.
pub const BEST_FILE: &str = "best.safetensors";
/// Everything a resumed run needs, written at every validation.
pub const LAST_FILE: &str = "last.safetensors";

pub const FORMAT: u32 = 1;
const HEADER_KEY: &str = "kedit.hypernet";
/// The key MEND checkpoints were written under before KE shared the format.
const MEND_HEADER_KEY: &str = "kedit.mend";

/// What a checkpoint's JSON header (in the safetensors metadata, and beside it as a sidecar for
/// people) records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointHeader {
    pub format_version: u32,
    pub kedit_version: String,
    pub method: String,
    pub model_fingerprint: String,
    /// The hparams file the run read, as the method's parameters serialise.
    pub hparams: serde_json::Value,
    pub weights: Vec<EditedWeight>,
    /// Where the next micro-batch starts in the training records, and how many ran.
    pub cursor: usize,
    pub micro_batches: usize,
    /// The optimiser's step count (its moments are tensors `opt.m.<i>`, `opt.v.<i>`).
    pub adam_step: i32,
    pub progress: Outcome,
    pub early_stopping: Option<EarlyStopping>,
}

/// Writes `tensors` with `header` in the metadata, atomically.
pub fn write(path: &Path, header: &CheckpointHeader, tensors: Vec<(String, Tensor)>) -> Result<()> {
    let json = serde_json::to_string(header)
        .map_err(|e| Error::Invalid(format!("cannot serialise the checkpoint header: {e}")))?;
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?)))
        .collect::<Result<Vec<_>>>()?;
    let metadata = std::collections::HashMap::from([(HEADER_KEY.to_string(), json)]);
    crate::files::write_safetensors(path, &tensors, metadata)
}

/// Reads a checkpoint of `method` written by [`write`], one tensor at a time: the file is never
/// in memory whole beside the tensors made from it (a KE `last.safetensors` with Adam's moments
/// is 680 MB on SmolLM2).
///
/// # Errors
/// Not a kedit checkpoint, a newer format, another method's, or a file shorter than its header
/// says (truncated).
pub fn read(path: &Path, method: &str) -> Result<(CheckpointHeader, BTreeMap<String, Tensor>)> {
    use std::io::{Read, Seek, SeekFrom};
    let not_one =
        |why: String| Error::file(path, format!("not a kedit {method} checkpoint: {why}"));
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| not_one("shorter than a safetensors header".into()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(not_one(format!(
            "its header length ({header_len} bytes) does not fit the file"
        )));
    }
    let mut header_bytes = vec![0u8; header_len as usize];
    file.read_exact(&mut header_bytes)
        .map_err(|e| Error::io(path, e))?;
    let entries: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header_bytes).map_err(|e| not_one(e.to_string()))?;
    let json = entries
        .get("__metadata__")
        .and_then(|m| m.get(HEADER_KEY).or_else(|| m.get(MEND_HEADER_KEY)))
        .and_then(|v| v.as_str())
        .ok_or_else(|| not_one("no kedit header in its metadata".into()))?;
    let header: CheckpointHeader =
        serde_json::from_str(json).map_err(|e| not_one(e.to_string()))?;
    if header.format_version > FORMAT {
        return Err(not_one(format!(
            "format {} is newer than this kedit reads ({FORMAT})",
            header.format_version
        )));
    }
    if header.method != method {
        return Err(not_one(format!(
            "it holds an editor trained as {}",
            header.method
        )));
    }
    #[derive(Deserialize)]
    struct Entry {
        dtype: String,
        shape: Vec<usize>,
        data_offsets: (u64, u64),
    }
    let data_start = 8 + header_len;
    let mut tensors = BTreeMap::new();
    for (name, value) in entries {
        if name == "__metadata__" {
            continue;
        }
        let entry: Entry =
            serde_json::from_value(value).map_err(|e| not_one(format!("tensor {name}: {e}")))?;
        let dtype = match entry.dtype.as_str() {
            "F32" => DType::F32,
            "F64" => DType::F64,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "U32" => DType::U32,
            "I64" => DType::I64,
            "U8" => DType::U8,
            other => return Err(not_one(format!("tensor {name} has dtype {other}"))),
        };
        let bytes = entry.shape.iter().product::<usize>() * dtype.size_in_bytes();
        let (start, end) = entry.data_offsets;
        if end < start || end - start != bytes as u64 || data_start + end > file_len {
            return Err(not_one(format!(
                "tensor {name}'s data do not fit the file (is it truncated?)"
            )));
        }
        let mut data = vec![0u8; bytes];
        file.seek(SeekFrom::Start(data_start + start))
            .and_then(|_| file.read_exact(&mut data))
            .map_err(|e| Error::io(path, e))?;
        let tensor = Tensor::from_raw_buffer(&data, dtype, &entry.shape, &Device::Cpu)
            .map_err(|e| not_one(format!("tensor {name}: {}", Error::from(e))))?;
        tensors.insert(name, tensor);
    }
    Ok((header, tensors))
}

/// A safetensors header larger than this is not one kedit wrote (the safetensors crate's limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// A trained editor from a checkpoint (`best.safetensors` or `last.safetensors` of a `kedit
/// train` folder, or the folder itself, which means its best), for `model`.
///
/// # Errors
/// Not a checkpoint of `H`, or one trained on another model (naming both fingerprints).
pub fn load<H: Hypernet>(model: &Model, path: &Path) -> Result<H> {
    let file = if path.is_dir() {
        path.join(BEST_FILE)
    } else {
        path.to_path_buf()
    };
    let (header, tensors) = read(&file, H::METHOD)?;
    let here = model.fingerprint()?;
    if header.model_fingerprint != here {
        return Err(Error::file(
            &file,
            format!(
                "this {} editor was trained on model {}, but the model here is {here}",
                H::METHOD,
                header.model_fingerprint
            ),
        ));
    }
    let params: H::Params = serde_json::from_value(header.hparams)
        .map_err(|e| Error::file(&file, format!("its hparams do not read back: {e}")))?;
    let mut editor = H::build(model, params)?;
    editor
        .load_tensors(&tensors)
        .map_err(|e| Error::file(&file, e.to_string()))?;
    Ok(editor)
}

/// A hypernetwork editor as `eval` and `apply` build it from an edit hparams file: the trained
/// editor its `archive` names (a `kedit train` folder or checkpoint), loaded for the model at the
/// first edit.
pub struct FromArchive<H: Hypernet> {
    inner_params: Vec<String>,
    archive: Option<PathBuf>,
    hparams_file: PathBuf,
    loaded: Option<H>,
    kind: PhantomData<H>,
}

impl<H: Hypernet> FromArchive<H> {
    /// The editor of the hparams file at `path`, whose trained state is `archive` when given,
    /// else the file's own `archive`.
    ///
    /// # Errors
    /// A file the method cannot honour.
    pub fn from_yaml(path: &Path, archive: Option<PathBuf>) -> Result<Self> {
        let params = H::read_params(path)?;
        let archive = archive.or_else(|| H::archive(&params).map(PathBuf::from));
        Ok(FromArchive {
            inner_params: H::inner_params(&params).to_vec(),
            archive,
            hparams_file: path.to_path_buf(),
            loaded: None,
            kind: PhantomData,
        })
    }

    fn train_command(&self, out: &Path) -> String {
        let method = H::METHOD;
        let stem = self
            .hparams_file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "MODEL.yaml".into());
        format!(
            "kedit train --editor {method} --model MODEL --hparams hparams/TRAINING/{method}/{stem} \
             --data TRAIN.json --out {}",
            out.display()
        )
    }

    fn editor(&mut self, model: &Model, ctx: &EditCtx) -> Result<&mut H> {
        if self.loaded.is_none() {
            let Some(archive) = self.archive.clone() else {
                return Err(Error::file(
                    &self.hparams_file,
                    format!(
                        "archive is not set: {} edits with a trained editor; train one with `{}` \
                         and name the folder in archive (or pass --archive)",
                        H::METHOD,
                        self.train_command(Path::new("DIR"))
                    ),
                ));
            };
            let found = ctx.artefacts.resolve(&archive).map_err(|e| {
                Error::file(
                    &self.hparams_file,
                    format!(
                        "{e}; train the editor with `{}`",
                        self.train_command(&archive)
                    ),
                )
            })?;
            let editor: H = load(model, &found)?;
            if H::inner_params(editor.params()) != self.inner_params.as_slice() {
                return Err(Error::file(
                    &self.hparams_file,
                    format!(
                        "inner_params differ from those archive {} was trained with; retrain \
                         with `{}`",
                        found.display(),
                        self.train_command(&archive)
                    ),
                ));
            }
            self.loaded = Some(editor);
        }
        self.loaded
            .as_mut()
            .ok_or_else(|| Error::Invalid(format!("{} editor not loaded", H::METHOD)))
    }
}

impl<H: Hypernet> Editor for FromArchive<H> {
    fn name(&self) -> &'static str {
        H::METHOD
    }

    /// A batch pools its requests into one update, as EasyEdit's executors do.
    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn apply(
        &mut self,
        model: &mut Model,
        requests: &[EditRequest],
        ctx: &EditCtx,
    ) -> Result<Edit> {
        let editor = self.editor(model, ctx)?;
        apply_trained(editor, model, requests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(method: &str) -> CheckpointHeader {
        CheckpointHeader {
            format_version: FORMAT,
            kedit_version: "test".into(),
            method: method.into(),
            model_fingerprint: "0123456789abcdef".into(),
            hparams: serde_json::json!({"lr": 1e-4}),
            weights: Vec::new(),
            cursor: 3,
            micro_batches: 7,
            adam_step: 2,
            progress: Outcome::default(),
            early_stopping: None,
        }
    }

    /// Tensors read back one at a time are the ones written, of each dtype kept; a file cut
    /// short, or another method's, is refused in one line naming the file.
    #[test]
    fn a_checkpoint_reads_back_tensor_by_tensor_and_a_truncated_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last.safetensors");
        let d = &Device::Cpu;
        let a = Tensor::new(&[[1.5f32, -2.0, 3.25], [0.0, 7.0, -0.5]], d).unwrap();
        let b = Tensor::new(&[0.1f64, 1e-300, -4.0], d).unwrap();
        write(
            &path,
            &header("KE"),
            vec![("a".into(), a.clone()), ("b".into(), b.clone())],
        )
        .unwrap();
        let (read_header, tensors) = read(&path, "KE").unwrap();
        assert_eq!((read_header.cursor, read_header.adam_step), (3, 2));
        assert_eq!(
            tensors["a"].to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        assert_eq!(
            tensors["b"].to_vec1::<f64>().unwrap(),
            b.to_vec1::<f64>().unwrap()
        );
        let refused = read(&path, "MEND").unwrap_err().to_string();
        assert!(refused.contains("trained as KE"), "{refused}");

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let message = read(&path, "KE").unwrap_err().to_string();
        assert!(
            message.contains("truncated") && message.contains("last.safetensors"),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
        std::fs::write(&path, &bytes[..6]).unwrap();
        let message = read(&path, "KE").unwrap_err().to_string();
        assert!(
            message.contains("shorter than a safetensors header"),
            "{message}"
        );
    }
}

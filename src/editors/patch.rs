//! Patch files: an edit written to disk and made again on another process's model
//! (`kedit apply --save-edit` / `--patch`). One safetensors file holds the changed weights (under
//! their checkpoint names), the installed overlays and the editor's state, with a JSON header in
//! the metadata naming the method, the fingerprint of the model the edit was made on, and the
//! kedit version. A patch only applies to the model it was made on, so patches stack in the order
//! they were made (`--patch a --patch b`), each checked against the model the previous one left.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{Change, Edit, EditorState, OverlayChange, WeightChange};
use crate::error::{Error, Result};
use crate::model::{Model, Overlay, OverlayParts, Site};

/// The metadata key of the header.
const HEADER_KEY: &str = "kedit_patch";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PatchHeader {
    pub format_version: u32,
    pub kedit_version: String,
    /// The editing method that made the edit (`ROME`, `GRACE`, ...).
    pub method: String,
    /// [`Model::fingerprint`] of the model the edit was made on.
    pub model_fingerprint: String,
    /// Checkpoint names of the changed weights, in the order they changed.
    pub weights: Vec<String>,
    /// Overlays as installed after the edit, in order (`kind: null` = removed).
    pub overlays: Vec<OverlayEntry>,
    /// The editor's state after the edit, if it keeps one.
    pub state: Option<StateEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OverlayEntry {
    pub site: String,
    pub kind: Option<String>,
    pub header: serde_json::Value,
    pub tensors: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateEntry {
    pub header: serde_json::Value,
    pub tensors: Vec<String>,
}

/// Rebuilds an overlay of a kind from its saved parts (the editors' registry knows the kinds).
pub type OverlayBuilder<'a> = &'a dyn Fn(&str, &OverlayParts, &Device) -> Result<Arc<dyn Overlay>>;

/// A patch read from disk.
pub struct Patch {
    /// `None` for a file written before patches had headers (weights only, model unchecked).
    pub header: Option<PatchHeader>,
    /// The changes, with `before` = the weights of the model it was read for.
    pub edit: Edit,
    pub state: Option<EditorState>,
    /// The file's other metadata entries (see [`save_with_metadata`]).
    pub metadata: HashMap<String, String>,
}

fn overlay_tensor_name(index: usize, name: &str) -> String {
    format!("kedit.overlay.{index}.{name}")
}

fn state_tensor_name(name: &str) -> String {
    format!("kedit.state.{name}")
}

/// Writes `edit` (made by `method` on a model whose fingerprint was `model_fingerprint`) and the
/// editor's `state` to `path`, through a temporary file renamed into place.
pub fn save(
    path: &Path,
    model: &Model,
    method: &str,
    model_fingerprint: &str,
    edit: &Edit,
    state: Option<&EditorState>,
) -> Result<()> {
    save_with_metadata(
        path,
        model,
        method,
        model_fingerprint,
        edit,
        state,
        HashMap::new(),
    )
}

/// [`save`], with more metadata entries beside the patch header (a sequential run's progress),
/// read back as [`Patch::metadata`].
pub fn save_with_metadata(
    path: &Path,
    model: &Model,
    method: &str,
    model_fingerprint: &str,
    edit: &Edit,
    state: Option<&EditorState>,
    mut metadata: HashMap<String, String>,
) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut header = PatchHeader {
        format_version: FORMAT_VERSION,
        kedit_version: env!("CARGO_PKG_VERSION").into(),
        method: method.into(),
        model_fingerprint: model_fingerprint.into(),
        weights: Vec::new(),
        overlays: Vec::new(),
        state: None,
    };
    for change in &edit.changes {
        match change {
            Change::Weight(w) => {
                let name = model
                    .checkpoint_name(w.id)
                    .ok_or_else(|| Error::UnknownWeight(w.id.to_string()))?;
                tensors.insert(name.clone(), w.after.to_device(&Device::Cpu)?);
                header.weights.retain(|n| *n != name);
                header.weights.push(name);
            }
            Change::Overlay(o) => {
                let index = header.overlays.len();
                let entry = match &o.after {
                    None => OverlayEntry {
                        site: o.site.to_string(),
                        kind: None,
                        header: serde_json::Value::Null,
                        tensors: Vec::new(),
                    },
                    Some(overlay) => {
                        let parts = overlay.parts()?;
                        let mut names = Vec::new();
                        for (name, t) in parts.tensors {
                            tensors.insert(
                                overlay_tensor_name(index, &name),
                                t.to_device(&Device::Cpu)?,
                            );
                            names.push(name);
                        }
                        OverlayEntry {
                            site: o.site.to_string(),
                            kind: Some(overlay.kind().into()),
                            header: parts.header,
                            tensors: names,
                        }
                    }
                };
                header.overlays.push(entry);
            }
        }
    }
    if let Some(state) = state {
        let mut names = Vec::new();
        for (name, t) in &state.tensors {
            tensors.insert(state_tensor_name(name), t.to_device(&Device::Cpu)?);
            names.push(name.clone());
        }
        header.state = Some(StateEntry {
            header: state.header.clone(),
            tensors: names,
        });
    }
    let json = serde_json::to_string(&header)
        .map_err(|e| Error::Invalid(format!("cannot serialise the patch header: {e}")))?;
    metadata.insert(HEADER_KEY.to_string(), json);
    let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    crate::files::write_safetensors(path, &tensors, metadata)
}

/// What a patch file holds, read without a model: its header and every tensor's name, dtype and
/// shape (for `kedit patch show`).
#[derive(Debug, Clone, Serialize)]
pub struct PatchSummary {
    /// `None` for a file written before patches had headers.
    pub header: Option<PatchHeader>,
    pub tensors: Vec<TensorSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TensorSummary {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// Reads a patch's header and tensor list.
///
/// # Errors
/// A file that is not safetensors, or whose kedit header does not parse.
pub fn summary(path: &Path) -> Result<PatchSummary> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let not_a_patch = |why: String| Error::file(path, format!("not a kedit patch: {why}"));
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| not_a_patch(e.to_string()))?;
    let header: Option<PatchHeader> = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(HEADER_KEY))
        .map(|json| serde_json::from_str(json).map_err(|e| not_a_patch(e.to_string())))
        .transpose()?;
    let mut tensors: Vec<TensorSummary> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| TensorSummary {
            name,
            dtype: format!("{:?}", info.dtype).to_lowercase(),
            shape: info.shape.clone(),
        })
        .collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(PatchSummary { header, tensors })
}

impl Patch {
    /// Reads a patch for `model`: its weights, overlays (rebuilt by `build_overlay`) and state.
    ///
    /// # Errors
    /// Not a patch, a patch made for another model (naming both fingerprints), a tensor that is
    /// not a weight of this model or has another shape, an overlay kind nothing can rebuild.
    pub fn load(model: &Model, path: &Path, build_overlay: OverlayBuilder<'_>) -> Result<Patch> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let not_a_patch = |why: String| Error::file(path, format!("not a kedit patch: {why}"));
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| not_a_patch(e.to_string()))?;
        let header: Option<PatchHeader> = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(HEADER_KEY))
            .map(|json| serde_json::from_str(json).map_err(|e| not_a_patch(e.to_string())))
            .transpose()?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| not_a_patch(Error::from(e).to_string()))?;
        if let Some(h) = &header {
            if h.format_version > FORMAT_VERSION {
                return Err(Error::file(
                    path,
                    format!(
                        "patch format {} is newer than this kedit ({}) reads; it was written by kedit {}",
                        h.format_version,
                        env!("CARGO_PKG_VERSION"),
                        h.kedit_version
                    ),
                ));
            }
            let here = model.fingerprint()?;
            if h.model_fingerprint != here {
                return Err(Error::file(
                    path,
                    format!(
                        "this {} patch was made for model {}, but the model here is {here} (patches apply only to the model they were made on, and stack in the order they were made)",
                        h.method, h.model_fingerprint
                    ),
                ));
            }
        }
        let weight_names: Vec<String> = match &header {
            Some(h) => h.weights.clone(),
            None => {
                let mut names: Vec<String> = tensors.keys().cloned().collect();
                names.sort();
                names
            }
        };
        let mut changes = Vec::new();
        for name in &weight_names {
            let id = model.weight_id_by_name(name).ok_or_else(|| {
                Error::file(
                    path,
                    format!("tensor `{name}` is not a weight of this model"),
                )
            })?;
            let stored = tensors.get(name).ok_or_else(|| {
                Error::file(
                    path,
                    format!("the header names weight `{name}`, the file does not hold it"),
                )
            })?;
            let before = model.weight(id)?;
            let after = stored.to_device(model.device())?.to_dtype(model.dtype())?;
            if after.dims() != before.dims() {
                return Err(Error::file(
                    path,
                    format!(
                        "tensor `{name}` has shape {:?}, the model's is {:?}",
                        after.dims(),
                        before.dims()
                    ),
                ));
            }
            changes.push(Change::Weight(WeightChange { id, before, after }));
        }
        let take = |name: &str| -> Result<Tensor> {
            tensors
                .get(name)
                .cloned()
                .ok_or_else(|| Error::file(path, format!("tensor `{name}` is missing")))
        };
        for (index, entry) in header.iter().flat_map(|h| h.overlays.iter()).enumerate() {
            let site: Site = entry
                .site
                .parse()
                .map_err(|e: String| Error::file(path, format!("overlay {index}: {e}")))?;
            let after = match &entry.kind {
                None => None,
                Some(kind) => {
                    let parts = OverlayParts {
                        header: entry.header.clone(),
                        tensors: entry
                            .tensors
                            .iter()
                            .map(|n| Ok((n.clone(), take(&overlay_tensor_name(index, n))?)))
                            .collect::<Result<_>>()?,
                    };
                    Some(build_overlay(kind, &parts, model.device()).map_err(|e| {
                        Error::file(path, format!("overlay {index} at {site}: {e}"))
                    })?)
                }
            };
            changes.push(Change::Overlay(OverlayChange {
                site,
                before: model.overlay(site).cloned(),
                after,
            }));
        }
        let state = match header.as_ref().and_then(|h| h.state.as_ref()) {
            None => None,
            Some(entry) => Some(EditorState {
                header: entry.header.clone(),
                tensors: entry
                    .tensors
                    .iter()
                    .map(|n| Ok((n.clone(), take(&state_tensor_name(n))?)))
                    .collect::<Result<_>>()?,
            }),
        };
        let mut metadata = meta.metadata().clone().unwrap_or_default();
        metadata.remove(HEADER_KEY);
        Ok(Patch {
            header,
            edit: Edit {
                changes,
                ..Edit::default()
            },
            state,
            metadata,
        })
    }

    /// The method that made the patch, if its header says.
    pub fn method(&self) -> Option<&str> {
        self.header.as_ref().map(|h| h.method.as_str())
    }
}

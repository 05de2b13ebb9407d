//! A sequential run's edits saved as it goes, so that a run of hours survives being stopped: the
//! accumulated changes (every weight an edit touched, every overlay, the editor's state) are
//! written as one patch beside the results, with how far the run got, and a resumed run makes that
//! patch on the unedited model and carries on from the next edit instead of editing everything
//! again. The file is an ordinary patch: `kedit apply --patch` makes all the run's edits at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::editors::patch::{self, Patch};
use crate::editors::registry::overlay_from_parts;
use crate::editors::{Change, Edit, Editor, OverlayChange, WeightChange};
use crate::error::{Error, Result};
use crate::model::{Model, Site, WeightId};

/// The metadata entry of the patch that holds [`Progress`].
const PROGRESS_KEY: &str = "kedit_sequential_run";

/// Where and how often a sequential run saves its edits.
#[derive(Debug, Clone)]
pub struct Checkpointing {
    pub path: PathBuf,
    /// Save after every this many edits (and at every lifelong checkpoint, and at the end).
    pub every: usize,
    /// Take a saved file up again (`--resume`); without it an existing file is replaced.
    pub resume: bool,
}

/// How far a saved run got.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    /// Record indices of the cases edited so far, in the order edited.
    pub edited: Vec<usize>,
    /// For each of them, the seconds of the edit call it was part of.
    pub seconds: Vec<f64>,
    /// Seconds the run has taken so far, over all the processes that ran it.
    pub elapsed_seconds: f64,
}

/// What the edits so far have touched, in the order first touched.
#[derive(Debug, Default)]
pub struct Touched {
    weights: Vec<WeightId>,
    overlays: Vec<Site>,
}

impl Touched {
    pub fn note(&mut self, edit: &Edit) {
        for change in &edit.changes {
            match change {
                Change::Weight(w) if !self.weights.contains(&w.id) => self.weights.push(w.id),
                Change::Overlay(o) if !self.overlays.contains(&o.site) => {
                    self.overlays.push(o.site)
                }
                _ => {}
            }
        }
    }

    /// The model's current state of everything touched, as one edit from the unedited model.
    fn as_edit(&self, model: &Model) -> Result<Edit> {
        let mut changes = Vec::with_capacity(self.weights.len() + self.overlays.len());
        for &id in &self.weights {
            let now = model.weight(id)?;
            changes.push(Change::Weight(WeightChange {
                id,
                before: now.clone(),
                after: now,
            }));
        }
        for &site in &self.overlays {
            changes.push(Change::Overlay(OverlayChange {
                site,
                before: None,
                after: model.overlay(site).cloned(),
            }));
        }
        Ok(Edit {
            changes,
            ..Edit::default()
        })
    }
}

/// Writes the run's edits so far to `path` (through a temporary file renamed into place).
/// `unedited` is the fingerprint of the model before the run's first edit.
pub fn save(
    path: &Path,
    model: &Model,
    editor: &dyn Editor,
    unedited: &str,
    touched: &Touched,
    progress: &Progress,
) -> Result<()> {
    let json = serde_json::to_string(progress)
        .map_err(|e| Error::Invalid(format!("cannot serialise the run's progress: {e}")))?;
    patch::save_with_metadata(
        path,
        model,
        editor.name(),
        unedited,
        &touched.as_edit(model)?,
        editor.state()?.as_ref(),
        HashMap::from([(PROGRESS_KEY.to_string(), json)]),
    )
}

/// Makes the edits saved at `path` on `model` (unedited, the one the run started from) and gives
/// `editor` its saved state. `expected` is the run's cases in edit order: the saved edits must be
/// the first of them, in whole batches of `batch` (or all of them).
///
/// # Errors
/// A file that is not a saved run, saved by another method or for another model, or whose edits
/// are not the first cases of this run (another `--offset`, `--limit` or data file) in batches.
pub fn restore(
    path: &Path,
    model: &mut Model,
    editor: &mut dyn Editor,
    expected: &[usize],
    batch: usize,
) -> Result<(Progress, Touched)> {
    let saved = Patch::load(model, path, &overlay_from_parts)?;
    let progress: Progress = saved
        .metadata
        .get(PROGRESS_KEY)
        .ok_or_else(|| {
            Error::file(
                path,
                "a patch, but not a sequential run's saved edits (no progress entry)",
            )
        })
        .and_then(|json| {
            serde_json::from_str(json)
                .map_err(|e| Error::file(path, format!("unreadable run progress: {e}")))
        })?;
    if saved.method() != Some(editor.name()) {
        return Err(Error::file(
            path,
            format!(
                "these edits were made by {}, this run edits with {}",
                saved.method().unwrap_or("an unknown method"),
                editor.name()
            ),
        ));
    }
    let n = progress.edited.len();
    if progress.seconds.len() != n || n > expected.len() || progress.edited != expected[..n] {
        return Err(Error::file(
            path,
            format!(
                "its {n} edits are not the first {n} cases of this run (the run's records differ: another --data, --offset or --limit?)"
            ),
        ));
    }
    if !n.is_multiple_of(batch) && n != expected.len() {
        return Err(Error::file(
            path,
            format!("its {n} edits are not whole batches of {batch}: resume with the --batch-size it was made with"),
        ));
    }
    let mut touched = Touched::default();
    touched.note(&saved.edit);
    saved.edit.reapply(model)?;
    if let Some(state) = &saved.state {
        editor.restore_state(state)?;
    }
    Ok((progress, touched))
}

//! Editors: one trait, one request type, one `Edit` that undoes, saves and re-applies itself.
//! A method is one file plus one line in [`registry`].

mod alphaedit;
mod ft;
pub mod hparams;
mod memit;
pub mod optim;
pub mod rank_one;
pub mod registry;
mod rome;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::data::EditRequest;
use crate::error::{Error, Result};
use crate::model::{Model, WeightId};

pub use alphaedit::AlphaEdit;
pub use ft::{Ft, FtParams, Objective};
pub use memit::Memit;
pub use registry::{build_editor, default_hparams, editor_from_hparams, EditorKind};
pub use rome::{Rome, RomeParams};

/// What an editor needs besides the model and the requests; everything EasyEdit kept in globals.
#[derive(Debug, Clone)]
pub struct EditCtx {
    pub seed: u64,
}

impl Default for EditCtx {
    fn default() -> Self {
        Self { seed: 42 }
    }
}

pub trait Editor {
    fn name(&self) -> &'static str;

    /// Largest number of requests one `apply` takes (1 for single-edit methods).
    fn max_batch(&self) -> usize {
        1
    }

    /// Applies the requests (one, a batch, or the next of a sequence) and returns what changed.
    fn apply(&mut self, model: &mut Model, requests: &[EditRequest], ctx: &EditCtx)
        -> Result<Edit>;

    /// Takes back an edit this editor made: the weights, and what the editor remembered of it
    /// (AlphaEdit's key memory), so that later edits are not held to facts no longer in the model.
    fn undo(&mut self, model: &mut Model, edit: &Edit) -> Result<()> {
        edit.undo(model)
    }
}

/// The weights an edit changed, before and after, by role.
#[derive(Debug, Clone, Default)]
pub struct Edit {
    pub changes: Vec<WeightChange>,
    /// Keys `[n, d_ff]` per layer that the editor added to its memory for this edit (AlphaEdit).
    pub remembered_keys: BTreeMap<usize, Tensor>,
    /// Where the edit's time went, for `kedit apply` and the benchmarks.
    pub phases: Phases,
    /// How each target-vector optimisation ended (locate-then-edit methods; one per fact and layer
    /// optimised), so a user can tell a converged edit from one that ran out of steps.
    pub value_fits: Vec<rank_one::values::ValueFit>,
}

/// Seconds spent in each phase of an edit (summed over layers and facts), in the order the phases
/// first ran.
#[derive(Debug, Clone, Default)]
pub struct Phases(Vec<(&'static str, f64)>);

impl Phases {
    pub fn add(&mut self, phase: &'static str, seconds: f64) {
        match self.0.iter_mut().find(|(name, _)| *name == phase) {
            Some((_, total)) => *total += seconds,
            None => self.0.push((phase, seconds)),
        }
    }

    /// Runs `work`, counting its time to `phase`.
    pub fn time<T>(&mut self, phase: &'static str, work: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = std::time::Instant::now();
        let out = work();
        self.add(phase, start.elapsed().as_secs_f64());
        out
    }

    /// Phases that ran before, then these (for phases an editor times outside its core).
    pub fn then(mut self, later: &Phases) -> Phases {
        for &(phase, seconds) in &later.0 {
            self.add(phase, seconds);
        }
        self
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, f64)> + '_ {
        self.0.iter().copied()
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (phase, seconds)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{phase} {seconds:.2} s")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct WeightChange {
    pub id: WeightId,
    pub before: Tensor,
    pub after: Tensor,
}

impl Edit {
    /// Puts back every weight as it was before the edit (the model's own tensors, no copy).
    pub fn undo(&self, model: &mut Model) -> Result<()> {
        for change in self.changes.iter().rev() {
            model.replace_weight(change.id, change.before.clone())?;
        }
        Ok(())
    }

    /// Applies the edit's new weights to a model (for instance a fresh one).
    pub fn reapply(&self, model: &mut Model) -> Result<Edit> {
        let mut done = Vec::with_capacity(self.changes.len());
        for change in &self.changes {
            let after = change
                .after
                .to_device(model.device())?
                .to_dtype(model.dtype())?;
            let before = model.replace_weight(change.id, after.clone())?;
            done.push(WeightChange {
                id: change.id,
                before,
                after,
            });
        }
        Ok(Edit {
            changes: done,
            ..Edit::default()
        })
    }

    /// Writes the changed tensors (after the edit) as safetensors under their checkpoint names,
    /// through a temporary file renamed into place, so a crash never leaves a half-written file.
    pub fn save(&self, model: &Model, path: &Path) -> Result<()> {
        let mut tensors = HashMap::new();
        for change in &self.changes {
            let name = model
                .checkpoint_name(change.id)
                .ok_or(Error::UnknownWeight(change.id))?;
            tensors.insert(name, change.after.to_device(&Device::Cpu)?);
        }
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.partial",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("edit")
        ));
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// Reads an edit saved by [`Edit::save`] for `model` (whose current weights become `before`).
    pub fn load(model: &Model, path: &Path) -> Result<Edit> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::file(path, format!("not a saved edit: {}", Error::from(e))))?;
        let mut changes = Vec::with_capacity(tensors.len());
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        for name in names {
            let id = model.weight_id_by_name(name).ok_or_else(|| {
                Error::file(
                    path,
                    format!("tensor `{name}` is not a weight of this model"),
                )
            })?;
            let before = model.weight(id)?;
            let after = tensors[name]
                .to_device(model.device())?
                .to_dtype(model.dtype())?;
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
            changes.push(WeightChange { id, before, after });
        }
        Ok(Edit {
            changes,
            ..Edit::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Phases;

    #[test]
    fn phases_sum_by_name_in_the_order_they_first_ran() {
        let mut early = Phases::default();
        early.add("templates", 1.0);
        let mut core = Phases::default();
        core.add("values", 2.0);
        core.add("solve", 0.25);
        core.add("values", 3.0);
        let all = early.then(&core);
        assert_eq!(
            all.iter().collect::<Vec<_>>(),
            [("templates", 1.0), ("values", 5.0), ("solve", 0.25)]
        );
        assert_eq!(
            all.to_string(),
            "templates 1.00 s, values 5.00 s, solve 0.25 s"
        );
    }
}

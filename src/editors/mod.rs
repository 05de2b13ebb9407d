//! Editors: one trait, one request type, one `Edit` that undoes, saves and re-applies itself.
//! A method is one file plus one line in [`registry`].

mod alphaedit;
mod ctx;
mod ft;
pub mod hparams;
pub mod hypernet;
mod memit;
pub mod memory;
pub mod optim;
pub mod patch;
pub mod rank_one;
pub mod registry;
mod rome;

use std::any::Any;
use std::sync::Arc;

use candle_core::Tensor;

use crate::data::EditRequest;
use crate::error::{Error, Result};
use crate::model::{Model, Overlay, Site, WeightId};

pub use alphaedit::AlphaEdit;
pub use ctx::{ArtefactStore, EditCtx, TemplateCache};
pub use ft::{Ft, FtParams, Objective};
pub use memit::Memit;
pub use patch::Patch;
pub use registry::{
    build_editor, build_editor_with_archive, default_hparams, editor_from_hparams, EditorKind,
};
pub use rome::{Rome, RomeParams};

pub trait Editor {
    fn name(&self) -> &'static str;

    /// Largest number of requests one `apply` takes (1 for single-edit methods).
    fn max_batch(&self) -> usize {
        1
    }

    /// Does now what depends only on the unedited model (statistics, null-space projections,
    /// context templates), before a patch or a resumed run's saved edits change it: what these
    /// would be computed from on the first edit otherwise.
    fn prepare(&mut self, _model: &Model, _ctx: &EditCtx) -> Result<()> {
        Ok(())
    }

    /// Applies the requests (one, a batch, or the next of a sequence) and returns what changed.
    fn apply(&mut self, model: &mut Model, requests: &[EditRequest], ctx: &EditCtx)
        -> Result<Edit>;

    /// Takes back an edit this editor made: the model's changes, and what the editor remembered of
    /// it (AlphaEdit's key memory), so that later edits are not held to facts no longer in the model.
    fn undo(&mut self, model: &mut Model, edit: &Edit) -> Result<()> {
        edit.undo(model)
    }

    /// What the editor remembers across edits (AlphaEdit's key memory, a codebook's bookkeeping),
    /// to be saved with a patch; `None` for editors that remember nothing.
    fn state(&self) -> Result<Option<EditorState>> {
        Ok(None)
    }

    /// Takes back a state saved by [`Editor::state`] (of an editor of the same method), so that
    /// an edit in a new process continues where the saved one left off.
    fn restore_state(&mut self, _state: &EditorState) -> Result<()> {
        Err(Error::Unsupported {
            what: format!("restoring {} editor state", self.name()),
            why: "this method keeps no state across edits".into(),
        })
    }
}

/// An editor's memory across edits as it is saved: a JSON header and named tensors.
#[derive(Debug, Clone, Default)]
pub struct EditorState {
    pub header: serde_json::Value,
    pub tensors: Vec<(String, Tensor)>,
}

/// What an edit changed, in the order it changed it: every entry undoes exactly.
#[derive(Default)]
pub struct Edit {
    pub changes: Vec<Change>,
    /// Where the edit's time went, for `kedit apply` and the benchmarks.
    pub phases: Phases,
    /// The method's own account of the edit (ROME's value fits, AlphaEdit's remembered keys).
    pub report: Option<Box<dyn EditReport>>,
}

impl std::fmt::Debug for Edit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edit")
            .field("changes", &self.changes)
            .field("phases", &self.phases)
            .finish_non_exhaustive()
    }
}

/// One change to the model.
#[derive(Debug, Clone)]
pub enum Change {
    Weight(WeightChange),
    Overlay(OverlayChange),
}

/// A weight, before and after (full tensors: the model's own, so no copy is made).
#[derive(Debug, Clone)]
pub struct WeightChange {
    pub id: WeightId,
    pub before: Tensor,
    pub after: Tensor,
}

/// What was installed at an overlay site before the edit and what is installed now.
#[derive(Clone)]
pub struct OverlayChange {
    pub site: Site,
    pub before: Option<Arc<dyn Overlay>>,
    pub after: Option<Arc<dyn Overlay>>,
}

impl std::fmt::Debug for OverlayChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = |o: &Option<Arc<dyn Overlay>>| o.as_ref().map(|o| o.kind());
        f.debug_struct("OverlayChange")
            .field("site", &self.site)
            .field("before", &kind(&self.before))
            .field("after", &kind(&self.after))
            .finish()
    }
}

/// A method's diagnostics of one edit: lines for `kedit apply`, JSON for `--json`, and its
/// concrete type for the editor that made it (undo reads AlphaEdit's keys from it).
pub trait EditReport: Send + Sync {
    /// Human-readable lines (`value fit: 16 steps, final loss 0.0497`).
    fn lines(&self) -> Vec<String>;
    /// The same as JSON fields, merged into `kedit apply --json`.
    fn to_json(&self) -> serde_json::Value;
    fn as_any(&self) -> &dyn Any;
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

impl Edit {
    /// An edit of weight changes only.
    pub fn of_weights(changes: Vec<WeightChange>) -> Self {
        Edit {
            changes: changes.into_iter().map(Change::Weight).collect(),
            ..Edit::default()
        }
    }

    /// The weight changes, in order.
    pub fn weight_changes(&self) -> impl Iterator<Item = &WeightChange> {
        self.changes.iter().filter_map(|c| match c {
            Change::Weight(w) => Some(w),
            Change::Overlay(_) => None,
        })
    }

    /// The method's report as its concrete type.
    pub fn report_as<T: 'static>(&self) -> Option<&T> {
        self.report.as_ref()?.as_any().downcast_ref::<T>()
    }

    /// Puts back every weight and overlay as it was before the edit (the model's own tensors and
    /// overlays, no copy), last change first.
    pub fn undo(&self, model: &mut Model) -> Result<()> {
        for change in self.changes.iter().rev() {
            match change {
                Change::Weight(w) => {
                    model.replace_weight(w.id, w.before.clone())?;
                }
                Change::Overlay(o) => {
                    model.set_overlay(o.site, o.before.clone())?;
                }
            }
        }
        Ok(())
    }

    /// Makes the edit's changes on a model (for instance a fresh one); the returned edit's
    /// `before` is what that model held.
    pub fn reapply(&self, model: &mut Model) -> Result<Edit> {
        let mut done = Vec::with_capacity(self.changes.len());
        for change in &self.changes {
            done.push(match change {
                Change::Weight(w) => {
                    let after = w.after.to_device(model.device())?.to_dtype(model.dtype())?;
                    let before = model.replace_weight(w.id, after.clone())?;
                    Change::Weight(WeightChange {
                        id: w.id,
                        before,
                        after,
                    })
                }
                Change::Overlay(o) => Change::Overlay(OverlayChange {
                    site: o.site,
                    before: model.set_overlay(o.site, o.after.clone())?,
                    after: o.after.clone(),
                }),
            });
        }
        Ok(Edit {
            changes: done,
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

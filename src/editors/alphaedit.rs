//! AlphaEdit (Fang et al. 2025; SPEC-editors §5): MEMIT's layer-spread edit, with each update
//! projected onto the null space of the preserved keys' covariance, and a memory of the keys of
//! earlier edits so that sequential edits protect each other.

use std::collections::BTreeMap;
use std::path::Path;

use faer::Mat;

use super::rank_one::solve::{alphaedit_delta, null_space_projector, to_mat};
use super::rank_one::spread::{grouped_keys_at_layers, spread_edit, MassParams, MassState};
use super::{Edit, EditCtx, Editor, Phases};
use crate::data::EditRequest;
use crate::error::{Error, Result};
use crate::model::Model;

pub struct AlphaEdit {
    params: MassParams,
    threshold: f64,
    l2: f64,
    state: MassState,
    projectors: BTreeMap<usize, Mat<f64>>,
    /// `Σ_l`: the sum of `k kᵀ` over the keys of every edit applied so far, per layer.
    memory: BTreeMap<usize, Mat<f64>>,
}

impl AlphaEdit {
    pub fn from_yaml(path: &Path) -> Result<Self> {
        let params = MassParams::from_yaml(path)?;
        let need = |v: Option<f64>, name: &str| {
            v.ok_or_else(|| Error::file(path, format!("field {name:?} is missing")))
        };
        let threshold = need(params.nullspace_threshold, "nullspace_threshold")?;
        let l2 = need(params.l2, "L2")?;
        Ok(AlphaEdit {
            params,
            threshold,
            l2,
            state: MassState::default(),
            projectors: BTreeMap::new(),
            memory: BTreeMap::new(),
        })
    }

    /// How many edits' keys the memory holds at `layer` (its trace is the sum of squared norms).
    pub fn memory_trace(&self, layer: usize) -> f64 {
        self.memory
            .get(&layer)
            .map_or(0.0, |m| (0..m.nrows()).map(|i| m[(i, i)]).sum())
    }
}

impl Editor for AlphaEdit {
    fn name(&self) -> &'static str {
        "AlphaEdit"
    }

    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn apply(
        &mut self,
        model: &mut Model,
        requests: &[EditRequest],
        ctx: &EditCtx,
    ) -> Result<Edit> {
        let mut phases = Phases::default();
        let (facts, groups) = phases.time("templates", || {
            self.state.prepare(model, requests, &self.params, ctx.seed)
        })?;
        let d_ff = model.spec().d_mlp;
        let statistics_start = std::time::Instant::now();
        if self.projectors.is_empty() {
            let saved = self.params.p_loc.as_deref().map(Path::new);
            let matrices = match saved.filter(|p| p.is_file()) {
                Some(file) => projectors_from_file(file, &self.params.layers, d_ff)?,
                // EasyEdit then writes ./null_space_project.pt; kedit leaves the working
                // directory alone (the covariances it derives from are cached).
                None => self
                    .state
                    .covariances(model, &self.params)?
                    .iter()
                    .map(|c| null_space_projector(c, self.threshold))
                    .collect::<Result<Vec<_>>>()?,
            };
            self.projectors = self.params.layers.iter().copied().zip(matrices).collect();
        }
        phases.add("statistics", statistics_start.elapsed().as_secs_f64());
        let (projectors, memory, l2) = (&self.projectors, &self.memory, self.l2);
        let empty = Mat::<f64>::zeros(d_ff, d_ff);
        let mut edit = spread_edit(
            model,
            &facts,
            &groups,
            &self.params,
            &mut |_, layer, keys, resid| {
                let sigma = memory.get(&layer).unwrap_or(&empty);
                alphaedit_delta(keys, resid, &projectors[&layer], sigma, l2)
            },
        )?;
        // Remember the edited facts' keys, read from the edited model in one pass.
        let mut memory_phase = Phases::default();
        let layer_keys = memory_phase.time("memory", || {
            grouped_keys_at_layers(
                model,
                &self.params.layers,
                &facts,
                &groups,
                self.params.fact_token,
            )
        })?;
        for (&layer, keys) in self.params.layers.iter().zip(layer_keys) {
            let gram = gram(&keys)?;
            *self
                .memory
                .entry(layer)
                .or_insert_with(|| Mat::zeros(d_ff, d_ff)) += gram;
            edit.remembered_keys.insert(layer, keys);
        }
        edit.phases = phases.then(&edit.phases).then(&memory_phase);
        Ok(edit)
    }

    fn undo(&mut self, model: &mut Model, edit: &Edit) -> Result<()> {
        edit.undo(model)?;
        for (layer, keys) in &edit.remembered_keys {
            if let Some(sigma) = self.memory.get_mut(layer) {
                *sigma -= gram(keys)?;
            }
        }
        Ok(())
    }
}

/// The projectors of a `P_loc` file: one `[n_layers, d_ff, d_ff]` tensor, in `layers` order.
fn projectors_from_file(file: &Path, layers: &[usize], d_ff: usize) -> Result<Vec<Mat<f64>>> {
    let stacked = crate::model::load::torch_file::read_single_tensor(file)?;
    let want = [layers.len(), d_ff, d_ff];
    if stacked.dims() != want {
        return Err(Error::file(
            file,
            format!(
                "P_loc holds a {:?} tensor; layers {layers:?} of this model need {want:?}",
                stacked.dims()
            ),
        ));
    }
    (0..layers.len())
        .map(|i| to_mat(&stacked.get(i)?))
        .collect()
}

/// `Kᵀ K` (`[d_ff, d_ff]`, f64) of keys `[n, d_ff]`.
fn gram(keys: &candle_core::Tensor) -> Result<Mat<f64>> {
    let keys = to_mat(keys)?;
    Ok(keys.transpose() * &keys)
}

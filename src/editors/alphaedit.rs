//! AlphaEdit (Fang et al. 2025; SPEC-editors §5): MEMIT's layer-spread edit, with each update
//! projected onto the null space of the preserved keys' covariance, and a memory of the keys of
//! earlier edits so that sequential edits protect each other.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use faer::Mat;

use super::rank_one::solve::{alphaedit_delta, to_mat};
use super::rank_one::spread::{
    grouped_keys_at_layers, spread_edit, templates, MassParams, MassState,
};
use super::rank_one::values::ValueReport;
use super::{Edit, EditCtx, EditReport, Editor, EditorState, Phases};
use crate::data::EditRequest;
use crate::error::{Error, Result};
use crate::model::Model;

pub struct AlphaEdit {
    params: MassParams,
    threshold: f64,
    l2: f64,
    state: MassState,
    projectors: BTreeMap<usize, Mat<f64>>,
    /// `P_l Σ_l`, with `Σ_l` the sum of `k kᵀ` over the keys of every edit applied so far: what
    /// each solve needs, updated by a rank-`n` product per edit (forming it afresh would cost a
    /// `d_ff³` product per layer and edit, 1.5 s of each SmolLM2 edit). `Σ` itself is not kept:
    /// it would be one more `d_ff²` f64 matrix per layer (0.97 GB per layer for LLaMA-2-7B).
    projected_memory: BTreeMap<usize, Mat<f64>>,
    /// The keys behind `projected_memory`, per edit in the order applied: what a saved state holds (a few
    /// rows per edit instead of `d_ff²` per layer), and what undo takes back out.
    remembered: Vec<Remembered>,
    next_edit: u64,
}

/// One edit's keys `[n, d_ff]` per layer.
#[derive(Debug, Clone)]
struct Remembered {
    edit: u64,
    keys: BTreeMap<usize, Tensor>,
}

/// AlphaEdit's report of an edit: the value fits, and which entry of the key memory it added.
#[derive(Debug)]
pub struct AlphaEditReport {
    pub values: ValueReport,
    /// The memory entry this edit added (undo takes it back out).
    pub memory_entry: u64,
    /// How many keys the entry holds, summed over layers.
    pub keys_added: usize,
    pub layers: usize,
}

impl EditReport for AlphaEditReport {
    fn lines(&self) -> Vec<String> {
        let mut lines = self.values.lines();
        lines.push(format!(
            "key memory: {} keys added over {} layers",
            self.keys_added, self.layers
        ));
        lines
    }

    fn to_json(&self) -> serde_json::Value {
        self.values.to_json()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
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
            projected_memory: BTreeMap::new(),
            remembered: Vec::new(),
            next_edit: 0,
        })
    }

    /// The null-space projector of every edited layer: read from `P_loc`, or derived from the
    /// layer's key covariance the first time it is needed.
    fn ensure_projectors(&mut self, model: &Model, ctx: &EditCtx) -> Result<()> {
        if !self.projectors.is_empty() {
            return Ok(());
        }
        let saved = self.params.p_loc.as_deref().map(Path::new);
        let matrices = match saved.filter(|p| p.is_file()) {
            Some(file) => projectors_from_file(file, &self.params.layers, model.spec().d_mlp)?,
            // EasyEdit then writes ./null_space_project.pt; kedit leaves the working
            // directory alone (the covariances it derives from are cached).
            None => self
                .state
                .null_space_projectors(model, &self.params, ctx, self.threshold)?,
        };
        self.projectors = self.params.layers.iter().copied().zip(matrices).collect();
        // A memory restored before the projectors were known is projected here.
        self.projected_memory.clear();
        for entry in self.remembered.clone() {
            self.remember(&entry)?;
        }
        Ok(())
    }

    /// How much of the key memory the solves see at `layer`: the trace of `PΣ`, the summed squared
    /// norms of the remembered keys' null-space parts.
    pub fn memory_trace(&self, layer: usize) -> f64 {
        self.projected_memory
            .get(&layer)
            .map_or(0.0, |m| (0..m.nrows()).map(|i| m[(i, i)]).sum())
    }
}

impl Editor for AlphaEdit {
    fn name(&self) -> &'static str {
        "AlphaEdit"
    }

    fn max_batch(&self) -> usize {
        self.params.max_batch()
    }

    fn prepare(&mut self, model: &Model, ctx: &EditCtx) -> Result<()> {
        templates(model, &self.params, ctx)?;
        self.ensure_projectors(model, ctx)
    }

    fn apply(
        &mut self,
        model: &mut Model,
        requests: &[EditRequest],
        ctx: &EditCtx,
    ) -> Result<Edit> {
        let mut phases = Phases::default();
        let (facts, groups) = phases.time("templates", || {
            self.state.prepare(model, requests, &self.params, ctx)
        })?;
        phases.time("statistics", || self.ensure_projectors(model, ctx))?;
        let (projectors, memory, l2) = (&self.projectors, &self.projected_memory, self.l2);
        let mut edit = spread_edit(
            model,
            &facts,
            &groups,
            &self.params,
            &mut |_, layer, keys, resid| {
                alphaedit_delta(keys, resid, &projectors[&layer], memory.get(&layer), l2)
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
        let entry = Remembered {
            edit: self.next_edit,
            keys: self.params.layers.iter().copied().zip(layer_keys).collect(),
        };
        self.next_edit += 1;
        self.remember(&entry)?;
        edit.phases = phases.then(&edit.phases).then(&memory_phase);
        let values = edit.report_as::<ValueReport>().cloned().unwrap_or_default();
        edit.report = Some(Box::new(AlphaEditReport {
            values,
            memory_entry: entry.edit,
            keys_added: entry.keys.values().map(|k| k.dims()[0]).sum(),
            layers: entry.keys.len(),
        }));
        self.remembered.push(entry);
        Ok(edit)
    }

    fn undo(&mut self, model: &mut Model, edit: &Edit) -> Result<()> {
        edit.undo(model)?;
        let Some(report) = edit.report_as::<AlphaEditReport>() else {
            return Ok(());
        };
        if let Some(at) = self
            .remembered
            .iter()
            .position(|r| r.edit == report.memory_entry)
        {
            let entry = self.remembered.remove(at);
            self.change_memory(&entry, -1.0)?;
        }
        Ok(())
    }

    /// The key memory as the keys of every remembered edit, stacked per layer, on the CPU: keys
    /// restored from a file lie there, those of later edits on the model's device.
    fn state(&self) -> Result<Option<EditorState>> {
        let mut tensors = Vec::new();
        for &layer in &self.params.layers {
            let rows: Vec<Tensor> = self
                .remembered
                .iter()
                .filter_map(|r| r.keys.get(&layer))
                .map(|k| k.to_device(&candle_core::Device::Cpu))
                .collect::<candle_core::Result<_>>()?;
            if !rows.is_empty() {
                tensors.push((format!("keys.layer{layer}"), Tensor::cat(&rows, 0)?));
            }
        }
        let rows_per_edit: Vec<usize> = self
            .remembered
            .iter()
            .map(|r| r.keys.values().next().map_or(0, |k| k.dims()[0]))
            .collect();
        Ok(Some(EditorState {
            header: serde_json::json!({
                "method": "AlphaEdit",
                "layers": self.params.layers,
                "rows_per_edit": rows_per_edit,
            }),
            tensors,
        }))
    }

    /// Rebuilds the memory edit by edit in the saved order, so `PΣ` is summed in the same order.
    fn restore_state(&mut self, state: &EditorState) -> Result<()> {
        let bad = |why: String| Error::Invalid(format!("AlphaEdit state: {why}"));
        let layers: Vec<usize> = serde_json::from_value(state.header["layers"].clone())
            .map_err(|e| bad(format!("layers: {e}")))?;
        if layers != self.params.layers {
            return Err(bad(format!(
                "saved for layers {layers:?}, this editor edits {:?}",
                self.params.layers
            )));
        }
        let rows_per_edit: Vec<usize> =
            serde_json::from_value(state.header["rows_per_edit"].clone())
                .map_err(|e| bad(format!("rows_per_edit: {e}")))?;
        let mut stacked = BTreeMap::new();
        for &layer in &layers {
            let name = format!("keys.layer{layer}");
            match state.tensors.iter().find(|(n, _)| *n == name) {
                Some((_, t)) => {
                    stacked.insert(layer, t.clone());
                }
                None if rows_per_edit.iter().all(|&r| r == 0) => {}
                None => return Err(bad(format!("no tensor {name}"))),
            }
        }
        self.projected_memory.clear();
        self.remembered.clear();
        let mut start = 0;
        for &rows in &rows_per_edit {
            let mut keys = BTreeMap::new();
            for (&layer, all) in &stacked {
                keys.insert(
                    layer,
                    all.narrow(0, start, rows).map_err(|e| bad(e.to_string()))?,
                );
            }
            start += rows;
            let entry = Remembered {
                edit: self.next_edit,
                keys,
            };
            self.next_edit += 1;
            self.remember(&entry)?;
            self.remembered.push(entry);
        }
        Ok(())
    }
}

impl AlphaEdit {
    /// Adds an edit's keys to `PΣ`.
    fn remember(&mut self, entry: &Remembered) -> Result<()> {
        self.change_memory(entry, 1.0)
    }

    /// `PΣ += sign·(PKᵀ)K` for an edit's keys `K` at each layer whose projector is known (before
    /// that, `ensure_projectors` adds every remembered edit once it has them).
    fn change_memory(&mut self, entry: &Remembered, sign: f64) -> Result<()> {
        for (&layer, keys) in &entry.keys {
            let Some(projector) = self.projectors.get(&layer) else {
                continue;
            };
            let keys = to_mat(keys)?;
            let change = (projector * keys.transpose()) * &keys * sign;
            match self.projected_memory.get_mut(&layer) {
                Some(memory) => *memory += change,
                None => {
                    self.projected_memory.insert(layer, change);
                }
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

//! GRACE (Hartvigsen et al. 2023; SPEC-editors §12): a codebook beside one MLP projection. An
//! edit adds a key (the projection's input at the prompt's last token) or widens, moves or splits
//! the radius of a near one, then trains that entry's value with Adam on the target's loss. The
//! base weights never change.
//!
//! Deliberate differences from EasyEdit, each reproducible with `easyedit_compat: true`:
//! - kedit looks up every token of a row (attention is causal, so the prompt's last token has
//!   the edit's key whether the target follows or not); EasyEdit looks up one position, the
//!   most recent edit's, clipped to the row, for every later input.
//! - kedit compares answers by their text; EasyEdit compares the mean of the label ids (prompt
//!   positions counted as −100), and reads the label of the wrong entry once it has two (labels
//!   are prepended while keys are appended).
//! - kedit edits every request of a batch in turn; EasyEdit only the first.
//! - kedit rolls an edit back by the entries it created, EasyEdit by the target string.
//! - A codebook on an up projection (`c_fc`, `up_proj`) replaces the MLP's activation (the down
//!   projection's input) rather than the projection's pre-activation output: the overlay sites
//!   are those of the activation, and a free value there is as expressive.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::super::ft::target_new_inputs;
use super::codebook::{Codebook, Entry, KeyInput, QueryTokens, Replacement};
use crate::data::python_random::PythonRandom;
use crate::data::EditRequest;
use crate::editors::hparams::{float, read_yaml};
use crate::editors::optim::Adam;
use crate::editors::{Change, Edit, EditCtx, EditReport, Editor, OverlayChange};
use crate::error::{Error, Result};
use crate::model::{HookSpec, Intervention, Model, Module, Overlay, Site, TokenBatch};

/// How a new entry's value starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueInit {
    /// Uniform on [0, 1) (seeded by the run's seed and the edit).
    Cold,
    /// The projection's own output at the edited token.
    Warm,
}

/// What an edit near an entry with the same answer does to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RadiusExpansion {
    /// Widen the radius to reach the new query.
    Coverage,
    /// Move the key halfway to the new query and widen the radius to the distance.
    #[serde(alias = "moving_avg")]
    MovingAverage,
}

/// EasyEdit's `GraceHyperParams`, read from `hparams/GRACE/*.yaml` unchanged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraceParams {
    pub alg_name: String,
    #[serde(default)]
    pub model_name: Option<String>,
    #[serde(default)]
    pub device: Option<serde_yaml::Value>,
    /// The wrapped projection (only the first entry is used, as in EasyEdit).
    pub inner_params: Vec<String>,
    #[serde(deserialize_with = "float")]
    pub edit_lr: f64,
    pub n_iter: usize,
    /// A new entry's radius.
    #[serde(deserialize_with = "float")]
    pub eps: f64,
    #[serde(default)]
    pub dist_fn: Option<String>,
    pub val_init: ValueInit,
    #[serde(default)]
    pub val_train: Option<String>,
    /// Read and ignored, as EasyEdit does.
    #[serde(default)]
    pub val_reg: Option<serde_yaml::Value>,
    /// Read and ignored, as EasyEdit does.
    #[serde(default)]
    pub reg: Option<String>,
    pub replacement: Replacement,
    pub eps_expand: RadiusExpansion,
    /// Only for `val_train: adv`, which kedit refuses.
    #[serde(default)]
    pub num_pert: Option<usize>,
    /// Read and ignored, as EasyEdit does.
    #[serde(default, deserialize_with = "float")]
    pub dropout: f64,
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default)]
    pub max_length: Option<usize>,
    #[serde(default)]
    pub model_parallel: Option<bool>,
    /// kedit: reproduce EasyEdit's behaviour (see the module documentation).
    #[serde(default)]
    pub easyedit_compat: bool,
}

pub struct Grace {
    params: GraceParams,
}

/// What one edit did to the codebook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A new entry: no key near enough.
    Added,
    /// A new entry beside a near key with another answer; both radii now meet halfway.
    Split,
    /// The near entry with the same answer now reaches the query (or already did).
    Widened,
    /// The near entry with the same answer moved halfway to the query.
    Moved,
}

/// One request's edit.
#[derive(Debug, Clone, Serialize)]
pub struct CodebookEdit {
    pub edit: u64,
    pub action: Action,
    /// The entry whose value was trained.
    pub entry: usize,
    /// The distance from the query to the nearest key before the edit (none in an empty book).
    pub nearest_distance: Option<f32>,
    pub steps: usize,
    pub final_loss: f64,
    pub entries: usize,
}

/// GRACE's report: one line per request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GraceReport {
    pub codebook_edits: Vec<CodebookEdit>,
}

impl EditReport for GraceReport {
    fn lines(&self) -> Vec<String> {
        self.codebook_edits
            .iter()
            .map(|e| {
                let near = e
                    .nearest_distance
                    .map(|d| format!(", nearest key at {d:.3}"))
                    .unwrap_or_default();
                format!(
                    "codebook: {:?} entry {}{near}; {} steps, final loss {:.4}; {} entries",
                    e.action, e.entry, e.steps, e.final_loss, e.entries
                )
            })
            .collect()
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "codebook_edits": self.codebook_edits })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The query of one edit and everything its value training reuses.
struct Prepared {
    ids: Vec<u32>,
    /// The prompt's last token.
    query_position: usize,
    /// `[1, s, d_key]`: the wrapped projection's input at every token.
    keys_in: Tensor,
    /// `[d_value]`: the projection's own output at the query token.
    base_value: Tensor,
    /// `ResidPost(layer − 1)`, from which each training step resumes.
    below: Option<Tensor>,
    /// EasyEdit's label "hash".
    label_mean: f64,
}

impl Grace {
    pub fn new(params: GraceParams) -> Result<Self> {
        let bad = |field: &str, why: &str| Err(Error::Invalid(format!("GRACE {field}: {why}")));
        if params.inner_params.is_empty() {
            return bad("inner_params", "is empty; name the projection to wrap");
        }
        if params.dist_fn.as_deref().is_some_and(|d| d != "euc") {
            return bad(
                "dist_fn",
                "kedit's codebook measures Euclidean distance (euc) only",
            );
        }
        if params.val_train.as_deref().is_some_and(|v| v != "sgd") {
            return bad(
                "val_train",
                "only sgd is implemented (EasyEdit's YAMLs all use it)",
            );
        }
        if !(params.eps > 0.0 && params.eps.is_finite()) {
            return bad("eps", "must be a positive radius");
        }
        if params.n_iter == 0 {
            return bad("n_iter", "must be at least 1");
        }
        if !(params.edit_lr > 0.0 && params.edit_lr.is_finite()) {
            return bad("edit_lr", "must be positive");
        }
        Ok(Grace { params })
    }

    pub fn from_yaml(path: &Path) -> Result<Self> {
        Self::new(read_yaml(path)?).map_err(|e| Error::file(path, e.to_string()))
    }

    /// The layer and the projection's input the keys come from.
    fn placement(&self, model: &Model) -> Result<(usize, KeyInput)> {
        let name = &self.params.inner_params[0];
        // EasyEdit writes `model.layers[27].mlp...`; checkpoints say `model.layers.27.mlp...`.
        let dotted = name.replace('[', ".").replace(']', "");
        let id = model.weight_id_by_name(&dotted).ok_or_else(|| {
            Error::Invalid(format!(
                "inner_params: {name:?} is not a weight of this model"
            ))
        })?;
        let key_input = match id.module {
            Module::MlpDown => KeyInput::MlpAct,
            Module::MlpUp => KeyInput::MlpIn,
            _ => {
                return Err(Error::Invalid(format!(
                    "inner_params: {name:?} is not an MLP up or down projection, where GRACE's codebook sits"
                )))
            }
        };
        let layer = id
            .layer
            .ok_or_else(|| Error::Invalid(format!("inner_params: {name:?} has no layer")))?;
        Ok((layer, key_input))
    }

    fn prepare(
        &self,
        model: &mut Model,
        r: &EditRequest,
        layer: usize,
        book: &Codebook,
    ) -> Result<Prepared> {
        let n_prompt = model.encode_with_special_tokens(&r.prompt)?.len();
        let ids = model.encode_with_special_tokens(&format!("{} {}", r.prompt, r.target_new))?;
        if n_prompt == 0 || n_prompt >= ids.len() {
            return Err(Error::Invalid(format!(
                "prompt {:?} leaves no target tokens to train on",
                r.prompt
            )));
        }
        let site = book.site(layer);
        let key_site = match book.key_input {
            KeyInput::MlpIn => Site::MlpIn(layer),
            KeyInput::MlpAct => Site::MlpAct(layer),
        };
        let mut hooks = HookSpec::new()
            .capture(key_site)
            .capture(site)
            .stop_after(layer);
        if layer > 0 {
            hooks = hooks.capture(Site::ResidPost(layer - 1));
        }
        let batch = TokenBatch::new(std::slice::from_ref(&ids), 0, model.device())?;
        // The codebook only changes its own site's output, so the keys and the layers below are
        // the same with it; without it, the site shows the projection's own output.
        let installed = model.set_overlay(site, None)?;
        let out = model.forward(&batch, &hooks);
        model.set_overlay(site, installed)?;
        let out = out?;
        let t = n_prompt - 1;
        let keys_in = out.capture(key_site)?.to_dtype(DType::F32)?;
        let base_value = out.capture(site)?.get(0)?.get(t)?.to_dtype(DType::F32)?;
        let below = match layer {
            0 => None,
            l => Some(out.capture(Site::ResidPost(l - 1))?.clone()),
        };
        let label_sum: f64 =
            ids[n_prompt..].iter().map(|&i| f64::from(i)).sum::<f64>() - 100.0 * n_prompt as f64;
        Ok(Prepared {
            label_mean: label_sum / ids.len() as f64,
            ids,
            query_position: t,
            keys_in,
            base_value,
            below,
        })
    }

    /// The codebook after the edit's key decision, the entry to train and what was done.
    fn place_key(
        &self,
        mut book: Codebook,
        prepared: &Prepared,
        r: &EditRequest,
        initial_value: Tensor,
    ) -> Result<(Codebook, usize, Action, Option<f32>)> {
        let eps = self.params.eps as f32;
        let query = prepared
            .keys_in
            .get(0)?
            .get(prepared.query_position)?
            .unsqueeze(0)?;
        let entry = Entry {
            radius: eps,
            answer: r.target_new.clone(),
            label_mean: prepared.label_mean,
            edit: book.next_edit,
        };
        let push = |book: &mut Codebook, entry: Entry| -> Result<usize> {
            book.keys = Tensor::cat(&[&book.keys, &query], 0)?;
            book.values = Tensor::cat(&[&book.values, &initial_value.unsqueeze(0)?], 0)?;
            book.entries.push(entry);
            Ok(book.entries.len() - 1)
        };
        let Some((near, distance)) = book.nearest(&query)?.into_iter().next().flatten() else {
            let j = push(&mut book, entry)?;
            return Ok((book, j, Action::Added, None));
        };
        if distance > eps + book.entries[near].radius {
            let j = push(&mut book, entry)?;
            return Ok((book, j, Action::Added, Some(distance)));
        }
        let same_answer = if self.params.easyedit_compat {
            // EasyEdit's key_labels list is in reverse order of creation.
            let n = book.entries.len();
            book.entries[n - 1 - near].label_mean == prepared.label_mean
        } else {
            book.entries[near].answer == r.target_new
        };
        if !same_answer {
            let j = push(&mut book, entry)?;
            book.entries[near].radius = distance / 2.0 - 1e-5;
            book.entries[j].radius = distance / 2.0;
            return Ok((book, j, Action::Split, Some(distance)));
        }
        let mut action = Action::Widened;
        if distance > book.entries[near].radius {
            if self.params.eps_expand == RadiusExpansion::MovingAverage {
                let moved = ((book.keys.get(near)? + query.squeeze(0)?)? * 0.5)?;
                book.keys = replace_row(&book.keys, near, &moved)?;
                action = Action::Moved;
            }
            book.entries[near].radius = distance;
        }
        Ok((book, near, action, Some(distance)))
    }

    /// Adam on the entry's value (as a shift `δ` of it) against the target's mean NLL, through the
    /// layers above the codebook only.
    fn train_value(
        &self,
        model: &Model,
        book: &Codebook,
        entry: usize,
        layer: usize,
        prepared: &Prepared,
        request: &EditRequest,
    ) -> Result<(Tensor, usize, f64)> {
        let ids = &prepared.ids;
        let s = ids.len();
        let assigned = book.assign(&prepared.keys_in, &[s])?;
        let replaced: Vec<(usize, usize)> = (0..s)
            .filter(|&p| assigned[p] == Some(entry))
            .map(|p| (0, p))
            .collect();
        if !replaced.contains(&(0, prepared.query_position)) {
            return Err(Error::Invalid(format!(
                "GRACE: the edited token does not reach entry {entry} it was placed in (radius {})",
                book.entries[entry].radius
            )));
        }
        // The target tokens' mean NLL, as FT-M scores `prompt + " " + target`.
        let inputs = target_new_inputs(model, std::slice::from_ref(request))?;
        let d_value = book.values.dim(1)?;
        let delta = Var::zeros(d_value, DType::F32, model.device())?;
        let mut opt = Adam::new(vec![delta.clone()], self.params.edit_lr, 0.0)?;
        let site = book.site(layer);
        let mut loss_value = f64::NAN;
        for step in 0..self.params.n_iter {
            let mut hooks = HookSpec::new();
            if let Some(below) = &prepared.below {
                hooks = hooks.resume_after(layer - 1, below.clone());
            }
            let hooks = hooks.intervene(
                site,
                Intervention::AddAt {
                    rows: replaced.clone(),
                    delta: delta.as_tensor().to_dtype(model.dtype())?,
                },
            );
            let loss = inputs.loss(model, &hooks)?;
            loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !loss_value.is_finite() {
                return Err(Error::Invalid(format!(
                    "GRACE: the value loss is {loss_value} at step {step}; lower edit_lr ({})",
                    self.params.edit_lr
                )));
            }
            opt.backward_step(&loss)?;
        }
        // Detached: a value that still tracked δ would switch every later forward pass onto the
        // differentiable (slower, differently rounded) path.
        let trained = (book.values.get(entry)? + delta.as_tensor())?.detach();
        Ok((trained, self.params.n_iter, loss_value))
    }

    fn edit_one(
        &self,
        model: &mut Model,
        book: Codebook,
        r: &EditRequest,
        layer: usize,
        ctx: &EditCtx,
    ) -> Result<(Codebook, CodebookEdit)> {
        let prepared = self.prepare(model, r, layer, &book)?;
        let initial = match self.params.val_init {
            ValueInit::Warm => prepared.base_value.clone(),
            ValueInit::Cold => {
                let key = format!("{}\n{}\n{}", book.next_edit, r.prompt, r.target_new);
                let seed = crate::data::stable_hash::stable_hash(ctx.seed, &[&key]);
                let mut rng = PythonRandom::new(seed);
                let n = prepared.base_value.dim(0)?;
                let draws: Vec<f32> = (0..n).map(|_| rng.random() as f32).collect();
                Tensor::from_vec(draws, n, model.device())?
            }
        };
        let (mut book, entry, action, nearest_distance) =
            self.place_key(book, &prepared, r, initial)?;
        let edit = book.next_edit;
        book.next_edit += 1;
        if self.params.easyedit_compat {
            book.query = QueryTokens::Fixed {
                position: prepared.query_position,
            };
        }
        let site = book.site(layer);
        let placed: Arc<dyn Overlay> = Arc::new(book.clone());
        let before = model.set_overlay(site, Some(placed))?;
        let trained = self.train_value(model, &book, entry, layer, &prepared, r);
        model.set_overlay(site, before)?;
        let (value, steps, final_loss) = trained?;
        book.values = replace_row(&book.values, entry, &value)?;
        let entries = book.len();
        Ok((
            book,
            CodebookEdit {
                edit,
                action,
                entry,
                nearest_distance,
                steps,
                final_loss,
                entries,
            },
        ))
    }
}

/// `matrix` with row `i` replaced by `row`.
fn replace_row(matrix: &Tensor, i: usize, row: &Tensor) -> Result<Tensor> {
    let n = matrix.dim(0)?;
    let mut parts = Vec::with_capacity(3);
    if i > 0 {
        parts.push(matrix.narrow(0, 0, i)?);
    }
    parts.push(row.unsqueeze(0)?.to_dtype(matrix.dtype())?);
    if i + 1 < n {
        parts.push(matrix.narrow(0, i + 1, n - i - 1)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

impl Editor for Grace {
    fn name(&self) -> &'static str {
        "GRACE"
    }

    fn apply(
        &mut self,
        model: &mut Model,
        requests: &[EditRequest],
        ctx: &EditCtx,
    ) -> Result<Edit> {
        let (layer, key_input) = self.placement(model)?;
        let mut done = Edit::default();
        let mut report = GraceReport::default();
        for r in requests {
            let outcome = (|| {
                let site = Codebook::site_for(key_input, layer);
                let before = model.overlay(site).cloned();
                let book = match &before {
                    None => {
                        let spec = model.spec();
                        let (d_key, d_value) = match key_input {
                            KeyInput::MlpAct => (spec.d_mlp, spec.d_model),
                            KeyInput::MlpIn => (spec.d_model, spec.d_mlp),
                        };
                        Codebook::empty(
                            key_input,
                            self.params.replacement,
                            QueryTokens::Every,
                            d_key,
                            d_value,
                            model.device(),
                        )?
                    }
                    Some(o) => {
                        let mut book =
                            o.as_any()
                                .downcast_ref::<Codebook>()
                                .cloned()
                                .ok_or_else(|| {
                                    Error::Invalid(format!(
                                        "GRACE: a {} overlay already sits at {site}",
                                        o.kind()
                                    ))
                                })?;
                        book.replacement = self.params.replacement;
                        book
                    }
                };
                let (book, edit) = self.edit_one(model, book, r, layer, ctx)?;
                let after: Arc<dyn Overlay> = Arc::new(book);
                model.set_overlay(site, Some(after.clone()))?;
                Ok::<_, Error>((
                    Change::Overlay(OverlayChange {
                        site,
                        before,
                        after: Some(after),
                    }),
                    edit,
                ))
            })();
            match outcome {
                Ok((change, edit)) => {
                    done.changes.push(change);
                    report.codebook_edits.push(edit);
                }
                Err(e) => {
                    // Nothing half-made: the requests already edited are taken back.
                    done.undo(model)?;
                    return Err(e);
                }
            }
        }
        done.report = Some(Box::new(report));
        Ok(done)
    }

    /// The latest edit is undone exactly; an earlier one (a rollback) removes the entries it
    /// created from the current codebook and leaves every other entry as it is now.
    fn undo(&mut self, model: &mut Model, edit: &Edit) -> Result<()> {
        let latest = edit.changes.last().is_some_and(|c| match c {
            Change::Overlay(o) => match (model.overlay(o.site), &o.after) {
                (Some(now), Some(after)) => Arc::ptr_eq(now, after),
                _ => false,
            },
            Change::Weight(_) => false,
        });
        if latest {
            return edit.undo(model);
        }
        for change in &edit.changes {
            let Change::Overlay(o) = change else { continue };
            let Some(book) = model.overlay_as::<Codebook>(o.site).cloned() else {
                continue;
            };
            // The entries this change created: in its codebook after, not in the one before.
            let ids = |o: &Option<Arc<dyn Overlay>>| -> Vec<u64> {
                o.as_ref()
                    .and_then(|o| o.as_any().downcast_ref::<Codebook>())
                    .map(|b| b.entries.iter().map(|e| e.edit).collect())
                    .unwrap_or_default()
            };
            let earlier = ids(&o.before);
            let created: Vec<u64> = ids(&o.after)
                .into_iter()
                .filter(|id| !earlier.contains(id))
                .collect();
            let keep: Vec<u32> = (0..book.len() as u32)
                .filter(|&i| !created.contains(&book.entries[i as usize].edit))
                .collect();
            let index = Tensor::new(keep.as_slice(), model.device())?;
            let reduced = Codebook {
                keys: book.keys.index_select(&index, 0)?,
                values: book.values.index_select(&index, 0)?,
                entries: keep
                    .iter()
                    .map(|&i| book.entries[i as usize].clone())
                    .collect(),
                ..book
            };
            model.set_overlay(o.site, Some(Arc::new(reduced)))?;
        }
        Ok(())
    }
}

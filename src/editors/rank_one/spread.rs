//! The mass-editing skeleton MEMIT and AlphaEdit share (SPEC-editors §4–5): optimise a target
//! residual `z` per fact at the last edited layer, then walk the layers in ascending order, giving
//! each `1/(layers left)` of the remaining error through a per-layer closed-form solve that the
//! method supplies, with keys and residuals recomputed on the partially edited model.

use candle_core::Tensor;
use faer::Mat;
use serde::Deserialize;

use super::keys::{activations_at, activations_at_sites, template_positions};
use super::solve::{from_mat, to_mat};
use super::values::{optimise_value, ValueParams, ValueReport};
use super::{rewrite_weight, FactEdit};
use crate::editors::hparams::{float, float_or_false, read_yaml};
use crate::editors::{Edit, EditCtx, Phases, WeightChange};
use crate::error::{Error, Result};
use crate::model::subject::FactToken;
use crate::model::{Model, Site};

/// EasyEdit's `MEMITHyperParams`, and `AlphaEditHyperParams` (the same plus `P_loc`,
/// `nullspace_threshold`, `L2`), read from their YAML files unchanged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MassParams {
    pub alg_name: String,
    pub layers: Vec<usize>,
    /// EasyEdit's MEMIT knows only `all` (every layer of `layers` takes part); any other value
    /// is refused.
    #[serde(default)]
    pub layer_selection: Option<String>,
    pub fact_token: FactToken,
    pub v_num_grad_steps: usize,
    #[serde(deserialize_with = "float")]
    pub v_lr: f64,
    pub v_loss_layer: usize,
    #[serde(deserialize_with = "float")]
    pub v_weight_decay: f64,
    #[serde(deserialize_with = "float")]
    pub clamp_norm_factor: f64,
    #[serde(deserialize_with = "float")]
    pub kl_factor: f64,
    /// Read but ignored, as by EasyEdit's MEMIT: the statistics are always used.
    #[serde(default)]
    pub mom2_adjustment: Option<bool>,
    #[serde(deserialize_with = "float")]
    pub mom2_update_weight: f64,
    #[serde(deserialize_with = "crate::model::module_template")]
    pub rewrite_module_tmp: crate::model::ModuleTemplate,
    pub mom2_n_samples: usize,
    /// Refused when present: EasyEdit's editing code for these methods never reads it.
    #[serde(default)]
    pub max_length: Option<usize>,
    /// Requests per edit call, as EasyEdit's `batch_edit` chunks them (default: all at once).
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// AlphaEdit: saved projectors `[n_layers, d_ff, d_ff]` (torch.save or safetensors), used when
    /// the file exists; otherwise they are computed from the key statistics.
    #[serde(default, rename = "P_loc")]
    pub p_loc: Option<String>,
    #[serde(default, deserialize_with = "float_or_false")]
    pub nullspace_threshold: Option<f64>,
    #[serde(default, rename = "L2", deserialize_with = "float_or_false")]
    pub l2: Option<f64>,
    /// kedit extension: fixed context templates `[["{}"], [...]]` instead of sampled ones.
    #[serde(default)]
    pub context_templates: Option<Vec<Vec<String>>>,
    /// kedit extension: a corpus file for the key statistics (default: built-in WikiText-2).
    #[serde(default)]
    pub mom2_corpus: Option<std::path::PathBuf>,
}

impl MassParams {
    pub fn from_yaml(path: &std::path::Path) -> Result<Self> {
        let p: MassParams = read_yaml(path)?;
        if p.layers.is_empty() {
            return Err(Error::file(path, "layers is empty"));
        }
        let mut sorted = p.layers.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted != p.layers {
            return Err(Error::file(path, "layers must be distinct and ascending"));
        }
        if let Some(other) = p.layer_selection.as_deref().filter(|s| *s != "all") {
            return Err(Error::file(
                path,
                format!("layer_selection {other:?} is not supported: kedit, as EasyEdit, implements only \"all\""),
            ));
        }
        if p.max_length.is_some() {
            return Err(Error::file(
                path,
                format!(
                    "max_length is not used by {} (it sets no editing step); remove it",
                    p.alg_name
                ),
            ));
        }
        if p.batch_size == Some(0) {
            return Err(Error::file(path, "batch_size must be at least 1"));
        }
        Ok(p)
    }

    /// Most requests one edit call takes: `batch_size`, else all.
    pub fn max_batch(&self) -> usize {
        self.batch_size.unwrap_or(usize::MAX)
    }

    fn value_params(&self) -> ValueParams {
        let z_layer = self.layers.last().copied().unwrap_or(0);
        ValueParams {
            site: Site::ResidPost(z_layer),
            loss_layer: self.v_loss_layer,
            steps: self.v_num_grad_steps,
            lr: self.v_lr,
            weight_decay: self.v_weight_decay,
            clamp_norm_factor: self.clamp_norm_factor,
            kl_factor: self.kl_factor,
            fact_token: self.fact_token,
        }
    }
}

/// The key of each fact at `layer` (`[n, d_ff]`): the mean over each template group, then the
/// mean of the group means.
pub fn grouped_keys(
    model: &Model,
    layer: usize,
    facts: &[FactEdit],
    groups: &[Vec<String>],
    rule: FactToken,
) -> Result<Tensor> {
    Ok(grouped_keys_at_layers(model, &[layer], facts, groups, rule)?.remove(0))
}

/// [`grouped_keys`] at several layers, from one forward pass (one `[n, d_ff]` tensor per layer).
pub fn grouped_keys_at_layers(
    model: &Model,
    layers: &[usize],
    facts: &[FactEdit],
    groups: &[Vec<String>],
    rule: FactToken,
) -> Result<Vec<Tensor>> {
    // Every fact's every template in one batched pass, then the means.
    let mut items = Vec::new();
    let mut spans = Vec::with_capacity(facts.len() * groups.len());
    for fact in facts {
        for group in groups {
            let start = items.len();
            items.extend(template_positions(
                model,
                group,
                &fact.prompt,
                &fact.subject,
                rule,
            )?);
            spans.push((start, items.len() - start));
        }
    }
    let sites: Vec<Site> = layers.iter().map(|&l| Site::MlpAct(l)).collect();
    activations_at_sites(model, &sites, &items)?
        .iter()
        .map(|acts| {
            let rows = spans
                .chunks(groups.len().max(1))
                .map(|fact_spans| {
                    let means = fact_spans
                        .iter()
                        .map(|&(start, len)| Ok(acts.narrow(0, start, len)?.mean(0)?))
                        .collect::<Result<Vec<_>>>()?;
                    Ok(Tensor::stack(&means, 0)?.mean(0)?)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::stack(&rows, 0)?)
        })
        .collect()
}

/// The residual at `layer`'s output at each fact's token in its plain prompt (`[n, d]`).
fn plain_residuals(
    model: &Model,
    layer: usize,
    facts: &[FactEdit],
    rule: FactToken,
) -> Result<Tensor> {
    let mut items = Vec::with_capacity(facts.len());
    for fact in facts {
        items.extend(template_positions(
            model,
            &["{}".to_string()],
            &fact.prompt,
            &fact.subject,
            rule,
        )?);
    }
    activations_at(model, Site::ResidPost(layer), &items)
}

/// A method's per-layer solve: `(i, layer, keys [n, d_ff], residuals [n, d]) → ΔW [d, d_ff]`.
pub type LayerSolve<'a> = dyn FnMut(usize, usize, &Mat<f64>, &Mat<f64>) -> Result<Mat<f64>> + 'a;

/// Runs the skeleton: `solve(i, layer, keys, residuals)` returns layer `i`'s `ΔW` (`[d, d_ff]`,
/// f64), applied at once so later layers see it. On an error the model is left as it came.
pub fn spread_edit(
    model: &mut Model,
    facts: &[FactEdit],
    groups: &[Vec<String>],
    params: &MassParams,
    solve: &mut LayerSolve<'_>,
) -> Result<Edit> {
    let value = params.value_params();
    let flat: Vec<String> = groups.iter().flatten().cloned().collect();
    let mut phases = Phases::default();
    let values = phases.time("values", || {
        facts
            .iter()
            .map(|f| optimise_value(model, &f.prompt, &f.subject, &f.target_ids, &flat, &value))
            .collect::<Result<Vec<_>>>()
    })?;
    let targets: Vec<Tensor> = values.iter().map(|v| v.target.clone()).collect();
    let z = Tensor::stack(&targets, 0)?;
    let z_layer = *params
        .layers
        .last()
        .ok_or_else(|| Error::Invalid("layers is empty".into()))?;
    let mut changes = Vec::with_capacity(params.layers.len());
    let result = (|| -> Result<()> {
        for (i, &layer) in params.layers.iter().enumerate() {
            let id = rewrite_weight(model, &params.rewrite_module_tmp, layer)?;
            let (keys, current) = phases.time("keys", || {
                Ok((
                    to_mat(&grouped_keys(
                        model,
                        layer,
                        facts,
                        groups,
                        params.fact_token,
                    )?)?,
                    plain_residuals(model, z_layer, facts, params.fact_token)?,
                ))
            })?;
            let solve_start = std::time::Instant::now();
            let resid = ((&z - &current)? / (params.layers.len() - i) as f64)?;
            let delta = solve(i, layer, &keys, &to_mat(&resid)?)?;
            let before = model.weight(id)?;
            let delta = from_mat(&delta, before.device())?.to_dtype(before.dtype())?;
            let after = (&before + delta)?;
            model.replace_weight(id, after.clone())?;
            changes.push(WeightChange { id, before, after });
            phases.add("solve", solve_start.elapsed().as_secs_f64());
        }
        Ok(())
    })();
    let mut edit = Edit::of_weights(changes);
    edit.phases = phases;
    edit.report = Some(Box::new(ValueReport {
        value_fits: values.iter().map(|v| v.fit).collect(),
    }));
    if let Err(e) = result {
        edit.undo(model)?;
        return Err(e);
    }
    Ok(edit)
}

/// What a mass editor keeps between calls: the key covariances, computed once per model
/// (EasyEdit keeps them in process globals).
#[derive(Default)]
pub struct MassState {
    covariances: super::stats::CovarianceCache,
}

impl MassState {
    /// The requests as facts, with the grouped context templates.
    pub fn prepare(
        &mut self,
        model: &Model,
        requests: &[crate::data::EditRequest],
        params: &MassParams,
        ctx: &EditCtx,
    ) -> Result<(Vec<FactEdit>, Vec<Vec<String>>)> {
        let facts = requests
            .iter()
            .map(|r| FactEdit::new(model, r))
            .collect::<Result<Vec<_>>>()?;
        Ok((facts, templates(model, params, ctx)?))
    }

    /// `E[k kᵀ]` of every edited layer, from the statistics store (computed on first use).
    pub fn covariances(
        &mut self,
        model: &Model,
        params: &MassParams,
        ctx: &EditCtx,
    ) -> Result<super::stats::Covariances> {
        self.covariances.get(
            model,
            &params.layers,
            params.mom2_n_samples,
            params.mom2_corpus.as_deref(),
            &ctx.stats,
        )
    }

    /// AlphaEdit's null-space projector of each edited layer, derived from its statistics at
    /// `threshold` and cached beside them.
    pub fn null_space_projectors(
        &mut self,
        model: &Model,
        params: &MassParams,
        ctx: &EditCtx,
        threshold: f64,
    ) -> Result<Vec<Mat<f64>>> {
        self.covariances.derived(
            model,
            &params.layers,
            params.mom2_n_samples,
            params.mom2_corpus.as_deref(),
            &ctx.stats,
            &format!("nullspace-{threshold:e}"),
            &|c| super::solve::null_space_projector(c, threshold),
        )
    }
}

/// The grouped context templates: fixed by the file, or sampled once per model and seed.
pub fn templates(model: &Model, params: &MassParams, ctx: &EditCtx) -> Result<Vec<Vec<String>>> {
    if let Some(fixed) = &params.context_templates {
        return Ok(fixed.clone());
    }
    let key = format!("memit {} seed {}", model.origin().source, ctx.seed);
    ctx.templates
        .get_or_sample(&key, || super::templates::memit_templates(model, ctx.seed))
}

//! ROME (Meng et al. 2022; SPEC-editors §3): one rank-one update of an MLP down projection per
//! layer, writing the optimised value `v*` at the subject's key.

use std::path::Path;

use serde::Deserialize;

use super::hparams::{float, read_yaml};
use super::rank_one::stats::{CovarianceCache, Covariances};
use super::rank_one::values::{optimise_value, ValueParams, ValueReport};
use super::rank_one::{keys, rewrite_weight, solve, templates, FactEdit};
use super::{Edit, EditCtx, Editor, Phases, WeightChange};
use crate::data::EditRequest;
use crate::error::{Error, Result};
use crate::model::subject::FactToken;
use crate::model::{Model, Site};

/// EasyEdit's `ROMEHyperParams`, read from `hparams/ROME/*.yaml` unchanged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RomeParams {
    pub alg_name: String,
    pub layers: Vec<usize>,
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
    pub mom2_adjustment: bool,
    pub context_template_length_params: Vec<[usize; 2]>,
    #[serde(deserialize_with = "crate::model::module_template")]
    pub rewrite_module_tmp: crate::model::ModuleTemplate,
    #[serde(default)]
    pub mom2_n_samples: Option<usize>,
    /// Refused when present: EasyEdit's ROME never reads it.
    #[serde(default)]
    pub max_length: Option<usize>,
    /// kedit extension: fixed context templates instead of sampled ones (each with one `{}`).
    #[serde(default)]
    pub context_templates: Option<Vec<String>>,
    /// kedit extension: a corpus file for the key statistics (default: built-in WikiText-2).
    #[serde(default)]
    pub mom2_corpus: Option<std::path::PathBuf>,
}

pub struct Rome {
    params: RomeParams,
    covariances: CovarianceCache,
}

impl Rome {
    pub fn new(params: RomeParams) -> Result<Self> {
        if params.layers.is_empty() {
            return Err(Error::Invalid("ROME: layers is empty".into()));
        }
        if params.max_length.is_some() {
            return Err(Error::Invalid(
                "max_length is not used by ROME (it sets no editing step); remove it".into(),
            ));
        }
        if let Some(t) = &params.context_templates {
            if t.is_empty() || t.iter().any(|t| t.matches("{}").count() != 1) {
                return Err(Error::Invalid(
                    "context_templates must be a non-empty list of strings with one {} each".into(),
                ));
            }
        }
        Ok(Rome {
            params,
            covariances: CovarianceCache::default(),
        })
    }

    pub fn from_yaml(path: &Path) -> Result<Self> {
        Self::new(read_yaml(path)?).map_err(|e| match e {
            Error::Invalid(msg) => Error::file(path, msg),
            other => other,
        })
    }

    fn sorted_layers(&self) -> Vec<usize> {
        let mut layers = self.params.layers.clone();
        layers.sort_unstable();
        layers
    }

    /// `E[k kᵀ]` of the edited layers (in ascending order), when the file asks for them.
    fn covariances(&mut self, model: &Model, ctx: &EditCtx) -> Result<Option<Covariances>> {
        if !self.params.mom2_adjustment {
            return Ok(None);
        }
        let layers = self.sorted_layers();
        let p = &self.params;
        self.covariances
            .get(
                model,
                &layers,
                p.mom2_n_samples.unwrap_or(100_000),
                p.mom2_corpus.as_deref(),
                &ctx.stats,
            )
            .map(Some)
    }

    /// Fixed by the file, or sampled once per model, lengths and seed and shared through the
    /// context's cache, as EasyEdit caches them per process.
    fn templates(&self, model: &Model, ctx: &EditCtx) -> Result<Vec<String>> {
        if let Some(fixed) = &self.params.context_templates {
            return Ok(fixed.clone());
        }
        let lengths = &self.params.context_template_length_params;
        let key = format!(
            "rome {} {lengths:?} seed {}",
            model.origin().source,
            ctx.seed
        );
        let groups = ctx.templates.get_or_sample(&key, || {
            Ok(vec![templates::rome_templates(model, lengths, ctx.seed)?])
        })?;
        Ok(groups.into_iter().flatten().collect())
    }
}

impl Editor for Rome {
    fn name(&self) -> &'static str {
        "ROME"
    }

    fn max_batch(&self) -> usize {
        1
    }

    fn prepare(&mut self, model: &Model, ctx: &EditCtx) -> Result<()> {
        self.templates(model, ctx)?;
        self.covariances(model, ctx)?;
        Ok(())
    }

    fn apply(
        &mut self,
        model: &mut Model,
        requests: &[EditRequest],
        ctx: &EditCtx,
    ) -> Result<Edit> {
        let [request] = requests else {
            return Err(Error::Invalid(format!(
                "ROME edits one fact at a time, got {}",
                requests.len()
            )));
        };
        let fact = FactEdit::new(model, request)?;
        let mut phases = Phases::default();
        let templates = phases.time("templates", || self.templates(model, ctx))?;
        let mut changes: Vec<WeightChange> = Vec::new();
        let layers = self.sorted_layers();
        let mut value_fits = Vec::with_capacity(layers.len());
        let covariances = phases.time("statistics", || self.covariances(model, ctx))?;
        let p = &self.params;
        let result = (|| -> Result<()> {
            for (layer_index, &layer) in layers.iter().enumerate() {
                let id = rewrite_weight(model, &p.rewrite_module_tmp, layer)?;
                let u = phases.time("keys", || {
                    keys::mean_key(
                        model,
                        layer,
                        &templates,
                        &fact.prompt,
                        &fact.subject,
                        p.fact_token,
                    )
                })?;
                // With statistics, the key direction is C⁻¹k̄ (solved in f64; EasyEdit inverts C in f32).
                let u = match &covariances {
                    Some(c) => solve::solve_vector(c.layer_owned(layer_index)?, &u)?,
                    None => u,
                };
                let u = (&u / u.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64)?;
                let value = phases.time("values", || {
                    optimise_value(
                        model,
                        &fact.prompt,
                        &fact.subject,
                        &fact.target_ids,
                        &templates,
                        &ValueParams {
                            site: Site::MlpOut(layer),
                            loss_layer: p.v_loss_layer,
                            steps: p.v_num_grad_steps,
                            lr: p.v_lr,
                            weight_decay: p.v_weight_decay,
                            clamp_norm_factor: p.clamp_norm_factor,
                            kl_factor: p.kl_factor,
                            fact_token: p.fact_token,
                        },
                    )
                })?;
                value_fits.push(value.fit);
                let solve_start = std::time::Instant::now();
                let plain = keys::template_positions(
                    model,
                    &["{}".to_string()],
                    &fact.prompt,
                    &fact.subject,
                    p.fact_token,
                )?;
                // k* and o*: the down projection's input and output, from one pass.
                let io = keys::activations_at_sites(
                    model,
                    &[Site::MlpAct(layer), Site::MlpOut(layer)],
                    &plain,
                )?;
                let (k_star, o_star) = (io[0].get(0)?, io[1].get(0)?);
                let (_, delta) = solve::rank_one(&u, &k_star, &o_star, &value.target)?;
                let before = model.weight(id)?;
                let after = (&before + delta.to_dtype(before.dtype())?)?;
                model.replace_weight(id, after.clone())?;
                changes.push(WeightChange { id, before, after });
                phases.add("solve", solve_start.elapsed().as_secs_f64());
            }
            Ok(())
        })();
        let mut edit = Edit::of_weights(changes);
        if let Err(e) = result {
            edit.undo(model)?;
            return Err(e);
        }
        edit.phases = phases;
        edit.report = Some(Box::new(ValueReport { value_fits }));
        Ok(edit)
    }
}

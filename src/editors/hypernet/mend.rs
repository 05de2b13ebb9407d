//! MEND (SPEC-editors §8): an edit's gradient on the chosen MLP matrices, taken apart into
//! per-token factors, transformed by a trained network per weight shape, and applied as the
//! pseudo-gradient `Σₙ δ̃ₙ x̃ₙᵀ` times a learned step per weight. Trained by [`MendTrainee`] through
//! the training loop of `crate::run::train`; applied at test time by the [`Editor`] impl.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::network::{GradientNet, LowRankLayer, NetShape, RunningMoments};
use super::{gradient_factors, kl_from_base, AnswerBatch, Factors};
use crate::data::EditRequest;
use crate::editors::hparams::{float, read_yaml};
use crate::editors::optim::Adam;
use crate::editors::{Edit, EditCtx, Editor, WeightChange};
use crate::error::{Error, Result};
use crate::model::{HookSpec, Model, Site, WeightId};
use crate::run::train::{EarlyStopping, Metrics, Outcome, Trainee};

/// EasyEdit's `MENDHyperParams` and `MENDTrainingHparams`, read from `hparams/MEND/*.yaml` or
/// `hparams/TRAINING/MEND/*.yaml` unchanged. Fields EasyEdit reads for its own bookkeeping (paths,
/// devices, logging) are accepted and ignored; variants kedit does not implement are refused by
/// name in [`MendParams::check`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MendParams {
    #[serde(default, alias = "alg")]
    pub alg_name: Option<String>,
    pub inner_params: Vec<String>,
    #[serde(default)]
    pub archive: Option<String>,
    #[serde(deserialize_with = "float")]
    pub lr: f64,
    #[serde(deserialize_with = "float")]
    pub edit_lr: f64,
    /// Read but unused: EasyEdit's second optimiser over the step sizes sees gradients its first
    /// optimiser has already zeroed, so the steps train at `lr` (SPEC §8.5 step 7); kedit does
    /// the same in one optimiser.
    #[serde(default, deserialize_with = "float")]
    pub lr_lr: f64,
    #[serde(default, deserialize_with = "float")]
    pub lr_scale: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(deserialize_with = "float")]
    pub cedit: f64,
    #[serde(deserialize_with = "float")]
    pub cloc: f64,
    #[serde(default, deserialize_with = "float")]
    pub cbase: f64,
    #[serde(default, deserialize_with = "float")]
    pub dropout: f64,
    #[serde(default)]
    pub train_base: bool,
    #[serde(default)]
    pub no_grad_layers: Option<serde_yaml::Value>,
    #[serde(default)]
    pub one_sided: bool,
    pub n_hidden: usize,
    #[serde(default)]
    pub hidden_dim: Option<usize>,
    pub init: String,
    pub norm: bool,
    pub combine: bool,
    #[serde(default)]
    pub x_only: bool,
    #[serde(default)]
    pub delta_only: bool,
    #[serde(default)]
    pub act: Option<String>,
    pub rank: usize,
    pub mlp_class: String,
    pub shared: bool,
    // Training schedule (the TRAINING files; the edit files carry them too).
    #[serde(default = "one")]
    pub batch_size: usize,
    #[serde(default = "one")]
    pub val_batch_size: usize,
    #[serde(default = "one")]
    pub accumulate_bs: usize,
    #[serde(default)]
    pub max_iters: usize,
    #[serde(default)]
    pub val_interval: usize,
    #[serde(default)]
    pub val_steps: usize,
    #[serde(default)]
    pub early_stop_patience: usize,
    #[serde(default)]
    pub early_stop_key: Option<String>,
    #[serde(default)]
    pub opt: Option<String>,
    #[serde(default, deserialize_with = "float")]
    pub grad_clip: f64,
    #[serde(default)]
    pub max_length: Option<usize>,
    // EasyEdit's bookkeeping, read and ignored.
    #[serde(default)]
    pub model_class: Option<String>,
    #[serde(default)]
    pub tokenizer_class: Option<String>,
    #[serde(default)]
    pub tokenizer_name: Option<String>,
    #[serde(default)]
    pub model_save_pt: Option<usize>,
    #[serde(default)]
    pub silent: Option<bool>,
    #[serde(default)]
    pub log_interval: Option<usize>,
    #[serde(default)]
    pub eval_log_interval: Option<usize>,
    #[serde(default)]
    pub final_eval: Option<bool>,
    #[serde(default)]
    pub eval_only: Option<bool>,
    #[serde(default)]
    pub half: Option<bool>,
    #[serde(default)]
    pub debug: Option<bool>,
    #[serde(default)]
    pub save: Option<bool>,
    #[serde(default)]
    pub verbose: Option<bool>,
    #[serde(default)]
    pub results_dir: Option<String>,
}

fn one() -> usize {
    1
}

impl MendParams {
    pub fn from_yaml(path: &Path) -> Result<Self> {
        let params: MendParams = read_yaml(path)?;
        params.check().map_err(|msg| Error::file(path, msg))?;
        Ok(params)
    }

    /// Refuses the variants of EasyEdit's MEND that kedit does not implement, by field.
    fn check(&self) -> std::result::Result<(), String> {
        let unsupported = [
            (!self.combine, "combine: false (separate x and δ networks)"),
            (self.one_sided, "one_sided: true"),
            (self.x_only, "x_only: true"),
            (self.delta_only, "delta_only: true"),
            (!self.shared, "shared: false (one network per weight)"),
            (
                self.train_base,
                "train_base: true (training the base model)",
            ),
            (self.mlp_class != "IDMLP", "an mlp_class other than IDMLP"),
            (self.init != "id", "an init other than id"),
        ];
        if let Some((_, what)) = unsupported.iter().find(|(bad, _)| *bad) {
            return Err(format!(
                "kedit's MEND implements EasyEdit's published configuration (combine, shared, \
                 IDMLP, id init, frozen base); this file asks for {what}"
            ));
        }
        if self.inner_params.is_empty() {
            return Err("inner_params is empty: MEND needs at least one weight to edit".into());
        }
        if self.rank == 0 {
            return Err("rank must be at least 1".into());
        }
        Ok(())
    }
}

/// Which network transforms a weight's factors, and as which of its modes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EditedWeight {
    /// The checkpoint name, as `inner_params` spells it.
    pub name: String,
    #[serde(with = "weight_id_text")]
    pub id: WeightId,
    /// The shape key, `(in, out)` as EasyEdit writes it.
    pub net: String,
    pub mode: usize,
}

/// A weight id in a checkpoint header, as its display string (`29.mlp_down`).
mod weight_id_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::model::WeightId;

    pub fn serialize<S: Serializer>(id: &WeightId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<WeightId, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A MEND editor: its networks, step sizes and the weights they edit.
pub struct Mend {
    pub params: MendParams,
    pub weights: Vec<EditedWeight>,
    pub nets: BTreeMap<String, GradientNet>,
    /// One learned step per edited weight, `[n_weights]`.
    pub edit_lrs: Var,
}

impl Mend {
    /// An untrained editor for `model`: identity networks, every step `edit_lr`.
    pub fn new(model: &Model, params: MendParams) -> Result<Self> {
        let mut weights = Vec::new();
        let mut shapes: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
        for name in &params.inner_params {
            let id = model.weight_id_by_name(name).ok_or_else(|| {
                Error::Invalid(format!(
                    "inner_params: {name:?} is not a weight of this model"
                ))
            })?;
            super::factor_sites(id)?;
            let (out, inp) = model.weight(id)?.dims2()?;
            let net = format!("({inp}, {out})");
            let entry = shapes.entry(net.clone()).or_insert((inp, out, 0));
            weights.push(EditedWeight {
                name: name.clone(),
                id,
                net,
                mode: entry.2,
            });
            entry.2 += 1;
        }
        let shape = NetShape {
            n_hidden: params.n_hidden,
            rank: params.rank,
            normalise: params.norm,
        };
        let dtype = match model.dtype() {
            DType::F64 => DType::F64,
            _ => DType::F32,
        };
        let nets = shapes
            .into_iter()
            .enumerate()
            .map(|(i, (key, (inp, out, modes)))| {
                let seed = params.seed.wrapping_add(i as u64);
                let net = GradientNet::new(inp, out, modes, shape, seed, (model.device(), dtype))?;
                Ok((key, net))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        let edit_lrs = Var::from_tensor(
            &Tensor::full(params.edit_lr, weights.len(), model.device())?.to_dtype(dtype)?,
        )?;
        Ok(Mend {
            params,
            weights,
            nets,
            edit_lrs,
        })
    }

    /// Every trainable tensor: the networks' parameters, then the step sizes.
    pub fn vars(&self) -> Vec<Var> {
        let mut vars: Vec<Var> = self.nets.values().flat_map(GradientNet::vars).collect();
        vars.push(self.edit_lrs.clone());
        vars
    }

    /// The lowest layer an edit changes: everything below it is the same before and after.
    fn lowest_layer(&self) -> usize {
        self.weights
            .iter()
            .filter_map(|w| w.id.layer)
            .min()
            .unwrap_or(0)
    }

    /// Each weight's change `ηᵢ Σₙ δ̃ₙ x̃ₙᵀ` (`[out, in]`), from its gradient factors. In training
    /// the networks' moments take the factors in and the result carries the networks' graph.
    pub fn updates(&mut self, factors: &[Factors], training: bool) -> Result<Vec<Tensor>> {
        if factors.len() != self.weights.len() {
            return Err(Error::Invalid(format!(
                "{} factor sets for {} edited weights",
                factors.len(),
                self.weights.len()
            )));
        }
        // Each network takes all its weights at once, in inner_params order.
        let mut transformed: Vec<Option<(Tensor, Tensor)>> = vec![None; self.weights.len()];
        for (key, net) in &mut self.nets {
            let members: Vec<usize> = (0..self.weights.len())
                .filter(|&i| self.weights[i].net == *key)
                .collect();
            let inputs: Vec<(&Tensor, &Tensor, usize)> = members
                .iter()
                .map(|&i| (&factors[i].x, &factors[i].delta, self.weights[i].mode))
                .collect();
            for (i, out) in members
                .into_iter()
                .zip(net.forward_many(&inputs, training)?)
            {
                transformed[i] = Some(out);
            }
        }
        transformed
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let (x, delta) = t.ok_or_else(|| {
                    Error::Invalid(format!("MEND has no network for {}", self.weights[i].name))
                })?;
                let step = self.edit_lrs.as_tensor().get(i)?;
                Ok(delta.t()?.matmul(&x)?.broadcast_mul(&step)?)
            })
            .collect()
    }

    /// Installs `W + ΔW` for every edited weight; returns what was there.
    fn install(&self, model: &mut Model, updates: &[Tensor]) -> Result<Vec<WeightChange>> {
        self.weights
            .iter()
            .zip(updates)
            .map(|(w, delta)| {
                let before = model.weight(w.id)?;
                let wide = delta.dtype();
                let after = (before.to_dtype(wide)? + delta)?.to_dtype(before.dtype())?;
                model.replace_weight(w.id, after.clone())?;
                Ok(WeightChange {
                    id: w.id,
                    before,
                    after,
                })
            })
            .collect()
    }

    /// The editor's state as named tensors (EasyEdit's checkpoint keys, `mend.<shape>.…`).
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (key, net) in &self.nets {
            for (i, layer) in net.layers.iter().enumerate() {
                let p = format!("mend.{key}.mlp.layers.{i}");
                out.push((format!("{p}.u"), layer.u.as_tensor().clone()));
                out.push((format!("{p}.v"), layer.v.as_tensor().clone()));
                out.push((format!("{p}.bias"), layer.bias.as_tensor().clone()));
                out.push((
                    format!("{p}.mode_scale.weight"),
                    layer.mode_scale.as_tensor().clone(),
                ));
                out.push((
                    format!("{p}.mode_shift.weight"),
                    layer.mode_shift.as_tensor().clone(),
                ));
            }
            let dev = Device::Cpu;
            let m = &net.moments;
            out.push((
                format!("mend.{key}.moments.mean"),
                Tensor::new(m.mean.as_slice(), &dev)?,
            ));
            out.push((
                format!("mend.{key}.moments.m2"),
                Tensor::new(m.m2.as_slice(), &dev)?,
            ));
            out.push((
                format!("mend.{key}.moments.count"),
                Tensor::new(&[m.count as f64], &dev)?,
            ));
        }
        out.push(("edit_lrs".into(), self.edit_lrs.as_tensor().clone()));
        Ok(out)
    }

    /// Takes back tensors written by [`Mend::tensors`] for the same configuration.
    pub fn load_tensors(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        let get = |name: &str| -> Result<&Tensor> {
            tensors
                .get(name)
                .ok_or_else(|| Error::Invalid(format!("the MEND checkpoint lacks {name}")))
        };
        let set = |var: &Var, name: &str| -> Result<()> {
            let t = get(name)?;
            if t.dims() != var.as_tensor().dims() {
                return Err(Error::Invalid(format!(
                    "the MEND checkpoint's {name} has shape {:?}, this configuration {:?}",
                    t.dims(),
                    var.as_tensor().dims()
                )));
            }
            var.set(
                &t.to_device(var.as_tensor().device())?
                    .to_dtype(var.as_tensor().dtype())?,
            )?;
            Ok(())
        };
        for (key, net) in &mut self.nets {
            for (i, layer) in net.layers.iter().enumerate() {
                let p = format!("mend.{key}.mlp.layers.{i}");
                let LowRankLayer {
                    u,
                    v,
                    bias,
                    mode_scale,
                    mode_shift,
                } = layer;
                set(u, &format!("{p}.u"))?;
                set(v, &format!("{p}.v"))?;
                set(bias, &format!("{p}.bias"))?;
                set(mode_scale, &format!("{p}.mode_scale.weight"))?;
                set(mode_shift, &format!("{p}.mode_shift.weight"))?;
            }
            let vec = |name: String| -> Result<Vec<f64>> {
                Ok(get(&name)?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
            };
            let mean = vec(format!("mend.{key}.moments.mean"))?;
            let m2 = vec(format!("mend.{key}.moments.m2"))?;
            let count = vec(format!("mend.{key}.moments.count"))?;
            let dim = net.x_dim + net.delta_dim;
            if mean.len() != dim || m2.len() != dim || count.len() != 1 {
                return Err(Error::Invalid(format!(
                    "the MEND checkpoint's moments of {key} do not have {dim} coordinates"
                )));
            }
            net.moments = RunningMoments {
                count: count[0] as u64,
                mean,
                m2,
            };
        }
        set(&self.edit_lrs, "edit_lrs")
    }
}

impl Editor for Mend {
    fn name(&self) -> &'static str {
        "MEND"
    }

    /// A batch pools its requests' factor rows into one update, as EasyEdit's executor does.
    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn apply(
        &mut self,
        model: &mut Model,
        requests: &[EditRequest],
        _ctx: &EditCtx,
    ) -> Result<Edit> {
        let pairs: Vec<(&str, &str)> = requests
            .iter()
            .map(|r| (r.prompt.as_str(), r.target_new.as_str()))
            .collect();
        let batch = AnswerBatch::new(model, &pairs)?;
        let ids: Vec<WeightId> = self.weights.iter().map(|w| w.id).collect();
        let pass = gradient_factors(model, &batch, &ids, None)?;
        let updates = self
            .updates(&pass.factors, false)?
            .into_iter()
            .map(|u| u.detach())
            .collect::<Vec<_>>();
        Ok(Edit::of_weights(self.install(model, &updates)?))
    }
}

/// One training example: the edit and a locality prompt whose predictions should not move.
#[derive(Debug, Clone)]
pub struct TrainingPair {
    pub edit: (String, String),
    pub locality: (String, String),
}

impl TrainingPair {
    /// The request's prompt and new target, and its first locality prompt and answer.
    ///
    /// # Errors
    /// A request without a locality prompt: MEND's loss needs one.
    pub fn from_request(r: &EditRequest) -> std::result::Result<Self, String> {
        let (p, a) = r
            .locality
            .values()
            .find_map(|set| Some((set.prompt.first()?, set.ground_truth.first()?)))
            .ok_or_else(|| "no locality prompt (MEND's training loss needs one)".to_string())?;
        Ok(TrainingPair {
            edit: (r.prompt.clone(), r.target_new.clone()),
            locality: (p.clone(), a.clone()),
        })
    }
}

/// The base model's side of a training example: the batches, the residual entering the lowest
/// edited layer (the same before and after an edit) and the locality predictions before it.
struct Prepared {
    edit: AnswerBatch,
    locality: AnswerBatch,
    edit_resid: Option<(usize, Tensor)>,
    locality_resid: Option<(usize, Tensor)>,
    base_locality: Tensor,
}

/// MEND under training: each micro-batch edits the model with the current networks, scores the
/// edited model, and accumulates the gradient of `cedit·NLL + cloc·KL` for the networks and steps.
pub struct MendTrainee<'a> {
    pub mend: Mend,
    model: &'a mut Model,
    train: Vec<TrainingPair>,
    validation: Vec<TrainingPair>,
    optimiser: Adam,
    accumulated: Vec<Option<Tensor>>,
    micro_batches: usize,
    /// Where the next micro-batch starts in `train` (it wraps around).
    cursor: usize,
    /// The best state so far, when no checkpoint folder is set.
    pub best: Option<(usize, Vec<(String, Tensor)>)>,
    /// Where checkpoints go, and the fingerprint of the model they are for.
    dir: Option<std::path::PathBuf>,
    fingerprint: String,
}

impl<'a> MendTrainee<'a> {
    pub fn new(
        mend: Mend,
        model: &'a mut Model,
        train: Vec<TrainingPair>,
        validation: Vec<TrainingPair>,
    ) -> Result<Self> {
        if train.is_empty() || validation.is_empty() {
            return Err(Error::Invalid(
                "MEND training needs training and validation records".into(),
            ));
        }
        let vars = mend.vars();
        let optimiser = Adam::new(vars.clone(), mend.params.lr, 0.0)?;
        Ok(MendTrainee {
            accumulated: vec![None; vars.len()],
            mend,
            model,
            train,
            validation,
            optimiser,
            micro_batches: 0,
            cursor: 0,
            best: None,
            dir: None,
            fingerprint: String::new(),
        })
    }

    fn prepare(&self, pairs: &[TrainingPair]) -> Result<Prepared> {
        let model = &*self.model;
        let edits: Vec<(&str, &str)> = pairs
            .iter()
            .map(|p| (p.edit.0.as_str(), p.edit.1.as_str()))
            .collect();
        let locs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|p| (p.locality.0.as_str(), p.locality.1.as_str()))
            .collect();
        let edit = AnswerBatch::new(model, &edits)?;
        let locality = AnswerBatch::new(model, &locs)?;
        let below = self.mend.lowest_layer().checked_sub(1);
        let mut hooks = HookSpec::new();
        if let Some(l) = below {
            hooks = hooks.capture(Site::ResidPost(l));
        }
        let out = model.forward_at(&locality.batch, &hooks, &locality.positions)?;
        let base_locality = Model::log_probs(&out.logits)?.detach();
        let locality_resid = match below {
            Some(l) => Some((l, out.capture(Site::ResidPost(l))?.detach())),
            None => None,
        };
        Ok(Prepared {
            edit,
            locality,
            edit_resid: None,
            locality_resid,
            base_locality,
        })
    }

    /// Edits the model with the current networks, scores it, and puts the weights back: the loss
    /// (carrying the networks' graph) and its parts.
    fn edited_loss(
        &mut self,
        prepared: &mut Prepared,
        training: bool,
    ) -> Result<(Tensor, Metrics)> {
        let ids: Vec<WeightId> = self.mend.weights.iter().map(|w| w.id).collect();
        let below = self.mend.lowest_layer().checked_sub(1);
        let pass = gradient_factors(self.model, &prepared.edit, &ids, below)?;
        prepared.edit_resid = pass.resid;
        let pre_nll = pass.nll;
        let updates = self.mend.updates(&pass.factors, training)?;
        let changes = self.mend.install(self.model, &updates)?;
        let scored = (|| {
            let resume = |r: &Option<(usize, Tensor)>| match r {
                Some((l, t)) => HookSpec::new().resume_after(*l, t.clone()),
                None => HookSpec::new(),
            };
            let edit_lp = prepared
                .edit
                .log_probs(self.model, &resume(&prepared.edit_resid))?;
            let (nll, acc) = prepared.edit.nll_and_accuracy(&edit_lp)?;
            let loc_lp = prepared
                .locality
                .log_probs(self.model, &resume(&prepared.locality_resid))?;
            let kl = kl_from_base(&prepared.base_locality, &loc_lp)?;
            Ok::<_, Error>((nll, acc, kl))
        })();
        for change in changes.iter().rev() {
            self.model
                .replace_weight(change.id, change.before.clone())?;
        }
        let (nll, acc, kl) = scored?;
        let p = &self.mend.params;
        let total = ((&nll * p.cedit)? + (&kl * p.cloc)?)?;
        let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar()?) };
        let metrics = Metrics::from([
            ("loss/edit".to_string(), scalar(&nll)?),
            ("loss/loc".to_string(), scalar(&kl)?),
            ("loss/total_edit".to_string(), scalar(&total)?),
            ("edit/acc".to_string(), acc),
            ("edit/nll_before".to_string(), pre_nll),
        ]);
        Ok((total, metrics))
    }
}

impl MendTrainee<'_> {
    /// The training loss of `pairs` under the current editor (carrying its graph) and its parts;
    /// `training` lets the networks' moments take the factors in.
    pub fn loss(&mut self, pairs: &[TrainingPair], training: bool) -> Result<(Tensor, Metrics)> {
        let mut prepared = self.prepare(pairs)?;
        self.edited_loss(&mut prepared, training)
    }
}

impl Trainee for MendTrainee<'_> {
    fn accumulate(&mut self, _step: usize) -> Result<Metrics> {
        let n = self.mend.params.batch_size.max(1);
        let pairs: Vec<TrainingPair> = (0..n)
            .map(|k| self.train[(self.cursor + k) % self.train.len()].clone())
            .collect();
        self.cursor = (self.cursor + n) % self.train.len();
        let mut prepared = self.prepare(&pairs)?;
        let (loss, metrics) = self.edited_loss(&mut prepared, true)?;
        let grads = loss.backward()?;
        let vars = self.mend.vars();
        let scale = 1.0 / self.mend.params.accumulate_bs.max(1) as f64;
        let mut fresh = Vec::with_capacity(vars.len());
        for var in &vars {
            fresh.push(match grads.get(var.as_tensor()) {
                Some(g) => Some((g * scale)?),
                None => None,
            });
        }
        // A micro-batch whose gradient is not finite is skipped, as EasyEdit's trainer skips it.
        let finite = fresh.iter().flatten().try_fold(true, |ok, g| {
            let s = g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            Ok::<_, Error>(ok && s.is_finite())
        })?;
        if finite {
            for (acc, g) in self.accumulated.iter_mut().zip(fresh) {
                *acc = match (acc.take(), g) {
                    (Some(a), Some(g)) => Some((a + g)?),
                    (a, g) => a.or(g),
                };
            }
        }
        self.micro_batches += 1;
        Ok(metrics)
    }

    fn update(&mut self) -> Result<()> {
        let norm = self
            .accumulated
            .iter()
            .flatten()
            .try_fold(0.0, |sum, g| {
                Ok::<_, Error>(
                    sum + g
                        .sqr()?
                        .sum_all()?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?,
                )
            })?
            .sqrt();
        if !norm.is_finite() {
            return Err(Error::Invalid(format!(
                "the gradient norm is {norm}: training diverged (lower lr, {})",
                self.mend.params.lr
            )));
        }
        let clip = self.mend.params.grad_clip;
        let factor = if clip > 0.0 && norm > clip {
            clip / norm
        } else {
            1.0
        };
        let grads = std::mem::replace(&mut self.accumulated, vec![None; self.mend.vars().len()])
            .into_iter()
            .map(|g| g.map(|g| g * factor).transpose())
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.optimiser.apply_gradients(&grads)?;
        Ok(())
    }

    fn validate(&mut self) -> Result<Metrics> {
        let n = self.mend.params.val_batch_size.max(1);
        let mut sums = Metrics::new();
        let mut batches = 0.0;
        let validation = self.validation.clone();
        for chunk in validation.chunks(n) {
            let mut prepared = self.prepare(chunk)?;
            let (_, metrics) = self.edited_loss(&mut prepared, false)?;
            for (k, v) in metrics {
                *sums.entry(format!("{k}_val")).or_insert(0.0) += v;
            }
            batches += 1.0;
        }
        Ok(sums.into_iter().map(|(k, v)| (k, v / batches)).collect())
    }

    fn keep_best(&mut self, step: usize) -> Result<()> {
        let tensors = self
            .mend
            .tensors()?
            .into_iter()
            .map(|(k, t)| Ok((k, t.copy()?)))
            .collect::<Result<Vec<_>>>()?;
        match &self.dir {
            Some(dir) => {
                let progress = Outcome {
                    steps: step,
                    best_step: Some(step),
                    ..Outcome::default()
                };
                let header = self.header(&progress, None);
                write_safetensors(&dir.join(BEST_FILE), &header, tensors)?;
            }
            None => self.best = Some((step, tensors)),
        }
        Ok(())
    }

    fn checkpoint(&mut self, progress: &Outcome, stopper: Option<&EarlyStopping>) -> Result<()> {
        let Some(dir) = self.dir.clone() else {
            return Ok(());
        };
        let header = self.header(progress, stopper);
        let mut tensors = self.mend.tensors()?;
        let (_, m, v) = self.optimiser.state();
        for (i, (m, v)) in m.iter().zip(v).enumerate() {
            tensors.push((format!("opt.m.{i}"), m.clone()));
            tensors.push((format!("opt.v.{i}"), v.clone()));
        }
        write_safetensors(&dir.join(LAST_FILE), &header, tensors)?;
        let json = serde_json::to_string_pretty(&header)
            .map_err(|e| Error::Invalid(format!("cannot serialise the checkpoint header: {e}")))?;
        crate::files::write_atomically(&dir.join("last.json"), json.as_bytes())
    }
}

/// What a checkpoint's JSON header (in the safetensors metadata, and beside it as a sidecar for
/// people) records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointHeader {
    pub format_version: u32,
    pub kedit_version: String,
    pub method: String,
    pub model_fingerprint: String,
    pub hparams: MendParams,
    pub weights: Vec<EditedWeight>,
    /// Where the next micro-batch starts in the training records, and how many ran.
    pub cursor: usize,
    pub micro_batches: usize,
    /// The optimiser's step count (its moments are tensors `opt.m.<i>`, `opt.v.<i>`).
    pub adam_step: i32,
    pub progress: Outcome,
    pub early_stopping: Option<EarlyStopping>,
}

const CHECKPOINT_FORMAT: u32 = 1;
const HEADER_KEY: &str = "kedit.mend";

/// Writes `tensors` with `header` in the metadata, atomically.
fn write_safetensors(
    path: &Path,
    header: &CheckpointHeader,
    tensors: Vec<(String, Tensor)>,
) -> Result<()> {
    let json = serde_json::to_string(header)
        .map_err(|e| Error::Invalid(format!("cannot serialise the checkpoint header: {e}")))?;
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?)))
        .collect::<Result<Vec<_>>>()?;
    let metadata = std::collections::HashMap::from([(HEADER_KEY.to_string(), json)]);
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.clone(), v)), Some(metadata))
        .map_err(|e| Error::file(path, e.to_string()))?;
    crate::files::write_atomically(path, &bytes)
}

/// Reads a file written by [`write_safetensors`].
pub fn read_checkpoint(path: &Path) -> Result<(CheckpointHeader, BTreeMap<String, Tensor>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let not_one = |why: String| Error::file(path, format!("not a kedit MEND checkpoint: {why}"));
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| not_one(e.to_string()))?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(HEADER_KEY))
        .ok_or_else(|| not_one("no kedit.mend header".into()))?;
    let header: CheckpointHeader =
        serde_json::from_str(json).map_err(|e| not_one(e.to_string()))?;
    if header.format_version > CHECKPOINT_FORMAT {
        return Err(not_one(format!(
            "format {} is newer than this kedit reads ({CHECKPOINT_FORMAT})",
            header.format_version
        )));
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| not_one(Error::from(e).to_string()))?;
    Ok((header, tensors.into_iter().collect()))
}

impl Mend {
    /// A trained editor from a checkpoint (`best.safetensors` or `last.safetensors` of a
    /// `kedit train` folder, or the folder itself, which means its best), for `model`.
    ///
    /// # Errors
    /// Not a checkpoint, or one trained on another model (naming both fingerprints).
    pub fn load(model: &Model, path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join(BEST_FILE)
        } else {
            path.to_path_buf()
        };
        let (header, tensors) = read_checkpoint(&file)?;
        let here = model.fingerprint()?;
        if header.model_fingerprint != here {
            return Err(Error::file(
                &file,
                format!(
                    "this MEND editor was trained on model {}, but the model here is {here}",
                    header.model_fingerprint
                ),
            ));
        }
        let mut mend = Mend::new(model, header.hparams)?;
        mend.load_tensors(&tensors)
            .map_err(|e| Error::file(&file, e.to_string()))?;
        Ok(mend)
    }
}

/// The editor's best state, written at every validation that improves on the best.
pub const BEST_FILE: &str = "best.safetensors";
/// Everything a resumed run needs, written at every validation.
pub const LAST_FILE: &str = "last.safetensors";

impl MendTrainee<'_> {
    /// Writes checkpoints into `dir` (`best.safetensors`, `last.safetensors` and its JSON
    /// sidecar `last.json`) instead of keeping the best state in memory.
    pub fn checkpoint_into(&mut self, dir: &Path) -> Result<()> {
        self.dir = Some(dir.to_path_buf());
        self.fingerprint = self.model.fingerprint()?;
        Ok(())
    }

    fn header(&self, progress: &Outcome, stopper: Option<&EarlyStopping>) -> CheckpointHeader {
        CheckpointHeader {
            format_version: CHECKPOINT_FORMAT,
            kedit_version: env!("CARGO_PKG_VERSION").into(),
            method: "MEND".into(),
            model_fingerprint: self.fingerprint.clone(),
            hparams: self.mend.params.clone(),
            weights: self.mend.weights.clone(),
            cursor: self.cursor,
            micro_batches: self.micro_batches,
            adam_step: self.optimiser.state().0,
            progress: progress.clone(),
            early_stopping: stopper.cloned(),
        }
    }

    /// Continues from `dir/last.safetensors`: the editor, the optimiser, the data cursor; returns
    /// the loop's progress and stopper to hand back to `train`.
    ///
    /// # Errors
    /// No checkpoint, or one of another model or another configuration.
    pub fn resume(&mut self, dir: &Path) -> Result<(Outcome, Option<EarlyStopping>)> {
        let file = dir.join(LAST_FILE);
        let (header, tensors) = read_checkpoint(&file)?;
        let here = self.model.fingerprint()?;
        if header.model_fingerprint != here {
            return Err(Error::file(
                &file,
                format!(
                    "this run trained on model {}, but the model here is {here}",
                    header.model_fingerprint
                ),
            ));
        }
        if header.weights != self.mend.weights {
            return Err(Error::file(
                &file,
                "this run edited other weights (inner_params differ from the hparams file's)",
            ));
        }
        self.mend
            .load_tensors(&tensors)
            .map_err(|e| Error::file(&file, e.to_string()))?;
        let n = self.mend.vars().len();
        let moment = |kind: &str| -> Result<Vec<Tensor>> {
            (0..n)
                .map(|i| {
                    tensors
                        .get(&format!("opt.{kind}.{i}"))
                        .cloned()
                        .ok_or_else(|| {
                            Error::file(&file, format!("the checkpoint lacks opt.{kind}.{i}"))
                        })
                })
                .collect()
        };
        self.optimiser
            .restore(header.adam_step, moment("m")?, moment("v")?)
            .map_err(|e| Error::file(&file, e.to_string()))?;
        self.cursor = header.cursor % self.train.len();
        self.micro_batches = header.micro_batches;
        Ok((header.progress, header.early_stopping))
    }
}

/// MEND as `eval` and `apply` build it from an edit hparams file: the trained editor its
/// `archive` names (a `kedit train` folder or checkpoint), loaded for the model at the first edit.
pub struct MendFromArchive {
    params: MendParams,
    archive: std::path::PathBuf,
    hparams_file: std::path::PathBuf,
    loaded: Option<Mend>,
}

impl MendFromArchive {
    /// # Errors
    /// A file kedit's MEND cannot honour, or one without an `archive`.
    pub fn from_yaml(path: &Path) -> Result<Self> {
        let params = MendParams::from_yaml(path)?;
        let archive = params.archive.clone().ok_or_else(|| {
            Error::file(
                path,
                "archive is not set: MEND edits with a trained editor (train one with `kedit \
                 train --editor MEND`, then name its folder in archive)",
            )
        })?;
        Ok(MendFromArchive {
            params,
            archive: archive.into(),
            hparams_file: path.to_path_buf(),
            loaded: None,
        })
    }

    fn editor(&mut self, model: &Model) -> Result<&mut Mend> {
        if self.loaded.is_none() {
            if !self.archive.exists() {
                return Err(Error::file(
                    &self.hparams_file,
                    format!(
                        "archive {} does not exist (train an editor with `kedit train --editor MEND \
                         --out {}`)",
                        self.archive.display(),
                        self.archive.display()
                    ),
                ));
            }
            let mend = Mend::load(model, &self.archive)?;
            if mend.params.inner_params != self.params.inner_params {
                return Err(Error::file(
                    &self.hparams_file,
                    format!(
                        "inner_params differ from those archive {} was trained with",
                        self.archive.display()
                    ),
                ));
            }
            self.loaded = Some(mend);
        }
        self.loaded
            .as_mut()
            .ok_or_else(|| Error::Invalid("MEND editor not loaded".into()))
    }
}

impl Editor for MendFromArchive {
    fn name(&self) -> &'static str {
        "MEND"
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
        self.editor(model)?.apply(model, requests, ctx)
    }
}

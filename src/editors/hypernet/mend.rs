//! MEND (SPEC-editors §8): an edit's gradient on the chosen MLP matrices, taken apart into
//! per-token factors, transformed by a trained network per weight shape, and applied as the
//! pseudo-gradient `Σₙ δ̃ₙ x̃ₙᵀ` times a learned step per weight. Trained by [`MendTrainee`] through
//! the training loop of `crate::run::train`; applied at test time by the [`Editor`] impl.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::checkpoint::FromArchive;
use super::network::{GradientNet, LowRankLayer, NetShape, RunningMoments};
use super::trainer::{HypernetTrainee, TrainingHparams};
use super::{EditText, EditedWeight, FactorPass, Factors, Hypernet, Purpose};
use crate::editors::hparams::{float, read_yaml};
use crate::error::{Error, Result};
use crate::model::{LowRankChange, Model};

/// MEND under training.
pub type MendTrainee<'a> = HypernetTrainee<'a, Mend>;
/// MEND as `eval` and `apply` build it: the trained editor an hparams file's `archive` names.
pub type MendFromArchive = FromArchive<Mend>;

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
    /// Read but unused: EasyEdit's MEND reads it nowhere either.
    #[serde(default, deserialize_with = "float")]
    pub lr_scale: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(deserialize_with = "float")]
    pub cedit: f64,
    #[serde(deserialize_with = "float")]
    pub cloc: f64,
    /// Read but unused: it weighs the base model's own loss, which only `train_base` (refused)
    /// adds.
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
    /// kedit: `true` reproduces EasyEdit's LLaMA labels, which start with BOS (SPEC §8.4);
    /// by default the labels are the answer's tokens only.
    #[serde(default)]
    pub label_bos: bool,
    /// kedit: `true` trains on the edited model's loss on the rephrase, as the MEND paper does;
    /// by default on the edit itself, as EasyEdit does.
    #[serde(default)]
    pub outer_edit_loss: bool,
    /// kedit: train on at most this many of a ConvSent topic's sentences of each kind (wanted,
    /// unwanted, locality), drawn per record; by default all of them, as EasyEdit does.
    #[serde(default)]
    pub sentences_per_topic: Option<usize>,
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
            (
                self.dropout != 0.0,
                "dropout other than 0 (kedit trains with the base model's dropout off)",
            ),
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
        let weights = EditedWeight::resolve(model, &params.inner_params)?;
        let mut shapes: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
        for w in &weights {
            let (out, inp) = model.weight(w.id)?.dims2()?;
            shapes.entry(w.net.clone()).or_insert((inp, out, 0)).2 += 1;
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

    /// Each weight's change `ηᵢ Σₙ δ̃ₙ x̃ₙᵀ` (`[out, in]`), from its gradient factors, for
    /// `purpose`.
    pub fn updates(&mut self, factors: &[Factors], purpose: Purpose) -> Result<Vec<LowRankChange>> {
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
            for (i, out) in members.into_iter().zip(net.forward_many(&inputs, purpose)?) {
                transformed[i] = Some(out);
            }
        }
        let steps = purpose.read(&self.edit_lrs);
        transformed
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let (x, delta) = t.ok_or_else(|| {
                    Error::Invalid(format!("MEND has no network for {}", self.weights[i].name))
                })?;
                let step = steps.get(i)?;
                Ok(LowRankChange {
                    left: delta.t()?.broadcast_mul(&step)?,
                    right: x,
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

impl Hypernet for Mend {
    const METHOD: &'static str = "MEND";
    type Params = MendParams;

    fn read_params(path: &Path) -> Result<MendParams> {
        MendParams::from_yaml(path)
    }

    fn archive(params: &MendParams) -> Option<&str> {
        params.archive.as_deref()
    }

    fn build(model: &Model, params: MendParams) -> Result<Self> {
        Mend::new(model, params)
    }

    fn params(&self) -> &MendParams {
        &self.params
    }

    fn inner_params(params: &MendParams) -> &[String] {
        &params.inner_params
    }

    fn training_of(p: &MendParams) -> TrainingHparams {
        TrainingHparams {
            lr: p.lr,
            cedit: p.cedit,
            cloc: p.cloc,
            seed: p.seed,
            batch_size: p.batch_size,
            val_batch_size: p.val_batch_size,
            accumulate_bs: p.accumulate_bs,
            max_iters: p.max_iters,
            val_interval: p.val_interval,
            val_steps: p.val_steps,
            early_stop_patience: p.early_stop_patience,
            early_stop_key: p.early_stop_key.clone(),
            grad_clip: p.grad_clip,
            bos_label: p.label_bos,
            outer_edit_loss: p.outer_edit_loss,
            sentences_per_topic: p.sentences_per_topic,
        }
    }

    fn weights(&self) -> &[EditedWeight] {
        &self.weights
    }

    fn vars(&self) -> Vec<Var> {
        Mend::vars(self)
    }

    /// MEND reads the factors only; the edit's text does not enter its networks.
    fn updates(
        &mut self,
        _texts: &[EditText],
        _model: &Model,
        pass: &FactorPass,
        purpose: Purpose,
    ) -> Result<Vec<LowRankChange>> {
        Mend::updates(self, &pass.factors, purpose)
    }

    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Mend::tensors(self)
    }

    fn load_tensors(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        Mend::load_tensors(self, tensors)
    }
}

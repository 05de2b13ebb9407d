//! Hypernetwork editors: MEND (SPEC-editors §8), which InstructEdit trains with instructions, and
//! KE beside it. What they share lives here: the edited weights' gradient taken apart into
//! per-token factors from one backward pass, and the answer-token batches their losses read.

pub mod checkpoint;
pub mod instructedit;
pub mod ke;
pub mod mend;
pub mod network;
pub mod trainer;

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var, D};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::data::EditRequest;
use crate::editors::{Edit, WeightChange};
use crate::error::{Error, Result};
use crate::model::{
    HookSpec, Intervention, LowRankChange, Model, Module, Param, Site, TokenBatch, WeightId,
};
use trainer::TrainingHparams;

/// A trained hypernetwork editor as the training loop, checkpoints and test-time editing see it:
/// from an edit's gradient factors (and its text, which KE conditions on) to one change per
/// edited weight.
pub trait Hypernet: Sized {
    /// The method's name, as `alg_name` spells it.
    const METHOD: &'static str;
    /// Its hparams file, read unchanged.
    type Params: Clone + Serialize + DeserializeOwned;

    /// Reads and checks an hparams file of the method.
    fn read_params(path: &std::path::Path) -> Result<Self::Params>;
    /// The trained editor the file names, if any.
    fn archive(params: &Self::Params) -> Option<&str>;
    /// An untrained editor for `model`.
    fn build(model: &Model, params: Self::Params) -> Result<Self>;
    fn params(&self) -> &Self::Params;
    fn inner_params(params: &Self::Params) -> &[String];
    /// The training loop's settings in `params`.
    fn training_of(params: &Self::Params) -> TrainingHparams;
    fn training(&self) -> TrainingHparams {
        Self::training_of(self.params())
    }
    fn weights(&self) -> &[EditedWeight];
    /// Every trainable tensor, in a fixed order (the optimiser's state follows it).
    fn vars(&self) -> Vec<Var>;
    /// Each edited weight's change for the edits `texts`, whose gradient `pass` holds, in the
    /// factored form both methods' changes have (rank: the gradient's rows, and one more for
    /// KE), computed for `purpose`.
    fn updates(
        &mut self,
        texts: &[EditText],
        model: &Model,
        pass: &FactorPass,
        purpose: Purpose,
    ) -> Result<Vec<LowRankChange>>;
    /// The gradient of a loss with respect to each of [`Hypernet::vars`], from the store its
    /// `backward` made. An editor whose graph reads a variable only through rows gathered for the
    /// last [`Hypernet::updates`] (KE's embedding table) returns those rows' gradient.
    fn gradients(&self, grads: &GradStore) -> Result<Vec<Option<Gradient>>> {
        Ok(self
            .vars()
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .map(|g| Gradient::Dense(g.detach()))
            })
            .collect())
    }
    /// The editor's state as named tensors.
    fn tensors(&self) -> Result<Vec<(String, Tensor)>>;
    /// Takes back tensors written by [`Hypernet::tensors`] for the same configuration.
    fn load_tensors(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()>;
}

/// What an editor's updates are computed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A training micro-batch: the networks' running moments take the factors in, and the
    /// updates carry the graph the editor's gradient is taken through.
    Training,
    /// The graph, with the moments as they stand (a gradient checked from outside).
    Differentiable,
    /// Neither: validation and test-time editing. Without a graph, each intermediate of the
    /// editor's networks and of the edited model's pass is freed as soon as the next step has
    /// read it, where a graph keeps all of them until the loss is dropped.
    Inference,
}

impl Purpose {
    /// `var` as this purpose reads it: tracked, or a detached view of the same storage.
    pub fn read(self, var: &Var) -> Tensor {
        match self {
            Purpose::Inference => var.as_tensor().detach(),
            Purpose::Training | Purpose::Differentiable => var.as_tensor().clone(),
        }
    }
}

/// A variable's gradient: whole, or as some of its rows (`values[k]` belongs to row `rows[k]`,
/// repeated rows summing), which is how an embedding table's gradient is kept without a dense
/// table-sized tensor per micro-batch.
#[derive(Debug, Clone)]
pub enum Gradient {
    Dense(Tensor),
    Rows { rows: Tensor, values: Tensor },
}

impl Gradient {
    /// The sum of two gradients of the same variable.
    pub fn add(self, other: Gradient, var: &Tensor) -> Result<Gradient> {
        Ok(match (self, other) {
            (Gradient::Dense(a), Gradient::Dense(b)) => Gradient::Dense((a + b)?),
            (
                Gradient::Rows { rows, values },
                Gradient::Rows {
                    rows: more,
                    values: more_values,
                },
            ) => Gradient::Rows {
                rows: Tensor::cat(&[rows, more], 0)?,
                values: Tensor::cat(&[values, more_values], 0)?,
            },
            (a, b) => Gradient::Dense((a.dense(var)? + b.dense(var)?)?),
        })
    }

    /// The gradient as a tensor of `var`'s shape.
    pub fn dense(self, var: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Gradient::Dense(g) => g,
            Gradient::Rows { rows, values } => var.zeros_like()?.index_add(&rows, &values, 0)?,
        })
    }

    /// The sum of its entries (for a finiteness check that allocates nothing table-sized).
    pub fn sum(&self) -> Result<f64> {
        let t = match self {
            Gradient::Dense(g) => g,
            Gradient::Rows { values, .. } => values,
        };
        Ok(t.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    }
}

/// What an edit says: the prompt, the new answer, and the old one where the record has it.
#[derive(Debug, Clone, PartialEq)]
pub struct EditText {
    pub prompt: String,
    pub target: String,
    pub old: Option<String>,
}

impl EditText {
    pub fn of(r: &EditRequest) -> Self {
        EditText {
            prompt: r.prompt.clone(),
            target: r.target_new.clone(),
            old: r.ground_truth.clone(),
        }
    }
}

/// An edited weight, and which network (MEND groups weights by shape) and mode handle it.
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

impl EditedWeight {
    /// `inner_params` resolved on `model`, each numbered within its shape in file order.
    ///
    /// # Errors
    /// A name that is not a weight of the model, or a weight a hypernetwork cannot edit.
    pub fn resolve(model: &Model, inner_params: &[String]) -> Result<Vec<EditedWeight>> {
        let mut modes: BTreeMap<String, usize> = BTreeMap::new();
        inner_params
            .iter()
            .map(|name| {
                let id = model.weight_id_by_name(name).ok_or_else(|| {
                    Error::Invalid(format!(
                        "inner_params: {name:?} is not a weight of this model"
                    ))
                })?;
                factor_sites(id)?;
                let (out, inp) = model.weight(id)?.dims2()?;
                let net = format!("({inp}, {out})");
                let count = modes.entry(net.clone()).or_insert(0);
                let mode = *count;
                *count += 1;
                Ok(EditedWeight {
                    name: name.clone(),
                    id,
                    net,
                    mode,
                })
            })
            .collect()
    }
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

/// The lowest layer an edit of `weights` changes: everything below it is the same before and
/// after.
pub fn lowest_layer(weights: &[EditedWeight]) -> usize {
    weights.iter().filter_map(|w| w.id.layer).min().unwrap_or(0)
}

/// Installs `W + ΔW` for every edited weight; returns what was there.
pub fn install(
    model: &mut Model,
    weights: &[EditedWeight],
    updates: &[LowRankChange],
) -> Result<Vec<WeightChange>> {
    weights
        .iter()
        .zip(updates)
        .map(|(w, change)| {
            let before = model.weight(w.id)?;
            let delta = change.dense()?;
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

/// Edits `model` with a trained editor: one forward and backward pass of the requests' answers,
/// all requests pooled into one change per weight (as EasyEdit's executors do).
pub fn apply_trained<H: Hypernet>(
    editor: &mut H,
    model: &mut Model,
    requests: &[EditRequest],
) -> Result<Edit> {
    let texts: Vec<EditText> = requests.iter().map(EditText::of).collect();
    let updates = trained_changes(editor, model, &texts)?;
    let weights = editor.weights().to_vec();
    Ok(Edit::of_weights(install(model, &weights, &updates)?))
}

/// A trained editor's change to each edited weight for the edits `texts` (their prompts and new
/// answers in one batch, pooled), detached from any graph: what test-time editing installs.
pub fn trained_changes<H: Hypernet>(
    editor: &mut H,
    model: &Model,
    texts: &[EditText],
) -> Result<Vec<LowRankChange>> {
    let pairs: Vec<(&str, &str)> = texts
        .iter()
        .map(|t| (t.prompt.as_str(), t.target.as_str()))
        .collect();
    let batch = AnswerBatch::with_labels(model, &pairs, editor.training().bos_label)?;
    let ids: Vec<WeightId> = editor.weights().iter().map(|w| w.id).collect();
    let pass = gradient_factors(model, &batch, &ids, None)?;
    Ok(editor
        .updates(texts, model, &pass, Purpose::Inference)?
        .into_iter()
        .map(|u| LowRankChange {
            left: u.left.detach(),
            right: u.right.detach(),
        })
        .collect())
}

/// Where an edited weight's input is read and the loss's gradient at its output is taken.
///
/// # Errors
/// A weight other than an MLP matrix: MEND's factors are those of a linear layer's input and output
/// inside the MLP, where kedit's model has hook sites.
pub fn factor_sites(id: WeightId) -> Result<(Site, Site)> {
    match (id.layer, id.module, id.param) {
        (Some(l), Module::MlpUp, Param::Weight) => Ok((Site::MlpIn(l), Site::MlpUpOut(l))),
        (Some(l), Module::MlpGate, Param::Weight) => Ok((Site::MlpIn(l), Site::MlpGateOut(l))),
        (Some(l), Module::MlpDown, Param::Weight) => Ok((Site::MlpAct(l), Site::MlpOut(l))),
        _ => Err(Error::Unsupported {
            what: format!("editing {id} with a hypernetwork"),
            why: "kedit's hypernetwork editors edit MLP matrices (up, gate, down projections)"
                .into(),
        }),
    }
}

/// One weight's gradient as factors: `∇W = Σₙ δₙ xₙᵀ` over the rows kept.
#[derive(Debug, Clone)]
pub struct Factors {
    /// `[n, in]`: the weight's input at each token the gradient reaches.
    pub x: Tensor,
    /// `[n, out]`: the loss's gradient at the weight's output at those tokens.
    pub delta: Tensor,
}

/// `prompt + " " + answer` sequences with the answer's tokens as labels (the tokens of the joint
/// text after as many as the prompt alone has, as the metrics split them), each label scored at
/// the position that predicts it.
#[derive(Debug, Clone)]
pub struct AnswerBatch {
    pub batch: TokenBatch,
    /// `(row, position)` of the logit predicting each label.
    pub positions: Vec<(usize, usize)>,
    pub labels: Vec<u32>,
    /// Per label: whether the loss raises its probability (the edit's answer) or lowers it
    /// (ConvSent's sentences of the other sentiment, by unlikelihood).
    pub wanted: Vec<bool>,
}

impl AnswerBatch {
    /// # Errors
    /// An empty prompt, or an answer that adds no token after its prompt: there is nothing to score.
    pub fn new(model: &Model, pairs: &[(&str, &str)]) -> Result<Self> {
        Self::with_labels(model, pairs, false)
    }

    /// With `bos_label`, EasyEdit's LLaMA labels: it tokenises the answer on its own with special
    /// tokens, so for a tokenizer that adds BOS the labels start with BOS, which its right
    /// alignment scores at the position predicting the prompt's last token (SPEC-editors §8.4).
    /// A tokenizer that adds no BOS (GPT-2, SmolLM2) has no such label either way.
    pub fn with_labels(model: &Model, pairs: &[(&str, &str)], bos_label: bool) -> Result<Self> {
        let mut sequences = Vec::with_capacity(pairs.len());
        let mut positions = Vec::new();
        let mut labels = Vec::new();
        for (row, (prompt, answer)) in pairs.iter().enumerate() {
            let n_prompt = model.encode_with_special_tokens(prompt)?.len();
            let ids = model.encode_with_special_tokens(&format!("{prompt} {answer}"))?;
            if n_prompt == 0 || n_prompt >= ids.len() {
                return Err(Error::Invalid(format!(
                    "{prompt:?} followed by {answer:?} leaves no answer token to score"
                )));
            }
            if bos_label && n_prompt >= 2 {
                let bos = model.spec().bos_id;
                let answer_ids = model.encode_with_special_tokens(answer)?;
                if let (Some(bos), Some(&first)) = (bos, answer_ids.first()) {
                    if first == bos {
                        positions.push((row, n_prompt - 2));
                        labels.push(bos);
                    }
                }
            }
            for (t, &label) in ids.iter().enumerate().skip(n_prompt) {
                positions.push((row, t - 1));
                labels.push(label);
            }
            sequences.push(ids);
        }
        let pad = model.spec().eos_id.or(model.spec().pad_id).unwrap_or(0);
        let wanted = vec![true; labels.len()];
        Ok(AnswerBatch {
            batch: TokenBatch::new(&sequences, pad, model.device())?,
            positions,
            labels,
            wanted,
        })
    }

    /// The batch with the labels of the rows marked `false` to be made unlikely.
    pub fn with_unwanted_rows(mut self, wanted_rows: &[bool]) -> Self {
        for (w, (row, _)) in self.wanted.iter_mut().zip(&self.positions) {
            *w = wanted_rows.get(*row).copied().unwrap_or(true);
        }
        self
    }

    /// Log-probabilities `[n_labels, vocab]` at the label positions, with `hooks`.
    pub fn log_probs(&self, model: &Model, hooks: &HookSpec) -> Result<Tensor> {
        let logits = model
            .forward_at(&self.batch, hooks, &self.positions)?
            .logits;
        Ok(Model::log_probs(&logits)?)
    }

    /// Mean negative log-likelihood of the labels, and the fraction of labels that are the argmax.
    ///
    /// With unwanted labels, the loss is EasyEdit's unlikelihood form for ConvSent,
    /// `−mean log p(wanted) − mean log(1 − p(unwanted) + ε)` (ε: f32's machine epsilon), and the
    /// accuracy counts the wanted labels only: an unwanted label being the argmax is no success.
    pub fn nll_and_accuracy(&self, log_probs: &Tensor) -> Result<(Tensor, f64)> {
        let labels = Tensor::new(self.labels.as_slice(), log_probs.device())?;
        let picked = log_probs
            .gather(&labels.unsqueeze(1)?, D::Minus1)?
            .squeeze(1)?;
        let argmax = log_probs.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let wanted_rows: Vec<u32> = (0..self.labels.len() as u32)
            .filter(|&i| self.wanted[i as usize])
            .collect();
        let hits = wanted_rows
            .iter()
            .filter(|&&i| argmax[i as usize] == self.labels[i as usize])
            .count();
        let accuracy = hits as f64 / wanted_rows.len().max(1) as f64;
        if wanted_rows.len() == self.labels.len() {
            return Ok((picked.neg()?.mean_all()?, accuracy));
        }
        let unwanted_rows: Vec<u32> = (0..self.labels.len() as u32)
            .filter(|&i| !self.wanted[i as usize])
            .collect();
        let rows = |r: &[u32]| Tensor::new(r, log_probs.device());
        let mut nll = picked
            .index_select(&rows(&unwanted_rows)?, 0)?
            .exp()?
            .affine(-1.0, 1.0 + f64::from(f32::EPSILON))?
            .log()?
            .mean_all()?
            .neg()?;
        if !wanted_rows.is_empty() {
            let good = picked.index_select(&rows(&wanted_rows)?, 0)?.mean_all()?;
            nll = (nll - good)?;
        }
        Ok((nll, accuracy))
    }
}

/// The mean over label positions of `KL(base ‖ edited)`, from log-probabilities at the same
/// positions: how far an edit moved the model's predictions where it should not have.
pub fn kl_from_base(base: &Tensor, edited: &Tensor) -> Result<Tensor> {
    let p = base.exp()?;
    Ok((p * (base - edited)?)?.sum(D::Minus1)?.mean_all()?)
}

/// What one pass of [`gradient_factors`] gives.
pub struct FactorPass {
    /// Per weight, in the order asked.
    pub factors: Vec<Factors>,
    /// The residual after the layer asked for, to resume later passes over the same tokens from.
    pub resid: Option<(usize, Tensor)>,
    /// The mean NLL of the labels (before any edit).
    pub nll: f64,
}

/// The factors of each weight's gradient of the mean NLL of `batch`'s labels, from one forward and
/// one backward pass, keeping the rows where both the input and the gradient are non-zero
/// (padding and positions no loss reaches). `keep_resid_after` also keeps the residual after that
/// layer.
pub fn gradient_factors(
    model: &Model,
    batch: &AnswerBatch,
    weights: &[WeightId],
    keep_resid_after: Option<usize>,
) -> Result<FactorPass> {
    let (b, s) = batch.batch.ids.dims2()?;
    // Factors in f32 (f64 for an f64 model), whatever the model computes in.
    let wide = match model.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let mut hooks = HookSpec::new();
    if let Some(l) = keep_resid_after {
        hooks = hooks.capture(Site::ResidPost(l));
    }
    let mut probes = Vec::with_capacity(weights.len());
    let mut probe_at: BTreeMap<Site, usize> = BTreeMap::new();
    for &id in weights {
        let (input, output) = factor_sites(id)?;
        hooks = hooks.capture(input);
        let next = probe_at.len();
        let k = *probe_at.entry(output).or_insert(next);
        if k == probes.len() {
            let width = model.weight(id)?.dim(0)?;
            // A zero added at the output: its gradient is the gradient at the output.
            let probe = Var::zeros((b, s, width), wide, model.device())?;
            hooks = hooks.intervene(
                output,
                Intervention::Add(probe.as_tensor().to_dtype(model.dtype())?),
            );
            probes.push(probe);
        }
    }
    let out = model.forward_at(&batch.batch, &hooks, &batch.positions)?;
    let log_probs = Model::log_probs(&out.logits)?;
    let (nll, _) = batch.nll_and_accuracy(&log_probs)?;
    let grads = nll.backward()?;
    let mut factors = Vec::with_capacity(weights.len());
    for &id in weights {
        let (input, output) = factor_sites(id)?;
        let probe = &probes[probe_at[&output]];
        let delta = grads
            .get(probe.as_tensor())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "no gradient reaches {id}: is it above the last scored position?"
                ))
            })?
            .to_dtype(wide)?;
        let x = out.capture(input)?.detach().to_dtype(wide)?;
        factors.push(nonzero_rows(
            &x.reshape((b * s, ()))?,
            &delta.reshape((b * s, ()))?,
        )?);
    }
    let resid = match keep_resid_after {
        Some(l) => Some((l, out.capture(Site::ResidPost(l))?.detach())),
        None => None,
    };
    Ok(FactorPass {
        factors,
        resid,
        nll: nll.to_dtype(DType::F64)?.to_scalar::<f64>()?,
    })
}

/// The rows where neither `x` nor `delta` is all zeros.
fn nonzero_rows(x: &Tensor, delta: &Tensor) -> Result<Factors> {
    let live = |t: &Tensor| -> Result<Vec<bool>> {
        Ok(t.abs()?
            .max(D::Minus1)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .into_iter()
            .map(|m| m > 0.0)
            .collect())
    };
    let keep: Vec<u32> = live(x)?
        .into_iter()
        .zip(live(delta)?)
        .enumerate()
        .filter(|(_, (a, b))| *a && *b)
        .map(|(i, _)| i as u32)
        .collect();
    let idx = Tensor::new(keep.as_slice(), x.device())?;
    Ok(Factors {
        x: x.index_select(&idx, 0)?,
        delta: delta.index_select(&idx, 0)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Row gradients sum where rows repeat, within one gradient and across two, and added to a
    /// whole gradient they give the hand-written sum.
    #[test]
    fn row_gradients_sum_into_their_rows() {
        let d = &Device::Cpu;
        let table = Tensor::zeros((4, 2), DType::F32, d).unwrap();
        let rows = |r: &[u32], v: &[[f32; 2]]| Gradient::Rows {
            rows: Tensor::new(r, d).unwrap(),
            values: Tensor::from_vec(v.concat(), (v.len(), 2), d).unwrap(),
        };
        let first = rows(&[1, 3, 1], &[[1.0, 2.0], [3.0, 4.0], [10.0, 20.0]]);
        let second = rows(&[3], &[[0.5, 0.5]]);
        let sum = first.add(second, &table).unwrap();
        assert_eq!(sum.sum().unwrap(), 41.0);
        let dense =
            Gradient::Dense(Tensor::new(&[[1f32, 1.], [1., 1.], [1., 1.], [1., 1.]], d).unwrap());
        let total = sum.add(dense, &table).unwrap().dense(&table).unwrap();
        assert_eq!(
            total.to_vec2::<f32>().unwrap(),
            [[1.0, 1.0], [12.0, 23.0], [1.0, 1.0], [4.5, 5.5]]
        );
    }

    /// ConvSent's unlikelihood loss on a hand-made example: wanted labels with probabilities 0.5
    /// and 0.25, unwanted ones with 0.6 and 0.8, so by hand
    /// `−(ln 0.5 + ln 0.25)/2 − (ln(0.4 + ε) + ln(0.2 + ε))/2 = 2.302584646`; accuracy counts the
    /// wanted labels only (one of two is the argmax). All labels wanted is the plain mean NLL.
    #[test]
    fn unlikelihood_loss_matches_the_hand_computed_value() {
        let d = &Device::Cpu;
        let probs = [
            [0.5f64, 0.25, 0.25],
            [0.2, 0.6, 0.2],
            [0.1, 0.1, 0.8],
            [0.5, 0.25, 0.25],
        ];
        let log_probs = Tensor::new(&probs, d).unwrap().log().unwrap();
        let batch = |wanted: Vec<bool>| AnswerBatch {
            batch: TokenBatch::new(&[vec![0u32, 1, 2, 3, 4]], 0, d).unwrap(),
            positions: vec![(0, 0), (0, 1), (0, 2), (0, 3)],
            labels: vec![0, 1, 2, 1],
            wanted,
        };
        let (nll, acc) = batch(vec![true, false, false, true])
            .nll_and_accuracy(&log_probs)
            .unwrap();
        let nll = nll.to_scalar::<f64>().unwrap();
        assert!((nll - 2.302_584_645_959_319).abs() < 1e-9, "{nll}");
        assert_eq!(acc, 0.5);
        let (nll, acc) = batch(vec![true; 4]).nll_and_accuracy(&log_probs).unwrap();
        let by_hand = -(0.5f64.ln() + 0.6f64.ln() + 0.8f64.ln() + 0.25f64.ln()) / 4.0;
        assert!((nll.to_scalar::<f64>().unwrap() - by_hand).abs() < 1e-12);
        assert_eq!(acc, 0.75);
    }
}

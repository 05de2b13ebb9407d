//! Hypernetwork editors: MEND (SPEC-editors §8), which InstructEdit trains with instructions, and
//! KE beside it. What they share lives here: the edited weights' gradient taken apart into
//! per-token factors from one backward pass, and the answer-token batches their losses read.

pub mod mend;
pub mod network;

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var, D};

use crate::error::{Error, Result};
use crate::model::{HookSpec, Intervention, Model, Module, Param, Site, TokenBatch, WeightId};

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
}

impl AnswerBatch {
    /// # Errors
    /// An empty prompt, or an answer that adds no token after its prompt: there is nothing to score.
    pub fn new(model: &Model, pairs: &[(&str, &str)]) -> Result<Self> {
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
            for (t, &label) in ids.iter().enumerate().skip(n_prompt) {
                positions.push((row, t - 1));
                labels.push(label);
            }
            sequences.push(ids);
        }
        let pad = model.spec().eos_id.or(model.spec().pad_id).unwrap_or(0);
        Ok(AnswerBatch {
            batch: TokenBatch::new(&sequences, pad, model.device())?,
            positions,
            labels,
        })
    }

    /// Log-probabilities `[n_labels, vocab]` at the label positions, with `hooks`.
    pub fn log_probs(&self, model: &Model, hooks: &HookSpec) -> Result<Tensor> {
        let logits = model
            .forward_at(&self.batch, hooks, &self.positions)?
            .logits;
        Ok(Model::log_probs(&logits)?)
    }

    /// Mean negative log-likelihood of the labels, and the fraction of labels that are the argmax.
    pub fn nll_and_accuracy(&self, log_probs: &Tensor) -> Result<(Tensor, f64)> {
        let labels = Tensor::new(self.labels.as_slice(), log_probs.device())?;
        let picked = log_probs.gather(&labels.unsqueeze(1)?, D::Minus1)?;
        let nll = picked.neg()?.mean_all()?;
        let argmax = log_probs.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let hits = argmax
            .iter()
            .zip(&self.labels)
            .filter(|(a, b)| a == b)
            .count();
        Ok((nll, hits as f64 / self.labels.len() as f64))
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

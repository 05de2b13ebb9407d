//! FT-L and FT-M: constrained fine-tuning of chosen weights (SPEC-editors §6).
//!
//! FT-L (`objective_optimization: prompt_last`, the ROME paper's baseline) scores every target token
//! against the next-token distribution after the prompt; FT-M (`target_new`, the KnowEdit survey)
//! is ordinary teacher-forced cross-entropy on the target tokens. Both train with torch-style Adam
//! and optionally clamp each weight into an L∞ box around its original value.

use std::path::Path;

use candle_core::{DType, Tensor, Var, D};
use serde::Deserialize;

use super::hparams::{float, float_or_false, read_yaml};
use super::optim::Adam;
use super::{Edit, EditCtx, Editor, WeightChange};
use crate::data::EditRequest;
use crate::error::{Error, Result};
use crate::model::{HookSpec, Model, Site, TokenBatch, WeightId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Objective {
    /// FT-L.
    #[serde(rename = "prompt_last")]
    PromptLast,
    /// FT-M.
    #[serde(rename = "target_new")]
    TargetNew,
}

/// A weight being trained. Half-precision models train an f32 master copy (Adam's small steps
/// vanish in bf16's 8-bit mantissa); the model sees it cast to its own dtype, recast before every
/// loss so the gradient flows through the cast to the master.
struct Trainable {
    id: WeightId,
    original: Tensor,
    /// `original` in the training dtype: the centre of the norm-constraint box.
    start: Tensor,
    var: Var,
}

impl Trainable {
    fn new(model: &mut Model, id: WeightId) -> Result<Self> {
        let original = model.weight(id)?;
        let wide = match original.dtype() {
            DType::F16 | DType::BF16 => DType::F32,
            other => other,
        };
        let start = original.to_dtype(wide)?;
        let var = Var::from_tensor(&start)?;
        let t = Trainable {
            id,
            original,
            start,
            var,
        };
        t.install(model)?;
        Ok(t)
    }

    fn install(&self, model: &mut Model) -> Result<()> {
        let seen = self.var.as_tensor().to_dtype(self.original.dtype())?;
        model.replace_weight(self.id, seen)?;
        Ok(())
    }
}

/// EasyEdit's `FTHyperParams`, read from `hparams/FT/*.yaml` unchanged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FtParams {
    pub alg_name: String,
    pub layers: Vec<usize>,
    pub num_steps: usize,
    pub batch_size: usize,
    /// Read but unused: EasyEdit's `ft_main` tokenises without truncation.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    #[serde(deserialize_with = "float")]
    pub lr: f64,
    #[serde(deserialize_with = "float")]
    pub weight_decay: f64,
    /// Read but unused, as in EasyEdit.
    #[serde(default, deserialize_with = "float_or_false")]
    pub kl_factor: Option<f64>,
    #[serde(default, deserialize_with = "float_or_false")]
    pub norm_constraint: Option<f64>,
    pub objective_optimization: Objective,
    #[serde(deserialize_with = "crate::model::module_template")]
    pub rewrite_module_tmp: crate::model::ModuleTemplate,
    /// Evaluation setting (score prompts in the chat template); the CLI reads it.
    #[serde(default)]
    pub use_chat_template: bool,
}

fn default_max_length() -> usize {
    40
}

/// Training stops once an epoch's mean loss is below this, and a chunk below it takes no step.
const LOSS_FLOOR: f64 = 1e-2;

pub struct Ft {
    params: FtParams,
}

impl Ft {
    pub fn new(params: FtParams) -> Result<Self> {
        if params.batch_size == 0 || params.layers.is_empty() {
            return Err(Error::Invalid(
                "FT needs batch_size ≥ 1 and at least one layer".into(),
            ));
        }
        Ok(Self { params })
    }

    pub fn from_yaml(path: &Path) -> Result<Self> {
        Self::new(read_yaml(path)?)
    }

    pub fn params(&self) -> &FtParams {
        &self.params
    }

    /// Each chunk's tokens and, when no trained weight lies below layer `l + 1`, its residual
    /// after layer `l`: those layers give the same output on every step, so they run once.
    fn prepare(&self, model: &Model, requests: &[EditRequest]) -> Result<Vec<Chunk>> {
        let lowest = self.params.layers.iter().copied().min().unwrap_or(0);
        requests
            .chunks(self.params.batch_size)
            .map(|chunk| {
                let inputs = match self.params.objective_optimization {
                    Objective::PromptLast => prompt_last_inputs(model, chunk)?,
                    Objective::TargetNew => target_new_inputs(model, chunk)?,
                };
                let prefix = match lowest.checked_sub(1) {
                    Some(l) => {
                        let hooks = HookSpec::new().capture(Site::ResidPost(l)).stop_after(l);
                        let out = model.forward(&inputs.batch, &hooks)?;
                        Some((l, out.capture(Site::ResidPost(l))?.clone()))
                    }
                    None => None,
                };
                Ok(Chunk { inputs, prefix })
            })
            .collect()
    }

    fn loss(&self, model: &Model, chunk: &Chunk) -> Result<Tensor> {
        let mut hooks = HookSpec::new();
        if let Some((l, resid)) = &chunk.prefix {
            hooks = hooks.resume_after(*l, resid.clone());
        }
        chunk.inputs.loss(model, &hooks)
    }

    /// The training loop, with the trainable weights already replaced by `vars`.
    fn train(&self, model: &mut Model, requests: &[EditRequest], vars: &[Trainable]) -> Result<()> {
        let mut opt = Adam::new(
            vars.iter().map(|t| t.var.clone()).collect(),
            self.params.lr,
            self.params.weight_decay,
        )?;
        let chunks = self.prepare(model, requests)?;
        for step in 0..self.params.num_steps {
            let mut total = 0.0;
            for chunk in &chunks {
                for t in vars {
                    t.install(model)?;
                }
                let loss = self.loss(model, chunk)?;
                let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !value.is_finite() {
                    return Err(Error::Invalid(format!(
                        "FT: the loss is {value} at step {step}; lower lr ({})",
                        self.params.lr
                    )));
                }
                total += value;
                if value >= LOSS_FLOOR {
                    opt.backward_step(&loss)?;
                    if let Some(eps) = self.params.norm_constraint {
                        for t in vars {
                            let lo = (&t.start - eps)?;
                            let hi = (&t.start + eps)?;
                            t.var.set(&t.var.as_tensor().maximum(&lo)?.minimum(&hi)?)?;
                        }
                    }
                }
            }
            if total / (chunks.len() as f64) < LOSS_FLOOR {
                break;
            }
        }
        Ok(())
    }
}

impl Editor for Ft {
    fn name(&self) -> &'static str {
        match self.params.objective_optimization {
            Objective::PromptLast => "FT-L",
            Objective::TargetNew => "FT-M",
        }
    }

    fn max_batch(&self) -> usize {
        usize::MAX
    }

    fn apply(
        &mut self,
        model: &mut Model,
        requests: &[EditRequest],
        _ctx: &EditCtx,
    ) -> Result<Edit> {
        let mut ids: Vec<WeightId> = Vec::new();
        for &layer in &self.params.layers {
            ids.extend(self.params.rewrite_module_tmp.weights(model, layer)?);
        }
        let vars = ids
            .iter()
            .map(|&id| Trainable::new(model, id))
            .collect::<Result<Vec<_>>>()?;
        let trained = self.train(model, requests, &vars);
        let mut changes = Vec::with_capacity(ids.len());
        for t in &vars {
            // A plain copy: later forwards must not track gradients into the finished edit.
            let after = t
                .var
                .as_tensor()
                .detach()
                .to_dtype(t.original.dtype())?
                .copy()?;
            let put = if trained.is_ok() {
                after.clone()
            } else {
                t.original.clone()
            };
            model.replace_weight(t.id, put)?;
            changes.push(WeightChange {
                id: t.id,
                before: t.original.clone(),
                after,
            });
        }
        trained?;
        Ok(Edit::of_weights(changes))
    }
}

/// The target's tokens as FT scores them: `" " + target`, with the tokenizer's default special
/// tokens (so LLaMA-2's BOS is among them, as in EasyEdit).
fn target_ids(model: &Model, request: &EditRequest) -> Result<Vec<u32>> {
    let ids = model.encode_with_special_tokens(&format!(" {}", request.target_new))?;
    if ids.is_empty() {
        return Err(Error::Invalid(format!(
            "target {:?} has no tokens",
            request.target_new
        )));
    }
    Ok(ids)
}

fn pad_id(model: &Model) -> u32 {
    model.spec().eos_id.or(model.spec().pad_id).unwrap_or(0)
}

/// One chunk of requests, ready for every training step.
struct Chunk {
    inputs: LossInputs,
    /// The residual after the layer below the lowest trained weight, and that layer.
    prefix: Option<(usize, Tensor)>,
}

/// The tokens a loss runs on and what it scores, tokenised once per edit.
/// A batch and the loss an editor trains on it.
pub(crate) struct LossInputs {
    pub(crate) batch: TokenBatch,
    /// `(row, column)` of every position whose next-token distribution is scored.
    positions: Vec<(usize, usize)>,
    objective: Scored,
}

enum Scored {
    /// FT-L: every target token of row `r` against the distribution at row `r`'s last prompt token.
    PromptLast { targets: Vec<Vec<u32>> },
    /// FT-M: one label per scored position, weighted `1 / (its request's count · #requests)`.
    TargetNew { labels: Vec<u32>, weights: Vec<f32> },
}

impl LossInputs {
    pub(crate) fn loss(&self, model: &Model, hooks: &HookSpec) -> Result<Tensor> {
        let logits = model
            .forward_at(&self.batch, hooks, &self.positions)?
            .logits;
        let log_probs = Model::log_probs(&logits)?;
        match &self.objective {
            Scored::PromptLast { targets } => {
                let mut losses = Vec::with_capacity(targets.len());
                for (row, targets) in targets.iter().enumerate() {
                    let n = targets.len().max(1) as f64;
                    let idx = Tensor::new(targets.as_slice(), model.device())?;
                    let picked = log_probs.get(row)?.index_select(&idx, 0)?;
                    losses.push((picked.sum_all()? * (-1.0 / n))?);
                }
                Ok((Tensor::stack(&losses, 0)?.sum_all()? / targets.len() as f64)?)
            }
            Scored::TargetNew { labels, weights } => {
                let labels = Tensor::new(labels.as_slice(), model.device())?.unsqueeze(1)?;
                let nll = log_probs.gather(&labels, D::Minus1)?.squeeze(1)?.neg()?;
                let weights =
                    Tensor::new(weights.as_slice(), model.device())?.to_dtype(nll.dtype())?;
                Ok((nll * weights)?.sum_all()?)
            }
        }
    }
}

/// FT-L: `−Σ_j log p(t_j | prompt) / #t` at the last prompt token, every target token against the
/// same distribution; unknown-token targets are masked; mean over requests.
fn prompt_last_inputs(model: &Model, requests: &[EditRequest]) -> Result<LossInputs> {
    let prompts = requests
        .iter()
        .map(|r| model.encode_with_special_tokens(&r.prompt))
        .collect::<Result<Vec<_>>>()?;
    let batch = TokenBatch::new(&prompts, pad_id(model), model.device())?;
    let positions: Vec<(usize, usize)> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| (i, p.len() - 1))
        .collect();
    let unk = model.tokenizer().token_to_id("<unk>");
    let targets = requests
        .iter()
        .map(|request| {
            Ok(target_ids(model, request)?
                .into_iter()
                .filter(|&t| Some(t) != unk)
                .collect())
        })
        .collect::<Result<Vec<Vec<u32>>>>()?;
    Ok(LossInputs {
        batch,
        positions,
        objective: Scored::PromptLast { targets },
    })
}

/// FT-M: teacher-forced cross-entropy on the target tokens of `prompt + " " + target`, averaged per
/// request, then over requests. The target starts after as many tokens as the prompt alone has.
pub(crate) fn target_new_inputs(model: &Model, requests: &[EditRequest]) -> Result<LossInputs> {
    let mut sequences = Vec::with_capacity(requests.len());
    let mut positions = Vec::new();
    let mut labels = Vec::new();
    let mut rows = Vec::new();
    for (row, r) in requests.iter().enumerate() {
        let n_prompt = model.encode_with_special_tokens(&r.prompt)?.len();
        let ids = model.encode_with_special_tokens(&format!("{} {}", r.prompt, r.target_new))?;
        if n_prompt == 0 || n_prompt >= ids.len() {
            return Err(Error::Invalid(format!(
                "prompt {:?} leaves no target tokens to train on",
                r.prompt
            )));
        }
        for (t, &label) in ids.iter().enumerate().skip(n_prompt) {
            positions.push((row, t - 1));
            labels.push(label);
            rows.push(row);
        }
        sequences.push(ids);
    }
    let batch = TokenBatch::new(&sequences, pad_id(model), model.device())?;
    // Per-request mean, then mean over requests: weight each position by 1 / (its request's count).
    let mut counts = vec![0usize; requests.len()];
    for &r in &rows {
        counts[r] += 1;
    }
    let weights: Vec<f32> = rows
        .iter()
        .map(|&r| 1.0 / (counts[r] * requests.len()) as f32)
        .collect();
    Ok(LossInputs {
        batch,
        positions,
        objective: Scored::TargetNew { labels, weights },
    })
}

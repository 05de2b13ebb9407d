//! KE, Knowledge Editor (De Cao et al. 2021; SPEC-editors §10): a hypernetwork conditioned on the
//! edit's text. A bidirectional LSTM reads the condition; per edited matrix a weight-normalised
//! two-layer conditioner turns its summary into two rank-one masks and a scale, and the edit is
//! `ΔW = σ̄·(∇W ⊙ A + B)` with `∇W` the edit loss's gradient. Trained by the same loop as MEND.
//!
//! Where kedit differs from EasyEdit's last KE ("EFK"), on purpose:
//! - EFK trained on the condition `"{old} >> {new} || {prompt}"` but edited at test time
//!   conditioned on `prompt + " " + new`, a text it never saw in training. kedit conditions on the
//!   training form at both times (`"{new} || {prompt}"` where a record has no old answer).
//! - Matrices are `[out, in]` as kedit stores them: the conditioner's row parts have `out`
//!   entries and its column parts `in`, for GPT-2's Conv1D as for LLaMA's Linear (EFK splits in
//!   the stored orientation, transposed for Conv1D). EFK checkpoints do not load here.
//! - Conditions run one sequence at a time, so no padding reaches the LSTM and the embedding's
//!   padding row (index 0) needs no special case.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use super::checkpoint::FromArchive;
use super::trainer::{HypernetTrainee, TrainingHparams};
use super::{EditText, EditedWeight, FactorPass, Factors, Gradient, Hypernet, Purpose};
use crate::editors::hparams::{float, read_yaml};
use crate::error::{Error, Result};
use crate::model::{LowRankChange, Model, Module, WeightId};

/// KE under training.
pub type KeTrainee<'a> = HypernetTrainee<'a, Ke>;
/// KE as `eval` and `apply` build it: the trained editor an hparams file's `archive` names.
pub type KeFromArchive = FromArchive<Ke>;

/// EasyEdit's `KEHyperParams` / `KETrainingHparams` (`hparams/KE/*.yaml`,
/// `hparams/TRAINING/KE/*.yaml`), read unchanged, plus the network's sizes, which EFK fixed in
/// code (LSTM and conditioner width 512, condition 768).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeParams {
    /// EasyEdit's KE edit files carry both `alg_name` and `alg`.
    #[serde(default)]
    pub alg_name: Option<String>,
    #[serde(default)]
    pub alg: Option<String>,
    pub inner_params: Vec<String>,
    #[serde(default)]
    pub archive: Option<String>,
    #[serde(deserialize_with = "float")]
    pub lr: f64,
    /// Read but unused: KE has no learned step (EFK's `max_scale` is 1).
    #[serde(default, deserialize_with = "float")]
    pub edit_lr: f64,
    /// Read but unused, as in EFK.
    #[serde(default, deserialize_with = "float")]
    pub lr_lr: f64,
    /// Read but unused, as in EFK.
    #[serde(default, deserialize_with = "float")]
    pub lr_scale: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(deserialize_with = "float")]
    pub cedit: f64,
    #[serde(deserialize_with = "float")]
    pub cloc: f64,
    /// Read but unused: EasyEdit's trainer weighs no base-model loss when `train_base` is off.
    #[serde(default, deserialize_with = "float")]
    pub cbase: f64,
    #[serde(default, deserialize_with = "float")]
    pub dropout: f64,
    #[serde(default)]
    pub train_base: bool,
    #[serde(default)]
    pub no_grad_layers: Option<serde_yaml::Value>,
    /// The LSTM's width per direction and the conditioners' hidden width.
    #[serde(default = "efk_hidden")]
    pub hidden_dim: usize,
    /// The width of the condition vector.
    #[serde(default = "efk_condition")]
    pub condition_dim: usize,
    // Training schedule.
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

fn efk_hidden() -> usize {
    512
}

fn efk_condition() -> usize {
    768
}

impl KeParams {
    pub fn from_yaml(path: &Path) -> Result<Self> {
        let params: KeParams = read_yaml(path)?;
        let refuse = |msg: &str| Err(Error::file(path, msg.to_string()));
        if params.inner_params.is_empty() {
            return refuse("inner_params is empty: KE needs at least one weight to edit");
        }
        if params.train_base {
            return refuse("train_base: true (training the base model) is not implemented");
        }
        if params.dropout != 0.0 {
            return refuse("dropout other than 0 is not implemented (EFK has no dropout)");
        }
        if params.hidden_dim == 0 || params.condition_dim == 0 {
            return refuse("hidden_dim and condition_dim must be at least 1");
        }
        Ok(params)
    }
}

/// The text KE conditions on: EFK's training form.
pub fn condition_text(edit: &EditText) -> String {
    match &edit.old {
        Some(old) => format!("{old} >> {} || {}", edit.target, edit.prompt),
        None => format!("{} || {}", edit.target, edit.prompt),
    }
}

/// A variable of `shape` drawn uniform in `[-bound, bound)`, torch's default for linear and LSTM
/// layers.
fn uniform(
    rng: &mut rand::rngs::StdRng,
    shape: &[usize],
    bound: f64,
    (device, dtype): (&Device, DType),
) -> Result<Var> {
    let n: usize = shape.iter().product();
    let values: Vec<f64> = (0..n)
        .map(|_| (2.0 * rng.random::<f64>() - 1.0) * bound)
        .collect();
    Ok(Var::from_tensor(
        &Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?,
    )?)
}

/// `y = x Wᵀ + b`.
pub struct Linear {
    pub weight: Var,
    pub bias: Var,
}

impl Linear {
    fn new(
        rng: &mut rand::rngs::StdRng,
        inp: usize,
        out: usize,
        on: (&Device, DType),
    ) -> Result<Self> {
        let bound = 1.0 / (inp as f64).sqrt();
        Ok(Linear {
            weight: uniform(rng, &[out, inp], bound, on)?,
            bias: uniform(rng, &[out], bound, on)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(product_t(x, self.weight.as_tensor())?.broadcast_add(self.bias.as_tensor())?)
    }
}

/// `x wᵀ`, differentiable in both, with `w`'s gradient summed straight into `w`'s.
///
/// Through candle's `x.matmul(&w.t())` the gradient of `w` is first summed, with the zeros it
/// starts from, for the transposed view `wᵀ`, and waits there as a matrix-sized tensor until the
/// backward pass reaches that view, for the conditioners only near its end. Here the product is
/// taken of detached operands and [`GradientOf`] attaches both gradients, computed from detached
/// operands so that they carry no graph (KE's training peak on SmolLM2: 1.95 -> 1.85 GB). On
/// devices other than the CPU it is candle's product.
fn product_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || !(x.track_op() || w.track_op()) {
        return Ok(x.matmul(&w.t()?)?);
    }
    let value = x.detach().matmul(&w.detach().t()?)?;
    Ok(value.apply_op3(x, w, GradientOf)?)
}

/// The value of `x wᵀ` (its first argument, returned as it is) with the gradients of that product
/// with respect to `x` and `w`.
struct GradientOf;

impl candle_core::CustomOp3 for GradientOf {
    fn name(&self) -> &'static str {
        "ke-product-gradient"
    }

    fn cpu_fwd(
        &self,
        value: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("product gradient: the product is not contiguous")
        };
        let out = match value {
            CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
            _ => candle_core::bail!("product gradient: f32 or f64"),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(
        &self,
        _value: &Tensor,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.detach();
        Ok((
            None,
            Some(grad.matmul(&w.detach())?),
            Some(grad.t()?.matmul(&x.detach())?),
        ))
    }
}

/// A weight-normalised linear layer (torch's `weight_norm`, dim 0): each output row is
/// `g · v / ‖v‖`, with `g` starting at `‖v‖`.
pub struct NormedLinear {
    pub direction: Var,
    pub gain: Var,
    pub bias: Var,
}

impl NormedLinear {
    fn new(
        rng: &mut rand::rngs::StdRng,
        inp: usize,
        out: usize,
        on: (&Device, DType),
    ) -> Result<Self> {
        let plain = Linear::new(rng, inp, out, on)?;
        let gain = plain.weight.as_tensor().sqr()?.sum_keepdim(1)?.sqrt()?;
        Ok(NormedLinear {
            direction: plain.weight,
            gain: Var::from_tensor(&gain)?,
            bias: plain.bias,
        })
    }

    /// `x (g ⊙ v/‖v‖)ᵀ + b`, computed as `(x vᵀ) ⊙ (g/‖v‖)ᵀ + b`: the normalised matrix is never
    /// formed, so the graph holds no copy of `v` (the second layers are 4225 × 512 on SmolLM2,
    /// one per edited matrix) and the backward pass makes one gradient of `v` per path.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let v = self.direction.as_tensor();
        let norm = if v.device().is_cpu() && matches!(v.dtype(), DType::F32 | DType::F64) {
            v.apply_op1(RowNorm)?
        } else {
            v.sqr()?.sum_keepdim(1)?.sqrt()?
        };
        let scale = self.gain.as_tensor().broadcast_div(&norm)?.t()?;
        Ok(product_t(x, v)?
            .broadcast_mul(&scale)?
            .broadcast_add(self.bias.as_tensor())?)
    }

    fn vars(&self) -> [Var; 3] {
        [self.direction.clone(), self.gain.clone(), self.bias.clone()]
    }
}

/// Each row's Euclidean norm, `[rows, cols] → [rows, 1]`, with its backward written out:
/// composed from `sqr` and `sum`, the graph would keep a squared copy of the matrix until the
/// backward pass.
struct RowNorm;

impl candle_core::CustomOp1 for RowNorm {
    fn name(&self) -> &'static str {
        "ke-row-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        fn norms<T: num_traits::Float>(v: &[T], cols: usize) -> Vec<T> {
            v.chunks(cols)
                .map(|row| row.iter().fold(T::zero(), |sum, &x| sum + x * x).sqrt())
                .collect()
        }
        let (rows, cols) = layout.shape().dims2()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("row norm: the matrix is not contiguous")
        };
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(norms(&v[start..end], cols)),
            CpuStorage::F64(v) => CpuStorage::F64(norms(&v[start..end], cols)),
            _ => candle_core::bail!("row norm: f32 or f64"),
        };
        Ok((out, (rows, 1).into()))
    }

    fn bwd(&self, v: &Tensor, norm: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // From detached tensors: a gradient with a graph keeps alive every sum it enters, and
        // what they were summed from (with `norm`'s graph kept, KE's training peak on SmolLM2
        // was 0.3 GB higher).
        Ok(Some(
            v.detach()
                .broadcast_mul(&(grad.detach() / norm.detach())?)?,
        ))
    }
}

/// One direction of an LSTM (torch's gate order: input, forget, cell, output).
pub struct LstmDirection {
    pub w_ih: Var,
    pub w_hh: Var,
    pub b_ih: Var,
    pub b_hh: Var,
}

impl LstmDirection {
    fn new(
        rng: &mut rand::rngs::StdRng,
        inp: usize,
        hidden: usize,
        on: (&Device, DType),
    ) -> Result<Self> {
        let bound = 1.0 / (hidden as f64).sqrt();
        Ok(LstmDirection {
            w_ih: uniform(rng, &[4 * hidden, inp], bound, on)?,
            w_hh: uniform(rng, &[4 * hidden, hidden], bound, on)?,
            b_ih: uniform(rng, &[4 * hidden], bound, on)?,
            b_hh: uniform(rng, &[4 * hidden], bound, on)?,
        })
    }

    /// The hidden state after reading `x` (`[T, inp]`) in the order of `steps`: `[1, hidden]`.
    fn last_state(&self, x: &Tensor, steps: impl Iterator<Item = usize>) -> Result<Tensor> {
        let hidden = self.w_hh.as_tensor().dim(1)?;
        let bias = (self.b_ih.as_tensor() + self.b_hh.as_tensor())?;
        // Every step's input contribution in one product.
        let from_input = product_t(x, self.w_ih.as_tensor())?.broadcast_add(&bias)?;
        let mut h = Tensor::zeros((1, hidden), x.dtype(), x.device())?;
        let mut c = h.clone();
        for t in steps {
            let gates = (from_input.narrow(0, t, 1)? + product_t(&h, self.w_hh.as_tensor())?)?;
            let gate = |k: usize| gates.narrow(1, k * hidden, hidden);
            let i = candle_nn::ops::sigmoid(&gate(0)?)?;
            let f = candle_nn::ops::sigmoid(&gate(1)?)?;
            let g = gate(2)?.tanh()?;
            let o = candle_nn::ops::sigmoid(&gate(3)?)?;
            c = ((f * c)? + (i * g)?)?;
            h = (o * c.tanh()?)?;
        }
        Ok(h)
    }

    fn vars(&self) -> [Var; 4] {
        [
            self.w_ih.clone(),
            self.w_hh.clone(),
            self.b_ih.clone(),
            self.b_hh.clone(),
        ]
    }
}

/// The condition encoder: token embeddings (initialised from the model's), a bidirectional LSTM,
/// and `tanh(Linear)` of its two final states.
pub struct ConditionEncoder {
    pub embedding: Var,
    pub forward: LstmDirection,
    pub backward: LstmDirection,
    pub project: Linear,
}

/// The embedding rows a batch of conditions reads, copied into a variable of their own: the
/// graph then reaches the table only through them, and its gradient is those rows' (a few
/// hundred values) instead of a table-sized tensor (28 M values on SmolLM2).
pub struct GatheredRows {
    /// Table row of each gathered row, ascending.
    pub rows: Tensor,
    pub values: Var,
}

impl ConditionEncoder {
    /// `[n, condition_dim]` for the conditions' tokens, and the rows they read.
    fn encode_all(&self, conditions: &[Vec<u32>]) -> Result<(Tensor, GatheredRows)> {
        let device = self.embedding.as_tensor().device();
        let mut wanted: Vec<u32> = conditions.iter().flatten().copied().collect();
        wanted.sort_unstable();
        wanted.dedup();
        let rows = Tensor::new(wanted.as_slice(), device)?;
        let values = Var::from_tensor(&self.embedding.as_tensor().index_select(&rows, 0)?)?;
        let encoded = conditions
            .iter()
            .map(|ids| {
                let local: Vec<u32> = ids
                    .iter()
                    .map(|id| wanted.binary_search(id).map(|k| k as u32))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|_| Error::Invalid("a condition token was not gathered".into()))?;
                let x = values
                    .as_tensor()
                    .index_select(&Tensor::new(local.as_slice(), device)?, 0)?;
                self.encode(&x)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((Tensor::cat(&encoded, 0)?, GatheredRows { rows, values }))
    }

    /// `[1, condition_dim]` for one condition's embedded tokens `[n, width]`.
    fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.dim(0)?;
        let ahead = self.forward.last_state(x, 0..n)?;
        let back = self.backward.last_state(x, (0..n).rev())?;
        Ok(self
            .project
            .forward(&Tensor::cat(&[ahead, back], 1)?)?
            .tanh()?)
    }
}

/// One edited matrix's conditioner: condition → `(a_col, a_row, b_col, b_row, s)`.
pub struct Conditioner {
    pub first: NormedLinear,
    pub second: NormedLinear,
    rows: usize,
    cols: usize,
}

impl Conditioner {
    /// `σ̄ · (∇W ⊙ A + B)` for conditions `[n, c]` and the gradient `∇W = Σₜ δₜ xₜᵀ` given by its
    /// factors. The masks sum their per-condition rank-one terms and σ̄ averages the conditions'
    /// scales, as EFK does; so the change is never formed: `∇W ⊙ A = Σ_c Σₜ (δₜ ⊙ a_row_c)
    /// (xₜ ⊙ a_col_c)ᵀ` and `B = Σ_c b_row_c b_col_cᵀ` make factors of rank `n·(T + 1)`.
    fn change(&self, conditions: &Tensor, gradient: &Factors) -> Result<LowRankChange> {
        let (r, c) = (self.rows, self.cols);
        let out = self
            .second
            .forward(&self.first.forward(conditions)?.tanh()?)?;
        let part = |start: usize, len: usize| out.narrow(1, start, len);
        let a_col = part(0, c)?;
        let a_row = candle_nn::ops::softmax(&part(c, r)?, D::Minus1)?;
        let b_col = part(c + r, c)?;
        let b_row = candle_nn::ops::softmax(&part(2 * c + r, r)?, D::Minus1)?;
        let scale = candle_nn::ops::sigmoid(&part(2 * (c + r), 1)?)?.mean_all()?;
        let (n, t) = (a_row.dim(0)?, gradient.x.dim(0)?);
        // [n, 1, width] ⊙ [1, T, width]: each token's factor under each condition's mask.
        let masked = |mask: &Tensor, factor: &Tensor, width: usize| -> Result<Tensor> {
            Ok(mask
                .unsqueeze(1)?
                .broadcast_mul(&factor.unsqueeze(0)?)?
                .reshape((n * t, width))?)
        };
        let left = Tensor::cat(&[masked(&a_row, &gradient.delta, r)?, b_row], 0)?
            .t()?
            .broadcast_mul(&scale)?;
        let right = Tensor::cat(&[masked(&a_col, &gradient.x, c)?, b_col], 0)?;
        Ok(LowRankChange { left, right })
    }
}

/// A KE editor: the condition encoder and one conditioner per edited weight.
pub struct Ke {
    pub params: KeParams,
    pub weights: Vec<EditedWeight>,
    pub encoder: ConditionEncoder,
    pub conditioners: Vec<Conditioner>,
    /// The embedding rows the last `updates` read, whose gradient stands for the table's.
    pub gathered: Option<GatheredRows>,
}

impl Ke {
    /// An untrained editor for `model`, drawn from `seed` as torch initialises each layer, its
    /// embeddings copied from the model's.
    pub fn new(model: &Model, params: KeParams) -> Result<Self> {
        let weights = EditedWeight::resolve(model, &params.inner_params)?;
        let dtype = match model.dtype() {
            DType::F64 => DType::F64,
            _ => DType::F32,
        };
        let on = (model.device(), dtype);
        let mut rng = rand::rngs::StdRng::seed_from_u64(params.seed);
        let table = model
            .weight(WeightId::global(Module::Embed))?
            .to_dtype(dtype)?;
        let width = table.dim(1)?;
        let (h, cond) = (params.hidden_dim, params.condition_dim);
        let encoder = ConditionEncoder {
            embedding: Var::from_tensor(&table)?,
            forward: LstmDirection::new(&mut rng, width, h, on)?,
            backward: LstmDirection::new(&mut rng, width, h, on)?,
            project: Linear::new(&mut rng, 2 * h, cond, on)?,
        };
        let conditioners = weights
            .iter()
            .map(|w| {
                let (rows, cols) = model.weight(w.id)?.dims2()?;
                Ok(Conditioner {
                    first: NormedLinear::new(&mut rng, cond, h, on)?,
                    second: NormedLinear::new(&mut rng, h, 2 * (rows + cols) + 1, on)?,
                    rows,
                    cols,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Ke {
            params,
            weights,
            encoder,
            conditioners,
            gathered: None,
        })
    }

    /// The conditions' vectors, `[n, condition_dim]`, and the embedding rows they read.
    pub fn conditions(&self, model: &Model, texts: &[EditText]) -> Result<(Tensor, GatheredRows)> {
        let ids = texts
            .iter()
            .map(|t| {
                let text = condition_text(t);
                let ids = model.encode_with_special_tokens(&text)?;
                if ids.is_empty() {
                    return Err(Error::Invalid(format!(
                        "KE's condition {text:?} has no tokens"
                    )));
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        self.encoder.encode_all(&ids)
    }

    fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = vec![(
            "ke.condition.embedding".to_string(),
            self.encoder.embedding.clone(),
        )];
        for (dir, lstm) in [
            ("forward", &self.encoder.forward),
            ("backward", &self.encoder.backward),
        ] {
            for (name, var) in ["w_ih", "w_hh", "b_ih", "b_hh"]
                .into_iter()
                .zip(lstm.vars())
            {
                out.push((format!("ke.condition.lstm.{dir}.{name}"), var));
            }
        }
        out.push((
            "ke.condition.project.weight".into(),
            self.encoder.project.weight.clone(),
        ));
        out.push((
            "ke.condition.project.bias".into(),
            self.encoder.project.bias.clone(),
        ));
        for (w, c) in self.weights.iter().zip(&self.conditioners) {
            for (layer, linear) in [("0", &c.first), ("1", &c.second)] {
                for (name, var) in ["direction", "gain", "bias"].into_iter().zip(linear.vars()) {
                    out.push((format!("ke.{}.{layer}.{name}", w.name), var));
                }
            }
        }
        out
    }
}

impl Hypernet for Ke {
    const METHOD: &'static str = "KE";
    type Params = KeParams;

    fn read_params(path: &Path) -> Result<KeParams> {
        KeParams::from_yaml(path)
    }

    fn archive(params: &KeParams) -> Option<&str> {
        params.archive.as_deref()
    }

    fn build(model: &Model, params: KeParams) -> Result<Self> {
        Ke::new(model, params)
    }

    fn params(&self) -> &KeParams {
        &self.params
    }

    fn inner_params(params: &KeParams) -> &[String] {
        &params.inner_params
    }

    fn training_of(p: &KeParams) -> TrainingHparams {
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
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }

    /// The embedding table's gradient is that of the rows the last edit gathered.
    fn gradients(&self, grads: &GradStore) -> Result<Vec<Option<Gradient>>> {
        let table = self.encoder.embedding.as_tensor().id();
        Ok(self
            .vars()
            .iter()
            .map(|v| {
                if v.as_tensor().id() != table {
                    return grads
                        .get(v.as_tensor())
                        .map(|g| Gradient::Dense(g.detach()));
                }
                let gathered = self.gathered.as_ref()?;
                grads
                    .get(gathered.values.as_tensor())
                    .map(|g| Gradient::Rows {
                        rows: gathered.rows.clone(),
                        values: g.detach(),
                    })
            })
            .collect())
    }

    /// The gradient is the detached `Σₙ δₙ xₙᵀ` of the edit loss (first order, as EFK). KE keeps
    /// no running statistics, so training and a differentiable pass are the same.
    fn updates(
        &mut self,
        texts: &[EditText],
        model: &Model,
        pass: &FactorPass,
        purpose: Purpose,
    ) -> Result<Vec<LowRankChange>> {
        if pass.factors.len() != self.weights.len() {
            return Err(Error::Invalid(format!(
                "{} factor sets for {} edited weights",
                pass.factors.len(),
                self.weights.len()
            )));
        }
        let (conditions, gathered) = self.conditions(model, texts)?;
        self.gathered = Some(gathered);
        self.conditioners
            .iter()
            .zip(&pass.factors)
            .map(|(c, f)| {
                let gradient = Factors {
                    x: f.x.detach(),
                    delta: f.delta.detach(),
                };
                let change = c.change(&conditions, &gradient)?;
                Ok(match purpose {
                    Purpose::Inference => LowRankChange {
                        left: change.left.detach(),
                        right: change.right.detach(),
                    },
                    Purpose::Training | Purpose::Differentiable => change,
                })
            })
            .collect()
    }

    fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .named_vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect())
    }

    fn load_tensors(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.named_vars() {
            let t = tensors
                .get(&name)
                .ok_or_else(|| Error::Invalid(format!("the KE checkpoint lacks {name}")))?;
            if t.dims() != var.as_tensor().dims() {
                return Err(Error::Invalid(format!(
                    "the KE checkpoint's {name} has shape {:?}, this configuration {:?}",
                    t.dims(),
                    var.as_tensor().dims()
                )));
            }
            var.set(
                &t.to_device(var.as_tensor().device())?
                    .to_dtype(var.as_tensor().dtype())?,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(values: &[f64], shape: &[usize]) -> Var {
        Var::from_tensor(&Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// A one-unit LSTM over two tokens against the LSTM equations written out in scalars, read
    /// forwards and backwards.
    #[test]
    fn the_lstm_follows_torchs_equations_and_gate_order() {
        // Gate order input, forget, cell, output.
        let w_ih = [0.5, -0.3, 0.8, 0.2];
        let w_hh = [0.1, 0.4, -0.6, 0.7];
        let b_ih = [0.05, 0.1, -0.2, 0.3];
        let b_hh = [-0.1, 0.2, 0.05, 0.0];
        let lstm = LstmDirection {
            w_ih: var(&w_ih, &[4, 1]),
            w_hh: var(&w_hh, &[4, 1]),
            b_ih: var(&b_ih, &[4]),
            b_hh: var(&b_hh, &[4]),
        };
        let xs = [1.5, -0.7];
        let by_hand = |order: &[usize]| {
            let (mut h, mut c) = (0.0f64, 0.0f64);
            for &t in order {
                let pre = |k: usize| w_ih[k] * xs[t] + w_hh[k] * h + b_ih[k] + b_hh[k];
                let (i, f, g, o) = (
                    sigmoid(pre(0)),
                    sigmoid(pre(1)),
                    pre(2).tanh(),
                    sigmoid(pre(3)),
                );
                c = f * c + i * g;
                h = o * c.tanh();
            }
            h
        };
        let x = Tensor::from_vec(xs.to_vec(), (2, 1), &Device::Cpu).unwrap();
        for order in [vec![0, 1], vec![1, 0]] {
            let got: Vec<Vec<f64>> = lstm
                .last_state(&x, order.iter().copied())
                .unwrap()
                .to_vec2()
                .unwrap();
            let want = by_hand(&order);
            assert!(
                (got[0][0] - want).abs() < 1e-12,
                "{order:?}: {} vs {want}",
                got[0][0]
            );
        }
    }

    /// At initialisation a weight-normalised layer computes what its plain draw would (torch sets
    /// `g = ‖v‖`), and scaling `v` leaves it unchanged.
    #[test]
    fn weight_normalisation_starts_at_the_plain_layer_and_ignores_the_scale_of_v() {
        let on = (&Device::Cpu, DType::F64);
        let mut a = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = rand::rngs::StdRng::seed_from_u64(7);
        let plain = Linear::new(&mut a, 5, 3, on).unwrap();
        let normed = NormedLinear::new(&mut b, 5, 3, on).unwrap();
        let x = Tensor::from_vec(
            (0..10).map(|i| i as f64 * 0.1 - 0.4).collect(),
            (2, 5),
            &Device::Cpu,
        )
        .unwrap();
        let want: Vec<Vec<f64>> = plain.forward(&x).unwrap().to_vec2().unwrap();
        let got: Vec<Vec<f64>> = normed.forward(&x).unwrap().to_vec2().unwrap();
        normed
            .direction
            .set(&(normed.direction.as_tensor() * 3.0).unwrap())
            .unwrap();
        let scaled: Vec<Vec<f64>> = normed.forward(&x).unwrap().to_vec2().unwrap();
        for ((w, g), s) in want
            .iter()
            .flatten()
            .zip(got.iter().flatten())
            .zip(scaled.iter().flatten())
        {
            assert!(
                (w - g).abs() < 1e-12 && (w - s).abs() < 1e-12,
                "{w} {g} {s}"
            );
        }
    }

    /// The masks are rank one with softmax rows: each column of `A` sums to that column's
    /// `a_col` entry, so with a zero gradient the change is `σ̄·B` and its column sums are
    /// `σ̄·b_col`.
    #[test]
    fn a_conditioner_builds_rank_one_masks_from_softmax_rows() {
        let on = (&Device::Cpu, DType::F64);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (rows, cols, width) = (4, 3, 6);
        let c = Conditioner {
            first: NormedLinear::new(&mut rng, 5, width, on).unwrap(),
            second: NormedLinear::new(&mut rng, width, 2 * (rows + cols) + 1, on).unwrap(),
            rows,
            cols,
        };
        let condition =
            Tensor::from_vec(vec![0.3, -0.2, 0.5, 0.1, -0.4], (1, 5), &Device::Cpu).unwrap();
        let out: Vec<f64> = c
            .second
            .forward(&c.first.forward(&condition).unwrap().tanh().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = sigmoid(out[2 * (rows + cols)]);
        let b_col = &out[cols + rows..2 * cols + rows];
        // A gradient δ xᵀ of zeros, then of ones, from one token's factors.
        let gradient = |value: f64| Factors {
            x: Tensor::full(value, (1, cols), &Device::Cpu).unwrap(),
            delta: Tensor::full(value, (1, rows), &Device::Cpu).unwrap(),
        };
        let change = |g: &Factors| -> Vec<Vec<f64>> {
            c.change(&condition, g)
                .unwrap()
                .dense()
                .unwrap()
                .to_vec2()
                .unwrap()
        };
        let delta = change(&gradient(0.0));
        for j in 0..cols {
            let column: f64 = delta.iter().map(|r| r[j]).sum();
            assert!((column - scale * b_col[j]).abs() < 1e-12, "column {j}");
        }
        // A gradient of ones adds A, whose column sums are a_col.
        let with = change(&gradient(1.0));
        for j in 0..cols {
            let added: f64 = with.iter().zip(&delta).map(|(a, b)| a[j] - b[j]).sum();
            assert!((added - scale * out[j]).abs() < 1e-12, "column {j}");
        }
    }

    /// Two conditions and two tokens: the factored change is EFK's dense change
    /// `σ̄ · (∇W ⊙ Σ_c a_row_c a_col_cᵀ + Σ_c b_row_c b_col_cᵀ)`, written out in scalars from the
    /// conditioner's raw outputs.
    #[test]
    fn the_factored_change_is_efks_dense_change() {
        let on = (&Device::Cpu, DType::F64);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (rows, cols, width) = (4, 3, 6);
        let c = Conditioner {
            first: NormedLinear::new(&mut rng, 5, width, on).unwrap(),
            second: NormedLinear::new(&mut rng, width, 2 * (rows + cols) + 1, on).unwrap(),
            rows,
            cols,
        };
        let conditions = Tensor::from_vec(
            vec![0.3, -0.2, 0.5, 0.1, -0.4, -0.6, 0.2, 0.9, -0.1, 0.05],
            (2, 5),
            &Device::Cpu,
        )
        .unwrap();
        let x = [[0.7, -1.2, 0.4], [0.1, 0.5, -0.9]];
        let delta = [[0.3, -0.5, 0.8, 0.2], [-1.1, 0.6, 0.05, 0.4]];
        let gradient = Factors {
            x: Tensor::new(&x, &Device::Cpu).unwrap(),
            delta: Tensor::new(&delta, &Device::Cpu).unwrap(),
        };
        let got: Vec<Vec<f64>> = c
            .change(&conditions, &gradient)
            .unwrap()
            .dense()
            .unwrap()
            .to_vec2()
            .unwrap();
        let out: Vec<Vec<f64>> = c
            .second
            .forward(&c.first.forward(&conditions).unwrap().tanh().unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        let softmax = |v: &[f64]| -> Vec<f64> {
            let total: f64 = v.iter().map(|z| z.exp()).sum();
            v.iter().map(|z| z.exp() / total).collect()
        };
        let scale = out
            .iter()
            .map(|o| sigmoid(o[2 * (rows + cols)]))
            .sum::<f64>()
            / 2.0;
        for (o, got_row) in got.iter().enumerate() {
            for (i, &value) in got_row.iter().enumerate() {
                let grad: f64 = (0..2).map(|t| delta[t][o] * x[t][i]).sum();
                let (mut a, mut b) = (0.0, 0.0);
                for raw in &out {
                    let a_row = softmax(&raw[cols..cols + rows]);
                    let b_row = softmax(&raw[2 * cols + rows..2 * (cols + rows)]);
                    a += a_row[o] * raw[i];
                    b += b_row[o] * raw[cols + rows + i];
                }
                let expected = scale * (grad * a + b);
                assert!(
                    (value - expected).abs() < 1e-12,
                    "({o}, {i}): {value} vs {expected}"
                );
            }
        }
    }

    /// The product has the value of `x wᵀ` bit for bit and candle's gradients of it, for an `x`
    /// that itself depends on a variable.
    #[test]
    fn the_plain_gradient_product_is_the_product() {
        let d = &Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 4), d).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (5, 4), d).unwrap()).unwrap();
        let weights = Tensor::randn(0f64, 1.0, (3, 5), d).unwrap();
        let x = a.as_tensor().tanh().unwrap();
        let plain = product_t(&x, w.as_tensor()).unwrap();
        let reference = x.matmul(&w.as_tensor().t().unwrap()).unwrap();
        assert_eq!(
            plain.to_vec2::<f64>().unwrap(),
            reference.to_vec2::<f64>().unwrap()
        );
        let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
        let got = loss(&plain).backward().unwrap();
        let want = loss(&reference).backward().unwrap();
        for var in [&a, &w] {
            let (g, r) = (got.get(var).unwrap(), want.get(var).unwrap());
            let gap = (g - r)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(gap < 1e-12, "gradients differ by {gap}");
        }
    }
}

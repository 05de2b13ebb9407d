//! CaliNet (Dong et al., Findings of EMNLP 2022; SPEC-editors §15, decoder-only port of §15.4):
//! calibration neurons, a small FFN beside the MLP of chosen layers whose output is added to the
//! MLP's, trained on the facts to fix with the base model frozen. The FFN has the host MLP's
//! form: `W_o · gelu(W_i x)` for GPT-2, `W_o · (silu(W_g x) ⊙ W_u x)` for LLaMA, on the MLP's
//! normalised input `x`.
//!
//! Every `apply` trains all its facts together, on new neurons (`ex_size` per layer) appended to
//! those of earlier calls, which stay frozen: retraining the same neurons for the next batch
//! would overwrite what they learnt for the previous one (the README's CaliNet section measures
//! both). `W_o` of new neurons starts at zero, so an edit starts from the unedited model; `W_i`
//! (and `W_g`) start as PyTorch's `nn.Linear` does, uniform in ±1/√d.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Tensor, Var};
use serde::Deserialize;

use super::super::ft::target_new_inputs;
use crate::data::python_random::PythonRandom;
use crate::data::EditRequest;
use crate::editors::hparams::{float, read_yaml};
use crate::editors::optim::Adam;
use crate::editors::{Change, Edit, EditCtx, EditReport, Editor, OverlayChange};
use crate::error::{Error, Result};
use crate::model::{
    Activation, HookSpec, Model, Overlay, OverlayInput, OverlayParts, Site, WeightForm,
};

/// CaliNet's hyperparameters (SPEC §15.4's field names).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaliNetParams {
    pub alg_name: String,
    #[serde(default)]
    pub model_name: Option<String>,
    #[serde(default)]
    pub device: Option<serde_yaml::Value>,
    /// The layers whose MLP gets calibration neurons.
    pub kb_layer: Vec<usize>,
    /// New neurons per layer and `apply` call.
    pub ex_size: usize,
    #[serde(deserialize_with = "float")]
    pub lr: f64,
    /// `adam` (kedit implements Adam; the original's Adafactor is refused rather than replaced).
    #[serde(default)]
    pub optimizer: Option<String>,
    /// Full-batch optimisation steps per `apply`.
    pub num_steps: usize,
    /// Facts per `apply` call (the evaluation's `--batch-size` is capped at it).
    #[serde(default = "one")]
    pub batch_size: usize,
    /// Refused: kedit never truncates a fact.
    #[serde(default)]
    pub max_length: Option<usize>,
    /// kedit: stop once the loss is below this (0 runs every step).
    #[serde(default, deserialize_with = "float")]
    pub loss_floor: f64,
    /// kedit: `true` retrains the existing neurons instead of adding new ones (for the
    /// measurement that decided against it).
    #[serde(default)]
    pub retrain_neurons: bool,
}

fn one() -> usize {
    1
}

/// The most calibration activations (rows × neurons) computed in one block: 64 MB in f32.
const ACTIVATIONS_AT_ONCE: usize = 1 << 24;

/// Calibration neurons at one layer's MLP output.
#[derive(Debug, Clone)]
pub struct CalibrationFfn {
    pub activation: Activation,
    /// `[n, d_model]`: the input projection (LLaMA: the up projection).
    pub w_in: Tensor,
    /// `[n, d_model]`: LLaMA's gate projection.
    pub w_gate: Option<Tensor>,
    /// `[d_model, n]`.
    pub w_out: Tensor,
}

impl CalibrationFfn {
    pub const KIND: &'static str = "calibration_ffn";

    pub fn neurons(&self) -> usize {
        self.w_in.dims()[0]
    }

    /// The calibration output for normalised MLP inputs `x: [m, d]`, a block of rows at a time
    /// where the activations would be large: after 1,000 lifelong edits (64,000 neurons) one
    /// evaluation pass's ~1,600 tokens made activation matrices of 410 MB, several alive at once.
    fn delta(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let rows_at_once = (ACTIVATIONS_AT_ONCE / self.neurons().max(1)).max(1);
        self.delta_in_blocks(x, rows_at_once)
    }

    fn delta_in_blocks(&self, x: &Tensor, rows_at_once: usize) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(self.w_in.dtype())?;
        let rows = x.dims()[0];
        if rows <= rows_at_once {
            return self.delta_of_rows(&x);
        }
        let blocks = (0..rows)
            .step_by(rows_at_once)
            .map(|start| self.delta_of_rows(&x.narrow(0, start, rows_at_once.min(rows - start))?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&blocks, 0)
    }

    fn delta_of_rows(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let up = x.matmul(&self.w_in.t()?)?;
        let act = match (&self.activation, &self.w_gate) {
            (Activation::Silu, Some(gate)) => {
                crate::model::ops::swiglu(&x.matmul(&gate.t()?)?, &up)?
            }
            (Activation::GeluTanh, _) => up.gelu()?,
            (Activation::GeluErf, _) => up.gelu_erf()?,
            (Activation::Silu, None) => {
                candle_core::bail!("a gated calibration FFN has no gate projection")
            }
        };
        act.matmul(&self.w_out.t()?)
    }

    pub fn from_parts(parts: &OverlayParts, device: &candle_core::Device) -> Result<Self> {
        let bad = |why: String| Error::Invalid(format!("{}: {why}", Self::KIND));
        let activation = match parts.header.get("activation").and_then(|a| a.as_str()) {
            Some("silu") => Activation::Silu,
            Some("gelu_tanh") => Activation::GeluTanh,
            Some("gelu_erf") => Activation::GeluErf,
            other => return Err(bad(format!("activation {other:?}"))),
        };
        let tensor = |name: &str| -> Result<Option<Tensor>> {
            parts
                .tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| Ok(t.to_device(device)?.to_dtype(DType::F32)?))
                .transpose()
        };
        let w_in = tensor("w_in")?.ok_or_else(|| bad("no tensor w_in".into()))?;
        let w_out = tensor("w_out")?.ok_or_else(|| bad("no tensor w_out".into()))?;
        let w_gate = tensor("w_gate")?;
        let (n, d) = w_in.dims2()?;
        let gate_ok = match (&activation, &w_gate) {
            (Activation::Silu, Some(g)) => g.dims2()? == (n, d),
            (Activation::Silu, None) => false,
            (_, gate) => gate.is_none(),
        };
        if w_out.dims2()? != (d, n) || !gate_ok {
            return Err(bad(format!(
                "shapes w_in {:?}, w_out {:?}, w_gate {:?} do not fit a {activation:?} FFN",
                w_in.dims(),
                w_out.dims(),
                w_gate.as_ref().map(Tensor::dims)
            )));
        }
        Ok(CalibrationFfn {
            activation,
            w_in,
            w_gate,
            w_out,
        })
    }
}

/// `output` plus the calibration output `delta` computes from the MLP's normalised input, given
/// to it as `[b·s, d]`.
fn calibrated(
    input: &OverlayInput<'_>,
    output: &Tensor,
    delta: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let x = input.mlp_in.ok_or_else(|| {
        candle_core::Error::Msg("calibration neurons sit after the MLP's input".into())
    })?;
    let (b, s, d) = x.dims3()?;
    let delta = delta(&x.reshape((b * s, d))?)?;
    output + delta.reshape(output.dims())?.to_dtype(output.dtype())?
}

impl Overlay for CalibrationFfn {
    fn forward(&self, input: &OverlayInput<'_>, output: &Tensor) -> candle_core::Result<Tensor> {
        calibrated(input, output, |x| self.delta(x))
    }

    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn parts(&self) -> Result<OverlayParts> {
        let activation = match self.activation {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_tanh",
            Activation::GeluErf => "gelu_erf",
        };
        let mut tensors = vec![
            ("w_in".to_string(), self.w_in.clone()),
            ("w_out".to_string(), self.w_out.clone()),
        ];
        if let Some(g) = &self.w_gate {
            tensors.push(("w_gate".to_string(), g.clone()));
        }
        Ok(OverlayParts {
            header: serde_json::json!({ "activation": activation, "neurons": self.neurons() }),
            tensors,
        })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn as_weights(&self, site: Site) -> std::result::Result<WeightForm, String> {
        let Site::MlpOut(layer) = site else {
            return Err(format!(
                "calibration neurons at {site} (not at an MLP's output)"
            ));
        };
        Ok(WeightForm::Neurons {
            layer,
            activation: self.activation,
            up: self.w_in.clone(),
            gate: self.w_gate.clone(),
            down: self.w_out.clone(),
        })
    }
}

/// How one `apply` ended.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CaliNetReport {
    pub facts: usize,
    pub steps: usize,
    pub final_loss: f64,
    /// Neurons per calibrated layer after the edit.
    pub neurons: usize,
}

impl EditReport for CaliNetReport {
    fn lines(&self) -> Vec<String> {
        vec![format!(
            "calibration: {} facts, {} steps, final loss {:.4}; {} neurons per layer",
            self.facts, self.steps, self.final_loss, self.neurons
        )]
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "calibration": self })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

pub struct CaliNet {
    params: CaliNetParams,
}

/// One layer's neurons during training: the frozen ones of earlier calls and the new ones.
struct Trainable {
    site: Site,
    frozen: Option<CalibrationFfn>,
    /// The frozen neurons' output, kept from the first step where the layer's input is the same
    /// at every step (the lowest calibrated layer: nothing below it trains).
    frozen_output: Option<Arc<OnceLock<Tensor>>>,
    w_in: Var,
    w_gate: Option<Var>,
    w_out: Var,
}

/// The neurons of one layer while a call trains. The frozen neurons' output is added apart from
/// the new neurons' rather than computed from the concatenated weights: a step then neither
/// copies the frozen weights nor differentiates through them, and costs the same after 1,000
/// edits as after one (the concatenation made CaliNet's lifelong run grow from 0.6 s per edit
/// over its first 10 to 23–30 s each by the 900th).
struct TrainingFfn {
    new: CalibrationFfn,
    frozen: Option<CalibrationFfn>,
    frozen_output: Option<Arc<OnceLock<Tensor>>>,
}

impl Overlay for TrainingFfn {
    fn forward(&self, input: &OverlayInput<'_>, output: &Tensor) -> candle_core::Result<Tensor> {
        calibrated(input, output, |x| {
            let delta = self.new.delta(x)?;
            let Some(frozen) = &self.frozen else {
                return Ok(delta);
            };
            let old = match &self.frozen_output {
                Some(kept) => match kept.get() {
                    Some(old) if old.dims() == x.dims() => old.clone(),
                    Some(_) => candle_core::bail!(
                        "calibration neurons: the kept output of the frozen neurons does not fit this input"
                    ),
                    None => {
                        let old = frozen.delta(&x.detach())?.detach();
                        kept.get_or_init(|| old.clone());
                        old
                    }
                },
                None => frozen.delta(x)?,
            };
            delta + old
        })
    }

    fn kind(&self) -> &'static str {
        "calibration_ffn_in_training"
    }

    fn parts(&self) -> Result<OverlayParts> {
        Err(Error::Invalid(
            "calibration neurons in training are never saved".into(),
        ))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Trainable {
    fn training(&self, activation: Activation) -> TrainingFfn {
        TrainingFfn {
            new: CalibrationFfn {
                activation,
                w_in: self.w_in.as_tensor().clone(),
                w_gate: self.w_gate.as_ref().map(|g| g.as_tensor().clone()),
                w_out: self.w_out.as_tensor().clone(),
            },
            frozen: self.frozen.clone(),
            frozen_output: self.frozen_output.clone(),
        }
    }

    /// The layer's neurons after training: the frozen ones followed by the new ones.
    fn trained(&self, activation: Activation) -> Result<CalibrationFfn> {
        let (w_in, w_gate, w_out) = (
            self.w_in.as_tensor().detach(),
            self.w_gate.as_ref().map(|g| g.as_tensor().detach()),
            self.w_out.as_tensor().detach(),
        );
        Ok(match &self.frozen {
            None => CalibrationFfn {
                activation,
                w_in,
                w_gate,
                w_out,
            },
            Some(old) => CalibrationFfn {
                activation,
                w_in: Tensor::cat(&[&old.w_in, &w_in], 0)?,
                w_gate: match (&old.w_gate, &w_gate) {
                    (Some(a), Some(b)) => Some(Tensor::cat(&[a, b], 0)?),
                    _ => None,
                },
                w_out: Tensor::cat(&[&old.w_out, &w_out], 1)?,
            },
        })
    }

    fn vars(&self) -> Vec<Var> {
        let mut vars = vec![self.w_in.clone(), self.w_out.clone()];
        vars.extend(self.w_gate.clone());
        vars
    }
}

impl CaliNet {
    pub fn new(params: CaliNetParams) -> Result<Self> {
        let bad = |field: &str, why: &str| Err(Error::Invalid(format!("CaliNet {field}: {why}")));
        if params.kb_layer.is_empty() {
            return bad("kb_layer", "is empty; name the layers to calibrate");
        }
        if params.ex_size == 0 {
            return bad("ex_size", "must be at least 1");
        }
        if !(params.lr > 0.0 && params.lr.is_finite()) {
            return bad("lr", "must be positive");
        }
        if params.num_steps == 0 {
            return bad("num_steps", "must be at least 1");
        }
        if params.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if params.max_length.is_some() {
            return bad(
                "max_length",
                "kedit trains on whole prompts and never truncates; remove it",
            );
        }
        if let Some(opt) = params.optimizer.as_deref() {
            if !opt.eq_ignore_ascii_case("adam") {
                return bad(
                    "optimizer",
                    "kedit trains calibration neurons with adam (the original's adafactor is not implemented)",
                );
            }
        }
        Ok(CaliNet { params })
    }

    pub fn from_yaml(path: &Path) -> Result<Self> {
        Self::new(read_yaml(path)?).map_err(|e| Error::file(path, e.to_string()))
    }

    /// New neurons for `layer`: `W_i` (and `W_g`) uniform in ±1/√d (seeded), `W_o` zero.
    fn fresh(
        &self,
        model: &Model,
        site: Site,
        frozen: Option<CalibrationFfn>,
        seed: u64,
    ) -> Result<Trainable> {
        let spec = model.spec();
        let (n, d) = (self.params.ex_size, spec.d_model);
        let bound = 1.0 / (d as f64).sqrt();
        let mut rng = PythonRandom::new(seed);
        let mut uniform = || -> Result<Var> {
            let draws: Vec<f32> = (0..n * d)
                .map(|_| ((2.0 * rng.random() - 1.0) * bound) as f32)
                .collect();
            Ok(Var::from_tensor(&Tensor::from_vec(
                draws,
                (n, d),
                model.device(),
            )?)?)
        };
        let w_in = uniform()?;
        let w_gate = match spec.activation {
            Activation::Silu => Some(uniform()?),
            _ => None,
        };
        Ok(Trainable {
            site,
            frozen,
            w_in,
            w_gate,
            frozen_output: None,
            w_out: Var::zeros((d, n), DType::F32, model.device())?,
        })
    }
}

impl Editor for CaliNet {
    fn name(&self) -> &'static str {
        "CaliNet"
    }

    fn max_batch(&self) -> usize {
        self.params.batch_size
    }

    fn apply(
        &mut self,
        model: &mut Model,
        requests: &[EditRequest],
        ctx: &EditCtx,
    ) -> Result<Edit> {
        for &l in &self.params.kb_layer {
            model
                .check_layer(l)
                .map_err(|e| Error::Invalid(format!("CaliNet kb_layer: {e}")))?;
        }
        let activation = model.spec().activation;
        let key = requests
            .iter()
            .map(|r| format!("{}\n{}", r.prompt, r.target_new))
            .collect::<Vec<_>>()
            .join("\n");
        let lowest = self.params.kb_layer.iter().copied().min().unwrap_or(0);
        let mut layers = Vec::with_capacity(self.params.kb_layer.len());
        for (i, &l) in self.params.kb_layer.iter().enumerate() {
            let site = Site::MlpOut(l);
            let before = model.overlay(site).cloned();
            let frozen = match &before {
                None => None,
                Some(o) => Some(
                    o.as_any()
                        .downcast_ref::<CalibrationFfn>()
                        .cloned()
                        .ok_or_else(|| {
                            Error::Invalid(format!(
                                "CaliNet: a {} overlay already sits at {site}",
                                o.kind()
                            ))
                        })?,
                ),
            };
            let seed = crate::data::stable_hash::stable_hash(ctx.seed, &[&key, &i.to_string()]);
            let mut trainable = match (&frozen, self.params.retrain_neurons) {
                (Some(old), true) => Trainable {
                    site,
                    frozen: None,
                    frozen_output: None,
                    w_in: Var::from_tensor(&old.w_in)?,
                    w_gate: old.w_gate.as_ref().map(Var::from_tensor).transpose()?,
                    w_out: Var::from_tensor(&old.w_out)?,
                },
                _ => self.fresh(model, site, frozen, seed)?,
            };
            if l == lowest {
                trainable.frozen_output = Some(Arc::default());
            }
            layers.push((before, trainable));
        }
        let inputs = target_new_inputs(model, requests)?;
        // The layers below the lowest calibrated one do not change: run them once.
        let below = match lowest {
            0 => None,
            l => {
                let hooks = HookSpec::new()
                    .capture(Site::ResidPost(l - 1))
                    .stop_after(l - 1);
                let out = model.forward(&inputs.batch, &hooks)?;
                Some((l - 1, out.capture(Site::ResidPost(l - 1))?.clone()))
            }
        };
        let vars: Vec<Var> = layers.iter().flat_map(|(_, t)| t.vars()).collect();
        let mut opt = Adam::new(vars, self.params.lr, 0.0)?;
        let trained = (|| {
            let mut steps = 0;
            let mut last = f64::NAN;
            for step in 0..self.params.num_steps {
                for (_, t) in &layers {
                    model.set_overlay(t.site, Some(Arc::new(t.training(activation))))?;
                }
                let mut hooks = HookSpec::new();
                if let Some((l, resid)) = &below {
                    hooks = hooks.resume_after(*l, resid.clone());
                }
                let loss = inputs.loss(model, &hooks)?;
                last = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !last.is_finite() {
                    return Err(Error::Invalid(format!(
                        "CaliNet: the loss is {last} at step {step}; lower lr ({})",
                        self.params.lr
                    )));
                }
                steps = step + 1;
                if last < self.params.loss_floor {
                    break;
                }
                opt.backward_step(&loss)?;
            }
            Ok((steps, last))
        })();
        let mut changes = Vec::with_capacity(layers.len());
        let mut neurons = 0;
        for (before, t) in &layers {
            match &trained {
                Ok(_) => {
                    let ffn = t.trained(activation)?;
                    neurons = ffn.neurons();
                    let after: Arc<dyn Overlay> = Arc::new(ffn);
                    model.set_overlay(t.site, Some(after.clone()))?;
                    changes.push(Change::Overlay(OverlayChange {
                        site: t.site,
                        before: before.clone(),
                        after: Some(after),
                    }));
                }
                Err(_) => {
                    model.set_overlay(t.site, before.clone())?;
                }
            }
        }
        let (steps, final_loss) = trained?;
        Ok(Edit {
            changes,
            report: Some(Box::new(CaliNetReport {
                facts: requests.len(),
                steps,
                final_loss,
                neurons,
            })),
            ..Edit::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The gated calibration output against sums in f64, whole and a few rows at a time.
    #[test]
    fn calibration_output_in_row_blocks_matches_f64_sums() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (rows, d, n) = (7, 5, 11);
        let ffn = CalibrationFfn {
            activation: Activation::Silu,
            w_in: Tensor::randn(0f32, 1.0, (n, d), &dev)?,
            w_gate: Some(Tensor::randn(0f32, 1.0, (n, d), &dev)?),
            w_out: Tensor::randn(0f32, 1.0, (d, n), &dev)?,
        };
        let x = Tensor::randn(0f32, 1.0, (rows, d), &dev)?;
        let f64s = |t: &Tensor| t.to_dtype(DType::F64)?.to_vec2::<f64>();
        let (xv, up, gate, down) = (
            f64s(&x)?,
            f64s(&ffn.w_in)?,
            f64s(ffn.w_gate.as_ref().unwrap_or(&ffn.w_in))?,
            f64s(&ffn.w_out)?,
        );
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
        for rows_at_once in [rows, 3, 1] {
            let got = ffn.delta_in_blocks(&x, rows_at_once)?.to_vec2::<f32>()?;
            for (r, row) in got.iter().enumerate() {
                for (j, &value) in row.iter().enumerate() {
                    let want: f64 = (0..n)
                        .map(|i| {
                            let g = dot(&gate[i], &xv[r]);
                            g / (1.0 + (-g).exp()) * dot(&up[i], &xv[r]) * down[j][i]
                        })
                        .sum();
                    assert!(
                        (f64::from(value) - want).abs() < 1e-4,
                        "blocks of {rows_at_once}: [{r},{j}] {value} vs {want}"
                    );
                }
            }
        }
        Ok(())
    }
}

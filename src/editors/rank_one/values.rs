//! The target-vector optimisation (SPEC-editors §2.5, ROME's `compute_v`, MEMIT's `compute_z`):
//! find the vector δ that, added at the fact token of one site, makes the model say the target
//! in every context template while keeping what it says about the subject in general.

use candle_core::{DType, Tensor, Var};
use serde::Serialize;

use super::keys::template_positions;
use crate::editors::optim::Adam;
use crate::error::{Error, Result};
use crate::model::subject::FactToken;
use crate::model::{ForwardOut, HookSpec, Intervention, Model, PrefixCache, Site, TokenBatch};

/// The value loop stops once the loss is below this.
const LOSS_FLOOR: f64 = 5e-2;

#[derive(Debug, Clone)]
pub struct ValueParams {
    /// Where δ is added: `MlpOut(l)` for ROME, `ResidPost(l)` for MEMIT and AlphaEdit.
    pub site: Site,
    /// The layer whose output is scored (the model's own logits when it is the last layer).
    pub loss_layer: usize,
    pub steps: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub clamp_norm_factor: f64,
    pub kl_factor: f64,
    pub fact_token: FactToken,
}

/// The optimised vector: `m0 + δ`, with `m0` the site's value at the fact token of the plain prompt.
#[derive(Debug, Clone)]
pub struct TargetValue {
    pub target: Tensor,
    pub m0: Tensor,
    pub delta: Tensor,
    /// How the optimisation ended.
    pub fit: ValueFit,
}

/// How one target-vector optimisation ended: the forward passes it ran (the last one only scores,
/// so an early stop at step `s` reports `s + 1`) and the loss at the last of them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ValueFit {
    pub steps: usize,
    pub loss: f64,
}

/// The locate-then-edit methods' report of an edit: how each target-vector optimisation ended
/// (one per fact and layer optimised), so a user can tell a converged edit from one that ran out
/// of steps.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ValueReport {
    pub value_fits: Vec<ValueFit>,
}

impl crate::editors::EditReport for ValueReport {
    fn lines(&self) -> Vec<String> {
        self.value_fits
            .iter()
            .map(|fit| format!("value fit: {} steps, final loss {:.4}", fit.steps, fit.loss))
            .collect()
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "value_fits": self.value_fits })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Optimises δ for `prompt` (one `{}` for the subject) and the target token ids.
pub fn optimise_value(
    model: &Model,
    prompt: &str,
    subject: &str,
    target_ids: &[u32],
    templates: &[String],
    params: &ValueParams,
) -> Result<TargetValue> {
    let t = target_ids.len();
    if t == 0 {
        return Err(Error::Invalid("the target has no tokens".into()));
    }
    let layer = params
        .site
        .layer()
        .ok_or_else(|| Error::Invalid(format!("δ site {} has no layer", params.site)))?;
    let n_layers = model.spec().n_layers;
    // EasyEdit reads the loss at this layer's output: past the last layer it has no module, below
    // the edited one the loss cannot see δ. Both are refused rather than quietly moved.
    let loss_layer = params.loss_layer;
    if loss_layer >= n_layers || loss_layer < layer {
        return Err(Error::Invalid(format!(
            "v_loss_layer {loss_layer} is not a layer from the edited layer {layer} to the model's last, {}",
            n_layers - 1
        )));
    }
    // Teacher forcing: every template's prompt followed by all target tokens but the last.
    let forced = model.decode(&target_ids[..t - 1])?;
    let lookups = template_positions(model, templates, prompt, subject, params.fact_token)?;
    let mut sequences = Vec::with_capacity(templates.len() + 1);
    for template in templates {
        let text = template
            .replacen("{}", prompt, 1)
            .replacen("{}", subject, 1);
        sequences.push(model.encode_with_special_tokens(&format!("{text}{forced}"))?);
    }
    let kl = template_positions(
        model,
        &["{}".to_string()],
        "{} is a",
        subject,
        params.fact_token,
    )?;
    sequences.push(model.encode_with_special_tokens(&kl[0].0)?);
    let rows = templates.len();
    // Where δ goes in each row: the fact token of every template, then of the KL prompt.
    let fact_positions: Vec<usize> = lookups
        .iter()
        .map(|(_, pos)| *pos)
        .chain([kl[0].1])
        .collect();
    let mut scored = Vec::with_capacity(rows * t + 1);
    let mut labels = Vec::with_capacity(rows * t);
    for (row, ids) in sequences[..rows].iter().enumerate() {
        let len = ids.len();
        if len < t {
            return Err(Error::Invalid(format!(
                "template {row} is shorter than the target"
            )));
        }
        for (j, &y) in target_ids.iter().enumerate() {
            scored.push((row, len - t + j));
            labels.push(y);
        }
    }
    scored.push((rows, kl[0].1));

    let pad = model.spec().eos_id.or(model.spec().pad_id).unwrap_or(0);
    let batch = SplitBatch::new(model, &sequences, &fact_positions, pad)?;
    let add_at: Vec<(usize, usize)> = (0..=rows).map(|row| (row, 0)).collect();
    let scored = batch.relative(&scored)?;
    let labels = Tensor::new(labels.as_slice(), model.device())?.unsqueeze(1)?;
    let d = model.spec().d_model;
    let delta = Var::zeros(d, DType::F32, model.device())?;
    let mut opt = Adam::new(vec![delta.clone()], params.lr, 0.0)?;
    let mut m0: Option<Tensor> = None;
    let mut kl_init: Option<Tensor> = None;
    let mut last_loss = f64::NAN;
    // Layers below δ's site do not depend on δ: run them once.
    let resume = match params.site {
        Site::ResidPost(l) => Some(l),
        _ => layer.checked_sub(1),
    };
    let prefix = match resume {
        Some(l) => {
            let hooks = HookSpec::new().capture(Site::ResidPost(l)).stop_after(l);
            Some((
                l,
                batch
                    .forward(model, &hooks, None)?
                    .capture(Site::ResidPost(l))?
                    .clone(),
            ))
        }
        None => None,
    };
    let mut steps = 0;
    for it in 0..params.steps {
        steps = it + 1;
        let mut hooks = HookSpec::new();
        if let Some((l, resid)) = &prefix {
            hooks = hooks.resume_after(*l, resid.clone());
        }
        let mut hooks = hooks.capture(params.site).intervene(
            params.site,
            Intervention::AddAt {
                rows: add_at.clone(),
                delta: delta.as_tensor().clone(),
            },
        );
        let log_probs = if loss_layer + 1 == n_layers {
            let out = batch.forward(model, &hooks, Some(&scored))?;
            if m0.is_none() {
                m0 = Some(row_at(out.capture(params.site)?, add_at[0])?);
            }
            Model::log_probs(&out.logits)?
        } else {
            let resid = Site::ResidPost(loss_layer);
            hooks = hooks.capture(resid).stop_after(loss_layer);
            let out = batch.forward(model, &hooks, None)?;
            if m0.is_none() {
                m0 = Some(row_at(out.capture(params.site)?, add_at[0])?);
            }
            let h = out.capture(resid)?;
            let picked = scored
                .iter()
                .map(|&(row, pos)| Ok(h.get(row)?.get(pos)?))
                .collect::<Result<Vec<_>>>()?;
            Model::log_probs(&model.unembed(&Tensor::stack(&picked, 0)?)?)?
        };
        let m0 = m0.as_ref().ok_or_else(|| {
            crate::Error::Invalid("the unedited distribution was not taken at step 0".into())
        })?;
        let n = rows * t;
        let target_lp = log_probs
            .narrow(0, 0, n)?
            .gather(&labels, 1)?
            .reshape((rows, t))?;
        let nll = target_lp.sum(1)?.affine(-1.0 / t as f64, 0.0)?.mean(0)?;
        let kl_lp = log_probs.narrow(0, n, 1)?;
        let init = kl_init.get_or_insert_with(|| kl_lp.detach());
        let kl = ((kl_lp.exp()? * (&kl_lp - &*init)?)?.sum_all()? * params.kl_factor)?;
        let m0_sq = m0.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        // ‖δ‖ has no derivative at δ = 0 (sqrt's is infinite there); torch takes it as 0.
        let delta_sq = delta.as_tensor().sqr()?.sum_all()?;
        let loss = if delta_sq.to_scalar::<f32>()? > 0.0 {
            ((nll + kl)? + (delta_sq.sqrt()? * (params.weight_decay / m0_sq))?)?
        } else {
            (nll + kl)?
        };
        last_loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !last_loss.is_finite() {
            return Err(Error::Invalid(format!(
                "the value loss is {last_loss} at step {it}; lower v_lr ({})",
                params.lr
            )));
        }
        if last_loss < LOSS_FLOOR || it + 1 == params.steps {
            break;
        }
        opt.backward_step(&loss)?;
        let max_norm = params.clamp_norm_factor * m0_sq.sqrt();
        let norm = delta
            .as_tensor()
            .sqr()?
            .sum_all()?
            .sqrt()?
            .to_scalar::<f32>()? as f64;
        if norm > max_norm {
            delta.set(&delta.as_tensor().affine(max_norm / norm, 0.0)?)?;
        }
    }
    let m0 = m0.ok_or_else(|| Error::Invalid("v_num_grad_steps must be at least 1".into()))?;
    let delta = delta.as_tensor().detach();
    Ok(TargetValue {
        target: (&m0 + &delta)?,
        m0,
        delta,
        fit: ValueFit {
            steps,
            loss: last_loss,
        },
    })
}

/// The value loop's rows split at the fact token: nothing before it depends on δ (attention is
/// causal), so the tokens before it are run once into a prefix cache and every step runs only the
/// rest, which for a one-token target is two or three tokens a row instead of the whole template.
struct SplitBatch {
    past: Option<PrefixCache>,
    tails: TokenBatch,
    splits: Vec<usize>,
}

impl SplitBatch {
    fn new(model: &Model, sequences: &[Vec<u32>], splits: &[usize], pad: u32) -> Result<Self> {
        let (heads, tails): (Vec<_>, Vec<_>) = sequences
            .iter()
            .zip(splits)
            .map(|(ids, &at)| (ids[..at].to_vec(), ids[at..].to_vec()))
            .unzip();
        let past = if heads.iter().all(Vec::is_empty) {
            None
        } else {
            let heads = TokenBatch::allowing_empty_rows(&heads, pad, model.device())?;
            Some(model.prefix_cache(&heads)?)
        };
        Ok(Self {
            past,
            tails: TokenBatch::new(&tails, pad, model.device())?,
            splits: splits.to_vec(),
        })
    }

    /// `(row, position in the whole row)` → `(row, position in its tail)`.
    fn relative(&self, positions: &[(usize, usize)]) -> Result<Vec<(usize, usize)>> {
        positions
            .iter()
            .map(|&(row, pos)| match pos.checked_sub(self.splits[row]) {
                Some(p) => Ok((row, p)),
                None => Err(Error::Invalid(format!(
                    "position {pos} of row {row} comes before its fact token"
                ))),
            })
            .collect()
    }

    /// The tails' forward pass, with logits at `positions` (tail-relative) or everywhere.
    fn forward(
        &self,
        model: &Model,
        hooks: &HookSpec,
        positions: Option<&[(usize, usize)]>,
    ) -> Result<ForwardOut> {
        match (&self.past, positions) {
            (Some(past), positions) => {
                model.forward_continuing(past, &self.tails, hooks, positions)
            }
            (None, Some(positions)) => model.forward_at(&self.tails, hooks, positions),
            (None, None) => model.forward(&self.tails, hooks),
        }
    }
}

/// `[d]` f32: the vector at `(row, position)` of a `[b, s, d]` activation.
fn row_at(acts: &Tensor, (row, pos): (usize, usize)) -> Result<Tensor> {
    Ok(acts.get(row)?.get(pos)?.to_dtype(DType::F32)?.detach())
}

//! Hook sites and hook specifications: what an editor may read from or change in a forward pass.
//!
//! Hooks are data, not callbacks. A [`HookSpec`] lists the sites to capture and the interventions to
//! apply; the decoder calls [`HookSpec::visit`] at every site, which costs a map lookup when the spec
//! is empty.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Result, Tensor};

/// A place in the forward pass, in the model's own numbering of layers (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Site {
    /// `[b, s, d_model]`: token (+ position) embeddings, the input of layer 0.
    Embed,
    /// `[b, s, d_model]`: the residual stream entering layer `l`.
    ResidPre(usize),
    /// `[b, s, d_model]`: the attention output of layer `l` (after the output projection, before the residual add).
    AttnOut(usize),
    /// `[b, s, d_model]`: the normalised input of layer `l`'s MLP, the input of its up (and gate)
    /// projection.
    MlpIn(usize),
    /// `[b, s, d_mlp]`: the output of the up projection (`c_fc` / `up_proj`, bias included), before
    /// the activation. MEND and KE read the gradient here.
    MlpUpOut(usize),
    /// `[b, s, d_mlp]`: the output of LLaMA's gate projection, before SiLU (GPT-2 has none).
    MlpGateOut(usize),
    /// `[b, s, d_mlp]`: the input of `down_proj` / `c_proj` — the key `k` of ROME and MEMIT.
    MlpAct(usize),
    /// `[b, s, d_model]`: the MLP output of layer `l`, where ROME adds its value delta.
    MlpOut(usize),
    /// `[b, s, d_model]`: the residual stream leaving layer `l`.
    ResidPost(usize),
    /// `[b, s, d_model]`: the output of the final norm, the input of the LM head.
    FinalNorm,
}

impl Site {
    /// The layer a site belongs to, if any.
    pub fn layer(&self) -> Option<usize> {
        match *self {
            Site::Embed | Site::FinalNorm => None,
            Site::ResidPre(l)
            | Site::AttnOut(l)
            | Site::MlpIn(l)
            | Site::MlpUpOut(l)
            | Site::MlpGateOut(l)
            | Site::MlpAct(l)
            | Site::MlpOut(l)
            | Site::ResidPost(l) => Some(l),
        }
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Site::Embed => write!(f, "embed"),
            Site::ResidPre(l) => write!(f, "resid_pre.{l}"),
            Site::AttnOut(l) => write!(f, "attn_out.{l}"),
            Site::MlpIn(l) => write!(f, "mlp_in.{l}"),
            Site::MlpUpOut(l) => write!(f, "mlp_up_out.{l}"),
            Site::MlpGateOut(l) => write!(f, "mlp_gate_out.{l}"),
            Site::MlpAct(l) => write!(f, "mlp_act.{l}"),
            Site::MlpOut(l) => write!(f, "mlp_out.{l}"),
            Site::ResidPost(l) => write!(f, "resid_post.{l}"),
            Site::FinalNorm => write!(f, "final_norm"),
        }
    }
}

impl FromStr for Site {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "embed" => return Ok(Site::Embed),
            "final_norm" => return Ok(Site::FinalNorm),
            _ => {}
        }
        let (kind, layer) = s
            .split_once('.')
            .ok_or_else(|| format!("unknown site `{s}` (expected e.g. `mlp_act.5`)"))?;
        let l: usize = layer
            .parse()
            .map_err(|_| format!("site `{s}`: `{layer}` is not a layer index"))?;
        Ok(match kind {
            "resid_pre" => Site::ResidPre(l),
            "attn_out" => Site::AttnOut(l),
            "mlp_in" => Site::MlpIn(l),
            "mlp_up_out" => Site::MlpUpOut(l),
            "mlp_gate_out" => Site::MlpGateOut(l),
            "mlp_act" => Site::MlpAct(l),
            "mlp_out" => Site::MlpOut(l),
            "resid_post" => Site::ResidPost(l),
            _ => return Err(format!("unknown site kind `{kind}` in `{s}`")),
        })
    }
}

/// A change to the activation at a site.
#[derive(Debug, Clone)]
pub enum Intervention {
    /// Replace the whole activation (same shape).
    Replace(Tensor),
    /// Add a tensor broadcastable to the activation.
    Add(Tensor),
    /// Add `delta` (`[d]`) at the given `(batch row, position)` pairs only. Differentiable in
    /// `delta`: the addition is a constant one-hot mask times `delta`, never a copy through the host.
    AddAt {
        rows: Vec<(usize, usize)>,
        delta: Tensor,
    },
    /// Overwrite the vector at each `(row, position)` with the matching row of `values`
    /// (`[entries, d]`): restoring a clean state into a corrupted run.
    SetAt {
        entries: Vec<(usize, usize)>,
        values: Tensor,
    },
}

impl Intervention {
    fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Intervention::Replace(t) => {
                if t.dims() != xs.dims() {
                    candle_core::bail!(
                        "replace intervention has shape {:?}, the site has {:?}",
                        t.dims(),
                        xs.dims()
                    )
                }
                Ok(t.clone())
            }
            Intervention::Add(t) => xs.broadcast_add(t),
            Intervention::AddAt { rows, delta } => {
                let (b, s, d) = xs.dims3()?;
                let mask = position_mask(rows, b, s, delta.dtype(), xs.device())?;
                let delta = delta.reshape((1, 1, d))?.to_dtype(xs.dtype())?;
                xs.broadcast_add(&mask.to_dtype(xs.dtype())?.broadcast_mul(&delta)?)
            }
            Intervention::SetAt { entries, values } => {
                let (b, s, d) = xs.dims3()?;
                if values.dims() != [entries.len(), d] {
                    candle_core::bail!(
                        "SetAt values have shape {:?}, expected [{}, {d}]",
                        values.dims(),
                        entries.len()
                    )
                }
                let mask = position_mask(entries, b, s, xs.dtype(), xs.device())?;
                let rows: Vec<Vec<f32>> = values.to_dtype(DType::F32)?.to_vec2()?;
                let mut full = vec![0f32; b * s * d];
                for (&(row, pos), v) in entries.iter().zip(&rows) {
                    full[(row * s + pos) * d..][..d].copy_from_slice(v);
                }
                let full = Tensor::from_vec(full, (b, s, d), xs.device())?.to_dtype(xs.dtype())?;
                xs.broadcast_mul(&(1.0 - &mask)?)?.add(&full)
            }
        }
    }
}

/// A `[b, s, 1]` tensor with ones at the given `(row, position)` pairs.
fn position_mask(
    rows: &[(usize, usize)],
    b: usize,
    s: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut mask = vec![0f32; b * s];
    for &(row, pos) in rows {
        if row >= b || pos >= s {
            candle_core::bail!("AddAt position ({row}, {pos}) is outside the batch [{b}, {s}]")
        }
        mask[row * s + pos] = 1.0;
    }
    Tensor::from_vec(mask, (b, s, 1), device)?.to_dtype(dtype)
}

/// What to capture and what to change in one forward pass.
#[derive(Debug, Clone, Default)]
pub struct HookSpec {
    pub captures: BTreeSet<Site>,
    pub interventions: Vec<(Site, Intervention)>,
    /// Stop the forward pass after this layer (no logits): for callers that only need captures.
    pub stop_after_layer: Option<usize>,
    /// Start from this residual after layer `l` (its `ResidPost(l)`, captured by an earlier pass
    /// over the same tokens) instead of recomputing layers `0..=l`; hooks at `ResidPost(l)` still
    /// apply to it.
    pub resume: Option<(usize, Tensor)>,
}

impl HookSpec {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn capture(mut self, site: Site) -> Self {
        self.captures.insert(site);
        self
    }

    pub fn intervene(mut self, site: Site, intervention: Intervention) -> Self {
        self.interventions.push((site, intervention));
        self
    }

    /// Starts the pass from `resid`, the batch's `ResidPost(layer)` from an earlier pass.
    pub fn resume_after(mut self, layer: usize, resid: Tensor) -> Self {
        self.resume = Some((layer, resid));
        self
    }

    /// Ends the forward pass after layer `layer`; the result's logits are empty.
    pub fn stop_after(mut self, layer: usize) -> Self {
        self.stop_after_layer = Some(layer);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.captures.is_empty()
            && self.interventions.is_empty()
            && self.stop_after_layer.is_none()
            && self.resume.is_none()
    }

    /// Applies the interventions at `site` in order, then captures the result if asked.
    pub(crate) fn visit(
        &self,
        site: Site,
        mut xs: Tensor,
        captures: &mut BTreeMap<Site, Tensor>,
    ) -> Result<Tensor> {
        for (_, intervention) in self.interventions.iter().filter(|(s, _)| *s == site) {
            xs = intervention.apply(&xs)?;
        }
        if self.captures.contains(&site) {
            captures.insert(site, xs.clone());
        }
        Ok(xs)
    }

    /// The sites this spec touches, so the model can reject a layer that does not exist.
    pub(crate) fn sites(&self) -> impl Iterator<Item = Site> + '_ {
        self.captures
            .iter()
            .copied()
            .chain(self.interventions.iter().map(|(s, _)| *s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_strings_round_trip() {
        for site in [
            Site::Embed,
            Site::ResidPre(0),
            Site::AttnOut(3),
            Site::MlpIn(1),
            Site::MlpUpOut(4),
            Site::MlpGateOut(5),
            Site::MlpAct(17),
            Site::MlpOut(2),
            Site::ResidPost(29),
            Site::FinalNorm,
        ] {
            assert_eq!(site.to_string().parse::<Site>(), Ok(site));
        }
        assert!("mlp_act.x".parse::<Site>().is_err());
        assert!("mlp_key.3".parse::<Site>().is_err());
    }

    #[test]
    fn add_at_touches_only_the_chosen_positions() -> Result<()> {
        let dev = Device::Cpu;
        let xs = Tensor::zeros((2, 3, 2), DType::F32, &dev)?;
        let delta = Tensor::new(&[1f32, -2.], &dev)?;
        let ys = Intervention::AddAt {
            rows: vec![(0, 2), (1, 0)],
            delta,
        }
        .apply(&xs)?
        .to_vec3::<f32>()?;
        assert_eq!(ys[0], vec![vec![0., 0.], vec![0., 0.], vec![1., -2.]]);
        assert_eq!(ys[1], vec![vec![1., -2.], vec![0., 0.], vec![0., 0.]]);
        Ok(())
    }

    #[test]
    fn add_at_rejects_positions_outside_the_batch() -> Result<()> {
        let dev = Device::Cpu;
        let xs = Tensor::zeros((1, 3, 2), DType::F32, &dev)?;
        let bad = Intervention::AddAt {
            rows: vec![(0, 3)],
            delta: Tensor::zeros(2, DType::F32, &dev)?,
        };
        assert!(bad.apply(&xs).is_err());
        Ok(())
    }
}

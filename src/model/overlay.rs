//! Overlays: learned additions installed in the model as values at a site (GRACE's codebook,
//! WISE's side memory, CaliNet's calibration neurons, LoRA adapters). The model holds them behind
//! `Arc`, so an edit can keep the overlay it displaced as its undo record without copying it, and
//! an editor that owns an overlay changes it by installing a successor.

use std::any::Any;

use candle_core::{Device, Tensor};

use super::{Activation, Module, Site, WeightId};

/// What an overlay can read: the activations of its layer computed before its site.
#[derive(Debug)]
pub struct OverlayInput<'a> {
    /// `[b, s, d_model]`: the residual stream entering the layer.
    pub resid_pre: &'a Tensor,
    /// `[b, s, d_model]`: the normalised input of the MLP (absent at `AttnOut`).
    pub mlp_in: Option<&'a Tensor>,
    /// `[b, s, d_mlp]`: the input of the down-projection (present at `MlpOut` and `ResidPost`).
    pub mlp_act: Option<&'a Tensor>,
    /// Real length of every row of this pass's tokens (right padding; with a KV cache, the new
    /// tokens only), for overlays that key on a row's last token.
    pub lengths: &'a [usize],
}

/// An overlay as it is saved: a small JSON header and named tensors (safetensors in a patch).
#[derive(Debug, Clone, Default)]
pub struct OverlayParts {
    pub header: serde_json::Value,
    pub tensors: Vec<(String, Tensor)>,
}

/// A learned addition to the model at a site. It returns the activation to use instead of
/// `output`. Overlays may sit at `AttnOut(l)`, `MlpAct(l)`, `MlpOut(l)` and `ResidPost(l)`; they
/// run before that site's hooks, so hooks see their effect.
pub trait Overlay: Send + Sync {
    /// # Shapes
    /// `output` and the result have the site's shape.
    fn forward(&self, input: &OverlayInput<'_>, output: &Tensor) -> candle_core::Result<Tensor>;

    /// The name a patch file records the overlay's type under; the editors' registry rebuilds
    /// it from that name and its [`Overlay::parts`].
    fn kind(&self) -> &'static str;

    /// Everything needed to rebuild the overlay.
    fn parts(&self) -> crate::Result<OverlayParts>;

    /// For the owning editor to reach its concrete type (see `Model::overlay_as`).
    fn as_any(&self) -> &dyn Any;

    /// The overlay at `site` expressed as the model's own weights, for writing the edited model
    /// in a format that has no place for overlays (`kedit export`); `Err(why)` where no weights
    /// of the architecture compute what it does.
    fn as_weights(&self, site: Site) -> std::result::Result<WeightForm, String> {
        Err(format!(
            "a {} overlay at {site} has no form as the model's weights",
            self.kind()
        ))
    }
}

/// An overlay as weights of the model itself (see [`Overlay::as_weights`]).
#[derive(Debug, Clone)]
pub enum WeightForm {
    /// `W ← W + delta` for weight `id` (`[out, in]`).
    Added { id: WeightId, delta: Tensor },
    /// Neurons beside layer `layer`'s MLP neurons, with its activation: rows `up: [n, d_model]`
    /// of the up projection (and `gate` of LLaMA's gate projection), columns `down: [d_model, n]`
    /// of the down projection. Appended to the MLP they compute the same sum, since an MLP's
    /// output is a sum over its neurons.
    Neurons {
        layer: usize,
        activation: Activation,
        up: Tensor,
        gate: Option<Tensor>,
        down: Tensor,
    },
}

/// A low-rank adapter on the MLP's down projection, kept beside the weight instead of merged
/// into it: at `MlpOut(l)` it adds `scale · (k Aᵀ) Bᵀ` for the down projection's input `k`, which
/// equals replacing `W` by `W + scale · B A` (LoRA's update, reversible by removing it).
#[derive(Debug, Clone)]
pub struct LowRankAdapter {
    /// `[r, d_mlp]`.
    pub a: Tensor,
    /// `[d_model, r]`.
    pub b: Tensor,
    pub scale: f64,
}

impl LowRankAdapter {
    pub const KIND: &'static str = "low_rank_adapter";

    pub fn from_parts(parts: &OverlayParts, device: &Device) -> crate::Result<Self> {
        let tensor = |name: &str| {
            parts
                .tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.to_device(device))
                .transpose()?
                .ok_or_else(|| crate::Error::Invalid(format!("{}: no tensor {name:?}", Self::KIND)))
        };
        let scale = parts
            .header
            .get("scale")
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| crate::Error::Invalid(format!("{}: no \"scale\"", Self::KIND)))?;
        let (a, b) = (tensor("a")?, tensor("b")?);
        let (r, _) = a.dims2()?;
        if b.dims2()?.1 != r {
            return Err(crate::Error::Invalid(format!(
                "{}: a is {:?} and b {:?}; their rank differs",
                Self::KIND,
                a.dims(),
                b.dims()
            )));
        }
        Ok(LowRankAdapter { a, b, scale })
    }
}

impl Overlay for LowRankAdapter {
    fn forward(&self, input: &OverlayInput<'_>, output: &Tensor) -> candle_core::Result<Tensor> {
        let keys = input.mlp_act.ok_or_else(|| {
            candle_core::Error::Msg("a low-rank adapter sits at mlp_out, after the MLP".into())
        })?;
        let (b, s, d) = keys.dims3()?;
        let low = keys
            .reshape((b * s, d))?
            .matmul(&self.a.to_dtype(keys.dtype())?.t()?)?
            .matmul(&self.b.to_dtype(keys.dtype())?.t()?)?;
        let delta = (low * self.scale)?.reshape(output.dims())?;
        output + delta
    }

    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn parts(&self) -> crate::Result<OverlayParts> {
        Ok(OverlayParts {
            header: serde_json::json!({ "scale": self.scale }),
            tensors: vec![("a".into(), self.a.clone()), ("b".into(), self.b.clone())],
        })
    }

    fn as_weights(&self, site: Site) -> std::result::Result<WeightForm, String> {
        let Site::MlpOut(layer) = site else {
            return Err(format!(
                "a low-rank adapter at {site} (not at an MLP's output)"
            ));
        };
        let delta = self
            .b
            .matmul(&self.a)
            .and_then(|d| d * self.scale)
            .map_err(|e| e.to_string())?;
        Ok(WeightForm::Added {
            id: WeightId::layer(layer, Module::MlpDown),
            delta,
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

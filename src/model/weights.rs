//! Weights by role. Checkpoint names live only in `gpt2.rs` and `llama.rs`; everything else names
//! a weight with a [`WeightId`].

use std::fmt;
use std::str::FromStr;

/// What a weight does, independent of how a checkpoint spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Module {
    /// Token embedding `[vocab, d_model]`.
    Embed,
    /// Learned position embedding `[positions, d_model]` (GPT-2).
    PosEmbed,
    /// Output projection `[vocab, d_model]`; absent when tied to [`Module::Embed`].
    LmHead,
    FinalNorm,
    AttnNorm,
    MlpNorm,
    /// GPT-2's fused query/key/value projection `[3·d_model, d_model]`.
    AttnQkv,
    AttnQ,
    AttnK,
    AttnV,
    AttnO,
    MlpUp,
    MlpGate,
    /// `down_proj` / `c_proj`: `[d_model, d_mlp]`, the matrix ROME and MEMIT rewrite.
    MlpDown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Param {
    Weight,
    Bias,
}

/// A weight of the model. Matrices are always `[out, in]`, whatever the checkpoint's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WeightId {
    pub layer: Option<usize>,
    pub module: Module,
    pub param: Param,
}

impl WeightId {
    pub fn global(module: Module) -> Self {
        Self {
            layer: None,
            module,
            param: Param::Weight,
        }
    }

    pub fn layer(layer: usize, module: Module) -> Self {
        Self {
            layer: Some(layer),
            module,
            param: Param::Weight,
        }
    }

    pub fn bias(self) -> Self {
        Self {
            param: Param::Bias,
            ..self
        }
    }
}

impl Module {
    fn name(self) -> &'static str {
        match self {
            Module::Embed => "embed",
            Module::PosEmbed => "pos_embed",
            Module::LmHead => "lm_head",
            Module::FinalNorm => "final_norm",
            Module::AttnNorm => "attn_norm",
            Module::MlpNorm => "mlp_norm",
            Module::AttnQkv => "attn_qkv",
            Module::AttnQ => "attn_q",
            Module::AttnK => "attn_k",
            Module::AttnV => "attn_v",
            Module::AttnO => "attn_o",
            Module::MlpUp => "mlp_up",
            Module::MlpGate => "mlp_gate",
            Module::MlpDown => "mlp_down",
        }
    }

    pub(crate) const ALL: [Module; 14] = [
        Module::Embed,
        Module::PosEmbed,
        Module::LmHead,
        Module::FinalNorm,
        Module::AttnNorm,
        Module::MlpNorm,
        Module::AttnQkv,
        Module::AttnQ,
        Module::AttnK,
        Module::AttnV,
        Module::AttnO,
        Module::MlpUp,
        Module::MlpGate,
        Module::MlpDown,
    ];
}

impl fmt::Display for WeightId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(l) = self.layer {
            write!(f, "{l}.")?;
        }
        write!(f, "{}", self.module.name())?;
        if self.param == Param::Bias {
            write!(f, ".bias")?;
        }
        Ok(())
    }
}

impl FromStr for WeightId {
    type Err = String;
    /// Parses the [`Display`](fmt::Display) form: `[layer.]module[.bias]`, e.g. `5.mlp_down`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts: Vec<&str> = s.split('.').collect();
        let param = if parts.last() == Some(&"bias") {
            parts.pop();
            Param::Bias
        } else {
            Param::Weight
        };
        let (layer, module) = match parts.as_slice() {
            [m] => (None, *m),
            [l, m] => (
                Some(
                    l.parse::<usize>()
                        .map_err(|_| format!("weight `{s}`: `{l}` is not a layer index"))?,
                ),
                *m,
            ),
            _ => {
                return Err(format!(
                    "weight `{s}` is not of the form [layer.]module[.bias]"
                ))
            }
        };
        let module = Module::ALL
            .into_iter()
            .find(|m| m.name() == module)
            .ok_or_else(|| format!("weight `{s}`: unknown module `{module}`"))?;
        Ok(WeightId {
            layer,
            module,
            param,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_ids_round_trip_through_strings() {
        for id in [
            WeightId::global(Module::Embed),
            WeightId::layer(5, Module::MlpDown),
            WeightId::layer(0, Module::AttnQkv).bias(),
            WeightId::global(Module::FinalNorm).bias(),
        ] {
            assert_eq!(id.to_string().parse::<WeightId>(), Ok(id));
        }
        assert!("5.mlp_sideways".parse::<WeightId>().is_err());
        assert!("x.mlp_down".parse::<WeightId>().is_err());
    }
}

//! EasyEdit's module templates (`transformer.h.{}.mlp.c_proj`, `model.layers.{}.mlp.down_proj`)
//! parsed once, when a hyperparameter file is read, into the roles they select. EasyEdit selects
//! every parameter whose name contains the template with the layer filled in; the same rule runs
//! here once, over the checkpoint names every architecture gives each role, so that an edit looks
//! up `WeightId`s instead of matching strings.

use serde::{Deserialize, Deserializer};

use super::weights::{Module, Param, WeightId};
use super::{hf_checkpoint_name, Arch, Model};
use crate::error::{Error, Result};

/// The roles a template selects, per architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleTemplate {
    /// As written in the file, for messages.
    pub text: String,
    selects: Vec<(Arch, Module, Param)>,
}

/// A layer index no checkpoint name has, so that a match at it is a match of the template alone.
const PROBE_LAYER: usize = 987_654_321;

impl ModuleTemplate {
    /// # Errors
    /// A template without `{}`, or one that names no per-layer weight of GPT-2 or LLaMA.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        if !text.contains("{}") {
            return Err(format!(
                "module template {text:?} has no {{}} for the layer index"
            ));
        }
        let needle = text.replace("{}", &PROBE_LAYER.to_string());
        let mut selects = Vec::new();
        for arch in [Arch::Gpt2, Arch::Llama] {
            for module in Module::ALL {
                for param in [Param::Weight, Param::Bias] {
                    let id = WeightId {
                        layer: Some(PROBE_LAYER),
                        module,
                        param,
                    };
                    if hf_checkpoint_name(arch, id).is_some_and(|n| n.contains(&needle)) {
                        selects.push((arch, module, param));
                    }
                }
            }
        }
        if selects.is_empty() {
            return Err(format!(
                "module template {text:?} names no per-layer weight of a GPT-2 or LLaMA model"
            ));
        }
        Ok(ModuleTemplate {
            text: text.to_string(),
            selects,
        })
    }

    /// The weights the template selects at `layer` of `model` (a bias only where the model has one).
    ///
    /// # Errors
    /// A layer out of range, or a template for another architecture.
    pub fn weights(&self, model: &Model, layer: usize) -> Result<Vec<WeightId>> {
        model.check_layer(layer)?;
        let arch = model.spec().arch;
        let ids: Vec<WeightId> = self
            .selects
            .iter()
            .filter(|(a, _, _)| *a == arch)
            .map(|&(_, module, param)| WeightId {
                layer: Some(layer),
                module,
                param,
            })
            .filter(|id| model.weight(*id).is_ok())
            .collect();
        if ids.is_empty() {
            return Err(Error::Invalid(format!(
                "module template {:?} matches no weight of this {arch:?} model at layer {layer}",
                self.text
            )));
        }
        Ok(ids)
    }
}

/// Deserialises a template string into a [`ModuleTemplate`] (for hparams structs).
pub fn module_template<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<ModuleTemplate, D::Error> {
    let text = String::deserialize(d)?;
    ModuleTemplate::parse(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_select_roles_by_easyedits_substring_rule() {
        let gpt2 = ModuleTemplate::parse("transformer.h.{}.mlp.c_proj").unwrap();
        assert_eq!(
            gpt2.selects,
            [
                (Arch::Gpt2, Module::MlpDown, Param::Weight),
                (Arch::Gpt2, Module::MlpDown, Param::Bias)
            ]
        );
        let llama = ModuleTemplate::parse("model.layers.{}.mlp.down_proj.weight").unwrap();
        assert_eq!(
            llama.selects,
            [(Arch::Llama, Module::MlpDown, Param::Weight)]
        );
        // `c_proj` alone is both GPT-2's attention and MLP output projection, as in EasyEdit.
        let both = ModuleTemplate::parse("transformer.h.{}.attn.c_proj").unwrap();
        assert_eq!(both.selects.len(), 2);
        assert!(ModuleTemplate::parse("model.layers.5.mlp").is_err());
        assert!(ModuleTemplate::parse("model.layers.{}.mlp.nonesuch").is_err());
    }
}

//! The machinery ROME, MEMIT and AlphaEdit share (SPEC-editors §2): where the fact is
//! ([`crate::model::subject`]), the contexts it is averaged over ([`templates`]), the MLP keys ([`keys`]), the
//! optimised target vector ([`values`]), key statistics ([`stats`]) and the closed-form updates
//! ([`solve`]). Each method is then a short composition of these.

pub mod keys;
pub mod solve;
pub mod spread;
pub mod stats;
pub mod templates;
pub mod values;

use crate::data::EditRequest;
use crate::error::{Error, Result};
use crate::model::{Model, Module, WeightId};

/// The down-projection weight of `layer` that `rewrite_module_tmp` names, checked to be the one
/// these methods rewrite.
pub fn rewrite_weight(
    model: &Model,
    template: &crate::model::ModuleTemplate,
    layer: usize,
) -> Result<WeightId> {
    let down = WeightId::layer(layer, Module::MlpDown);
    if template.weights(model, layer)?.contains(&down) {
        Ok(down)
    } else {
        Err(Error::Invalid(format!(
            "rewrite_module_tmp {:?} does not name layer {layer}'s MLP down projection, which this method rewrites",
            template.text
        )))
    }
}

/// A request as the locate-then-edit methods take it: the prompt with `{}` for the subject, the
/// subject, and the target's token ids (after a leading space, without special tokens).
#[derive(Debug, Clone)]
pub struct FactEdit {
    pub prompt: String,
    pub subject: String,
    pub target_ids: Vec<u32>,
}

impl FactEdit {
    pub fn new(model: &Model, request: &EditRequest) -> Result<Self> {
        let subject = request
            .subject
            .as_deref()
            .ok_or_else(|| Error::Invalid("the request has no subject".into()))?;
        let prompt = crate::model::subject::with_placeholder(&request.prompt, subject)?;
        let target = if request.target_new.starts_with(' ') {
            request.target_new.clone()
        } else {
            format!(" {}", request.target_new)
        };
        // Without special tokens, so no BOS leads (MEMIT strips one; ROME never adds it).
        let target_ids = model.encode(&target)?;
        if target_ids.is_empty() {
            return Err(Error::Invalid(format!(
                "target {:?} has no tokens",
                request.target_new
            )));
        }
        Ok(FactEdit {
            prompt,
            subject: subject.to_string(),
            target_ids,
        })
    }
}

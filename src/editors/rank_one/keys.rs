//! Activations at chosen token positions: the MLP keys (inputs of the down projection), the MLP
//! outputs and the residual stream, read with right-padded batches that stop after the layer.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::subject::{fact_token, FactToken};
use crate::model::{HookSpec, Model, Site, TokenBatch};

/// Texts per forward pass.
const BATCH: usize = 128;

/// `[n, dim]` f32 activations at `site`, one row per `(text, position)`.
pub fn activations_at(model: &Model, site: Site, items: &[(String, usize)]) -> Result<Tensor> {
    Ok(activations_at_sites(model, &[site], items)?.remove(0))
}

/// Like [`activations_at`] for several sites of one forward pass (one tensor per site).
pub fn activations_at_sites(
    model: &Model,
    sites: &[Site],
    items: &[(String, usize)],
) -> Result<Vec<Tensor>> {
    let mut last = 0;
    let mut hooks = HookSpec::new();
    for &site in sites {
        let layer = site
            .layer()
            .ok_or_else(|| Error::Invalid(format!("site {site} has no layer")))?;
        last = last.max(layer);
        hooks = hooks.capture(site);
    }
    let hooks = hooks.stop_after(last);
    let pad = model.spec().eos_id.or(model.spec().pad_id).unwrap_or(0);
    let mut rows: Vec<Vec<Tensor>> = vec![Vec::with_capacity(items.len()); sites.len()];
    for chunk in items.chunks(BATCH) {
        let ids = chunk
            .iter()
            .map(|(text, _)| model.encode_with_special_tokens(text))
            .collect::<Result<Vec<_>>>()?;
        for ((text, pos), ids) in chunk.iter().zip(&ids) {
            if *pos >= ids.len() {
                return Err(Error::Invalid(format!(
                    "position {pos} is past the {} tokens of {text:?}",
                    ids.len()
                )));
            }
        }
        let batch = TokenBatch::new(&ids, pad, model.device())?;
        let out = model.forward(&batch, &hooks)?;
        for (site_rows, &site) in rows.iter_mut().zip(sites) {
            let acts = out.capture(site)?;
            for (row, (_, pos)) in chunk.iter().enumerate() {
                site_rows.push(acts.get(row)?.get(*pos)?.to_dtype(DType::F32)?);
            }
        }
    }
    rows.iter().map(|r| Ok(Tensor::stack(r, 0)?)).collect()
}

/// The texts of `templates` (each with one `{}` for the prompt) around `prompt` (with one `{}` for
/// the subject), the subject filled in, each with its fact-token position.
pub fn template_positions(
    model: &Model,
    templates: &[String],
    prompt: &str,
    subject: &str,
    rule: FactToken,
) -> Result<Vec<(String, usize)>> {
    templates
        .iter()
        .map(|t| fact_token(model, &t.replacen("{}", prompt, 1), subject, rule))
        .collect()
}

/// The mean MLP key of `layer` over the templates (`[d_ff]`, f32).
pub fn mean_key(
    model: &Model,
    layer: usize,
    templates: &[String],
    prompt: &str,
    subject: &str,
    rule: FactToken,
) -> Result<Tensor> {
    let items = template_positions(model, templates, prompt, subject, rule)?;
    Ok(activations_at(model, Site::MlpAct(layer), &items)?.mean(0)?)
}

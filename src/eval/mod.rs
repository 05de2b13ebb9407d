//! EasyEdit's metrics as plain functions of a model and a request (SPEC-eval §2): reliability,
//! generalisation and portability by teacher-forced token accuracy, locality by pre/post argmax
//! agreement, fluency by n-gram entropy.

pub mod accuracy;
pub mod fluency;
pub mod runner;
pub mod summary;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::data::EditRequest;
use crate::error::Result;
use crate::model::Model;

pub use accuracy::{accuracies, agreement, teacher_forced, Scored};

/// A locality entry: the argmax ids at the answer positions (`<key>_output`, pre and post) or the
/// agreement of post with pre (`<key>_acc`, post only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LocalityEntry {
    Output(Vec<Vec<u32>>),
    Acc(Vec<f64>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fluency {
    pub ngram_entropy: f64,
}

/// The metrics of one phase (pre or post) of one case, with EasyEdit's keys and key order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseMetrics {
    pub rewrite_acc: Vec<f64>,
    pub locality: BTreeMap<String, LocalityEntry>,
    pub portability: BTreeMap<String, Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rephrase_acc: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fluency: Option<Fluency>,
}

/// Where each scored pair of a case belongs.
enum Slot {
    Rewrite,
    Rephrase,
    Locality(String),
    Portability(String),
}

/// Every teacher-forced metric of `request` on `model` in one forward pass (the batch is
/// right-padded, so batching changes no number).
pub fn evaluate(model: &Model, request: &EditRequest) -> Result<PhaseMetrics> {
    let mut pairs: Vec<(&str, &str)> = vec![(&request.prompt, &request.target_new)];
    let mut slots = vec![Slot::Rewrite];
    if let Some(rephrase) = &request.rephrase_prompt {
        pairs.push((rephrase, &request.target_new));
        slots.push(Slot::Rephrase);
    }
    for (key, set) in &request.locality {
        for (p, a) in set.prompt.iter().zip(&set.ground_truth) {
            pairs.push((p, a));
            slots.push(Slot::Locality(key.clone()));
        }
    }
    for (key, set) in &request.portability {
        for (p, a) in set.prompt.iter().zip(&set.ground_truth) {
            pairs.push((p, a));
            slots.push(Slot::Portability(key.clone()));
        }
    }
    let scored = teacher_forced(model, &pairs)?;

    let mut rewrite = Vec::new();
    let mut rephrase = Vec::new();
    let mut locality: BTreeMap<String, Vec<Vec<u32>>> = BTreeMap::new();
    let mut portability: BTreeMap<String, Vec<Scored>> = BTreeMap::new();
    for (slot, s) in slots.into_iter().zip(scored) {
        match slot {
            Slot::Rewrite => rewrite.push(s),
            Slot::Rephrase => rephrase.push(s),
            Slot::Locality(k) => locality.entry(k).or_default().push(s.preds),
            Slot::Portability(k) => portability.entry(k).or_default().push(s),
        }
    }
    Ok(PhaseMetrics {
        rewrite_acc: accuracies(&rewrite),
        locality: locality
            .into_iter()
            .map(|(k, v)| (format!("{k}_output"), LocalityEntry::Output(v)))
            .collect(),
        portability: portability
            .into_iter()
            .map(|(k, v)| (format!("{k}_acc"), accuracies(&v)))
            .collect(),
        rephrase_acc: (!rephrase.is_empty()).then(|| accuracies(&rephrase)),
        fluency: None,
    })
}

/// Adds `<key>_acc` to the post-edit locality: per prompt, the agreement of post with pre argmax ids.
pub fn finalize_locality(pre: &PhaseMetrics, post: &mut PhaseMetrics) -> Result<()> {
    let mut accs = Vec::new();
    for (key, entry) in &post.locality {
        let (Some(base), LocalityEntry::Output(post_out)) = (key.strip_suffix("_output"), entry)
        else {
            continue;
        };
        let Some(LocalityEntry::Output(pre_out)) = pre.locality.get(key) else {
            return Err(crate::Error::Invalid(format!(
                "pre-edit metrics have no locality {key}"
            )));
        };
        if pre_out.len() != post_out.len() {
            return Err(crate::Error::Invalid(format!(
                "locality {key}: {} prompts before the edit, {} after",
                pre_out.len(),
                post_out.len()
            )));
        }
        let acc = pre_out
            .iter()
            .zip(post_out)
            .map(|(a, b)| agreement(a, b))
            .collect::<Result<Vec<f64>>>()?;
        accs.push((format!("{base}_acc"), LocalityEntry::Acc(acc)));
    }
    post.locality.extend(accs);
    Ok(())
}

//! EasyEdit's metrics as plain functions of a model and a request (SPEC-eval §2): reliability,
//! generalisation and portability by teacher-forced token accuracy, locality by pre/post argmax
//! agreement, fluency by n-gram entropy.

pub mod accuracy;
pub mod case;
pub mod fluency;
pub mod sanitation;
pub mod sentiment;
pub mod word_tokenize;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::data::EditRequest;
use crate::error::Result;
use crate::model::Model;

pub use accuracy::{accuracies, agreement, generation_match, perplexity, teacher_forced, Scored};

/// How reliability, generalisation and portability are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scoring {
    /// Teacher-forced token accuracy (EasyEdit's default).
    #[default]
    TokenAccuracy,
    /// Perplexity of the target for rewrite and rephrase prompts (`rewrite_ppl`, `rephrase_ppl`);
    /// locality and portability stay teacher-forced, as in EasyEdit's `eval_metric='ppl'`.
    Perplexity,
    /// Greedy generation compared token by token with the answer, for every metric (EasyEdit's
    /// GRACE protocol); locality compares the generated ids before and after. EasyEdit tokenises
    /// the answer without a leading space, which with byte-level BPE (GPT-2, SmolLM2) never matches
    /// a generated word; `leading_space` scores `" " + answer` instead.
    GenerationMatch { leading_space: bool },
}

impl Scoring {
    /// EasyEdit's protocol tag for reliability and generalisation under this scoring
    /// (SPEC-eval §2.10): `(protocol, scorer, comparable_group)`.
    fn tag(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Scoring::TokenAccuracy => (
                "decoder_only_teacher_forcing",
                "token_accuracy",
                "lm.decoder_only_teacher_forcing.token_accuracy",
            ),
            Scoring::Perplexity => (
                "teacher_forcing_ppl",
                "perplexity",
                "lm.teacher_forcing.perplexity",
            ),
            Scoring::GenerationMatch { .. } => (
                "vanilla_generation",
                "token_match",
                "lm.vanilla_generation.token_match",
            ),
        }
    }

    /// The `metric_meta` entry of `section` (`rewrite`, `rephrase`) under this scoring.
    pub fn meta(self, section: &str) -> MetricMeta {
        let (protocol, scorer, group) = self.tag();
        let perplexity = self == Scoring::Perplexity;
        MetricMeta {
            result_key: format!("{section}_{}", if perplexity { "ppl" } else { "acc" }),
            semantic: match section {
                "rewrite" => "reliability",
                "rephrase" => "generalization",
                other => other,
            }
            .to_string(),
            protocol: protocol.into(),
            scorer: scorer.into(),
            comparable_group: group.into(),
            higher_is_better: !perplexity,
        }
    }
}

/// What a score means and which scores it may be compared with (EasyEdit's `metric_meta`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricMeta {
    pub result_key: String,
    pub semantic: String,
    pub protocol: String,
    pub scorer: String,
    pub comparable_group: String,
    pub higher_is_better: bool,
}

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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rewrite_acc: Vec<f64>,
    /// Per section (`rewrite`, `rephrase`, `locality.<key>`): how it was scored.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metric_meta: BTreeMap<String, MetricMeta>,
    pub locality: BTreeMap<String, LocalityEntry>,
    pub portability: BTreeMap<String, Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rephrase_acc: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fluency: Option<Fluency>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite_ppl: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rephrase_ppl: Option<f64>,
}

/// Where each scored pair of a case belongs.
#[derive(Clone)]
enum Slot {
    Rewrite,
    Rephrase,
    Locality(String),
    Portability(String),
}

/// Every teacher-forced metric of `request` on `model` in one forward pass (the batch is
/// right-padded, so batching changes no number).
pub fn evaluate(model: &Model, request: &EditRequest) -> Result<PhaseMetrics> {
    evaluate_with(model, request, Scoring::TokenAccuracy)
}

/// The teacher-forced metrics of several requests in one forward pass: the same numbers as
/// [`evaluate`] on each (right padding leaves every row's positions as they are alone), at the
/// matrix-product rate of a larger batch. Pre-edit metrics of a window of cases share one pass.
pub fn evaluate_many(model: &Model, requests: &[EditRequest]) -> Result<Vec<PhaseMetrics>> {
    let cases: Vec<ScoredPairs> = requests.iter().map(scored_pairs).collect();
    let mut metrics = Vec::with_capacity(requests.len());
    let mut first = 0;
    while first < cases.len() {
        // A bounded number of sequences per pass keeps activation memory flat on long records.
        let mut end = first + 1;
        let mut n_pairs = cases[first].0.len();
        while end < cases.len() && n_pairs + cases[end].0.len() <= MAX_SEQUENCES_PER_PASS {
            n_pairs += cases[end].0.len();
            end += 1;
        }
        let all_pairs: Vec<(&str, &str)> = cases[first..end]
            .iter()
            .flat_map(|(pairs, _)| pairs.iter().copied())
            .collect();
        let mut scored = teacher_forced(model, &all_pairs)?.into_iter();
        for (request, (pairs, slots)) in requests[first..end].iter().zip(&cases[first..end]) {
            let case_scored: Vec<Scored> = scored.by_ref().take(pairs.len()).collect();
            metrics.push(assemble(
                request,
                slots.clone(),
                case_scored,
                Scoring::TokenAccuracy,
                None,
                None,
            ));
        }
        first = end;
    }
    Ok(metrics)
}

/// How many `(prompt, answer)` sequences [`evaluate_many`] scores in one forward pass.
const MAX_SEQUENCES_PER_PASS: usize = 64;

/// The `(prompt, answer)` pairs a request is scored on, with the section each belongs to.
type ScoredPairs<'a> = (Vec<(&'a str, &'a str)>, Vec<Slot>);

fn scored_pairs(request: &EditRequest) -> ScoredPairs<'_> {
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
    (pairs, slots)
}

/// The metrics of `request` under a chosen scoring protocol.
pub fn evaluate_with(
    model: &Model,
    request: &EditRequest,
    scoring: Scoring,
) -> Result<PhaseMetrics> {
    let (pairs, mut slots) = scored_pairs(request);
    let mut rewrite_ppl = None;
    let mut rephrase_ppl = None;
    let scored = match scoring {
        Scoring::TokenAccuracy => teacher_forced(model, &pairs)?,
        Scoring::GenerationMatch { leading_space } => pairs
            .iter()
            .map(|(p, a)| {
                let answer = if leading_space {
                    format!(" {a}")
                } else {
                    a.to_string()
                };
                generation_match(model, p, &answer)
            })
            .collect::<Result<Vec<_>>>()?,
        Scoring::Perplexity => {
            let mut kept_pairs = Vec::new();
            let mut kept_slots = Vec::new();
            for (pair, slot) in pairs.iter().zip(slots) {
                match slot {
                    Slot::Rewrite => rewrite_ppl = Some(perplexity(model, pair.0, pair.1)?),
                    Slot::Rephrase => rephrase_ppl = Some(perplexity(model, pair.0, pair.1)?),
                    other => {
                        kept_pairs.push(*pair);
                        kept_slots.push(other);
                    }
                }
            }
            slots = kept_slots;
            teacher_forced(model, &kept_pairs)?
        }
    };
    Ok(assemble(
        request,
        slots,
        scored,
        scoring,
        rewrite_ppl,
        rephrase_ppl,
    ))
}

/// A phase's metrics from the scores of its pairs, in EasyEdit's keys.
fn assemble(
    request: &EditRequest,
    slots: Vec<Slot>,
    scored: Vec<Scored>,
    scoring: Scoring,
    rewrite_ppl: Option<f64>,
    rephrase_ppl: Option<f64>,
) -> PhaseMetrics {
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
    let mut metric_meta = BTreeMap::from([("rewrite".to_string(), scoring.meta("rewrite"))]);
    if request.rephrase_prompt.is_some() {
        metric_meta.insert("rephrase".into(), scoring.meta("rephrase"));
    }
    PhaseMetrics {
        rewrite_acc: accuracies(&rewrite),
        metric_meta,
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
        rewrite_ppl,
        rephrase_ppl,
    }
}

/// `request` with its rewrite, rephrase and portability prompts in the model's chat template, as
/// EasyEdit's `use_chat_template` scores them; locality prompts are never templated.
pub fn chat_templated(model: &Model, request: &EditRequest) -> Result<EditRequest> {
    let mut r = request.clone();
    r.prompt = model.apply_chat_template(&r.prompt)?;
    if let Some(p) = &r.rephrase_prompt {
        r.rephrase_prompt = Some(model.apply_chat_template(p)?);
    }
    for set in r.portability.values_mut() {
        for p in &mut set.prompt {
            *p = model.apply_chat_template(p)?;
        }
    }
    Ok(r)
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
    // Locality compares what the model produced before and after: argmax tokens under teacher
    // forcing, or generated tokens when the other metrics are generation-based.
    let generated = post
        .metric_meta
        .get("rewrite")
        .is_some_and(|m| m.protocol == "vanilla_generation");
    let protocol = if generated {
        "pre_post_generated_token_match"
    } else {
        "pre_post_argmax_token_match"
    };
    for (key, _) in &accs {
        let base = key.trim_end_matches("_acc");
        post.metric_meta.insert(
            format!("locality.{base}"),
            MetricMeta {
                result_key: format!("locality.{key}"),
                semantic: "locality".into(),
                protocol: protocol.into(),
                scorer: "token_match".into(),
                comparable_group: format!("locality.lm.{protocol}"),
                higher_is_better: true,
            },
        );
    }
    post.locality.extend(accs);
    Ok(())
}

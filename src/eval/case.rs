//! The metrics of one case: what the unedited model gives ([`measure_before`]), and after an edit
//! the post-edit metrics completed with what needs both phases ([`measure_after`]). Which edits
//! run between the two is the business of the protocol loops in `crate::run`.

use serde::{Deserialize, Serialize};

use super::sentiment::{self, SentimentBaseline, SentimentProtocol};
use super::{evaluate_many, evaluate_with, finalize_locality, Fluency, PhaseMetrics, Scoring};
use crate::data::EditRequest;
use crate::error::Result;
use crate::model::Model;

/// One case's result, with EasyEdit's keys in EasyEdit's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    pub pre: PhaseMetrics,
    /// The record's index in the data file.
    pub case_id: usize,
    pub requested_rewrite: EditRequest,
    pub post: PhaseMetrics,
    /// Seconds the edit (of this case's batch) took.
    pub time: f64,
    /// ConvSent's sentiment edit success (SPEC-eval §2.8), after the edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub es: Option<f64>,
    /// ConvSent's drawdown: KL divergence on another topic's opinions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dd: Option<f64>,
    /// ConvSent's fluency, sampled from the edited model on a question about the topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fluency: Option<Fluency>,
}

/// How the metrics of a case are taken.
#[derive(Debug, Clone, Default)]
pub struct MeasureOptions {
    pub scoring: Scoring,
    /// Measure fluency too, sampling with this seed (the same for pre and post).
    pub fluency_seed: Option<u64>,
    /// How ConvSent's `es` and `dd` are computed.
    pub sentiment: SentimentProtocol,
    /// Wrap rewrite, rephrase and portability prompts in the model's chat template (EasyEdit's
    /// `use_chat_template`; locality prompts and fluency stay plain, as there).
    pub chat_template: bool,
}

/// One phase's metrics of each request, fluency included when asked for. Teacher-forced scores of
/// several requests share forward passes: the numbers each has alone, at a larger batch's rate.
fn measure(
    model: &Model,
    requests: &[EditRequest],
    opts: &MeasureOptions,
) -> Result<Vec<PhaseMetrics>> {
    let templated;
    let scored_requests = if opts.chat_template {
        templated = requests
            .iter()
            .map(|r| super::chat_templated(model, r))
            .collect::<Result<Vec<_>>>()?;
        &templated[..]
    } else {
        requests
    };
    let mut metrics = if opts.scoring == Scoring::TokenAccuracy {
        evaluate_many(model, scored_requests)?
    } else {
        scored_requests
            .iter()
            .map(|r| evaluate_with(model, r, opts.scoring))
            .collect::<Result<Vec<_>>>()?
    };
    if let Some(seed) = opts.fluency_seed {
        for (m, r) in metrics.iter_mut().zip(requests) {
            m.fluency = Some(super::fluency::fluency(model, &r.prompt, seed)?);
        }
    }
    Ok(metrics)
}

/// What the unedited model gives for a case, kept until its post-edit evaluation.
#[derive(Clone)]
pub struct Before {
    metrics: PhaseMetrics,
    sentiment: Option<SentimentBaseline>,
}

pub fn measure_before(
    model: &Model,
    request: &EditRequest,
    opts: &MeasureOptions,
) -> Result<Before> {
    let mut before = measure_before_many(model, std::slice::from_ref(request), opts)?;
    before
        .pop()
        .ok_or_else(|| crate::Error::Invalid("no pre-edit metrics for a request".into()))
}

/// [`measure_before`] of several requests at once.
pub fn measure_before_many(
    model: &Model,
    requests: &[EditRequest],
    opts: &MeasureOptions,
) -> Result<Vec<Before>> {
    let metrics = measure(model, requests, opts)?;
    requests
        .iter()
        .zip(metrics)
        .map(|(request, metrics)| recorded_before(model, request, metrics, opts))
        .collect()
}

/// A case's pre-edit metrics as a results file recorded them (a resumed run), completed on the
/// unedited `model` with what the file does not hold: ConvSent's corrected baseline.
pub fn recorded_before(
    model: &Model,
    request: &EditRequest,
    metrics: PhaseMetrics,
    opts: &MeasureOptions,
) -> Result<Before> {
    let sentiment = match (&request.sentiment, opts.sentiment) {
        (Some(probe), SentimentProtocol::Corrected) => {
            Some(sentiment::baseline(model, probe, opts.sentiment)?)
        }
        _ => None,
    };
    Ok(Before { metrics, sentiment })
}

/// A case waiting for its post-edit metrics: its record index, request, pre-edit metrics and the
/// seconds its edit took.
pub type Pending<'a> = (usize, &'a EditRequest, Before, f64);

/// The post-edit metrics of a case, completed with what needs both phases.
pub fn measure_after(
    model: &Model,
    case_id: usize,
    request: &EditRequest,
    before: Before,
    time: f64,
    opts: &MeasureOptions,
) -> Result<CaseResult> {
    let mut results = measure_after_many(model, vec![(case_id, request, before, time)], opts)?;
    results
        .pop()
        .ok_or_else(|| crate::Error::Invalid(format!("no post-edit metrics for case {case_id}")))
}

/// [`measure_after`] of several cases under the same edits.
pub fn measure_after_many(
    model: &Model,
    cases: Vec<Pending<'_>>,
    opts: &MeasureOptions,
) -> Result<Vec<CaseResult>> {
    let requests: Vec<EditRequest> = cases.iter().map(|(_, r, _, _)| (*r).clone()).collect();
    let posts = measure(model, &requests, opts)?;
    cases
        .into_iter()
        .zip(requests)
        .zip(posts)
        .map(
            |(((case_id, request, before, time), requested_rewrite), mut post)| {
                let pre = before.metrics;
                finalize_locality(&pre, &mut post)?;
                let mut result = CaseResult {
                    pre,
                    case_id,
                    requested_rewrite,
                    post,
                    time,
                    es: None,
                    dd: None,
                    fluency: None,
                };
                if let Some(probe) = &request.sentiment {
                    let scores =
                        sentiment::score(model, probe, opts.sentiment, before.sentiment.as_ref())?;
                    result.es = Some(scores.es);
                    result.dd = Some(scores.dd);
                    if let Some(seed) = opts.fluency_seed {
                        result.fluency =
                            Some(super::fluency::fluency(model, &probe.inner_q, seed)?);
                    }
                }
                Ok(result)
            },
        )
        .collect()
}

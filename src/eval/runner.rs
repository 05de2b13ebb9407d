//! The evaluation loop: pre-edit metrics on the unedited model, edit, post-edit metrics, undo (or
//! keep, for sequential editing), one result per case streamed to a sink as soon as it is known.

use std::collections::BTreeSet;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::sentiment::{self, SentimentBaseline, SentimentProtocol};
use super::{evaluate_with, finalize_locality, Fluency, PhaseMetrics, Scoring};
use crate::data::EditRequest;
use crate::editors::{Edit, EditCtx, Editor};
use crate::error::Result;
use crate::model::Model;

/// How edits accumulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// Every edit (or batch) is undone after its evaluation.
    #[default]
    Single,
    /// Edits accumulate; each is evaluated right after it is applied (EasyEdit today).
    SequentialEvalEach,
    /// Edits accumulate; every case is evaluated after the last edit (the lifelong-editing protocol
    /// behind published WISE and continual-editing numbers).
    SequentialEvalAtEnd,
}

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

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub batch_size: usize,
    pub scoring: Scoring,
    /// Measure fluency too, sampling with this seed (the same for pre and post).
    pub fluency_seed: Option<u64>,
    pub protocol: Protocol,
    /// How ConvSent's `es` and `dd` are computed.
    pub sentiment: SentimentProtocol,
    /// Wrap rewrite, rephrase and portability prompts in the model's chat template (EasyEdit's
    /// `use_chat_template`; locality prompts and fluency stay plain, as there).
    pub chat_template: bool,
    pub ctx: EditCtx,
}

impl Default for RunOptions {
    /// One edit at a time, token accuracy, no fluency, EasyEdit's ConvSent scores.
    fn default() -> Self {
        RunOptions {
            batch_size: 1,
            scoring: Scoring::default(),
            fluency_seed: None,
            protocol: Protocol::default(),
            sentiment: SentimentProtocol::default(),
            chat_template: false,
            ctx: EditCtx::default(),
        }
    }
}

/// What the loop reports as it goes.
pub trait Observer {
    /// A case's result is final.
    fn case_done(&mut self, result: CaseResult) -> Result<()>;
    /// Progress in `stage` ("pre", "edit"): `done` of `total`.
    fn progress(&mut self, _stage: &'static str, _done: usize, _total: usize) {}
}

/// Runs `editor` over `cases` (`(record index, request)`), skipping the record indices in `done`
/// (a resumed run; their edits are re-applied without evaluation when edits accumulate).
pub fn run_cases(
    model: &mut Model,
    editor: &mut dyn Editor,
    cases: &[(usize, EditRequest)],
    done: &BTreeSet<usize>,
    opts: &RunOptions,
    observer: &mut dyn Observer,
) -> Result<()> {
    let batch = opts.batch_size.clamp(1, editor.max_batch().max(1));
    match opts.protocol {
        Protocol::Single => {
            let todo: Vec<&(usize, EditRequest)> =
                cases.iter().filter(|(i, _)| !done.contains(i)).collect();
            let total = todo.len();
            for (n, chunk) in todo.chunks(batch).enumerate() {
                let before = chunk
                    .iter()
                    .map(|(_, r)| measure_before(model, r, opts))
                    .collect::<Result<Vec<_>>>()?;
                let requests: Vec<EditRequest> = chunk.iter().map(|(_, r)| r.clone()).collect();
                let (edit, seconds) = timed_apply(model, editor, &requests, &opts.ctx)?;
                let results = chunk
                    .iter()
                    .zip(before)
                    .map(|(&&(case_id, ref r), before)| {
                        measure_after(model, case_id, r, before, seconds, opts)
                    })
                    .collect::<Result<Vec<_>>>();
                editor.undo(model, &edit)?;
                for result in results? {
                    observer.case_done(result)?;
                }
                observer.progress("edit", ((n + 1) * batch).min(total), total);
            }
        }
        Protocol::SequentialEvalEach | Protocol::SequentialEvalAtEnd => {
            let total = cases.len();
            let mut pre = Vec::with_capacity(total);
            for (n, (i, r)) in cases.iter().enumerate() {
                pre.push(
                    (!done.contains(i))
                        .then(|| measure_before(model, r, opts))
                        .transpose()?,
                );
                observer.progress("pre", n + 1, total);
            }
            let mut pending = Vec::new();
            for (n, chunk) in cases.chunks(batch).enumerate() {
                let requests: Vec<EditRequest> = chunk.iter().map(|(_, r)| r.clone()).collect();
                let (_, seconds) = timed_apply(model, editor, &requests, &opts.ctx)?;
                for (k, (case_id, request)) in chunk.iter().enumerate() {
                    let Some(before) = pre[n * batch + k].take() else {
                        continue;
                    };
                    if opts.protocol == Protocol::SequentialEvalEach {
                        observer.case_done(measure_after(
                            model, *case_id, request, before, seconds, opts,
                        )?)?;
                    } else {
                        pending.push((*case_id, request, before, seconds));
                    }
                }
                observer.progress("edit", ((n + 1) * batch).min(total), total);
            }
            for (case_id, request, before, seconds) in pending {
                observer.case_done(measure_after(
                    model, case_id, request, before, seconds, opts,
                )?)?;
            }
        }
    }
    Ok(())
}

/// One phase's metrics of a request, fluency included when asked for.
fn measure(model: &Model, request: &EditRequest, opts: &RunOptions) -> Result<PhaseMetrics> {
    let mut metrics = if opts.chat_template {
        evaluate_with(model, &super::chat_templated(model, request)?, opts.scoring)?
    } else {
        evaluate_with(model, request, opts.scoring)?
    };
    if let Some(seed) = opts.fluency_seed {
        metrics.fluency = Some(super::fluency::fluency(model, &request.prompt, seed)?);
    }
    Ok(metrics)
}

/// What the unedited model gives for a case, kept until its post-edit evaluation.
pub struct Before {
    metrics: PhaseMetrics,
    sentiment: Option<SentimentBaseline>,
}

pub fn measure_before(model: &Model, request: &EditRequest, opts: &RunOptions) -> Result<Before> {
    let sentiment = match (&request.sentiment, opts.sentiment) {
        (Some(probe), SentimentProtocol::Corrected) => {
            Some(sentiment::baseline(model, probe, opts.sentiment)?)
        }
        _ => None,
    };
    Ok(Before {
        metrics: measure(model, request, opts)?,
        sentiment,
    })
}

/// The post-edit metrics of a case, completed with what needs both phases.
pub fn measure_after(
    model: &Model,
    case_id: usize,
    request: &EditRequest,
    before: Before,
    time: f64,
    opts: &RunOptions,
) -> Result<CaseResult> {
    let pre = before.metrics;
    let mut post = measure(model, request, opts)?;
    finalize_locality(&pre, &mut post)?;
    let mut result = CaseResult {
        pre,
        case_id,
        requested_rewrite: request.clone(),
        post,
        time,
        es: None,
        dd: None,
        fluency: None,
    };
    if let Some(probe) = &request.sentiment {
        let scores = sentiment::score(model, probe, opts.sentiment, before.sentiment.as_ref())?;
        result.es = Some(scores.es);
        result.dd = Some(scores.dd);
        if let Some(seed) = opts.fluency_seed {
            result.fluency = Some(super::fluency::fluency(model, &probe.inner_q, seed)?);
        }
    }
    Ok(result)
}

fn timed_apply(
    model: &mut Model,
    editor: &mut dyn Editor,
    requests: &[EditRequest],
    ctx: &EditCtx,
) -> Result<(Edit, f64)> {
    let start = Instant::now();
    let edit = editor.apply(model, requests, ctx)?;
    Ok((edit, start.elapsed().as_secs_f64()))
}

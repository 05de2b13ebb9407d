//! The evaluation loop: pre-edit metrics on the unedited model, edit, post-edit metrics, undo (or
//! keep, for sequential editing), one result per case streamed to a sink as soon as it is known.

use std::collections::BTreeSet;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{evaluate_with, finalize_locality, PhaseMetrics, Scoring};
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
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub batch_size: usize,
    pub scoring: Scoring,
    /// Measure fluency too, sampling with this seed (the same for pre and post).
    pub fluency_seed: Option<u64>,
    pub protocol: Protocol,
    pub ctx: EditCtx,
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
                let pre = chunk
                    .iter()
                    .map(|(_, r)| measure(model, r, opts))
                    .collect::<Result<Vec<_>>>()?;
                let requests: Vec<EditRequest> = chunk.iter().map(|(_, r)| r.clone()).collect();
                let (edit, seconds) = timed_apply(model, editor, &requests, &opts.ctx)?;
                let posts = chunk
                    .iter()
                    .map(|(_, r)| measure(model, r, opts))
                    .collect::<Result<Vec<_>>>();
                edit.undo(model)?;
                for ((&(case_id, ref request), pre), post) in
                    chunk.iter().copied().zip(pre).zip(posts?)
                {
                    observer.case_done(finish(case_id, request, pre, post, seconds)?)?;
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
                        .then(|| measure(model, r, opts))
                        .transpose()?,
                );
                observer.progress("pre", n + 1, total);
            }
            let mut pending = Vec::new();
            for (n, chunk) in cases.chunks(batch).enumerate() {
                let requests: Vec<EditRequest> = chunk.iter().map(|(_, r)| r.clone()).collect();
                let (_, seconds) = timed_apply(model, editor, &requests, &opts.ctx)?;
                for (k, (case_id, request)) in chunk.iter().enumerate() {
                    let Some(pre) = pre[n * batch + k].take() else {
                        continue;
                    };
                    if opts.protocol == Protocol::SequentialEvalEach {
                        let post = measure(model, request, opts)?;
                        observer.case_done(finish(*case_id, request, pre, post, seconds)?)?;
                    } else {
                        pending.push((*case_id, request, pre, seconds));
                    }
                }
                observer.progress("edit", ((n + 1) * batch).min(total), total);
            }
            for (case_id, request, pre, seconds) in pending {
                let post = measure(model, request, opts)?;
                observer.case_done(finish(case_id, request, pre, post, seconds)?)?;
            }
        }
    }
    Ok(())
}

/// One phase's metrics of a request, fluency included when asked for.
fn measure(model: &Model, request: &EditRequest, opts: &RunOptions) -> Result<PhaseMetrics> {
    let mut metrics = evaluate_with(model, request, opts.scoring)?;
    if let Some(seed) = opts.fluency_seed {
        metrics.fluency = Some(super::fluency::fluency(model, &request.prompt, seed)?);
    }
    Ok(metrics)
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

fn finish(
    case_id: usize,
    request: &EditRequest,
    pre: PhaseMetrics,
    mut post: PhaseMetrics,
    time: f64,
) -> Result<CaseResult> {
    finalize_locality(&pre, &mut post)?;
    Ok(CaseResult {
        pre,
        case_id,
        requested_rewrite: request.clone(),
        post,
        time,
    })
}

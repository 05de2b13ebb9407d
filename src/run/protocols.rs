//! The evaluation protocols: pre-edit metrics on the unedited model, edit, post-edit metrics, undo
//! (or keep, for sequential editing), one result per case handed to an observer as soon as it is
//! known. Editors and metrics meet here and nowhere else.

use std::collections::BTreeSet;
use std::time::Instant;

use crate::data::EditRequest;
use crate::editors::{Edit, EditCtx, Editor};
use crate::error::Result;
use crate::eval::case::{measure_after, measure_before, CaseResult, MeasureOptions};
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

impl Protocol {
    /// The name a results file records the protocol under.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Single => "single",
            Protocol::SequentialEvalEach => "sequential-each",
            Protocol::SequentialEvalAtEnd => "sequential-end",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Requests per edit call (clamped to what the editor takes).
    pub batch_size: usize,
    pub protocol: Protocol,
    pub measure: MeasureOptions,
}

impl Default for RunOptions {
    /// One edit at a time, token accuracy, no fluency, EasyEdit's ConvSent scores.
    fn default() -> Self {
        RunOptions {
            batch_size: 1,
            protocol: Protocol::default(),
            measure: MeasureOptions::default(),
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
    ctx: &EditCtx,
    observer: &mut dyn Observer,
) -> Result<()> {
    let batch = opts.batch_size.clamp(1, editor.max_batch().max(1));
    let measure = &opts.measure;
    match opts.protocol {
        Protocol::Single => {
            let todo: Vec<&(usize, EditRequest)> =
                cases.iter().filter(|(i, _)| !done.contains(i)).collect();
            let total = todo.len();
            for (n, chunk) in todo.chunks(batch).enumerate() {
                let before = chunk
                    .iter()
                    .map(|(_, r)| measure_before(model, r, measure))
                    .collect::<Result<Vec<_>>>()?;
                let requests: Vec<EditRequest> = chunk.iter().map(|(_, r)| r.clone()).collect();
                let (edit, seconds) = timed_apply(model, editor, &requests, ctx)?;
                let results = chunk
                    .iter()
                    .zip(before)
                    .map(|(&&(case_id, ref r), before)| {
                        measure_after(model, case_id, r, before, seconds, measure)
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
                        .then(|| measure_before(model, r, measure))
                        .transpose()?,
                );
                observer.progress("pre", n + 1, total);
            }
            let mut pending = Vec::new();
            for (n, chunk) in cases.chunks(batch).enumerate() {
                let requests: Vec<EditRequest> = chunk.iter().map(|(_, r)| r.clone()).collect();
                let (_, seconds) = timed_apply(model, editor, &requests, ctx)?;
                for (k, (case_id, request)) in chunk.iter().enumerate() {
                    let Some(before) = pre[n * batch + k].take() else {
                        continue;
                    };
                    if opts.protocol == Protocol::SequentialEvalEach {
                        observer.case_done(measure_after(
                            model, *case_id, request, before, seconds, measure,
                        )?)?;
                    } else {
                        pending.push((*case_id, request, before, seconds));
                    }
                }
                observer.progress("edit", ((n + 1) * batch).min(total), total);
            }
            for (case_id, request, before, seconds) in pending {
                observer.case_done(measure_after(
                    model, case_id, request, before, seconds, measure,
                )?)?;
            }
        }
    }
    Ok(())
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

//! The evaluation protocols: pre-edit metrics on the unedited model, edit, post-edit metrics, undo
//! (or keep, for sequential editing), one result per case handed to an observer as soon as it is
//! known. Editors and metrics meet here and nowhere else.

use std::collections::BTreeSet;
use std::time::Instant;

use crate::data::EditRequest;
use crate::editors::{Edit, EditCtx, Editor};
use crate::error::Result;
use crate::eval::case::{measure_after_many, measure_before_many, CaseResult, MeasureOptions};
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
    /// Sequential protocols: after this many edits (ascending), every case edited so far is
    /// measured again and handed to [`Observer::checkpoint`] (lifelong editing's curves).
    pub checkpoints: Vec<usize>,
}

impl Default for RunOptions {
    /// One edit at a time, token accuracy, no fluency, EasyEdit's ConvSent scores.
    fn default() -> Self {
        RunOptions {
            batch_size: 1,
            protocol: Protocol::default(),
            measure: MeasureOptions::default(),
            checkpoints: Vec::new(),
        }
    }
}

/// What the loop reports as it goes.
pub trait Observer {
    /// A case's result is final.
    fn case_done(&mut self, result: CaseResult) -> Result<()>;
    /// Progress in `stage` ("pre", "edit"): `done` of `total`.
    fn progress(&mut self, _stage: &'static str, _done: usize, _total: usize) {}
    /// After `edits` edits of a sequential run, the post-edit results of every case edited so
    /// far (those measured before the edits: not the cases a resumed run skips).
    fn checkpoint(&mut self, _edits: usize, _results: Vec<CaseResult>) -> Result<()> {
        Ok(())
    }
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
    // Cases measured together on one model state share their forward passes.
    let window = batch * CASES_PER_MEASURE_PASS.div_ceil(batch);
    match opts.protocol {
        Protocol::Single => {
            let todo: Vec<&(usize, EditRequest)> =
                cases.iter().filter(|(i, _)| !done.contains(i)).collect();
            let total = todo.len();
            let mut finished = 0;
            for cases_ahead in todo.chunks(window) {
                // Pre-edit metrics do not depend on the edit, and every edit is undone before the
                // next, so a window of cases is measured before any of their edits.
                let requests: Vec<EditRequest> =
                    cases_ahead.iter().map(|(_, r)| r.clone()).collect();
                let mut before = measure_before_many(model, &requests, measure)?.into_iter();
                for (chunk, chunk_requests) in cases_ahead.chunks(batch).zip(requests.chunks(batch))
                {
                    let (edit, seconds) = timed_apply(model, editor, chunk_requests, ctx)?;
                    let pending = chunk
                        .iter()
                        .zip(before.by_ref())
                        .map(|(&&(case_id, ref r), before)| (case_id, r, before, seconds))
                        .collect();
                    let results = measure_after_many(model, pending, measure);
                    editor.undo(model, &edit)?;
                    for result in results? {
                        observer.case_done(result)?;
                    }
                    finished += chunk.len();
                    observer.progress("edit", finished, total);
                }
            }
        }
        Protocol::SequentialEvalEach | Protocol::SequentialEvalAtEnd => {
            let total = cases.len();
            let mut pre = Vec::with_capacity(total);
            for cases_ahead in cases.chunks(window) {
                let requests: Vec<EditRequest> = cases_ahead
                    .iter()
                    .filter(|(i, _)| !done.contains(i))
                    .map(|(_, r)| r.clone())
                    .collect();
                let mut before = measure_before_many(model, &requests, measure)?.into_iter();
                for (i, _) in cases_ahead {
                    pre.push(if done.contains(i) {
                        None
                    } else {
                        before.next()
                    });
                }
                observer.progress("pre", pre.len(), total);
            }
            let mut pending = Vec::new();
            let mut checkpoints = opts.checkpoints.iter().copied().peekable();
            let mut times = Vec::with_capacity(total);
            for (n, chunk) in cases.chunks(batch).enumerate() {
                let requests: Vec<EditRequest> = chunk.iter().map(|(_, r)| r.clone()).collect();
                let (_, seconds) = timed_apply(model, editor, &requests, ctx)?;
                times.extend(std::iter::repeat_n(seconds, chunk.len()));
                let edited = n * batch + chunk.len();
                let mut measured_now = Vec::new();
                for (k, (case_id, request)) in chunk.iter().enumerate() {
                    let Some(before) = pre[n * batch + k].clone() else {
                        continue;
                    };
                    measured_now.push((*case_id, request, before, seconds));
                }
                if opts.protocol == Protocol::SequentialEvalEach {
                    for result in measure_after_many(model, measured_now, measure)? {
                        observer.case_done(result)?;
                    }
                } else {
                    pending.extend(measured_now);
                }
                let mut due = false;
                while checkpoints.next_if(|&c| c <= edited).is_some() {
                    due = true;
                }
                if due {
                    let so_far: Vec<_> = cases[..edited]
                        .iter()
                        .zip(&pre)
                        .zip(&times)
                        .filter_map(|(((case_id, request), before), &seconds)| {
                            Some((*case_id, request, before.clone()?, seconds))
                        })
                        .collect();
                    let mut results = Vec::with_capacity(so_far.len());
                    for window_cases in so_far.chunks(window) {
                        results.extend(measure_after_many(model, window_cases.to_vec(), measure)?);
                    }
                    observer.checkpoint(edited, results)?;
                }
                observer.progress("edit", edited, total);
            }
            // After the last edit the model no longer changes: every case's post-edit metrics
            // share passes, a window at a time, each window's results streamed as it is done.
            let mut pending = pending.into_iter().peekable();
            while pending.peek().is_some() {
                let window_cases: Vec<_> = pending.by_ref().take(window).collect();
                for result in measure_after_many(model, window_cases, measure)? {
                    observer.case_done(result)?;
                }
            }
        }
    }
    Ok(())
}

/// How many cases' metrics [`run_cases`] takes in one pass where the model state allows.
const CASES_PER_MEASURE_PASS: usize = 8;

fn timed_apply(
    model: &mut Model,
    editor: &mut dyn Editor,
    requests: &[EditRequest],
    ctx: &EditCtx,
) -> Result<(Edit, f64)> {
    let start = Instant::now();
    let edit = editor.apply(model, requests, ctx)?;
    return_freed_heap_pages();
    Ok((edit, start.elapsed().as_secs_f64()))
}

/// Hands the pages an edit freed back to the system. glibc raises its mmap threshold after the
/// first large free, so the solvers' ~19 MB temporaries then come from the heap, which fragments
/// and never shrinks: MEMIT's resident memory grew 1.1 → 1.6 GB over 30 sequential edits on
/// SmolLM2 (3.4 GB at 100) and stayed at 0.77 GB with this call, with no slower edits. Pinning
/// the threshold instead (`mallopt`) kept memory flat too but cost ~2% of forward speed.
fn return_freed_heap_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory that no allocation refers to.
    unsafe {
        libc::malloc_trim(0);
    }
}

//! The evaluation protocols: pre-edit metrics on the unedited model, edit, post-edit metrics, undo
//! (or keep, for sequential editing), one result per case handed to an observer as soon as it is
//! known. Editors and metrics meet here and nowhere else.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::data::EditRequest;
use crate::editors::{Edit, EditCtx, Editor};
use crate::error::Result;
use crate::eval::case::{
    measure_after_many, measure_before_many, recorded_before, CaseResult, MeasureOptions,
};
use crate::eval::PhaseMetrics;
use crate::model::Model;

use super::sequential_checkpoint::{restore, save as save_checkpoint, Checkpointing};

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
    /// measured again and handed to [`Observer::eval_point`] (lifelong editing's curves).
    pub eval_points: Vec<usize>,
    /// Sequential protocols: where the edits so far are saved, and taken up again on resume.
    pub saving: Option<Checkpointing>,
    /// Sequential protocols: stop (edits saved) once this many cases have been edited in all.
    pub stop_after: Option<usize>,
}

/// How [`run_cases`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// Every case was edited and measured.
    Finished,
    /// Stopped by [`RunOptions::stop_after`] after this many edits, saved for a resumed run.
    Stopped { edits: usize },
}

impl Default for RunOptions {
    /// One edit at a time, token accuracy, no fluency, EasyEdit's ConvSent scores.
    fn default() -> Self {
        RunOptions {
            batch_size: 1,
            protocol: Protocol::default(),
            measure: MeasureOptions::default(),
            eval_points: Vec::new(),
            saving: None,
            stop_after: None,
        }
    }
}

/// Where a sequential run stands at one of its evaluation points (`--eval-at`), which are not
/// the saves of its edits ([`Checkpointing`]).
#[derive(Debug, Clone, Copy)]
pub struct EvalPoint {
    pub edits: usize,
    /// Into the run, over every process that ran it.
    pub elapsed_seconds: f64,
    /// Spent in the editor's calls alone (every batch once), over every process that ran it.
    pub edit_seconds: f64,
    /// Requests per editor call.
    pub batch_size: usize,
}

/// What the loop reports as it goes.
pub trait Observer {
    /// A case's result is final.
    fn case_done(&mut self, result: CaseResult) -> Result<()>;
    /// Progress in `stage` ("pre", "edit"): `done` of `total`.
    fn progress(&mut self, _stage: &'static str, _done: usize, _total: usize) {}
    /// At an evaluation point of a sequential run, the post-edit results of every case edited so
    /// far.
    fn eval_point(&mut self, _at: EvalPoint, _results: Vec<CaseResult>) -> Result<()> {
        Ok(())
    }
    /// A sequential run took its first `edits` edits up from its saved file.
    fn resumed(&mut self, _edits: usize) {}
    /// A sequential run's edits so far were saved for resuming.
    fn saved(&mut self, _edits: usize) -> Result<()> {
        Ok(())
    }
}

/// Runs `editor` over `cases` (`(record index, request)`), skipping the record indices in `done`
/// (a resumed run's finished cases, with the pre-edit metrics its results file holds; when edits
/// accumulate, their edits are taken from the saved file of [`RunOptions::saving`] where it holds
/// them, else made again without evaluation, and the evaluation points still to come measure
/// them again on the edited model against those recorded pre-edit metrics).
pub fn run_cases(
    model: &mut Model,
    editor: &mut dyn Editor,
    cases: &[(usize, EditRequest)],
    done: &BTreeMap<usize, PhaseMetrics>,
    opts: &RunOptions,
    ctx: &EditCtx,
    observer: &mut dyn Observer,
) -> Result<RunEnd> {
    let started = Instant::now();
    // What depends on the unedited model is done before any edit (or saved edits) change it,
    // and outside the first edit's time.
    editor.prepare(model, ctx)?;
    let batch = opts.batch_size.clamp(1, editor.max_batch().max(1));
    let measure = &opts.measure;
    // Cases measured together on one model state share their forward passes.
    let window = batch * CASES_PER_MEASURE_PASS.div_ceil(batch);
    match opts.protocol {
        Protocol::Single => {
            let todo: Vec<&(usize, EditRequest)> = cases
                .iter()
                .filter(|(i, _)| !done.contains_key(i))
                .collect();
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
            let is_new = |case_id: &usize| !done.contains_key(case_id);
            // Every case edited before an evaluation point is measured there, finished ones too.
            let points_ahead = !opts.eval_points.is_empty();
            let mut pre = Vec::with_capacity(total);
            for cases_ahead in cases.chunks(window) {
                let requests: Vec<EditRequest> = cases_ahead
                    .iter()
                    .filter(|(i, _)| is_new(i))
                    .map(|(_, r)| r.clone())
                    .collect();
                let mut before = measure_before_many(model, &requests, measure)?.into_iter();
                for (i, request) in cases_ahead {
                    pre.push(match done.get(i) {
                        None => before.next(),
                        Some(metrics) if points_ahead => {
                            Some(recorded_before(model, request, metrics.clone(), measure)?)
                        }
                        Some(_) => None,
                    });
                }
                observer.progress("pre", pre.len(), total);
            }
            let unedited = model.fingerprint()?;
            let order: Vec<usize> = cases.iter().map(|(i, _)| *i).collect();
            let (mut progress, mut touched) = match &opts.saving {
                Some(saving) if saving.resume && saving.path.exists() => {
                    restore(&saving.path, model, editor, &order, batch)?
                }
                _ => Default::default(),
            };
            let restored = progress.edited.len();
            if restored > 0 {
                observer.resumed(restored);
            }
            let elapsed_before = progress.elapsed_seconds;
            let elapsed =
                |now: &Instant| elapsed_before + now.duration_since(started).as_secs_f64();
            let mut pending: Vec<_> = cases[..restored]
                .iter()
                .zip(&pre)
                .zip(&progress.seconds)
                .filter(|(((case_id, _), _), _)| is_new(case_id))
                .filter_map(|(((case_id, request), before), &seconds)| {
                    Some((*case_id, request, before.clone()?, seconds))
                })
                .collect();
            if opts.protocol == Protocol::SequentialEvalEach {
                // Those were measured right after their edits, before the run was saved.
                pending.clear();
            }
            let mut eval_points = opts.eval_points.iter().copied().peekable();
            let mut measured_at_end = None;
            let mut times = progress.seconds.clone();
            let mut edited = restored;
            loop {
                // An evaluation point is measured at the first batch boundary at or after it (a
                // resumed run measures at once one whose measurement was cut short).
                let mut due = false;
                while eval_points.next_if(|&c| c <= edited).is_some() {
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
                    // Every case of a batch carries the batch's seconds.
                    let edit_seconds = times.chunks(batch).map(|b| b[0]).sum();
                    let at = EvalPoint {
                        edits: edited,
                        elapsed_seconds: elapsed(&Instant::now()),
                        edit_seconds,
                        batch_size: batch,
                    };
                    if edited == total && opts.protocol == Protocol::SequentialEvalAtEnd {
                        measured_at_end = Some(results.clone());
                    }
                    observer.eval_point(at, results)?;
                }
                observer.progress("edit", edited, total);
                if edited == total {
                    break;
                }
                if opts.stop_after.is_some_and(|stop| edited >= stop) {
                    return Ok(RunEnd::Stopped { edits: edited });
                }
                let chunk = &cases[edited..(edited + batch).min(total)];
                let requests: Vec<EditRequest> = chunk.iter().map(|(_, r)| r.clone()).collect();
                let (edit, seconds) = timed_apply(model, editor, &requests, ctx)?;
                touched.note(&edit);
                drop(edit);
                times.extend(std::iter::repeat_n(seconds, chunk.len()));
                let first = edited;
                edited += chunk.len();
                let mut measured_now = Vec::new();
                for (k, (case_id, request)) in chunk.iter().enumerate() {
                    let Some(before) = pre[first + k].clone().filter(|_| is_new(case_id)) else {
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
                // Saved before an evaluation point's measurement, so that a run stopped during it
                // measures it again when resumed.
                let every = opts.saving.as_ref().map_or(0, |s| s.every);
                let due = eval_points.peek().is_some_and(|&c| c <= edited)
                    || edited == total
                    || opts.stop_after.is_some_and(|stop| edited >= stop)
                    || (every > 0 && edited / every > first / every);
                if let Some(saving) = opts.saving.as_ref().filter(|_| due) {
                    progress.edited = order[..edited].to_vec();
                    progress.seconds = times.clone();
                    progress.elapsed_seconds = elapsed(&Instant::now());
                    save_checkpoint(&saving.path, model, editor, &unedited, &touched, &progress)?;
                    observer.saved(edited)?;
                }
            }
            // An evaluation point after the last edit has measured every case on the final
            // model already (all 1,000 cases of a lifelong run: minutes).
            if let Some(results) = measured_at_end {
                for result in results.into_iter().filter(|r| is_new(&r.case_id)) {
                    observer.case_done(result)?;
                }
                return Ok(RunEnd::Finished);
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
    Ok(RunEnd::Finished)
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

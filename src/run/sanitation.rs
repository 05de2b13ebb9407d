//! KnowEdit's Sanitation protocol as a loop (the judging is `crate::eval::sanitation`): answers
//! before, every selected question edited to "I don't know." with the edits kept, answers after;
//! the edits are undone at the end, so the model is left as it came.

use crate::data::{EditRequest, PromptSet};
use crate::editors::{Edit, EditCtx, Editor};
use crate::error::Result;
use crate::eval::sanitation::{
    answer, judge_case, locality_score, mean_fluency, SanitationCase, SanitationSummary,
};
use crate::model::Model;

pub struct SanitationOptions {
    pub batch_size: usize,
    pub fluency_seed: Option<u64>,
}

/// What the Sanitation loop reports as it goes.
pub trait SanitationObserver {
    /// A case is scored (its question judged after all edits).
    fn case_done(&mut self, case: &SanitationCase) -> Result<()>;
    /// Progress in `stage` ("pre", "edit", "post"): `done` of `total`.
    fn progress(&mut self, _stage: &'static str, _done: usize, _total: usize) {}
}

/// Runs the protocol; the observer sees each case as soon as it is scored.
pub fn run(
    model: &mut Model,
    editor: &mut dyn Editor,
    cases: &[(usize, EditRequest)],
    locality: &PromptSet,
    opts: &SanitationOptions,
    ctx: &EditCtx,
    observer: &mut dyn SanitationObserver,
) -> Result<SanitationSummary> {
    let total = cases.len() + locality.prompt.len();
    let mut before_cases = Vec::with_capacity(cases.len());
    for (n, (_, r)) in cases.iter().enumerate() {
        before_cases.push(answer(model, &r.prompt)?);
        observer.progress("pre", n + 1, total);
    }
    let mut before_locality = Vec::with_capacity(locality.prompt.len());
    for (n, p) in locality.prompt.iter().enumerate() {
        before_locality.push(answer(model, p)?);
        observer.progress("pre", cases.len() + n + 1, total);
    }

    let mut edits: Vec<Edit> = Vec::new();
    let start = std::time::Instant::now();
    let batch = opts.batch_size.clamp(1, editor.max_batch().max(1));
    let result = (|| -> Result<SanitationSummary> {
        for (n, chunk) in cases.chunks(batch).enumerate() {
            let requests: Vec<EditRequest> = chunk.iter().map(|(_, r)| r.clone()).collect();
            edits.push(editor.apply(model, &requests, ctx)?);
            observer.progress("edit", ((n + 1) * batch).min(cases.len()), cases.len());
        }
        let edit_seconds = start.elapsed().as_secs_f64();

        let mut hits = (0usize, 0usize);
        for (n, ((case_id, r), pre)) in cases.iter().zip(before_cases).enumerate() {
            let case = judge_case(model, *case_id, r, pre)?;
            hits.0 += usize::from(case.pre.hit);
            hits.1 += usize::from(case.post.hit);
            observer.case_done(&case)?;
            observer.progress("post", n + 1, total);
        }
        let mut scores = Vec::with_capacity(locality.prompt.len());
        for (n, (p, pre)) in locality.prompt.iter().zip(&before_locality).enumerate() {
            scores.push(locality_score(model, p, pre)?);
            observer.progress("post", cases.len() + n + 1, total);
        }
        let finite: Vec<f64> = scores.into_iter().filter(|s| s.is_finite()).collect();
        let fluency = opts
            .fluency_seed
            .map(|seed| mean_fluency(model, &locality.prompt, seed))
            .transpose()?;
        let pct = |k: usize| 100.0 * k as f64 / cases.len().max(1) as f64;
        Ok(SanitationSummary {
            cases: cases.len(),
            edit_success_pre: pct(hits.0),
            edit_success_post: pct(hits.1),
            locality: 100.0 * finite.iter().sum::<f64>() / finite.len().max(1) as f64,
            locality_questions: finite.len(),
            fluency,
            edit_seconds,
        })
    })();
    for edit in edits.into_iter().rev() {
        editor.undo(model, &edit)?;
    }
    result
}

//! FT-L end to end on SmolLM2 with the shipped hyperparameters, and the properties every editor
//! owes: the target becomes likely, unrelated prompts keep their argmax, undo is exact.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use kedit::data::read_dataset;
use kedit::editors::{build_editor, EditCtx};
use kedit::eval::case::CaseResult;
use kedit::report::summary::summarize;
use kedit::run::{run_cases, Observer, Protocol, RunOptions};

struct Collect(Vec<CaseResult>);

impl Observer for Collect {
    fn case_done(&mut self, result: CaseResult) -> kedit::Result<()> {
        self.0.push(result);
        Ok(())
    }
}

/// Runs FT-L with `hparams` over `cases` under `protocol`; the model afterwards and the results.
fn run_ft(
    hparams: &Path,
    cases: &[(usize, kedit::data::EditRequest)],
    protocol: Protocol,
) -> (kedit::model::Model, Vec<CaseResult>) {
    let mut model = smollm2();
    let mut editor = build_editor("FT-L", hparams).unwrap();
    let opts = RunOptions {
        protocol,
        ..RunOptions::default()
    };
    let mut results = Collect(Vec::new());
    run_cases(
        &mut model,
        editor.as_mut(),
        cases,
        &BTreeMap::new(),
        &opts,
        &EditCtx::default(),
        &mut results,
    )
    .unwrap();
    (model, results.0)
}

fn hparams() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("hparams/FT/smollm2-135m.yaml")
}

#[test]
fn ft_l_on_20_counterfact_records_is_reliable_and_local() {
    let data = read_dataset(&fixture("data/counterfact_easyedit_edit.json"), None).unwrap();
    let (_, results) = run_ft(&hparams(), &data.cases[..20], Protocol::Single);
    let summary = summarize(&results);
    eprintln!("{}", summary.table());
    let pre = summary.pre.rewrite_acc.unwrap();
    let post = summary.post.rewrite_acc.unwrap();
    let locality = summary.post.locality.unwrap();
    assert!(pre < 20.0, "pre reliability {pre}");
    assert!(post >= 90.0, "post reliability {post}");
    assert!(locality >= 70.0, "locality {locality}");
}

#[test]
fn ft_undo_restores_bit_identical_logits() {
    let mut model = smollm2();
    let data = read_dataset(&fixture("data/counterfact_easyedit_edit.json"), None).unwrap();
    let request = &data.cases[0].1;
    let ids = model.encode(&request.prompt).unwrap();
    let before = logits_alone(&model, &ids);
    let quick = fixture("hparams/ft-l-smollm2-quick.yaml");
    let mut editor = build_editor("FT-L", &quick).unwrap();
    let edit = editor
        .apply(
            &mut model,
            std::slice::from_ref(request),
            &EditCtx::default(),
        )
        .unwrap();
    assert_eq!(
        edit.changes.len(),
        1,
        "FT-L on LLaMA trains down_proj.weight only"
    );
    assert!(
        max_abs_diff(&before, &logits_alone(&model, &ids)) > 1e-3,
        "the edit changed nothing"
    );
    edit.undo(&mut model).unwrap();
    assert_eq!(max_abs_diff(&before, &logits_alone(&model, &ids)), 0.0);
}

#[test]
fn ft_m_raises_the_target_likelihood() {
    let mut model = smollm2();
    let data = read_dataset(&fixture("data/counterfact_easyedit_edit.json"), None).unwrap();
    let request = &data.cases[1].1;
    let pre = kedit::eval::evaluate(&model, request).unwrap();
    let mut editor = build_editor("FT-M", &hparams()).unwrap();
    assert_eq!(editor.name(), "FT-M");
    editor
        .apply(
            &mut model,
            std::slice::from_ref(request),
            &EditCtx::default(),
        )
        .unwrap();
    let post = kedit::eval::evaluate(&model, request).unwrap();
    assert!(
        post.rewrite_acc[0] > pre.rewrite_acc[0],
        "{:?} -> {:?}",
        pre.rewrite_acc,
        post.rewrite_acc
    );
    assert_eq!(post.rewrite_acc[0], 1.0);
}

#[test]
fn sequential_protocols_keep_edits_and_evaluate_when_they_say() {
    let data = read_dataset(&fixture("data/counterfact_easyedit_edit.json"), None).unwrap();
    let cases = &data.cases[..2];
    let quick = fixture("hparams/ft-l-smollm2-quick.yaml");
    let run = |protocol| run_ft(&quick, cases, protocol);
    let unedited = smollm2();
    let (after_each, each) = run(Protocol::SequentialEvalEach);
    let (after_all, at_end) = run(Protocol::SequentialEvalAtEnd);
    for results in [&each, &at_end] {
        assert_eq!(results.len(), 2);
        for r in results.iter() {
            // pre is always the unedited model's
            let pre = kedit::eval::evaluate(&unedited, &r.requested_rewrite).unwrap();
            assert_eq!(r.pre, pre, "case {}", r.case_id);
        }
    }
    // edits are kept: both final models hold both edits, and they agree
    let last = &cases[1].1;
    let final_each = kedit::eval::evaluate(&after_each, last).unwrap();
    assert_eq!(final_each, kedit::eval::evaluate(&after_all, last).unwrap());
    // at the end, case 0 is measured on the model holding both edits; right after its own edit,
    // on the model holding only the first
    let first = &cases[0].1;
    let mut on_final = kedit::eval::evaluate(&after_all, first).unwrap();
    kedit::eval::finalize_locality(&at_end[0].pre, &mut on_final).unwrap();
    assert_eq!(at_end[0].post, on_final);
    let mut only_first = smollm2();
    let mut editor = build_editor("FT-L", &quick).unwrap();
    editor
        .apply(
            &mut only_first,
            std::slice::from_ref(first),
            &EditCtx::default(),
        )
        .unwrap();
    let mut after_first = kedit::eval::evaluate(&only_first, first).unwrap();
    kedit::eval::finalize_locality(&each[0].pre, &mut after_first).unwrap();
    assert_eq!(each[0].post, after_first);
}

#[test]
fn a_bf16_model_trains_an_f32_master_copy() {
    // Steps of 1e-4 are below bf16's resolution for most weights: trained in bf16 they would round
    // away; trained in f32 and cast back, the bf16 edit matches the f32 model's edit.
    let tmp = tempfile::tempdir().unwrap();
    let small_steps = tmp.path().join("ft-small-steps.yaml");
    let quick = std::fs::read_to_string(fixture("hparams/ft-l-smollm2-quick.yaml")).unwrap();
    std::fs::write(
        &small_steps,
        quick
            .replace("lr: 5e-3", "lr: 1e-4")
            .replace("num_steps: 3", "num_steps: 8"),
    )
    .unwrap();
    let data = read_dataset(&fixture("data/counterfact_easyedit_edit.json"), None).unwrap();
    let request = &data.cases[0].1;
    let delta = |dtype: candle_core::DType| -> Vec<f32> {
        let mut model = load_as(&smollm2_path(), dtype);
        let mut editor = build_editor("FT-L", &small_steps).unwrap();
        let edit = editor
            .apply(
                &mut model,
                std::slice::from_ref(request),
                &EditCtx::default(),
            )
            .unwrap();
        let change = &edit.weight_changes().next().unwrap();
        assert_eq!(
            change.after.dtype(),
            dtype,
            "the edit keeps the model's dtype"
        );
        (&change.after.to_dtype(candle_core::DType::F32).unwrap()
            - &change.before.to_dtype(candle_core::DType::F32).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let full = delta(candle_core::DType::F32);
    let half = delta(candle_core::DType::BF16);
    let changed = half.iter().filter(|d| **d != 0.0).count() as f64 / half.len() as f64;
    assert!(changed > 0.5, "only {changed} of the bf16 weights moved");
    let err = rel_l2(&half, &full);
    // (rounding the cast-back delta to bf16 leaves ~0.5; trained in bf16 it was ~0.9, with 14% moved)
    assert!(
        err < 0.7,
        "bf16 edit differs from the f32 edit by {err} (relative L2)"
    );
}

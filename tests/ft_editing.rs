//! FT-L end to end on SmolLM2 with the shipped hyperparameters, and the properties every editor
//! owes: the target becomes likely, unrelated prompts keep their argmax, undo is exact.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use kedit::data::read_dataset;
use kedit::editors::{build_editor, EditCtx};
use kedit::eval::runner::{run_cases, CaseResult, Observer, Protocol, RunOptions};
use kedit::eval::summary::summarize;

struct Collect(Vec<CaseResult>);

impl Observer for Collect {
    fn case_done(&mut self, result: CaseResult) -> kedit::Result<()> {
        self.0.push(result);
        Ok(())
    }
}

fn hparams() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("hparams/FT/smollm2-135m.yaml")
}

#[test]
fn ft_l_on_20_counterfact_records_is_reliable_and_local() {
    let mut model = smollm2();
    let data = read_dataset(&fixture("data/counterfact_easyedit_edit.json"), None).unwrap();
    let cases = &data.cases[..20];
    let mut editor = build_editor("FT-L", &hparams()).unwrap();
    let opts = RunOptions {
        batch_size: 1,
        scoring: kedit::eval::Scoring::TokenAccuracy,
        protocol: Protocol::Single,
        ctx: EditCtx::default(),
    };
    let mut results = Collect(Vec::new());
    run_cases(
        &mut model,
        editor.as_mut(),
        cases,
        &BTreeSet::new(),
        &opts,
        &mut results,
    )
    .unwrap();
    let summary = summarize(&results.0);
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

//! Pre-edit metrics are deterministic, so they must equal EasyEdit's own case by case
//! (tests/fixtures/easyedit/pre_metrics_smollm2.json, made by make_pre_metrics.py beside it).

mod common;

use common::*;
use kedit::data::read_dataset;
use kedit::data::EditRequest;
use kedit::eval::{evaluate, evaluate_many, LocalityEntry, PhaseMetrics};

fn close(a: &[f64], b: &serde_json::Value, what: &str) {
    let b: Vec<f64> = b
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-9, "{what}: {a:?} vs {b:?}");
    }
}

/// One case's metrics against EasyEdit's.
fn check(got: &PhaseMetrics, want: &serde_json::Value, at: &dyn Fn(&str) -> String) {
    close(&got.rewrite_acc, &want["rewrite_acc"], &at("rewrite_acc"));
    close(
        got.rephrase_acc.as_deref().unwrap(),
        &want["rephrase_acc"],
        &at("rephrase_acc"),
    );
    let want_port = want["portability"].as_object().unwrap();
    assert_eq!(
        got.portability.len(),
        want_port.len(),
        "{}",
        at("portability keys")
    );
    for (k, v) in want_port {
        close(&got.portability[k], v, &at(k));
    }
    let want_loc = want["locality"].as_object().unwrap();
    assert_eq!(
        got.locality.len(),
        want_loc.len(),
        "{}",
        at("locality keys")
    );
    for (k, v) in want_loc {
        let LocalityEntry::Output(ids) = &got.locality[k] else {
            panic!("{k} is not an output")
        };
        let want_ids: Vec<Vec<u32>> = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(ids, &want_ids, "{}", at(k));
    }
}

/// Case by case, and all the cases of a split scored in shared forward passes (as `kedit eval`
/// takes pre-edit metrics): both must be EasyEdit's numbers.
#[test]
fn pre_edit_metrics_equal_easyedits() {
    let model = smollm2();
    let reference = read_json("easyedit/pre_metrics_smollm2.json");
    for (split, file) in [
        ("knowedit_zsre", "data/knowedit_zsre_test.json"),
        ("counterfact", "data/counterfact_easyedit_edit.json"),
    ] {
        let ds = read_dataset(&fixture(file), None).unwrap();
        let cases = reference["splits"][split]["cases"].as_array().unwrap();
        let requests: Vec<EditRequest> = cases
            .iter()
            .map(|case| {
                let (_, request) = &ds.cases[case["case_id"].as_u64().unwrap() as usize];
                assert_eq!(request.prompt, case["prompt"].as_str().unwrap());
                request.clone()
            })
            .collect();
        let batched = evaluate_many(&model, &requests).unwrap();
        assert_eq!(batched.len(), requests.len());
        for ((case, request), together) in cases.iter().zip(&requests).zip(&batched) {
            let i = case["case_id"].as_u64().unwrap();
            let alone = evaluate(&model, request).unwrap();
            check(&alone, &case["pre"], &|what| {
                format!("{split} case {i} {what}")
            });
            check(together, &case["pre"], &|what| {
                format!("{split} case {i}, scored with the others, {what}")
            });
        }
    }
}

//! Pre-edit metrics are deterministic, so they must equal EasyEdit's own case by case
//! (tests/fixtures/easyedit/pre_metrics_smollm2.json, made by make_pre_metrics.py beside it).

mod common;

use common::*;
use kedit::data::read_dataset;
use kedit::eval::{evaluate, LocalityEntry};

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
        for case in cases {
            let i = case["case_id"].as_u64().unwrap() as usize;
            let (_, request) = &ds.cases[i];
            assert_eq!(request.prompt, case["prompt"].as_str().unwrap());
            let got = evaluate(&model, request).unwrap();
            let want = &case["pre"];
            let at = |what: &str| format!("{split} case {i} {what}");
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
    }
}

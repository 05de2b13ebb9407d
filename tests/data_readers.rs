//! Every benchmark file kept in tests/fixtures/data (copied unchanged from the shared data set)
//! parses in the layout detected for it, and bad records give errors naming file, record and field.

mod common;

use common::*;
use kedit::data::{read_dataset, Format};

#[test]
fn every_edit_file_parses_in_its_layout() {
    let expected = [
        ("counterfact_easyedit_edit.json", Format::Counterfact, 200),
        ("knowedit_wiki_counterfact_test.json", Format::Knowedit, 200),
        (
            "knowedit_wiki_counterfact_train.json",
            Format::Knowedit,
            200,
        ),
        ("knowedit_wiki_recent_train.json", Format::Knowedit, 200),
        ("knowedit_wikibio_test.json", Format::Knowedit, 200),
        ("knowedit_zsre_test.json", Format::Knowedit, 200),
        (
            "locality_counterfact_distracting_neighbor.json",
            Format::RomeCounterfact,
            200,
        ),
        (
            "portability_counterfact_one_hop.json",
            Format::RomeCounterfact,
            200,
        ),
        (
            "portability_counterfact_subject_replace.json",
            Format::RomeCounterfact,
            213,
        ),
        (
            "portability_zsre_inverse_relation.json",
            Format::ZsreMend,
            200,
        ),
        ("portability_zsre_one_hop.json", Format::ZsreMend, 200),
        (
            "portability_zsre_subject_replace.json",
            Format::ZsreMend,
            200,
        ),
        ("zsre_mend_eval.json", Format::ZsreMend, 200),
        ("zsre_mend_train_sample.json", Format::ZsreMend, 300),
    ];
    for (file, format, records) in expected {
        let ds = read_dataset(&fixture(&format!("data/{file}")), None).unwrap();
        assert_eq!(ds.format, format, "{file}");
        assert_eq!(ds.cases.len() + ds.skipped.len(), records, "{file}");
        for (i, req) in &ds.cases {
            assert!(
                !req.prompt.is_empty() && !req.target_new.is_empty(),
                "{file} record {i}"
            );
            for set in req.locality.values().chain(req.portability.values()) {
                assert_eq!(
                    set.prompt.len(),
                    set.ground_truth.len(),
                    "{file} record {i}"
                );
                assert!(!set.prompt.is_empty(), "{file} record {i}: empty key");
            }
        }
    }
}

#[test]
fn layouts_map_fields_as_easyedit_does() {
    let cf = read_dataset(&fixture("data/counterfact_easyedit_edit.json"), None).unwrap();
    let (_, r) = &cf.cases[0];
    assert_eq!(r.prompt, "The mother tongue of Danielle Darrieux is");
    assert_eq!(r.target_new, "English");
    assert_eq!(r.subject.as_deref(), Some("Danielle Darrieux"));
    assert_eq!(r.locality["neighborhood"].prompt.len(), 1);

    let zsre = read_dataset(&fixture("data/knowedit_zsre_test.json"), None).unwrap();
    let (_, r) = &zsre.cases[0];
    assert_eq!(r.portability["reasoning"].ground_truth, ["Owlet moths"]);
    assert_eq!(
        r.locality["Relation_Specificity"].ground_truth,
        ["genus", "genus"]
    );
    assert_eq!(r.ground_truth.as_deref(), Some("Aspidoceratidae"));

    let recent = read_dataset(&fixture("data/knowedit_wiki_counterfact_test.json"), None).unwrap();
    let (_, r) = &recent.cases[0];
    assert_eq!(
        r.portability["reasoning"].ground_truth[0], "Syrian pound",
        "first of nested aliases"
    );

    let bio = read_dataset(&fixture("data/knowedit_wikibio_test.json"), None).unwrap();
    let (_, r) = &bio.cases[0];
    assert!(r
        .prompt
        .starts_with("This is a Wikipedia passage about john russell reynolds."));
    assert_eq!(r.subject.as_deref(), Some("john russell reynolds"));
    assert!(r.portability.is_empty());

    let rome = read_dataset(&fixture("data/portability_counterfact_one_hop.json"), None).unwrap();
    let (_, r) = &rome.cases[0];
    assert_eq!(r.prompt, "Spike Hughes originates from");
    assert_eq!(r.locality["neighborhood"].ground_truth, vec!["London"; 10]);
    assert_eq!(r.portability["one_hop"].ground_truth, ["Cheesesteaks"]);

    let sub = read_dataset(
        &fixture("data/portability_counterfact_subject_replace.json"),
        None,
    )
    .unwrap();
    let (_, r) = &sub.cases[0];
    assert_eq!(
        r.portability["subject_replace"].prompt,
        ["Mary Eliza Wright passed away in"]
    );

    let inv = read_dataset(
        &fixture("data/portability_zsre_inverse_relation.json"),
        None,
    )
    .unwrap();
    let (_, r) = &inv.cases[0];
    assert_eq!(
        r.portability["inverse_relation"].ground_truth,
        ["Claire Clairmont"]
    );
}

fn write(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("bad.json");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn bad_records_name_file_record_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let ok = r#"{"case_id":0,"prompt":"P is","target_new":"x","subject":"P","ground_truth":"y","rephrase_prompt":"Q","locality_prompt":"L","locality_ground_truth":"z"}"#;
    let missing = r#"{"case_id":1,"prompt":"P is","subject":"P","locality_prompt":"L","locality_ground_truth":"z","target_new":"x"}"#;
    let cases = [
        (
            format!("[{ok},{}]", missing.replace(r#","target_new":"x""#, "")),
            "record 1: field \"target_new\" is missing",
        ),
        (
            format!("[{ok},{}]", ok.replace(r#""x""#, "7")),
            "record 1: field \"target_new\" should be a string, found a number",
        ),
        ("[{\"prompt\": ".to_string(), "invalid JSON"),
        ("3".to_string(), "expected a JSON array"),
        ("[]".to_string(), "holds no records"),
        ("[{\"foo\": 1}]".to_string(), "cannot tell the layout"),
    ];
    for (text, needle) in cases {
        let p = write(tmp.path(), &text);
        let err = read_dataset(&p, None).unwrap_err().to_string();
        assert!(err.contains("bad.json") && err.contains(needle), "{err}");
    }
    let p = write(tmp.path(), &format!("[{ok}]"));
    let err = read_dataset(&p, Some(Format::ZsreMend))
        .unwrap_err()
        .to_string();
    assert!(err.contains("record 0: field \"alt\" is missing"), "{err}");
}

#[test]
fn convsent_requests_are_easyedit_draws() {
    // Drawn by CPython's own `random` (scripts/convsent/make_requests.py).
    let expected = read_json("convsent/requests_seed0.json");
    let ds = read_dataset(&fixture("data/knowedit_convsent_test.json"), None).unwrap();
    assert_eq!(ds.format, Format::Convsent);
    assert_eq!(ds.cases.len(), 200);
    for (k, want) in expected.as_array().unwrap().iter().enumerate() {
        let (i, r) = &ds.cases[k];
        assert_eq!(*i, k);
        assert_eq!(r.prompt, want["prompt"].as_str().unwrap(), "record {k}");
        assert_eq!(r.target_new, want["target_new"].as_str().unwrap());
        assert_eq!(r.subject.as_deref(), want["subject"].as_str());
        let probe = r.sentiment.as_ref().unwrap();
        assert_eq!(probe.inner_q, want["inner_q"].as_str().unwrap());
        let texts = |qa: &[(String, String)]| -> Vec<String> {
            qa.iter().map(kedit::data::SentimentProbe::text).collect()
        };
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(texts(&probe.inner_qa), strings(&want["inner_all_qa"]));
        assert_eq!(texts(&probe.outer_qa), strings(&want["outer_all_qa"]));
        let same: Vec<bool> = want["same_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_bool().unwrap())
            .collect();
        assert_eq!(probe.same_sentiment, same);
    }
}

#[test]
fn sanitation_file_gives_requests_and_shared_locality() {
    let ds = read_dataset(
        &fixture("data/knowedit_sanitation_trivia_qa_test.json"),
        None,
    )
    .unwrap();
    assert_eq!(ds.format, Format::Sanitation);
    assert_eq!(ds.cases.len(), 80);
    let (_, r) = &ds.cases[0];
    assert_eq!(
        r.prompt,
        "Question:What type of creature is the Australian currawong?\nAnswer:"
    );
    assert_eq!(r.target_new, "I don't know.");
    assert_eq!(r.ground_truth.as_deref(), Some("Birds"));
    let loc = ds.shared_locality.as_ref().unwrap();
    assert_eq!(loc.prompt.len(), 453);
    assert_eq!(loc.ground_truth[0], "Quaff");

    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        tmp.path(),
        r#"{"success": [{"question": "q?", "target_new": "I don't know."}], "locality": []}"#,
    );
    let err = read_dataset(&p, None).unwrap_err().to_string();
    assert!(
        err.contains("bad.json record 0: success: field \"ground_truth\" is missing"),
        "{err}"
    );
    let p = write(tmp.path(), r#"[{"ent": "x", "pos": ["a"], "neg": 3}]"#);
    let err = read_dataset(&p, None).unwrap_err().to_string();
    assert!(
        err.contains("record 0: field \"neg\" should be a list of strings"),
        "{err}"
    );
}

//! `kedit eval` and `kedit apply` as a user runs them: resuming an interrupted run, saving an
//! edit and re-applying it to a fresh model, and refusing bad input.

mod common;

use common::*;

/// The counterfactual that the `apply` tests make.
const DARRIEUX_TO_ENGLISH: [&str; 6] = [
    "--prompt",
    "The mother tongue of Danielle Darrieux is",
    "--subject",
    "Danielle Darrieux",
    "--target",
    "English",
];

/// `kedit eval` of FT-L with `hparams` on the first `limit` CounterFact records, plus `extra`.
fn eval_args(hparams: &std::path::Path, limit: &str, extra: &[&str]) -> Vec<String> {
    let model = smollm2_path();
    let data = fixture("data/counterfact_easyedit_edit.json");
    let mut args: Vec<String> = ["eval", "-m", model.to_str().unwrap(), "--editor", "FT-L"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (flag, value) in [
        ("--hparams", hparams.to_str().unwrap()),
        ("--data", data.to_str().unwrap()),
        ("--limit", limit),
    ] {
        args.extend([flag.to_string(), value.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn an_interrupted_eval_resumes_to_the_same_file() {
    let tmp = tempfile::tempdir().unwrap();
    let hparams = fixture("hparams/ft-l-smollm2-quick.yaml");
    let run = |out: &std::path::Path, extra: &[&str]| {
        let mut more = vec!["--quiet", "--out", out.to_str().unwrap()];
        more.extend_from_slice(extra);
        kedit(&eval_args(&hparams, "3", &more))
    };
    let full = tmp.path().join("full.jsonl");
    ok(&run(&full, &[]));
    let full_text = std::fs::read_to_string(&full).unwrap();
    assert_eq!(full_text.lines().count(), 3);

    // An interruption after one case, in the middle of writing the second line.
    let cut = tmp.path().join("cut.jsonl");
    let first_len = full_text.find('\n').unwrap() + 1;
    std::fs::write(&cut, &full_text[..first_len + 40]).unwrap();
    let refused = run(&cut, &[]);
    assert_eq!(
        refused.status.code(),
        Some(2),
        "an existing file needs --resume"
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--resume"));
    ok(&run(&cut, &["--resume"]));
    let resumed = std::fs::read_to_string(&cut).unwrap();
    assert_eq!(
        results_without_time(&resumed),
        results_without_time(&full_text)
    );

    // A run made another way may not continue the file: the field that differs is named.
    let other = tmp.path().join("other.yaml");
    let text = std::fs::read_to_string(&hparams).unwrap();
    std::fs::write(&other, text.replace("num_steps: ", "num_steps: 1\n# was: ")).unwrap();
    let mut args = eval_args(&other, "3", &["--quiet", "--out", full.to_str().unwrap()]);
    args.push("--resume".into());
    assert_one_line_error(&kedit(&args), &["full.jsonl", "hparams_sha256"]);
    let out = kedit(&eval_args(
        &hparams,
        "3",
        &[
            "--quiet",
            "--resume",
            "--seed",
            "7",
            "--out",
            full.to_str().unwrap(),
        ],
    ));
    assert_one_line_error(&out, &["seed was 42, this run has 7"]);
    assert_eq!(
        std::fs::read_to_string(&full).unwrap(),
        full_text,
        "a refused resume wrote"
    );
}

#[test]
fn a_saved_edit_reapplied_to_a_fresh_model_gives_the_same_post_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let model = smollm2_path();
    let edit = tmp.path().join("edit.safetensors");
    let m = model.to_str().unwrap();
    let common_args = |extra: Vec<&'static str>| -> Vec<String> {
        let mut args: Vec<String> = ["apply", "-m", m, "--json"]
            .into_iter()
            .chain(DARRIEUX_TO_ENGLISH)
            .chain([
                "--rephrase",
                "Where Danielle Darrieux is from, people speak the language of",
                "--locality-prompt",
                "The capital of France is",
                "--locality-answer",
                "Paris",
            ])
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let hparams = fixture("hparams/ft-l-smollm2-quick.yaml");
    let mut with_editor = common_args(vec!["--editor", "FT-L", "--hparams"]);
    with_editor.extend([
        hparams.to_str().unwrap().to_string(),
        "--save-edit".into(),
        edit.to_str().unwrap().to_string(),
    ]);
    let first: serde_json::Value = serde_json::from_str(&ok(&kedit(&with_editor))).unwrap();
    assert!(edit.is_file());
    let mut with_patch = common_args(vec!["--patch"]);
    with_patch.push(edit.to_str().unwrap().to_string());
    let again: serde_json::Value = serde_json::from_str(&ok(&kedit(&with_patch))).unwrap();
    assert_eq!(first["post"], again["post"]);
    assert_eq!(first["generation_after"], again["generation_after"]);
    assert_ne!(
        first["pre"]["rewrite_acc"], first["post"]["rewrite_acc"],
        "the edit changed nothing"
    );
}

#[test]
fn apply_refuses_a_subject_outside_the_prompt_and_unpaired_answers() {
    let model = smollm2_path();
    let cases: [(&[&str], &str); 2] = [
        (
            &[
                "--prompt",
                "The capital of France is",
                "--subject",
                "Germany",
                "--target",
                "Berlin",
            ],
            "does not occur",
        ),
        (
            &["--prompt", "P", "--target", "T", "--locality-prompt", "L"],
            "--locality-answer",
        ),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["apply", "-m", model.to_str().unwrap(), "--editor", "FT-L"];
        args.extend_from_slice(flags);
        assert_one_line_error(&kedit(&args), &[needle]);
    }
}

#[test]
fn unknown_hparams_fields_and_methods_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("ft.yaml");
    let text = std::fs::read_to_string(fixture("hparams/ft-l-smollm2-quick.yaml")).unwrap();
    std::fs::write(&bad, format!("{text}learning_rate: 0.1\n")).unwrap();
    let out = kedit(&eval_args(&bad, "1", &[]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ft.yaml") && err.contains("learning_rate"),
        "{err}"
    );
    // The file is read before the model: with a model that is not there, the error is still
    // the file's (a bad field must not wait for a model to load).
    let absent = tmp.path().join("no-such-model");
    let mut args = eval_args(&bad, "1", &[]);
    args[2] = absent.to_str().unwrap().into();
    let apply = [
        "apply",
        "-m",
        absent.to_str().unwrap(),
        "--editor",
        "FT-L",
        "--hparams",
        bad.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--target",
        "Rome",
    ];
    for out in [kedit(&args), kedit(&apply)] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("learning_rate") && !err.contains("no-such-model"),
            "{err}"
        );
    }
    let mut args = eval_args(&bad, "1", &[]);
    args[4] = "SORCERY".into();
    let out = kedit(&args);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SORCERY"));
}

#[test]
fn sanitation_edits_all_questions_then_judges_generations() {
    let tmp = tempfile::tempdir().unwrap();
    // The first three "birds" questions and six locality questions, records unchanged.
    let full = read_json("data/knowedit_sanitation_trivia_qa_test.json");
    let part = serde_json::json!({
        "success": full["success"].as_array().unwrap()[..3],
        "locality": full["locality"].as_array().unwrap()[..6],
    });
    let data = tmp.path().join("sanitation.json");
    std::fs::write(&data, part.to_string()).unwrap();
    let model = smollm2_path();
    let run = |editor: &str, hparams: Option<&std::path::Path>, out: &str| {
        let out = tmp.path().join(out);
        let mut args = vec![
            "eval".to_string(),
            "-m".into(),
            model.to_str().unwrap().into(),
            "--editor".into(),
            editor.into(),
            "--data".into(),
            data.to_str().unwrap().into(),
            "--batch-size".into(),
            "3".into(),
            "--json".into(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ];
        if let Some(h) = hparams {
            args.extend(["--hparams".into(), h.to_str().unwrap().into()]);
        }
        let summary: serde_json::Value = serde_json::from_str(&ok(&kedit(&args))).unwrap();
        let lines = std::fs::read_to_string(out).unwrap();
        (summary, lines)
    };

    // FT-M teaches the three questions to answer "I don't know.": the generations now contain it.
    let (summary, lines) = run("FT-M", None, "ftm.jsonl");
    assert_eq!(summary["cases"], 3);
    assert_eq!(summary["edit_success_pre"], 0.0);
    assert_eq!(summary["edit_success_post"], 100.0, "{summary}");
    assert_eq!(summary["locality_questions"], 6);
    for line in lines.lines() {
        let case: serde_json::Value = serde_json::from_str(line).unwrap();
        let post = case["post"]["generation"].as_str().unwrap();
        let prompt = case["requested_rewrite"]["prompt"].as_str().unwrap();
        assert!(
            post.starts_with(prompt) && post.contains("I don't know."),
            "{post:?}"
        );
    }

    // An edit that changes nothing keeps every locality answer and every hit.
    let still = tmp.path().join("lr0.yaml");
    let quick = std::fs::read_to_string(fixture("hparams/ft-l-smollm2-quick.yaml")).unwrap();
    std::fs::write(&still, quick.replace("lr: 5e-3", "lr: 0.0")).unwrap();
    let (summary, _) = run("FT-L", Some(&still), "noop.jsonl");
    assert_eq!(summary["locality"], 100.0, "{summary}");
    assert_eq!(summary["edit_success_post"], summary["edit_success_pre"]);
}

#[test]
fn a_loss_layer_outside_the_model_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let hparams = tmp.path().join("alphaedit.yaml");
    let yaml = tiny_alphaedit_yaml("./none.pt").replace("v_loss_layer: 1", "v_loss_layer: 9");
    std::fs::write(&hparams, yaml).unwrap();
    let out = kedit(&[
        "apply",
        "-m",
        fixture("tiny-gpt2").to_str().unwrap(),
        "--editor",
        "AlphaEdit",
        "--hparams",
        hparams.to_str().unwrap(),
        "--stats-dir",
        tmp.path().join("stats").to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--subject",
        "France",
        "--target",
        "Rome",
        "--no-fluency",
    ]);
    assert_one_line_error(&out, &["v_loss_layer 9"]);
}

/// `--threads` changes how products split their work, never their arithmetic: an FT-L edit, whose
/// Adam steps amplify any difference in rounding, writes the same bytes with one thread and three.
#[test]
fn an_edit_is_the_same_bits_whatever_the_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let model = smollm2_path();
    let hparams = fixture("hparams/ft-l-smollm2-quick.yaml");
    let saved: Vec<Vec<u8>> = ["1", "3"]
        .iter()
        .map(|threads| {
            let edit = tmp.path().join(format!("edit-{threads}.safetensors"));
            let mut args = vec![
                "--threads",
                threads,
                "apply",
                "-m",
                model.to_str().unwrap(),
                "--editor",
                "FT-L",
                "--hparams",
                hparams.to_str().unwrap(),
                "--no-fluency",
                "--save-edit",
                edit.to_str().unwrap(),
            ];
            args.extend(DARRIEUX_TO_ENGLISH);
            ok(&kedit(&args));
            std::fs::read(&edit).unwrap()
        })
        .collect();
    assert!(
        saved[0] == saved[1],
        "one thread and three made different edits"
    );
}

//! `kedit train` as a user runs it: a short MEND run, its JSON lines and checkpoint files, a
//! resumed run, the trained editor used by `apply`, and refusals of bad input in one line.

mod common;

use common::*;

/// A MEND training file small enough for a test: two weights of the last layer, rank 8, one
/// batch per update, validation every two updates on four held-out records.
fn training_yaml(extra: &str) -> String {
    format!(
        "alg: MEND\nmodel_name: SmolLM2-135M-Instruct\ndevice: cpu\ninner_params:\n\
         - model.layers.29.mlp.up_proj.weight\n- model.layers.29.mlp.down_proj.weight\n\
         archive: null\nlr: 1e-4\nedit_lr: 1e-4\nlr_lr: 1e-4\nseed: 42\ncedit: 0.1\ncloc: 1.0\n\
         cbase: 1.0\ndropout: 0.0\ntrain_base: False\none_sided: False\nn_hidden: 1\n\
         hidden_dim: null\ninit: id\nnorm: True\ncombine: True\nx_only: False\n\
         delta_only: False\nact: relu\nrank: 8\nmlp_class: IDMLP\nshared: True\nbatch_size: 1\n\
         val_batch_size: 2\naccumulate_bs: 1\nmax_iters: 4\nval_interval: 2\nval_steps: 4\n\
         early_stop_patience: 1000\nearly_stop_key: \"loss/total_edit_val\"\ngrad_clip: 100.\n{extra}"
    )
}

fn train_args(hparams: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let model = smollm2_path();
    let data = fixture("data/zsre_mend_train_sample.json");
    let mut args: Vec<String> = [
        "train",
        "--editor",
        "MEND",
        "-m",
        model.to_str().unwrap(),
        "--hparams",
        hparams.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn steps_of(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v["edit/acc_val"].is_number(), "{l}");
            v["step"].as_u64().unwrap()
        })
        .collect()
}

#[test]
fn train_writes_checkpoints_resumes_and_its_editor_edits() {
    let tmp = tempfile::tempdir().unwrap();
    let hparams = tmp.path().join("mend-train.yaml");
    std::fs::write(&hparams, training_yaml("")).unwrap();
    let out = tmp.path().join("run");

    let first = ok(&kedit(&train_args(&hparams, &out, &[])));
    assert_eq!(steps_of(&first), [2, 4]);
    for file in ["best.safetensors", "last.safetensors", "last.json"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let header: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("last.json")).unwrap()).unwrap();
    assert_eq!(header["progress"]["steps"], 4);
    assert_eq!(header["adam_step"], 4);

    // The same folder again is refused unless resumed; resumed, it continues at step 5.
    assert_one_line_error(
        &kedit_with_backtraces(&train_args(&hparams, &out, &[])),
        &["already holds a training run", "--resume"],
    );
    let resumed = ok(&kedit(&train_args(
        &hparams,
        &out,
        &["--resume", "--max-steps", "6"],
    )));
    assert_eq!(steps_of(&resumed), [6]);

    // `apply` loads the trained editor through the edit file's archive.
    let edit_yaml = tmp.path().join("mend.yaml");
    std::fs::write(
        &edit_yaml,
        training_yaml("alg_name: MEND\n")
            .replacen("alg: MEND\n", "", 1)
            .replace("archive: null", &format!("archive: {}", out.display())),
    )
    .unwrap();
    let model = smollm2_path();
    let patch = tmp.path().join("mend-edit.safetensors");
    let applied = ok(&kedit(&[
        "apply",
        "-m",
        model.to_str().unwrap(),
        "--editor",
        "MEND",
        "--hparams",
        edit_yaml.to_str().unwrap(),
        "--prompt",
        "The mother tongue of Danielle Darrieux is",
        "--target",
        "English",
        "--no-fluency",
        "--json",
        "--save-edit",
        patch.to_str().unwrap(),
    ]));
    let result: serde_json::Value = serde_json::from_str(&applied).unwrap();
    // The edit is a change of exactly the weights inner_params names, and replaying it as a
    // patch gives the same edited model.
    let bytes = std::fs::read(&patch).unwrap();
    let mut stored: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(String::from)
        .collect();
    stored.sort();
    assert_eq!(
        stored,
        [
            "model.layers.29.mlp.down_proj.weight",
            "model.layers.29.mlp.up_proj.weight"
        ]
    );
    let replayed: serde_json::Value = serde_json::from_str(&ok(&kedit(&[
        "apply",
        "-m",
        model.to_str().unwrap(),
        "--patch",
        patch.to_str().unwrap(),
        "--prompt",
        "The mother tongue of Danielle Darrieux is",
        "--target",
        "English",
        "--no-fluency",
        "--json",
    ])))
    .unwrap();
    assert_eq!(replayed["post"], result["post"]);
    assert_eq!(replayed["generation_after"], result["generation_after"]);

    // --archive names the editor when the file names none.
    let no_archive = tmp.path().join("no-archive.yaml");
    std::fs::write(
        &no_archive,
        training_yaml("").replacen("alg: MEND", "alg_name: MEND", 1),
    )
    .unwrap();
    let apply_with = |archive: &std::path::Path| {
        kedit_with_backtraces(&[
            "apply",
            "-m",
            model.to_str().unwrap(),
            "--editor",
            "MEND",
            "--hparams",
            no_archive.to_str().unwrap(),
            "--archive",
            archive.to_str().unwrap(),
            "--prompt",
            "The mother tongue of Danielle Darrieux is",
            "--target",
            "English",
            "--no-fluency",
            "--json",
        ])
    };
    let via_flag: serde_json::Value = serde_json::from_str(&ok(&apply_with(&out))).unwrap();
    assert_eq!(
        via_flag["post"], result["post"],
        "the same editor gives the same edit"
    );
    // An editor trained on another model is refused, naming both.
    let tiny = fixture("tiny-gpt2");
    assert_one_line_error(
        &kedit_with_backtraces(&[
            "apply",
            "-m",
            tiny.to_str().unwrap(),
            "--editor",
            "MEND",
            "--hparams",
            edit_yaml.to_str().unwrap(),
            "--prompt",
            "The mother tongue of Danielle Darrieux is",
            "--target",
            "English",
            "--max-new-tokens",
            "5",
            "--no-fluency",
        ]),
        &["trained on model", "the model here is"],
    );
    // A missing one says how to train it.
    assert_one_line_error(
        &apply_with(&tmp.path().join("never-trained")),
        &["never-trained", "kedit train --editor MEND"],
    );

    // A --val file that repeats training records is used, with a warning that counts them.
    let data = fixture("data/zsre_mend_train_sample.json");
    let overlap = kedit(&train_args(
        &hparams,
        &tmp.path().join("overlap"),
        &["--val", data.to_str().unwrap(), "--max-steps", "1"],
    ));
    assert!(overlap.status.success());
    let stderr = String::from_utf8_lossy(&overlap.stderr);
    assert!(stderr.contains("warning: 300 of 300 records"), "{stderr}");
}

#[test]
fn train_refuses_bad_input_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let hparams = tmp.path().join("mend-train.yaml");
    std::fs::write(&hparams, training_yaml("")).unwrap();
    let empty = tmp.path().join("empty");
    assert_one_line_error(
        &kedit_with_backtraces(&train_args(&hparams, &empty, &["--resume"])),
        &["--resume", "holds no checkpoint"],
    );
    assert_one_line_error(
        &kedit_with_backtraces(&train_args(
            &hparams,
            &tmp.path().join("c"),
            &["--max-minutes", "0"],
        )),
        &["--max-minutes 0", "positive"],
    );
    let separate = tmp.path().join("separate.yaml");
    std::fs::write(
        &separate,
        training_yaml("").replace("combine: True", "combine: False"),
    )
    .unwrap();
    assert_one_line_error(
        &kedit_with_backtraces(&train_args(&separate, &tmp.path().join("a"), &[])),
        &["separate.yaml", "combine: false"],
    );
    let empty_data = tmp.path().join("empty.json");
    std::fs::write(&empty_data, "[]").unwrap();
    let mut args = train_args(&hparams, &tmp.path().join("d"), &[]);
    let at = args.iter().position(|a| a == "--data").unwrap();
    args[at + 1] = empty_data.to_str().unwrap().to_string();
    assert_one_line_error(&kedit_with_backtraces(&args), &["empty.json"]);
    let unknown = tmp.path().join("unknown.yaml");
    std::fs::write(&unknown, training_yaml("learning_rate: 3\n")).unwrap();
    assert_one_line_error(
        &kedit_with_backtraces(&train_args(&unknown, &tmp.path().join("b"), &[])),
        &["unknown.yaml", "learning_rate"],
    );
    let no_archive = tmp.path().join("no-archive.yaml");
    std::fs::write(
        &no_archive,
        training_yaml("").replacen("alg: MEND", "alg_name: MEND", 1),
    )
    .unwrap();
    let model = smollm2_path();
    assert_one_line_error(
        &kedit_with_backtraces(&[
            "apply",
            "-m",
            model.to_str().unwrap(),
            "--editor",
            "MEND",
            "--hparams",
            no_archive.to_str().unwrap(),
            "--prompt",
            "The capital of France is",
            "--target",
            "Rome",
        ]),
        &["no-archive.yaml", "archive"],
    );
}

/// Ctrl-C ends a run after the update in progress with a checkpoint and exit status 130, and
/// `--resume` continues from it.
#[test]
fn ctrl_c_writes_a_checkpoint_that_resumes() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let hparams = tmp.path().join("mend-train.yaml");
    std::fs::write(
        &hparams,
        training_yaml("").replace("max_iters: 4", "max_iters: 100000"),
    )
    .unwrap();
    let out = tmp.path().join("run");
    let mut child = kedit_command()
        .args(train_args(&hparams, &out, &[]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first validation line: the run is under way.
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("\"step\":2"), "{first}");
    let killed = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "exit status after Ctrl-C");
    let header: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("last.json")).unwrap()).unwrap();
    assert_eq!(header["progress"]["interrupted"], true, "{header}");
    let stopped_at = header["progress"]["steps"].as_u64().unwrap();
    assert!(stopped_at >= 2, "{header}");
    let more = (stopped_at + 2).to_string();
    let resumed = ok(&kedit(&train_args(
        &hparams,
        &out,
        &["--resume", "--max-steps", &more],
    )));
    let header: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("last.json")).unwrap()).unwrap();
    assert_eq!(
        header["progress"]["steps"].as_u64(),
        Some(stopped_at + 2),
        "{resumed}"
    );
}

/// `kedit train --editor KE` with a small network, then `apply --editor KE --archive` with the
/// shipped SmolLM2 edit file: the trained editor edits the weights the file names.
#[test]
fn ke_trains_and_its_editor_applies_through_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let hparams = tmp.path().join("ke-train.yaml");
    std::fs::write(
        &hparams,
        "alg: KE\ninner_params:\n- model.layers.27.mlp.gate_proj.weight\n\
         - model.layers.27.mlp.up_proj.weight\n- model.layers.27.mlp.down_proj.weight\n\
         - model.layers.28.mlp.gate_proj.weight\n- model.layers.28.mlp.up_proj.weight\n\
         - model.layers.28.mlp.down_proj.weight\n- model.layers.29.mlp.gate_proj.weight\n\
         - model.layers.29.mlp.up_proj.weight\n- model.layers.29.mlp.down_proj.weight\n\
         archive: null\nlr: 1e-3\nedit_lr: 1e-2\nlr_lr: 1e-3\nseed: 42\ncedit: 0.1\ncloc: 1.0\n\
         cbase: 1.0\ndropout: 0.0\ntrain_base: False\nhidden_dim: 16\ncondition_dim: 16\n\
         batch_size: 1\nval_batch_size: 2\naccumulate_bs: 1\nmax_iters: 2\nval_interval: 2\n\
         val_steps: 4\nearly_stop_patience: 1000\nearly_stop_key: \"loss/total_edit_val\"\n\
         grad_clip: 100.\n",
    )
    .unwrap();
    let out = tmp.path().join("run");
    let mut args = train_args(&hparams, &out, &[]);
    let at = args.iter().position(|a| a == "MEND").unwrap();
    args[at] = "KE".into();
    assert_eq!(steps_of(&ok(&kedit(&args))), [2]);

    let model = smollm2_path();
    let shipped =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("hparams/KE/smollm2-135m.yaml");
    let applied = ok(&kedit(&[
        "apply",
        "-m",
        model.to_str().unwrap(),
        "--editor",
        "KE",
        "--hparams",
        shipped.to_str().unwrap(),
        "--archive",
        out.to_str().unwrap(),
        "--prompt",
        "The mother tongue of Danielle Darrieux is",
        "--target",
        "English",
        "--ground-truth",
        "French",
        "--no-fluency",
        "--json",
    ]));
    let result: serde_json::Value = serde_json::from_str(&applied).unwrap();
    assert!(result["post"]["rewrite_acc"].is_array(), "{result}");
    // A MEND file cannot load it.
    let mend_yaml =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("hparams/MEND/smollm2-135m.yaml");
    assert_one_line_error(
        &kedit_with_backtraces(&[
            "apply",
            "-m",
            model.to_str().unwrap(),
            "--editor",
            "MEND",
            "--hparams",
            mend_yaml.to_str().unwrap(),
            "--archive",
            out.to_str().unwrap(),
            "--prompt",
            "The mother tongue of Danielle Darrieux is",
            "--target",
            "English",
            "--no-fluency",
        ]),
        &["not a kedit MEND checkpoint", "trained as KE"],
    );
}

/// A checkpoint write that dies part-way never touches the checkpoint before it. A write that
/// fails (its temporary file cannot be created) stops the run with a one-line error naming that
/// file; what a killed process leaves (a truncated temporary file) is ignored and replaced; and
/// the folder resumes to the state of a run that was never interrupted.
#[test]
fn an_interrupted_checkpoint_write_leaves_the_last_checkpoint_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let hparams = tmp.path().join("mend-train.yaml");
    std::fs::write(&hparams, training_yaml("")).unwrap();
    let out = tmp.path().join("run");
    assert_eq!(
        steps_of(&ok(&kedit(&train_args(
            &hparams,
            &out,
            &["--max-steps", "2"]
        )))),
        [2]
    );
    let last = out.join("last.safetensors");
    let at_step_2 = std::fs::read(&last).unwrap();

    let partial = out.join(".last.safetensors.partial");
    std::fs::create_dir_all(partial.join("in-the-way")).unwrap();
    let failed = kedit_with_backtraces(&train_args(&hparams, &out, &["--resume"]));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(".last.safetensors.partial"), "{stderr}");
    assert!(
        std::fs::read(&last).unwrap() == at_step_2,
        "the step-2 checkpoint changed"
    );

    std::fs::remove_dir_all(&partial).unwrap();
    std::fs::write(&partial, &at_step_2[..at_step_2.len() / 2]).unwrap();
    let resumed = ok(&kedit(&train_args(&hparams, &out, &["--resume"])));
    assert_eq!(steps_of(&resumed), [4]);
    assert!(!partial.exists(), "the truncated temporary file is left");

    let straight = ok(&kedit(&train_args(
        &hparams,
        &tmp.path().join("straight"),
        &[],
    )));
    assert_eq!(
        resumed.lines().last(),
        straight.lines().last(),
        "the validation at step 4"
    );
}

/// InstructEdit trains on files tagged with their tasks, its checkpoint is an InstructEdit one,
/// and evaluation wraps the edit, rephrase and portability prompts (not the locality prompts) in
/// the instruction chosen for the run, which the run record names. Untagged files of no known
/// task, unknown tags, and instruction options for another editor are refused in one line.
#[test]
fn instructedit_trains_on_tagged_tasks_and_evaluates_with_its_instruction() {
    let tmp = tempfile::tempdir().unwrap();
    let hparams = tmp.path().join("ie-train.yaml");
    std::fs::write(&hparams, training_yaml("")).unwrap();
    let out = tmp.path().join("run");
    let model = smollm2_path();
    let counterfact = fixture("data/knowedit_wiki_counterfact_train.json");
    let recent = fixture("data/knowedit_wiki_recent_train.json");
    let train = |data: &[String], out: &std::path::Path| {
        let mut args: Vec<String> = [
            "train",
            "--editor",
            "InstructEdit",
            "-m",
            model.to_str().unwrap(),
            "--hparams",
            hparams.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-steps",
            "2",
            "--json",
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for d in data {
            args.push("--data".into());
            args.push(d.clone());
        }
        kedit_with_backtraces(&args)
    };
    let tagged = [
        format!("counterfact={}", counterfact.display()),
        format!("wikirecent={}", recent.display()),
    ];
    assert_eq!(steps_of(&ok(&train(&tagged, &out))), [2]);
    let header: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("last.json")).unwrap()).unwrap();
    assert_eq!(header["method"], "InstructEdit");

    // A file whose task cannot be told, and a tag that is no task.
    let anonymous = tmp.path().join("records.json");
    std::fs::copy(&counterfact, &anonymous).unwrap();
    assert_one_line_error(
        &train(
            &[anonymous.display().to_string()],
            &tmp.path().join("other"),
        ),
        &[
            "records.json",
            "InstructEdit needs each file's task",
            "--data counterfact=",
        ],
    );
    assert_one_line_error(
        &train(
            &[format!("recnet={}", recent.display())],
            &tmp.path().join("other"),
        ),
        &["--data recnet=", "\"recnet\" is not a task", "wikirecent"],
    );

    // Evaluation with the held-out instruction.
    let results = tmp.path().join("eval.jsonl");
    let test = fixture("data/knowedit_wiki_counterfact_test.json");
    let eval_args = |editor: &str, extra: &[&str]| {
        let mut args: Vec<String> = [
            "eval",
            "-m",
            model.to_str().unwrap(),
            "--editor",
            editor,
            "--hparams",
            hparams.to_str().unwrap(),
            "--archive",
            out.to_str().unwrap(),
            "--data",
            test.to_str().unwrap(),
            "--limit",
            "2",
            "--quiet",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    ok(&kedit(&eval_args(
        "InstructEdit",
        &["--unseen-instruction", "--out", results.to_str().unwrap()],
    )));
    let prefix = "Task: counterfact\nDescription: A dataset curated to push the boundaries of \
                  model's capabilities in recognizing and processing tail entities.\nInput: ";
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&test)
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap();
    let lines = std::fs::read_to_string(&results).unwrap();
    let cases: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(cases.len(), 2);
    for (case, record) in cases.iter().zip(&records) {
        let rewrite = &case["requested_rewrite"];
        assert_eq!(
            rewrite["prompt"].as_str().unwrap(),
            format!("{prefix}{}", record["prompt"].as_str().unwrap())
        );
        for set in rewrite["portability"].as_object().unwrap().values() {
            for p in set["prompt"].as_array().unwrap() {
                assert!(p.as_str().unwrap().starts_with(prefix), "{p}");
            }
        }
        for set in rewrite["locality"].as_object().unwrap().values() {
            for p in set["prompt"].as_array().unwrap() {
                assert!(!p.as_str().unwrap().contains("Task:"), "{p}");
            }
        }
    }
    let run_record = std::fs::read_to_string(tmp.path().join("eval.jsonl.run.json")).unwrap();
    assert!(
        run_record.contains("counterfact: A dataset curated to push"),
        "{run_record}"
    );

    // The figure of its updates on two tasks' edits: one point per edit, coloured by task.
    let figure = tmp.path().join("updates.svg");
    let zsre = fixture("data/zsre_mend_eval.json");
    let lines = ok(&kedit(&[
        "plot-updates",
        "-m",
        model.to_str().unwrap(),
        "--editor",
        &format!("InstructEdit={}", out.display()),
        "--data",
        &format!("counterfact={}", test.display()),
        "--data",
        &format!("zsre={}", zsre.display()),
        "--limit",
        "3",
        "--out",
        figure.to_str().unwrap(),
        "--json",
        "--quiet",
    ]));
    let points: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(points.len(), 6);
    assert!(points
        .iter()
        .all(|p| p["pc1"].as_f64().unwrap().is_finite()));
    let svg = std::fs::read_to_string(&figure).unwrap();
    assert_eq!(svg.matches("r=\"3.5\"").count(), 6, "{svg}");
    assert!(svg.contains(">counterfact<") && svg.contains(">zsre<"));

    // Instructions are InstructEdit's; MEND does not load an InstructEdit editor.
    assert_one_line_error(
        &kedit_with_backtraces(&eval_args("MEND", &["--task", "zsre"])),
        &["--editor MEND takes no instruction"],
    );
    assert_one_line_error(
        &kedit_with_backtraces(&eval_args("MEND", &[])),
        &["not a kedit MEND checkpoint", "trained as InstructEdit"],
    );
}

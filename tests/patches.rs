//! Edits as files: overlays and weights saved in a patch and made again on a fresh model, editor
//! state carried across processes, patches refused on the wrong model, and the stores an editor
//! shares with `kedit stats`.

mod common;

use std::sync::Arc;

use candle_core::{DType, Tensor};
use common::*;
use kedit::data::EditRequest;
use kedit::editors::registry::overlay_from_parts;
use kedit::editors::{
    build_editor, patch, Change, Edit, EditCtx, OverlayChange, Patch, WeightChange,
};
use kedit::model::{LowRankAdapter, Module, Site, WeightId};

fn adapter(model: &kedit::model::Model) -> LowRankAdapter {
    let spec = model.spec();
    let a = Tensor::arange(0f32, (2 * spec.d_mlp) as f32, model.device())
        .unwrap()
        .reshape((2, spec.d_mlp))
        .unwrap()
        .affine(1e-3, -0.1)
        .unwrap()
        .sin()
        .unwrap();
    let b = Tensor::arange(0f32, (spec.d_model * 2) as f32, model.device())
        .unwrap()
        .reshape((spec.d_model, 2))
        .unwrap()
        .affine(0.37, 0.0)
        .unwrap()
        .cos()
        .unwrap();
    LowRankAdapter { a, b, scale: 0.5 }
}

#[test]
fn a_low_rank_adapter_equals_its_merged_weight_and_removes_exactly() {
    let mut model = tiny_gpt2();
    let ids = model.encode("The capital of France is").unwrap();
    let plain = logits_alone(&model, &ids);
    let site = Site::MlpOut(1);
    let lora = adapter(&model);
    // The reference: the same update merged into the down projection, W + scale · B A.
    let down = WeightId::layer(1, Module::MlpDown);
    let w = model.weight(down).unwrap();
    let merged = (&w + (lora.b.matmul(&lora.a).unwrap() * lora.scale).unwrap()).unwrap();
    model.replace_weight(down, merged).unwrap();
    let by_weight = logits_alone(&model, &ids);
    model.replace_weight(down, w).unwrap();

    model.set_overlay(site, Some(Arc::new(lora))).unwrap();
    let by_overlay = logits_alone(&model, &ids);
    assert!(
        max_abs_diff(&plain, &by_overlay) > 1e-2,
        "the adapter changed nothing"
    );
    assert!(max_abs_diff(&by_weight, &by_overlay) < 1e-4);
    assert!(model.overlay_as::<LowRankAdapter>(site).is_some());
    model.set_overlay(site, None).unwrap();
    assert_eq!(max_abs_diff(&plain, &logits_alone(&model, &ids)), 0.0);
}

#[test]
fn an_edit_of_weights_and_overlays_saves_reloads_and_undoes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = tiny_gpt2();
    let ids = model.encode("The capital of France is").unwrap();
    let plain = logits_alone(&model, &ids);
    let base = model.fingerprint().unwrap();

    let up = WeightId::layer(0, Module::MlpUp);
    let before = model.weight(up).unwrap();
    let after = (&before * 1.5).unwrap();
    model.replace_weight(up, after.clone()).unwrap();
    let site = Site::MlpOut(1);
    let overlay: Arc<dyn kedit::model::Overlay> = Arc::new(adapter(&model));
    let displaced = model.set_overlay(site, Some(overlay.clone())).unwrap();
    let edit = Edit {
        changes: vec![
            Change::Weight(WeightChange {
                id: up,
                before,
                after,
            }),
            Change::Overlay(OverlayChange {
                site,
                before: displaced,
                after: Some(overlay),
            }),
        ],
        ..Edit::default()
    };
    let edited = logits_alone(&model, &ids);
    let file = tmp.path().join("edit.safetensors");
    patch::save(&file, &model, "test", &base, &edit, None).unwrap();

    // In a fresh model, the patch gives the same logits, bit for bit.
    let mut fresh = tiny_gpt2();
    let patch = Patch::load(&fresh, &file, &overlay_from_parts).unwrap();
    assert_eq!(patch.method(), Some("test"));
    let made = patch.edit.reapply(&mut fresh).unwrap();
    assert_eq!(max_abs_diff(&edited, &logits_alone(&fresh, &ids)), 0.0);
    // Undo goes back exactly, weights and overlay alike.
    made.undo(&mut fresh).unwrap();
    assert!(fresh.overlay(site).is_none());
    assert_eq!(max_abs_diff(&plain, &logits_alone(&fresh, &ids)), 0.0);
    edit.undo(&mut model).unwrap();
    assert_eq!(max_abs_diff(&plain, &logits_alone(&model, &ids)), 0.0);

    // On another model (one weight differs), the patch is refused, naming both fingerprints.
    let mut other = tiny_gpt2();
    let emb = WeightId::global(Module::Embed);
    let changed = (other.weight(emb).unwrap() + 1e-3).unwrap();
    other.replace_weight(emb, changed).unwrap();
    let err = Patch::load(&other, &file, &overlay_from_parts)
        .err()
        .unwrap()
        .to_string();
    let theirs = other.fingerprint().unwrap();
    assert!(
        err.contains("edit.safetensors") && err.contains(&base) && err.contains(&theirs),
        "{err}"
    );
}

fn tiny_alphaedit_hparams(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("alphaedit-tiny.yaml");
    std::fs::write(&path, tiny_alphaedit_yaml("./no-such-projector.pt")).unwrap();
    path
}

/// The tiny GPT-2 with `files` applied in order.
fn patched(files: &[&std::path::Path]) -> kedit::model::Model {
    let mut model = tiny_gpt2();
    for file in files {
        let p = Patch::load(&model, file, &overlay_from_parts).unwrap();
        p.edit.reapply(&mut model).unwrap();
    }
    model
}

fn fact(prompt: &str, subject: &str, target: &str) -> EditRequest {
    EditRequest {
        prompt: prompt.into(),
        target_new: target.into(),
        subject: Some(subject.into()),
        ..EditRequest::default()
    }
}

fn apply_args(
    model: &str,
    hparams: &std::path::Path,
    stats: &std::path::Path,
    r: &EditRequest,
) -> Vec<String> {
    [
        "apply",
        "-m",
        model,
        "--json",
        "--editor",
        "AlphaEdit",
        "--hparams",
        hparams.to_str().unwrap(),
        "--stats-dir",
        stats.to_str().unwrap(),
        "--prompt",
        &r.prompt,
        "--subject",
        r.subject.as_deref().unwrap(),
        "--target",
        &r.target_new,
        "--max-new-tokens",
        "2",
        "--no-fluency",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn alphaedit_state_in_a_patch_makes_two_processes_one_sequence() {
    let tmp = tempfile::tempdir().unwrap();
    let hparams = tiny_alphaedit_hparams(tmp.path());
    let stats = tmp.path().join("stats");
    let first = fact("The capital of France is", "France", "Rome");
    let second = fact("The capital of Germany is", "Germany", "Madrid");

    // One process: two sequential edits, the second held to the first's keys.
    let mut model = tiny_gpt2();
    let mut editor = build_editor("AlphaEdit", &hparams).unwrap();
    let ctx = EditCtx::default();
    editor
        .apply(&mut model, std::slice::from_ref(&first), &ctx)
        .unwrap();
    editor
        .apply(&mut model, std::slice::from_ref(&second), &ctx)
        .unwrap();
    let down = WeightId::layer(1, Module::MlpDown);
    let sequential = model.weight(down).unwrap();

    // Two processes: the first edit saved with its state, the second made on top of it.
    let tiny = fixture("tiny-gpt2");
    let tiny = tiny.to_str().unwrap();
    let a = tmp.path().join("a.safetensors");
    let b = tmp.path().join("b.safetensors");
    let mut args = apply_args(tiny, &hparams, &stats, &first);
    args.extend(["--save-edit".into(), a.to_str().unwrap().into()]);
    ok(&kedit(&args));
    let mut args = apply_args(tiny, &hparams, &stats, &second);
    args.extend([
        "--patch".into(),
        a.to_str().unwrap().into(),
        "--save-edit".into(),
        b.to_str().unwrap().into(),
    ]);
    ok(&kedit(&args));

    let two_processes = patched(&[&a, &b]).weight(down).unwrap();
    let scale = (&sequential - &tiny_gpt2().weight(down).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(scale > 0.0, "the edits changed nothing");
    let diff = max_abs_diff(&sequential, &two_processes);
    assert!(
        diff <= 1e-5 * scale,
        "differ by {diff} (edit scale {scale})"
    );

    // Without the first patch's state, the second edit is not held to the first's keys.
    let mut args = apply_args(tiny, &hparams, &stats, &second);
    let c = tmp.path().join("c.safetensors");
    args.extend(["--save-edit".into(), c.to_str().unwrap().into()]);
    ok(&kedit(&args));
    let unedited = tiny_gpt2().weight(down).unwrap();
    let d_alone = (patched(&[&c]).weight(down).unwrap() - &unedited).unwrap();
    let d_second = (&two_processes - patched(&[&a]).weight(down).unwrap()).unwrap();
    assert!(
        max_abs_diff(&d_alone, &d_second) > 1e-3 * scale,
        "the restored key memory made no difference"
    );

    // Patches stack only in the order they were made.
    let out = kedit(&[
        "apply",
        "-m",
        tiny,
        "--prompt",
        "x",
        "--target",
        "y",
        "--patch",
        b.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, &["b.safetensors", "was made for model"]);
}

#[test]
fn statistics_written_by_kedit_stats_are_read_by_an_editor_with_the_same_store() {
    let tmp = tempfile::tempdir().unwrap();
    let hparams = tiny_alphaedit_hparams(tmp.path());
    let stats = tmp.path().join("stats");
    let tiny = fixture("tiny-gpt2");
    let tiny = tiny.to_str().unwrap();
    let files = || -> Vec<(std::path::PathBuf, std::time::SystemTime)> {
        let mut found = Vec::new();
        for dir in std::fs::read_dir(&stats).unwrap() {
            for f in std::fs::read_dir(dir.unwrap().path()).unwrap() {
                let f = f.unwrap();
                found.push((f.path(), f.metadata().unwrap().modified().unwrap()));
            }
        }
        found.sort();
        found
    };
    ok(&kedit(&[
        "stats",
        "-m",
        tiny,
        "--layers",
        "1",
        "--samples",
        "2",
        "--context",
        "512",
        "--stats-dir",
        stats.to_str().unwrap(),
        "--quiet",
    ]));
    let written = files();
    assert_eq!(written.len(), 1, "{written:?}");
    assert!(written[0].0.to_str().unwrap().contains("ctx512"));

    let r = fact("The capital of France is", "France", "Rome");
    let mut args = apply_args(tiny, &hparams, &stats, &r);
    args.extend(["--stats-context".into(), "512".into()]);
    ok(&kedit(&args));
    // AlphaEdit adds its projector beside the statistics and leaves them as they were.
    let (projectors, moments): (Vec<_>, Vec<_>) = files()
        .into_iter()
        .partition(|(p, _)| p.to_str().unwrap().contains(".nullspace-"));
    assert_eq!(moments, written, "the editor recomputed the statistics");
    assert_eq!(projectors.len(), 1, "{projectors:?}");
    assert!(projectors[0]
        .0
        .to_str()
        .unwrap()
        .contains("ctx512.nullspace-2e-2"));

    // With another context it computes (and caches) its own: the first apply read the cache.
    ok(&kedit(&apply_args(tiny, &hparams, &stats, &r)));
    assert_eq!(files().len(), 4);
}

#[test]
fn stats_over_zero_samples_is_refused() {
    let tiny = fixture("tiny-gpt2");
    let tmp = tempfile::tempdir().unwrap();
    let out = kedit(&[
        "stats",
        "-m",
        tiny.to_str().unwrap(),
        "--layers",
        "1",
        "--samples",
        "0",
        "--stats-dir",
        tmp.path().to_str().unwrap(),
    ]);
    assert_one_line_error(&out, &["--samples"]);
}

#[test]
fn an_eval_that_fails_before_its_first_case_leaves_no_results_file() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(tiny_alphaedit_hparams(tmp.path())).unwrap();
    let wrong = fixture("torch_file/arange-2x3x4.pt");
    let hparams = tmp.path().join("wrong-projector.yaml");
    std::fs::write(
        &hparams,
        text.replace("./no-such-projector.pt", wrong.to_str().unwrap()),
    )
    .unwrap();
    let out_file = tmp.path().join("results.jsonl");
    let out = kedit(&[
        "eval",
        "-m",
        fixture("tiny-gpt2").to_str().unwrap(),
        "--editor",
        "AlphaEdit",
        "--hparams",
        hparams.to_str().unwrap(),
        "--data",
        fixture("data/counterfact_easyedit_edit.json")
            .to_str()
            .unwrap(),
        "--limit",
        "2",
        "--quiet",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, &["arange-2x3x4.pt"]);
    assert!(!out_file.exists(), "an empty results file was left behind");
    assert!(!kedit::report::jsonl::record_path(&out_file).exists());
}

/// A lifelong run stopped after 2 of 4 edits and resumed in a new process ends where the run
/// made in one go ends: the same weights and the same results and checkpoint figures. The
/// resumed process takes the first two edits and AlphaEdit's key memory from
/// OUT.edits.safetensors (so edits 3 and 4 are held to the first two's keys) instead of making
/// them again. A new run refuses to replace a saved run's edits; an unreadable one is named.
#[test]
fn a_sequential_run_stopped_and_resumed_ends_as_one_made_in_one_go() {
    stopped_and_resumed_ends_as_one_made_in_one_go("end");
}

/// As above, when each case is measured right after its edit: the first two cases' results are
/// written before the stop, and the evaluation point at 4 edits, measured by the resumed process,
/// still scores all four cases (against the pre-edit metrics the results file recorded).
#[test]
fn a_sequential_each_run_resumed_measures_its_later_points_over_every_case() {
    stopped_and_resumed_ends_as_one_made_in_one_go("each");
}

fn stopped_and_resumed_ends_as_one_made_in_one_go(protocol: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let hparams = tiny_alphaedit_hparams(tmp.path());
    let stats = tmp.path().join("stats");
    let tiny = fixture("tiny-gpt2");
    let data = fixture("data/counterfact_easyedit_edit.json");
    let run_of = |limit: &str, out: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "-m",
            tiny.to_str().unwrap(),
            "--editor",
            "AlphaEdit",
            "--hparams",
            hparams.to_str().unwrap(),
            "--stats-dir",
            stats.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--limit",
            limit,
            "--sequential",
            protocol,
            "--eval-at",
            "2,4",
            "--threads",
            "1",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        kedit_with_backtraces(&args)
    };
    let run = |out: &std::path::Path, extra: &[&str]| run_of("4", out, extra);
    let with = |out: &std::path::Path, suffix: &str| {
        let mut p = out.as_os_str().to_owned();
        p.push(suffix);
        std::path::PathBuf::from(p)
    };
    let figures = |out: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(with(out, ".lifelong.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                serde_json::json!([v["edits"], v["cases"], v["post"]])
            })
            .collect()
    };

    let whole = tmp.path().join("whole.jsonl");
    ok(&run(&whole, &["--quiet"]));

    let parts = tmp.path().join("parts.jsonl");
    let stopped = run(&parts, &["--stop-after-edits", "2"]);
    let stderr = String::from_utf8_lossy(&stopped.stderr).to_string();
    ok(&stopped);
    assert!(stderr.contains("stopped after 2 of 4 edits"), "{stderr}");
    let written_before_the_stop = if protocol == "end" { 0 } else { 2 };
    assert_eq!(
        std::fs::read_to_string(&parts).unwrap().lines().count(),
        written_before_the_stop
    );
    assert_eq!(figures(&parts).len(), 1, "the checkpoint at 2 edits");
    // The run record is written with the saved edits: a resume with other settings is refused.
    assert_one_line_error(
        &run(&parts, &["--resume", "--quiet", "--seed", "7"]),
        &["parts.jsonl", "another run"],
    );
    let resumed = run(&parts, &["--resume"]);
    let stderr = String::from_utf8_lossy(&resumed.stderr).to_string();
    ok(&resumed);
    assert!(stderr.contains("2 edits taken up from"), "{stderr}");

    let read = |p: &std::path::Path| {
        let mut lines = results_without_time(&std::fs::read_to_string(p).unwrap());
        lines.sort_by_key(|v| v["case_id"].as_u64());
        lines
    };
    assert_eq!(read(&whole).len(), 4);
    assert_eq!(read(&whole), read(&parts));
    assert_eq!(figures(&whole), figures(&parts));
    assert_eq!(figures(&parts)[1][1], 4, "cases measured at 4 edits");
    if protocol == "each" {
        return;
    }
    // A finished run is not extended: its results were taken on its last model, and the points
    // of the longer run would leave its cases out.
    let before = std::fs::read_to_string(&parts).unwrap();
    assert_one_line_error(
        &run_of("5", &parts, &["--resume", "--quiet"]),
        &["parts.jsonl", "final results", "new --out"],
    );
    assert_eq!(std::fs::read_to_string(&parts).unwrap(), before);
    let record = std::fs::read_to_string(with(&parts, ".run.json")).unwrap();
    assert!(record.contains("\"cases\": 4"), "{record}");

    let down = WeightId::layer(1, Module::MlpDown);
    let final_weight = |out: &std::path::Path| {
        patched(&[&with(out, ".edits.safetensors")])
            .weight(down)
            .unwrap()
    };
    let unedited = tiny_gpt2().weight(down).unwrap();
    let scale = max_abs_diff(&final_weight(&whole), &unedited);
    assert!(scale > 0.0, "the run changed nothing");
    let gap = max_abs_diff(&final_weight(&whole), &final_weight(&parts));
    assert!(gap <= 1e-5 * scale, "differ by {gap} (edit scale {scale})");

    // A new run does not replace the saved edits of another; a damaged file is named.
    std::fs::remove_file(&whole).unwrap();
    let saved = with(&whole, ".edits.safetensors");
    assert_one_line_error(
        &run(&whole, &["--quiet"]),
        &["whole.jsonl.edits.safetensors", "--resume"],
    );
    assert!(!whole.exists(), "a results file was started");
    assert!(saved.exists());
    std::fs::write(&parts, "").unwrap();
    std::fs::write(with(&parts, ".edits.safetensors"), b"half a file").unwrap();
    assert_one_line_error(
        &run(&parts, &["--resume", "--quiet"]),
        &["parts.jsonl.edits.safetensors", "not a kedit patch"],
    );
}

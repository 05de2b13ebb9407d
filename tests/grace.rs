//! GRACE on SmolLM2: the codebook's own mechanism (radii that replace inside and pass outside,
//! conflicts that split, same answers that widen, rollback of one edit among others) and the
//! properties an edit must have (the target becomes the argmax, missed prompts and the base
//! weights stay bit-identical, a saved codebook reloads to the same logits).

mod common;

use candle_core::Tensor;
use common::*;
use kedit::editors::memory::{Codebook, Grace, GraceParams, GraceReport};
use kedit::editors::registry::overlay_from_parts;
use kedit::editors::{patch, Change, Edit, EditCtx, Editor, OverlayChange, Patch};
use kedit::model::{HookSpec, Model, Site, TokenBatch};

const LAYER: usize = 28;

fn params() -> GraceParams {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("hparams/GRACE/smollm2-135m.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let params: GraceParams = serde_yaml::from_str(&text).unwrap();
    assert_eq!(
        params.inner_params[0],
        format!("model.layers.{LAYER}.mlp.down_proj.weight")
    );
    params
}

/// The down projection's input at a prompt's last token: the key GRACE stores, computed here
/// from a plain forward pass.
fn key_of(model: &Model, prompt: &str) -> Tensor {
    let ids = model.encode_with_special_tokens(prompt).unwrap();
    let batch = TokenBatch::new(std::slice::from_ref(&ids), 0, model.device()).unwrap();
    let hooks = HookSpec::new()
        .capture(Site::MlpAct(LAYER))
        .stop_after(LAYER);
    let out = model.forward(&batch, &hooks).unwrap();
    out.capture(Site::MlpAct(LAYER))
        .unwrap()
        .get(0)
        .unwrap()
        .get(ids.len() - 1)
        .unwrap()
}

fn distance(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn book(model: &Model) -> Codebook {
    model
        .overlay_as::<Codebook>(Site::MlpOut(LAYER))
        .cloned()
        .expect("a codebook at mlp_out")
}

fn report(edit: &Edit) -> &GraceReport {
    edit.report_as::<GraceReport>().unwrap()
}

const P1: &str = "The mother tongue of Danielle Darrieux is";
const P2: &str = "The mother tongue of Thomas Joannes Stieltjes is";

#[test]
fn an_edit_makes_the_target_the_argmax_and_leaves_missed_prompts_and_weights_bit_identical() {
    let mut model = smollm2();
    let fingerprint = model.fingerprint().unwrap();
    let unrelated = [
        "Michel Rocard is a native speaker of",
        "The capital of Japan is",
        "Apple A5 was created by",
    ];
    let before: Vec<Tensor> = unrelated
        .iter()
        .map(|p| logits_alone(&model, &model.encode_with_special_tokens(p).unwrap()))
        .collect();
    let english = first_token(&model, "English");
    assert_ne!(next_token(&model, P1), english, "the model already says it");
    let mut grace = Grace::new(params()).unwrap();
    let edit = grace
        .apply(&mut model, &[request(P1, "English")], &EditCtx::default())
        .unwrap();
    assert_eq!(next_token(&model, P1), english);
    for (p, logits) in unrelated.iter().zip(&before) {
        let after = logits_alone(&model, &model.encode_with_special_tokens(p).unwrap());
        assert_eq!(max_abs_diff(logits, &after), 0.0, "{p}: logits moved");
    }
    assert_eq!(
        model.fingerprint().unwrap(),
        fingerprint,
        "base weights changed"
    );
    assert_eq!(report(&edit).codebook_edits.len(), 1);
    // A value still tied to its training graph would send every later pass down the
    // differentiable path (slower, and rounded differently from a reloaded codebook).
    assert!(!book(&model).values.track_op());
    // Undo is exact.
    grace.undo(&mut model, &edit).unwrap();
    assert!(model.overlay(Site::MlpOut(LAYER)).is_none());
    assert_ne!(next_token(&model, P1), english);
}

/// With a radius of 3/4 of the distance between two prompts' keys, the second edit lands within
/// reach of the first entry (d ≤ 2ε) but outside its radius (d > ε): the same answer widens the
/// entry to d, another answer splits the radii to d/2 − 1e-5 and d/2, and moving_average moves
/// the key halfway.
#[test]
fn conflicting_edits_split_radii_and_same_answer_edits_widen_or_move() {
    let mut model = smollm2();
    let (k1, k2) = (key_of(&model, P1), key_of(&model, P2));
    let d = distance(&k1, &k2);
    assert!(d > 0.0);
    let mut near = params();
    near.eps = 0.75 * d as f64;
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-3 * b.abs().max(1.0);

    let mut grace = Grace::new(near.clone()).unwrap();
    let ctx = EditCtx::default();
    let first = grace
        .apply(&mut model, &[request(P1, "English")], &ctx)
        .unwrap();
    let second = grace
        .apply(&mut model, &[request(P2, "English")], &ctx)
        .unwrap();
    let widened = &report(&second).codebook_edits[0];
    assert_eq!(format!("{:?}", widened.action), "Widened");
    assert!(
        close(widened.nearest_distance.unwrap(), d),
        "{widened:?} vs {d}"
    );
    let b = book(&model);
    assert_eq!(b.len(), 1, "a same-answer edit added an entry");
    assert!(
        close(b.entries[0].radius, d),
        "radius {} vs {d}",
        b.entries[0].radius
    );
    let english = first_token(&model, "English");
    assert_eq!(next_token(&model, P1), english);
    assert_eq!(next_token(&model, P2), english);
    grace.undo(&mut model, &second).unwrap();
    grace.undo(&mut model, &first).unwrap();
    assert!(model.overlay(Site::MlpOut(LAYER)).is_none());

    grace
        .apply(&mut model, &[request(P1, "English")], &ctx)
        .unwrap();
    let conflict = grace
        .apply(&mut model, &[request(P2, "German")], &ctx)
        .unwrap();
    assert_eq!(
        format!("{:?}", report(&conflict).codebook_edits[0].action),
        "Split"
    );
    let b = book(&model);
    assert_eq!(b.len(), 2);
    assert!(close(b.entries[0].radius, d / 2.0 - 1e-5) && close(b.entries[1].radius, d / 2.0));
    assert_eq!(next_token(&model, P1), english);
    assert_eq!(next_token(&model, P2), first_token(&model, "German"));
    model.set_overlay(Site::MlpOut(LAYER), None).unwrap();

    let mut moving = near;
    moving.eps_expand = serde_yaml::from_str("moving_average").unwrap();
    let mut grace = Grace::new(moving).unwrap();
    grace
        .apply(&mut model, &[request(P1, "English")], &ctx)
        .unwrap();
    grace
        .apply(&mut model, &[request(P2, "English")], &ctx)
        .unwrap();
    let b = book(&model);
    assert_eq!(b.len(), 1);
    let halfway = ((&k1 + &k2).unwrap() * 0.5).unwrap();
    assert!(distance(&b.keys.get(0).unwrap(), &halfway) < 1e-3 * d);
}

/// Rolling back the first of three edits removes its entry only: the other two keep their
/// answers and the first prompt is back to the unedited logits.
#[test]
fn rolling_back_an_earlier_edit_leaves_the_other_entries_intact() {
    let mut model = smollm2();
    let records = [
        (P1, "English"),
        ("Apple A5 was created by", "Google"),
        ("Ferrari F40, developed by", "Microsoft"),
    ];
    let plain = logits_alone(&model, &model.encode_with_special_tokens(P1).unwrap());
    let mut grace = Grace::new(params()).unwrap();
    let ctx = EditCtx::default();
    let edits: Vec<Edit> = records
        .iter()
        .map(|(p, t)| grace.apply(&mut model, &[request(p, t)], &ctx).unwrap())
        .collect();
    let full = book(&model);
    assert_eq!(full.len(), 3);
    grace.undo(&mut model, &edits[0]).unwrap();
    let rolled = book(&model);
    assert_eq!(rolled.len(), 2);
    assert_eq!(rolled.entries, full.entries[1..].to_vec());
    let values = |b: &Codebook, rows: std::ops::Range<usize>| {
        b.values
            .narrow(0, rows.start, rows.len())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    assert_eq!(values(&rolled, 0..2), values(&full, 1..3));
    for (p, t) in &records[1..] {
        assert_eq!(next_token(&model, p), first_token(&model, t), "{p}");
    }
    let after = logits_alone(&model, &model.encode_with_special_tokens(P1).unwrap());
    assert_eq!(max_abs_diff(&plain, &after), 0.0);
}

/// Ten sequential edits, saved as one patch and made on a freshly loaded model, give the same
/// logits bit for bit.
#[test]
fn a_codebook_of_ten_edits_reloads_to_the_same_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let records = read_json("data/counterfact_easyedit_edit.json");
    let mut model = smollm2();
    let base = model.fingerprint().unwrap();
    let mut grace = Grace::new(params()).unwrap();
    let ctx = EditCtx::default();
    let prompts: Vec<String> = (0..10)
        .map(|i| records[i]["prompt"].as_str().unwrap().to_string())
        .collect();
    for (i, prompt) in prompts.iter().enumerate() {
        let target = records[i]["target_new"].as_str().unwrap();
        grace
            .apply(&mut model, &[request(prompt, target)], &ctx)
            .unwrap();
    }
    let site = Site::MlpOut(LAYER);
    let codebook = model.overlay(site).cloned();
    assert!(book(&model).len() >= 2);
    let whole = Edit {
        changes: vec![Change::Overlay(OverlayChange {
            site,
            before: None,
            after: codebook,
        })],
        ..Edit::default()
    };
    let file = tmp.path().join("grace.safetensors");
    patch::save(&file, &model, "GRACE", &base, &whole, None).unwrap();

    let mut fresh = smollm2();
    let loaded = Patch::load(&fresh, &file, &overlay_from_parts).unwrap();
    loaded.edit.reapply(&mut fresh).unwrap();
    let (a, b) = (book(&model), book(&fresh));
    assert_eq!(a.entries, b.entries);
    assert_eq!(
        a.keys.to_vec2::<f32>().unwrap(),
        b.keys.to_vec2::<f32>().unwrap()
    );
    assert_eq!(
        a.values.to_vec2::<f32>().unwrap(),
        b.values.to_vec2::<f32>().unwrap()
    );
    for prompt in prompts
        .iter()
        .take(4)
        .chain([&"The capital of Japan is".to_string()])
    {
        let ids = model.encode_with_special_tokens(prompt).unwrap();
        assert_eq!(
            max_abs_diff(&logits_alone(&model, &ids), &logits_alone(&fresh, &ids)),
            0.0,
            "{prompt}"
        );
    }
}

/// From the command line: an edit saved with `--save-edit` makes, in another process, the same
/// edited model (the same post-edit scores and greedy continuation), and `kedit patch show` says
/// what the file holds; a file that is not a patch is one line of error.
#[test]
fn a_saved_codebook_works_in_a_fresh_process_and_patch_show_describes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("grace.safetensors");
    let model = smollm2_path();
    let model = model.to_str().unwrap();
    let hparams = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/hparams/GRACE/smollm2-135m.yaml"
    );
    let common = [
        "apply", "--model", model, "--prompt", P1, "--target", "English", "--json",
    ];
    let file_arg = file.to_str().unwrap();
    let mut edit_args = common.to_vec();
    edit_args.extend([
        "--editor",
        "GRACE",
        "--hparams",
        hparams,
        "--save-edit",
        file_arg,
    ]);
    let edited: serde_json::Value = serde_json::from_str(&ok(&kedit(&edit_args))).unwrap();
    let mut load_args = common.to_vec();
    load_args.extend(["--patch", file_arg]);
    let loaded: serde_json::Value = serde_json::from_str(&ok(&kedit(&load_args))).unwrap();
    assert_eq!(edited["post"]["rewrite_acc"], serde_json::json!([1.0]));
    assert_eq!(loaded["pre"]["rewrite_acc"], edited["post"]["rewrite_acc"]);
    assert_eq!(loaded["generation_before"], edited["generation_after"]);
    assert_ne!(edited["generation_before"], edited["generation_after"]);

    let text = ok(&kedit(&["patch", "show", file_arg]));
    for needle in [
        "GRACE",
        "mlp_out.28",
        "grace_codebook",
        "1 entries",
        "\"English\"",
        "kedit 0.",
    ] {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok(&kedit(&["patch", "show", file_arg, "--json"]))).unwrap();
    assert_eq!(json["header"]["method"], "GRACE");
    assert_eq!(json["header"]["overlays"][0]["kind"], "grace_codebook");
    let shapes: Vec<&serde_json::Value> = json["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["shape"])
        .collect();
    assert!(
        shapes.contains(&&serde_json::json!([1, 1536])),
        "{shapes:?}"
    );

    let junk = tmp.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a patch").unwrap();
    assert_one_line_error(
        &kedit_with_backtraces(&["patch", "show", junk.to_str().unwrap()]),
        &["junk.safetensors", "not a kedit patch"],
    );
}

/// Lifelong editing from the command line: `--sequential end --eval-at 2,4` measures the cases
/// edited so far after the 2nd and the 4th edit; GRACE keeps every target (the first two
/// measured twice, with two more entries in the book between); a checkpoint list that is not
/// increasing, or one without --sequential, is refused in one line.
#[test]
fn eval_at_writes_one_summary_per_checkpoint_of_a_sequential_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("seq.jsonl");
    let model = smollm2_path();
    let data = fixture("data/counterfact_easyedit_edit.json");
    let hparams = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/hparams/GRACE/smollm2-135m.yaml"
    );
    let base = [
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--editor",
        "GRACE",
        "--hparams",
        hparams,
        "--data",
        data.to_str().unwrap(),
        "--limit",
        "4",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ];
    let mut args = base.to_vec();
    args.extend(["--sequential", "end", "--eval-at", "2,4"]);
    ok(&kedit(&args));
    let log = std::fs::read_to_string(tmp.path().join("seq.jsonl.lifelong.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    for (line, edits) in lines.iter().zip([2, 4]) {
        assert_eq!(line["edits"], edits);
        assert_eq!(line["cases"], edits);
        assert_eq!(line["editor"], "GRACE");
        assert_eq!(line["post"]["rewrite_acc"], 100.0, "{line}");
        assert!(line["peak_rss_kb"].as_u64().unwrap() > 0);
    }
    // The per-case results are those of a run measured only at its end, whose last point's
    // measurement they reuse (but for the seconds each edit took).
    let untimed = |path: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let mut case: serde_json::Value = serde_json::from_str(l).unwrap();
                case.as_object_mut().unwrap().remove("time");
                case
            })
            .collect()
    };
    let plain = tmp.path().join("plain.jsonl");
    let mut args = base.to_vec();
    let out_at = args.iter().position(|a| *a == "--out").unwrap() + 1;
    args[out_at] = plain.to_str().unwrap();
    args.extend(["--sequential", "end"]);
    ok(&kedit(&args));
    assert_eq!(untimed(&out), untimed(&plain));
    assert_eq!(untimed(&out).len(), 4);

    // In batches: every case carries its batch's seconds, shared per edit by its facts. GRACE
    // edits one fact per call whatever --batch-size asks; CaliNet as many as its file says.
    let calinet = tmp.path().join("calinet.yaml");
    std::fs::write(
        &calinet,
        "alg_name: CaliNet\nkb_layer: [25]\nex_size: 8\nlr: 3e-3\noptimizer: adam\n\
         num_steps: 3\nbatch_size: 2\n",
    )
    .unwrap();
    for (editor, file, batch) in [
        ("GRACE", hparams, 1),
        ("CaliNet", calinet.to_str().unwrap(), 2),
    ] {
        let batched = tmp.path().join(format!("{editor}.jsonl"));
        let mut args = base.to_vec();
        let at = |flag: &str| args.iter().position(|a| *a == flag).unwrap() + 1;
        let (out_at, editor_at, hparams_at) = (at("--out"), at("--editor"), at("--hparams"));
        args[out_at] = batched.to_str().unwrap();
        args[editor_at] = editor;
        args[hparams_at] = file;
        args.extend(["--sequential", "end", "--eval-at", "4", "--batch-size", "2"]);
        ok(&kedit(&args));
        let times: Vec<f64> = std::fs::read_to_string(&batched)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["time"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        assert_eq!(times.len(), 4);
        let calls: Vec<f64> = times.chunks(batch).map(|c| c[0]).collect();
        if batch == 2 {
            assert_eq!(
                (times[0], times[2]),
                (times[1], times[3]),
                "one time per call"
            );
        }
        let log = std::fs::read_to_string(format!("{}.lifelong.jsonl", batched.display())).unwrap();
        let line: serde_json::Value = serde_json::from_str(log.trim()).unwrap();
        assert_eq!(line["batch_size"], batch, "{line}");
        let per_edit = line["seconds_per_edit"].as_f64().unwrap();
        let want = calls.iter().sum::<f64>() / 4.0;
        assert!(
            (per_edit - want).abs() <= 1e-9 * want,
            "{editor}: {per_edit} vs {want}"
        );
    }

    for bad in [
        vec!["--eval-at", "4,2", "--sequential", "end"],
        vec!["--eval-at", "2"],
    ] {
        let mut args = base.to_vec();
        args.extend(bad);
        std::fs::remove_file(&out).ok();
        assert_one_line_error(&kedit_with_backtraces(&args), &["--eval-at"]);
    }
}

//! Sharded evaluation: `kedit eval --shard i/n` on each shard, then `kedit report`, gives what one
//! unsharded run gives; the scheduler's environment picks the shard; bad shard specs and report
//! inputs that are not one complete run are refused with one line.

mod common;

use common::*;
use std::path::{Path, PathBuf};

fn eval_args(out: &Path, limit: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "eval".into(),
        "-m".into(),
        smollm2_path().to_str().unwrap().into(),
        "--editor".into(),
        "FT-L".into(),
        "--hparams".into(),
        fixture("hparams/ft-l-smollm2-quick.yaml")
            .to_str()
            .unwrap()
            .into(),
        "--data".into(),
        fixture("data/counterfact_easyedit_edit.json")
            .to_str()
            .unwrap()
            .into(),
        "--limit".into(),
        limit.into(),
        "--quiet".into(),
        "--out".into(),
        out.to_str().unwrap().into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn shard_file(dir: &Path, i: usize, n: usize) -> PathBuf {
    dir.join(format!("r.shard-{i}-of-{n}.jsonl"))
}

fn sorted_lines(paths: &[PathBuf]) -> Vec<serde_json::Value> {
    let mut all: Vec<serde_json::Value> = paths
        .iter()
        .flat_map(|p| results_without_time(&std::fs::read_to_string(p).unwrap()))
        .collect();
    all.sort_by_key(|v| v["case_id"].as_u64().unwrap());
    all
}

/// The summary's numbers without the timing row, which no two runs share.
fn summary_without_time(json: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["summary"].as_object_mut().unwrap().remove("edit_seconds");
    v["summary"].clone()
}

#[test]
fn three_shards_reported_together_equal_one_whole_run() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole.jsonl");
    ok(&kedit(&eval_args(&whole, "5", &[])));
    let base = tmp.path().join("r.jsonl");
    for i in 0..3 {
        ok(&kedit(&eval_args(
            &base,
            "5",
            &["--shard", &format!("{i}/3")],
        )));
    }
    let shards: Vec<PathBuf> = (0..3).map(|i| shard_file(tmp.path(), i, 3)).collect();
    // Every case id modulo 3 in its own file: 0,3 / 1,4 / 2.
    let ids = |p: &Path| -> Vec<u64> {
        results_without_time(&std::fs::read_to_string(p).unwrap())
            .iter()
            .map(|v| v["case_id"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(ids(&shards[0]), vec![0, 3]);
    assert_eq!(ids(&shards[1]), vec![1, 4]);
    assert_eq!(ids(&shards[2]), vec![2]);
    assert_eq!(
        sorted_lines(&shards),
        sorted_lines(std::slice::from_ref(&whole))
    );

    let html = tmp.path().join("report.html");
    let mut report_args: Vec<String> = vec!["report".into(), "--json".into()];
    report_args.extend(shards.iter().map(|p| p.to_str().unwrap().to_string()));
    report_args.extend(["--html".into(), html.to_str().unwrap().into()]);
    let merged = ok(&kedit(&report_args));
    let single = ok(&kedit(&["report", "--json", whole.to_str().unwrap()]));
    assert_eq!(summary_without_time(&merged), summary_without_time(&single));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("5 cases from"));
    let first_prompt = results_without_time(&std::fs::read_to_string(&whole).unwrap())[0]
        ["requested_rewrite"]["prompt"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(page.contains(&first_prompt), "the page lists every case");

    // Not one complete run: a shard twice, a shard missing, a whole run among shards, a case
    // in two files.
    let report = |files: &[&Path]| {
        let mut args = vec!["report".to_string()];
        args.extend(files.iter().map(|p| p.to_str().unwrap().to_string()));
        kedit_with_backtraces(&args)
    };
    assert_one_line_error(
        &report(&[&shards[0], &shards[1], &shards[1]]),
        &["shard 1/3 is given twice"],
    );
    assert_one_line_error(
        &report(&[&shards[0], &shards[2]]),
        &["shard 1/3 is missing"],
    );
    assert_one_line_error(
        &report(&[&shards[0], &shards[1], &shards[2], &whole]),
        &["whole.jsonl", "holds a whole run"],
    );
    // A shard file whose run was cut short: its last case removed.
    let text = std::fs::read_to_string(&shards[0]).unwrap();
    let cut = tmp.path().join("cut.shard-0-of-3.jsonl");
    std::fs::write(&cut, text.lines().next().unwrap().to_string() + "\n").unwrap();
    std::fs::copy(
        kedit::report::jsonl::record_path(&shards[0]),
        kedit::report::jsonl::record_path(&cut),
    )
    .unwrap();
    assert_one_line_error(
        &report(&[&cut, &shards[1], &shards[2]]),
        &["cut.shard-0-of-3.jsonl", "holds 1 of the 2 cases"],
    );
}

#[test]
fn shards_from_another_run_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.jsonl");
    let b = tmp.path().join("b.jsonl");
    ok(&kedit(&eval_args(
        &a,
        "2",
        &["--shard", "0/2", "--seed", "1"],
    )));
    ok(&kedit(&eval_args(
        &b,
        "2",
        &["--shard", "1/2", "--seed", "2"],
    )));
    let out = kedit_with_backtraces(&[
        "report",
        tmp.path().join("a.shard-0-of-2.jsonl").to_str().unwrap(),
        tmp.path().join("b.shard-1-of-2.jsonl").to_str().unwrap(),
    ]);
    assert_one_line_error(&out, &["not from the same run", "seed"]);
}

#[test]
fn the_scheduler_environment_picks_the_shard_and_bad_specs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("r.jsonl");
    let out = kedit_command()
        .args(eval_args(&base, "2", &[]))
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "2")
        .output()
        .unwrap();
    ok(&out);
    let file = shard_file(tmp.path(), 1, 2);
    let lines = results_without_time(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["case_id"], 1);

    for (spec, needle) in [("3/3", "3/3"), ("0/0", "0/0"), ("1of3", "1of3")] {
        let out = kedit_with_backtraces(&eval_args(&base, "2", &["--shard", spec]));
        assert_one_line_error(&out, &["--shard", needle]);
    }
    let out = kedit_with_backtraces(&eval_args(&base, "2", &["--shards", "4"]));
    assert_one_line_error(&out, &["--shards 4", "without a shard index"]);
}

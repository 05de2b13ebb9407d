//! `kedit plot-lifelong`: the curves of `kedit eval --sequential --eval-at` runs, one line per
//! run (reliability, generalization and locality against the number of edits) as an SVG, and
//! the same numbers with time per edit and memory as a Markdown table on stdout.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::analysis::lines::{lines_svg, LinePanel};

#[derive(Args, Debug)]
pub struct PlotLifelongArgs {
    /// `OUT.lifelong.jsonl` files written by `kedit eval --eval-at`, one line each in the figure;
    /// NAME=FILE names the line (default: the file's editor)
    #[arg(required = true)]
    runs: Vec<String>,
    /// Where to write the figure (SVG)
    #[arg(long)]
    out: PathBuf,
    /// The figure's title
    #[arg(long, default_value = "Lifelong editing")]
    title: String,
}

struct Point {
    edits: f64,
    reliability: Option<f64>,
    generalization: Option<f64>,
    locality: Option<f64>,
    seconds_per_edit: Option<f64>,
    peak_rss_kb: Option<f64>,
}

pub fn run(args: PlotLifelongArgs) -> anyhow::Result<ExitCode> {
    let mut names = Vec::new();
    let mut runs = Vec::new();
    for run in &args.runs {
        let (name, path) = match run.split_once('=') {
            Some((name, path)) if !std::path::Path::new(run).exists() => {
                (Some(name.to_string()), PathBuf::from(path))
            }
            _ => (None, PathBuf::from(run)),
        };
        let text = std::fs::read_to_string(&path).map_err(|e| crate::Error::io(&path, e))?;
        let mut points = Vec::new();
        let mut editor = None;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let bad = |why: &str| crate::Error::file(&path, format!("line {}: {why}", i + 1));
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
            let edits = v
                .get("edits")
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| bad("no \"edits\" (not a --eval-at log?)"))?;
            let post = |k: &str| {
                v.get("post")
                    .and_then(|p| p.get(k))
                    .and_then(serde_json::Value::as_f64)
            };
            editor = editor.or_else(|| v.get("editor").and_then(|e| e.as_str()).map(String::from));
            points.push(Point {
                edits,
                reliability: post("rewrite_acc"),
                generalization: post("rephrase_acc"),
                locality: post("locality"),
                seconds_per_edit: v
                    .get("seconds_per_edit")
                    .and_then(serde_json::Value::as_f64),
                peak_rss_kb: v.get("peak_rss_kb").and_then(serde_json::Value::as_f64),
            });
        }
        if points.is_empty() {
            anyhow::bail!("{}: no checkpoints", path.display());
        }
        points.sort_by(|a, b| a.edits.total_cmp(&b.edits));
        names.push(
            name.or(editor)
                .unwrap_or_else(|| path.display().to_string()),
        );
        runs.push(points);
    }
    let panel = |title: &str, pick: fn(&Point) -> Option<f64>| LinePanel {
        title: title.into(),
        x_label: "edits".into(),
        y_label: "%".into(),
        y_range: (0.0, 100.0),
        lines: runs
            .iter()
            .map(|points| {
                points
                    .iter()
                    .filter_map(|p| Some((p.edits, pick(p)?)))
                    .collect()
            })
            .collect(),
    };
    let panels = [
        panel("reliability", |p| p.reliability),
        panel("generalization", |p| p.generalization),
        panel("locality", |p| p.locality),
    ];
    crate::files::write_atomically(
        &args.out,
        lines_svg(&args.title, &names, &panels).as_bytes(),
    )?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "| editor | edits | reliability | generalization | locality | s / edit | peak RSS (MB) |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|")?;
    let cell = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    for (name, points) in names.iter().zip(&runs) {
        for p in points {
            writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {} | {} |",
                p.edits,
                cell(p.reliability),
                cell(p.generalization),
                cell(p.locality),
                p.seconds_per_edit
                    .map_or_else(|| "-".into(), |s| format!("{s:.2}")),
                p.peak_rss_kb
                    .map_or_else(|| "-".into(), |k| format!("{:.0}", k / 1024.0)),
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

//! `kedit report`: one run's summary from its results files — a whole run's, or every shard of a
//! sharded one (`kedit eval --shard`), merged only when they are provably one run and complete —
//! as KnowEdit's table, JSON, or a self-contained HTML page.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::report::html::page;
use crate::report::merge::merge;
use crate::report::summary::summarize;

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Results files written by `kedit eval --out` (each with its `.run.json` beside it): one
    /// run's, or all shards of one run
    #[arg(required = true)]
    results: Vec<PathBuf>,
    /// Also write an HTML page: the run, the summary, figures and every case
    #[arg(long)]
    html: Option<PathBuf>,
    /// Print the summary as JSON instead of a table
    #[arg(long)]
    json: bool,
}

pub fn run(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let merged = merge(&args.results)?;
    let summary = summarize(&merged.results);
    if let Some(path) = &args.html {
        let html = page(
            merged.record.as_ref(),
            &summary,
            &merged.results,
            &merged.files,
        );
        crate::files::write_atomically(path, html.as_bytes())?;
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let value = serde_json::json!({ "run": merged.record, "summary": summary });
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        write!(out, "{}", summary.table())?;
    }
    Ok(ExitCode::SUCCESS)
}

//! `kedit patch show`: what a patch file holds, without loading a model.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::editors::patch::{summary, PatchSummary};

#[derive(Args, Debug)]
pub struct PatchArgs {
    #[command(subcommand)]
    command: PatchCommand,
}

#[derive(Subcommand, Debug)]
enum PatchCommand {
    /// Print a patch's method, model fingerprint, kedit version, changed weights, overlays
    /// (sites, kinds, entries) and editor state
    Show {
        /// A patch written by `kedit apply --save-edit` or `kedit eval --save-edit`
        file: PathBuf,
        /// Print JSON (the header and every tensor's dtype and shape)
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: PatchArgs) -> anyhow::Result<ExitCode> {
    let PatchCommand::Show { file, json } = args.command;
    let patch = summary(&file)?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&patch)?)?;
    } else {
        write!(out, "{}", describe(&file, &patch))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(file: &std::path::Path, patch: &PatchSummary) -> String {
    let shape = |name: &str| {
        patch
            .tensors
            .iter()
            .find(|t| t.name == name || t.name.ends_with(&format!(".{name}")))
            .map(|t| format!("{} {:?}", t.dtype, t.shape))
            .unwrap_or_else(|| "missing".into())
    };
    let mut text = String::new();
    let mut line = |s: String| {
        text.push_str(&s);
        text.push('\n');
    };
    let Some(h) = &patch.header else {
        line(format!(
            "{}: weights only (a patch written before patches had headers; its model is not recorded)",
            file.display()
        ));
        for t in &patch.tensors {
            line(format!("  {}: {} {:?}", t.name, t.dtype, t.shape));
        }
        return text;
    };
    line(format!("{}", file.display()));
    line(format!("  method:        {}", h.method));
    line(format!("  model:         {}", h.model_fingerprint));
    line(format!(
        "  written by:    kedit {} (patch format {})",
        h.kedit_version, h.format_version
    ));
    if h.weights.is_empty() {
        line("  weights:       none".into());
    }
    for w in &h.weights {
        line(format!("  weight:        {w} ({})", shape(w)));
    }
    for (index, o) in h.overlays.iter().enumerate() {
        let Some(kind) = &o.kind else {
            line(format!("  overlay:       {} removed", o.site));
            continue;
        };
        let tensors: Vec<String> = o
            .tensors
            .iter()
            .map(|n| format!("{n} {}", shape(&format!("kedit.overlay.{index}.{n}"))))
            .collect();
        line(format!(
            "  overlay:       {} {kind} ({})",
            o.site,
            tensors.join(", ")
        ));
        if let Some(entries) = o.header.get("entries").and_then(|e| e.as_array()) {
            line(format!("    {} entries", entries.len()));
            for (i, e) in entries.iter().enumerate() {
                let radius = e.get("radius").and_then(|r| r.as_f64()).unwrap_or(f64::NAN);
                let answer = e.get("answer").and_then(|a| a.as_str()).unwrap_or("");
                line(format!(
                    "    {i:>4}  radius {radius:>9.4}  answer {answer:?}"
                ));
            }
        }
    }
    if let Some(state) = &h.state {
        line(format!("  editor state:  {} tensors", state.tensors.len()));
    }
    text
}

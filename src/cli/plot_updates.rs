//! `kedit plot-updates`: the principal components of trained editors' updates on edits of several
//! tasks, one panel per editor (InstructEdit's Fig. 4: multi-task MEND beside InstructEdit).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::ModelArgs;
use crate::analysis::scatter::{scatter_svg, ScatterPanel};
use crate::analysis::update_pca::{cosines, gram, principal_components};
use crate::data::instructions::{Instructions, Task};
use crate::data::{read_dataset, EditRequest};
use crate::editors::hypernet::checkpoint::load;
use crate::editors::hypernet::instructedit::InstructEdit;
use crate::editors::hypernet::ke::Ke;
use crate::editors::hypernet::mend::Mend;
use crate::editors::hypernet::{trained_changes, EditText, Hypernet};
use crate::model::{LowRankChange, Model};

#[derive(Args, Debug)]
pub struct PlotUpdatesArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A trained editor, one panel each, in order: METHOD=DIR (MEND, KE or InstructEdit, and a
    /// `kedit train --out` folder or checkpoint file)
    #[arg(long = "editor", required = true, value_parser = parse_editor)]
    editors: Vec<(String, PathBuf)>,
    /// Edit records of one task, TASK=FILE (convsent, counterfact, wikirecent, zsre); repeat per
    /// task. Use records the editors were not trained on
    #[arg(long, required = true)]
    data: Vec<String>,
    /// Edits per task
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Where to write the figure (SVG)
    #[arg(long)]
    out: PathBuf,
    /// Scale every update to unit norm first (the components of the updates' cosines): the figure
    /// then shows where updates point, not how large they are
    #[arg(long)]
    normalise: bool,
    /// Print each edit's coordinates as JSON lines on stdout
    #[arg(long)]
    json: bool,
    /// No progress bar
    #[arg(long, short)]
    quiet: bool,
}

fn parse_editor(text: &str) -> Result<(String, PathBuf), String> {
    let (method, path) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected METHOD=DIR, e.g. InstructEdit=runs/ie"))?;
    match method {
        "MEND" | "KE" | "InstructEdit" => Ok((method.to_string(), PathBuf::from(path))),
        other => Err(format!(
            "{other:?}: the trained editors are MEND, KE and InstructEdit"
        )),
    }
}

pub fn run(args: PlotUpdatesArgs) -> anyhow::Result<ExitCode> {
    if args.limit == 0 {
        anyhow::bail!("--limit must be at least 1");
    }
    let mut records: Vec<(Task, EditRequest)> = Vec::new();
    let mut tasks: Vec<Task> = Vec::new();
    for tagged in &args.data {
        let (task, path) = tagged
            .split_once('=')
            .and_then(|(t, p)| Some((Task::parse(t)?, PathBuf::from(p))))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--data {tagged}: expected TASK=FILE with TASK one of {}",
                    Task::ALL.map(Task::name).join(", ")
                )
            })?;
        if tasks.contains(&task) {
            anyhow::bail!("--data {tagged}: task {task} is given twice");
        }
        tasks.push(task);
        let ds = read_dataset(&path, None)?;
        records.extend(
            ds.cases
                .into_iter()
                .take(args.limit)
                .map(|(_, r)| (task, r)),
        );
    }
    let model = args.model.load()?;
    let instructions = Instructions::builtin()?;
    let bar = (!args.quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new((records.len() * args.editors.len()) as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("updates [{bar:40}] {pos}/{len} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let tick = || {
        if let Some(bar) = &bar {
            bar.inc(1);
        }
    };
    let mut panels = Vec::with_capacity(args.editors.len());
    let mut stdout = std::io::stdout().lock();
    for (method, archive) in &args.editors {
        let changes = match method.as_str() {
            "MEND" => updates_of::<Mend>(&model, archive, &records, None, &tick)?,
            "KE" => updates_of::<Ke>(&model, archive, &records, None, &tick)?,
            _ => updates_of::<InstructEdit>(&model, archive, &records, Some(&instructions), &tick)?,
        };
        let mut inner = gram(&changes)?;
        if args.normalise {
            inner = cosines(&inner)?;
        }
        let (coords, shares) = principal_components(&inner, 2)?;
        if args.json {
            for ((task, r), c) in records.iter().zip(&coords) {
                let line = serde_json::json!({
                    "editor": method, "archive": archive, "task": task.name(),
                    "prompt": r.prompt, "target_new": r.target_new, "pc1": c[0], "pc2": c[1],
                });
                writeln!(stdout, "{line}")?;
            }
        }
        panels.push(ScatterPanel {
            title: match archive.file_name() {
                Some(name) => format!("{method} ({})", name.to_string_lossy()),
                None => method.clone(),
            },
            x_label: format!("PC1 ({:.0}% of the variance)", 100.0 * shares[0]),
            y_label: format!(
                "PC2 ({:.0}%)",
                100.0 * shares.get(1).copied().unwrap_or(0.0)
            ),
            points: records
                .iter()
                .zip(&coords)
                .map(|((task, _), c)| {
                    let group = tasks.iter().position(|t| t == task).unwrap_or(0);
                    (c[0], c[1], group)
                })
                .collect(),
        });
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let names: Vec<String> = tasks.iter().map(|t| t.name().to_string()).collect();
    let svg = scatter_svg(
        "Principal components of the editors' updates, by task",
        &names,
        &panels,
    );
    crate::files::write_atomically(&args.out, svg.as_bytes())?;
    if !args.quiet {
        eprintln!(
            "kedit: {} edits of {} tasks through {} editors; figure in {}",
            records.len(),
            tasks.len(),
            panels.len(),
            args.out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Each record's update by the editor in `archive`: the change to every edited weight, as factors.
/// With `instructions`, each edit prompt is wrapped as in training (the record's own draw from
/// its task's training descriptions).
fn updates_of<H: Hypernet>(
    model: &Model,
    archive: &std::path::Path,
    records: &[(Task, EditRequest)],
    instructions: Option<&Instructions>,
    tick: &dyn Fn(),
) -> anyhow::Result<Vec<Vec<LowRankChange>>> {
    let mut editor: H = load(model, archive)?;
    let seed = editor.training().seed;
    let mut all = Vec::with_capacity(records.len());
    for (task, r) in records {
        let prompt = match instructions {
            Some(inst) => inst.wrap_for_training(*task, seed, r, &r.prompt),
            None => r.prompt.clone(),
        };
        let text = EditText {
            prompt,
            ..EditText::of(r)
        };
        let changes = trained_changes(&mut editor, model, &[text])?;
        all.push(changes);
        tick();
    }
    Ok(all)
}

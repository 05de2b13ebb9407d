use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, ValueEnum};

use super::{InstructionArgs, ModelArgs, StoreArgs};
use crate::data::{read_dataset, Format};
use crate::editors::{build_editor_with_archive, default_hparams, EditCtx};
use crate::eval::case::{CaseResult, MeasureOptions};
use crate::eval::sentiment::SentimentProtocol;
use crate::eval::{PhaseMetrics, Scoring};
use crate::report::jsonl::{file_sha256, ResultsSink, RunRecord};
use crate::report::summary::summarize;
use crate::run::sanitation::{self, SanitationObserver, SanitationOptions};
use crate::run::shard::Shard;
use crate::run::{run_cases, Checkpointing, EvalPoint, Observer, Protocol, RunEnd, RunOptions};

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    stores: StoreArgs,
    #[command(flatten)]
    instruction: InstructionArgs,
    /// Editing method (FT takes FT-L or FT-M from the hparams file)
    #[arg(long, value_parser = super::editor_parser())]
    editor: String,
    /// EasyEdit hyperparameter YAML (default: hparams/<METHOD>/<model>.yaml for known models)
    #[arg(long)]
    hparams: Option<PathBuf>,
    /// A trained editor's checkpoint (MEND, KE: a `kedit train --out` folder or a .safetensors
    /// in it), instead of the hparams file's `archive:`
    #[arg(long)]
    archive: Option<PathBuf>,
    /// Benchmark file (KnowEdit, CounterFact, ZsRE layouts)
    #[arg(long)]
    data: PathBuf,
    /// Force the record layout instead of detecting it
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Evaluate at most N records
    #[arg(long)]
    limit: Option<usize>,
    /// Skip the first N records
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Evaluate one shard of the selected cases: `i/n` keeps those whose case id is i modulo n,
    /// and --out's file becomes OUT.shard-i-of-n.jsonl (`kedit report` merges the shards).
    /// Default: from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, or JOB_COMPLETION_INDEX with
    /// --shards
    #[arg(long)]
    shard: Option<String>,
    /// The number of shards of a Kubernetes Indexed Job (its `completions`); the index comes
    /// from JOB_COMPLETION_INDEX
    #[arg(long)]
    shards: Option<usize>,
    /// Requests per edit call (batch editing)
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Keep edits (lifelong editing): evaluate each case right after its edit (`each`, EasyEdit
    /// today) or every case after the last edit (`end`, the published lifelong protocol)
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "each")]
    sequential: Option<SequentialArg>,
    /// With --sequential: after these numbers of edits (comma-separated, ascending), measure every
    /// case edited so far and append the summary, seconds per edit and memory to
    /// OUT.lifelong.jsonl (lifelong editing's curves; `kedit plot-lifelong` draws them)
    #[arg(long, value_delimiter = ',', requires = "out")]
    eval_at: Vec<usize>,
    /// With --sequential and --out: save the edits so far to OUT.edits.safetensors after every N
    /// edits (and at each --eval-at point and at the end), so that --resume carries on from
    /// there instead of editing again; the file is a patch of all the run's edits. 0: never
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,
    /// With --sequential: stop once N cases have been edited in all, their edits saved (a later
    /// --resume continues), e.g. to split a long lifelong run into scheduler-sized jobs
    #[arg(long)]
    stop_after_edits: Option<usize>,
    /// Scoring of reliability, generalization and portability: teacher-forced token accuracy
    /// (EasyEdit's default), perplexity of the target (`ppl`), or greedy generation compared with
    /// the answer (`gen-em`, EasyEdit's GRACE protocol)
    #[arg(long, value_enum, default_value_t = MetricArg::Token)]
    metric: MetricArg,
    /// With --metric gen-em: score `" " + answer` (EasyEdit scores the answer without the space,
    /// which byte-level BPE models never generate)
    #[arg(long)]
    gen_em_leading_space: bool,
    /// Also measure fluency: n-gram entropy of a top-5 sample of 100 tokens (prompt included),
    /// seeded with --seed, pre and post
    #[arg(long)]
    fluency: bool,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// ConvSent: score es/dd against the unedited model, with next-token labels and each row's
    /// own question mask (EasyEdit compares the edited model with itself, so its dd is 0)
    #[arg(long)]
    convsent_corrected: bool,
    /// Score rewrite, rephrase and portability prompts wrapped in the model's chat template
    /// (EasyEdit's use_chat_template; also read from the hparams file)
    #[arg(long)]
    chat_template: bool,
    /// Write one JSON line per case here (default: stdout)
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue a run whose --out file already holds some cases
    #[arg(long, requires = "out")]
    resume: bool,
    /// Print the summary as JSON on stdout instead of a table on stderr
    #[arg(long)]
    json: bool,
    /// No progress bar and no summary table
    #[arg(long, short)]
    quiet: bool,
    /// Sanitation: edit only the questions whose answer is this (cheese, birds, paris,
    /// "julius caesar", finland), as the script's --specify_answer; default all
    #[arg(long)]
    sanitation_answer: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MetricArg {
    Token,
    Ppl,
    GenEm,
}

impl MetricArg {
    pub fn scoring(self, leading_space: bool) -> Scoring {
        match self {
            MetricArg::Token => Scoring::TokenAccuracy,
            MetricArg::Ppl => Scoring::Perplexity,
            MetricArg::GenEm => Scoring::GenerationMatch { leading_space },
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SequentialArg {
    Each,
    End,
}

/// Streams each case to the results sink and keeps it for the summary.
struct Sink {
    out: ResultsSink,
    results: Vec<CaseResult>,
    bar: Option<indicatif::ProgressBar>,
    lifelong: Option<LifelongLog>,
    /// The saved edits' file, when resuming from it is worth a line on stderr.
    resumed_note: Option<String>,
}

/// `--eval-at`'s file: one JSON line per checkpoint, appended and flushed as it is measured.
struct LifelongLog {
    path: PathBuf,
    file: std::fs::File,
    editor: String,
}

impl LifelongLog {
    fn line(&mut self, at: EvalPoint, results: &[CaseResult]) -> crate::Result<()> {
        let summary = summarize(results);
        let memory = crate::files::process_memory_kb();
        let line = serde_json::json!({
            "editor": self.editor,
            "edits": at.edits,
            "cases": summary.cases,
            "batch_size": at.batch_size,
            "post": summary.post,
            // Per fact: a batch's seconds are shared by its facts.
            "seconds_per_edit": (at.edits > 0).then(|| at.edit_seconds / at.edits as f64),
            "elapsed_seconds": at.elapsed_seconds,
            "rss_kb": memory.map(|m| m.0),
            "peak_rss_kb": memory.map(|m| m.1),
        });
        writeln!(self.file, "{line}")
            .and_then(|()| self.file.flush())
            .map_err(|e| crate::Error::io(&self.path, e))
    }
}

impl Observer for Sink {
    fn case_done(&mut self, result: CaseResult) -> crate::Result<()> {
        self.out.write(&result)?;
        self.results.push(result);
        Ok(())
    }

    fn progress(&mut self, stage: &'static str, done: usize, total: usize) {
        show_progress(self.bar.as_ref(), stage, done, total);
    }

    fn eval_point(&mut self, at: EvalPoint, results: Vec<CaseResult>) -> crate::Result<()> {
        match &mut self.lifelong {
            Some(log) => log.line(at, &results),
            None => Ok(()),
        }
    }

    fn saved(&mut self, _edits: usize) -> crate::Result<()> {
        self.out.start()
    }

    fn resumed(&mut self, edits: usize) {
        if let Some(note) = &self.resumed_note {
            eprintln!("kedit: {edits} edits taken up from {note}");
        }
    }
}

fn show_progress(
    bar: Option<&indicatif::ProgressBar>,
    stage: &'static str,
    done: usize,
    total: usize,
) {
    if let Some(bar) = bar {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(stage);
    }
}

struct SanitationSink {
    out: ResultsSink,
    bar: Option<indicatif::ProgressBar>,
}

impl SanitationObserver for SanitationSink {
    fn case_done(&mut self, case: &crate::eval::sanitation::SanitationCase) -> crate::Result<()> {
        self.out.write(case)
    }

    fn progress(&mut self, stage: &'static str, done: usize, total: usize) {
        show_progress(self.bar.as_ref(), stage, done, total);
    }
}

fn progress_bar(args: &EvalArgs, len: usize) -> Option<indicatif::ProgressBar> {
    (!args.quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(len as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>5} [{bar:40}] {pos}/{len} {elapsed}<{eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    })
}

/// Sanitation is one experiment over all selected questions (edits kept, judged at the end), so
/// it is not resumable: an interrupted run is started again.
fn run_sanitation(
    args: &EvalArgs,
    run: Run<'_>,
    locality: &crate::data::PromptSet,
    record: RunRecord,
) -> anyhow::Result<ExitCode> {
    let out = match &args.out {
        Some(path) => {
            if args.resume {
                bail!(
                    "{}: a Sanitation run cannot be resumed (its edits are judged together); start it again with another --out",
                    path.display()
                );
            }
            ResultsSink::create(path, record)?
        }
        None => ResultsSink::stdout(record),
    };
    let mut sink = SanitationSink {
        out,
        bar: progress_bar(args, run.cases.len() + locality.prompt.len()),
    };
    let opts = SanitationOptions {
        batch_size: args.batch_size,
        fluency_seed: args.fluency.then_some(args.seed),
    };
    let summary = sanitation::run(
        run.model, run.editor, &run.cases, locality, &opts, &run.ctx, &mut sink,
    )?;
    if let Some(bar) = &sink.bar {
        bar.finish_and_clear();
    }
    if args.json {
        let mut stdout = std::io::stdout().lock();
        serde_json::to_writer(&mut stdout, &summary)?;
        writeln!(stdout)?;
    } else if !args.quiet {
        eprint!(
            "{} on {} ({}), Sanitation protocol\n{}",
            run.editor.name(),
            args.data.display(),
            run.hparams.display(),
            summary.table()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What one evaluation runs on.
struct Run<'a> {
    model: &'a mut crate::model::Model,
    editor: &'a mut dyn crate::editors::Editor,
    cases: Vec<(usize, crate::data::EditRequest)>,
    ctx: EditCtx,
    hparams: &'a Path,
}

pub fn run(mut args: EvalArgs) -> anyhow::Result<ExitCode> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if !args.eval_at.is_empty() {
        if args.sequential.is_none() {
            bail!("--eval-at measures edits that accumulate: add --sequential (each or end)");
        }
        if args.eval_at[0] == 0 || args.eval_at.windows(2).any(|w| w[0] >= w[1]) {
            bail!(
                "--eval-at {:?}: expected increasing edit counts from 1, e.g. 10,100,1000",
                args.eval_at
            );
        }
    }
    if args.sequential.is_none() && args.stop_after_edits.is_some() {
        bail!(
            "--stop-after-edits stops a run whose edits accumulate: add --sequential (each or end)"
        );
    }
    if args.stop_after_edits.is_some() && (args.out.is_none() || args.checkpoint_every == 0) {
        bail!("--stop-after-edits saves the edits to take them up again: it needs --out, and a --checkpoint-every above 0");
    }
    if args.stop_after_edits == Some(0) {
        bail!("--stop-after-edits 0: expected at least 1 edit");
    }
    let shard = match &args.shard {
        Some(spec) => Some(Shard::parse(spec)?),
        None => Shard::from_env(|k| std::env::var(k).ok(), args.shards)?,
    };
    if shard.is_some() && args.sequential.is_some() {
        bail!(
            "--shard with --sequential: sequential edits accumulate over all cases in one process"
        );
    }
    if let (Some(shard), Some(out)) = (shard, &args.out) {
        args.out = Some(shard.file_name(out));
    }
    let saving = sequential_saving(&args)?;
    let dataset = read_dataset(&args.data, args.format)?;
    let instruction = args
        .instruction
        .instruction(&args.editor, Some((&args.data, dataset.format)))?;
    let shared_locality = dataset.shared_locality;
    if shard.is_some() && shared_locality.is_some() {
        bail!("--shard: KnowEdit's Sanitation protocol scores one shared locality set and is not sharded");
    }
    let cases: Vec<_> = dataset
        .cases
        .into_iter()
        .filter(|(_, r)| match &args.sanitation_answer {
            Some(answer) => r
                .ground_truth
                .as_deref()
                .is_some_and(|gt| gt.eq_ignore_ascii_case(answer)),
            None => true,
        })
        .skip_while(|(i, _)| *i < args.offset)
        .take(args.limit.unwrap_or(usize::MAX))
        .collect();
    let selected = cases.len();
    let cases: Vec<_> = match shard {
        Some(shard) => cases
            .into_iter()
            .filter(|(i, _)| shard.contains(*i))
            .collect(),
        None => cases,
    };
    // InstructEdit's instruction goes around the edit, rephrase and portability prompts before
    // anything is measured, so pre-edit scores see the same inputs (as EasyEdit's test script).
    let cases: Vec<_> = match &instruction {
        Some((task, description)) => {
            let instructions = crate::data::instructions::Instructions::builtin()?;
            cases
                .into_iter()
                .map(|(i, r)| (i, instructions.wrap_request(*task, description, &r)))
                .collect()
        }
        None => cases,
    };
    if cases.is_empty() {
        bail!(
            "{}: no records to evaluate after --offset {}, --limit and --sanitation-answer",
            args.data.display(),
            args.offset
        );
    }
    // A file given by name is read before the model: a bad field should not wait for a 13 GB load.
    let named_editor = match &args.hparams {
        Some(p) => Some(build_editor_with_archive(
            &args.editor,
            p,
            args.archive.as_deref(),
        )?),
        None => None,
    };
    let mut model = args.model.load()?;
    let hparams = match &args.hparams {
        Some(p) => p.clone(),
        None => {
            let found = default_hparams(&args.editor, model.spec(), &super::hparams_roots())?;
            if !args.quiet {
                eprintln!("kedit: using {}", found.display());
            }
            found
        }
    };
    let mut editor = match named_editor {
        Some(editor) => editor,
        None => build_editor_with_archive(&args.editor, &hparams, args.archive.as_deref())?,
    };
    let protocol = match args.sequential {
        None => Protocol::Single,
        Some(SequentialArg::Each) => Protocol::SequentialEvalEach,
        Some(SequentialArg::End) => Protocol::SequentialEvalAtEnd,
    };
    let chat_template =
        args.chat_template || crate::editors::hparams::wants_chat_template(&hparams)?;
    let record = RunRecord {
        editor: args.editor.clone(),
        hparams_sha256: file_sha256(&hparams)?,
        data_sha256: file_sha256(&args.data)?,
        model: model.fingerprint()?,
        seed: args.seed,
        protocol: if shared_locality.is_some() {
            "sanitation".into()
        } else {
            protocol.name().into()
        },
        batch_size: args.batch_size,
        metric: format!("{:?}", args.metric.scoring(args.gen_em_leading_space)),
        fluency: args.fluency,
        chat_template,
        convsent_corrected: args.convsent_corrected,
        instruction: instruction.map(|(task, description)| format!("{task}: {description}")),
        shard: shard.map(|s| s.to_string()),
        cases: Some(cases.len()),
        selected_cases: shard.map(|_| selected),
        kedit_version: env!("CARGO_PKG_VERSION").into(),
    };
    let ctx = args.stores.ctx(args.seed);
    if let Some(locality) = &shared_locality {
        let run = Run {
            model: &mut model,
            editor: editor.as_mut(),
            cases,
            ctx,
            hparams: &hparams,
        };
        return run_sanitation(&args, run, locality, record);
    }

    let (out, previous) = match &args.out {
        Some(path) if args.resume => {
            let (sink, previous, warnings) = ResultsSink::resume(path, record)?;
            if !args.quiet {
                for warning in warnings {
                    eprintln!("{warning}");
                }
            }
            (sink, previous)
        }
        Some(path) => (ResultsSink::create(path, record)?, Vec::new()),
        None => (ResultsSink::stdout(record), Vec::new()),
    };
    let done: BTreeMap<usize, PhaseMetrics> = previous
        .iter()
        .map(|r| (r.case_id, r.pre.clone()))
        .collect();
    let bar = progress_bar(&args, cases.len());
    let (lifelong, eval_points) = lifelong_log(&args, editor.name())?;
    let mut sink = Sink {
        out,
        results: previous,
        bar,
        lifelong,
        resumed_note: saving
            .as_ref()
            .filter(|_| !args.quiet)
            .map(|s| s.path.display().to_string()),
    };
    let opts = RunOptions {
        batch_size: args.batch_size,
        protocol,
        measure: MeasureOptions {
            scoring: args.metric.scoring(args.gen_em_leading_space),
            fluency_seed: args.fluency.then_some(args.seed),
            sentiment: if args.convsent_corrected {
                SentimentProtocol::Corrected
            } else {
                SentimentProtocol::AsPublished
            },
            chat_template,
        },
        eval_points,
        saving: saving.clone(),
        stop_after: args.stop_after_edits,
    };
    let end = run_cases(
        &mut model,
        editor.as_mut(),
        &cases,
        &done,
        &opts,
        &ctx,
        &mut sink,
    )?;
    if let Some(bar) = &sink.bar {
        bar.finish_and_clear();
    }
    if let (RunEnd::Stopped { edits }, Some(saving)) = (end, &saving) {
        if !args.quiet {
            eprintln!(
                "kedit: stopped after {edits} of {} edits, saved in {}; continue with --resume",
                cases.len(),
                saving.path.display()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let summary = summarize(&sink.results);
    if args.json {
        if !args.quiet {
            for warning in summary.warnings() {
                eprintln!("{warning}");
            }
        }
        let mut stdout = std::io::stdout().lock();
        serde_json::to_writer(&mut stdout, &summary)?;
        writeln!(stdout)?;
    } else if !args.quiet {
        eprint!(
            "{} on {} ({})\n{}",
            editor.name(),
            args.data.display(),
            hparams.display(),
            summary.table()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Where a sequential run with --out saves its edits: OUT.edits.safetensors. A new run does not
/// replace a file left there (only --resume takes it up).
fn sequential_saving(args: &EvalArgs) -> anyhow::Result<Option<Checkpointing>> {
    let Some(out) = args
        .out
        .as_ref()
        .filter(|_| args.sequential.is_some() && args.checkpoint_every > 0)
    else {
        return Ok(None);
    };
    let mut path = out.clone().into_os_string();
    path.push(".edits.safetensors");
    let path = PathBuf::from(path);
    if !args.resume && path.exists() {
        bail!(
            "{}: a sequential run's saved edits are already there; continue that run with --resume, or remove the file",
            path.display()
        );
    }
    Ok(Some(Checkpointing {
        path,
        every: args.checkpoint_every,
        resume: args.resume,
    }))
}

/// `--eval-at`'s log and the evaluation points still to measure (a resumed run skips those its log
/// already holds).
fn lifelong_log(
    args: &EvalArgs,
    editor: &str,
) -> anyhow::Result<(Option<LifelongLog>, Vec<usize>)> {
    let Some(out) = args.out.as_ref().filter(|_| !args.eval_at.is_empty()) else {
        return Ok((None, Vec::new()));
    };
    let mut path = out.clone().into_os_string();
    path.push(".lifelong.jsonl");
    let path = PathBuf::from(path);
    let mut written = BTreeSet::new();
    if args.resume && path.exists() {
        let text = std::fs::read_to_string(&path).map_err(|e| crate::Error::io(&path, e))?;
        for (i, line) in text.lines().enumerate() {
            let value: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| crate::Error::file(&path, format!("line {}: {e}", i + 1)))?;
            if let Some(edits) = value.get("edits").and_then(serde_json::Value::as_u64) {
                written.insert(edits as usize);
            }
        }
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(args.resume)
        .write(true)
        .truncate(!args.resume)
        .open(&path)
        .map_err(|e| crate::Error::io(&path, e))?;
    let todo = args
        .eval_at
        .iter()
        .copied()
        .filter(|k| !written.contains(k))
        .collect();
    Ok((
        Some(LifelongLog {
            path,
            file,
            editor: editor.to_string(),
        }),
        todo,
    ))
}

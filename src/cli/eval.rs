use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};

use super::ModelArgs;
use crate::data::{read_dataset, Format};
use crate::editors::{build_editor, default_hparams, EditCtx};
use crate::eval::runner::{run_cases, CaseResult, Observer, Protocol, RunOptions};
use crate::eval::sentiment::SentimentProtocol;
use crate::eval::summary::summarize;
use crate::eval::Scoring;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Editing method: FT-L, FT-M (FT takes the objective from the hparams file)
    #[arg(long)]
    editor: String,
    /// EasyEdit hyperparameter YAML (default: hparams/<METHOD>/<model>.yaml for known models)
    #[arg(long)]
    hparams: Option<PathBuf>,
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
    /// Requests per edit call (batch editing)
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Keep edits (lifelong editing): evaluate each case right after its edit (`each`, EasyEdit
    /// today) or every case after the last edit (`end`, the published lifelong protocol)
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "each")]
    sequential: Option<SequentialArg>,
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

/// One JSON line, written in one call and flushed: an interrupted run leaves whole lines (and at
/// worst one partial last line, which --resume drops).
fn write_line(out: &mut dyn Write, value: &impl serde::Serialize) -> crate::Result<()> {
    let mut line = serde_json::to_string(value)
        .map_err(|e| crate::Error::Invalid(format!("cannot serialise a result: {e}")))?;
    line.push('\n');
    out.write_all(line.as_bytes())
        .and_then(|_| out.flush())
        .map_err(|e| crate::Error::io("results", e))
}

struct Sink {
    out: Box<dyn Write>,
    results: Vec<CaseResult>,
    bar: Option<indicatif::ProgressBar>,
}

impl Observer for Sink {
    fn case_done(&mut self, result: CaseResult) -> crate::Result<()> {
        write_line(self.out.as_mut(), &result)?;
        self.results.push(result);
        Ok(())
    }

    fn progress(&mut self, stage: &'static str, done: usize, total: usize) {
        if let Some(bar) = &self.bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(stage);
        }
    }
}

/// Reads the cases an earlier run wrote, dropping a partial last line (an interrupted write).
fn read_previous(path: &Path) -> anyhow::Result<Vec<CaseResult>> {
    let file = File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut results = Vec::new();
    let mut good_bytes = 0u64;
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    let mut n = 0;
    loop {
        line.clear();
        let read = reader.read_line(&mut line)?;
        if read == 0 {
            break;
        }
        n += 1;
        if !line.ends_with('\n') {
            break;
        }
        let result: CaseResult = serde_json::from_str(&line)
            .with_context(|| format!("{} line {n}: not a kedit result", path.display()))?;
        results.push(result);
        good_bytes += read as u64;
    }
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(good_bytes)?;
    Ok(results)
}

fn open_results(path: &Path) -> anyhow::Result<Box<dyn Write>> {
    Ok(Box::new(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{}", path.display()))?,
    ))
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
    cases: Vec<(usize, crate::data::EditRequest)>,
    locality: &crate::data::PromptSet,
    model: &mut crate::model::Model,
    editor: &mut dyn crate::editors::Editor,
    hparams: &Path,
) -> anyhow::Result<ExitCode> {
    use crate::eval::sanitation::{self, SanitationOptions};
    let mut out: Box<dyn Write> = match &args.out {
        Some(path) => {
            if path.exists() && std::fs::metadata(path)?.len() > 0 {
                bail!(
                    "{} already holds results, and a Sanitation run cannot be resumed (its edits are judged together); choose another --out",
                    path.display()
                );
            }
            open_results(path)?
        }
        None => Box::new(std::io::stdout()),
    };
    let bar = progress_bar(args, cases.len() + locality.prompt.len());
    let opts = SanitationOptions {
        batch_size: args.batch_size,
        fluency_seed: args.fluency.then_some(args.seed),
        ctx: EditCtx { seed: args.seed },
    };
    let summary = sanitation::run(
        model,
        editor,
        &cases,
        locality,
        &opts,
        &mut |case| write_line(out.as_mut(), case),
        &mut |stage, done, total| {
            if let Some(bar) = &bar {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                bar.set_message(stage);
            }
        },
    )?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    if args.json {
        let mut stdout = std::io::stdout().lock();
        serde_json::to_writer(&mut stdout, &summary)?;
        writeln!(stdout)?;
    } else if !args.quiet {
        eprint!(
            "{} on {} ({}), Sanitation protocol\n{}",
            editor.name(),
            args.data.display(),
            hparams.display(),
            summary.table()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let dataset = read_dataset(&args.data, args.format)?;
    let shared_locality = dataset.shared_locality;
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
    if cases.is_empty() {
        bail!(
            "{}: no records to evaluate after --offset {}, --limit and --sanitation-answer",
            args.data.display(),
            args.offset
        );
    }
    let mut model = args.model.load()?;
    let hparams = match &args.hparams {
        Some(p) => p.clone(),
        None => default_hparams(&args.editor, model.spec())?,
    };
    let mut editor = build_editor(&args.editor, &hparams)?;
    if let Some(locality) = &shared_locality {
        return run_sanitation(
            &args,
            cases,
            locality,
            &mut model,
            editor.as_mut(),
            &hparams,
        );
    }

    let mut previous = Vec::new();
    let out: Box<dyn Write> = match &args.out {
        Some(path) => {
            if path.exists() && std::fs::metadata(path)?.len() > 0 {
                if !args.resume {
                    bail!("{} already holds results; pass --resume to continue it or choose another --out", path.display());
                }
                previous = read_previous(path)?;
            }
            open_results(path)?
        }
        None => Box::new(std::io::stdout()),
    };
    let done: BTreeSet<usize> = previous.iter().map(|r| r.case_id).collect();
    let bar = progress_bar(&args, cases.len());
    let mut sink = Sink {
        out,
        results: previous,
        bar,
    };
    let opts = RunOptions {
        batch_size: args.batch_size,
        scoring: args.metric.scoring(args.gen_em_leading_space),
        fluency_seed: args.fluency.then_some(args.seed),
        protocol: match args.sequential {
            None => Protocol::Single,
            Some(SequentialArg::Each) => Protocol::SequentialEvalEach,
            Some(SequentialArg::End) => Protocol::SequentialEvalAtEnd,
        },
        sentiment: if args.convsent_corrected {
            SentimentProtocol::Corrected
        } else {
            SentimentProtocol::AsPublished
        },
        chat_template: args.chat_template
            || crate::editors::hparams::wants_chat_template(&hparams)?,
        ctx: EditCtx { seed: args.seed },
    };
    run_cases(&mut model, editor.as_mut(), &cases, &done, &opts, &mut sink)?;
    if let Some(bar) = &sink.bar {
        bar.finish_and_clear();
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

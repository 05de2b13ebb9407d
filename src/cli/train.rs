//! `kedit train`: trains a hypernetwork editor (MEND, KE, InstructEdit) on edit records, validating
//! on records held out of training, with checkpoints a later run resumes from.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::ModelArgs;
use crate::data::instructions::{Instructions, Task};
use crate::data::python_random::PythonRandom;
use crate::data::read_dataset;
use crate::editors::hypernet::checkpoint::{BEST_FILE, LAST_FILE};
use crate::editors::hypernet::instructedit::InstructEdit;
use crate::editors::hypernet::ke::Ke;
use crate::editors::hypernet::mend::Mend;
use crate::editors::hypernet::trainer::{HypernetTrainee, TrainingPair};
use crate::editors::hypernet::Hypernet;
use crate::run::train::{
    train, Direction, EarlyStopping, Metrics, Outcome, Schedule, TrainObserver,
};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The editor to train
    #[arg(long, value_parser = ["MEND", "KE", "InstructEdit"])]
    editor: String,
    #[command(flatten)]
    model: ModelArgs,
    /// EasyEdit's TRAINING hparams file (hparams/TRAINING/MEND/*.yaml, hparams/TRAINING/KE/*.yaml), read unchanged
    #[arg(long)]
    hparams: PathBuf,
    /// Training records (ZsRE in MEND's layout, CounterFact, KnowEdit, ConvSent); repeat for
    /// several files, which are mixed. `TASK=FILE` names the file's task (convsent, counterfact,
    /// wikirecent, zsre), which InstructEdit's instructions need
    #[arg(long, required = true, value_parser = parse_data)]
    data: Vec<TaggedFile>,
    /// Validation records; by default a seeded sample of the training records is held out
    /// (never trained on): val_steps of them, at most a tenth
    #[arg(long, value_parser = parse_data)]
    val: Option<TaggedFile>,
    /// Folder for checkpoints: best.safetensors (the editor eval and apply load through the edit
    /// hparams' archive), last.safetensors and last.json (to resume)
    #[arg(long)]
    out: PathBuf,
    /// Optimiser updates at most (default: max_iters / accumulate_bs, EasyEdit counts batches)
    #[arg(long)]
    max_steps: Option<usize>,
    /// Stop after this many minutes (a checkpoint is written)
    #[arg(long)]
    max_minutes: Option<f64>,
    /// Continue the run in --out from its last checkpoint
    #[arg(long)]
    resume: bool,
    /// Train for the whole schedule whatever validation says, as EasyEdit's trainer does (it
    /// never calls its early stopper)
    #[arg(long)]
    no_early_stop: bool,
    /// One JSON line per validation on stdout
    #[arg(long)]
    json: bool,
    /// No progress bar
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    if let Some(m) = args.max_minutes {
        if !(m.is_finite() && m > 0.0) {
            anyhow::bail!("--max-minutes {m}: expected a positive number of minutes");
        }
    }
    if args.max_steps == Some(0) {
        anyhow::bail!("--max-steps 0: expected at least one update");
    }
    for file in args.data.iter().chain(&args.val) {
        file.check()?;
    }
    match args.editor.as_str() {
        "MEND" => run_with::<Mend>(args),
        "KE" => run_with::<Ke>(args),
        "InstructEdit" => run_with::<InstructEdit>(args),
        other => anyhow::bail!("--editor {other}: kedit trains MEND, KE and InstructEdit"),
    }
}

/// A `--data` file, and the task it was tagged with (`counterfact=FILE`).
#[derive(Debug, Clone)]
pub struct TaggedFile {
    pub task: Option<Task>,
    pub path: PathBuf,
    /// A `TAG=` prefix that names no task, of a path that does not exist: refused by `check`
    /// (clap's own refusal would take three lines).
    unknown_tag: Option<String>,
}

impl TaggedFile {
    fn check(&self) -> anyhow::Result<()> {
        match &self.unknown_tag {
            Some(tag) => anyhow::bail!(
                "--data {}: {tag:?} is not a task: tag a file with one of {}",
                self.path.display(),
                Task::ALL.map(Task::name).join(", ")
            ),
            None => Ok(()),
        }
    }
}

fn parse_data(text: &str) -> Result<TaggedFile, String> {
    let untagged = |unknown_tag| TaggedFile {
        task: None,
        path: PathBuf::from(text),
        unknown_tag,
    };
    match text.split_once('=') {
        Some((tag, path)) => match Task::parse(tag) {
            Some(task) => Ok(TaggedFile {
                task: Some(task),
                path: PathBuf::from(path),
                unknown_tag: None,
            }),
            // A path with '=' in it is a path.
            None if std::path::Path::new(text).exists() => Ok(untagged(None)),
            None => Ok(untagged(Some(tag.to_string()))),
        },
        None => Ok(untagged(None)),
    }
}

/// How each record's edit prompts are wrapped: InstructEdit's instruction for the file's task,
/// or not at all.
enum Wrapping {
    None,
    Instructions {
        instructions: Box<Instructions>,
        seed: u64,
    },
}

fn run_with<H: Hypernet>(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let method_params = H::read_params(&args.hparams)?;
    let params = H::training_of(&method_params);
    let last = args.out.join(LAST_FILE);
    if args.resume && !last.is_file() {
        anyhow::bail!(
            "--resume: {} holds no checkpoint ({} is missing)",
            args.out.display(),
            last.display()
        );
    }
    if !args.resume && last.exists() {
        anyhow::bail!(
            "{} already holds a training run: pass --resume to continue it, or choose another --out",
            args.out.display()
        );
    }
    let wrapping = if H::METHOD == InstructEdit::METHOD {
        Wrapping::Instructions {
            instructions: Box::new(Instructions::builtin()?),
            seed: params.seed,
        }
    } else {
        Wrapping::None
    };
    if params.sentences_per_topic == Some(0) {
        anyhow::bail!(
            "{}: sentences_per_topic is 0: a ConvSent topic needs at least one sentence of each kind",
            args.hparams.display()
        );
    }
    let thinning = params.sentences_per_topic.map(|n| (n, params.seed));
    let mut records = Vec::new();
    let mut skipped = 0;
    for file in &args.data {
        let (pairs, without) = training_pairs(file, &wrapping, thinning)?;
        records.extend(pairs);
        skipped += without;
    }
    let mixed = args.data.len() > 1;
    let (train_pairs, val_pairs) = match &args.val {
        Some(file) => {
            let path = &file.path;
            let (val, without) = training_pairs(file, &wrapping, thinning)?;
            skipped += without;
            let trained: std::collections::HashSet<(&str, &str)> = records
                .iter()
                .map(|p| (p.edit.prompt.as_str(), p.edit.target.as_str()))
                .collect();
            let shared = val
                .iter()
                .filter(|p| trained.contains(&(p.edit.prompt.as_str(), p.edit.target.as_str())))
                .count();
            if shared > 0 {
                eprintln!(
                    "kedit: warning: {shared} of {} records of {} are also training records \
                     (same prompt and target): validation on them measures memorisation",
                    val.len(),
                    path.display()
                );
            }
            (records, val)
        }
        None => hold_out(records, params.val_steps, params.seed),
    };
    // A mixture is trained on in a seeded order, not file after file (EasyEdit's loader shuffles).
    let mut train_pairs = train_pairs;
    if mixed {
        PythonRandom::new(params.seed).shuffle(&mut train_pairs);
    }
    if train_pairs.is_empty() || val_pairs.is_empty() {
        anyhow::bail!(
            "{} training and {} validation records: MEND needs both (give more --data or --val)",
            train_pairs.len(),
            val_pairs.len()
        );
    }
    if skipped > 0 && !args.quiet {
        eprintln!("kedit: {skipped} records without a locality prompt are not used (MEND's loss needs one)");
    }

    let mut model = args.model.load()?;
    let editor = H::build(&model, method_params)?;
    // Training runs the layers below the edited weights forward only: their quantised rows do.
    model.release_dense_below(crate::editors::hypernet::lowest_layer(editor.weights()));
    let accumulate = params.accumulate_bs.max(1);
    let max_steps = args
        .max_steps
        .unwrap_or_else(|| (params.max_iters / accumulate).max(1));
    let val_interval = (params.val_interval / accumulate).max(1);
    let early_stopping = match (&params.early_stop_key, args.no_early_stop) {
        (Some(key), false) => {
            let direction = if key.contains("acc") {
                Direction::Higher
            } else {
                Direction::Lower
            };
            // EasyEdit counts patience in batches; the loop counts validations.
            let patience = params
                .early_stop_patience
                .div_ceil(params.val_interval.max(1))
                .max(1);
            Some(EarlyStopping::new(key.clone(), patience, direction))
        }
        _ => None,
    };
    let n_train = train_pairs.len();
    let n_val = val_pairs.len();
    let mut trainee = HypernetTrainee::new(editor, &mut model, train_pairs, val_pairs)?;
    std::fs::create_dir_all(&args.out).map_err(|e| crate::Error::io(&args.out, e))?;
    trainee.checkpoint_into(&args.out)?;
    let mut schedule = Schedule {
        max_steps,
        accumulate,
        val_interval,
        max_time: args.max_minutes.map(|m| Duration::from_secs_f64(m * 60.0)),
        early_stopping,
        interrupt: Some(interrupt_flag()?),
    };
    let start = if args.resume {
        let (progress, stopper) = trainee.resume(&args.out)?;
        if schedule.early_stopping.is_some() {
            schedule.early_stopping = stopper.or(schedule.early_stopping);
        }
        progress
    } else {
        Outcome::default()
    };
    if !args.quiet {
        eprintln!(
            "kedit: training {} on {n_train} records, validating on {n_val}, {} updates of {accumulate} batches from step {}",
            H::METHOD, max_steps, start.steps
        );
    }
    let bar = (!args.quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(max_steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "train [{bar:30}] {pos}/{len} {msg} {elapsed}<{eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(start.steps as u64);
        bar
    });
    let mut report = Report {
        bar: bar.as_ref(),
        json: args.json,
        quiet: args.quiet,
    };
    let outcome = train(&mut trainee, &mut schedule, start, &mut report)?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    if !args.quiet {
        let why = if outcome.interrupted {
            "interrupted (continue with --resume)"
        } else if outcome.stopped_early {
            "stopped early"
        } else if outcome.out_of_time {
            "out of time"
        } else {
            "finished"
        };
        eprintln!(
            "kedit: {why} after {} updates; best validation at step {}; editor in {}",
            outcome.steps,
            outcome.best_step.map_or("-".into(), |s| s.to_string()),
            args.out.join(BEST_FILE).display()
        );
    }
    Ok(if outcome.interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

/// A flag Ctrl-C sets: the loop ends after the current update and writes a checkpoint. A second
/// Ctrl-C exits at once.
fn interrupt_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let seen = flag.clone();
    ctrlc::set_handler(move || {
        if seen.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nkedit: stopping after this update and writing a checkpoint (Ctrl-C again to quit now)");
    })
    .map_err(|e| anyhow::anyhow!("cannot install the Ctrl-C handler: {e}"))?;
    Ok(flag)
}

/// How a run shows itself: a progress bar with the last update's training metrics and the last
/// validation's, or plain lines at each validation; JSON lines per validation on stdout.
struct Report<'a> {
    bar: Option<&'a indicatif::ProgressBar>,
    json: bool,
    quiet: bool,
}

impl TrainObserver for Report<'_> {
    fn step(&mut self, step: usize, metrics: &Metrics) {
        if let Some(bar) = self.bar {
            bar.set_position(step as u64);
            bar.set_message(summary(metrics, ""));
        }
    }

    fn validation(&mut self, step: usize, metrics: &Metrics) -> crate::Result<()> {
        if let Some(bar) = self.bar {
            bar.println(format!(
                "step {step}: validation {}",
                summary(metrics, "_val")
            ));
        } else if !self.quiet && !self.json {
            eprintln!("step {step}: validation {}", summary(metrics, "_val"));
        }
        if self.json {
            let mut record = serde_json::Map::new();
            record.insert("step".into(), step.into());
            for (k, v) in metrics {
                record.insert(k.clone(), (*v).into());
            }
            println!("{}", serde_json::Value::Object(record));
        }
        Ok(())
    }
}

/// Edit accuracy, edit NLL, locality KL (the drawdown) and the total loss, from metrics whose
/// names end in `suffix`.
fn summary(metrics: &Metrics, suffix: &str) -> String {
    let get = |k: &str| {
        metrics
            .get(&format!("{k}{suffix}"))
            .copied()
            .unwrap_or(f64::NAN)
    };
    format!(
        "edit acc {:.3}, edit nll {:.3}, loc kl {:.4}, loss {:.4}",
        get("edit/acc"),
        get("loss/edit"),
        get("loss/loc"),
        get("loss/total_edit")
    )
}

/// The records of a file as training pairs, and how many had no locality prompt.
fn training_pairs(
    file: &TaggedFile,
    wrapping: &Wrapping,
    thinning: Option<(usize, u64)>,
) -> anyhow::Result<(Vec<TrainingPair>, usize)> {
    let path: &Path = &file.path;
    let ds = read_dataset(path, None)?;
    let task = match (
        wrapping,
        file.task.or_else(|| Task::of_file(path, ds.format)),
    ) {
        (Wrapping::None, task) => task,
        (Wrapping::Instructions { .. }, Some(task)) => Some(task),
        (Wrapping::Instructions { .. }, None) => anyhow::bail!(
            "{}: InstructEdit needs each file's task; tag it, e.g. --data counterfact={}",
            path.display(),
            path.display()
        ),
    };
    let mut pairs = Vec::with_capacity(ds.cases.len());
    let mut without = 0;
    for (_, request) in &ds.cases {
        let pair = match (wrapping, task) {
            (Wrapping::Instructions { instructions, seed }, Some(task)) => {
                TrainingPair::from_request(request, &|p: &str| {
                    instructions.wrap_for_training(task, *seed, request, p)
                })
            }
            _ => TrainingPair::from_request(request, &|p: &str| p.to_string()),
        };
        match pair {
            Ok(p) => pairs.push(match thinning {
                Some((n, seed)) => p.thinned(n, seed),
                None => p,
            }),
            Err(_) => without += 1,
        }
    }
    Ok((pairs, without))
}

/// A seeded sample of `val_steps` records (at most a tenth, at least one) held out for
/// validation; the rest, in file order, for training.
fn hold_out(
    records: Vec<TrainingPair>,
    val_steps: usize,
    seed: u64,
) -> (Vec<TrainingPair>, Vec<TrainingPair>) {
    let n = records.len();
    let k = val_steps.clamp(1, (n / 10).max(1)).min(n.saturating_sub(1));
    let mut order: Vec<usize> = (0..n).collect();
    PythonRandom::new(seed).shuffle(&mut order);
    let held: std::collections::BTreeSet<usize> = order[..k].iter().copied().collect();
    let mut train = Vec::with_capacity(n - k);
    let mut val = Vec::with_capacity(k);
    for (i, r) in records.into_iter().enumerate() {
        if held.contains(&i) {
            val.push(r);
        } else {
            train.push(r);
        }
    }
    (train, val)
}

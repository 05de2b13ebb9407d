//! The command line: parsing, printing and exit codes. Each subcommand is one file.

mod apply;
mod eval;
mod export;
mod generate;
mod inspect;
mod patch;
mod plot_lifelong;
mod plot_updates;
mod report;
mod stats;
mod trace;
mod train;

use std::process::ExitCode;

use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::model::load::{DTypeChoice, LoadOptions};
use crate::model::{load, Model};

#[derive(Parser)]
#[command(
    name = "kedit",
    version,
    about = "Knowledge editing for GPT-2 and LLaMA language models"
)]
struct Cli {
    /// CPU threads for every kernel: matrix products (candle's, kedit's, OpenBLAS's) and the
    /// element-wise ops. Default: $RAYON_NUM_THREADS, else the cores this process may use
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt with the model (greedy or seeded top-k sampling)
    Generate(generate::GenerateArgs),
    /// Describe a model: architecture, widths, parameter count, dtype and source
    Inspect(inspect::InspectArgs),
    /// Run an editor over a benchmark file and report reliability, generalization, locality and
    /// portability, pre and post, per case (JSON lines) and in summary
    Eval(Box<eval::EvalArgs>),
    /// Edit one fact and show the metrics and the greedy continuation before and after
    Apply(Box<apply::ApplyArgs>),
    /// Gather the second moment E[k kᵀ] of MLP keys over a text corpus (ROME, MEMIT, AlphaEdit),
    /// cached on disk for every later edit
    Stats(stats::StatsArgs),
    /// Train a hypernetwork editor (MEND or KE) on edit records, with held-out validation, early
    /// stopping and checkpoints that resume
    Train(Box<train::TrainArgs>),
    /// Causal tracing: corrupt the subject, restore one hidden state at a time, and plot how much
    /// of the answer comes back (residual stream, MLP, attention) as an SVG
    Trace(trace::TraceArgs),
    /// The principal components of trained editors' updates on edits of several tasks, one panel
    /// per editor, as an SVG (InstructEdit's Fig. 4)
    PlotUpdates(plot_updates::PlotUpdatesArgs),
    /// Lifelong editing's curves: reliability, generalization and locality against the number of
    /// edits, from `kedit eval --eval-at` logs, one line per run, as an SVG and a table
    PlotLifelong(plot_lifelong::PlotLifelongArgs),
    /// Inspect edits saved as files: `kedit patch show FILE`
    Patch(patch::PatchArgs),
    /// One run's summary from its results files, merging the shards of `eval --shard` (refusing
    /// duplicates, gaps and mixed runs), as a table, JSON or an HTML page
    Report(report::ReportArgs),
    /// Write the model with patches applied as a Hugging Face folder (sharded safetensors,
    /// config.json, tokenizer) that transformers and kedit load
    Export(export::ExportArgs),
}

/// Where the model comes from and how to hold it; shared by every subcommand that loads one.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// A Hugging Face folder, a .gguf file, or a Hub id such as openai-community/gpt2-xl[@revision]
    #[arg(long, short = 'm')]
    pub model: String,
    /// cpu, cuda or cuda:N
    #[arg(long, env = "KEDIT_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Weight dtype; auto = f32 when it fits in memory, else bf16
    #[arg(long, value_enum, default_value_t = DTypeArg::Auto)]
    pub dtype: DTypeArg,
    /// A tokenizer.json to use instead of the model's own
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
}

/// InstructEdit's instruction for an evaluation run (SPEC-editors §9.1): one description for every
/// record, as EasyEdit's test script uses.
#[derive(Args, Debug, Clone)]
pub struct InstructionArgs {
    /// InstructEdit: the task the instruction names (default: from the data's layout and file name)
    #[arg(long, value_enum)]
    pub task: Option<crate::data::instructions::Task>,
    /// InstructEdit: description K of the task for every record (0-8: those trained with, 9: the
    /// held-out one); default: one drawn as EasyEdit's test script draws it (seed 0)
    #[arg(long, conflicts_with = "unseen_instruction")]
    pub instruction_index: Option<usize>,
    /// InstructEdit: the task's held-out description, never seen in training
    #[arg(long)]
    pub unseen_instruction: bool,
}

impl InstructionArgs {
    fn given(&self) -> bool {
        self.task.is_some() || self.instruction_index.is_some() || self.unseen_instruction
    }

    /// For InstructEdit, the task and description every request of the run is wrapped in
    /// (`data` names the file the task may be read from); `None` for other editors.
    ///
    /// # Errors
    /// Instruction options for an editor that takes none, a task that cannot be told from the
    /// data, or a description index out of range.
    pub fn instruction(
        &self,
        editor: &str,
        data: Option<(&std::path::Path, crate::data::Format)>,
    ) -> anyhow::Result<Option<(crate::data::instructions::Task, String)>> {
        use crate::data::instructions::{Choice, Instructions, Task};
        if editor != "InstructEdit" {
            if self.given() {
                anyhow::bail!(
                    "--task, --instruction-index and --unseen-instruction are InstructEdit's; \
                     --editor {editor} takes no instruction"
                );
            }
            return Ok(None);
        }
        let task = match (self.task, data) {
            (Some(task), _) => task,
            (None, Some((path, format))) => Task::of_file(path, format).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: cannot tell the task from the file; pass --task ({})",
                    path.display(),
                    Task::ALL.map(Task::name).join(", ")
                )
            })?,
            (None, None) => anyhow::bail!(
                "InstructEdit needs the task of the edit: pass --task ({})",
                Task::ALL.map(Task::name).join(", ")
            ),
        };
        let choice = match (self.instruction_index, self.unseen_instruction) {
            (Some(k), _) => Choice::Index(k),
            (None, true) => Choice::Unseen,
            (None, false) => Choice::Drawn,
        };
        let description = Instructions::builtin()?
            .description(task, choice)
            .map_err(|e| anyhow::anyhow!(e))?
            .to_string();
        Ok(Some((task, description)))
    }
}

/// Where the stores an editor uses live; shared by the subcommands that edit.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// Where key statistics are cached (default $KEDIT_CACHE/stats, else ~/.cache/kedit/stats);
    /// `kedit stats` fills the same folder
    #[arg(long, alias = "cache-dir")]
    pub stats_dir: Option<std::path::PathBuf>,
    /// Tokens per statistics window: use the statistics `kedit stats --context N` wrote
    #[arg(long, default_value_t = 1024)]
    pub stats_context: usize,
}

impl StoreArgs {
    /// The editing context for a run seeded with `seed`.
    pub fn ctx(&self, seed: u64) -> crate::editors::EditCtx {
        let mut ctx = crate::editors::EditCtx::with_cache_dir(seed, &cache_root());
        ctx.stats = stats_store(self.stats_dir.as_deref(), self.stats_context);
        ctx
    }
}

/// The statistics store `kedit stats` writes to and editors read from: `dir`, else
/// `$KEDIT_CACHE/stats`, with windows of `context` tokens.
pub fn stats_store(
    dir: Option<&std::path::Path>,
    context: usize,
) -> crate::editors::rank_one::stats::StatsStore {
    let dir = dir.map_or_else(|| cache_root().join("stats"), std::path::Path::to_path_buf);
    let mut store = crate::editors::rank_one::stats::StatsStore::on_disk(dir);
    store.context = context;
    store
}

/// `--editor`'s values: every name the registry holds, listed in the help and in the error for
/// any other name.
pub fn editor_parser() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        crate::editors::registry::EDITORS
            .iter()
            .map(|(name, _)| *name),
    )
}

/// kedit's cache folder: `$KEDIT_CACHE`, else `~/.cache/kedit`. The only place the library's
/// stores are located from the environment.
pub fn cache_root() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("KEDIT_CACHE").filter(|d| !d.is_empty()) {
        return dir.into();
    }
    let home = std::env::var_os("HOME").map_or_else(|| ".".into(), std::path::PathBuf::from);
    home.join(".cache").join("kedit")
}

/// Where shipped hyperparameter files are looked for: `$KEDIT_HPARAMS`, `./hparams`, then the
/// source tree kedit was built from.
pub fn hparams_roots() -> Vec<std::path::PathBuf> {
    let mut roots: Vec<std::path::PathBuf> = std::env::var_os("KEDIT_HPARAMS")
        .filter(|d| !d.is_empty())
        .map(Into::into)
        .into_iter()
        .collect();
    roots.push("hparams".into());
    roots.push(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("hparams"));
    roots
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DTypeArg {
    Auto,
    F32,
    F16,
    Bf16,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<Model> {
        let opts = LoadOptions {
            device: parse_device(&self.device)?,
            dtype: match self.dtype {
                DTypeArg::Auto => DTypeChoice::Auto,
                DTypeArg::F32 => DTypeChoice::Exact(DType::F32),
                DTypeArg::F16 => DTypeChoice::Exact(DType::F16),
                DTypeArg::Bf16 => DTypeChoice::Exact(DType::BF16),
            },
            tokenizer: self.tokenizer.clone(),
            hub: Some(crate::model::load::HubOptions::from_vars(|k| {
                std::env::var(k).ok()
            })),
        };
        Ok(load::load(&self.model, &opts)?)
    }
}

fn parse_device(s: &str) -> anyhow::Result<Device> {
    // A device set once for a whole job script comes from the environment: say so when it is bad.
    let named = match std::env::var("KEDIT_DEVICE") {
        Ok(v) if v == s => format!("KEDIT_DEVICE={s}"),
        _ => format!("--device {s}"),
    };
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0, &named),
        _ => match s.strip_prefix("cuda:") {
            Some(n) => cuda(
                n.parse().map_err(|_| {
                    anyhow::anyhow!(
                        "{named}: `{n}` is not a GPU ordinal (expected cpu, cuda or cuda:N)"
                    )
                })?,
                &named,
            ),
            None => anyhow::bail!("{named}: expected cpu, cuda or cuda:N"),
        },
    }
}

fn cuda(ordinal: usize, named: &str) -> anyhow::Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        anyhow::bail!(
            "{named}: this kedit was built without CUDA (rebuild with `--features cuda`)"
        );
    }
    Ok(Device::new_cuda(ordinal)?)
}

/// Parses the command line, runs the command, prints any error as one line on stderr and turns
/// it into exit code 2 (1 is reserved for "ran, but the result failed a requested check").
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = configure_threads(cli.threads).and_then(|()| match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Eval(args) => eval::run(*args),
        Command::Apply(args) => apply::run(*args),
        Command::Stats(args) => stats::run(args),
        Command::Train(args) => train::run(*args),
        Command::Trace(args) => trace::run(args),
        Command::PlotUpdates(args) => plot_updates::run(args),
        Command::Patch(args) => patch::run(args),
        Command::PlotLifelong(args) => plot_lifelong::run(args),
        Command::Report(args) => report::run(args),
        Command::Export(args) => export::run(args),
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            // One line, whatever a dependency put in its message, so scripts can grep it. A cause
            // whose text its parent already ends with (an I/O error under the file it concerns)
            // is said once.
            let mut message = String::new();
            for cause in err.chain() {
                let text = cause.to_string();
                if !message.ends_with(&text) {
                    if !message.is_empty() {
                        message.push_str(": ");
                    }
                    message.push_str(&text);
                }
            }
            let message: Vec<&str> = message
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("kedit: error: {}", message.join("; "));
            ExitCode::from(2)
        }
    }
}

/// Sizes every thread pool before any kernel runs: candle's barrier pool (kedit's kernels,
/// OpenBLAS's parts, candle's elementwise ops), which candle sizes from `$CANDLE_NUM_THREADS`, else
/// `$RAYON_NUM_THREADS`, when it first starts it; candle's count for its gemm, which it reads from
/// `$RAYON_NUM_THREADS` on every call; and rayon's global pool (the tokenizer's).
fn configure_threads(requested: Option<usize>) -> anyhow::Result<()> {
    let from_env = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0);
    let threads = match requested {
        Some(0) => anyhow::bail!("--threads 0: expected at least one thread"),
        Some(n) => n,
        None => from_env.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        }),
    };
    // Still single-threaded here: nothing else reads the environment concurrently.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    // How long the pool's idle workers spin before they sleep (candle's default, 25,000 pauses, is
    // about a millisecond). An FT-L edit alone: 1.74 s at candle's default, 1.80 s at this, 2.47 s
    // at 250; two edits sharing two cores with two threads each: 8.1 and 9.6 s at the default,
    // 4.9 and 6.3 s at this (one thread each: 2.5 and 2.8 s).
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "2500");
    }
    // OpenBLAS reads its settings from the environment when it is loaded: load it now.
    if std::env::var("KEDIT_BLAS").is_ok_and(|v| v == "none") {
        crate::model::blas::disable();
    }
    crate::model::blas::available();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| anyhow::anyhow!("--threads {threads}: {e}"))?;
    Ok(())
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde::Serialize;

use super::ModelArgs;
use crate::editors::rank_one::stats::{second_moments, Corpus};

#[derive(Args, Debug)]
pub struct StatsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Layers whose MLP keys to gather, e.g. 4,5,6
    #[arg(long, value_delimiter = ',', required = true)]
    layers: Vec<usize>,
    /// Text corpus: plain text (WikiText articles split at `= Title =`) or JSON lines with
    /// "text"; default: the built-in WikiText-2
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Articles to use (EasyEdit's mom2_n_samples), drawn as EasyEdit draws them
    #[arg(long, default_value_t = 100_000)]
    samples: usize,
    /// Tokens per window; longer articles are cut into consecutive windows
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// Where statistics are cached (default $KEDIT_CACHE/stats or ~/.cache/kedit/stats); give
    /// `eval` and `apply` the same --stats-dir and --stats-context to use them
    #[arg(long, alias = "cache-dir")]
    stats_dir: Option<PathBuf>,
    /// Print one JSON object per layer instead of a table
    #[arg(long)]
    json: bool,
    /// No progress bar
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Serialize)]
struct LayerReport {
    layer: usize,
    tokens: u64,
    computed: bool,
    path: Option<PathBuf>,
    /// Mean of the diagonal: the average squared key entry.
    mean_square: f64,
}

pub fn run(args: StatsArgs) -> anyhow::Result<ExitCode> {
    if args.context == 0 {
        anyhow::bail!("--context must be at least 1");
    }
    if args.samples == 0 {
        anyhow::bail!("--samples must be at least 1: moments over no articles are not statistics");
    }
    let corpus = match &args.corpus {
        Some(path) => Corpus::from_file(path)?,
        None => Corpus::builtin(),
    };
    let model = args.model.load()?;
    let opts = super::stats_store(args.stats_dir.as_deref(), args.context).options(args.samples)?;
    let bar = (!args.quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "stats [{bar:40}] {pos}/{len} tokens {per_sec} {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let moments = second_moments(&model, &args.layers, &corpus, &opts, &mut |done, total| {
        if let Some(bar) = &bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    })?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let mut out = std::io::stdout().lock();
    for m in moments {
        let d = m.second_moment.dim(0)?;
        let trace: f64 = m
            .second_moment
            .flatten_all()?
            .to_vec1::<f64>()?
            .iter()
            .step_by(d + 1)
            .sum();
        let report = LayerReport {
            layer: m.layer,
            tokens: m.tokens,
            computed: m.computed,
            path: m.path,
            mean_square: trace / d as f64,
        };
        if args.json {
            serde_json::to_writer(&mut out, &report)?;
            writeln!(out)?;
        } else {
            writeln!(
                out,
                "layer {:>3}: {} tokens, {} {}",
                report.layer,
                report.tokens,
                if report.computed {
                    "computed"
                } else {
                    "cached"
                },
                report
                    .path
                    .as_deref()
                    .map_or_else(|| "(not cached)".into(), |p| p.display().to_string())
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

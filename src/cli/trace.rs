use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::ModelArgs;
use crate::analysis::svg::trace_svg;
use crate::analysis::trace::{causal_trace, TraceOptions};

#[derive(Args, Debug)]
pub struct TraceArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// The subject, as it occurs in the prompt; its token embeddings are corrupted
    #[arg(long)]
    subject: String,
    /// Noise draws averaged over
    #[arg(long, default_value_t = 10)]
    samples: usize,
    /// Noise standard deviation (default: 3 × the standard deviation of the token embeddings)
    #[arg(long)]
    noise: Option<f64>,
    /// Layers restored together for the MLP and attention traces
    #[arg(long, default_value_t = 10)]
    window: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the figure (SVG)
    #[arg(long)]
    out: PathBuf,
    /// Print the numbers as JSON on stdout
    #[arg(long)]
    json: bool,
    /// No progress bar
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(args: TraceArgs) -> anyhow::Result<ExitCode> {
    if args.window == 0 {
        anyhow::bail!("--window must be at least 1");
    }
    let model = args.model.load()?;
    let opts = TraceOptions {
        samples: args.samples,
        noise: args.noise,
        window: args.window,
        seed: args.seed,
    };
    let bar = (!args.quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("trace [{bar:40}] {pos}/{len} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let trace = causal_trace(
        &model,
        &args.prompt,
        &args.subject,
        &opts,
        &mut |done, total| {
            if let Some(bar) = &bar {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            }
        },
    )?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let name = std::path::Path::new(&args.model.model)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(&args.model.model)
        .to_string();
    let svg = trace_svg(&trace, &name);
    crate::files::write_atomically(&args.out, svg.as_bytes())?;
    if args.json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &trace)?;
        writeln!(out)?;
    } else if !args.quiet {
        eprintln!(
            "{:?} -> {:?}: clean p = {:.3}, corrupted p = {:.3}; figure in {}",
            trace.prompt,
            trace.answer,
            trace.clean,
            trace.corrupted,
            args.out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

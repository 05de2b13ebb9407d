use std::io::Write;
use std::process::ExitCode;

use clap::Args;

use super::ModelArgs;
use crate::model::Sampling;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to continue
    #[arg(long, short = 'p')]
    prompt: String,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Sample from the K most likely tokens instead of taking the most likely one
    #[arg(long)]
    top_k: Option<usize>,
    /// Seed for --top-k sampling
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print JSON (prompt ids, generated ids and text, top-5 ids and logits at every step)
    #[arg(long)]
    json: bool,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    let model = args.model.load()?;
    let sampling = match args.top_k {
        Some(0) => anyhow::bail!("--top-k must be at least 1"),
        Some(k) => Sampling::TopK { k, seed: args.seed },
        None => Sampling::Greedy,
    };
    let generation = model.generate(&args.prompt, args.max_new_tokens, sampling)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &generation)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{}{}", args.prompt, generation.text)?;
    }
    Ok(ExitCode::SUCCESS)
}

use std::io::Write;
use std::process::ExitCode;

use clap::Args;
use serde::Serialize;

use super::ModelArgs;
use crate::model::ModelSpec;

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report<'a> {
    #[serde(flatten)]
    spec: &'a ModelSpec,
    n_params: usize,
    dtype: String,
    device: String,
    origin: &'a crate::model::ModelOrigin,
    /// What runs CPU matrix products: kedit's kernels for short inputs (and whether they read a
    /// GGUF's quantised rows), OpenBLAS (and which of its kernels) for long ones, else candle's
    /// gemm.
    cpu_products: String,
}

pub fn run(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let model = args.model.load()?;
    let spec = model.spec();
    let report = Report {
        spec,
        n_params: spec.n_params(),
        dtype: format!("{:?}", model.dtype()).to_lowercase(),
        device: format!("{:?}", model.device()),
        origin: model.origin(),
        cpu_products: cpu_products(&model),
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<(&str, String)> = vec![
        ("architecture", format!("{:?}", spec.arch).to_lowercase()),
        ("layers", spec.n_layers.to_string()),
        ("d_model", spec.d_model.to_string()),
        ("d_mlp", spec.d_mlp.to_string()),
        (
            "heads",
            format!(
                "{} (key/value heads {}, head dim {})",
                spec.n_heads, spec.n_kv_heads, spec.head_dim
            ),
        ),
        ("vocabulary", spec.vocab_size.to_string()),
        ("context", spec.max_positions.to_string()),
        ("tied embeddings", spec.tied_embeddings.to_string()),
        (
            "parameters",
            format!("{} ({:.1}M)", report.n_params, report.n_params as f64 / 1e6),
        ),
        ("dtype", report.dtype.clone()),
        ("device", report.device.clone()),
        (
            "source",
            format!("{} ({})", report.origin.source, report.origin.kind),
        ),
        ("cpu products", report.cpu_products.clone()),
    ];
    for (k, v) in rows {
        writeln!(out, "{k:>16}  {v}")?;
    }
    for f in &report.origin.files {
        writeln!(out, "{:>16}  {}", "file", f.display())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn cpu_products(model: &crate::model::Model) -> String {
    use crate::model::{blas, kernels};
    let short = match model.packed_weights() {
        _ if !kernels::available() => "candle's gemm".to_string(),
        (0, _) => "kedit's AVX-512 kernels".to_string(),
        (n, bytes) => format!(
            "kedit's AVX-512 kernels (from the file's quantised rows for {n} weights, {} MB)",
            bytes >> 20
        ),
    };
    let long = match blas::kernels() {
        Some((core, true)) => format!("OpenBLAS ({core} kernels, chosen by kedit for this CPU)"),
        Some((core, false)) => format!("OpenBLAS ({core} kernels)"),
        None => "candle's gemm (OpenBLAS not loaded)".to_string(),
    };
    format!("up to {} rows {short}, more {long}", kernels::MAX_ROWS)
}

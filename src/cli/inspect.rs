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
    /// Also time the forward pass (`--batch` sequences of `--tokens` ids, `--repeats` times after
    /// a warm-up) beside a matrix product at the MLP's width, the rate the forward could reach
    #[arg(long)]
    throughput: bool,
    #[arg(long, default_value_t = 8, requires = "throughput")]
    batch: usize,
    #[arg(long, default_value_t = 128, requires = "throughput")]
    tokens: usize,
    #[arg(long, default_value_t = 3, requires = "throughput")]
    repeats: usize,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    throughput: Option<Throughput>,
}

#[derive(Serialize)]
struct Throughput {
    batch: usize,
    tokens: usize,
    repeats: usize,
    /// Mean wall time of one forward pass over the batch.
    forward_seconds: f64,
    tokens_per_second: f64,
    /// The forward's multiply-adds (`ModelSpec::forward_flops`) per second.
    forward_gflops: f64,
    /// `[m, k, n]`: the batch's tokens times the model width, times the MLP width.
    gemm_shape: [usize; 3],
    gemm_gflops: f64,
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
        throughput: match args.throughput {
            true => Some(measure_throughput(
                &model,
                args.batch,
                args.tokens,
                args.repeats,
            )?),
            false => None,
        },
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
    if let Some(t) = &report.throughput {
        writeln!(
            out,
            "{:>16}  {} x {} tokens: {:.0} tokens/s ({:.3} s per pass, {:.1} GFLOP/s)",
            "forward", t.batch, t.tokens, t.tokens_per_second, t.forward_seconds, t.forward_gflops
        )?;
        let [m, k, n] = t.gemm_shape;
        writeln!(
            out,
            "{:>16}  [{m} x {k}] x [{k} x {n}]: {:.1} GFLOP/s (the forward runs at {:.0}% of it)",
            "product",
            t.gemm_gflops,
            100.0 * t.forward_gflops / t.gemm_gflops
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Times `repeats` forward passes over a fixed batch of ids, and a matrix product shaped like the
/// MLP's first projection over the same tokens, in the model's dtype on its device.
fn measure_throughput(
    model: &crate::model::Model,
    batch: usize,
    tokens: usize,
    repeats: usize,
) -> anyhow::Result<Throughput> {
    use crate::model::{ops, HookSpec, TokenBatch};
    use candle_core::Tensor;
    use std::time::Instant;
    let spec = model.spec();
    anyhow::ensure!(
        batch > 0 && tokens > 0 && repeats > 0,
        "--batch, --tokens and --repeats must be positive"
    );
    anyhow::ensure!(
        tokens <= spec.max_positions,
        "--tokens {tokens}: the model's context is {} tokens",
        spec.max_positions
    );
    let device = model.device();
    let vocab = spec.vocab_size;
    let seqs: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..tokens)
                .map(|t| ((100 + 37 * b + 11 * t) % vocab) as u32)
                .collect()
        })
        .collect();
    let ids = TokenBatch::new(&seqs, 0, device)?;
    let hooks = HookSpec::new();
    let forward = || -> anyhow::Result<()> {
        let out = model.forward(&ids, &hooks)?;
        device.synchronize()?;
        drop(out);
        Ok(())
    };
    // The first pass loads kernels and fills allocator caches; it is not timed.
    forward()?;
    let start = Instant::now();
    for _ in 0..repeats {
        forward()?;
    }
    let forward_seconds = start.elapsed().as_secs_f64() / repeats as f64;

    let (m, k, n) = (batch * tokens, spec.d_model, spec.d_mlp);
    let xs = Tensor::randn(0f32, 1.0, (m, k), device)?.to_dtype(model.dtype())?;
    let weight = Tensor::randn(0f32, 0.02, (n, k), device)?.to_dtype(model.dtype())?;
    let product = || -> anyhow::Result<()> {
        let out = ops::matmul_t(&xs, &weight, None)?;
        device.synchronize()?;
        drop(out);
        Ok(())
    };
    product()?;
    let rounds = 10 * repeats;
    let start = Instant::now();
    for _ in 0..rounds {
        product()?;
    }
    let gemm_seconds = start.elapsed().as_secs_f64() / rounds as f64;
    let gemm_flops = 2.0 * (m * k * n) as f64;
    Ok(Throughput {
        batch,
        tokens,
        repeats,
        forward_seconds,
        tokens_per_second: m as f64 / forward_seconds,
        forward_gflops: spec.forward_flops(tokens, m) / forward_seconds / 1e9,
        gemm_shape: [m, k, n],
        gemm_gflops: gemm_flops / gemm_seconds / 1e9,
    })
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

//! `kedit export`: the model with patches applied, written as a Hugging Face folder.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::ModelArgs;
use crate::editors::registry::overlay_from_parts;
use crate::editors::Patch;
use crate::model::{refuse_existing, GgufBlocks};

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An edit saved with --save-edit, applied before writing (repeatable: patches stack in the
    /// order they were made)
    #[arg(long)]
    patch: Vec<PathBuf>,
    /// The folder to create: safetensors in the model's dtype (--dtype), config.json and the
    /// tokenizer. It must not exist.
    #[arg(long, required_unless_present = "gguf", conflicts_with = "gguf")]
    out: Option<PathBuf>,
    /// Write one GGUF file instead (f32, f16 or bf16 as --dtype; a GGUF source's tokenizer and
    /// metadata are carried over, a folder's are written from its config and tokenizer.json). It
    /// must not exist.
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// With --gguf: store the matrices in these llama.cpp blocks (q8_0, q5_1, q5_0, q4_1, q4_0),
    /// the vectors in --dtype
    #[arg(long)]
    quantize: Option<String>,
    /// The largest safetensors file in GB (10⁹ bytes, as transformers' max_shard_size); larger
    /// models are sharded with a model.safetensors.index.json
    #[arg(long, default_value_t = 5.0)]
    max_shard_gb: f64,
    /// Print what was written as JSON
    #[arg(long)]
    json: bool,
}

pub fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    if !(args.max_shard_gb > 0.0 && args.max_shard_gb.is_finite()) {
        anyhow::bail!(
            "--max-shard-gb {}: expected a size above 0",
            args.max_shard_gb
        );
    }
    let target = match (&args.out, &args.gguf) {
        (Some(p), _) | (None, Some(p)) => p.clone(),
        (None, None) => anyhow::bail!("give --out FOLDER or --gguf FILE"),
    };
    let blocks = match &args.quantize {
        None => None,
        Some(_) if args.gguf.is_none() => {
            anyhow::bail!("--quantize writes GGUF blocks: add --gguf FILE")
        }
        Some(name) => Some(GgufBlocks::parse(name).ok_or_else(|| {
            anyhow::anyhow!(
                "--quantize {name}: expected one of {}",
                GgufBlocks::NAMES.join(", ")
            )
        })?),
    };
    // Before the model loads.
    refuse_existing(
        &target,
        if args.gguf.is_some() {
            "file"
        } else {
            "folder"
        },
    )?;
    let mut model = args.model.load()?;
    let source_fingerprint = model.fingerprint()?;
    let mut patches = Vec::new();
    for path in &args.patch {
        let patch = Patch::load(&model, path, &overlay_from_parts)?;
        patch
            .edit
            .reapply(&mut model)
            .with_context(|| format!("applying {}", path.display()))?;
        patches.push(serde_json::json!({
            "file": path.display().to_string(),
            "method": patch.method(),
            "model_fingerprint": patch.header.as_ref().map(|h| h.model_fingerprint.clone()),
        }));
    }
    let provenance = serde_json::json!({
        "kedit_version": env!("CARGO_PKG_VERSION"),
        "source": args.model.model,
        "source_fingerprint": source_fingerprint,
        "patches": patches,
    });
    let max_shard_bytes = (args.max_shard_gb * 1e9) as usize;
    let exported = if args.gguf.is_some() {
        crate::model::export_gguf(&model, &target, model.dtype(), blocks, &provenance)?
    } else {
        crate::model::export_hf(&model, &target, model.dtype(), max_shard_bytes, &provenance)?
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&exported)?)?;
    } else {
        let stored = match (&args.quantize, blocks) {
            (Some(name), Some(_)) => format!("{name} matrices and {:?} vectors", model.dtype()),
            _ => format!("{:?} weights", model.dtype()),
        };
        writeln!(
            out,
            "wrote {}: {} tensors, {:.2} GB of {stored} in {}",
            exported.path.display(),
            exported.tensors,
            exported.bytes as f64 / 1e9,
            exported.files.join(", ")
        )?;
        if exported.added_mlp_neurons > 0 {
            writeln!(
                out,
                "calibration neurons folded in: every MLP is {} neurons wider (zero neurons pad the layers that had fewer)",
                exported.added_mlp_neurons
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

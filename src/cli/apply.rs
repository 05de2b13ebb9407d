use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use super::ModelArgs;
use crate::data::{read_dataset, EditRequest, PromptSet};
use crate::editors::rank_one::values::ValueFit;
use crate::editors::{build_editor, default_hparams, Edit, EditCtx};
use crate::eval::runner::{measure_after, measure_before, CaseResult, Protocol, RunOptions};
use crate::eval::sentiment::SentimentProtocol;
use crate::eval::summary::summarize;
use crate::model::Sampling;

#[derive(Args, Debug)]
pub struct ApplyArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Editing method (FT-L, FT-M); not needed with --patch
    #[arg(long, required_unless_present = "patch")]
    editor: Option<String>,
    /// EasyEdit hyperparameter YAML (default: hparams/<METHOD>/<model>.yaml for known models)
    #[arg(long)]
    hparams: Option<PathBuf>,
    /// The prompt whose answer changes, e.g. "The mother tongue of Danielle Darrieux is"
    #[arg(long, required_unless_present_any = ["request"])]
    prompt: Option<String>,
    /// The subject inside the prompt (locate-then-edit methods need it)
    #[arg(long)]
    subject: Option<String>,
    /// The new answer
    #[arg(long, required_unless_present_any = ["request"])]
    target: Option<String>,
    /// The old answer
    #[arg(long)]
    ground_truth: Option<String>,
    /// A paraphrase of the prompt (generalization)
    #[arg(long)]
    rephrase: Option<String>,
    /// An unrelated prompt whose prediction must not change (repeatable, with --locality-answer)
    #[arg(long)]
    locality_prompt: Vec<String>,
    #[arg(long)]
    locality_answer: Vec<String>,
    /// A question whose answer follows from the new fact (repeatable, with --portability-answer)
    #[arg(long)]
    portability_prompt: Vec<String>,
    #[arg(long)]
    portability_answer: Vec<String>,
    /// Read the request from a JSON file holding one record in any supported layout
    #[arg(long, conflicts_with_all = ["prompt", "target"])]
    request: Option<PathBuf>,
    /// Re-apply an edit saved with --save-edit instead of running an editor
    #[arg(long, conflicts_with = "editor")]
    patch: Option<PathBuf>,
    /// Write the edit (the changed tensors, safetensors) here
    #[arg(long)]
    save_edit: Option<PathBuf>,
    /// Tokens of greedy continuation to show before and after
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// Seed of the fluency sample (the same before and after the edit)
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
    /// Scoring: token (teacher-forced accuracy), ppl or gen-em, as for `kedit eval`
    #[arg(long, value_enum, default_value_t = super::eval::MetricArg::Token)]
    metric: super::eval::MetricArg,
    /// With --metric gen-em: score `" " + answer`
    #[arg(long)]
    gen_em_leading_space: bool,
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report<'a> {
    #[serde(flatten)]
    case: &'a CaseResult,
    generation_before: String,
    generation_after: String,
    /// Seconds per phase of the edit (template sampling, value optimisation, ...).
    phases: BTreeMap<&'static str, f64>,
    /// How each target-vector optimisation ended (locate-then-edit methods).
    value_fits: &'a [ValueFit],
}

fn pairs(what: &str, prompts: &[String], answers: &[String]) -> anyhow::Result<Option<PromptSet>> {
    if prompts.len() != answers.len() {
        bail!(
            "{} --{what}-prompt but {} --{what}-answer",
            prompts.len(),
            answers.len()
        );
    }
    Ok((!prompts.is_empty()).then(|| PromptSet {
        prompt: prompts.to_vec(),
        ground_truth: answers.to_vec(),
    }))
}

fn request_from(args: &ApplyArgs) -> anyhow::Result<EditRequest> {
    if let Some(path) = &args.request {
        let ds = read_dataset(path, None)?;
        return match ds.cases.len() {
            1 => Ok(ds
                .cases
                .into_iter()
                .next()
                .map(|(_, r)| r)
                .context("no request")?),
            n => bail!(
                "{}: holds {n} usable records; --request takes exactly one",
                path.display()
            ),
        };
    }
    let mut request = EditRequest {
        prompt: args.prompt.clone().context("--prompt is required")?,
        target_new: args.target.clone().context("--target is required")?,
        ground_truth: args.ground_truth.clone(),
        portability: Default::default(),
        locality: Default::default(),
        subject: args.subject.clone(),
        rephrase_prompt: args.rephrase.clone(),
        sentiment: None,
    };
    if let Some(set) = pairs("locality", &args.locality_prompt, &args.locality_answer)? {
        request.locality.insert("neighborhood".into(), set);
    }
    if let Some(set) = pairs(
        "portability",
        &args.portability_prompt,
        &args.portability_answer,
    )? {
        request.portability.insert("portability".into(), set);
    }
    if let Some(subject) = &request.subject {
        if !request.prompt.contains(subject.as_str()) {
            bail!(
                "--subject {subject:?} does not occur in --prompt {:?}",
                request.prompt
            );
        }
    }
    Ok(request)
}

pub fn run(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    let request = request_from(&args)?;
    let mut model = args.model.load()?;
    let greedy = |m: &crate::model::Model| -> anyhow::Result<String> {
        Ok(
            m.generate(&request.prompt, args.max_new_tokens, Sampling::Greedy)?
                .text,
        )
    };
    let opts = RunOptions {
        batch_size: 1,
        scoring: args.metric.scoring(args.gen_em_leading_space),
        fluency_seed: Some(args.seed),
        protocol: Protocol::Single,
        sentiment: if args.convsent_corrected {
            SentimentProtocol::Corrected
        } else {
            SentimentProtocol::AsPublished
        },
        chat_template: args.chat_template
            || match &args.hparams {
                Some(h) => crate::editors::hparams::wants_chat_template(h)?,
                None => false,
            },
        ctx: EditCtx { seed: args.seed },
    };
    let before = measure_before(&model, &request, &opts)?;
    let generation_before = greedy(&model)?;
    let start = std::time::Instant::now();
    let (edit, name) = match (&args.patch, &args.editor) {
        (Some(patch), _) => (
            Edit::load(&model, patch)?.reapply(&mut model)?,
            "patch".to_string(),
        ),
        (None, Some(editor)) => {
            let hparams = match &args.hparams {
                Some(p) => p.clone(),
                None => default_hparams(editor, model.spec())?,
            };
            let mut editor = build_editor(editor, &hparams)?;
            let edit = editor.apply(&mut model, std::slice::from_ref(&request), &opts.ctx)?;
            (edit, editor.name().to_string())
        }
        (None, None) => bail!("give --editor or --patch"),
    };
    let seconds = start.elapsed().as_secs_f64();
    let case = measure_after(&model, 0, &request, before, seconds, &opts)?;
    let generation_after = greedy(&model)?;
    if let Some(path) = &args.save_edit {
        edit.save(&model, path)
            .with_context(|| format!("saving the edit to {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let report = Report {
            case: &case,
            generation_before,
            generation_after,
            phases: edit.phases.iter().collect(),
            value_fits: &edit.value_fits,
        };
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        let summary = summarize(std::slice::from_ref(&case));
        writeln!(
            out,
            "{name}: {:?} -> {:?} in {seconds:.2} s",
            request.prompt, request.target_new
        )?;
        if edit.phases.iter().next().is_some() {
            writeln!(out, "time: {}", edit.phases)?;
        }
        for fit in &edit.value_fits {
            writeln!(
                out,
                "value fit: {} steps, final loss {:.4}",
                fit.steps, fit.loss
            )?;
        }
        write!(out, "{}", summary.table())?;
        writeln!(out, "before: {}{}", request.prompt, generation_before)?;
        writeln!(out, "after:  {}{}", request.prompt, generation_after)?;
        if let Some(path) = &args.save_edit {
            writeln!(out, "edit saved to {}", path.display())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use super::{InstructionArgs, ModelArgs, StoreArgs};
use crate::data::{read_dataset, EditRequest, PromptSet};
use crate::editors::registry::overlay_from_parts;
use crate::editors::{build_editor_with_archive, default_hparams, patch, Edit, Patch};
use crate::eval::case::{measure_after, measure_before, CaseResult, MeasureOptions};
use crate::eval::sentiment::SentimentProtocol;
use crate::model::Sampling;
use crate::report::summary::summarize;

#[derive(Args, Debug)]
pub struct ApplyArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    stores: StoreArgs,
    #[command(flatten)]
    instruction: InstructionArgs,
    /// Editing method; not needed with --patch alone
    #[arg(long, required_unless_present = "patch", value_parser = super::editor_parser())]
    editor: Option<String>,
    /// EasyEdit hyperparameter YAML (default: hparams/<METHOD>/<model>.yaml for known models)
    #[arg(long)]
    hparams: Option<PathBuf>,
    /// A trained editor's checkpoint (MEND, KE: a `kedit train --out` folder or a .safetensors
    /// in it), instead of the hparams file's `archive:`
    #[arg(long)]
    archive: Option<PathBuf>,
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
    /// Re-apply an edit saved with --save-edit (repeatable: patches stack in the order they were
    /// made). With --editor, the editor then continues from the last patch's editor state, as a
    /// sequential edit in one process would
    #[arg(long)]
    patch: Vec<PathBuf>,
    /// Write the edit here (safetensors: the changed weights, overlays and the editor's state,
    /// with a header naming the method and the model's fingerprint)
    #[arg(long)]
    save_edit: Option<PathBuf>,
    /// Tokens of greedy continuation to show before and after
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// Seed of the fluency sample (the same before and after the edit)
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Skip the fluency sample (100 tokens, more than a small model's context may hold)
    #[arg(long)]
    no_fluency: bool,
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
    /// The method's own report (value fits of the locate-then-edit methods, ...).
    #[serde(flatten)]
    method: serde_json::Map<String, serde_json::Value>,
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

/// The request, and the layout of the file it came from.
fn request_from(args: &ApplyArgs) -> anyhow::Result<(EditRequest, Option<crate::data::Format>)> {
    if let Some(path) = &args.request {
        let ds = read_dataset(path, None)?;
        return match ds.cases.len() {
            1 => Ok((
                ds.cases
                    .into_iter()
                    .next()
                    .map(|(_, r)| r)
                    .context("no request")?,
                Some(ds.format),
            )),
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
    Ok((request, None))
}

pub fn run(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    let (request, format) = request_from(&args)?;
    let data = args.request.as_deref().zip(format);
    let instruction = args
        .instruction
        .instruction(args.editor.as_deref().unwrap_or(""), data)?;
    // InstructEdit edits, and is measured on, the prompts wrapped in its instruction.
    let request = match &instruction {
        Some((task, description)) => crate::data::instructions::Instructions::builtin()?
            .wrap_request(*task, description, &request),
        None => request,
    };
    // A file given by name is read before the model: a bad field should not wait for a 13 GB load.
    let named_editor = match (&args.editor, &args.hparams) {
        (Some(name), Some(h)) => Some(build_editor_with_archive(name, h, args.archive.as_deref())?),
        _ => None,
    };
    let mut model = args.model.load()?;
    let greedy = |m: &crate::model::Model| -> anyhow::Result<String> {
        Ok(
            m.generate(&request.prompt, args.max_new_tokens, Sampling::Greedy)?
                .text,
        )
    };
    let hparams = match (&args.hparams, &args.editor) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(editor)) => {
            let found = default_hparams(editor, model.spec(), &super::hparams_roots())?;
            if !args.json {
                eprintln!("kedit: using {}", found.display());
            }
            Some(found)
        }
        (None, None) => None,
    };
    let opts = MeasureOptions {
        scoring: args.metric.scoring(args.gen_em_leading_space),
        fluency_seed: (!args.no_fluency).then_some(args.seed),
        sentiment: if args.convsent_corrected {
            SentimentProtocol::Corrected
        } else {
            SentimentProtocol::AsPublished
        },
        chat_template: args.chat_template
            || match &hparams {
                Some(h) => crate::editors::hparams::wants_chat_template(h)?,
                None => false,
            },
    };
    let ctx = args.stores.ctx(args.seed);
    let mut editor = match (named_editor, &args.editor, &hparams) {
        (Some(editor), _, _) => Some(editor),
        (None, Some(name), Some(h)) => {
            Some(build_editor_with_archive(name, h, args.archive.as_deref())?)
        }
        _ => None,
    };

    // Statistics and templates belong to the unedited model: taken before the patches change it,
    // as the process that made them took them.
    if let (Some(editor), false) = (editor.as_mut(), args.patch.is_empty()) {
        editor.prepare(&model, &ctx)?;
    }
    // Patches first, each checked against the model the previous one left.
    let mut patched = Edit::default();
    // The last patch's editor state, with the method that saved it.
    let mut state: Option<(String, crate::editors::EditorState)> = None;
    let mut patch_method = None;
    // What a merged patch (--patch ... --save-edit without --editor) was made on: the first one's model.
    let mut first_made_on = None;
    for path in &args.patch {
        let p = Patch::load(&model, path, &overlay_from_parts)?;
        if first_made_on.is_none() {
            first_made_on = Some(
                p.header
                    .as_ref()
                    .map(|h| h.model_fingerprint.clone())
                    .unwrap_or_default(),
            );
        }
        let done = p.edit.reapply(&mut model)?;
        patched.changes.extend(done.changes);
        let method = p.method().map(str::to_string);
        if let (Some(method), Some(s)) = (&method, p.state) {
            state = Some((method.clone(), s));
        }
        patch_method = method.or(patch_method);
    }
    // The state is the memory of the method that saved it; another method starts afresh.
    if let (Some(editor), Some((method, state))) = (editor.as_mut(), &state) {
        if method == editor.name() {
            editor
                .restore_state(state)
                .context("restoring the editor's state from the last --patch")?;
        }
    }

    let before = measure_before(&model, &request, &opts)?;
    let generation_before = greedy(&model)?;
    let base_fingerprint = match (&args.save_edit, &editor) {
        (Some(_), Some(_)) => Some(model.fingerprint()?),
        _ => None,
    };
    let start = std::time::Instant::now();
    let (edit, name) = match editor.as_mut() {
        Some(editor) => {
            let edit = editor.apply(&mut model, std::slice::from_ref(&request), &ctx)?;
            (edit, editor.name().to_string())
        }
        None => (
            std::mem::take(&mut patched),
            patch_method.clone().unwrap_or_else(|| "patch".into()),
        ),
    };
    let seconds = start.elapsed().as_secs_f64();
    let case = measure_after(&model, 0, &request, before, seconds, &opts)?;
    let generation_after = greedy(&model)?;
    if let Some(path) = &args.save_edit {
        let editor_state = match editor.as_ref() {
            Some(editor) => editor.state()?,
            None => state.map(|(_, s)| s),
        };
        // Patches alone are saved against the model the first of them was made on.
        let made_on = base_fingerprint.or(first_made_on).unwrap_or_default();
        patch::save(path, &model, &name, &made_on, &edit, editor_state.as_ref())
            .with_context(|| format!("saving the edit to {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let method = match edit.report.as_ref().map(|r| r.to_json()) {
            Some(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        let report = Report {
            case: &case,
            generation_before,
            generation_after,
            phases: edit.phases.iter().collect(),
            method,
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
        for line in edit.report.iter().flat_map(|r| r.lines()) {
            writeln!(out, "{line}")?;
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

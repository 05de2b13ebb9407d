//! CounterFact in its two layouts (SPEC-eval §3.3, §3.4).

use std::collections::BTreeMap;

use super::{one_hop_portability, single, EditRequest, Parsed, PromptSet, Record};

/// EasyEdit's flattened CounterFact: locality key `neighborhood` from `locality_prompt`.
pub(super) fn parse_easyedit(record: &Record<'_>) -> Result<Parsed, String> {
    let mut locality = BTreeMap::new();
    locality.insert(
        "neighborhood".to_string(),
        single(
            record.string("locality_prompt")?,
            record.string("locality_ground_truth")?,
        ),
    );
    Ok(Parsed::Request(EditRequest {
        prompt: record.string("prompt")?,
        target_new: record.string("target_new")?,
        ground_truth: record.opt_string("ground_truth")?,
        portability: BTreeMap::new(),
        locality,
        subject: Some(record.string("subject")?),
        rephrase_prompt: record.opt_string("rephrase_prompt")?,
        sentiment: None,
    }))
}

/// ROME's CounterFact: the prompt is `requested_rewrite.prompt` with the subject put in its `{}`,
/// the rephrase is the first paraphrase, locality `neighborhood` asks every neighbourhood prompt for
/// the true target. The EasyEdit bundle's extensions add portability `one_hop` (GPT-4 questions),
/// `subject_replace` (the rewrite asked about an alias) and locality `distracting`.
pub(super) fn parse_rome(record: &Record<'_>) -> Result<Parsed, String> {
    let rewrite = record.object("requested_rewrite")?;
    let template = rewrite
        .string("prompt")
        .map_err(|e| format!("requested_rewrite: {e}"))?;
    if template.matches("{}").count() != 1 {
        return Err(format!(
            "field \"requested_rewrite\".prompt should hold one {{}} placeholder: {template:?}"
        ));
    }
    let subject = rewrite
        .string("subject")
        .map_err(|e| format!("requested_rewrite: {e}"))?;
    let target = |key: &str| -> Result<String, String> {
        rewrite
            .object(key)
            .and_then(|t| t.string("str"))
            .map_err(|e| format!("requested_rewrite.{key}: {e}"))
    };
    let target_new = target("target_new")?;
    let target_true = target("target_true")?;
    let neighbours = record.strings("neighborhood_prompts")?;
    let mut locality = BTreeMap::new();
    locality.insert(
        "neighborhood".to_string(),
        PromptSet {
            ground_truth: vec![target_true.clone(); neighbours.len()],
            prompt: neighbours,
        },
    );
    if record.get("distracting_neighborhood_prompts").is_some() {
        let prompts = record.strings("distracting_neighborhood_prompts")?;
        locality.insert(
            "distracting".to_string(),
            PromptSet {
                ground_truth: vec![target_true.clone(); prompts.len()],
                prompt: prompts,
            },
        );
    }
    let mut portability = BTreeMap::new();
    if let Some(set) = one_hop_portability(record)? {
        portability.insert("one_hop".to_string(), set);
    }
    if record.get("alternative_subject").is_some() {
        let alias = record.string("alternative_subject")?;
        portability.insert(
            "subject_replace".to_string(),
            single(template.replace("{}", &alias), target_new.clone()),
        );
    }
    let paraphrases = record.strings("paraphrase_prompts")?;
    Ok(Parsed::Request(EditRequest {
        prompt: template.replace("{}", &subject),
        target_new,
        ground_truth: Some(target_true),
        portability,
        locality,
        subject: Some(subject),
        rephrase_prompt: paraphrases.into_iter().next(),
        sentiment: None,
    }))
}

//! KnowEdit's layout (SPEC-eval §3.1), mapped as EasyEdit's `run_knowedit_llama2.py` does: the
//! first string of each nested ground truth, prompts with a blank answer dropped, portability
//! `Reasoning` renamed to the lowercase `reasoning` EasyEdit reports. WikiBio's `text`/`labels`/
//! `concept` stand for prompt, target and subject.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{first_string, EditRequest, Parsed, PromptSet, Record};

const LOCALITY_KEYS: [(&str, &str); 2] = [
    ("Relation_Specificity", "Relation_Specificity"),
    ("Forgetfulness", "Forgetfulness"),
];
const PORTABILITY_KEYS: [(&str, &str); 3] = [
    ("Reasoning", "reasoning"),
    ("Subject_Aliasing", "Subject_Aliasing"),
    ("Logical_Generalization", "Logical_Generalization"),
];

pub(super) fn parse(record: &Record<'_>) -> Result<Parsed, String> {
    let wikibio = record.get("text").is_some() && record.get("prompt").is_none();
    let (prompt, target_new, subject) = if wikibio {
        (
            record.string("text")?,
            record.string("labels")?,
            record.opt_string("concept")?,
        )
    } else {
        (
            record.string("prompt")?,
            record.string("target_new")?,
            record.opt_string("subject")?,
        )
    };
    let ground_truth = match record.get("ground_truth") {
        None => None,
        Some(v) => Some(
            first_string(v)
                .ok_or("field \"ground_truth\" holds no string")?
                .to_string(),
        ),
    };
    let locality = groups(record, "locality", &LOCALITY_KEYS)?;
    let portability = if wikibio {
        BTreeMap::new()
    } else {
        groups(record, "portability", &PORTABILITY_KEYS)?
    };
    Ok(Parsed::Request(EditRequest {
        prompt,
        target_new,
        ground_truth,
        portability,
        locality,
        subject,
        rephrase_prompt: record.opt_string("rephrase_prompt")?,
        sentiment: None,
    }))
}

/// Reads `{Key: [{prompt, ground_truth}, ...]}` for the known keys, renaming them as EasyEdit does.
fn groups(
    record: &Record<'_>,
    field: &str,
    keys: &[(&str, &str)],
) -> Result<BTreeMap<String, PromptSet>, String> {
    let mut out = BTreeMap::new();
    let Some(section) = record.get(field) else {
        return Ok(out);
    };
    let Value::Object(section) = section else {
        return Err(format!("field {field:?} should be an object"));
    };
    for (key, renamed) in keys {
        let Some(items) = section.get(*key).filter(|v| !v.is_null()) else {
            continue;
        };
        let Value::Array(items) = items else {
            return Err(format!("field {field:?}.{key} should be a list"));
        };
        let mut set = PromptSet {
            prompt: Vec::new(),
            ground_truth: Vec::new(),
        };
        for (i, item) in items.iter().enumerate() {
            let at = || format!("{field:?}.{key}[{i}]");
            let prompt = item
                .get("prompt")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("field {}.prompt is missing or not a string", at()))?;
            let answer = match item.get("ground_truth") {
                Some(Value::String(s)) => s.as_str(),
                // An empty alias list (`[[]]` occurs in WikiData_counterfact) is a blank answer.
                Some(v @ Value::Array(_)) => first_string(v).unwrap_or(""),
                _ => {
                    return Err(format!(
                        "field {}.ground_truth is missing or not a string or list",
                        at()
                    ))
                }
            };
            if answer.trim().is_empty() {
                continue;
            }
            set.prompt.push(prompt.to_string());
            set.ground_truth.push(answer.to_string());
        }
        // EasyEdit crashes on a key whose answers are all blank; such a key is left out instead.
        if !set.prompt.is_empty() {
            out.insert(renamed.to_string(), set);
        }
    }
    Ok(out)
}

//! MEND's ZsRE layout (SPEC-eval §3.2) and the EasyEdit bundle's ZsRE portability sets.

use std::collections::BTreeMap;

use super::{one_hop_portability, single, EditRequest, Parsed, Record};

/// `src` → prompt, `alt` → target, `answers[0]` → ground truth, `rephrase`; locality
/// `neighborhood` from `loc`/`loc_ans` (kept with its `nq question:` prefix, as EasyEdit passes it);
/// portability `one_hop`, `inverse_relation` (answered by the subject) and `subject_replace`.
/// Records with an empty `alt` are skipped, as EasyEdit's `ZsreDataset` skips them.
pub(super) fn parse(record: &Record<'_>) -> Result<Parsed, String> {
    let alt = record.string("alt")?;
    if alt.is_empty() {
        return Ok(Parsed::Skip("empty \"alt\"".into()));
    }
    let subject = record.string("subject")?;
    let answers = record.strings("answers")?;
    let mut locality = BTreeMap::new();
    if record.get("loc").is_some() {
        locality.insert(
            "neighborhood".to_string(),
            single(record.string("loc")?, record.string("loc_ans")?),
        );
    }
    let mut portability = BTreeMap::new();
    if let Some(set) = one_hop_portability(record)? {
        portability.insert("one_hop".to_string(), set);
    }
    if record.get("inverse question").is_some() {
        portability.insert(
            "inverse_relation".to_string(),
            single(record.string("inverse question")?, subject.clone()),
        );
    }
    if record.get("alter_subject_question").is_some() {
        portability.insert(
            "subject_replace".to_string(),
            single(record.string("alter_subject_question")?, alt.clone()),
        );
    }
    Ok(Parsed::Request(EditRequest {
        prompt: record.string("src")?,
        target_new: alt,
        ground_truth: answers.into_iter().next(),
        portability,
        locality,
        subject: Some(subject),
        rephrase_prompt: record.opt_string("rephrase")?,
        sentiment: None,
    }))
}

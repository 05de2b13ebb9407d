//! KnowEdit's Sanitation test file (SPEC-eval §2.9, §3.1): `{"success": [...], "locality": [...]}`.
//! `success` items become edit requests ("answer I don't know."); `locality` items are the
//! questions checked once after every edit, shared by all cases.

use std::path::Path;

use serde_json::{Map, Value};

use super::{DataError, Dataset, EditRequest, Format, PromptSet, Record};

/// The question template of `run_santinization_llama2.py`.
pub const SANITATION_TEMPLATE: &str = "Question:{}\nAnswer:";

pub(super) fn looks_like(o: &Map<String, Value>) -> bool {
    o.contains_key("success") && o.contains_key("locality")
}

fn question(q: &str) -> String {
    SANITATION_TEMPLATE.replace("{}", q)
}

fn items<'a>(path: &Path, o: &'a Map<String, Value>, key: &str) -> Result<&'a [Value], DataError> {
    match o.get(key) {
        Some(Value::Array(items)) => Ok(items),
        _ => Err(DataError::File {
            file: path.to_path_buf(),
            msg: format!("field {key:?} should be a list of items"),
        }),
    }
}

pub(super) fn read(path: &Path, o: &Map<String, Value>) -> Result<Dataset, DataError> {
    let record_err = |part: &str, index: usize, msg: String| DataError::Record {
        file: path.to_path_buf(),
        index,
        msg: format!("{part}: {msg}"),
    };
    let mut cases = Vec::new();
    for (index, value) in items(path, o, "success")?.iter().enumerate() {
        let r = Record { value };
        let parse = || -> Result<EditRequest, String> {
            Ok(EditRequest {
                prompt: question(&r.string("question")?),
                target_new: r.string("target_new")?,
                ground_truth: Some(r.string("ground_truth")?),
                portability: Default::default(),
                locality: Default::default(),
                subject: r.opt_string("subject")?,
                rephrase_prompt: None,
                sentiment: None,
            })
        };
        cases.push((index, parse().map_err(|e| record_err("success", index, e))?));
    }
    let mut locality = PromptSet {
        prompt: Vec::new(),
        ground_truth: Vec::new(),
    };
    for (index, value) in items(path, o, "locality")?.iter().enumerate() {
        let r = Record { value };
        let q = r
            .string("question")
            .map_err(|e| record_err("locality", index, e))?;
        let a = r
            .string("ground_truth")
            .map_err(|e| record_err("locality", index, e))?;
        locality.prompt.push(question(&q));
        locality.ground_truth.push(a);
    }
    if cases.is_empty() {
        return Err(DataError::File {
            file: path.to_path_buf(),
            msg: "field \"success\" holds no items".into(),
        });
    }
    Ok(Dataset {
        path: path.to_path_buf(),
        format: Format::Sanitation,
        cases,
        skipped: Vec::new(),
        shared_locality: Some(locality),
    })
}

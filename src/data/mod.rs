//! Benchmark records → one [`EditRequest`] type. Every layout in EasyEdit's data is read unchanged;
//! the conversion rules are SPEC-eval §3. Errors name the file, the record index and the field.

pub mod convsent;
mod counterfact;
pub mod instructions;
mod knowedit;
pub mod python_random;
mod sanitation;
pub mod stable_hash;
mod zsre;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use convsent::SentimentProbe;
pub use sanitation::SANITATION_TEMPLATE;

/// Prompts of one locality or portability key, each with its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptSet {
    pub prompt: Vec<String>,
    pub ground_truth: Vec<String>,
}

/// One edit and everything it is evaluated on. Serialises with EasyEdit's `requested_rewrite` keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EditRequest {
    pub prompt: String,
    pub target_new: String,
    /// The old answer; no standard metric reads it.
    pub ground_truth: Option<String>,
    #[serde(default)]
    pub portability: BTreeMap<String, PromptSet>,
    #[serde(default)]
    pub locality: BTreeMap<String, PromptSet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rephrase_prompt: Option<String>,
    /// ConvSent's sentiment probes (EasyEdit's `metric_kwargs`, which its `requested_rewrite`
    /// does not carry either).
    #[serde(skip)]
    pub sentiment: Option<Box<SentimentProbe>>,
}

impl EditRequest {
    /// The subject, which locate-then-edit methods need inside the prompt.
    pub fn subject_in_prompt(&self) -> Result<&str, String> {
        let subject = self
            .subject
            .as_deref()
            .ok_or_else(|| "field \"subject\" is missing".to_string())?;
        if !self.prompt.contains(subject) {
            return Err(format!(
                "subject {subject:?} does not occur in prompt {:?}",
                self.prompt
            ));
        }
        Ok(subject)
    }
}

/// The record layouts kedit reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// KnowEdit ZsRE, WikiData_recent, WikiData_counterfact and WikiBio (`prompt`/`text`, nested `locality`/`portability`).
    Knowedit,
    /// EasyEdit's flattened CounterFact (`locality_prompt`, `locality_ground_truth`).
    Counterfact,
    /// ROME's CounterFact (`requested_rewrite` with a `{}` placeholder), with the portability and
    /// distracting-neighbour extensions.
    RomeCounterfact,
    /// MEND's ZsRE (`src`, `alt`, `rephrase`, `loc`, `loc_ans`), with the portability extensions.
    ZsreMend,
    /// KnowEdit's ConvSent (`ent`, `pos`, `neg`): sentiment edits scored by `es` and `dd`.
    Convsent,
    /// KnowEdit's Sanitation test file (`{"success": [...], "locality": [...]}`): questions to
    /// answer "I don't know." and questions whose answers must not change.
    Sanitation,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Knowedit => "knowedit",
            Format::Counterfact => "counterfact",
            Format::RomeCounterfact => "rome-counterfact",
            Format::ZsreMend => "zsre-mend",
            Format::Convsent => "convsent",
            Format::Sanitation => "sanitation",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {msg}", file.display())]
    File { file: PathBuf, msg: String },
    #[error("{} record {index}: {msg}", file.display())]
    Record {
        file: PathBuf,
        index: usize,
        msg: String,
    },
}

/// A dataset read into requests, with the records the layout's own loader skips.
#[derive(Debug)]
pub struct Dataset {
    pub path: PathBuf,
    pub format: Format,
    /// `(record index, request)`, in file order.
    pub cases: Vec<(usize, EditRequest)>,
    /// `(record index, why)` for records skipped as EasyEdit's loader skips them.
    pub skipped: Vec<(usize, String)>,
    /// Questions checked once after all edits rather than per case (Sanitation's `locality`),
    /// with their reference answers.
    pub shared_locality: Option<PromptSet>,
}

/// What a layout reader returns per record.
pub(crate) enum Parsed {
    Request(EditRequest),
    Skip(String),
}

/// Reads `path`, detecting the layout from its first record unless `format` is given.
pub fn read_dataset(path: &Path, format: Option<Format>) -> Result<Dataset, DataError> {
    let file_err = |msg: String| DataError::File {
        file: path.to_path_buf(),
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| file_err(format!("invalid JSON: {e}")))?;
    let records = match value {
        Value::Array(records) => records,
        Value::Object(ref o)
            if format == Some(Format::Sanitation)
                || (format.is_none() && sanitation::looks_like(o)) =>
        {
            return sanitation::read(path, o);
        }
        // A single record on its own (`kedit apply --request`).
        record @ Value::Object(_) => vec![record],
        _ => {
            return Err(file_err(
                "expected a JSON array of records or one record".into(),
            ))
        }
    };
    let first = records
        .first()
        .ok_or_else(|| file_err("the file holds no records".into()))?;
    let format = match format {
        Some(f) => f,
        None => detect(first).map_err(file_err)?,
    };
    let record_err = |(index, msg): (usize, String)| DataError::Record {
        file: path.to_path_buf(),
        index,
        msg,
    };
    let mut cases = Vec::with_capacity(records.len());
    let mut skipped = Vec::new();
    match format {
        Format::Convsent => {
            cases = convsent::read(&records)
                .map_err(record_err)?
                .into_iter()
                .enumerate()
                .collect();
        }
        Format::Sanitation => {
            return Err(file_err(
                "the Sanitation layout is an object {\"success\": [...], \"locality\": [...]}"
                    .into(),
            ))
        }
        _ => {
            for (index, record) in records.iter().enumerate() {
                let record = Record { value: record };
                let parsed = match format {
                    Format::Knowedit => knowedit::parse(&record),
                    Format::Counterfact => counterfact::parse_easyedit(&record),
                    Format::RomeCounterfact => counterfact::parse_rome(&record),
                    Format::ZsreMend => zsre::parse(&record),
                    Format::Convsent | Format::Sanitation => unreachable!("read above"),
                }
                .map_err(|msg| record_err((index, msg)))?;
                match parsed {
                    Parsed::Request(r) => cases.push((index, r)),
                    Parsed::Skip(why) => skipped.push((index, why)),
                }
            }
        }
    }
    Ok(Dataset {
        path: path.to_path_buf(),
        format,
        cases,
        skipped,
        shared_locality: None,
    })
}

/// Recognises a layout by the keys of one record.
pub fn detect(record: &Value) -> Result<Format, String> {
    let Some(o) = record.as_object() else {
        return Err("the first record is not a JSON object".into());
    };
    let has = |k: &str| o.contains_key(k);
    if has("requested_rewrite") {
        Ok(Format::RomeCounterfact)
    } else if has("src") && has("alt") {
        Ok(Format::ZsreMend)
    } else if has("locality_prompt") && has("target_new") {
        Ok(Format::Counterfact)
    } else if (has("prompt") && has("target_new")) || (has("text") && has("labels")) {
        Ok(Format::Knowedit)
    } else if has("ent") && has("pos") && has("neg") {
        Ok(Format::Convsent)
    } else {
        let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
        keys.sort_unstable();
        Err(format!(
            "cannot tell the layout from the first record's fields ({}); pass --format",
            keys.join(", ")
        ))
    }
}

/// Typed access to one record's fields, with errors that name the field.
pub(crate) struct Record<'a> {
    value: &'a Value,
}

impl<'a> Record<'a> {
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn string(&self, key: &str) -> Result<String, String> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(format!(
                "field {key:?} should be a string, found {}",
                kind(other)
            )),
            None => Err(format!("field {key:?} is missing")),
        }
    }

    pub(crate) fn opt_string(&self, key: &str) -> Result<Option<String>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.string(key).map(Some),
        }
    }

    pub(crate) fn strings(&self, key: &str) -> Result<Vec<String>, String> {
        match self.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(format!(
                        "field {key:?}[{i}] should be a string, found {}",
                        kind(other)
                    )),
                })
                .collect(),
            Some(other) => Err(format!(
                "field {key:?} should be a list of strings, found {}",
                kind(other)
            )),
            None => Err(format!("field {key:?} is missing")),
        }
    }

    pub(crate) fn object(&self, key: &str) -> Result<Record<'a>, String> {
        match self.get(key) {
            Some(v @ Value::Object(_)) => Ok(Record { value: v }),
            Some(other) => Err(format!(
                "field {key:?} should be an object, found {}",
                kind(other)
            )),
            None => Err(format!("field {key:?} is missing")),
        }
    }
}

/// One prompt with its answer.
pub(crate) fn single(prompt: String, answer: String) -> PromptSet {
    PromptSet {
        prompt: vec![prompt],
        ground_truth: vec![answer],
    }
}

/// The EasyEdit bundle's GPT-4 one-hop question (`portability: {"New Question", "New Answer"}`),
/// shared by its CounterFact and ZsRE portability files.
pub(crate) fn one_hop_portability(record: &Record<'_>) -> Result<Option<PromptSet>, String> {
    if record.get("portability").is_none() {
        return Ok(None);
    }
    let p = record.object("portability")?;
    let field = |k: &str| p.string(k).map_err(|e| format!("portability: {e}"));
    Ok(Some(single(field("New Question")?, field("New Answer")?)))
}

/// The first string of a ground truth that may be a string, a list of aliases, or a list of
/// alias lists (KnowEdit mixes all three).
pub(crate) fn first_string(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Array(items) => items.first().and_then(first_string),
        _ => None,
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_string_recurses_into_nested_lists() {
        let v: Value = serde_json::json!([["Syrian pound", "SYP"], ["x"]]);
        assert_eq!(first_string(&v), Some("Syrian pound"));
        assert_eq!(first_string(&serde_json::json!("Paris")), Some("Paris"));
        assert_eq!(first_string(&serde_json::json!([])), None);
        assert_eq!(first_string(&serde_json::json!(3)), None);
    }

    #[test]
    fn subject_must_occur_in_the_prompt() {
        let mut r = EditRequest {
            prompt: "The mother tongue of Danielle Darrieux is".into(),
            target_new: "English".into(),
            ground_truth: None,
            portability: BTreeMap::new(),
            locality: BTreeMap::new(),
            subject: Some("Danielle Darrieux".into()),
            rephrase_prompt: None,
            sentiment: None,
        };
        assert_eq!(r.subject_in_prompt(), Ok("Danielle Darrieux"));
        r.subject = Some("Darrieux, Danielle".into());
        assert!(r
            .subject_in_prompt()
            .unwrap_err()
            .contains("does not occur"));
        r.subject = None;
        assert!(r.subject_in_prompt().unwrap_err().contains("missing"));
    }
}

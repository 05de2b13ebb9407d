//! Results as JSON lines, one per case with EasyEdit's keys, streamed to disk as each case ends.
//!
//! Beside a results file `R` lies `R.run.json`, the [`RunRecord`] of the settings that made it,
//! so that `--resume` continues only a run made the same way. The record is a sidecar rather than
//! a header line so that every line of `R` stays a case, as EasyEdit's analysis scripts read it.
//! Neither file exists until the first case is written: a run that fails before it leaves nothing.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::eval::case::CaseResult;

/// The settings a run's numbers depend on. Two runs with equal records may share a results file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub editor: String,
    /// sha256 of the hyperparameter file's bytes (its path may differ between machines).
    pub hparams_sha256: String,
    pub data_sha256: String,
    /// The model's fingerprint (architecture and a sample of every weight).
    pub model: String,
    pub seed: u64,
    pub protocol: String,
    pub batch_size: usize,
    pub metric: String,
    pub fluency: bool,
    pub chat_template: bool,
    pub convsent_corrected: bool,
    /// InstructEdit's task and description, the same for every case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instruction: Option<String>,
    /// `i/n` when the file holds one shard of a sharded run (`kedit eval --shard`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    /// How many cases the run was given (after --offset, --limit and --shard): a file holding
    /// fewer results is incomplete. Not compared on resume, so a run can be extended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cases: Option<usize>,
    /// For a shard: how many cases all shards together were given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_cases: Option<usize>,
    /// Informational: which kedit wrote the file (not compared).
    pub kedit_version: String,
}

impl RunRecord {
    /// The first field in which `self` (the file's) and `now` (this run's) differ, as a message.
    pub fn difference(&self, now: &RunRecord) -> Option<String> {
        self.first_difference(now, &["kedit_version", "cases", "selected_cases"])
            .map(|(k, was, is)| format!("{k} was {was}, this run has {is}"))
    }

    /// The same between the shards of one run (they differ only in which shard and how many
    /// cases), as a message naming `self`'s value first.
    pub fn shard_difference(&self, other: &RunRecord) -> Option<String> {
        self.first_difference(other, &["kedit_version", "cases", "shard"])
            .map(|(k, mine, theirs)| format!("{k} {theirs} against {mine}"))
    }

    fn first_difference(
        &self,
        now: &RunRecord,
        ignored: &[&str],
    ) -> Option<(String, serde_json::Value, serde_json::Value)> {
        let (Ok(serde_json::Value::Object(was)), Ok(serde_json::Value::Object(is))) =
            (serde_json::to_value(self), serde_json::to_value(now))
        else {
            return Some(("record".into(), "unreadable".into(), "unreadable".into()));
        };
        was.into_iter()
            .filter(|(k, _)| !ignored.contains(&k.as_str()))
            .find(|(k, v)| is.get(k.as_str()) != Some(v))
            .map(|(k, v)| {
                let now = is.get(k.as_str()).cloned().unwrap_or_default();
                (k, v, now)
            })
    }
}

/// sha256 of a file's bytes, hex.
pub fn file_sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// `R.run.json` for results file `R`.
pub fn record_path(results: &Path) -> PathBuf {
    let mut name = results.as_os_str().to_owned();
    name.push(".run.json");
    PathBuf::from(name)
}

/// Where results go: a file (created with its record at the first case) or standard output.
pub struct ResultsSink {
    target: Target,
    record: RunRecord,
}

enum Target {
    Stdout,
    File { path: PathBuf, open: Option<File> },
}

impl ResultsSink {
    pub fn stdout(record: RunRecord) -> Self {
        ResultsSink {
            target: Target::Stdout,
            record,
        }
    }

    /// A new results file. One that already holds results is refused: nothing is overwritten.
    pub fn create(path: &Path, record: RunRecord) -> Result<Self> {
        if path.exists()
            && std::fs::metadata(path)
                .map_err(|e| Error::io(path, e))?
                .len()
                > 0
        {
            return Err(Error::file(
                path,
                "already holds results; pass --resume to continue it or choose another --out",
            ));
        }
        Ok(ResultsSink {
            target: Target::File {
                path: path.to_path_buf(),
                open: None,
            },
            record,
        })
    }

    /// Continues a results file: the cases it holds (a partial last line, an interrupted write,
    /// is dropped), after checking that its run record matches this run's. A file without a
    /// record (written by kedit before records existed) is continued with a warning.
    pub fn resume(path: &Path, record: RunRecord) -> Result<(Self, Vec<CaseResult>, Vec<String>)> {
        let mut warnings = Vec::new();
        if !path.exists() {
            return Ok((Self::create(path, record)?, Vec::new(), warnings));
        }
        let sidecar = record_path(path);
        match std::fs::read_to_string(&sidecar) {
            Ok(text) => {
                let was: RunRecord = serde_json::from_str(&text)
                    .map_err(|e| Error::file(&sidecar, format!("not a kedit run record: {e}")))?;
                if let Some(diff) = was.difference(&record) {
                    return Err(Error::file(
                        path,
                        format!("cannot --resume: it was written by another run ({diff})"),
                    ));
                }
                // A sequential run measured at its end writes results only once its last edit is
                // made: taken further, those results would describe a model it no longer has.
                let finished_shorter = matches!(
                    (was.cases, record.cases),
                    (Some(recorded), Some(now)) if now > recorded
                ) && record.protocol
                    == crate::run::Protocol::SequentialEvalAtEnd.name()
                    && std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
                if finished_shorter {
                    return Err(Error::file(
                        path,
                        format!(
                            "cannot --resume: it holds the final results of a sequential run of {} \
                             cases, measured after its last edit; a longer run needs a new --out",
                            was.cases.unwrap_or_default()
                        ),
                    ));
                }
                // A run resumed with another --limit: the record says how many cases it now has.
                if was.cases != record.cases && record.cases.is_some() {
                    write_record(&sidecar, &record)?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => warnings.push(format!(
                "warning: {} has no run record ({}); its settings cannot be checked against this run's",
                path.display(),
                sidecar.display()
            )),
            Err(e) => return Err(Error::io(&sidecar, e)),
        }
        let previous = read_results(path)?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let sink = ResultsSink {
            target: Target::File {
                path: path.to_path_buf(),
                open: Some(file),
            },
            record,
        };
        Ok((sink, previous, warnings))
    }

    /// Writes one case as one line in one call and flushes it.
    /// Starts the file (and its run record) before any result is in it: a run whose edits were
    /// saved for resuming leaves its record, so that the resumed run is checked against it.
    pub fn start(&mut self) -> Result<()> {
        if let Target::File { path, open } = &mut self.target {
            if open.is_none() {
                *open = Some(start_file(path, &self.record)?);
            }
        }
        Ok(())
    }

    pub fn write(&mut self, result: &impl Serialize) -> Result<()> {
        let mut line = serde_json::to_string(result)
            .map_err(|e| Error::Invalid(format!("cannot serialise a result: {e}")))?;
        line.push('\n');
        match &mut self.target {
            Target::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(line.as_bytes())
                    .and_then(|_| out.flush())
                    .map_err(|e| Error::io("standard output", e))
            }
            Target::File { path, open } => {
                if open.is_none() {
                    *open = Some(start_file(path, &self.record)?);
                }
                let file = open
                    .as_mut()
                    .ok_or_else(|| Error::io(path.as_path(), std::io::Error::other("not open")))?;
                file.write_all(line.as_bytes())
                    .and_then(|_| file.flush())
                    .map_err(|e| Error::io(path.as_path(), e))
            }
        }
    }
}

/// Creates the results file and writes its record beside it (through a temporary file).
fn start_file(path: &Path, record: &RunRecord) -> Result<File> {
    write_record(&record_path(path), record)?;
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// Writes a run record (through a temporary file, so a reader never sees half of it).
fn write_record(sidecar: &Path, record: &RunRecord) -> Result<()> {
    let text = serde_json::to_string_pretty(record)
        .map_err(|e| Error::Invalid(format!("cannot serialise the run record: {e}")))?;
    crate::files::write_atomically(sidecar, text.as_bytes())
}

/// Reads the cases of a results file and truncates it after the last whole line.
fn read_results(path: &Path) -> Result<Vec<CaseResult>> {
    let (results, good_bytes) = read_complete_lines(path)?;
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    file.set_len(good_bytes).map_err(|e| Error::io(path, e))?;
    Ok(results)
}

/// The results of every complete line, and the bytes they take; a partial last line (an
/// interrupted write) is left out and the file is not changed.
pub fn read_complete_lines(path: &Path) -> Result<(Vec<CaseResult>, u64)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut results = Vec::new();
    let mut good_bytes = 0u64;
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    let mut n = 0;
    loop {
        line.clear();
        let read = reader
            .read_line(&mut line)
            .map_err(|e| Error::io(path, e))?;
        if read == 0 {
            break;
        }
        n += 1;
        if !line.ends_with('\n') {
            break;
        }
        let result: CaseResult = serde_json::from_str(&line)
            .map_err(|e| Error::file(path, format!("line {n}: not a kedit result: {e}")))?;
        results.push(result);
        good_bytes += read as u64;
    }
    Ok((results, good_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> RunRecord {
        RunRecord {
            editor: "ROME".into(),
            hparams_sha256: "aa".into(),
            data_sha256: "bb".into(),
            model: "cc".into(),
            seed: 42,
            protocol: "single".into(),
            batch_size: 1,
            metric: "token".into(),
            fluency: false,
            chat_template: false,
            convsent_corrected: false,
            instruction: None,
            shard: None,
            cases: None,
            selected_cases: None,
            kedit_version: "0.1.0".into(),
        }
    }

    #[test]
    fn records_differ_by_the_first_changed_field_but_not_the_version() {
        let a = record();
        let mut b = record();
        b.kedit_version = "9.9.9".into();
        assert_eq!(a.difference(&b), None);
        b.hparams_sha256 = "zz".into();
        assert_eq!(
            a.difference(&b).as_deref(),
            Some("hparams_sha256 was \"aa\", this run has \"zz\"")
        );
    }

    #[test]
    fn a_sink_that_writes_nothing_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let sink = ResultsSink::create(&path, record()).unwrap();
        drop(sink);
        assert!(!path.exists() && !record_path(&path).exists());
        let mut sink = ResultsSink::create(&path, record()).unwrap();
        sink.write(&serde_json::json!({"case_id": 0})).unwrap();
        assert!(path.exists() && record_path(&path).exists());
        assert!(ResultsSink::create(&path, record()).is_err());
    }
}

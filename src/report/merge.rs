//! Merging the results files of one run: the shards of `kedit eval --shard`, or a single file.
//! Nothing is merged that would give a wrong summary: files from different runs, a shard given
//! twice or missing, a case in two files, or a file holding fewer cases than its run was given.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::eval::case::CaseResult;
use crate::report::jsonl::{read_complete_lines, record_path, RunRecord};
use crate::{Error, Result};

/// One run's results, sorted by case id.
pub struct Merged {
    /// The first file's record (the shards' agree but for `shard` and `cases`).
    pub record: Option<RunRecord>,
    pub results: Vec<CaseResult>,
    pub files: Vec<PathBuf>,
}

struct Part {
    path: PathBuf,
    record: Option<RunRecord>,
    results: Vec<CaseResult>,
}

fn read_part(path: &Path) -> Result<Part> {
    let sidecar = record_path(path);
    let record = match std::fs::read_to_string(&sidecar) {
        Ok(text) => Some(
            serde_json::from_str(&text)
                .map_err(|e| Error::file(&sidecar, format!("not a kedit run record: {e}")))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(&sidecar, e)),
    };
    let (results, _) = read_complete_lines(path)?;
    Ok(Part {
        path: path.to_path_buf(),
        record,
        results,
    })
}

fn parse_shard(path: &Path, spec: &str) -> Result<(usize, usize)> {
    crate::run::shard::Shard::numbers(spec)
        .ok_or_else(|| Error::file(path, format!("run record's shard `{spec}` is not i/n")))
}

pub fn merge(paths: &[PathBuf]) -> Result<Merged> {
    let Some(first) = paths.first() else {
        return Err(Error::Invalid("no results files given".into()));
    };
    let parts = paths
        .iter()
        .map(|p| read_part(p))
        .collect::<Result<Vec<_>>>()?;
    if parts.len() > 1 {
        if let Some(part) = parts.iter().find(|p| p.record.is_none()) {
            return Err(Error::file(
                &part.path,
                format!(
                    "no run record ({}): files cannot be merged without knowing they are one run",
                    record_path(&part.path).display()
                ),
            ));
        }
    }
    // Shards: all or none, one count, every index exactly once.
    let shards: Vec<Option<(usize, usize)>> = parts
        .iter()
        .map(
            |p| match p.record.as_ref().and_then(|r| r.shard.as_deref()) {
                Some(spec) => parse_shard(&p.path, spec).map(Some),
                None => Ok(None),
            },
        )
        .collect::<Result<_>>()?;
    if shards.iter().any(Option::is_some) {
        let mut seen: BTreeMap<usize, &Path> = BTreeMap::new();
        let mut count = None;
        for (part, shard) in parts.iter().zip(&shards) {
            let Some((i, n)) = *shard else {
                return Err(Error::file(
                    &part.path,
                    "holds a whole run, the other files hold shards",
                ));
            };
            match count {
                None => count = Some(n),
                Some(c) if c != n => {
                    return Err(Error::file(
                        &part.path,
                        format!("is shard {i}/{n}, the others are of {c} shards"),
                    ))
                }
                Some(_) => {}
            }
            if let Some(other) = seen.insert(i, &part.path) {
                return Err(Error::file(
                    &part.path,
                    format!("shard {i}/{n} is given twice (also {})", other.display()),
                ));
            }
        }
        let n = count.unwrap_or(0);
        if let Some(missing) = (0..n).find(|i| !seen.contains_key(i)) {
            return Err(Error::Invalid(format!(
                "shard {missing}/{n} is missing: give all {n} shards' files (have {})",
                seen.keys()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    } else if parts.len() > 1 {
        return Err(Error::file(
            &parts[1].path,
            format!(
                "and {} are whole runs, not shards: report them one at a time",
                first.display()
            ),
        ));
    }

    let reference = parts[0].record.clone();
    if let Some(reference) = &reference {
        for part in &parts[1..] {
            if let Some(diff) = part
                .record
                .as_ref()
                .and_then(|r| reference.shard_difference(r))
            {
                return Err(Error::file(
                    &part.path,
                    format!("is not from the same run as {} ({diff})", first.display()),
                ));
            }
        }
    }

    // Cases: each once, and each file complete.
    let mut owner: BTreeMap<usize, &Path> = BTreeMap::new();
    for part in &parts {
        for r in &part.results {
            if let Some(other) = owner.insert(r.case_id, &part.path) {
                return Err(Error::file(
                    &part.path,
                    format!("case {} is also in {}", r.case_id, other.display()),
                ));
            }
        }
        if let Some(expected) = part.record.as_ref().and_then(|r| r.cases) {
            if part.results.len() < expected {
                return Err(Error::file(
                    &part.path,
                    format!(
                        "holds {} of the {expected} cases its run was given: finish it with \
                         `kedit eval ... --resume` before reporting",
                        part.results.len()
                    ),
                ));
            }
        }
    }
    let files = parts.iter().map(|p| p.path.clone()).collect();
    let mut results: Vec<CaseResult> = parts.into_iter().flat_map(|p| p.results).collect();
    results.sort_by_key(|r| r.case_id);
    let mut record = reference;
    if let Some(r) = record.as_mut() {
        if r.shard.is_some() {
            r.shard = None;
            r.cases = r.selected_cases.take();
        }
    }
    Ok(Merged {
        record,
        results,
        files,
    })
}

//! What an editor needs besides the model and the requests: everything EasyEdit kept in globals
//! or found through its working directory. The CLI builds it from flags and environment
//! variables; below the CLI nothing reads the environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::rank_one::stats::StatsStore;
use crate::error::{Error, Result};

#[derive(Debug)]
pub struct EditCtx {
    /// Seeds every random choice an editor makes (template sampling, ...).
    pub seed: u64,
    /// Where key statistics are cached and how they are gathered (`kedit stats` writes here).
    pub stats: StatsStore,
    /// Context templates sampled once per model and reused by every editor of the process.
    pub templates: TemplateCache,
    /// Trained editors' checkpoints: where `kedit train` writes and an hparams `archive:` resolves.
    pub artefacts: ArtefactStore,
}

impl Default for EditCtx {
    /// Seed 42, statistics kept in memory only, no artefact folder.
    fn default() -> Self {
        EditCtx {
            seed: 42,
            stats: StatsStore::in_memory(),
            templates: TemplateCache::default(),
            artefacts: ArtefactStore::default(),
        }
    }
}

impl EditCtx {
    /// Stores under one cache folder (`kedit`'s `--cache-dir`): statistics in `stats/`,
    /// trained editors in `artefacts/`.
    pub fn with_cache_dir(seed: u64, cache_dir: &Path) -> Self {
        EditCtx {
            seed,
            stats: StatsStore::on_disk(cache_dir.join("stats")),
            templates: TemplateCache::default(),
            artefacts: ArtefactStore {
                dir: Some(cache_dir.join("artefacts")),
            },
        }
    }
}

/// Context templates by what determines them (model, method, sampling parameters, seed).
#[derive(Debug, Default)]
pub struct TemplateCache(Mutex<BTreeMap<String, Vec<Vec<String>>>>);

impl TemplateCache {
    /// The templates under `key`, sampled by `sample` the first time they are asked for.
    pub fn get_or_sample(
        &self,
        key: &str,
        sample: impl FnOnce() -> Result<Vec<Vec<String>>>,
    ) -> Result<Vec<Vec<String>>> {
        if let Some(found) = self.lock()?.get(key) {
            return Ok(found.clone());
        }
        let sampled = sample()?;
        self.lock()?.insert(key.to_string(), sampled.clone());
        Ok(sampled)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, Vec<Vec<String>>>>> {
        self.0
            .lock()
            .map_err(|_| Error::Invalid("the template cache was poisoned by a panic".into()))
    }
}

/// Where trained editors' checkpoints live.
#[derive(Debug, Clone, Default)]
pub struct ArtefactStore {
    pub dir: Option<PathBuf>,
}

impl ArtefactStore {
    /// An hparams file's `archive:`: a path that exists as given, else one inside the store.
    pub fn resolve(&self, archive: &Path) -> Result<PathBuf> {
        if archive.exists() {
            return Ok(archive.to_path_buf());
        }
        match &self.dir {
            Some(dir) if dir.join(archive).exists() => Ok(dir.join(archive)),
            Some(dir) => Err(Error::Invalid(format!(
                "archive {} is neither a file nor in the artefact store {}",
                archive.display(),
                dir.display()
            ))),
            None => Err(Error::Invalid(format!(
                "archive {} does not exist (and no artefact store is configured)",
                archive.display()
            ))),
        }
    }
}

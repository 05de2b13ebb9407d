//! Hub ids resolved through the Hugging Face cache (the layout Python's `huggingface_hub` uses, so
//! both share downloads). [`HubOptions::from_vars`] reads `HF_HOME`, `HF_HUB_CACHE`,
//! `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE` from a lookup its caller gives (the CLI passes
//! the environment), so the library itself reads no environment variable.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The cache's `hub` folder (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    pub endpoint: Option<String>,
    pub token: Option<String>,
    /// Use only what the cache holds.
    pub offline: bool,
    pub progress: bool,
}

impl HubOptions {
    /// The options `huggingface_hub` would take from these variables: the cache in
    /// `$HF_HUB_CACHE`, else `$HF_HOME/hub` (`$HF_HOME` defaulting to `~/.cache/huggingface`), the
    /// token in `$HF_TOKEN`, else the `token` file in `$HF_HOME`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let var = |k: &str| var(k).filter(|v| !v.is_empty());
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(var("HOME").unwrap_or_else(|| ".".into()))
                .join(".cache")
                .join("huggingface")
        });
        let saved_token = || {
            std::fs::read_to_string(hf_home.join("token"))
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        };
        Self {
            cache_dir: var("HF_HUB_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home.join("hub")),
            endpoint: var("HF_ENDPOINT"),
            token: var("HF_TOKEN").or_else(saved_token),
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| v != "0"),
            progress: false,
        }
    }
}

/// Fetches (or finds in the cache) `config.json`, `tokenizer.json` and the safetensors weights of
/// `id` (`owner/name` or `owner/name@revision`) and returns the snapshot folder holding them.
pub fn resolve_hub(id: &str, opts: &HubOptions) -> Result<PathBuf> {
    let (repo_id, revision) = match id.split_once('@') {
        Some((r, rev)) => (r.to_string(), rev.to_string()),
        None => (id.to_string(), "main".to_string()),
    };
    let repo = Repo::with_revision(repo_id.clone(), RepoType::Model, revision);
    let cached = Cache::new(opts.cache_dir.clone()).repo(repo.clone());
    let hub_err =
        |file: &str, e: ApiError| Error::Invalid(format!("hub {id}: cannot fetch {file}: {e}"));
    let api = if opts.offline {
        None
    } else {
        let mut builder = ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
            .with_progress(opts.progress)
            .with_token(opts.token.clone());
        if let Some(endpoint) = &opts.endpoint {
            builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
        }
        Some(
            builder
                .build()
                .map_err(|e| hub_err("anything", e))?
                .repo(repo),
        )
    };
    let get = |file: &str| -> Result<PathBuf> {
        if let Some(p) = cached.get(file) {
            return Ok(p);
        }
        match &api {
            Some(api) => api.get(file).map_err(|e| hub_err(file, e)),
            None => Err(Error::Invalid(format!(
                "hub {id}: {file} is not in the cache {} and HF_HUB_OFFLINE is set",
                opts.cache_dir.display()
            ))),
        }
    };
    let config = get("config.json")?;
    get("tokenizer.json")?;
    fetch_weights(&get, api.as_ref(), &cached, &config)?;
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::file(&config, "has no parent folder"))
}

/// Sharded checkpoints are found through their index; a repository without one has a single file.
fn fetch_weights(
    get: &dyn Fn(&str) -> Result<PathBuf>,
    api: Option<&ApiRepo>,
    cached: &hf_hub::CacheRepo,
    config: &Path,
) -> Result<()> {
    const INDEX: &str = "model.safetensors.index.json";
    let has_index = cached.get(INDEX).is_some()
        || (cached.get("model.safetensors").is_none()
            && api.is_some_and(|api| api.get(INDEX).is_ok()));
    if !has_index {
        get("model.safetensors")?;
        return Ok(());
    }
    let index = get(INDEX)?;
    let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
    let parsed: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&index, format!("invalid JSON: {e}")))?;
    let mut shards: Vec<String> = parsed
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::file(&index, "field \"weight_map\" is missing"))?
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    shards.sort();
    shards.dedup();
    for shard in shards {
        let path = get(&shard)?;
        if path.parent() != config.parent() {
            return Err(Error::file(
                &path,
                "shard resolved outside the snapshot of config.json",
            ));
        }
    }
    Ok(())
}

//! Base models from the Hugging Face hub: a `base_model` of the form `owner/name` that is not
//! a local model is fetched once, through the `hf-hub` crate, into the hub cache (`HF_HOME`'s
//! `hub/` when set, else `<data dir>/hub`), from `HF_ENDPOINT` (default huggingface.co).

use anyhow::Context;
use std::path::{Path, PathBuf};

/// Files a BERT checkpoint needs here.
const REQUIRED: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];
/// sentence-transformers' pooling description (for `pooling: auto`); absent in most repos.
const OPTIONAL: [&str; 2] = ["modules.json", "1_Pooling/config.json"];

/// Where and from where hub models are fetched.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Hub address; `None` means the crate's default (huggingface.co).
    pub endpoint: Option<String>,
    /// The cache directory (hf-hub's layout: `models--owner--name/snapshots/<commit>/…`).
    pub cache_dir: PathBuf,
}

impl HubConfig {
    /// `hf_home/hub` when `HF_HOME` is given, else `data_dir/hub`.
    pub fn new(endpoint: Option<String>, hf_home: Option<&Path>, data_dir: &Path) -> Self {
        let cache_dir = hf_home.map_or_else(|| data_dir.join("hub"), |h| h.join("hub"));
        Self { endpoint: endpoint.filter(|e| !e.is_empty()), cache_dir }
    }
}

/// Whether `id` looks like a hub repository id, `owner/name`: one slash, each part 1–96
/// characters of letters, digits, `-`, `_` and `.`, and no `..` (it names a cache path).
pub fn is_repo_id(id: &str) -> bool {
    let part_ok = |p: &str| {
        (1..=96).contains(&p.len())
            && !p.starts_with('.')
            && !p.contains("..")
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(id.split_once('/'), Some((owner, name)) if part_ok(owner) && part_ok(name))
}

/// Fetches `repo` (or finds it in the cache) and returns its local snapshot directory.
pub async fn fetch(repo: &str, hub: &HubConfig) -> anyhow::Result<PathBuf> {
    // Once the required files are cached, nothing goes to the network (not even for the
    // optional files a repo may not have).
    if let Some(dir) = cached(repo, &hub.cache_dir) {
        return Ok(dir);
    }
    let cache = hf_hub::Cache::new(hub.cache_dir.clone());
    let mut builder = hf_hub::api::tokio::ApiBuilder::from_cache(cache).with_progress(false);
    if let Some(endpoint) = &hub.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let api = builder.build().context("setting up the hub client")?;
    tokio::time::timeout(FETCH_LIMIT, download(&api, repo)).await.map_err(|_| anyhow::anyhow!("timed out after {FETCH_LIMIT:?}"))?
}

/// The snapshot dir of `repo` in the cache at `cache_dir`, when its required files are there.
pub fn cached(repo: &str, cache_dir: &Path) -> Option<PathBuf> {
    if !is_repo_id(repo) {
        return None;
    }
    let cache = hf_hub::Cache::new(cache_dir.to_path_buf());
    let paths: Option<Vec<PathBuf>> = REQUIRED.iter().map(|f| cache.model(repo.to_string()).get(f)).collect();
    paths.and_then(|paths| paths[0].parent().map(Path::to_path_buf))
}

/// A fetch that hangs (an unreachable endpoint that never answers) would hold the job queue.
const FETCH_LIMIT: std::time::Duration = std::time::Duration::from_secs(3600);

async fn download(api: &hf_hub::api::tokio::Api, repo: &str) -> anyhow::Result<PathBuf> {
    let repo_api = api.model(repo.to_string());
    let mut dir = None;
    for file in REQUIRED {
        let path = repo_api.get(file).await.with_context(|| format!("fetching {file} of {repo} from the hub"))?;
        dir = path.parent().map(Path::to_path_buf);
    }
    for file in OPTIONAL {
        if let Err(e) = repo_api.get(file).await {
            tracing::debug!(repo, file, error = %e, "optional hub file not fetched");
        }
    }
    dir.context("hub download gave no directory")
}

#[cfg(test)]
mod tests {
    use super::is_repo_id;

    #[test]
    fn repo_ids_are_owner_slash_name_and_cannot_escape() {
        for ok in ["sentence-transformers/all-MiniLM-L6-v2", "bert-base/uncased_v1.0", "a/b"] {
            assert!(is_repo_id(ok), "{ok}");
        }
        for bad in ["plain", "a/b/c", "../x", "a/..", "a/.hidden", "/x", "x/", "a b/c", "a/b\\c"] {
            assert!(!is_repo_id(bad), "{bad}");
        }
    }
}

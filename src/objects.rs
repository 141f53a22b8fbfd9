//! Files in an object store (`--object-store s3://bucket/prefix`, through the `object_store`
//! crate: S3, MinIO, R2, and the other S3-compatible servers; `gs://`, `az://` and `file://` too).
//!
//! The store holds what every process must see: datasets, checkpoints and trained models, under
//! the same relative paths as in the data dir (`datasets/<file>`, `checkpoints/<job>/<step>/…`,
//! `models/<id>/…`). The local data dir is then a cache: what a process writes goes to the store
//! before the database names it, and what it needs but lacks locally it fetches first. A
//! directory is fetched into a temp dir and renamed into place whole, so a half-fetched model is
//! never read. Without `--object-store` every call here is a no-op: the data dir is all there is.

use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The object store, if any, and the data dir it mirrors.
#[derive(Clone)]
pub struct Objects {
    store: Option<(Arc<dyn ObjectStore>, ObjectPath)>,
    data_dir: PathBuf,
}

/// An object-store failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("object store: {what}: {source}")]
pub struct ObjectError {
    what: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

fn err(what: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> ObjectError {
    ObjectError { what: what.into(), source: Box::new(source) }
}

/// Store credentials and settings come from the environment, as each cloud's tools read them
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `AWS_REGION`,
/// `AWS_ALLOW_HTTP`, `GOOGLE_*`, `AZURE_*`).
fn env_options() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| ["AWS_", "GOOGLE_", "AZURE_"].iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

impl Objects {
    /// Opens `url` (or nothing, when `None`) as the store mirroring `data_dir`.
    pub fn open(url: Option<&str>, data_dir: &Path) -> anyhow::Result<Self> {
        let store = match url {
            None => None,
            Some(raw) => {
                let url = url::Url::parse(raw).map_err(|e| anyhow::anyhow!("--object-store {raw:?}: {e}"))?;
                let mut opts = env_options();
                // A store that does not answer gets a quick failure (a 503 to the client), not
                // minutes of retries.
                opts.push(("timeout".into(), "30s".into()));
                opts.push(("connect_timeout".into(), "5s".into()));
                let (store, prefix) =
                    object_store::parse_url_opts(&url, opts).map_err(|e| anyhow::anyhow!("--object-store {raw:?}: {e}"))?;
                Some((Arc::from(store), prefix))
            }
        };
        Ok(Self { store, data_dir: data_dir.to_path_buf() })
    }

    /// Whether files go to an object store.
    pub fn enabled(&self) -> bool {
        self.store.is_some()
    }

    fn key(prefix: &ObjectPath, rel: &str) -> ObjectPath {
        rel.split('/').filter(|p| !p.is_empty()).fold(prefix.clone(), |k, part| k.child(part))
    }

    /// Uploads `rel` (a file, or a directory with everything under it) from the data dir.
    pub async fn put(&self, rel: &str) -> Result<(), ObjectError> {
        self.put_last(rel, None).await
    }

    /// As [`Objects::put`], with the file named `last` uploaded after all others: a directory
    /// whose `last` is in the store is whole there.
    pub async fn put_last(&self, rel: &str, last: Option<&str>) -> Result<(), ObjectError> {
        let Some((store, prefix)) = &self.store else { return Ok(()) };
        let local = self.data_dir.join(rel);
        let mut files =
            tokio::task::spawn_blocking(move || files_under(&local)).await.map_err(|e| err(rel, e))?.map_err(|e| err(rel, e))?;
        files.sort_by_key(|(_, sub)| Some(sub.as_str()) == last);
        for (file, sub) in files {
            let data = tokio::fs::read(&file).await.map_err(|e| err(format!("reading {}", file.display()), e))?;
            let key = if sub.is_empty() { Self::key(prefix, rel) } else { Self::key(prefix, &format!("{rel}/{sub}")) };
            store.put(&key, PutPayload::from(data)).await.map_err(|e| err(format!("writing {key}"), e))?;
        }
        Ok(())
    }

    /// Makes sure `rel` (a file or a directory) is in the data dir, fetching it from the store
    /// when it is missing. A directory arrives whole or not at all.
    pub async fn fetch(&self, rel: &str) -> Result<(), ObjectError> {
        let Some((store, prefix)) = &self.store else { return Ok(()) };
        let local = self.data_dir.join(rel);
        if local.exists() {
            return Ok(());
        }
        let key = Self::key(prefix, rel);
        let listed: Vec<_> = store.list(Some(&key)).try_collect().await.map_err(|e| err(format!("listing {key}"), e))?;
        let parent = local.parent().expect("a relative path under the data dir");
        tokio::fs::create_dir_all(parent).await.map_err(|e| err(format!("creating {}", parent.display()), e))?;
        let tmp = parent.join(format!(".tmp-fetch-{}", uuid::Uuid::new_v4().simple()));
        let result = async {
            if listed.is_empty() {
                // A single object (a dataset file), not a directory.
                let data = store
                    .get(&key)
                    .await
                    .map_err(|e| err(format!("reading {key}"), e))?
                    .bytes()
                    .await
                    .map_err(|e| err(format!("reading {key}"), e))?;
                return tokio::fs::write(&tmp, data).await.map_err(|e| err(format!("writing {}", tmp.display()), e));
            }
            for meta in listed {
                let sub = meta.location.prefix_match(&key).map(|parts| parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"));
                let Some(sub) = sub.filter(|s| !s.is_empty()) else { continue };
                let dest = tmp.join(&sub);
                tokio::fs::create_dir_all(dest.parent().expect("under tmp"))
                    .await
                    .map_err(|e| err(format!("creating {}", dest.display()), e))?;
                let data = store.get(&meta.location).await.map_err(|e| err(format!("reading {}", meta.location), e))?;
                let data = data.bytes().await.map_err(|e| err(format!("reading {}", meta.location), e))?;
                tokio::fs::write(&dest, data).await.map_err(|e| err(format!("writing {}", dest.display()), e))?;
            }
            Ok(())
        }
        .await;
        let placed = match result {
            Ok(()) => tokio::fs::rename(&tmp, &local).await.map_err(|e| err(format!("placing {}", local.display()), e)),
            Err(e) => Err(e),
        };
        if placed.is_err() {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            let _ = tokio::fs::remove_file(&tmp).await;
            // Another task of this process may have placed it meanwhile.
            if local.exists() {
                return Ok(());
            }
        }
        placed
    }

    /// The names of the entries right under directory `rel` in the store (the store's view of
    /// a job's checkpoints, say); empty without a store.
    pub async fn list_dirs(&self, rel: &str) -> Result<Vec<String>, ObjectError> {
        let Some((store, prefix)) = &self.store else { return Ok(vec![]) };
        let key = Self::key(prefix, rel);
        let listed = store.list_with_delimiter(Some(&key)).await.map_err(|e| err(format!("listing {key}"), e))?;
        Ok(listed.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect())
    }

    /// Removes `rel` (a file or a directory) from the store; failures are logged, not returned:
    /// what is left is garbage no row names.
    pub async fn delete(&self, rel: &str) {
        let Some((store, prefix)) = &self.store else { return };
        let key = Self::key(prefix, rel);
        let mut keys: Vec<ObjectPath> = match store.list(Some(&key)).map_ok(|m| m.location).try_collect().await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, key = %key, "listing objects to delete failed");
                vec![]
            }
        };
        keys.push(key);
        for k in keys {
            match store.delete(&k).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => tracing::warn!(error = %e, key = %k, "deleting an object failed"),
            }
        }
    }
}

/// Every file under `path` with its path relative to `path` (`""` when `path` is a file).
fn files_under(path: &Path) -> std::io::Result<Vec<(PathBuf, String)>> {
    if path.is_file() {
        return Ok(vec![(path.to_path_buf(), String::new())]);
    }
    let mut out = Vec::new();
    let mut stack = vec![(path.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            let sub = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            if entry.file_type()?.is_dir() {
                stack.push((entry.path(), sub));
            } else {
                out.push((entry.path(), sub));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn files_and_directories_go_to_the_store_and_come_back_whole_in_another_data_dir() {
        let (store, a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let url = format!("file://{}", store.path().display());
        let (here, there) = (Objects::open(Some(&url), a.path()).unwrap(), Objects::open(Some(&url), b.path()).unwrap());
        std::fs::create_dir_all(a.path().join("models/m/sub")).unwrap();
        std::fs::write(a.path().join("models/m/config.json"), b"{}").unwrap();
        std::fs::write(a.path().join("models/m/sub/w.bin"), b"weights").unwrap();
        std::fs::create_dir_all(a.path().join("datasets")).unwrap();
        std::fs::write(a.path().join("datasets/d.jsonl"), b"{\"text\": \"x\"}\n").unwrap();
        here.put("models/m").await.unwrap();
        here.put("datasets/d.jsonl").await.unwrap();
        there.fetch("models/m").await.unwrap();
        there.fetch("datasets/d.jsonl").await.unwrap();
        assert_eq!(std::fs::read(b.path().join("models/m/sub/w.bin")).unwrap(), b"weights");
        assert_eq!(std::fs::read(b.path().join("datasets/d.jsonl")).unwrap(), b"{\"text\": \"x\"}\n");
        assert_eq!(there.list_dirs("models").await.unwrap(), vec!["m".to_string()]);
        // Nothing half-fetched is left beside them.
        let names: Vec<_> = std::fs::read_dir(b.path().join("models")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("m")]);
        here.delete("models/m").await;
        let fresh = tempfile::tempdir().unwrap();
        let elsewhere = Objects::open(Some(&url), fresh.path()).unwrap();
        assert!(elsewhere.fetch("models/m").await.is_err(), "deleted from the store");
        assert!(there.fetch("models/gone").await.is_err(), "a missing object is an error, not an empty model");
        assert!(!b.path().join("models/gone").exists());
    }

    #[test]
    fn a_store_url_that_does_not_parse_is_refused_with_the_flag_named() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["not a url", "ftp://host/x"] {
            let e = Objects::open(Some(bad), dir.path()).err().expect("refused").to_string();
            assert!(e.contains("--object-store"), "{e}");
        }
    }

    #[tokio::test]
    async fn without_a_store_everything_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let none = Objects::open(None, dir.path()).unwrap();
        assert!(!none.enabled());
        none.put("models/m").await.unwrap();
        none.fetch("models/m").await.unwrap();
        assert!(none.list_dirs("models").await.unwrap().is_empty());
    }
}

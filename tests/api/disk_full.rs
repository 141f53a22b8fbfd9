//! A data dir on a small tmpfs that fills up while a job trains, and data dirs that turn read-only.
//! Mounting needs root. CI runs as root, so there a test that cannot mount fails; elsewhere it
//! says why it skipped and passes (see `finetuned::testing::skip`).

use crate::helpers::*;
use finetuned::config::ServeConfig;
use reqwest::StatusCode;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u32) -> Result<Self, String> {
        std::fs::create_dir_all(dir).unwrap();
        mount(&["-t".as_ref(), "tmpfs".as_ref(), "-o".as_ref(), format!("size={mib}m").as_ref(), "tmpfs".as_ref(), dir.as_os_str()])?;
        Ok(Self(dir.to_path_buf()))
    }
}

/// What a mount gave, or `None` once the test `id` has reported that it skips (which fails it
/// under CI, where the tests run as root and mounting must work).
fn mounted<T>(id: &str, m: Result<T, String>) -> Option<T> {
    m.map_err(|e| finetuned::testing::skip(id, format!("cannot mount here (needs root): {e}"))).ok()
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes a file until the file system is full; returns its path.
fn fill(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![1u8; 64 * 1024];
    loop {
        match f.write_all(&chunk).and_then(|_| f.sync_data()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return path,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

#[tokio::test]
async fn a_disk_that_fills_mid_job_fails_the_job_with_a_clear_error_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let models = models_dir(tmp.path());
    let Some(_mnt) = mounted("disk-full-mid-job", Tmpfs::mount(&tmp.path().join("mnt"), 16)) else { return };
    let data = tmp.path().join("mnt/data");
    let app = spawn_with(ServeConfig::for_test(data.clone(), models.clone())).await;
    let ds = app.upload_ok(crate::common::toy_jsonl(512)).await;
    let hp = json!({"epochs": 100, "batch_size": 4, "learning_rate": 1e-3});
    let job = app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "model_name": "full", "hyperparameters": hp})).await;
    let id = job["id"].as_str().unwrap().to_string();
    app.wait_job(&id, 60, |j| j["status"] == "running").await;
    let filler = fill(&tmp.path().join("mnt"), "filler");

    // The job fails and says why (its end recorded in the space the server held back); the
    // server keeps answering, and refuses uploads while the disk is full.
    let done = app.wait_ended(&id, 300).await;
    assert_eq!(done["status"], "failed", "{done}");
    let code = done["error"]["code"].as_str().unwrap();
    assert!(code == "storage_error" || code == "storage_unavailable", "{done}");
    assert!(done["error"]["message"].as_str().unwrap().contains("No space left"), "{done}");
    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);
    let filler2 = fill(&tmp.path().join("mnt"), "filler2");
    assert_error(
        app.upload(crate::common::toy_jsonl(64), "application/x-ndjson").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_unavailable",
    )
    .await;
    let leftovers: Vec<_> = std::fs::read_dir(data.join("datasets"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "the refused upload left {leftovers:?}");

    // After a restart with space again, the job is still failed and nothing else was lost.
    app.stop().await;
    std::fs::remove_file(filler).unwrap();
    std::fs::remove_file(filler2).unwrap();
    let app = spawn_with(ServeConfig::for_test(data.clone(), models)).await;
    let again = app.job(&id).await;
    assert_eq!(again["status"], "failed", "{again}");
    assert_eq!(again["error"], done["error"]);
    assert_eq!(app.get(&format!("/v1/datasets/{ds}")).await.status(), StatusCode::OK);
    assert_error(app.get("/v1/models/full").await, StatusCode::NOT_FOUND, "not_found").await;
    assert!(!data.join("models/full").exists());
    app.upload_ok(crate::common::toy_jsonl(64)).await;
    // The reserve is back for the next time.
    assert!(data.join("reserve.bin").exists());
    // The embedded database file is sound (on Postgres the server keeps its own files).
    if !crate::common::on_postgres() {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", data.join("finetuned.db").display())).await.unwrap();
        let check: String = sqlx::query_scalar("pragma integrity_check").fetch_one(&pool).await.unwrap();
        assert_eq!(check, "ok");
    }
    app.stop().await;
}

/// A 16 MiB tmpfs under `root` whose data dir holds one dataset, uploaded by a server that has
/// stopped since: the mount (guard and path), the models dir, the data dir and the dataset id.
/// `None` where mounting is refused (the test `id` has then reported that it skips).
async fn stopped_server_with_a_dataset(id: &str, root: &Path) -> Option<(Tmpfs, PathBuf, PathBuf, PathBuf, String)> {
    let models = models_dir(root);
    let mnt = root.join("mnt");
    let guard = mounted(id, Tmpfs::mount(&mnt, 16))?;
    let data = mnt.join("data");
    let app = spawn_with(ServeConfig::for_test(data.clone(), models.clone())).await;
    let ds = app.upload_ok(crate::common::toy_jsonl(32)).await;
    app.stop().await;
    Some((guard, mnt, models, data, ds))
}

#[tokio::test]
async fn a_read_only_data_dir_at_start_up_is_refused_with_a_clear_error_and_left_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let models = models_dir(tmp.path());
    let data = tmp.path().join("data");
    let app = spawn_with(ServeConfig::for_test(data.clone(), models.clone())).await;
    let ds = app.upload_ok(crate::common::toy_jsonl(32)).await;
    app.stop().await;

    // The same data dir through a fresh read-only bind mount. (Remounting the filesystem itself
    // read-only is refused while any file on it is open for writing, which makes that flaky.)
    let view = tmp.path().join("read-only-view");
    let Some(guard) = mounted("read-only-data-dir-at-start-up", read_only_over(&view, &data)) else { return };
    let err =
        finetuned::startup::Application::build(ServeConfig::for_test(view.clone(), models.clone())).await.err().expect("start-up fails");
    let msg = format!("{err:#}");
    assert!(msg.contains("data dir") && msg.contains("Read-only file system"), "{msg}");
    drop(guard);

    let app = spawn_with(ServeConfig::for_test(data, models)).await;
    assert_eq!(app.get(&format!("/v1/datasets/{ds}")).await.status(), StatusCode::OK);
    app.stop().await;
}

/// A mount undone when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Runs `mount` with `args`; its error output when it fails.
fn mount(args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let o = Command::new("mount").args(args).output().map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
    }
}

/// Shows `source` read-only at `dir` (bind mount, then remount read-only).
fn read_only_over(dir: &Path, source: &Path) -> Result<Mounted, String> {
    std::fs::create_dir_all(source).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    mount(&["--bind".as_ref(), source.as_os_str(), dir.as_os_str()])?;
    let guard = Mounted(dir.to_path_buf());
    mount(&["-o".as_ref(), "remount,bind,ro".as_ref(), dir.as_os_str()])?;
    Ok(guard)
}

#[tokio::test]
async fn a_data_dir_turned_read_only_mid_job_fails_the_job_with_a_clear_error() {
    let app = spawn_app().await;
    let ds = app.upload_ok(crate::common::toy_jsonl(512)).await;
    let hp = json!({"epochs": 100, "batch_size": 4, "learning_rate": 1e-3});
    let job = app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "model_name": "ro", "hyperparameters": hp})).await;
    let id = job["id"].as_str().unwrap().to_string();
    app.wait_job(&id, 60, |j| j["status"] == "running").await;
    // The models dir turns read-only under the running job. (A whole filesystem cannot be
    // remounted read-only while the database is open for writing: the kernel refuses.)
    let models = app.data_dir.join("models");
    let empty = app.data_dir.parent().unwrap().join("empty");
    let Some(guard) = mounted("read-only-models-dir-mid-job", read_only_over(&models, &empty)) else { return };
    let done = app.wait_ended(&id, 300).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "storage_error", "{done}");
    assert!(done["error"]["message"].as_str().unwrap().contains("Read-only file system"), "{done}");
    assert_error(app.get("/v1/models/ro").await, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);
    drop(guard);
    // Writable again, the next job trains and its model serves.
    let ok =
        app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "model_name": "rw", "hyperparameters": tiny_hp(1)})).await;
    assert_eq!(app.wait_ended(ok["id"].as_str().unwrap(), 120).await["status"], "succeeded");
    assert_eq!(app.predict("rw", &json!({"inputs": "good"})).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_server_started_on_a_full_disk_serves_reads_and_refuses_writes_with_503() {
    // SQLite needs room for its shared-memory file to open the database at all: the reserve
    // the last run left behind provides it.
    let tmp = tempfile::tempdir().unwrap();
    let Some((_mnt, mnt, models, data, ds)) = stopped_server_with_a_dataset("disk-full-at-start-up", tmp.path()).await else { return };
    let filler = fill(&mnt, "filler");

    let app = spawn_with(ServeConfig::for_test(data.clone(), models.clone())).await;
    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);
    assert_eq!(app.get(&format!("/v1/datasets/{ds}")).await.status(), StatusCode::OK);
    // Whether start-up had to free the reserve to open the database depends on whether the
    // last run left SQLite's -wal/-shm files behind; either way reads work and writes get 503.
    let filler2 = fill(&mnt, "filler2");
    assert_error(
        app.upload(crate::common::toy_jsonl(64), "application/x-ndjson").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_unavailable",
    )
    .await;
    app.stop().await;

    std::fs::remove_file(filler).unwrap();
    std::fs::remove_file(filler2).unwrap();
    let app = spawn_with(ServeConfig::for_test(data, models)).await;
    app.upload_ok(crate::common::toy_jsonl(64)).await;
    app.stop().await;
}

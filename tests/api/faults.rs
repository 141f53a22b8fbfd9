//! Faults and races: a diverging job, model files removed or damaged under the server, the data
//! dir broken mid-job, and many uploads, job creations, cancels and deletes at once.

use crate::helpers::*;
use finetuned::config::ServeConfig;
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// A server whose models dir also holds `nan`: the tiny BERT with NaN word embeddings.
async fn spawn_with_nan_model() -> (TestApp, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let models = models_dir(tmp.path());
    let dir = crate::common::write_tiny_model(&models, "nan");
    let file = dir.join("model.safetensors");
    let mut w = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    let emb = w.get_mut("embeddings.word_embeddings.weight").unwrap();
    *emb = (emb.zeros_like().unwrap() * f64::NAN).unwrap();
    candle_core::safetensors::save(&w, &file).unwrap();
    (spawn_with(ServeConfig::for_test(tmp.path().join("data"), models)).await, tmp)
}

#[tokio::test]
async fn a_job_whose_loss_becomes_nan_fails_with_training_diverged() {
    let (app, _tmp) = spawn_with_nan_model().await;
    let ds = app.upload_ok(crate::common::toy_jsonl(32)).await;
    let job = app.create_job(&json!({"base_model": "nan", "training_dataset": ds, "hyperparameters": tiny_hp(2)})).await;
    let done = app.wait_ended(job["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "training_diverged", "{done}");
    assert!(done["error"]["message"].as_str().unwrap().contains("at step 1"), "{done}");
    assert!(done["model"].is_null());
    // The worker goes on: the next job trains.
    let ok = app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": tiny_hp(1)})).await;
    assert_eq!(app.wait_ended(ok["id"].as_str().unwrap(), 120).await["status"], "succeeded");
}

#[tokio::test]
async fn a_model_whose_files_are_missing_or_damaged_gets_409_on_predict_never_a_5xx() {
    let app = spawn_app().await;
    let ds = app.upload_ok(crate::common::toy_jsonl(32)).await;
    for name in ["gone-file", "bad-file"] {
        let job =
            app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "model_name": name, "hyperparameters": tiny_hp(1)})).await;
        assert_eq!(app.wait_ended(job["id"].as_str().unwrap(), 120).await["status"], "succeeded");
    }
    std::fs::remove_file(app.data_dir.join("models/gone-file/model.safetensors")).unwrap();
    std::fs::write(app.data_dir.join("models/bad-file/model.safetensors"), b"\x08\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    for name in ["gone-file", "bad-file"] {
        let e = assert_error(app.predict(name, &json!({"inputs": "good"})).await, StatusCode::CONFLICT, "model_unavailable").await;
        assert!(e["message"].as_str().unwrap().contains("missing or damaged"), "{e}");
    }
    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);
    // Deleting the broken model works, and then it is simply unknown.
    let r = app.client.delete(app.url("/v1/models/gone-file")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_error(app.predict("gone-file", &json!({"inputs": "good"})).await, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn a_data_dir_broken_mid_job_fails_the_job_with_storage_error_and_the_database_stays_sound() {
    let app = spawn_app().await;
    let ds = app.upload_ok(crate::common::toy_jsonl(64)).await;
    let hp = json!({"epochs": 100, "batch_size": 4, "learning_rate": 1e-3});
    let job = app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "model_name": "nowhere", "hyperparameters": hp})).await;
    let id = job["id"].as_str().unwrap();
    app.wait_job(id, 60, |j| j["status"] == "running").await;
    // The models dir is replaced by a file: the finished model cannot be written.
    let models = app.data_dir.join("models");
    std::fs::rename(&models, app.data_dir.join("models-moved")).unwrap();
    std::fs::write(&models, b"not a directory").unwrap();
    let done = app.wait_ended(id, 300).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "storage_error", "{done}");
    assert!(done["error"]["message"].as_str().unwrap().contains("saving the model"), "{done}");
    assert_error(app.get("/v1/models/nowhere").await, StatusCode::NOT_FOUND, "not_found").await;
    // Nothing else was lost: the dataset and the job's record are intact.
    assert_eq!(app.get(&format!("/v1/datasets/{ds}")).await.status(), StatusCode::OK);
    // The embedded database file is sound (on Postgres the server keeps its own files).
    if !crate::common::on_postgres() {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", app.data_dir.join("finetuned.db").display())).await.unwrap();
        let check: String = sqlx::query_scalar("pragma integrity_check").fetch_one(&pool).await.unwrap();
        assert_eq!(check, "ok");
    }
}

#[tokio::test]
async fn many_uploads_job_creations_cancels_and_deletes_at_once_lose_and_duplicate_nothing() {
    let app = spawn_app().await;
    let n = 24;
    let uploads = join_all((0..n).map(|i| app.upload(crate::common::toy_jsonl(16 + i), "application/x-ndjson"))).await;
    let mut ids = vec![];
    for r in uploads {
        assert_eq!(r.status(), StatusCode::CREATED);
        ids.push(r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string());
    }
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), n, "duplicate dataset ids");

    // For each of the first half: a job on the dataset and a delete of it, at the same moment.
    // Exactly one may win: a job that uses a deleted dataset, or a delete under a job, is a bug.
    let half = n / 2;
    let hp = json!({"epochs": 100, "batch_size": 4, "learning_rate": 1e-3});
    let bodies: Vec<Value> =
        ids[..half].iter().map(|ds| json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": hp})).collect();
    let creates = join_all(bodies.iter().map(|b| app.post_json("/v1/jobs", b)));
    let deletes = join_all(ids.iter().map(|ds| app.client.delete(app.url(&format!("/v1/datasets/{ds}"))).send()));
    let (creates, deletes) = tokio::join!(creates, deletes);
    let mut jobs = vec![];
    let mut kept = std::collections::HashSet::new();
    for (i, (c, d)) in creates.into_iter().zip(&deletes).enumerate() {
        let d = d.as_ref().unwrap().status();
        match c.status() {
            StatusCode::CREATED => {
                assert_eq!(d, StatusCode::CONFLICT, "dataset {i} was deleted under a job");
                kept.insert(ids[i].clone());
                jobs.push(c.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string());
            }
            s => {
                assert_eq!(d, StatusCode::OK, "dataset {i}: job got {s} and the delete {d}");
                assert!(s.is_client_error(), "{s}");
            }
        }
    }
    for d in &deletes[half..] {
        assert_eq!(d.as_ref().unwrap().status(), StatusCode::OK);
    }

    // Cancel every job twice at once: one cancel wins, the other finds it ended (409).
    let paths: Vec<String> = jobs.iter().chain(jobs.iter()).map(|j| format!("/v1/jobs/{j}/cancel")).collect();
    let empty = json!({});
    let cancels = join_all(paths.iter().map(|p| app.post_json(p, &empty))).await;
    for (k, j) in jobs.iter().enumerate() {
        let (a, b) = (cancels[k].status(), cancels[k + jobs.len()].status());
        let mut got = [a, b];
        got.sort();
        assert_eq!(got, [StatusCode::OK, StatusCode::CONFLICT], "job {j}: cancels answered {a} and {b}");
    }
    for j in &jobs {
        assert_eq!(app.wait_ended(j, 120).await["status"], "cancelled");
    }

    let listed: Value = app.get("/v1/jobs?limit=100").await.json().await.unwrap();
    let listed: std::collections::HashSet<String> =
        listed["data"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(listed, jobs.iter().cloned().collect(), "jobs lost or duplicated");
    let listed: Value = app.get("/v1/datasets?limit=100").await.json().await.unwrap();
    let listed: std::collections::HashSet<String> =
        listed["data"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(listed, kept, "datasets lost or kept by mistake");
    // Once the jobs have ended their datasets can go.
    for ds in &kept {
        assert_eq!(app.client.delete(app.url(&format!("/v1/datasets/{ds}"))).send().await.unwrap().status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn unsupported_entries_in_the_models_dir_are_skipped_and_the_server_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let models = models_dir(tmp.path());
    let tiny = models.join("tiny");
    let copy = |name: &str| {
        let d = models.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
            std::fs::copy(tiny.join(f), d.join(f)).unwrap();
        }
        d
    };
    // Another architecture.
    let d = copy("other-arch");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = json!("gpt2");
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    // Only PyTorch weights.
    let d = copy("bin-only");
    std::fs::rename(d.join("model.safetensors"), d.join("pytorch_model.bin")).unwrap();
    // A safetensors file cut short.
    let d = copy("corrupt");
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 3]).unwrap();
    // A tensor missing; a tensor of another shape than the config's; an activation we do not
    // know; a tokenizer whose ids run past the embedding.
    let d = copy("missing-tensor");
    let mut tensors = candle_core::safetensors::load(d.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let gone = tensors.keys().find(|n| n.ends_with("encoder.layer.1.output.dense.weight")).unwrap().clone();
    tensors.remove(&gone);
    candle_core::safetensors::save(&tensors, d.join("model.safetensors")).unwrap();
    let edit_config = |name: &str, key: &str, value: Value| {
        let d = copy(name);
        let mut cfg: Value = serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
        cfg[key] = value;
        std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    };
    edit_config("wrong-shape", "intermediate_size", json!(48));
    edit_config("unknown-act", "hidden_act", json!("swish9"));
    edit_config("small-vocab", "vocab_size", json!(10));
    let path = models.join("small-vocab/model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    for (name, t) in tensors.iter_mut() {
        if name.ends_with("word_embeddings.weight") {
            *t = t.narrow(0, 0, 10).unwrap();
        }
    }
    candle_core::safetensors::save(&tensors, &path).unwrap();
    // Not a model at all.
    std::fs::create_dir_all(models.join("notes")).unwrap();
    std::fs::write(models.join("notes/readme.txt"), "hello").unwrap();

    let app = spawn_with(ServeConfig::for_test(tmp.path().join("data"), models)).await;
    let listed: Value = app.get("/v1/models").await.json().await.unwrap();
    let ids: std::collections::BTreeSet<&str> = listed["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["all-minilm-l6-v2", "tiny"].into_iter().collect(), "{listed}");
    for bad in ["other-arch", "bin-only", "corrupt", "notes"] {
        assert_error(app.get(&format!("/v1/models/{bad}")).await, StatusCode::NOT_FOUND, "not_found").await;
    }
    // Not hidden: each is listed with its reason, and a job on one is refused with it.
    let info: Value = app.get("/v1/info").await.json().await.unwrap();
    let refused: std::collections::BTreeMap<&str, &str> =
        info["refused_models"].as_array().unwrap().iter().map(|m| (m["id"].as_str().unwrap(), m["reason"].as_str().unwrap())).collect();
    let expected = ["bin-only", "corrupt", "missing-tensor", "notes", "other-arch", "small-vocab", "unknown-act", "wrong-shape"];
    assert_eq!(refused.keys().copied().collect::<Vec<_>>(), expected, "{info}");
    assert!(refused["missing-tensor"].contains(&format!("model.safetensors: tensor {gone:?} is missing")), "{info}");
    assert!(
        refused["wrong-shape"].contains("model.safetensors: tensor") && refused["wrong-shape"].contains("config.json says [48,"),
        "{info}"
    );
    assert!(refused["unknown-act"].contains("config.json") && refused["unknown-act"].contains("hidden_act \"swish9\""), "{info}");
    assert!(refused["small-vocab"].contains("tokenizer.json") && refused["small-vocab"].contains("10 rows"), "{info}");
    assert!(refused["other-arch"].contains("\"gpt2\"") && refused["other-arch"].contains("bert, roberta"), "{info}");
    assert!(refused["bin-only"].contains("pytorch_model.bin"), "{info}");
    let ds = app.upload_ok(crate::common::toy_jsonl(8)).await;
    let r = app.post_json("/v1/jobs", &json!({"base_model": "other-arch", "training_dataset": ds})).await;
    let err = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    assert_eq!(err["param"], "base_model", "{err}");
    assert!(err["message"].as_str().unwrap().contains("model_type \"gpt2\" is not supported (supported: bert, roberta"), "{err}");
    let r = app.post_json("/v1/jobs", &json!({"base_model": "missing-tensor", "training_dataset": ds})).await;
    let err = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    assert!(err["message"].as_str().unwrap().contains(&format!("tensor {gone:?} is missing")), "{err}");
}

#[tokio::test]
async fn a_model_that_a_queued_or_running_job_builds_on_cannot_be_deleted() {
    let app = spawn_app().await;
    let ds = app.upload_ok(crate::common::toy_jsonl(32)).await;
    let first =
        app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "model_name": "base-a", "hyperparameters": tiny_hp(1)})).await;
    assert_eq!(app.wait_ended(first["id"].as_str().unwrap(), 120).await["status"], "succeeded");
    let hp = json!({"epochs": 100, "batch_size": 4, "learning_rate": 1e-3});
    let next = app.create_job(&json!({"base_model": "base-a", "training_dataset": ds, "hyperparameters": hp})).await;
    let r = app.client.delete(app.url("/v1/models/base-a")).send().await.unwrap();
    let e = assert_error(r, StatusCode::CONFLICT, "conflict").await;
    assert!(e["message"].as_str().unwrap().contains("base of a queued or running job"), "{e}");
    let id = next["id"].as_str().unwrap();
    app.post_json(&format!("/v1/jobs/{id}/cancel"), &json!({})).await;
    app.wait_ended(id, 120).await;
    let r = app.client.delete(app.url("/v1/models/base-a")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

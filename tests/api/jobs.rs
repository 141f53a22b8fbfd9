use crate::common::{shared, toy_jsonl};
use crate::helpers::*;
use finetuned::config::ServeConfig;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn tiny_dataset(split: &str) -> String {
    std::fs::read_to_string(shared().join("datasets/tiny").join(format!("{split}.jsonl"))).unwrap()
}

/// The share of the commonest label among the rows of a JSONL file.
fn majority_rate(jsonl: &str) -> f64 {
    let mut counts = std::collections::HashMap::new();
    for line in jsonl.lines().filter(|l| !l.trim().is_empty()) {
        let row: Value = serde_json::from_str(line).unwrap();
        *counts.entry(row["label"].to_string()).or_insert(0usize) += 1;
    }
    *counts.values().max().unwrap() as f64 / counts.values().sum::<usize>() as f64
}

/// The share of the rows of a JSONL file whose label `model` predicts first.
async fn accuracy_on(app: &TestApp, model: &str, jsonl: &str) -> f64 {
    let rows: Vec<Value> = jsonl.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut right = 0;
    for chunk in rows.chunks(16) {
        let texts: Vec<&str> = chunk.iter().map(|r| r["text"].as_str().unwrap()).collect();
        let r: Value = app.predict(model, &json!({"inputs": texts})).await.json().await.unwrap();
        right += chunk.iter().zip(r["predictions"].as_array().unwrap()).filter(|(row, p)| p[0]["label"] == row["label"]).count();
    }
    right as f64 / rows.len() as f64
}

/// The whole path on the real pretrained model: upload, train, poll, metrics, predict; then
/// a restart keeps datasets, models and scores.
#[tokio::test]
async fn minilm_fine_tunes_on_tiny_serves_predictions_and_survives_a_restart() {
    let app = spawn_app().await;
    let train = app.upload_ok(tiny_dataset("train")).await;
    let val = app.upload_ok(tiny_dataset("validation")).await;
    let job = app
        .create_job(&json!({"base_model": "all-minilm-l6-v2", "training_dataset": train, "validation_dataset": val,
                            "model_name": "tiny-sentiment", "hyperparameters": {"epochs": 2, "batch_size": 16, "learning_rate": 1e-4, "max_seq_len": 64}}))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("job_"));
    assert_eq!(job["object"], "job");
    assert_eq!(job["status"], "queued");
    assert_eq!(job["task"], "classification");
    assert_eq!(job["hyperparameters"]["warmup_ratio"], 0.06);
    assert_eq!(job["hyperparameters"]["pooling"], "mean", "auto picks mean for a sentence-transformers checkpoint");
    let done = app.wait_ended(&id, 600).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["model"], "tiny-sentiment");
    // A model that learned nothing answers one label for every text (the commonest label's rate
    // at best) or guesses. Eight steps on 64 texts fit the training texts well above that (a
    // guess reaches the floor there once in thousands of runs; no-op updates got 25 of 64) and
    // the validation texts somewhat (22 of 32; no-op updates got 12).
    let val_floor = majority_rate(&tiny_dataset("validation"));
    let accuracy = done["metrics"]["validation"]["accuracy"].as_f64().unwrap();
    assert!(accuracy > val_floor, "validation accuracy {accuracy}, not above the commonest label's rate {val_floor}: {done}");
    let train_floor = majority_rate(&tiny_dataset("train")) + 0.15;
    let fit = accuracy_on(&app, "tiny-sentiment", &tiny_dataset("train")).await;
    assert!(fit >= train_floor, "accuracy on the training texts {fit}, below {train_floor}");
    assert!(done["started_at"].as_i64().is_some() && done["finished_at"].as_i64().is_some());

    let metrics: Value = app.get(&format!("/v1/jobs/{id}/metrics")).await.json().await.unwrap();
    assert_eq!(metrics["train"].as_array().unwrap().len(), 8, "2 epochs × 4 steps of 16: {metrics}");
    let v = &metrics["validation"][1];
    assert_eq!(v["epoch"], 2);
    assert_eq!(v["per_class"]["positive"]["support"].as_u64().unwrap() + v["per_class"]["negative"]["support"].as_u64().unwrap(), 32);
    assert_eq!(v["confusion_matrix"].as_array().unwrap().len(), 2);
    let events: Value = app.get(&format!("/v1/jobs/{id}/events")).await.json().await.unwrap();
    assert!(events["data"].as_array().unwrap().iter().any(|e| e["type"] == "metrics"));
    let progress: Vec<&Value> =
        events["data"].as_array().unwrap().iter().filter(|e| e["type"] == "message" && !e["data"]["step"].is_null()).collect();
    assert_eq!(progress.last().unwrap()["data"]["step"], 8, "a progress event at the last step: {events}");

    let model: Value = app.get("/v1/models/tiny-sentiment").await.json().await.unwrap();
    assert_eq!(model["kind"], "classifier");
    assert_eq!(model["labels"], json!(["negative", "positive"]));
    assert_eq!(model["job"], id.as_str());
    let body = json!({"inputs": ["a gorgeous, witty, seductive movie", "dull and far too long"]});
    let r = app.predict("tiny-sentiment", &body).await;
    assert_eq!(r.status(), StatusCode::OK);
    let before: Value = r.json().await.unwrap();
    assert_eq!(before["model"], "tiny-sentiment");
    let preds = before["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 2);
    for p in preds {
        let s: Vec<f64> = p.as_array().unwrap().iter().map(|x| x["score"].as_f64().unwrap()).collect();
        assert!(s[0] >= s[1]);
        assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-5);
    }

    let tmp = app.stop().await;
    let root = tmp.as_ref().unwrap().path();
    let app = spawn_with(finetuned::config::ServeConfig::for_test(root.join("data"), root.join("models"))).await;
    assert_eq!(app.get(&format!("/v1/datasets/{train}")).await.status(), StatusCode::OK);
    assert_eq!(app.job(&id).await["status"], "succeeded");
    let after: Value = app.predict("tiny-sentiment", &body).await.json().await.unwrap();
    assert_eq!(after, before, "scores changed across a restart");
    drop(tmp);
}

#[tokio::test]
async fn one_call_multipart_job_stores_datasets_and_queues() {
    let app = spawn_app().await;
    let form = reqwest::multipart::Form::new()
        .part("training_file", reqwest::multipart::Part::text(toy_jsonl(40)).file_name("train.jsonl"))
        .part("job", reqwest::multipart::Part::text(json!({"base_model": "tiny", "hyperparameters": tiny_hp(2)}).to_string()));
    let r = app.client.post(app.url("/v1/jobs")).multipart(form).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let job: Value = r.json().await.unwrap();
    let ds = job["training_dataset"].as_str().unwrap();
    assert!(ds.starts_with("ds_"));
    assert!(job["validation_dataset"].is_null());
    let done = app.wait_ended(job["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let metrics: Value = app.get(&format!("/v1/jobs/{}/metrics", done["id"].as_str().unwrap())).await.json().await.unwrap();
    assert_eq!(metrics["validation"][0]["per_class"]["pos"]["support"], 2, "stratified 10 % of 20 pos rows");
    // The toy texts repeat, so some held-out texts are also training texts: the job warns.
    let events: Value = app.get(&format!("/v1/jobs/{}/events", done["id"].as_str().unwrap())).await.json().await.unwrap();
    let warning = events["data"].as_array().unwrap().iter().find(|e| e["level"] == "warning").expect("a duplicate-text warning");
    assert!(warning["message"].as_str().unwrap().contains("also appear in the training data"), "{warning}");
}

#[tokio::test]
async fn a_multipart_job_with_a_bad_file_stores_nothing() {
    let app = spawn_app().await;
    let form = reqwest::multipart::Form::new()
        .part("training_file", reqwest::multipart::Part::text(toy_jsonl(10)).file_name("train.jsonl"))
        .part("validation_file", reqwest::multipart::Part::text("{\"text\": 5}\n").file_name("val.jsonl"))
        .part("job", reqwest::multipart::Part::text(json!({"base_model": "tiny"}).to_string()));
    let r = app.client.post(app.url("/v1/jobs")).multipart(form).send().await.unwrap();
    let err = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_dataset").await;
    assert_eq!(err["param"], "validation_file");
    assert_eq!(err["line"], 1);
    let list: Value = app.get("/v1/datasets").await.json().await.unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    let jobs: Value = app.get("/v1/jobs").await.json().await.unwrap();
    assert_eq!(jobs["data"].as_array().unwrap().len(), 0);
    assert_eq!(std::fs::read_dir(app.data_dir.join("datasets")).unwrap().count(), 0);
}

#[tokio::test]
async fn job_requests_are_checked_field_by_field() {
    let app = spawn_app().await;
    let ds = app.upload_ok(toy_jsonl(10)).await;
    let r = app.post_json("/v1/jobs", &json!({"base_model": "nope", "training_dataset": ds})).await;
    assert_eq!(assert_error(r, StatusCode::NOT_FOUND, "not_found").await["param"], "base_model");
    let r = app.post_json("/v1/jobs", &json!({"base_model": "tiny", "training_dataset": "ds_nope"})).await;
    assert_eq!(assert_error(r, StatusCode::NOT_FOUND, "not_found").await["param"], "training_dataset");
    let r =
        app.post_json("/v1/jobs", &json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": {"learning_rate": -1}})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "hyperparameters.learning_rate");
    let r = app.post_json("/v1/jobs", &json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": {"epoch": 2}})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "hyperparameters.epoch");
    let r = app.post_json("/v1/jobs", &json!({"base_model": "tiny", "training_dataset": ds, "model_name": "../escape"})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "model_name");
    let one_label = app.upload_ok("{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": \"x\"}\n").await;
    let r = app.post_json("/v1/jobs", &json!({"base_model": "tiny", "training_dataset": one_label})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "training_dataset");
    let r = app.client.post(app.url("/v1/jobs")).header("content-type", "application/json").body("{not json").send().await.unwrap();
    assert_error(r, StatusCode::BAD_REQUEST, "bad_request").await;
    let jobs: Value = app.get("/v1/jobs").await.json().await.unwrap();
    assert_eq!(jobs["data"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn cancel_stops_a_running_job_and_frees_the_worker() {
    let app = spawn_app().await;
    let ds = app.upload_ok(toy_jsonl(64)).await;
    let long = app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": tiny_hp(100)})).await;
    let long_id = long["id"].as_str().unwrap();
    let next = app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": tiny_hp(1)})).await;
    app.wait_job(long_id, 60, |j| j["progress"]["step"].as_u64().is_some_and(|s| s >= 1)).await;
    let r = app.post_json(&format!("/v1/jobs/{long_id}/cancel"), &json!({})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "cancelled");
    // The worker only takes the next job once the cancelled one has stopped.
    let done = app.wait_ended(next["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded");
    let j = app.job(long_id).await;
    assert_eq!(j["status"], "cancelled");
    assert!(j["model"].is_null());
    let steps = j["progress"]["step"].as_u64().unwrap();
    assert!(steps < j["progress"]["total_steps"].as_u64().unwrap());
    let r = app.post_json(&format!("/v1/jobs/{long_id}/cancel"), &json!({})).await;
    assert_error(r, StatusCode::CONFLICT, "conflict").await;
    let r = app.client.delete(app.url(&format!("/v1/datasets/{ds}"))).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "no active job uses the dataset any more");
}

#[tokio::test]
async fn a_dataset_in_use_by_a_queued_job_cannot_be_deleted() {
    let app = spawn_app().await;
    let ds = app.upload_ok(toy_jsonl(64)).await;
    let job = app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": tiny_hp(100)})).await;
    let r = app.client.delete(app.url(&format!("/v1/datasets/{ds}"))).send().await.unwrap();
    assert_error(r, StatusCode::CONFLICT, "conflict").await;
    app.post_json(&format!("/v1/jobs/{}/cancel", job["id"].as_str().unwrap()), &json!({})).await;
}

#[tokio::test]
async fn a_job_running_at_shutdown_is_queued_again_and_finishes_after_restart() {
    let app = spawn_app().await;
    let ds = app.upload_ok(toy_jsonl(64)).await;
    let job =
        app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "model_name": "again", "hyperparameters": tiny_hp(30)})).await;
    let id = job["id"].as_str().unwrap().to_string();
    app.wait_job(&id, 60, |j| j["status"] == "running").await;
    let tmp = app.stop().await;
    let root = tmp.as_ref().unwrap().path();
    let cfg = finetuned::config::ServeConfig::for_test(root.join("data"), root.join("models"));
    let app = spawn_with(cfg).await;
    let done = app.wait_ended(&id, 300).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["model"], "again");
    drop(tmp);
}

#[tokio::test]
async fn the_event_stream_ends_with_the_job_and_metrics_show_the_traffic() {
    let app = spawn_app().await;
    let ds = app.upload_ok(toy_jsonl(32)).await;
    let job = app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": tiny_hp(2)})).await;
    let id = job["id"].as_str().unwrap();
    let r = app.client.get(app.url(&format!("/v1/jobs/{id}/events"))).header("accept", "text/event-stream").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    // The body ends only when the server closes the stream, which it does once the job has ended.
    let body = tokio::time::timeout(std::time::Duration::from_secs(120), r.text()).await.expect("stream ended").unwrap();
    let events: Vec<Value> = body.lines().filter_map(|l| l.strip_prefix("data: ")).map(|d| serde_json::from_str(d).unwrap()).collect();
    assert!(events.iter().any(|e| e["type"] == "metrics"), "{body}");
    assert!(events.last().unwrap()["message"].as_str().unwrap().contains("succeeded"), "{body}");
    assert_eq!(app.job(id).await["status"], "succeeded");

    let text = app.get("/metrics").await.text().await.unwrap();
    for name in ["finetuned_http_requests_total", "finetuned_http_request_duration_seconds", "finetuned_jobs", "finetuned_training_loss"] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
}

/// A stream whose job is gone from the database ends with an `error` event instead of
/// polling for ever; `Last-Event-ID` (what an SSE client sends when it reconnects) resumes
/// after the event it names.
#[tokio::test]
async fn the_event_stream_ends_for_a_job_that_is_gone_and_resumes_from_last_event_id() {
    // On SQLite even in the Postgres run: the test removes the job from the database file.
    let tmp = tempfile::tempdir().unwrap();
    let app = spawn_embedded(ServeConfig::for_test(tmp.path().join("data"), models_dir(tmp.path()))).await;
    let ds = app.upload_ok(toy_jsonl(32)).await;
    let job = app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "hyperparameters": tiny_hp(2)})).await;
    let id = job["id"].as_str().unwrap();
    app.wait_ended(id, 120).await;
    let all: Value = app.get(&format!("/v1/jobs/{id}/events")).await.json().await.unwrap();
    let ids: Vec<&str> = all["data"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert!(ids.len() > 2, "{all}");
    let sse = |last: Option<&str>| {
        let r = app.client.get(app.url(&format!("/v1/jobs/{id}/events"))).header("accept", "text/event-stream");
        match last {
            Some(l) => r.header("last-event-id", l),
            None => r,
        }
    };
    let resumed = sse(Some(ids[1])).send().await.unwrap().text().await.unwrap();
    let got: Vec<&str> = resumed.lines().filter_map(|l| l.strip_prefix("id: ")).collect();
    assert_eq!(got, ids[2..], "{resumed}");
    // A header that is not one of our event ids (mangled on the way) starts from the beginning.
    let mangled = sse(Some("0")).send().await.unwrap().text().await.unwrap();
    assert_eq!(mangled.lines().filter_map(|l| l.strip_prefix("id: ")).collect::<Vec<_>>(), ids, "{mangled}");

    // A queued job (no worker here) whose stream is open when its row goes.
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = ServeConfig::for_test(tmp.path().join("data"), models_dir(tmp.path()));
    cfg.role = "api".into();
    let app = spawn_embedded(cfg).await;
    let ds = app.upload_ok(toy_jsonl(32)).await;
    let job = app.create_job(&json!({"base_model": "tiny", "training_dataset": ds})).await;
    let id = job["id"].as_str().unwrap();
    let url = app.url(&format!("/v1/jobs/{id}/events"));
    let follower = app.client.get(url).header("accept", "text/event-stream").send().await.unwrap();
    assert_eq!(follower.status(), StatusCode::OK);
    let file = sqlx::sqlite::SqliteConnectOptions::new().filename(app.data_dir.join("finetuned.db")).foreign_keys(false);
    let db = sqlx::SqlitePool::connect_with(file).await.unwrap();
    sqlx::query("delete from jobs where id = $1").bind(id).execute(&db).await.unwrap();
    let rest = tokio::time::timeout(std::time::Duration::from_secs(30), follower.text()).await.expect("the stream ends").unwrap();
    assert!(rest.contains("event: error") && rest.contains("not_found"), "{rest}");
}

#[tokio::test]
async fn epochs_auto_trains_until_patience_runs_out_and_the_metrics_say_why_it_stopped() {
    let app = spawn_app().await;
    let data = app.upload_ok(toy_jsonl(48)).await;
    let r =
        app.post_json("/v1/jobs", &json!({"base_model": "tiny", "training_dataset": data, "hyperparameters": {"epochs": "some"}})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "hyperparameters.epochs");

    let hp = json!({"epochs": "auto", "batch_size": 8, "learning_rate": 2e-3, "warmup_ratio": 0.0, "seed": 1});
    let job = app.create_job(&json!({"base_model": "tiny", "training_dataset": data, "hyperparameters": hp})).await;
    assert_eq!((&job["hyperparameters"]["auto_epochs"], &job["hyperparameters"]["early_stopping_patience"]), (&json!(true), &Value::Null));
    let id = job["id"].as_str().unwrap();
    let done = app.wait_ended(id, 180).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    // 44 training rows of 2 labels (4 held out): the cap is 10 epochs, patience 2 by default.
    let events: Value = app.get(&format!("/v1/jobs/{id}/events")).await.json().await.unwrap();
    assert!(events.to_string().contains("epochs auto: at most 10 for 44 examples of 2 labels, stopping after 2 epochs"), "{events}");
    let metrics: Value = app.get(&format!("/v1/jobs/{id}/metrics")).await.json().await.unwrap();
    let stopped = &metrics["stopped"];
    let (reason, run) = (stopped["reason"].as_str().unwrap(), stopped["epochs_run"].as_u64().unwrap());
    assert_eq!(stopped["max_epochs"], 10, "{stopped}");
    assert_eq!(metrics["validation"].as_array().unwrap().len() as u64, run, "one validation entry per epoch run: {metrics}");
    match reason {
        "early_stopping" => assert!(run < 10 && events.to_string().contains("early stopping after epoch"), "{stopped}"),
        "max_epochs" => assert_eq!(run, 10, "{stopped}"),
        other => panic!("unknown reason {other}"),
    }
}

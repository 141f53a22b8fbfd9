use crate::common::toy_jsonl;
use crate::helpers::*;
use finetuned::config::ServeConfig;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn trained(app: &TestApp, name: &str) {
    let ds = app.upload_ok(toy_jsonl(48)).await;
    let job =
        app.create_job(&json!({"base_model": "tiny", "training_dataset": ds, "model_name": name, "hyperparameters": tiny_hp(10)})).await;
    let done = app.wait_ended(job["id"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
}

#[tokio::test]
async fn predict_options_top_k_raw_scores_and_truncate() {
    let app = spawn_app().await;
    trained(&app, "toy").await;
    let r = app.predict("toy", &json!({"inputs": "a great superb film"})).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["predictions"][0][0]["label"], "pos", "{v}");
    // Every label, best first, and top_k the first k of that list: on texts whose best label comes
    // first ("neg") and last ("pos") in the model's label order, so a list left in label order,
    // or sorted the wrong way, fails on half of them.
    let texts = ["good", "bad", "a great superb film", "the plot was really awful and boring"];
    let all: Value = app.predict("toy", &json!({"inputs": texts})).await.json().await.unwrap();
    let mut best = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let row = all["predictions"][i].as_array().unwrap();
        let scores: Vec<f64> = row.iter().map(|p| p["score"].as_f64().unwrap()).collect();
        assert_eq!(row.len(), 2, "{text}: {row:?}");
        assert!(scores[0] > scores[1], "{text}: not best first: {row:?}");
        best.push(row[0]["label"].as_str().unwrap());
    }
    assert_eq!(best, ["pos", "neg", "pos", "neg"], "{all}");
    for (k, want) in [(1, 1), (2, 2), (5, 2)] {
        let top: Value = app.predict("toy", &json!({"inputs": texts, "top_k": k})).await.json().await.unwrap();
        for (i, text) in texts.iter().enumerate() {
            assert_eq!(
                top["predictions"][i].as_array().unwrap()[..],
                all["predictions"][i].as_array().unwrap()[..want],
                "{text}, top_k {k}"
            );
        }
    }
    // Probabilities are the softmax of the logits at the model's calibration temperature, and
    // `calibrated: false` gives the softmax of the logits as they are.
    let model: Value = app.get("/v1/models/toy").await.json().await.unwrap();
    let t = model["metrics"]["calibration"]["temperature"].as_f64().unwrap_or_else(|| panic!("{model}"));
    let probs: Value = app.predict("toy", &json!({"inputs": "good"})).await.json().await.unwrap();
    let plain: Value = app.predict("toy", &json!({"inputs": "good", "calibrated": false})).await.json().await.unwrap();
    let raw: Value = app.predict("toy", &json!({"inputs": "good", "raw_scores": true})).await.json().await.unwrap();
    let r = &raw["predictions"][0];
    let diff = r[0]["score"].as_f64().unwrap() - r[1]["score"].as_f64().unwrap();
    let top = |v: &Value| v["predictions"][0][0]["score"].as_f64().unwrap();
    assert!((top(&probs) - 1.0 / (1.0 + (-diff / t).exp())).abs() < 1e-5, "softmax of the raw scores / {t}: {probs}");
    assert!((top(&plain) - 1.0 / (1.0 + (-diff).exp())).abs() < 1e-5, "softmax of the raw scores: {plain}");
    let r = app.predict("toy", &json!({"inputs": "good", "calibrated": true, "raw_scores": true})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "calibrated");
    // The tiny model allows 64 positions.
    let long = vec!["good"; 200].join(" ");
    let r = app.predict("toy", &json!({"inputs": [long.clone()], "truncate": false})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "inputs[0]");
    assert_eq!(app.predict("toy", &json!({"inputs": [long]})).await.status(), StatusCode::OK);
    let r = app.predict("toy", &json!({"inputs": []})).await;
    assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    let many: Vec<&str> = vec!["x"; 257];
    let r = app.predict("toy", &json!({"inputs": many})).await;
    assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    let r = app.predict("tiny", &json!({"inputs": "x"})).await;
    assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
}

#[tokio::test]
async fn a_batch_scores_each_input_as_alone() {
    let app = spawn_app().await;
    trained(&app, "toy").await;
    let texts = ["good", "the plot was really awful and boring", "nice film"];
    let batch: Value = app.predict("toy", &json!({"inputs": texts, "raw_scores": true})).await.json().await.unwrap();
    for (i, t) in texts.iter().enumerate() {
        let one: Value = app.predict("toy", &json!({"inputs": t, "raw_scores": true})).await.json().await.unwrap();
        for (a, b) in one["predictions"][0].as_array().unwrap().iter().zip(batch["predictions"][i].as_array().unwrap()) {
            assert_eq!(a["label"], b["label"]);
            assert!((a["score"].as_f64().unwrap() - b["score"].as_f64().unwrap()).abs() < 1e-5);
        }
    }
}

#[tokio::test]
async fn deleting_a_model_removes_it_and_its_files() {
    let app = spawn_app().await;
    trained(&app, "gone").await;
    assert_eq!(app.predict("gone", &json!({"inputs": "good"})).await.status(), StatusCode::OK);
    let r = app.client.delete(app.url("/v1/models/gone")).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["deleted"], true);
    assert_error(app.predict("gone", &json!({"inputs": "good"})).await, StatusCode::NOT_FOUND, "not_found").await;
    assert!(!app.data_dir.join("models/gone").exists());
    let r = app.client.delete(app.url("/v1/models/tiny")).send().await.unwrap();
    assert_error(r, StatusCode::CONFLICT, "conflict").await;
}

#[tokio::test]
async fn download_is_a_gzipped_hugging_face_directory() {
    let app = spawn_app().await;
    trained(&app, "dl").await;
    let r = app.get("/v1/models/dl/download").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/gzip");
    let bytes = r.bytes().await.unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let names: Vec<String> = archive.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
    for f in ["dl/config.json", "dl/model.safetensors", "dl/tokenizer.json"] {
        assert!(names.iter().any(|n| n == f), "{f} missing from {names:?}");
    }
}

#[tokio::test]
async fn concurrent_requests_are_batched_and_each_caller_gets_its_own_scores() {
    let app = spawn_app().await;
    trained(&app, "toy").await;
    let texts: Vec<String> =
        (0..24).map(|i| format!("{} the film was {}", ["good", "bad", "dull", "nice"][i % 4], "really ".repeat(i % 5))).collect();
    let mut alone = Vec::new();
    for t in &texts {
        let v: Value = app.predict("toy", &json!({"inputs": t, "raw_scores": true})).await.json().await.unwrap();
        alone.push(v["predictions"][0].clone());
    }
    let bodies: Vec<Value> = texts.iter().map(|t| json!({"inputs": t, "raw_scores": true})).collect();
    // A burst shares a forward pass when its requests arrive while an earlier one runs; on a
    // loaded machine a single-threaded client can send them too slowly for that, so up to five
    // bursts are tried. Every answer of every burst is checked.
    let mut biggest_batch = 0;
    for _ in 0..5 {
        let futures = bodies.iter().map(|b| app.predict("toy", b));
        let responses = futures::future::join_all(futures).await;
        for (r, expected) in responses.into_iter().zip(&alone) {
            for h in ["x-tokenization-time", "x-queue-time", "x-inference-time"] {
                assert!(r.headers()[h].to_str().unwrap().parse::<f64>().is_ok(), "{h}");
            }
            biggest_batch = biggest_batch.max(r.headers()["x-batch-size"].to_str().unwrap().parse::<usize>().unwrap());
            let v: Value = r.json().await.unwrap();
            for (a, b) in v["predictions"][0].as_array().unwrap().iter().zip(expected.as_array().unwrap()) {
                assert_eq!(a["label"], b["label"]);
                assert!((a["score"].as_f64().unwrap() - b["score"].as_f64().unwrap()).abs() <= 1e-5);
            }
        }
        if biggest_batch > 1 {
            break;
        }
    }
    assert!(biggest_batch > 1, "five bursts of 24 concurrent requests never shared a forward pass");
}

/// Batch sizes seen by `clients` callers that each send `rounds` single texts one after
/// another, on a server whose rejoin wait is `wait_ms`, with each request's round trip and
/// time in the batcher's queue (ms), for the failure message.
async fn closed_loop_batch_sizes(wait_ms: u64, clients: usize, rounds: usize) -> Vec<(usize, f64, f64)> {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = ServeConfig::for_test(tmp.path().join("data"), models_dir(tmp.path()));
    cfg.batch_rejoin_wait_ms = wait_ms;
    // On the embedded store even in the Postgres and object-store run: batching does not touch
    // the store, and in that run rounds stalled for the whole rejoin wait often enough to fail
    // this test one time in three (TESTING.md), a cause not yet found.
    let app = spawn_embedded(cfg).await;
    trained(&app, "toy").await;
    let caller = |c: usize| {
        let app = &app;
        async move {
            let mut seen = Vec::new();
            for r in 0..rounds {
                let sent = std::time::Instant::now();
                let resp = app.predict("toy", &json!({"inputs": format!("text {c} round {r} was good")})).await;
                assert_eq!(resp.status(), StatusCode::OK);
                let header = |h: &str| resp.headers()[h].to_str().unwrap().parse::<f64>().unwrap();
                let (size, queued) = (header("x-batch-size") as usize, header("x-queue-time"));
                resp.bytes().await.unwrap();
                seen.push((size, sent.elapsed().as_secs_f64() * 1e3, queued));
            }
            seen
        }
    };
    futures::future::join_all((0..clients).map(caller)).await.concat()
}

#[tokio::test]
async fn callers_sending_one_text_after_another_share_full_batches() {
    // The longest rejoin wait allowed, far longer than any round trip: after a batch, the
    // next one waits for the callers it served, so batches grow until they hold all callers.
    // How many rounds that takes depends on the machine's load (four, on a loaded CI run), and
    // callers that joined late finish a round or two after the rest; so the check is that most
    // rounds, not all, ran in a batch of every caller. With no wait, none did.
    let (clients, rounds) = (8, 20);
    let seen = closed_loop_batch_sizes(1_000, clients, rounds).await;
    let full = seen.iter().filter(|s| s.0 == clients).count();
    let sizes: Vec<usize> = seen.iter().map(|s| s.0).collect();
    let mut trips: Vec<f64> = seen.iter().map(|s| s.1).collect();
    let mut queued: Vec<f64> = seen.iter().map(|s| s.2).collect();
    trips.sort_by(f64::total_cmp);
    queued.sort_by(f64::total_cmp);
    assert!(
        full * 2 >= seen.len(),
        "only {full} of {} requests ran in a batch of all {clients} callers: {sizes:?}; round trip ms median {:.1}, max {:.1}; \
         queued ms median {:.1}, max {:.1}",
        seen.len(),
        trips[trips.len() / 2],
        trips[trips.len() - 1],
        queued[queued.len() / 2],
        queued[queued.len() - 1],
    );
}

#[tokio::test]
async fn chunked_long_text_scores_the_mean_of_its_windows() {
    let app = spawn_app().await;
    trained(&app, "toy").await;
    // The tiny model allows 64 positions: windows of 62 words, half a window apart.
    let words: Vec<&str> = (0..160)
        .map(|i| {
            if i < 70 {
                "bad"
            } else if i % 3 == 0 {
                "film"
            } else {
                "good"
            }
        })
        .collect();
    let text = words.join(" ");
    let chunked: Value = app.predict("toy", &json!({"inputs": text, "overflow": "chunk", "raw_scores": false})).await.json().await.unwrap();
    let mut expected = std::collections::BTreeMap::new();
    let bounds = [(0, 62), (31, 93), (62, 124), (93, 155), (124, 160)];
    for (a, b) in bounds {
        let v: Value = app.predict("toy", &json!({"inputs": words[a..b].join(" ")})).await.json().await.unwrap();
        for p in v["predictions"][0].as_array().unwrap() {
            *expected.entry(p["label"].as_str().unwrap().to_string()).or_insert(0.0) += p["score"].as_f64().unwrap() / bounds.len() as f64;
        }
    }
    for p in chunked["predictions"][0].as_array().unwrap() {
        let want = expected[p["label"].as_str().unwrap()];
        assert!((p["score"].as_f64().unwrap() - want).abs() < 1e-5, "{chunked} vs {expected:?}");
    }
    let truncated: Value = app.predict("toy", &json!({"inputs": text})).await.json().await.unwrap();
    assert_ne!(truncated["predictions"], chunked["predictions"], "chunking reads past the first window");
    let r = app.predict("toy", &json!({"inputs": "x", "overflow": "wrap"})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "overflow");
}

#[tokio::test]
async fn models_past_the_memory_budget_are_unloaded_least_recently_used_first() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = finetuned::config::ServeConfig::for_test(tmp.path().join("data"), models_dir(tmp.path()));
    cfg.model_cache_mib = 0; // room for one model at a time: the one in use is never unloaded
    let app = spawn_with(cfg).await;
    trained(&app, "a").await;
    trained(&app, "b").await;
    let body = json!({"inputs": "good", "raw_scores": true});
    let first: Value = app.predict("a", &body).await.json().await.unwrap();
    let info: Value = app.get("/v1/info").await.json().await.unwrap();
    assert_eq!(info["models_loaded"], json!(["a"]));
    assert_eq!(info["limits"]["model_cache_mib"], 0);
    assert_eq!(app.predict("b", &body).await.status(), StatusCode::OK);
    let info: Value = app.get("/v1/info").await.json().await.unwrap();
    assert_eq!(info["models_loaded"], json!(["b"]), "a was evicted");
    let again: Value = app.predict("a", &body).await.json().await.unwrap();
    assert_eq!(again, first, "a reloads with the same scores");
}

#[tokio::test]
async fn past_the_in_flight_bound_requests_get_429_with_retry_after_and_never_5xx() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = finetuned::config::ServeConfig::for_test(tmp.path().join("data"), models_dir(tmp.path()));
    cfg.max_concurrent_predicts = 1;
    let app = spawn_with(cfg).await;
    trained(&app, "toy").await;
    let long: Vec<String> = (0..64).map(|i| format!("good film {}", "really ".repeat(i % 20))).collect();
    let body = json!({"inputs": long});
    let responses = futures::future::join_all((0..48).map(|_| app.predict("toy", &body))).await;
    let (mut ok, mut limited) = (0, 0);
    for r in responses {
        match r.status() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(r.headers()["retry-after"], "1");
                assert_error(r, StatusCode::TOO_MANY_REQUESTS, "overloaded").await;
                limited += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!(ok >= 1 && limited >= 1, "{ok} ok, {limited} limited");
    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn bench_serve_reports_throughput_latency_and_statuses() {
    let app = spawn_app().await;
    trained(&app, "toy").await;
    let dir = tempfile::tempdir().unwrap();
    let texts = dir.path().join("texts.jsonl");
    std::fs::write(&texts, crate::common::toy_jsonl(20)).unwrap();
    let out = dir.path().join("report.json");
    let args = finetuned::bench::BenchArgs {
        url: app.base.clone(),
        model: "toy".into(),
        texts,
        clients: 4,
        batch: 2,
        duration: 0.5,
        warmup: 1,
        think_ms: 1.0,
        timeout: 30.0,
        api_key: None,
        out: Some(out.clone()),
    };
    finetuned::bench::run(args).await.unwrap();
    let report: Value = serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap();
    assert!(report["statuses"]["200"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["statuses"].as_object().unwrap().len(), 1, "only 200s: {report}");
    assert!(report["texts_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["latency_ms"]["p50"].as_f64().unwrap() <= report["latency_ms"]["p99"].as_f64().unwrap());
    assert_eq!(report["think_ms"], 1.0);
    // Each request of 2 texts shared its forward pass with at most the 3 other clients'.
    let mean = report["batch_size"]["mean"].as_f64().unwrap();
    assert!((2.0..=8.0).contains(&mean), "{report}");
}

#[tokio::test]
async fn bf16_weights_give_the_f32_labels_with_scores_close_to_them() {
    let app = spawn_app().await;
    trained(&app, "toy").await;
    let texts = ["good", "the plot was really awful and boring", "nice film", "a great superb film", "bad"];
    let body = json!({"inputs": texts, "raw_scores": true});
    let f32s: Value = app.predict("toy", &body).await.json().await.unwrap();
    let info: Value = app.get("/v1/info").await.json().await.unwrap();
    assert_eq!(info["predict_dtype"], "f32");
    let tmp = app.stop().await.unwrap();

    let mut config = ServeConfig::for_test(tmp.path().join("data"), tmp.path().join("models"));
    config.predict_dtype = "bf16".into();
    let app = spawn_with(config).await;
    let info: Value = app.get("/v1/info").await.json().await.unwrap();
    if !finetuned::model::ops::packed::bf16_supported() {
        assert_eq!(info["predict_dtype"], "f32", "falls back on a CPU without AVX512-BF16");
        finetuned::testing::skip("predict-bf16-avx512bf16", "this CPU has no AVX512-BF16: compared the fallback only");
        return;
    }
    assert_eq!(info["predict_dtype"], "bf16");
    let bf16s: Value = app.predict("toy", &body).await.json().await.unwrap();
    for (a, b) in f32s["predictions"].as_array().unwrap().iter().zip(bf16s["predictions"].as_array().unwrap()) {
        assert_eq!(a[0]["label"], b[0]["label"], "same top label: {a} / {b}");
        for (x, y) in a.as_array().unwrap().iter().zip(b.as_array().unwrap()) {
            let d = (x["score"].as_f64().unwrap() - y["score"].as_f64().unwrap()).abs();
            assert!(d < 0.05, "logits within 0.05: {x} / {y}");
        }
    }
}

#[tokio::test]
async fn an_unknown_predict_dtype_is_refused_before_the_data_dir_is_made() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bad = ServeConfig::for_test(tmp.path().join("data"), models_dir(tmp.path()));
    bad.predict_dtype = "f8".into();
    let err = finetuned::startup::Application::build(bad).await.err().expect("an unknown dtype is refused");
    assert!(format!("{err:#}").contains("--predict-dtype"), "{err:#}");
    assert!(!tmp.path().join("data").exists(), "a bad setting is refused before the data dir is made");
}

/// A panic while predict's cache locks are held (forced by the predictor's test hook) leaves
/// predict working: the loaded model still answers, the same, and another model still loads.
#[tokio::test]
async fn predict_keeps_working_after_a_panic_under_its_cache_locks() {
    let app = spawn_app().await;
    trained(&app, "toy").await;
    let body = json!({"inputs": ["a great superb film", "the plot was really awful"]});
    let before: Value = app.predict("toy", &body).await.json().await.unwrap();
    let predictor = app.predictor.clone();
    let panicked = std::thread::spawn(move || predictor.panic_holding_locks()).join();
    assert!(panicked.is_err(), "the test hook panics");
    let r = app.predict("toy", &body).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    assert_eq!(r.json::<Value>().await.unwrap(), before);
    trained(&app, "toy-2").await;
    let r = app.predict("toy-2", &body).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    let info: Value = app.get("/v1/info").await.json().await.unwrap();
    assert_eq!(info["models_loaded"], json!(["toy", "toy-2"]), "{info}");
}

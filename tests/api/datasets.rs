use crate::common::toy_jsonl;
use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::Value;

#[tokio::test]
async fn upload_get_list_delete_a_jsonl_dataset() {
    let app = spawn_app().await;
    let r = app.upload(toy_jsonl(10), "application/x-ndjson").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let d: Value = r.json().await.unwrap();
    let id = d["id"].as_str().unwrap();
    assert!(id.starts_with("ds_"));
    assert_eq!(d["object"], "dataset");
    assert_eq!(d["format"], "jsonl");
    assert_eq!(d["rows"], 10);
    assert_eq!(d["labels"]["pos"], 5);
    assert!(d["bytes"].as_i64().unwrap() > 0);
    assert_eq!(app.get(&format!("/v1/datasets/{id}")).await.json::<Value>().await.unwrap(), d);
    let list: Value = app.get("/v1/datasets").await.json().await.unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], id);
    assert_eq!(list["has_more"], false);
    let del: Value = app.client.delete(app.url(&format!("/v1/datasets/{id}"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(del["deleted"], true);
    assert_error(app.get(&format!("/v1/datasets/{id}")).await, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn csv_upload_as_multipart_with_custom_columns() {
    let app = spawn_app().await;
    let csv = "review,stars\n\"good, really\",5\nawful,1\n";
    let part = reqwest::multipart::Part::text(csv).file_name("reviews.csv").mime_str("text/csv").unwrap();
    let form = reqwest::multipart::Form::new().part("file", part);
    let r = app.client.post(app.url("/v1/datasets?text_column=review&label_column=stars")).multipart(form).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let d: Value = r.json().await.unwrap();
    assert_eq!(d["format"], "csv");
    assert_eq!(d["name"], "reviews.csv");
    assert_eq!(d["labels"]["5"], 1);
}

#[tokio::test]
async fn a_bad_dataset_is_refused_with_its_line_and_nothing_is_stored() {
    let app = spawn_app().await;
    let body = format!("{}{{\"text\": \"no label here\"}}\n", toy_jsonl(4));
    let err = assert_error(app.upload(body, "application/x-ndjson").await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_dataset").await;
    assert_eq!(err["line"], 5);
    assert_eq!(err["param"], "file");
    let list: Value = app.get("/v1/datasets").await.json().await.unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    let files: Vec<_> = std::fs::read_dir(app.data_dir.join("datasets")).unwrap().collect();
    assert!(files.is_empty(), "files left behind: {files:?}");
}

#[tokio::test]
async fn wrong_content_type_and_oversized_bodies_get_the_envelope() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = finetuned::config::ServeConfig::for_test(tmp.path().join("data"), models_dir(tmp.path()));
    cfg.max_upload_bytes = 1000;
    let app = spawn_with(cfg).await;
    assert_error(app.upload(toy_jsonl(4), "text/html").await, StatusCode::BAD_REQUEST, "bad_request").await;
    assert_error(app.upload(toy_jsonl(200), "application/x-ndjson").await, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    // Without a Content-Length the limit is counted as the body is written to disk; the part
    // written is removed.
    let status = chunked_upload(&app.base, &toy_jsonl(200)).await;
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");
    let files: Vec<_> = std::fs::read_dir(app.data_dir.join("datasets")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(files.is_empty(), "{files:?}");
}

/// POSTs `body` to `/v1/datasets` in chunks of 100 bytes (no Content-Length); the status line.
async fn chunked_upload(base: &str, body: &str) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request =
        format!("POST /v1/datasets HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n");
    for chunk in body.as_bytes().chunks(100) {
        request += &format!("{:x}\r\n{}\r\n", chunk.len(), std::str::from_utf8(chunk).unwrap());
    }
    request += "0\r\n\r\n";
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut line = String::new();
    tokio::io::BufReader::new(conn).read_line(&mut line).await.unwrap();
    line
}

#[tokio::test]
async fn unknown_ids_and_routes_give_404_in_the_envelope() {
    let app = spawn_app().await;
    for path in [
        "/v1/datasets/ds_nope",
        "/v1/jobs/job_nope",
        "/v1/jobs/job_nope/events",
        "/v1/jobs/job_nope/metrics",
        "/v1/models/nope",
        "/v1/nothing",
    ] {
        assert_error(app.get(path).await, StatusCode::NOT_FOUND, "not_found").await;
    }
    let r = app.post_json("/v1/jobs/job_nope/cancel", &serde_json::json!({})).await;
    assert_error(r, StatusCode::NOT_FOUND, "not_found").await;
    let r = app.predict("nope", &serde_json::json!({"inputs": "x"})).await;
    assert_error(r, StatusCode::NOT_FOUND, "not_found").await;
    let r = app.client.delete(app.url("/v1/datasets/ds_nope")).send().await.unwrap();
    assert_error(r, StatusCode::NOT_FOUND, "not_found").await;
    let r = app.client.put(app.url("/v1/datasets")).send().await.unwrap();
    assert_error(r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
}

#[tokio::test]
async fn api_key_guards_v1_but_not_health() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = finetuned::config::ServeConfig::for_test(tmp.path().join("data"), models_dir(tmp.path()));
    cfg.api_key = Some("s3cret".into());
    let app = spawn_with(cfg).await;
    assert_error(app.get("/v1/datasets").await, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let r = app.client.get(app.url("/v1/datasets")).bearer_auth("wrong").send().await.unwrap();
    assert_error(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let r = app.client.get(app.url("/v1/datasets")).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);
    assert_eq!(app.get("/readyz").await.status(), StatusCode::OK);
    assert_eq!(app.get("/openapi.yaml").await.status(), StatusCode::OK);
}

/// A part sent twice is refused with 422 naming it, and nothing is stored: not the dataset of
/// `POST /v1/datasets`, nor the files or the job of `POST /v1/jobs`.
#[tokio::test]
async fn a_repeated_multipart_part_is_refused_and_nothing_is_stored() {
    use reqwest::multipart::{Form, Part};
    let app = spawn_app().await;
    let file = |n| Part::text(toy_jsonl(n)).file_name("train.jsonl");
    let form = Form::new().part("file", file(8)).part("file", file(12));
    let r = app.client.post(app.url("/v1/datasets")).multipart(form).send().await.unwrap();
    let err = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    assert_eq!(err["param"], "file", "{err}");

    let job = || Part::text(serde_json::json!({"base_model": "tiny"}).to_string());
    let forms = [
        ("training_file", Form::new().part("job", job()).part("training_file", file(8)).part("training_file", file(12))),
        (
            "validation_file",
            Form::new().part("job", job()).part("training_file", file(8)).part("validation_file", file(4)).part("validation_file", file(4)),
        ),
        ("job", Form::new().part("job", job()).part("training_file", file(8)).part("job", job())),
    ];
    for (part, form) in forms {
        let r = app.client.post(app.url("/v1/jobs")).multipart(form).send().await.unwrap();
        let err = assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
        assert_eq!(err["param"], part, "{err}");
        assert!(err["message"].as_str().unwrap().contains("more than once"), "{err}");
    }
    let datasets: Value = app.get("/v1/datasets").await.json().await.unwrap();
    assert_eq!(datasets["data"], serde_json::json!([]), "{datasets}");
    let jobs: Value = app.get("/v1/jobs").await.json().await.unwrap();
    assert_eq!(jobs["data"], serde_json::json!([]), "{jobs}");
}

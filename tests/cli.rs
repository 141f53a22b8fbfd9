//! `finetuned train`, the offline command: it resolves hyperparameters as the API does (the
//! method's own learning rate when none is given) and refuses what the API refuses, in the same
//! words.

mod common;

use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn train(dir: &Path, args: &[&str]) -> std::process::Output {
    let out = dir.join("report.json");
    Command::new(env!("CARGO_BIN_EXE_finetuned"))
        .arg("train")
        .arg("--model")
        .arg(dir.join("tiny"))
        .arg("--data")
        .arg(dir.join("data"))
        .arg("--out")
        .arg(&out)
        .args(["--batch-size", "8", "--threads", "1"])
        .args(args)
        .output()
        .unwrap()
}

fn setup() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    common::write_tiny_model(tmp.path(), "tiny");
    std::fs::create_dir_all(tmp.path().join("data")).unwrap();
    std::fs::write(tmp.path().join("data/train.jsonl"), common::toy_jsonl(24)).unwrap();
    tmp
}

#[test]
fn without_lr_each_method_trains_at_its_own_default_rate() {
    let tmp = setup();
    for (method, rate) in [("head", 1e-2), ("lora", 2e-3), ("full", 5e-5)] {
        let run = train(tmp.path(), &["--method", method]);
        assert!(run.status.success(), "{method}: {}", String::from_utf8_lossy(&run.stderr));
        let report: Value = serde_json::from_slice(&std::fs::read(tmp.path().join("report.json")).unwrap()).unwrap();
        assert_eq!(report["args"]["lr"], rate, "{method}: {}", report["args"]);
    }
}

#[test]
fn the_command_refuses_what_the_api_refuses_in_the_same_words() {
    let tmp = setup();
    let run = train(tmp.path(), &["--method", "full", "--lora-r", "4"]);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    // The API's 422 for the same request: param `hyperparameters.lora_r`, this message.
    assert!(err.contains("hyperparameters.lora_r: applies only with \"method\": \"lora\""), "{err}");
}

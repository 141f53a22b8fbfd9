//! Replays the fuzz targets' seeds and every input a fuzzer once crashed on (`fuzz/seeds`,
//! `fuzz/regressions`) through the same property checks, on stable Rust.

use finetuned::dataset::Format;
use std::path::Path;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut found = vec![];
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.starts_with('.') {
                found.push((format!("{dir}/{target}/{name}"), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    found
}

fn replay(target: &str, check: impl Fn(&[u8])) {
    let all = inputs(target);
    assert!(!all.is_empty(), "no seeds for {target}");
    for (name, data) in all {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&data)));
        assert!(r.is_ok(), "{name} breaks the {target} properties");
    }
}

#[test]
fn jsonl_parser_seeds_and_regressions() {
    replay("dataset_jsonl", |d| finetuned::fuzzing::dataset(d, Format::Jsonl));
}

#[test]
fn csv_parser_seeds_and_regressions() {
    replay("dataset_csv", |d| finetuned::fuzzing::dataset(d, Format::Csv));
}

#[test]
fn predict_body_seeds_and_regressions() {
    replay("predict_body", finetuned::fuzzing::predict_body);
}

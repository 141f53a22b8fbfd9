//! The properties the fuzz targets (`fuzz/`) check, in the library so that `cargo test` can
//! replay the seed inputs and every crash once found (`fuzz/regressions/`) on stable Rust.

use crate::dataset::{parse, to_jsonl, Format};

/// Inputs per request the predict check allows.
pub const MAX_INPUTS: usize = 8;
/// Characters per input the predict check allows.
pub const MAX_INPUT_CHARS: usize = 64;

/// A dataset parser on arbitrary bytes: it never panics; what it accepts has rows with text,
/// and storing them (JSONL) then parsing that back gives the same rows.
pub fn dataset(data: &[u8], format: Format) {
    let Ok(parsed) = parse(data, format, "text", "label") else { return };
    assert!(!parsed.rows.is_empty());
    assert!(parsed.rows.iter().all(|r| !r.text.trim().is_empty()));
    let stored = to_jsonl(&parsed.rows);
    let again = parse(&stored, Format::Jsonl, "text", "label").expect("a stored dataset parses");
    assert_eq!(again.rows, parsed.rows);
}

/// A predict body on arbitrary bytes: accepted with 1..=[`MAX_INPUTS`] inputs of at most
/// [`MAX_INPUT_CHARS`] characters, or refused with a 4xx.
pub fn predict_body(data: &[u8]) {
    let limits = crate::api::predict::BodyLimits { max_inputs: MAX_INPUTS, max_input_chars: MAX_INPUT_CHARS };
    match crate::api::predict::check_body(data, limits) {
        Ok(req) => {
            assert!((1..=MAX_INPUTS).contains(&req.texts.len()));
            assert!(req.texts.iter().all(|t| t.chars().count() <= MAX_INPUT_CHARS));
        }
        Err(e) => assert!(e.status.is_client_error(), "{} for {:?}", e.status, String::from_utf8_lossy(data)),
    }
}

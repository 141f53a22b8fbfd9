//! The predict body on arbitrary bytes (properties: `finetuned::fuzzing::predict_body`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| finetuned::fuzzing::predict_body(data));

//! The JSONL dataset parser on arbitrary bytes (properties: `finetuned::fuzzing::dataset`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| finetuned::fuzzing::dataset(data, finetuned::dataset::Format::Jsonl));

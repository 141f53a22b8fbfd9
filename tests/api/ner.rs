//! Named entities through the API: tagged words uploaded as JSONL, CoNLL text and entity spans;
//! a token-classification job with each method; entities on predict in our shape and the
//! Hugging Face inference API's; the errors that name a bad line.

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn conll_rows(n: usize) -> String {
    let text = std::fs::read_to_string(crate::common::shared().join("datasets/conll2003/train.jsonl")).unwrap();
    text.lines().take(n).map(|l| format!("{l}\n")).collect()
}

/// The same sentences as CoNLL text (a token, two other columns and its tag per line).
fn conll_text(n: usize) -> String {
    let mut out = String::from("-DOCSTART- -X- -X- O\n\n");
    for line in conll_rows(n).lines() {
        let row: Value = serde_json::from_str(line).unwrap();
        for (t, g) in row["tokens"].as_array().unwrap().iter().zip(row["tags"].as_array().unwrap()) {
            out.push_str(&format!("{} NN O {}\n", t.as_str().unwrap(), g.as_str().unwrap()));
        }
        out.push('\n');
    }
    out
}

/// Sentences of the tiny model's words: positive words are POS entities, negative ones NEG,
/// the others O (a run of positive words is one entity). Each sentence is 16 clauses of 5 words,
/// longer than the tiny model's 64 positions: training cuts it into windows.
pub(crate) fn toy_tagged(n: usize) -> String {
    use crate::common::{NEGATIVE, NEUTRAL, POSITIVE};
    let mut out = String::new();
    for i in 0..n {
        let (mut words, mut tags) = (Vec::new(), Vec::new());
        for c in i..i + 16 {
            let (a, b) = (POSITIVE[c % POSITIVE.len()], NEGATIVE[(c / 2) % NEGATIVE.len()]);
            words.extend([NEUTRAL[c % NEUTRAL.len()], a, POSITIVE[(c + 1) % POSITIVE.len()], NEUTRAL[(c + 3) % NEUTRAL.len()], b]);
            tags.extend(["O", "B-POS", "I-POS", "O", "B-NEG"]);
        }
        out.push_str(&format!("{}\n", json!({"tokens": words, "tags": tags})));
    }
    out
}

pub(crate) async fn upload_as(app: &TestApp, body: String, content_type: &str) -> Value {
    let r = app.upload(body, content_type).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    r.json().await.unwrap()
}

#[tokio::test]
async fn a_tagger_trains_with_each_method_and_predicts_entities() {
    let app = spawn_app().await;
    let d = upload_as(&app, conll_rows(48), "application/jsonl").await;
    assert_eq!(d["kind"], "tokens", "{d}");
    assert!(d["labels"]["B-ORG"].as_u64().unwrap() > 0, "tags are counted: {d}");
    let from_conll = upload_as(&app, conll_text(48), "text/x-conll").await;
    assert_eq!((from_conll["kind"].as_str(), from_conll["rows"].as_u64()), (Some("tokens"), Some(48)), "{from_conll}");
    assert_eq!(from_conll["labels"], d["labels"], "the same sentences, the same tags");
    let toy = upload_as(&app, toy_tagged(32), "application/jsonl").await;
    let text = "the great lovely film dull";
    for method in ["full", "lora", "head"] {
        let name = format!("ner-{method}");
        let mut hp = tiny_hp(8);
        hp["method"] = json!(method);
        if method == "head" {
            // A linear head over the frozen random encoder learns slowly.
            hp["learning_rate"] = json!(3e-2);
        }
        let body = json!({"base_model": "tiny", "training_dataset": toy["id"], "task": "token_classification", "model_name": name, "hyperparameters": hp});
        let done = app.wait_ended(app.create_job(&body).await["id"].as_str().unwrap(), 120).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        for key in ["f1", "precision", "recall", "accuracy", "loss"] {
            assert!(done["metrics"]["validation"][key].is_number(), "{method}: validation {key}: {done}");
        }
        let model: Value = app.get(&format!("/v1/models/{name}")).await.json().await.unwrap();
        assert_eq!(model["task"], "token_classification", "{model}");
        assert_eq!(model["labels"], json!(["B-NEG", "B-POS", "I-POS", "O"]), "{model}");

        // Raw tag scores of every sub-word (aggregation none, nothing left out but O).
        let body = json!({"inputs": [text, text], "aggregation_strategy": "none"});
        let r: Value = app.predict(&name, &body).await.json().await.unwrap();
        let preds = r["predictions"].as_array().unwrap_or_else(|| panic!("{r}"));
        assert_eq!(preds.len(), 2);
        assert_eq!(preds[0], preds[1], "{r}");
        assert!(!preds[0].as_array().unwrap().is_empty(), "{method}: the tagger finds entities: {r}");
        for e in preds[0].as_array().unwrap() {
            let (start, end) = (e["start"].as_u64().unwrap() as usize, e["end"].as_u64().unwrap() as usize);
            assert_eq!(e["word"].as_str().unwrap(), &text[start..end], "offsets index the text: {e}");
            assert!(e["entity"].as_str().unwrap().contains('-') && e["index"].as_u64().unwrap() > 0, "{e}");
        }
        // The Hugging Face inference API's shape: one text, its list of entities.
        let hf: Value =
            app.predict(&name, &json!({"inputs": text, "parameters": {"aggregation_strategy": "first"}})).await.json().await.unwrap();
        let list = hf.as_array().unwrap_or_else(|| panic!("{hf}"));
        assert!(!list.is_empty(), "{method}: {hf}");
        for e in list {
            assert!(e["entity_group"].is_string() && e["score"].is_number() && e.get("entity").is_none(), "{e}");
        }
        if method == "full" {
            let groups: Vec<(&str, &str)> =
                list.iter().map(|e| (e["entity_group"].as_str().unwrap(), e["word"].as_str().unwrap())).collect();
            assert_eq!(groups, [("POS", "great lovely"), ("NEG", "dull")], "{hf}");
        }
    }
    // A long text is scored in windows: every word keeps a tag, none is cut off.
    let long = vec![text; 30].join(" ");
    let r: Value =
        app.predict("ner-full", &json!({"inputs": [long.clone()], "aggregation_strategy": "simple"})).await.json().await.unwrap();
    let found = r["predictions"][0].as_array().unwrap();
    let neg: Vec<u64> = found.iter().filter(|e| e["entity_group"] == "NEG").map(|e| e["start"].as_u64().unwrap()).collect();
    let dull: Vec<u64> = long.match_indices("dull").map(|(i, _)| i as u64).collect();
    assert_eq!(neg, dull, "each of the 30 sentences' NEG word, over several 64-token windows: {r}");
    // A text classifier's options are refused here, and entities' on a text classifier.
    let r = app.predict("ner-full", &json!({"inputs": [text], "top_k": 1})).await;
    assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
    let r = app.predict("ner-full", &json!({"inputs": [text], "aggregation_strategy": "loud"})).await;
    assert_eq!(assert_error(r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await["param"], "aggregation_strategy");
}

#[tokio::test]
async fn span_rows_are_tagged_words() {
    let app = spawn_app().await;
    let rows = [
        json!({"text": "Ada Lovelace met Charles Babbage in London.", "entities": [{"start": 0, "end": 12, "label": "PER"}, {"start": 17, "end": 32, "label": "PER"}, {"start": 36, "end": 42, "label": "LOC"}]}),
        json!({"text": "Nothing here.", "entities": []}),
    ];
    let body: String = rows.iter().map(|r| format!("{r}\n")).collect();
    let d = upload_as(&app, body, "application/jsonl").await;
    assert_eq!(d["kind"], "tokens");
    assert_eq!(d["labels"], json!({"B-LOC": 1, "B-PER": 2, "I-PER": 2, "O": 6}), "{d}");
}

#[tokio::test]
async fn bad_tagged_rows_are_refused_naming_the_line() {
    let app = spawn_app().await;
    let ok = r#"{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}"#;
    let cases = [
        (format!("{ok}\n{}\n", r#"{"tokens": ["a", "b"], "tags": ["O"]}"#), 2, "1 tags for 2 tokens"),
        (format!("{ok}\n{}\n", r#"{"tokens": ["a"], "tags": ["PERSON"]}"#), 2, "no known scheme"),
        (
            format!(
                "{ok}\n{}\n",
                r#"{"text": "abc", "entities": [{"start": 0, "end": 2, "label": "X"}, {"start": 1, "end": 3, "label": "Y"}]}"#
            ),
            2,
            "overlaps",
        ),
        (format!("{ok}\n{}\n", r#"{"text": "abc", "entities": [{"start": 0, "end": 9, "label": "X"}]}"#), 2, "out of range"),
        (format!("{ok}\n{}\n", r#"{"text": "abc", "label": "x"}"#), 2, "tagged words"),
    ];
    for (body, line, needle) in cases {
        let e =
            assert_error(app.upload(body.clone(), "application/jsonl").await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_dataset").await;
        assert_eq!(e["line"], line, "{body}: {e}");
        assert!(e["message"].as_str().unwrap().contains(needle), "{body}: {e}");
    }
    let e = assert_error(
        app.upload("EU B-ORG\nrejects\n".to_string(), "text/x-conll").await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_dataset",
    )
    .await;
    assert_eq!(e["line"], 2, "{e}");
    // A task that does not fit the dataset's rows.
    let tagged = upload_as(&app, conll_rows(8), "application/jsonl").await;
    let texts = app.upload_ok("{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": \"y\"}\n").await;
    for (ds, task) in [(tagged["id"].as_str().unwrap().to_string(), "classification"), (texts, "token_classification")] {
        let body = json!({"base_model": "tiny", "training_dataset": ds, "task": task});
        let e = assert_error(app.post_json("/v1/jobs", &body).await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter").await;
        assert_eq!(e["param"], "training_dataset", "{task}: {e}");
    }
}

//! Dataset files: parsing and validating uploaded JSONL/CSV/CoNLL whole, and the normalised
//! JSONL form they are stored in.

pub mod tags;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Longest text accepted, in bytes.
pub const MAX_TEXT_BYTES: usize = 100_000;
/// Longest label accepted, in bytes.
pub const MAX_LABEL_BYTES: usize = 256;
/// Most distinct labels in one dataset.
pub const MAX_LABELS: usize = 10_000;

/// Upload format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jsonl,
    Csv,
    /// CoNLL text (`text/x-conll`): a `token … tag` line per token, sentences apart.
    Conll,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
            Format::Conll => "conll",
        }
    }
}

/// One example: its text and its labels (none for unlabeled data, one for
/// classification, any number for multi-label), or its words and their tags (named entities).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub text: String,
    /// The second text of a pair (sentence-pair tasks: entailment, paraphrase, similarity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_pair: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<LabelValue>,
    /// A tagged row's words (its `text` is them joined by spaces, or the text they came from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<String>>,
    /// A tagged row's IOB2 tag per word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
}

/// A stored label: one string, or a list for multi-label data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LabelValue {
    One(String),
    Many(Vec<String>),
}

impl Row {
    /// The row's labels as a list (a tagged row's tags, one per word).
    pub fn labels(&self) -> Vec<&str> {
        if let Some(tags) = &self.tags {
            return tags.iter().map(String::as_str).collect();
        }
        match &self.label {
            None => vec![],
            Some(LabelValue::One(l)) => vec![l.as_str()],
            Some(LabelValue::Many(ls)) => ls.iter().map(String::as_str).collect(),
        }
    }
}

/// A validated dataset.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub rows: Vec<Row>,
    pub format: Format,
    /// Examples per label (empty for unlabeled data).
    pub labels: BTreeMap<String, usize>,
    pub multi_label: bool,
    /// Whether the rows are pairs of texts (every row has a `text_pair`).
    pub pairs: bool,
    /// Whether the rows are tagged words (named entities); `labels` then counts the tags.
    pub tokens: bool,
    /// The line of the first label that is not a number (`None`: every label is one, as a
    /// regression's must be, or the file has none).
    pub text_label_line: Option<usize>,
}

/// The columns (JSONL fields) a file's rows are read from.
#[derive(Debug, Clone)]
pub struct Columns<'a> {
    pub text: &'a str,
    /// The second text of a pair, where a row has it.
    pub text_pair: &'a str,
    pub label: &'a str,
}

impl Default for Columns<'_> {
    fn default() -> Self {
        Self { text: "text", text_pair: "text_pair", label: "label" }
    }
}

/// The first problem found in a file: 1-based line (0 for the file as a whole).
#[derive(Debug, Clone, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct DatasetError {
    pub line: usize,
    pub message: String,
}

pub(crate) fn err<T>(line: usize, message: impl Into<String>) -> Result<T, DatasetError> {
    Err(DatasetError { line, message: message.into() })
}

/// Parses and validates a whole file. Accepts a leading byte-order mark and CRLF line ends;
/// skips blank lines; refuses the file at its first bad row.
pub fn parse(bytes: &[u8], format: Format, text_col: &str, label_col: &str) -> Result<Parsed, DatasetError> {
    parse_columns(bytes, format, &Columns { text: text_col, label: label_col, ..Columns::default() })
}

/// [`parse`] with the pair's column named too.
pub fn parse_columns(bytes: &[u8], format: Format, cols: &Columns) -> Result<Parsed, DatasetError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
            return err(line, "the file is not valid UTF-8");
        }
    };
    let rows = match format {
        Format::Jsonl => parse_jsonl(text, cols)?,
        Format::Csv => parse_csv(text, cols)?,
        Format::Conll => tags::parse_conll(text)?,
    };
    check_rows(rows, format)
}

fn check_rows(rows: Vec<(usize, Row)>, format: Format) -> Result<Parsed, DatasetError> {
    if rows.is_empty() {
        return err(0, "the file holds no rows");
    }
    let labeled = rows[0].1.label.is_some();
    let multi = matches!(rows[0].1.label, Some(LabelValue::Many(_)));
    let pairs = rows[0].1.text_pair.is_some();
    let tokens = rows[0].1.tokens.is_some();
    let labeled = labeled || rows[0].1.tags.is_some();
    let mut labels = BTreeMap::new();
    let mut text_label_line = None;
    for (line, row) in &rows {
        if tokens {
            check_tagged(*line, row, labeled)?;
        } else if row.tokens.is_some() {
            return err(*line, "this row is tagged words but the first row is a text");
        }
        if row.text.trim().is_empty() {
            return err(*line, "field \"text\" is empty");
        }
        if row.text.len() > MAX_TEXT_BYTES {
            return err(*line, format!("text is longer than {MAX_TEXT_BYTES} bytes"));
        }
        match (&row.text_pair, pairs) {
            (None, true) => return err(*line, "field \"text_pair\" is missing (other rows are pairs)"),
            (Some(_), false) => return err(*line, "this row is a pair but the first row is a single text"),
            (Some(p), _) if p.trim().is_empty() => return err(*line, "field \"text_pair\" is empty"),
            (Some(p), _) if p.len() > MAX_TEXT_BYTES => return err(*line, format!("text_pair is longer than {MAX_TEXT_BYTES} bytes")),
            _ => {}
        }
        match (&row.label, labeled && !tokens, multi) {
            (None, true, _) => return err(*line, "field \"label\" is missing (other rows have one)"),
            (Some(_), false, _) => return err(*line, "this row has a label but the first row has none"),
            (Some(LabelValue::Many(_)), _, false) => return err(*line, "a label list in a single-label file"),
            (Some(LabelValue::One(_)), _, true) => return err(*line, "a single label in a multi-label file"),
            _ => {}
        }
        for l in row.labels() {
            if l.trim().is_empty() || l.len() > MAX_LABEL_BYTES {
                return err(*line, format!("a label must be 1 to {MAX_LABEL_BYTES} bytes and not blank"));
            }
            *labels.entry(l.to_string()).or_insert(0) += 1;
            if text_label_line.is_none() && !is_number(l) {
                text_label_line = Some(*line);
            }
            // Numeric labels (a regression's targets) may take any number of values.
            if labels.len() > MAX_LABELS && text_label_line.is_some() {
                return err(*line, format!("more than {MAX_LABELS} distinct labels"));
            }
        }
    }
    let rows = rows.into_iter().map(|(_, r)| r).collect();
    Ok(Parsed { rows, format, labels, multi_label: multi, pairs, tokens, text_label_line })
}

/// A tagged row: words, a tag per word when the file is tagged, and no text label.
fn check_tagged(line: usize, row: &Row, labeled: bool) -> Result<(), DatasetError> {
    let words = row.tokens.as_deref().unwrap_or_default();
    if row.tokens.is_none() {
        return err(line, "this row is a text but the first row is tagged words");
    }
    if words.is_empty() || words.iter().any(|w| w.trim().is_empty()) {
        return err(line, "field \"tokens\" must hold at least one word, and no empty word");
    }
    match (&row.tags, labeled) {
        (None, true) => err(line, "field \"tags\" is missing (other rows have tags)"),
        (Some(_), false) => err(line, "this row has tags but the first row has none"),
        (Some(t), _) if t.len() != words.len() => {
            err(line, format!("{} tags for {} tokens: each token needs one tag", t.len(), words.len()))
        }
        _ if row.label.is_some() => err(line, "a row of tagged words takes no \"label\""),
        _ => Ok(()),
    }
}

/// Whether a label is a finite number (a JSON number, or a CSV field that reads as one).
pub fn is_number(label: &str) -> bool {
    label.trim().parse::<f64>().is_ok_and(f64::is_finite)
}

fn label_from_json(v: &Value, line: usize, col: &str) -> Result<Option<LabelValue>, DatasetError> {
    Ok(match v {
        Value::Null => None,
        Value::String(s) => Some(LabelValue::One(s.clone())),
        // Kept as written: `4.2` stays "4.2", a class name for classification or a target for
        // regression.
        Value::Number(n) => Some(LabelValue::One(n.to_string())),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) => out.push(s.clone()),
                    Value::Number(n) if n.is_i64() || n.is_u64() => out.push(n.to_string()),
                    _ => return err(line, format!("field {col:?} must be a list of strings")),
                }
            }
            out.sort();
            out.dedup();
            Some(LabelValue::Many(out))
        }
        _ => return err(line, format!("field {col:?} must be a string, a number or a list of strings")),
    })
}

/// The text and pair columns: the default `text`/`text_pair`, or a reranking file's
/// `query`/`document` where it has those and no `text`.
fn reranking_columns<'a>(cols: &Columns<'a>, has: impl Fn(&str) -> bool) -> (&'a str, &'a str) {
    let defaults = Columns::default();
    if cols.text == defaults.text && cols.text_pair == defaults.text_pair && !has("text") && has("query") {
        return ("query", "document");
    }
    (cols.text, cols.text_pair)
}

fn parse_jsonl(text: &str, cols: &Columns) -> Result<Vec<(usize, Row)>, DatasetError> {
    let label_col = cols.label;
    let mut rows = Vec::new();
    for (i, raw) in text.split('\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.trim().is_empty() {
            continue;
        }
        let obj: serde_json::Map<String, Value> = match serde_json::from_str(raw) {
            Ok(Value::Object(o)) => o,
            Ok(_) => return err(line, "each line must be a JSON object"),
            Err(e) => return err(line, format!("invalid JSON: {e}")),
        };
        if let Some(row) = tagged_json(&obj, line)? {
            rows.push((line, row));
            continue;
        }
        let (text_col, pair_col) = reranking_columns(cols, |c| obj.contains_key(c));
        let text = match obj.get(text_col) {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return err(line, format!("field {text_col:?} must be a string")),
            None => return err(line, format!("field {text_col:?} is missing")),
        };
        let text_pair = match obj.get(pair_col) {
            Some(Value::String(s)) => Some(s.clone()),
            None | Some(Value::Null) => None,
            Some(_) => return err(line, format!("field {pair_col:?} must be a string")),
        };
        let label = match obj.get(label_col) {
            Some(v) => label_from_json(v, line, label_col)?,
            None => None,
        };
        rows.push((line, Row { text, text_pair, label, tokens: None, tags: None }));
    }
    Ok(rows)
}

/// A JSONL row of tagged words (`{"tokens", "tags"}`) or of a text and its entity spans
/// (`{"text", "entities": [{"start", "end", "label"}]}`), with its tags in IOB2; `None` for a
/// row of neither kind.
fn tagged_json(obj: &serde_json::Map<String, Value>, line: usize) -> Result<Option<Row>, DatasetError> {
    let strings = |field: &str| -> Result<Option<Vec<String>>, DatasetError> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                serde_json::from_value(v.clone()).map(Some).or_else(|_| err(line, format!("field {field:?} must be a list of strings")))
            }
        }
    };
    let iob2 = |found: Option<Vec<String>>| found.map(|t| tags::to_iob2(&t)).transpose().or_else(|m| err(line, m));
    if let Some(tokens) = strings("tokens")? {
        let tags = iob2(strings("tags")?)?;
        return Ok(Some(tags::tagged_row(tokens, tags)));
    }
    let Some(entities) = obj.get("entities") else { return Ok(None) };
    let Some(Value::String(text)) = obj.get("text") else { return err(line, "a row with \"entities\" needs its \"text\"") };
    let spans: Vec<tags::Span> = serde_json::from_value(entities.clone())
        .or_else(|e| err(line, format!("field \"entities\" must be a list of {{\"start\", \"end\", \"label\"}}: {e}")))?;
    let (words, word_tags) = tags::spans_to_words(text, &spans).or_else(|m| err(line, m))?;
    if words.is_empty() {
        return err(line, "field \"text\" is empty");
    }
    Ok(Some(Row { text: text.clone(), text_pair: None, label: None, tokens: Some(words), tags: Some(word_tags) }))
}

fn parse_csv(text: &str, cols: &Columns) -> Result<Vec<(usize, Row)>, DatasetError> {
    let label_col = cols.label;
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(text.as_bytes());
    let headers = match reader.headers() {
        Ok(h) => h.clone(),
        Err(e) => return err(1, format!("invalid CSV header: {e}")),
    };
    let (text_col, pair_col) = reranking_columns(cols, |c| headers.iter().any(|h| h.trim() == c));
    let Some(text_idx) = headers.iter().position(|h| h.trim() == text_col) else {
        return err(1, format!("the header has no column {text_col:?}"));
    };
    let label_idx = headers.iter().position(|h| h.trim() == label_col);
    let pair_idx = headers.iter().position(|h| h.trim() == pair_col);
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
                return err(line, format!("invalid CSV: {e}"));
            }
        };
        let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
        if record.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        let text = record.get(text_idx).unwrap_or("").to_string();
        let label = label_idx.and_then(|i| record.get(i)).filter(|l| !l.is_empty()).map(|l| LabelValue::One(l.to_string()));
        let text_pair = pair_idx.and_then(|i| record.get(i)).filter(|p| !p.is_empty()).map(String::from);
        rows.push((line, Row { text, text_pair, label, tokens: None, tags: None }));
    }
    Ok(rows)
}

/// Serialises rows as the stored normalised JSONL.
pub fn to_jsonl(rows: &[Row]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut out, r).expect("rows serialise");
        out.push(b'\n');
    }
    out
}

/// Reads a stored normalised JSONL file.
pub fn read_stored(path: &std::path::Path) -> anyhow::Result<Vec<Row>> {
    let text = std::fs::read_to_string(path)?;
    text.lines().filter(|l| !l.is_empty()).map(|l| Ok(serde_json::from_str(l)?)).collect()
}

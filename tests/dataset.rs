//! Dataset parsing: accepted forms, and errors that name the line.

use finetuned::dataset::{parse, Format, LabelValue};

fn jsonl(s: &str) -> Result<finetuned::dataset::Parsed, finetuned::dataset::DatasetError> {
    parse(s.as_bytes(), Format::Jsonl, "text", "label")
}

#[test]
fn jsonl_with_bom_crlf_blank_lines_and_integer_labels_parses() {
    let d = jsonl("\u{feff}{\"text\": \"a\", \"label\": \"x\"}\r\n\r\n{\"text\": \"b\", \"label\": 3}\r\n").unwrap();
    assert_eq!(d.rows.len(), 2);
    assert_eq!(d.rows[1].label, Some(LabelValue::One("3".into())));
    assert_eq!(d.labels.get("x"), Some(&1));
    assert!(!d.multi_label);
}

#[test]
fn errors_name_the_first_bad_line() {
    let cases = [
        ("{\"text\": \"a\", \"label\": \"x\"}\n{\"label\": \"y\"}\n", 2, "\"text\" is missing"),
        ("{\"text\": \"a\", \"label\": \"x\"}\n\n{\"text\": \"b\", \"label\": \"y\"}\nnot json\n", 4, "invalid JSON"),
        ("{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\"}\n", 2, "\"label\" is missing"),
        ("{\"text\": \"a\", \"label\": 1.5}\n", 1, "must be a string"),
        ("{\"text\": \"\", \"label\": \"x\"}\n", 1, "empty"),
        ("[1, 2]\n", 1, "JSON object"),
    ];
    for (input, line, needle) in cases {
        let e = jsonl(input).unwrap_err();
        assert_eq!(e.line, line, "{input:?} → {e}");
        assert!(e.message.contains(needle), "{input:?} → {e}");
    }
}

#[test]
fn invalid_utf8_names_its_line() {
    let mut bytes = b"{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"".to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    bytes.extend_from_slice(b"\", \"label\": \"x\"}\n");
    let e = parse(&bytes, Format::Jsonl, "text", "label").unwrap_err();
    assert_eq!(e.line, 2);
    assert!(e.message.contains("UTF-8"));
}

#[test]
fn unlabeled_and_multi_label_files_parse_but_mixing_is_refused() {
    let d = jsonl("{\"text\": \"a\"}\n{\"text\": \"b\"}\n").unwrap();
    assert!(d.labels.is_empty());
    let m = jsonl("{\"text\": \"a\", \"label\": [\"x\", \"y\"]}\n{\"text\": \"b\", \"label\": []}\n").unwrap();
    assert!(m.multi_label);
    assert_eq!(m.labels.get("y"), Some(&1));
    let e = jsonl("{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": [\"x\"]}\n").unwrap_err();
    assert_eq!(e.line, 2);
}

#[test]
fn csv_with_custom_columns_and_quoted_fields() {
    let csv = "id,review,sentiment\r\n1,\"great, really\",pos\r\n2,awful,neg\r\n";
    let d = parse(csv.as_bytes(), Format::Csv, "review", "sentiment").unwrap();
    assert_eq!(d.rows[0].text, "great, really");
    assert_eq!(d.labels.len(), 2);
    let e = parse(b"review\nfine\n", Format::Csv, "text", "label").unwrap_err();
    assert_eq!(e.line, 1);
    assert!(e.message.contains("\"text\""));
    let e = parse(b"text,label\na,x\nb,y,extra\n", Format::Csv, "text", "label").unwrap_err();
    assert_eq!(e.line, 3, "{e}");
}

#[test]
fn an_empty_file_is_refused() {
    assert!(jsonl("\n\n").is_err());
}

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
        ("{\"text\": \"a\", \"label\": true}\n", 1, "must be a string, a number"),
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
fn numeric_labels_are_kept_as_written_and_the_first_other_label_is_found() {
    let d = jsonl("{\"text\": \"a\", \"label\": 4.25}\n{\"text\": \"b\", \"label\": 0}\n{\"text\": \"c\", \"label\": \"1e-3\"}\n").unwrap();
    assert_eq!(d.rows[0].label, Some(LabelValue::One("4.25".into())));
    assert_eq!(d.text_label_line, None, "every label is a number");
    let d = jsonl("{\"text\": \"a\", \"label\": 4.25}\n\n{\"text\": \"b\", \"label\": \"high\"}\n").unwrap();
    assert_eq!(d.text_label_line, Some(3), "the line in the file, blank lines counted");
    // Numbers may take more distinct values than a classifier's labels.
    let many: String = (0..10_050).map(|i| format!("{{\"text\": \"t\", \"label\": {}.5}}\n", i)).collect();
    assert_eq!(jsonl(&many).unwrap().labels.len(), 10_050);
    let e = jsonl(&format!("{many}{{\"text\": \"t\", \"label\": \"x\"}}\n")).unwrap_err();
    assert!(e.message.contains("distinct labels"), "{e}");
}

#[test]
fn reranking_rows_read_query_and_document_as_a_pair() {
    let d = jsonl("{\"query\": \"q\", \"document\": \"d\", \"label\": 1}\n").unwrap();
    assert_eq!((d.rows[0].text.as_str(), d.rows[0].text_pair.as_deref()), ("q", Some("d")));
    assert!(d.pairs);
    let csv = "query,document,label\nq,d,0.5\n";
    let d = parse(csv.as_bytes(), Format::Csv, "text", "label").unwrap();
    assert_eq!((d.rows[0].text.as_str(), d.rows[0].text_pair.as_deref()), ("q", Some("d")));
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

#[test]
fn pairs_parse_from_jsonl_and_csv_and_a_named_column() {
    let d = jsonl(
        "{\"text\": \"a b\", \"text_pair\": \"c d\", \"label\": \"same\"}\n{\"text\": \"e\", \"text_pair\": \"f\", \"label\": \"other\"}\n",
    )
    .unwrap();
    assert!(d.pairs);
    assert_eq!(d.rows[0].text_pair.as_deref(), Some("c d"));
    let stored = finetuned::dataset::to_jsonl(&d.rows);
    assert_eq!(jsonl(std::str::from_utf8(&stored).unwrap()).unwrap().rows, d.rows, "stored as it came");
    let csv = parse(b"text,text_pair,label\na,b,x\nc,d,y\n", Format::Csv, "text", "label").unwrap();
    assert!(csv.pairs);
    assert_eq!(csv.rows[1].text_pair.as_deref(), Some("d"));
    let cols = finetuned::dataset::Columns { text: "question", text_pair: "answer", label: "label" };
    let named =
        finetuned::dataset::parse_columns(b"{\"question\": \"q\", \"answer\": \"a\", \"label\": 1}\n", Format::Jsonl, &cols).unwrap();
    assert_eq!((named.rows[0].text.as_str(), named.rows[0].text_pair.as_deref()), ("q", Some("a")));
    assert!(!jsonl("{\"text\": \"a\", \"label\": \"x\"}\n").unwrap().pairs);
}

#[test]
fn pairs_and_single_texts_do_not_mix_and_an_empty_second_text_is_refused() {
    let cases = [
        ("{\"text\": \"a\", \"text_pair\": \"b\", \"label\": \"x\"}\n{\"text\": \"c\", \"label\": \"y\"}\n", 2, "\"text_pair\" is missing"),
        (
            "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"c\", \"text_pair\": \"d\", \"label\": \"y\"}\n",
            2,
            "first row is a single text",
        ),
        ("{\"text\": \"a\", \"text_pair\": \" \", \"label\": \"x\"}\n", 1, "\"text_pair\" is empty"),
        ("{\"text\": \"a\", \"text_pair\": 3, \"label\": \"x\"}\n", 1, "\"text_pair\" must be a string"),
    ];
    for (input, line, needle) in cases {
        let e = jsonl(input).unwrap_err();
        assert_eq!(e.line, line, "{input:?} → {e}");
        assert!(e.message.contains(needle), "{input:?} → {e}");
    }
}

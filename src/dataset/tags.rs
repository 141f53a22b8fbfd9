//! Token-tagged rows (named entities): tag schemes brought to IOB2, character spans turned into
//! tagged words, and CoNLL text.

use super::{err, DatasetError, Row};

/// The tags of one sentence in IOB2: IOB1's `I-X` that starts an entity becomes `B-X` (the
/// conlleval rule seqeval's default mode follows), BIOES's and BILOU's `S-`/`U-` become `B-` and
/// `E-`/`L-` become `I-`. Refuses a tag that is not `O` or a prefix, a dash and a type.
pub fn to_iob2(tags: &[String]) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::with_capacity(tags.len());
    let mut prev_type: Option<&str> = None;
    for tag in tags {
        if tag == "O" {
            out.push(tag.clone());
            prev_type = None;
            continue;
        }
        let Some((prefix, kind)) = tag.split_once('-').filter(|(p, k)| p.len() == 1 && !k.is_empty()) else {
            return Err(format!("tag {tag:?} is in no known scheme: use O, B-X and I-X (IOB2), IOB1, or BIOES"));
        };
        let begins = match prefix {
            "B" | "S" | "U" => true,
            "I" | "E" | "L" => prev_type != Some(kind),
            _ => return Err(format!("tag {tag:?} is in no known scheme: its prefix must be B, I, E, S, L or U")),
        };
        out.push(format!("{}-{kind}", if begins { "B" } else { "I" }));
        // An entity that ends (`E-`, `S-`, `L-`, `U-`) lets a next one of the same type begin.
        prev_type = if matches!(prefix, "E" | "S" | "L" | "U") { None } else { Some(kind) };
    }
    Ok(out)
}

/// One entity of a span row: characters `start..end` of the text (Unicode scalar values, as
/// Python's `str` counts them) are of type `label`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub label: String,
}

/// The words of `text` (runs of letters and digits, and each other non-space character alone,
/// also cut where an entity starts or ends) and their IOB2 tags from `spans`.
pub fn spans_to_words(text: &str, spans: &[Span]) -> Result<(Vec<String>, Vec<String>), String> {
    let chars: Vec<char> = text.chars().collect();
    let mut sorted: Vec<&Span> = spans.iter().collect();
    sorted.sort_by_key(|s| (s.start, s.end));
    for (i, s) in sorted.iter().enumerate() {
        if s.start >= s.end || s.end > chars.len() {
            return Err(format!("entity {}..{} is out of range for a text of {} characters", s.start, s.end, chars.len()));
        }
        if s.label.trim().is_empty() || s.label.contains(char::is_whitespace) {
            return Err(format!("entity {}..{} has no label, or one with spaces", s.start, s.end));
        }
        if let Some(next) = sorted.get(i + 1).filter(|n| n.start < s.end) {
            return Err(format!("entity {}..{} overlaps entity {}..{}", s.start, s.end, next.start, next.end));
        }
    }
    let cut = |i: usize| sorted.iter().any(|s| s.start == i || s.end == i);
    let (mut words, mut starts) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        i += 1;
        if chars[start].is_alphanumeric() {
            while i < chars.len() && chars[i].is_alphanumeric() && !cut(i) {
                i += 1;
            }
        }
        words.push(chars[start..i].iter().collect::<String>());
        starts.push(start);
    }
    let tags = starts
        .iter()
        .map(|&w| match sorted.iter().find(|s| s.start <= w && w < s.end) {
            Some(s) if s.start == w => format!("B-{}", s.label),
            Some(s) => format!("I-{}", s.label),
            None => "O".to_string(),
        })
        .collect();
    Ok((words, tags))
}

/// A row of words and tags; its `text` is the words joined by spaces.
pub fn tagged_row(tokens: Vec<String>, tags: Option<Vec<String>>) -> Row {
    Row { text: tokens.join(" "), text_pair: None, label: None, tokens: Some(tokens), tags }
}

/// CoNLL text: one `token … tag` line per token (the first field is the token, the last its
/// tag), a blank line between sentences, `-DOCSTART-` lines skipped. Each sentence is a row at
/// its first line.
pub fn parse_conll(text: &str) -> Result<Vec<(usize, Row)>, DatasetError> {
    let mut rows = Vec::new();
    let (mut tokens, mut tags, mut first) = (Vec::new(), Vec::new(), 0);
    let mut flush = |tokens: &mut Vec<String>, tags: &mut Vec<String>, first: usize| {
        if !tokens.is_empty() {
            rows.push((first, tagged_row(std::mem::take(tokens), Some(std::mem::take(tags)))));
        }
    };
    for (i, raw) in text.split('\n').enumerate() {
        let line = i + 1;
        let fields: Vec<&str> = raw.split_whitespace().collect();
        if fields.is_empty() || fields[0] == "-DOCSTART-" {
            flush(&mut tokens, &mut tags, first);
            continue;
        }
        if fields.len() < 2 {
            return err(line, "a CoNLL line holds a token and its tag, separated by spaces or a tab");
        }
        if tokens.is_empty() {
            first = line;
        }
        tokens.push(fields[0].to_string());
        tags.push(fields[fields.len() - 1].to_string());
    }
    flush(&mut tokens, &mut tags, first);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn iob1_and_bioes_become_iob2() {
        assert_eq!(to_iob2(&s(&["I-PER", "I-PER", "O", "I-LOC", "B-LOC"])).unwrap(), s(&["B-PER", "I-PER", "O", "B-LOC", "B-LOC"]));
        assert_eq!(to_iob2(&s(&["S-PER", "B-ORG", "E-ORG", "S-ORG"])).unwrap(), s(&["B-PER", "B-ORG", "I-ORG", "B-ORG"]));
        assert!(to_iob2(&s(&["PER"])).unwrap_err().contains("no known scheme"));
        assert!(to_iob2(&s(&["X-PER"])).is_err());
    }

    #[test]
    fn spans_tag_the_words_they_cover() {
        let text = "Ms. Ada Lovelace met Babbage in London-based labs.";
        let spans = [Span { start: 4, end: 16, label: "PER".into() }, Span { start: 32, end: 38, label: "LOC".into() }];
        let (words, tags) = spans_to_words(text, &spans).unwrap();
        assert_eq!(words, s(&["Ms", ".", "Ada", "Lovelace", "met", "Babbage", "in", "London", "-", "based", "labs", "."]));
        assert_eq!(tags, s(&["O", "O", "B-PER", "I-PER", "O", "O", "O", "B-LOC", "O", "O", "O", "O"]));
        let overlap = [Span { start: 0, end: 5, label: "A".into() }, Span { start: 4, end: 8, label: "B".into() }];
        assert!(spans_to_words(text, &overlap).unwrap_err().contains("overlaps"));
        assert!(spans_to_words("abc", &[Span { start: 1, end: 9, label: "A".into() }]).unwrap_err().contains("out of range"));
    }

    #[test]
    fn conll_sentences_are_rows_at_their_first_line() {
        let text = "-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n";
        let rows = parse_conll(text).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].0, 3);
        assert_eq!(rows[0].1.tokens.as_deref(), Some(&s(&["EU", "rejects"])[..]));
        assert_eq!(rows[1].1.tags.as_deref(), Some(&s(&["B-PER"])[..]));
        assert_eq!(parse_conll("EU\n").unwrap_err().line, 1);
    }
}

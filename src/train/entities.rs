//! Entity-level metrics of a tagger by the conlleval rules that seqeval's default mode follows:
//! an entity starts at `B-X`, or at `I-X` after `O` or after another type, and ends before `O`,
//! a `B-` or another type; it counts as found only when its type and both ends match.

use super::metrics::{ClassScores, ClassificationReport};
use std::collections::BTreeMap;

/// `(type, first word, last word + 1)` of each entity in `tags`.
pub fn entities(tags: &[&str]) -> Vec<(String, usize, usize)> {
    let split = |t: &str| -> (char, String) {
        match t.split_once('-') {
            Some((p, k)) if t != "O" => (p.chars().next().unwrap_or('O'), k.to_string()),
            _ => ('O', String::new()),
        }
    };
    let mut out = Vec::new();
    let mut open: Option<(String, usize)> = None;
    for (i, tag) in tags.iter().chain(std::iter::once(&"O")).enumerate() {
        let (prefix, kind) = split(tag);
        let continues = matches!(prefix, 'I' | 'E') && open.as_ref().is_some_and(|(k, _)| *k == kind);
        if !continues {
            if let Some((k, start)) = open.take() {
                out.push((k, start, i));
            }
            if prefix != 'O' {
                open = Some((kind, i));
            }
        }
        // An `E-`/`S-` tag closes its entity (BIOES predictions of a model trained on them).
        if matches!(prefix, 'E' | 'S') {
            if let Some((k, start)) = open.take() {
                out.push((k, start, i + 1));
            }
        }
    }
    out
}

/// Precision, recall and F1 of `found` right ones among `predicted`, of `actual` true ones.
fn prf(found: usize, predicted: usize, actual: usize) -> (f64, f64, f64) {
    let p = if predicted > 0 { found as f64 / predicted as f64 } else { 0.0 };
    let r = if actual > 0 { found as f64 / actual as f64 } else { 0.0 };
    (p, r, if p + r > 0.0 { 2.0 * p * r / (p + r) } else { 0.0 })
}

/// The report of a tagger from each sentence's true and predicted tag ids into `tags` (the
/// scored words only): entity precision, recall and F1 (micro, over all types), each type's
/// scores in `per_class`, their mean F1 in `macro_f1` (seqeval's macro average), word accuracy
/// in `accuracy`, and the confusion matrix of tags (rows true, columns predicted).
pub fn tagging_report(tags: &[String], truth: &[Vec<usize>], pred: &[Vec<usize>]) -> ClassificationReport {
    let k = tags.len();
    let mut cm = vec![vec![0usize; k]; k];
    let (mut right, mut words) = (0usize, 0usize);
    let mut per_type: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    for (t, p) in truth.iter().zip(pred) {
        for (&a, &b) in t.iter().zip(p) {
            cm[a][b] += 1;
            right += usize::from(a == b);
            words += 1;
        }
        let names = |ids: &[usize]| ids.iter().map(|&i| tags[i].as_str()).collect::<Vec<_>>();
        let (gold, guess) = (entities(&names(t)), entities(&names(p)));
        for e in &gold {
            let entry = per_type.entry(e.0.clone()).or_default();
            entry.2 += 1;
            entry.0 += usize::from(guess.contains(e));
        }
        for e in &guess {
            per_type.entry(e.0.clone()).or_default().1 += 1;
        }
    }
    let (found, predicted, actual) = per_type.values().fold((0, 0, 0), |a, v| (a.0 + v.0, a.1 + v.1, a.2 + v.2));
    let (precision, recall, f1) = prf(found, predicted, actual);
    let per_class: BTreeMap<String, ClassScores> = per_type
        .iter()
        .map(|(kind, &(f, p, a))| {
            let (precision, recall, f1) = prf(f, p, a);
            (kind.clone(), ClassScores { precision, recall, f1, support: a })
        })
        .collect();
    let macro_f1 = if per_class.is_empty() { 0.0 } else { per_class.values().map(|c| c.f1).sum::<f64>() / per_class.len() as f64 };
    ClassificationReport {
        accuracy: if words > 0 { right as f64 / words as f64 } else { 0.0 },
        macro_f1,
        per_class,
        confusion_matrix: cm,
        precision: Some(precision),
        recall: Some(recall),
        f1: Some(f1),
        ..ClassificationReport::one_output()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entities_follow_the_conlleval_rules() {
        let e = entities(&["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-ORG", "O"]);
        assert_eq!(
            e,
            vec![("PER".into(), 0, 2), ("LOC".into(), 3, 5), ("LOC".into(), 5, 6), ("ORG".into(), 6, 7)],
            "an I- after O or another type starts an entity"
        );
    }

    #[test]
    fn the_report_matches_seqeval() {
        // seqeval: y_true [[B-PER I-PER O B-LOC]], y_pred [[B-PER I-PER O B-ORG]], plus
        // [[B-LOC O]] / [[B-LOC O]] → PER 1/1, LOC found 1 of 2, ORG 0 of 0 true, 1 predicted.
        let tags: Vec<String> = ["B-LOC", "B-ORG", "B-PER", "I-PER", "O"].iter().map(|s| s.to_string()).collect();
        let id = |s: &str| tags.iter().position(|t| t == s).unwrap();
        let ids = |v: &[&str]| v.iter().map(|s| id(s)).collect::<Vec<_>>();
        let truth = [ids(&["B-PER", "I-PER", "O", "B-LOC"]), ids(&["B-LOC", "O"])];
        let pred = [ids(&["B-PER", "I-PER", "O", "B-ORG"]), ids(&["B-LOC", "O"])];
        let r = tagging_report(&tags, &truth, &pred);
        // found 2, predicted 3, actual 3 → P = R = F1 = 2/3.
        assert!((r.f1.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.precision.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.per_class["LOC"].support, 2);
        assert!((r.per_class["LOC"].recall - 0.5).abs() < 1e-12);
        assert_eq!(r.per_class["ORG"].f1, 0.0);
        assert!((r.accuracy - 5.0 / 6.0).abs() < 1e-12);
    }
}

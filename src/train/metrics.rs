//! Evaluation metrics. Classification: accuracy, macro-F1, per-class precision/recall/F1/support
//! and the confusion matrix (rows: true label, columns: predicted). Regression and reranking
//! fill their own fields instead ([`super::scores`]).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Scores of one class.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClassScores {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

/// Metrics of one evaluation pass. A regression has no accuracy or macro-F1 (NaN, left out of
/// the JSON), a reranker no macro-F1.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClassificationReport {
    #[serde(skip_serializing_if = "is_nan", default = "nan")]
    pub accuracy: f64,
    #[serde(skip_serializing_if = "is_nan", default = "nan")]
    pub macro_f1: f64,
    /// Multi-label only: F1 over all (example, label) decisions.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub micro_f1: Option<f64>,
    pub per_class: BTreeMap<String, ClassScores>,
    pub confusion_matrix: Vec<Vec<usize>>,
    /// Regression: Pearson's correlation of predictions and labels.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pearson: Option<f64>,
    /// Regression: Spearman's rank correlation (what picks the best epoch).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub spearman: Option<f64>,
    /// Regression: mean squared error.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mse: Option<f64>,
    /// Reranking: mean reciprocal rank of the first relevant document in each query's top 10.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mrr_at_10: Option<f64>,
    /// Reranking: NDCG of each query's top 10 (what picks the best epoch).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ndcg_at_10: Option<f64>,
    /// Tagging: the share of predicted entities that are right (type and both ends).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub precision: Option<f64>,
    /// Tagging: the share of true entities found.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub recall: Option<f64>,
    /// Tagging: entity F1 over every type (what picks the best epoch).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub f1: Option<f64>,
}

fn is_nan(x: &f64) -> bool {
    x.is_nan()
}

fn nan() -> f64 {
    f64::NAN
}

impl ClassificationReport {
    /// An empty report to fill a one-output task's fields into.
    pub fn one_output() -> Self {
        Self {
            accuracy: f64::NAN,
            macro_f1: f64::NAN,
            micro_f1: None,
            per_class: BTreeMap::new(),
            confusion_matrix: vec![],
            pearson: None,
            spearman: None,
            mse: None,
            mrr_at_10: None,
            ndcg_at_10: None,
            precision: None,
            recall: None,
            f1: None,
        }
    }

    /// The figure the best epoch is chosen by: Spearman for a regression, NDCG@10 for a
    /// reranker, entity F1 for a tagger, macro-F1 for a classifier.
    pub fn selection(&self) -> f64 {
        self.spearman.or(self.ndcg_at_10).or(self.f1).unwrap_or(self.macro_f1)
    }

    /// What the selection figure is called.
    pub fn selection_name(&self) -> &'static str {
        match (self.spearman, self.ndcg_at_10, self.f1) {
            (Some(_), _, _) => "Spearman",
            (_, Some(_), _) => "NDCG@10",
            (_, _, Some(_)) => "entity F1",
            _ => "macro-F1",
        }
    }

    /// The headline figures as a job's metrics show them.
    pub fn headline(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut out = serde_json::Map::new();
        let mut put = |k: &str, v: Option<f64>| {
            if let Some(v) = v.filter(|v| !v.is_nan()) {
                out.insert(k.into(), v.into());
            }
        };
        put("accuracy", Some(self.accuracy));
        put("macro_f1", Some(self.macro_f1));
        put("pearson", self.pearson);
        put("spearman", self.spearman);
        put("mse", self.mse);
        put("mrr_at_10", self.mrr_at_10);
        put("ndcg_at_10", self.ndcg_at_10);
        put("f1", self.f1);
        put("precision", self.precision);
        put("recall", self.recall);
        out
    }

    /// The headline figures in words, for logs.
    pub fn headline_text(&self) -> String {
        self.headline().iter().map(|(k, v)| format!("{k} {:.4}", v.as_f64().unwrap_or(f64::NAN))).collect::<Vec<_>>().join(", ")
    }
}

/// Computes the report from true and predicted label ids. Classes with no true and no predicted
/// example count as F1 0 in the macro average, as scikit-learn does for labels it is given.
pub fn classification_report(labels: &[String], truth: &[usize], pred: &[usize]) -> ClassificationReport {
    let k = labels.len();
    let mut cm = vec![vec![0usize; k]; k];
    for (&t, &p) in truth.iter().zip(pred) {
        cm[t][p] += 1;
    }
    let correct: usize = (0..k).map(|i| cm[i][i]).sum();
    let mut per_class = BTreeMap::new();
    let mut f1_sum = 0.0;
    let mut present = 0usize;
    for (i, label) in labels.iter().enumerate() {
        let tp = cm[i][i] as f64;
        let support: usize = cm[i].iter().sum();
        let predicted: usize = (0..k).map(|r| cm[r][i]).sum();
        let precision = if predicted > 0 { tp / predicted as f64 } else { 0.0 };
        let recall = if support > 0 { tp / support as f64 } else { 0.0 };
        let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
        if support > 0 || predicted > 0 {
            f1_sum += f1;
            present += 1;
        }
        per_class.insert(label.clone(), ClassScores { precision, recall, f1, support });
    }
    ClassificationReport {
        accuracy: if truth.is_empty() { 0.0 } else { correct as f64 / truth.len() as f64 },
        macro_f1: if present > 0 { f1_sum / present as f64 } else { 0.0 },
        micro_f1: None,
        per_class,
        confusion_matrix: cm,
        ..ClassificationReport::one_output()
    }
}

fn f1(tp: usize, fp: usize, fn_: usize) -> (f64, f64, f64) {
    let p = if tp + fp > 0 { tp as f64 / (tp + fp) as f64 } else { 0.0 };
    let r = if tp + fn_ > 0 { tp as f64 / (tp + fn_) as f64 } else { 0.0 };
    (p, r, if p + r > 0.0 { 2.0 * p * r / (p + r) } else { 0.0 })
}

/// Multi-label metrics from true and predicted label-id sets: per-label scores, macro-F1
/// (over every label, as scikit-learn's `average="macro"` on a label-indicator matrix),
/// micro-F1, and exact-match accuracy. There is no confusion matrix.
pub fn multilabel_report(labels: &[String], truth: &[Vec<usize>], pred: &[Vec<usize>]) -> ClassificationReport {
    let k = labels.len();
    let (mut tp, mut fp, mut fnn) = (vec![0usize; k], vec![0usize; k], vec![0usize; k]);
    let mut exact = 0;
    for (t, p) in truth.iter().zip(pred) {
        for l in 0..k {
            match (t.contains(&l), p.contains(&l)) {
                (true, true) => tp[l] += 1,
                (false, true) => fp[l] += 1,
                (true, false) => fnn[l] += 1,
                _ => {}
            }
        }
        let (mut a, mut b) = (t.clone(), p.clone());
        a.sort();
        b.sort();
        exact += usize::from(a == b);
    }
    let mut per_class = BTreeMap::new();
    let mut f1_sum = 0.0;
    for (i, label) in labels.iter().enumerate() {
        let (precision, recall, f) = f1(tp[i], fp[i], fnn[i]);
        f1_sum += f;
        per_class.insert(label.clone(), ClassScores { precision, recall, f1: f, support: tp[i] + fnn[i] });
    }
    let micro = f1(tp.iter().sum(), fp.iter().sum(), fnn.iter().sum()).2;
    ClassificationReport {
        accuracy: if truth.is_empty() { 0.0 } else { exact as f64 / truth.len() as f64 },
        macro_f1: if k > 0 { f1_sum / k as f64 } else { 0.0 },
        micro_f1: Some(micro),
        per_class,
        confusion_matrix: vec![],
        ..ClassificationReport::one_output()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_matches_hand_computed_values() {
        let labels = vec!["a".to_string(), "b".to_string()];
        // truth a a b b, pred a b b b → a: p 1, r .5; b: p 2/3, r 1
        let r = classification_report(&labels, &[0, 0, 1, 1], &[0, 1, 1, 1]);
        assert_eq!(r.accuracy, 0.75);
        assert_eq!(r.confusion_matrix, vec![vec![1, 1], vec![0, 2]]);
        let fa = 2.0 * 1.0 * 0.5 / 1.5;
        let fb = 2.0 * (2.0 / 3.0) * 1.0 / (2.0 / 3.0 + 1.0);
        assert!((r.macro_f1 - (fa + fb) / 2.0).abs() < 1e-12);
        assert_eq!(r.per_class["b"].support, 2);
    }

    #[test]
    fn multilabel_report_matches_hand_computed_values() {
        let labels = vec!["a".to_string(), "b".to_string()];
        // example 1: truth {a}, pred {a, b}; example 2: truth {b}, pred {b}
        let r = multilabel_report(&labels, &[vec![0], vec![1]], &[vec![0, 1], vec![1]]);
        assert_eq!(r.accuracy, 0.5);
        // a: tp 1 → f1 1; b: tp 1, fp 1 → p .5 r 1 f1 2/3; micro: tp 2 fp 1 fn 0 → 0.8
        assert!((r.macro_f1 - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert!((r.micro_f1.unwrap() - 0.8).abs() < 1e-12);
    }
}

//! Classification metrics: accuracy, macro-F1, per-class precision/recall/F1/support and
//! the confusion matrix (rows: true label, columns: predicted).

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

/// Metrics of one evaluation pass.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClassificationReport {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_class: BTreeMap<String, ClassScores>,
    pub confusion_matrix: Vec<Vec<usize>>,
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
        per_class,
        confusion_matrix: cm,
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
}

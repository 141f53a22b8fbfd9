//! Per-label decision thresholds for multi-label classifiers, tuned on the validation set.
//!
//! One threshold of 0.5 for every label leaves most rare labels unpredicted: their sigmoid scores
//! seldom reach it. Each label gets the threshold that maximises its own F1 on validation, as
//! scikit-learn users do by hand; a label with too few positives there keeps 0.5 (a threshold
//! fitted to two examples would be noise).

/// Fewer validation positives than this and a label keeps [`DEFAULT`].
pub const MIN_POSITIVES: usize = 5;
/// The threshold of a label that cannot be tuned.
pub const DEFAULT: f32 = 0.5;

/// For each of `k` labels, the probability threshold (predict when the score is at or above it)
/// with the best F1 over `probs` (one row of `k` sigmoid scores per example) against `truth`
/// (each example's label ids). Each threshold lies halfway between two validation scores, so
/// that no validation example sits on it. Ties go to the threshold nearest 0.5.
pub fn tune(probs: &[Vec<f32>], truth: &[Vec<usize>], k: usize) -> Vec<f32> {
    (0..k).map(|j| tune_one(probs.iter().map(|row| row[j]).collect(), truth.iter().map(|t| t.contains(&j)).collect())).collect()
}

fn tune_one(scores: Vec<f32>, positive: Vec<bool>) -> f32 {
    let total_pos = positive.iter().filter(|&&p| p).count();
    if total_pos < MIN_POSITIVES {
        return DEFAULT;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    // Walk the scores from the highest: predicting every example up to this one.
    let (mut tp, mut fp) = (0usize, 0usize);
    let (mut best_f1, mut best_t) = (-1.0f64, DEFAULT);
    for (rank, &i) in order.iter().enumerate() {
        if positive[i] {
            tp += 1;
        } else {
            fp += 1;
        }
        // Only where the next score differs can a threshold separate the two.
        if order.get(rank + 1).is_some_and(|&n| scores[n] == scores[i]) {
            continue;
        }
        let f1 = 2.0 * tp as f64 / (2 * tp + fp + (total_pos - tp)) as f64;
        // Halfway to the next lower score (or to 0 below the lowest): a threshold equal to a
        // validation score would leave that example's decision to the last bit, and the same
        // text scored again at predict (another batch, another code path) may differ there.
        let below = order.get(rank + 1).map_or(0.0, |&n| scores[n]);
        let t = scores[i] / 2.0 + below / 2.0;
        let nearer = (t - DEFAULT).abs() < (best_t - DEFAULT).abs();
        if f1 > best_f1 + 1e-12 || ((f1 - best_f1).abs() <= 1e-12 && nearer) {
            (best_f1, best_t) = (f1, t);
        }
    }
    best_t
}

/// Thresholds fitted on the validation set, and the validation scores they give.
#[derive(Debug, Clone)]
pub struct Tuned {
    pub thresholds: Vec<f32>,
    pub validation: super::metrics::ClassificationReport,
}

/// Fits each label's threshold on a multi-label run's validation `logits` against `truth`, on
/// the probabilities at `temperature` (those predict returns).
pub fn fit(logits: &[Vec<f32>], truth: &[Vec<usize>], labels: &[String], temperature: f32) -> Tuned {
    let probs = probabilities(logits, temperature);
    let thresholds = tune(&probs, truth, labels.len());
    Tuned { validation: report(logits, truth, labels, &thresholds, temperature), thresholds }
}

/// The scores of the decisions at `thresholds` on the probabilities of `logits` at `temperature`.
pub fn report(
    logits: &[Vec<f32>],
    truth: &[Vec<usize>],
    labels: &[String],
    thresholds: &[f32],
    temperature: f32,
) -> super::metrics::ClassificationReport {
    let preds: Vec<Vec<usize>> = probabilities(logits, temperature)
        .iter()
        .map(|row| row.iter().zip(thresholds).enumerate().filter(|(_, (p, t))| p >= t).map(|(j, _)| j).collect())
        .collect();
    super::metrics::multilabel_report(labels, truth, &preds)
}

fn probabilities(logits: &[Vec<f32>], temperature: f32) -> Vec<Vec<f32>> {
    logits.iter().map(|row| crate::model::predict::predictor::probabilities(true, row, temperature)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_label_gets_the_threshold_of_its_best_f1_and_rare_ones_keep_half() {
        // Label 0: positives score 0.3 and 0.35, negatives 0.1 and 0.2: the best cut is between
        // 0.2 and 0.3, not 0.5.
        // Label 1: only one positive, too few to tune.
        let probs =
            vec![vec![0.30, 0.9], vec![0.35, 0.1], vec![0.10, 0.2], vec![0.20, 0.3], vec![0.32, 0.4], vec![0.31, 0.2], vec![0.33, 0.1]];
        let truth = vec![vec![0, 1], vec![0], vec![], vec![], vec![0], vec![0], vec![0]];
        assert_eq!(tune(&probs, &truth, 2), vec![0.25, DEFAULT]);
    }

    #[test]
    fn a_label_whose_best_cut_is_high_gets_a_high_threshold() {
        let probs: Vec<Vec<f32>> = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.55, 0.2].iter().map(|&p| vec![p]).collect();
        let truth: Vec<Vec<usize>> = (0..8).map(|i| if i < 5 { vec![0] } else { vec![] }).collect();
        assert_eq!(tune(&probs, &truth, 1), vec![0.65]);
    }

    #[test]
    fn no_validation_score_sits_on_a_threshold() {
        let probs: Vec<Vec<f32>> = [0.9, 0.61, 0.6, 0.4, 0.39, 0.3, 0.2, 0.1].iter().map(|&p| vec![p]).collect();
        let truth: Vec<Vec<usize>> = (0..8).map(|i| if i != 2 && i < 6 { vec![0] } else { vec![] }).collect();
        let t = tune(&probs, &truth, 1)[0];
        assert!(probs.iter().all(|p| p[0] != t), "threshold {t} equals a validation score");
        // The best cut keeps everything down to 0.3 (F1 10/11): halfway to 0.2.
        assert_eq!(t, 0.25);
        // Every label above the lowest score: halfway to 0.
        let all: Vec<Vec<usize>> = (0..8).map(|_| vec![0]).collect();
        assert_eq!(tune(&probs, &all, 1), vec![0.05]);
    }
}

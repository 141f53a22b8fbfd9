//! Temperature scaling: one number fitted on the validation set that divides every logit, so that
//! a fine-tuned classifier's scores mean what they say (a 0.9 is right about 90 % of the time).
//!
//! Fine-tuned transformers are usually over-confident; one temperature fitted by likelihood
//! fixes most of it without changing a single decision (softmax's argmax, and, with the
//! thresholds tuned after it, multi-label choices). Calibration is measured as the expected
//! calibration error over [`BINS`] equal-width bins.

use super::objective::{sigmoid, Task};
use serde::Serialize;

/// Equal-width confidence bins of the expected calibration error.
pub const BINS: usize = 15;
/// The temperature is searched within [`LOWEST`, `HIGHEST`]. A validation set the model gets
/// all right asks for a temperature near 0 (every score 0 or 1); sharpening is held to 4× so
/// that such a set does not make the test scores all-or-nothing.
const LOWEST: f64 = 0.25;
const HIGHEST: f64 = 20.0;

/// The fitted temperature and the validation set's calibration error before and after it.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    pub temperature: f32,
    pub validation_ece_before: f64,
    pub validation_ece_after: f64,
}

impl Calibration {
    /// No calibration: temperature 1, and no calibration error measured (a one-output task).
    pub fn none() -> Self {
        Self { temperature: 1.0, validation_ece_before: f64::NAN, validation_ece_after: f64::NAN }
    }
}

/// Probabilities from one row of logits divided by `temperature`: softmax, or sigmoid per label.
pub fn probabilities(task: Task, logits: &[f32], temperature: f32) -> Vec<f32> {
    crate::model::predict::predictor::probabilities(matches!(task, Task::MultiLabel | Task::Rerank), logits, temperature)
}

/// Fits the temperature on `logits` (one row per example) against `truth` (each example's label
/// ids) and measures the calibration error before and after.
pub fn fit(task: Task, logits: &[Vec<f32>], truth: &[Vec<usize>]) -> Calibration {
    let temperature = fit_temperature(task, logits, truth);
    Calibration {
        temperature,
        validation_ece_before: ece(task, logits, truth, 1.0),
        validation_ece_after: ece(task, logits, truth, temperature),
    }
}

/// The temperature with the lowest negative log-likelihood. The likelihood is concave in the
/// inverse temperature, so a golden-section search over its logarithm finds the optimum.
pub fn fit_temperature(task: Task, logits: &[Vec<f32>], truth: &[Vec<usize>]) -> f32 {
    if logits.is_empty() {
        return 1.0;
    }
    let f = |log_beta: f64| nll(task, logits, truth, log_beta.exp());
    let (mut lo, mut hi) = (-HIGHEST.ln(), -LOWEST.ln());
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let (mut a, mut b) = (hi - g * (hi - lo), lo + g * (hi - lo));
    let (mut fa, mut fb) = (f(a), f(b));
    for _ in 0..60 {
        if fa < fb {
            (hi, b, fb) = (b, a, fa);
            a = hi - g * (hi - lo);
            fa = f(a);
        } else {
            (lo, a, fa) = (a, b, fb);
            b = lo + g * (hi - lo);
            fb = f(b);
        }
    }
    (1.0 / ((lo + hi) / 2.0).exp()) as f32
}

/// Mean negative log-likelihood of `truth` with every logit multiplied by `beta`.
fn nll(task: Task, logits: &[Vec<f32>], truth: &[Vec<usize>], beta: f64) -> f64 {
    let softplus = |x: f64| if x > 0.0 { x + (-x).exp().ln_1p() } else { x.exp().ln_1p() };
    let total: f64 = logits
        .iter()
        .zip(truth)
        .map(|(row, labels)| match task {
            // A regression is never calibrated.
            Task::SingleLabel | Task::Regression | Task::Tokens => {
                let z: Vec<f64> = row.iter().map(|&x| x as f64 * beta).collect();
                let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
                lse - z[labels[0]]
            }
            Task::MultiLabel | Task::Rerank => row
                .iter()
                .enumerate()
                .map(|(j, &x)| {
                    let z = x as f64 * beta;
                    softplus(z) - if labels.contains(&j) { z } else { 0.0 }
                })
                .sum(),
        })
        .sum();
    total / logits.len() as f64
}

/// Expected calibration error of the probabilities at `temperature`: the gap between confidence
/// and accuracy in each bin, weighted by the bin's share of predictions. Single-label: the top
/// label's probability against whether it is right. Multi-label: every (example, label) score
/// against whether the label is there.
pub fn ece(task: Task, logits: &[Vec<f32>], truth: &[Vec<usize>], temperature: f32) -> f64 {
    let mut bins = [(0usize, 0.0f64, 0.0f64); BINS];
    let mut add = |p: f32, hit: bool| {
        let b = ((p as f64 * BINS as f64) as usize).min(BINS - 1);
        bins[b].0 += 1;
        bins[b].1 += p as f64;
        bins[b].2 += hit as u8 as f64;
    };
    for (row, labels) in logits.iter().zip(truth) {
        let probs = probabilities(task, row, temperature);
        match task {
            Task::SingleLabel | Task::Regression | Task::Tokens => {
                let (top, &p) = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("a row has a score per label");
                add(p, labels[0] == top);
            }
            Task::MultiLabel | Task::Rerank => probs.iter().enumerate().for_each(|(j, &p)| add(p, labels.contains(&j))),
        }
    }
    // Σ (n_b / n) · |mean confidence_b − accuracy_b| = Σ |Σ confidence_b − hits_b| / n
    let n: usize = bins.iter().map(|b| b.0).sum();
    if n == 0 {
        return 0.0;
    }
    bins.iter().map(|&(_, conf, hits)| (conf - hits).abs()).sum::<f64>() / n as f64
}

/// Multi-label thresholds set on probabilities at one temperature, moved to the same decisions
/// at another: `sigmoid(z / from) >= t` exactly when `sigmoid(z / to) >= moved`.
pub fn move_thresholds(thresholds: &[f32], from: f32, to: f32) -> Vec<f32> {
    thresholds.iter().map(|&t| sigmoid(logit(t) * from / to)).collect()
}

fn logit(p: f32) -> f32 {
    let p = p.clamp(1e-7, 1.0 - 1e-7);
    (p / (1.0 - p)).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over-confident logits: the right label wins 70 % of the time, always by a wide margin.
    fn overconfident() -> (Vec<Vec<f32>>, Vec<Vec<usize>>) {
        let logits: Vec<Vec<f32>> = (0..100).map(|_| vec![8.0, 0.0]).collect();
        let truth = (0..100).map(|i| vec![if i % 10 < 7 { 0 } else { 1 }]).collect();
        (logits, truth)
    }

    #[test]
    fn an_overconfident_classifier_gets_a_temperature_above_one_that_matches_its_accuracy() {
        let (logits, truth) = overconfident();
        let c = fit(Task::SingleLabel, &logits, &truth);
        // The likelihood's optimum puts the top label's probability at its accuracy, 0.7.
        let p = probabilities(Task::SingleLabel, &logits[0], c.temperature)[0];
        assert!((p - 0.7).abs() < 1e-3, "calibrated confidence {p}, temperature {}", c.temperature);
        assert!((c.validation_ece_before - (0.99966 - 0.7)).abs() < 1e-3, "{c:?}");
        assert!(c.validation_ece_after < 1e-3, "{c:?}");
    }

    #[test]
    fn multi_label_scores_are_calibrated_per_label_pair_and_thresholds_keep_their_decisions() {
        // Label 0 is there in 80 % of the rows that score logit 1 (sigmoid 0.73: under-confident).
        let logits: Vec<Vec<f32>> = (0..50).map(|_| vec![1.0, -6.0]).collect();
        let truth: Vec<Vec<usize>> = (0..50).map(|i| if i % 5 == 0 { vec![] } else { vec![0] }).collect();
        let c = fit(Task::MultiLabel, &logits, &truth);
        assert!(c.temperature < 1.0, "{c:?}");
        assert!(c.validation_ece_after < c.validation_ece_before, "{c:?}");
        let moved = move_thresholds(&[0.6, 0.3], 1.0, c.temperature);
        for z in [-3.0f32, -0.5, 0.2, 0.4, 0.5, 2.0] {
            for (j, &t) in [0.6f32, 0.3].iter().enumerate() {
                assert_eq!(sigmoid(z) >= t, sigmoid(z / c.temperature) >= moved[j], "z {z}, label {j}");
            }
        }
    }

    #[test]
    fn a_validation_set_without_a_mistake_sharpens_at_most_to_the_lowest_temperature() {
        let logits: Vec<Vec<f32>> = (0..20).map(|i| if i % 2 == 0 { vec![2.0, 0.0] } else { vec![0.0, 2.0] }).collect();
        let truth: Vec<Vec<usize>> = (0..20).map(|i| vec![i % 2]).collect();
        let t = fit_temperature(Task::SingleLabel, &logits, &truth);
        assert!((t as f64 - LOWEST).abs() < 1e-3, "temperature {t}");
    }

    #[test]
    fn perfectly_calibrated_scores_keep_a_temperature_near_one() {
        // Logit ln 3 (probability 0.75) and right 3 times in 4.
        let logits: Vec<Vec<f32>> = (0..400).map(|_| vec![3f32.ln(), 0.0]).collect();
        let truth: Vec<Vec<usize>> = (0..400).map(|i| vec![usize::from(i % 4 == 3)]).collect();
        let t = fit_temperature(Task::SingleLabel, &logits, &truth);
        assert!((t - 1.0).abs() < 1e-3, "temperature {t}");
    }
}

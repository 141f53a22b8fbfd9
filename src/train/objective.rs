//! What a task optimises and how it is scored: targets, loss, predictions and metrics for
//! single-label (softmax + cross-entropy) and multi-label (sigmoid + binary cross-entropy)
//! classification, regression (one output, mean squared error) and cross-encoder reranking
//! (one output, binary cross-entropy on a relevance in [0, 1]).

use super::data::Example;
use super::metrics::{classification_report, multilabel_report, ClassificationReport};
use super::scores;
use crate::model::hf::tokenize::pad_batch_typed;
use crate::model::ops::layers::Mode;
use crate::model::Classifier;
use candle_core::{DType, Device, Result, Tensor};

/// What a fine-tuned head predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    SingleLabel,
    MultiLabel,
    /// A number per input.
    Regression,
    /// A relevance per (query, document) pair.
    Rerank,
    /// A tag per word ([`super::tagger`] trains it).
    Tokens,
}

/// Decision threshold on sigmoid scores for multi-label metrics.
pub const THRESHOLD: f32 = 0.5;

impl Task {
    /// The `problem_type` written to `config.json` (none for a reranker: transformers has no
    /// name for one sigmoid output, and cross-encoders are saved without one).
    pub fn problem_type(self) -> Option<&'static str> {
        match self {
            Task::SingleLabel => Some("single_label_classification"),
            Task::MultiLabel => Some("multi_label_classification"),
            Task::Regression => Some("regression"),
            Task::Rerank | Task::Tokens => None,
        }
    }

    /// Whether the head has one output, a number rather than a label.
    /// The name [`crate::model::EncoderConfig::head_task`] gives a head trained for this task.
    pub fn head_task(self) -> &'static str {
        match self {
            Task::SingleLabel => "classification",
            Task::MultiLabel => "multi_label_classification",
            Task::Regression => "regression",
            Task::Rerank => "rerank",
            Task::Tokens => "token_classification",
        }
    }

    /// Whether a job of this task over the base `cfg` with `labels` and `pooling` continues from
    /// the base's own head, as transformers keeps a checkpoint's classifier whose shape fits: the
    /// base is a classifier trained for the same task, over the same labels in the same order,
    /// with the same pooling.
    pub fn continues_head(self, cfg: &crate::model::EncoderConfig, labels: &[String], pooling: &str) -> bool {
        let same_pooling = self == Task::Tokens || cfg.pooling().as_deref().unwrap_or("cls") == pooling;
        cfg.head_task() == self.head_task() && cfg.id2label().as_deref() == Some(labels) && same_pooling
    }

    pub fn one_output(self) -> bool {
        matches!(self, Task::Regression | Task::Rerank)
    }

    /// Targets of a batch: label ids `[b]` (u32), a multi-hot `[b, k]` (f32), or each
    /// example's number `[b, 1]` (f32).
    pub fn targets(self, batch: &[&Example], k: usize, device: &Device) -> Result<Tensor> {
        match self {
            Task::SingleLabel => Tensor::new(batch.iter().map(|e| e.label() as u32).collect::<Vec<_>>(), device),
            Task::Regression | Task::Rerank => {
                Tensor::from_vec(batch.iter().map(|e| e.target).collect::<Vec<_>>(), (batch.len(), 1), device)
            }
            Task::Tokens => candle_core::bail!("token classification has per-token targets (see the tagger)"),
            Task::MultiLabel => {
                let mut hot = vec![0f32; batch.len() * k];
                for (i, e) in batch.iter().enumerate() {
                    e.labels.iter().for_each(|&l| hot[i * k + l] = 1.0);
                }
                Tensor::from_vec(hot, (batch.len(), k), device)
            }
        }
    }

    /// Mean loss; `weights` (per class) weight the cross-entropy, or the positive term of
    /// the binary cross-entropy.
    pub fn loss(self, logits: &Tensor, targets: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
        match (self, weights) {
            (Task::SingleLabel, None) => candle_nn::loss::cross_entropy(logits, targets),
            (Task::SingleLabel, Some(w)) => {
                let logp = candle_nn::ops::log_softmax(logits, 1)?;
                let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
                let wt = w.index_select(targets, 0)?;
                (picked * &wt)?.sum_all()?.neg()? / wt.sum_all()?.to_scalar::<f32>()? as f64
            }
            (Task::Regression, _) => (logits - targets)?.sqr()?.mean_all(),
            (Task::Tokens, _) => candle_core::bail!("token classification has its own loss (see the tagger)"),
            (Task::MultiLabel | Task::Rerank, w) => {
                // Stable BCE with logits: max(x, 0) − x·t + log(1 + e^−|x|).
                let softplus = ((logits.abs()?.neg()?.exp()? + 1.0)?.log()? + logits.relu()?)?;
                match w {
                    None => (softplus - (logits * targets)?)?.mean_all(),
                    // Weighted positive term: w·t·(softplus − x) + (1 − t)·softplus.
                    Some(w) => {
                        let pos = targets.broadcast_mul(w)?;
                        let neg = (targets.neg()? + 1.0)?;
                        let term = ((&pos * (&softplus - logits)?)? + (neg * &softplus)?)?;
                        term.mean_all()
                    }
                }
            }
        }
    }

    /// Mean loss and metrics of `model` over `data` (batches of similar length; multi-label
    /// decisions at 0.5), and each example's logits, in `data`'s order.
    pub fn evaluate(
        self,
        model: &Classifier,
        data: &[Example],
        labels: &[String],
        pad: u32,
        batch_size: usize,
        device: &Device,
    ) -> Result<(f64, ClassificationReport, Vec<Vec<f32>>)> {
        let mut order: Vec<usize> = (0..data.len()).collect();
        order.sort_by_key(|&i| data[i].ids.len());
        if self.one_output() && labels.len() != 1 {
            candle_core::bail!("a one-output task has one label, not {}", labels.len());
        }
        let mut preds: Vec<Vec<usize>> = vec![vec![]; data.len()];
        let mut all_logits: Vec<Vec<f32>> = vec![vec![]; data.len()];
        let mut loss_sum = 0.0;
        for chunk in order.chunks(batch_size.max(1)) {
            let seqs: Vec<&[u32]> = chunk.iter().map(|&i| data[i].ids.as_slice()).collect();
            let types: Vec<&[u32]> = chunk.iter().map(|&i| data[i].type_ids.as_slice()).collect();
            let batch = pad_batch_typed(&seqs, &types, pad, device)?;
            let logits = model.forward(&batch.ids, &batch.type_ids, &batch.mask, &mut Mode::Eval)?;
            let examples: Vec<&Example> = chunk.iter().map(|&i| &data[i]).collect();
            let targets = self.targets(&examples, labels.len(), device)?;
            let loss = self.loss(&logits, &targets, None)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            loss_sum += loss * chunk.len() as f64;
            let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
            for (&i, row) in chunk.iter().zip(rows) {
                preds[i] = self.decide(&row);
                all_logits[i] = row;
            }
        }
        let truth: Vec<Vec<usize>> = data.iter().map(|e| e.labels.clone()).collect();
        let report = match self {
            Task::SingleLabel => {
                let t: Vec<usize> = truth.iter().map(|l| l[0]).collect();
                let p: Vec<usize> = preds.iter().map(|l| l[0]).collect();
                classification_report(labels, &t, &p)
            }
            Task::MultiLabel => multilabel_report(labels, &truth, &preds),
            Task::Regression | Task::Rerank | Task::Tokens => self.one_output_report(data, &all_logits),
        };
        Ok((loss_sum / data.len().max(1) as f64, report, all_logits))
    }

    /// Regression: Pearson, Spearman and MSE. Reranking: MRR@10 and NDCG@10 over each query's
    /// documents, and the accuracy of sigmoid ≥ 0.5 against relevance ≥ 0.5.
    fn one_output_report(self, data: &[Example], logits: &[Vec<f32>]) -> ClassificationReport {
        let truth: Vec<f64> = data.iter().map(|e| e.target as f64).collect();
        let pred: Vec<f64> = logits.iter().map(|row| row[0] as f64).collect();
        let mut r = ClassificationReport::one_output();
        if self == Task::Regression {
            r.pearson = Some(scores::pearson(&truth, &pred));
            r.spearman = Some(scores::spearman(&truth, &pred));
            r.mse = Some(scores::mse(&truth, &pred));
            return r;
        }
        let groups: Vec<u32> = data.iter().map(|e| e.group).collect();
        let (mrr, ndcg) = scores::mrr_ndcg(&groups, &truth, &pred);
        r.mrr_at_10 = Some(mrr);
        r.ndcg_at_10 = Some(ndcg);
        let right = truth.iter().zip(&pred).filter(|(t, p)| (**t >= scores::RELEVANT) == (**p >= 0.0)).count();
        r.accuracy = right as f64 / truth.len().max(1) as f64;
        r
    }

    /// Predicted label ids from one row of logits (multi-label and reranking: at 0.5).
    fn decide(self, logits: &[f32]) -> Vec<usize> {
        match self {
            Task::SingleLabel => {
                let best = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0);
                vec![best]
            }
            // sigmoid(x) ≥ 0.5 ⇔ x ≥ 0
            Task::MultiLabel | Task::Rerank => logits.iter().enumerate().filter(|(_, &x)| x >= 0.0).map(|(i, _)| i).collect(),
            Task::Regression | Task::Tokens => vec![],
        }
    }
}

/// The logistic function.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Each label's log-odds in the training data, smoothed: the bias a sigmoid head starts from, so
/// that its first outputs are the label frequencies rather than 0.5 for all. Without it the first
/// steps of a multi-label run only push every logit down, and on many rare labels (GoEmotions'
/// 28) the encoder's gradient says nothing but "lower all scores" while the bias catches up.
pub fn prior_log_odds(train: &[Example], k: usize) -> Vec<f32> {
    let mut counts = vec![0usize; k];
    for e in train {
        e.labels.iter().for_each(|&l| counts[l] += 1);
    }
    let n = train.len() as f32;
    counts
        .iter()
        .map(|&c| {
            let p = (c as f32 + 0.5) / (n + 1.0);
            (p / (1.0 - p)).ln()
        })
        .collect()
}

/// Inverse-frequency class weights `n / (k · count)`, as scikit-learn's `balanced`
/// (for multi-label: negatives over positives of each label, as PyTorch's `pos_weight`).
pub fn balanced_weights(task: Task, train: &[Example], k: usize, device: &Device) -> Result<Tensor> {
    let mut counts = vec![0usize; k];
    for e in train {
        e.labels.iter().for_each(|&l| counts[l] += 1);
    }
    let n = train.len() as f32;
    let w: Vec<f32> = counts
        .iter()
        .map(|&c| match (task, c) {
            (_, 0) => 0.0,
            (Task::SingleLabel | Task::Regression | Task::Tokens, c) => n / (k as f32 * c as f32),
            (Task::MultiLabel | Task::Rerank, c) => (n - c as f32) / c as f32,
        })
        .collect();
    Tensor::new(w, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sigmoid_head_starts_at_each_labels_smoothed_frequency() {
        let ex = |labels: &[usize]| Example { labels: labels.to_vec(), ..Example::default() };
        let train = [ex(&[0]), ex(&[0, 1]), ex(&[0]), ex(&[2])];
        let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
        let p: Vec<f32> = prior_log_odds(&train, 4).into_iter().map(sigmoid).collect();
        // (count + 0.5) / (n + 1): a label never seen still gets a finite bias.
        for (got, want) in p.iter().zip([3.5 / 5.0, 1.5 / 5.0, 1.5 / 5.0, 0.5 / 5.0]) {
            assert!((got - want).abs() < 1e-6, "{p:?}");
        }
    }
}

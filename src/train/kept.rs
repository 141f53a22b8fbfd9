//! The best epoch of a classifier's or a tagger's run: what each does once an epoch is
//! evaluated (its figures recorded and reported, the best epoch's weights kept, early stopping),
//! and how the choice travels through a checkpoint.

use super::checkpoint::CheckpointMeta;
use super::events::{EpochReport, EpochStats, Event, Observer, RunStats, TrainError};
use super::metrics::ClassificationReport;
use super::run_loop::EpochEnd;
use crate::model::encoder::params::Params;
use candle_core::Tensor;
use std::collections::HashMap;

/// The best epoch so far with a snapshot of its weights, and the epochs since it.
#[derive(Default)]
pub struct Kept {
    pub best: Option<(EpochReport, HashMap<String, Tensor>)>,
    pub since_best: usize,
}

/// An epoch's validation: its mean loss, its report and the seconds it took.
pub struct Validated {
    pub loss: f64,
    pub report: ClassificationReport,
    pub seconds: f64,
}

impl Kept {
    /// Records epoch `end`, validated as `val`, in `stats` and to `obs`; keeps `params`'
    /// weights if it is the best so far. Returns whether the run stops early: `patience` epochs
    /// have passed without a better one.
    #[allow(clippy::too_many_arguments)]
    pub fn close_epoch(
        &mut self,
        end: EpochEnd,
        val: Validated,
        labels: &[String],
        params: &Params,
        patience: Option<usize>,
        stats: &mut RunStats,
        obs: &mut dyn Observer,
    ) -> Result<bool, TrainError> {
        let EpochEnd { epoch, step, ref sums, train_seconds, peak_gpu_mib, train_cpu_seconds } = end;
        let train_loss = end.train_loss();
        let Validated { loss, report, seconds } = val;
        stats.train_seconds += train_seconds;
        stats.epochs.push(EpochStats {
            epoch,
            train_seconds,
            train_cpu_seconds,
            examples_per_s: sums.seen as f64 / train_seconds.max(1e-9),
            real_tokens: sums.real_tokens,
            padded_tokens: sums.padded_tokens,
            train_loss,
            val_accuracy: report.accuracy,
            val_macro_f1: report.macro_f1,
            val_pearson: report.pearson,
            val_spearman: report.spearman,
            val_ndcg_at_10: report.ndcg_at_10,
            val_f1: report.f1,
            eval_seconds: seconds,
            peak_gpu_mib,
        });
        let ep = EpochReport { epoch, step, train_loss, loss, labels: labels.to_vec(), report, peak_gpu_mib };
        obs.on_event(Event::Epoch(Box::new(ep.clone())));
        if self.best.as_ref().is_none_or(|(b, _)| is_better(&ep, b)) {
            self.best = Some((ep, params.snapshot()?));
            self.since_best = 0;
            return Ok(false);
        }
        self.since_best += 1;
        if patience.is_some_and(|p| self.since_best >= p) {
            obs.on_event(Event::Message(format!("early stopping after epoch {epoch}: no improvement in {} epochs", self.since_best)));
            stats.stop_reason = "early_stopping";
            return Ok(true);
        }
        Ok(false)
    }

    /// Takes up the choice a checkpoint recorded, with the best epoch's weights it saved.
    pub fn resumed(&mut self, meta: &CheckpointMeta, best: Option<HashMap<String, Tensor>>) {
        self.since_best = meta.since_best;
        self.best = meta.best.clone().zip(best);
    }

    /// Writes the choice into a checkpoint's record.
    pub fn record(&self, meta: &mut CheckpointMeta) {
        meta.since_best = self.since_best;
        meta.best = self.best.as_ref().map(|(b, _)| b.clone());
    }

    /// The best epoch's weights, if an epoch has ended.
    pub fn weights(&self) -> Option<&HashMap<String, Tensor>> {
        self.best.as_ref().map(|(_, t)| t)
    }
}

/// Whether epoch `a` beats `b`: a higher selection figure (macro-F1, Spearman, NDCG@10 or
/// entity F1), or the same with a lower validation loss.
fn is_better(a: &EpochReport, b: &EpochReport) -> bool {
    let (x, y) = (a.report.selection(), b.report.selection());
    x > y || (x == y && a.loss < b.loss)
}

//! Metrics of one-output tasks: Pearson and Spearman correlation and mean squared error for
//! regression, as scipy's `pearsonr`/`spearmanr` compute them; MRR@10 and NDCG@10 of a reranker,
//! over the documents of each query.

/// Pearson's correlation of `a` and `b` (0 when either is constant, where it is undefined).
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    if n < 2 {
        return 0.0;
    }
    let (ma, mb) = (a.iter().sum::<f64>() / n as f64, b.iter().sum::<f64>() / n as f64);
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        cov += (x - ma) * (y - mb);
        va += (x - ma) * (x - ma);
        vb += (y - mb) * (y - mb);
    }
    if va == 0.0 || vb == 0.0 {
        return 0.0;
    }
    cov / (va.sqrt() * vb.sqrt())
}

/// Ranks from 1, tied values sharing the mean of their ranks.
fn ranks(xs: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..xs.len()).collect();
    order.sort_by(|&i, &j| xs[i].total_cmp(&xs[j]));
    let mut out = vec![0.0; xs.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && xs[order[end]] == xs[order[start]] {
            end += 1;
        }
        let rank = (start + end + 1) as f64 / 2.0;
        order[start..end].iter().for_each(|&i| out[i] = rank);
        start = end;
    }
    out
}

/// Spearman's rank correlation: Pearson's of the ranks, ties averaged.
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    pearson(&ranks(a), &ranks(b))
}

/// Mean squared error.
pub fn mse(truth: &[f64], pred: &[f64]) -> f64 {
    if truth.is_empty() {
        return 0.0;
    }
    truth.iter().zip(pred).map(|(t, p)| (t - p) * (t - p)).sum::<f64>() / truth.len() as f64
}

/// How many ranked documents the ranking metrics look at.
pub const AT: usize = 10;

/// A relevance at or above this counts as relevant for MRR.
pub const RELEVANT: f64 = 0.5;

/// Mean reciprocal rank and NDCG of the first [`AT`] documents, averaged over the queries that
/// have a relevant document (the others say nothing about the ranking). `groups[i]` is the
/// query of document `i`, `relevance[i]` its label, `scores[i]` the model's score; documents
/// with equal scores keep their order. NDCG's gain is the relevance itself (graded labels in
/// [0, 1] count in proportion), discounted by log2(rank + 1), as scikit-learn's `ndcg_score`.
pub fn mrr_ndcg(groups: &[u32], relevance: &[f64], scores: &[f64]) -> (f64, f64) {
    let mut by_query: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, &g) in groups.iter().enumerate() {
        by_query.entry(g).or_default().push(i);
    }
    let (mut mrr, mut ndcg, mut counted) = (0.0, 0.0, 0usize);
    for docs in by_query.values() {
        if !docs.iter().any(|&i| relevance[i] >= RELEVANT) {
            continue;
        }
        counted += 1;
        let mut ranked = docs.clone();
        ranked.sort_by(|&i, &j| scores[j].total_cmp(&scores[i]));
        if let Some(r) = ranked.iter().take(AT).position(|&i| relevance[i] >= RELEVANT) {
            mrr += 1.0 / (r + 1) as f64;
        }
        let dcg =
            |order: &[usize]| -> f64 { order.iter().take(AT).enumerate().map(|(r, &i)| relevance[i] / (r as f64 + 2.0).log2()).sum() };
        let mut ideal = docs.clone();
        ideal.sort_by(|&i, &j| relevance[j].total_cmp(&relevance[i]));
        let best = dcg(&ideal);
        if best > 0.0 {
            ndcg += dcg(&ranked) / best;
        }
    }
    if counted == 0 {
        return (0.0, 0.0);
    }
    (mrr / counted as f64, ndcg / counted as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlations_match_scipy() {
        // scipy.stats.pearsonr / spearmanr of these (ties in both) give these values.
        let a = [1.0, 2.0, 2.0, 4.0, 5.0, 3.5];
        let b = [1.5, 1.0, 3.0, 3.0, 6.0, 2.0];
        assert!((pearson(&a, &b) - 0.777_787_070_241).abs() < 1e-9, "{}", pearson(&a, &b));
        assert!((spearman(&a, &b) - 0.75).abs() < 1e-9, "{}", spearman(&a, &b));
        assert_eq!(mse(&[1.0, 2.0], &[2.0, 4.0]), 2.5);
        assert_eq!(pearson(&[1.0, 1.0], &[1.0, 2.0]), 0.0, "a constant side has no correlation");
    }

    #[test]
    fn ranking_metrics_average_over_queries_with_a_relevant_document() {
        // Query 0: the relevant document ranks 2nd → RR 1/2, NDCG 1/log2(3).
        // Query 1: it ranks 1st → 1 and 1. Query 2 has none relevant and is left out.
        let groups = [0, 0, 0, 1, 1, 2];
        let relevance = [0.0, 1.0, 0.0, 1.0, 0.0, 0.0];
        let scores = [0.9, 0.5, 0.1, 0.7, 0.2, 0.3];
        let (mrr, ndcg) = mrr_ndcg(&groups, &relevance, &scores);
        assert!((mrr - 0.75).abs() < 1e-12);
        assert!((ndcg - (1.0 / 3f64.log2() + 1.0) / 2.0).abs() < 1e-12);
    }
}

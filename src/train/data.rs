//! Training data: label ids, the stratified validation split, tokenisation and batch order.

use crate::dataset::Row;
use crate::model::hf::tokenize::{encode_all, encode_pairs, truncate};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

/// A tokenised example with its label ids (one for single-label classification; for a
/// reranker, label 0 when the document is relevant) or its number (regression, reranking).
#[derive(Debug, Clone, Default)]
pub struct Example {
    pub ids: Vec<u32>,
    /// Token types of a pair (0 for the first text, 1 for the second) where the model has
    /// token types; empty otherwise (all 0).
    pub type_ids: Vec<u32>,
    pub labels: Vec<usize>,
    /// A regression's target, a reranker's relevance (0 otherwise).
    pub target: f32,
    /// A reranker's query: the documents of one query are ranked together.
    pub group: u32,
}

impl Example {
    /// The label id of a single-label example.
    pub fn label(&self) -> usize {
        self.labels.first().copied().unwrap_or(0)
    }
}

/// Sorted label names of the training and validation rows.
pub fn label_set(train: &[Row], validation: &[Row]) -> Vec<String> {
    let mut set: Vec<String> = train.iter().chain(validation).flat_map(|r| r.labels()).map(String::from).collect();
    set.sort();
    set.dedup();
    set
}

/// Holds out `fraction` of the rows, the same share of each label (at least one row of every
/// label that has two or more), chosen by `seed`. Returns (train, validation).
pub fn stratified_split(rows: Vec<Row>, fraction: f64, seed: u64) -> (Vec<Row>, Vec<Row>) {
    let mut by_label: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        let key = r.labels().first().map(|s| s.to_string()).unwrap_or_default();
        by_label.entry(key).or_default().push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut held = vec![false; rows.len()];
    for idx in by_label.values_mut() {
        idx.shuffle(&mut rng);
        let n = if idx.len() >= 2 { ((idx.len() as f64 * fraction).round() as usize).max(1) } else { 0 };
        for &i in idx.iter().take(n) {
            held[i] = true;
        }
    }
    split_held(rows, held)
}

/// Example order for one epoch: a permutation seeded by `seed + epoch`, cut into batches.
/// With `group_by_length`, batches hold examples of similar length: each window of 50
/// batches is sorted longest first and cut into batches, which run in that order, as in
/// transformers' `LengthGroupedSampler` and `finetune_ref.py --group-by-length`.
pub fn epoch_batches(examples: &[Example], batch_size: usize, seed: u64, epoch: usize, group_by_length: bool) -> Vec<Vec<usize>> {
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    batch_order(&lengths, batch_size, seed, epoch, group_by_length)
}

/// [`epoch_batches`] for sequences of the given lengths.
pub fn batch_order(lengths: &[usize], batch_size: usize, seed: u64, epoch: usize, group_by_length: bool) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch as u64));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    if !group_by_length {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    let window = batch_size * 50;
    for chunk in order.chunks_mut(window) {
        chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    }
    order.chunks(batch_size).map(<[usize]>::to_vec).collect()
}

/// What a row's label becomes.
#[derive(Debug, Clone, Copy)]
pub enum Labeling<'a> {
    /// Ids into these label names (sorted).
    Classes(&'a [String]),
    /// A number (regression).
    Number,
    /// A relevance in [0, 1] of a (query, document) pair; a query's documents share a group.
    Relevance,
}

/// Tokenises `rows` (truncated to `max_len`: a single text keeps its final `[SEP]`, a pair is
/// cut longer text first) with their labels as `labeling` says. `typed`: the model has token
/// types, so a pair's second text gets type 1. `what` names the rows in errors.
pub fn to_examples(
    rows: &[Row],
    labeling: Labeling,
    tok: &tokenizers::Tokenizer,
    max_len: usize,
    typed: bool,
    what: &str,
) -> anyhow::Result<Vec<Example>> {
    let encoded: Vec<(Vec<u32>, Vec<u32>)> = if rows.iter().any(|r| r.text_pair.is_some()) {
        let pairs: Vec<(&str, &str)> = rows.iter().map(|r| (r.text.as_str(), r.text_pair.as_deref().unwrap_or(""))).collect();
        encode_pairs(tok, &pairs, max_len)?.into_iter().map(|(ids, types)| (ids, if typed { types } else { vec![] })).collect()
    } else {
        let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
        encode_all(tok, &texts)?
            .into_iter()
            .map(|mut ids| {
                truncate(&mut ids, max_len);
                (ids, vec![])
            })
            .collect()
    };
    let mut queries: std::collections::HashMap<&str, u32> = Default::default();
    rows.iter()
        .zip(encoded)
        .enumerate()
        .map(|(i, (r, (ids, type_ids)))| {
            let mut ex = Example { ids, type_ids, ..Example::default() };
            match labeling {
                Labeling::Classes(labels) => {
                    ex.labels = r
                        .labels()
                        .iter()
                        .map(|name| labels.binary_search_by(|l| l.as_str().cmp(name)).map_err(|_| anyhow::anyhow!("unknown label {name}")))
                        .collect::<anyhow::Result<Vec<usize>>>()?;
                }
                Labeling::Number | Labeling::Relevance => {
                    let label = r.labels().first().copied().unwrap_or_default();
                    let value = label.trim().parse::<f64>().ok().filter(|v| v.is_finite());
                    let Some(value) = value else {
                        anyhow::bail!("{what} row {}: label {label:?} is not a number", i + 1);
                    };
                    if matches!(labeling, Labeling::Relevance) {
                        if !(0.0..=1.0).contains(&value) {
                            anyhow::bail!("{what} row {}: a relevance must be from 0 to 1 (got {value})", i + 1);
                        }
                        let next = queries.len() as u32;
                        ex.group = *queries.entry(r.text.as_str()).or_insert(next);
                        // Relevant documents carry label 0, the one output's, for the class weight
                        // and the head's starting bias.
                        ex.labels = if value >= 0.5 { vec![0] } else { vec![] };
                    }
                    ex.target = value as f32;
                }
            }
            Ok(ex)
        })
        .collect()
}

/// Holds out about `fraction` of the queries of reranking rows with all their documents, chosen
/// by `seed`, so that no query is both trained and validated on. Returns (train, validation).
pub fn query_split(rows: Vec<Row>, fraction: f64, seed: u64) -> (Vec<Row>, Vec<Row>) {
    let mut queries: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
    queries.sort_unstable();
    queries.dedup();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    queries.shuffle(&mut rng);
    let n = if queries.len() >= 2 { ((queries.len() as f64 * fraction).round() as usize).max(1) } else { 0 };
    let held: std::collections::HashSet<String> = queries[..n].iter().map(|q| q.to_string()).collect();
    rows.into_iter().partition(|r| !held.contains(&r.text))
}

/// Holds out `fraction` of the rows at random, chosen by `seed` (for numeric labels, which
/// have no classes to stratify by). Returns (train, validation).
pub fn random_split(rows: Vec<Row>, fraction: f64, seed: u64) -> (Vec<Row>, Vec<Row>) {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    order.shuffle(&mut rng);
    let n = if rows.len() >= 2 { ((rows.len() as f64 * fraction).round() as usize).max(1) } else { 0 };
    let mut held = vec![false; rows.len()];
    order[..n].iter().for_each(|&i| held[i] = true);
    split_held(rows, held)
}

/// `rows` split by `held`: (the rows not held, the rows held), each in file order.
fn split_held(rows: Vec<Row>, held: Vec<bool>) -> (Vec<Row>, Vec<Row>) {
    let (val, train): (Vec<_>, Vec<_>) = rows.into_iter().zip(held).partition(|(_, h)| *h);
    (train.into_iter().map(|(r, _)| r).collect(), val.into_iter().map(|(r, _)| r).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(n: usize) -> Vec<Example> {
        (0..n).map(|i| Example { ids: vec![0; 1 + (i * 7919) % 61], labels: vec![0], ..Example::default() }).collect()
    }

    #[test]
    fn grouped_batches_cover_every_example_once_longest_first_in_each_window() {
        let ex = examples(3612);
        let batches = epoch_batches(&ex, 32, 42, 0, true);
        let mut seen: Vec<usize> = batches.concat();
        seen.sort_unstable();
        assert_eq!(seen, (0..ex.len()).collect::<Vec<_>>());
        for window in batches.chunks(50) {
            let lens: Vec<usize> = window.concat().iter().map(|&i| ex[i].ids.len()).collect();
            assert!(lens.windows(2).all(|w| w[0] >= w[1]), "a window runs longest first");
        }
        assert_ne!(batches, epoch_batches(&ex, 32, 42, 1, true), "each epoch draws its own order");
        assert_eq!(batches, epoch_batches(&ex, 32, 42, 0, true), "the same seed gives the same order");
    }
}

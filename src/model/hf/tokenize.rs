//! Tokenising texts and padding them into batch tensors.

use anyhow::Context;
use candle_core::{Device, Tensor};
use std::path::Path;
use tokenizers::Tokenizer;

/// The tokenizer's file in a model directory.
pub const TOKENIZER: &str = "tokenizer.json";

/// Loads `tokenizer.json` with padding and truncation turned off: we pad per batch and
/// truncate ourselves.
pub fn load_tokenizer(dir: &Path) -> anyhow::Result<Tokenizer> {
    let mut tok = Tokenizer::from_file(dir.join(TOKENIZER)).map_err(|e| anyhow::anyhow!("{e}")).context("loading tokenizer.json")?;
    tok.with_padding(None);
    tok.with_truncation(None).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(tok)
}

/// Token ids of each text, `[CLS]`/`[SEP]` included, without truncation.
pub fn encode_all(tok: &Tokenizer, texts: &[&str]) -> anyhow::Result<Vec<Vec<u32>>> {
    let err = |e| anyhow::anyhow!("tokenizing: {e}");
    // `encode_batch` hands even one text to rayon's global pool, and waking a thread there
    // costs more than encoding a short text here.
    if texts.len() <= FEW_TEXTS {
        return texts.iter().map(|t| tok.encode(*t, true).map(|e| e.get_ids().to_vec()).map_err(err)).collect();
    }
    let encs = tok.encode_batch(texts.to_vec(), true).map_err(err)?;
    Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
}

/// Token ids and token types of a pair of texts, by the tokenizer's own pair template (BERT's
/// `[CLS] a [SEP] b [SEP]` with types 0 then 1, RoBERTa's `<s> a </s></s> b </s>`), without
/// truncation.
pub fn encode_pair(tok: &Tokenizer, first: &str, second: &str) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
    let e = tok.encode((first, second), true).map_err(|e| anyhow::anyhow!("tokenizing a pair: {e}"))?;
    Ok((e.get_ids().to_vec(), e.get_type_ids().to_vec()))
}

/// Token ids and token types of each pair of texts, cut to `max_len` tokens in all (special
/// tokens included) by taking tokens off the longer text first, as transformers' default
/// `longest_first` truncation does.
pub fn encode_pairs(tok: &Tokenizer, pairs: &[(&str, &str)], max_len: usize) -> anyhow::Result<Vec<(Vec<u32>, Vec<u32>)>> {
    encode_pairs_with(&pair_truncating(tok, max_len)?, pairs)
}

/// A copy of `tok` that cuts a pair to `max_len` tokens in all, longer text first (made once
/// and kept by a caller that encodes pairs often: the copy holds the whole vocabulary).
pub fn pair_truncating(tok: &Tokenizer, max_len: usize) -> anyhow::Result<Tokenizer> {
    let mut tok = tok.clone();
    let params =
        tokenizers::TruncationParams { max_length: max_len, strategy: tokenizers::TruncationStrategy::LongestFirst, ..Default::default() };
    tok.with_truncation(Some(params)).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(tok)
}

/// Token ids and token types of each pair of texts by `tok` as it is set up (see
/// [`pair_truncating`]).
pub fn encode_pairs_with(tok: &Tokenizer, pairs: &[(&str, &str)]) -> anyhow::Result<Vec<(Vec<u32>, Vec<u32>)>> {
    let err = |e| anyhow::anyhow!("tokenizing pairs: {e}");
    let encs = if pairs.len() <= FEW_TEXTS {
        pairs.iter().map(|&(a, b)| tok.encode((a, b), true)).collect::<Result<Vec<_>, _>>().map_err(err)?
    } else {
        let inputs: Vec<tokenizers::EncodeInput> = pairs.iter().map(|&(a, b)| (a, b).into()).collect();
        tok.encode_batch(inputs, true).map_err(err)?
    };
    Ok(encs.into_iter().map(|e| (e.get_ids().to_vec(), e.get_type_ids().to_vec())).collect())
}

/// Up to this many texts are encoded on the calling thread.
const FEW_TEXTS: usize = 4;

/// Cuts `ids` to `max_len` tokens keeping the final `[SEP]`, as transformers' truncation does.
pub fn truncate(ids: &mut Vec<u32>, max_len: usize) {
    if ids.len() > max_len && max_len >= 2 {
        let last = *ids.last().unwrap();
        ids.truncate(max_len - 1);
        ids.push(last);
    }
}

/// Cuts `ids` to `max_len` tokens from the left, keeping the first `[CLS]` and the final `[SEP]`
/// (the end of the text is kept).
pub fn truncate_left(ids: &mut Vec<u32>, max_len: usize) {
    if ids.len() > max_len && max_len >= 2 {
        let cut = ids.len() - max_len;
        ids.drain(1..1 + cut);
    }
}

/// One padded batch: `input_ids`, `token_type_ids` and `attention_mask`, `[batch, longest]`.
pub struct Batch {
    pub ids: Tensor,
    pub type_ids: Tensor,
    pub mask: Tensor,
}

/// Pads the sequences to the longest in the batch with `pad_id` (token types all 0).
pub fn pad_batch(seqs: &[&[u32]], pad_id: u32, device: &Device) -> candle_core::Result<Batch> {
    pad_batch_typed(seqs, &[], pad_id, device)
}

/// [`pad_batch`] with each sequence's token types (`types[i]` as long as `seqs[i]`; an empty
/// `types`, or an empty entry, means all 0).
pub fn pad_batch_typed(seqs: &[&[u32]], types: &[&[u32]], pad_id: u32, device: &Device) -> candle_core::Result<Batch> {
    let len = seqs.iter().map(|s| s.len()).max().unwrap_or(1).max(1);
    let b = seqs.len();
    let mut ids = vec![pad_id; b * len];
    let mut mask = vec![0u32; b * len];
    let mut type_ids = vec![0u32; b * len];
    for (i, s) in seqs.iter().enumerate() {
        ids[i * len..i * len + s.len()].copy_from_slice(s);
        mask[i * len..i * len + s.len()].iter_mut().for_each(|m| *m = 1);
        if let Some(t) = types.get(i).filter(|t| t.len() == s.len()) {
            type_ids[i * len..i * len + s.len()].copy_from_slice(t);
        }
    }
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, len), device)?,
        type_ids: Tensor::from_vec(type_ids, (b, len), device)?,
        mask: Tensor::from_vec(mask, (b, len), device)?,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn truncation_keeps_cls_and_sep_and_one_end_of_the_text() {
        let ids = vec![101, 1, 2, 3, 4, 5, 102];
        let (mut right, mut left) = (ids.clone(), ids.clone());
        super::truncate(&mut right, 4);
        super::truncate_left(&mut left, 4);
        assert_eq!(right, [101, 1, 2, 102]);
        assert_eq!(left, [101, 4, 5, 102]);
        let mut short = ids.clone();
        super::truncate_left(&mut short, 10);
        assert_eq!(short, ids);
    }
}

//! Sub-words of words and texts for token classification: which word each sub-word belongs to
//! (for tags), where it lies in the text (for entities' character offsets), and the overlapping
//! windows that cover a sequence longer than the model takes.

use anyhow::anyhow;
use std::ops::Range;
use tokenizers::{EncodeInput, InputSequence, ModelWrapper, Tokenizer};

/// One sequence's sub-words with their special tokens: ids, the word of each (`None` for a
/// special token), and its characters in the text (`start..end`, Unicode scalar values).
#[derive(Debug, Clone)]
pub struct Pieces {
    pub ids: Vec<u32>,
    pub words: Vec<Option<u32>>,
    pub offsets: Vec<(usize, usize)>,
    /// Whether each sub-word continues the word of the one before it, as transformers'
    /// token-classification pipeline decides (a `##` piece of WordPiece; else one with no space
    /// before it). Filled for texts, not for words given already split.
    pub continues: Vec<bool>,
}

impl Pieces {
    /// Positions of the sub-words between the special tokens at each end.
    pub fn content(&self) -> Range<usize> {
        let first = self.words.iter().position(Option::is_some).unwrap_or(0);
        let last = self.words.iter().rposition(Option::is_some).map_or(first, |p| p + 1);
        first..last
    }
}

/// Whether the tokenizer splits bytes (RoBERTa's BPE): a word then takes a leading space, as
/// transformers' `add_prefix_space=True` does for words given already split.
fn byte_level(tok: &Tokenizer) -> bool {
    serde_json::to_string(&tok.get_pre_tokenizer()).is_ok_and(|j| j.contains("ByteLevel"))
}

/// Sub-words of sentences given as words (`is_split_into_words`).
pub fn encode_words(tok: &Tokenizer, sentences: &[Vec<String>]) -> anyhow::Result<Vec<Pieces>> {
    let spaced = byte_level(tok);
    let inputs: Vec<EncodeInput> = sentences
        .iter()
        .map(|words| {
            let words: Vec<String> = if spaced { words.iter().map(|w| format!(" {w}")).collect() } else { words.clone() };
            EncodeInput::Single(InputSequence::from(words))
        })
        .collect();
    let encoded = tok.encode_batch_char_offsets(inputs, true).map_err(|e| anyhow!("tokenizing words: {e}"))?;
    Ok(encoded.into_iter().map(pieces).collect())
}

/// Sub-words of texts, with their character offsets.
pub fn encode_texts(tok: &Tokenizer, texts: &[&str]) -> anyhow::Result<Vec<Pieces>> {
    let err = |e| anyhow!("tokenizing: {e}");
    // A batch goes to rayon's pool, and waking a thread there costs more than a short text.
    let encoded = if texts.len() <= 4 {
        texts.iter().map(|t| tok.encode_char_offsets(*t, true).map_err(err)).collect::<anyhow::Result<Vec<_>>>()?
    } else {
        let inputs: Vec<EncodeInput> = texts.iter().map(|t| EncodeInput::Single((*t).into())).collect();
        tok.encode_batch_char_offsets(inputs, true).map_err(err)?
    };
    // Read from the model itself: serialising it would copy the whole vocabulary per request.
    let prefix = match tok.get_model() {
        ModelWrapper::WordPiece(wp) => Some(wp.continuing_subword_prefix.clone()),
        ModelWrapper::BPE(bpe) => bpe.continuing_subword_prefix.clone(),
        _ => None,
    }
    .filter(|p| !p.is_empty());
    Ok(texts
        .iter()
        .zip(encoded)
        .map(|(text, e)| {
            let chars: Vec<char> = text.chars().collect();
            let continues = e
                .get_tokens()
                .iter()
                .zip(e.get_offsets())
                .map(|(token, &(start, _))| match &prefix {
                    Some(p) => token.starts_with(p.as_str()),
                    None => start > 0 && !chars[start - 1].is_whitespace() && chars.get(start).is_some_and(|c| !c.is_whitespace()),
                })
                .collect();
            Pieces { continues, ..pieces(e) }
        })
        .collect())
}

fn pieces(e: tokenizers::Encoding) -> Pieces {
    let special = e.get_special_tokens_mask();
    let words = e.get_word_ids().iter().zip(special).map(|(w, &s)| if s == 1 { None } else { *w }).collect();
    Pieces { ids: e.get_ids().to_vec(), words, offsets: e.get_offsets().to_vec(), continues: vec![] }
}

/// Windows of at most `max` positions over `len` positions, each starting half a window after
/// the one before (the last ends at `len`): one window when `len` fits.
pub fn windows(len: usize, max: usize) -> Vec<Range<usize>> {
    let max = max.max(1);
    if len <= max {
        return std::iter::once(0..len).collect();
    }
    let step = (max / 2).max(1);
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        if start + max >= len {
            out.push(len - max..len);
            return out;
        }
        out.push(start..start + max);
        start += step;
    }
}

/// The window that sees position `p` with the most context on both sides (the first of
/// equals).
pub fn best_window(windows: &[Range<usize>], p: usize) -> usize {
    let room = |w: &Range<usize>| if w.contains(&p) { (p - w.start).min(w.end - 1 - p) as i64 } else { -1 };
    let mut best = 0;
    for (i, w) in windows.iter().enumerate() {
        if room(w) > room(&windows[best]) {
            best = i;
        }
    }
    best
}

/// `pieces` cut into sequences of at most `max_len` ids: each window of its content between
/// copies of its special tokens. Returns each window's ids and the content positions it covers.
pub fn cut(pieces: &Pieces, max_len: usize) -> Vec<(Vec<u32>, Range<usize>)> {
    let content = pieces.content();
    let (head, tail) = (&pieces.ids[..content.start], &pieces.ids[content.end..]);
    let room = max_len.saturating_sub(head.len() + tail.len()).max(1);
    windows(content.len(), room)
        .into_iter()
        .map(|w| {
            let abs = content.start + w.start..content.start + w.end;
            let ids = head.iter().chain(&pieces.ids[abs.clone()]).chain(tail).copied().collect();
            (ids, abs)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_overlap_by_half_and_cover_everything() {
        assert_eq!(windows(5, 8), vec![0..5]);
        assert_eq!(windows(10, 4), vec![0..4, 2..6, 4..8, 6..10]);
        assert_eq!(windows(9, 4), vec![0..4, 2..6, 4..8, 5..9]);
        let w = windows(10, 4);
        // Position 3 ends 0..4 but has a neighbour each side in 2..6.
        assert_eq!(best_window(&w, 3), 1);
        // Position 4 has one each side in 2..6 (its first) and 4..8 none before it.
        assert_eq!(best_window(&w, 4), 1);
        assert_eq!(best_window(&w, 0), 0);
        assert_eq!(best_window(&w, 9), 3);
    }
}

//! Entities from a token classifier's scores, as transformers' token-classification pipeline
//! makes them: per sub-word (`none`), sub-words grouped by their tags (`simple`), or words
//! tagged by their first, averaged or best sub-word and then grouped (`first`, `average`,
//! `max`). `O` is left out. Offsets count characters (Unicode scalar values) of the text, and
//! an entity's `word` is its text as written.

use serde::Serialize;

/// How sub-words become entities (the pipeline's `aggregation_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregation {
    None,
    Simple,
    First,
    Average,
    Max,
}

impl Aggregation {
    /// The strategy named `s` (case-insensitive), if any.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "none" => Self::None,
            "simple" => Self::Simple,
            "first" => Self::First,
            "average" => Self::Average,
            "max" => Self::Max,
            _ => return None,
        })
    }
}

/// One scored sub-word of a text: its place in the model's input, its characters, whether it
/// continues the word before it, and its probability per tag.
#[derive(Debug, Clone)]
pub struct Piece {
    pub index: usize,
    pub start: usize,
    pub end: usize,
    pub is_subword: bool,
    pub scores: Vec<f32>,
}

/// An entity as the pipeline answers it: `entity` (per sub-word, with `index`) or
/// `entity_group` (grouped).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Entity {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entity_group: Option<String>,
    pub score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub word: String,
    pub start: usize,
    pub end: usize,
}

fn argmax(xs: &[f32]) -> usize {
    xs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).map_or(0, |(i, _)| i)
}

/// `(B or I, type)` of a tag; a tag without a prefix (`O`) is an `I` of its own name.
fn bi_tag(tag: &str) -> (char, &str) {
    match tag.split_at_checked(2) {
        Some(("B-", t)) => ('B', t),
        Some(("I-", t)) => ('I', t),
        _ => ('I', tag),
    }
}

/// A tagged unit (a sub-word or a word) before grouping.
struct Unit {
    tag: usize,
    score: f32,
    index: usize,
    start: usize,
    end: usize,
}

/// The entities of one text from its sub-words, `tags` naming each score's tag.
pub fn aggregate(text: &str, pieces: &[Piece], tags: &[String], strategy: Aggregation) -> Vec<Entity> {
    let chars: Vec<char> = text.chars().collect();
    let slice = |s: usize, e: usize| chars[s.min(chars.len())..e.min(chars.len())].iter().collect::<String>();
    let units: Vec<Unit> = match strategy {
        Aggregation::None | Aggregation::Simple => pieces
            .iter()
            .map(|p| {
                let tag = argmax(&p.scores);
                Unit { tag, score: p.scores[tag], index: p.index, start: p.start, end: p.end }
            })
            .collect(),
        _ => words(pieces).into_iter().map(|w| word_unit(w, strategy)).collect(),
    };
    if strategy == Aggregation::None {
        return units
            .iter()
            .filter(|u| tags[u.tag] != "O")
            .map(|u| Entity {
                entity: Some(tags[u.tag].clone()),
                entity_group: None,
                score: u.score,
                index: Some(u.index),
                word: slice(u.start, u.end),
                start: u.start,
                end: u.end,
            })
            .collect();
    }
    let mut groups: Vec<Vec<&Unit>> = Vec::new();
    for u in &units {
        let (bi, kind) = bi_tag(&tags[u.tag]);
        match groups.last_mut() {
            Some(g) if bi != 'B' && bi_tag(&tags[g[g.len() - 1].tag]).1 == kind => g.push(u),
            _ => groups.push(vec![u]),
        }
    }
    groups
        .into_iter()
        .filter_map(|g| {
            let kind = bi_tag(&tags[g[0].tag]).1.to_string();
            if kind == "O" {
                return None;
            }
            let (start, end) = (g[0].start, g[g.len() - 1].end);
            let score = g.iter().map(|u| u.score).sum::<f32>() / g.len() as f32;
            Some(Entity { entity: None, entity_group: Some(kind), score, index: None, word: slice(start, end), start, end })
        })
        .collect()
}

/// Sub-words grouped into words: a sub-word that continues the one before joins its word.
fn words(pieces: &[Piece]) -> Vec<Vec<&Piece>> {
    let mut out: Vec<Vec<&Piece>> = Vec::new();
    for p in pieces {
        match out.last_mut() {
            Some(w) if p.is_subword => w.push(p),
            _ => out.push(vec![p]),
        }
    }
    out
}

/// A word's tag and score: its first sub-word's, the average of its sub-words' scores, or
/// those of its sub-word scored highest.
fn word_unit(w: Vec<&Piece>, strategy: Aggregation) -> Unit {
    let scores: Vec<f32> = match strategy {
        Aggregation::Average => {
            let n = w.len() as f32;
            (0..w[0].scores.len()).map(|j| w.iter().map(|p| p.scores[j]).sum::<f32>() / n).collect()
        }
        Aggregation::Max => {
            let best = w.iter().max_by(|a, b| {
                let (x, y) = (a.scores[argmax(&a.scores)], b.scores[argmax(&b.scores)]);
                x.total_cmp(&y).then(std::cmp::Ordering::Greater)
            });
            best.map_or_else(Vec::new, |p| p.scores.clone())
        }
        _ => w[0].scores.clone(),
    };
    let tag = argmax(&scores);
    Unit { tag, score: scores[tag], index: w[0].index, start: w[0].start, end: w[w.len() - 1].end }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags() -> Vec<String> {
        ["B-PER", "I-PER", "O"].iter().map(|s| s.to_string()).collect()
    }

    fn piece(index: usize, start: usize, end: usize, is_subword: bool, scores: [f32; 3]) -> Piece {
        Piece { index, start, end, is_subword, scores: scores.to_vec() }
    }

    #[test]
    fn strategies_group_as_the_pipeline_does() {
        let text = "Ada Lovelace wrote";
        // "Ada" "Love" "##lace" "wrote": the second sub-word of Lovelace leans to O.
        let pieces = [
            piece(1, 0, 3, false, [0.9, 0.05, 0.05]),
            piece(2, 4, 8, false, [0.1, 0.8, 0.1]),
            piece(3, 8, 12, true, [0.1, 0.3, 0.6]),
            piece(4, 13, 18, false, [0.0, 0.1, 0.9]),
        ];
        let simple = aggregate(text, &pieces, &tags(), Aggregation::Simple);
        assert_eq!(simple.len(), 1);
        assert_eq!((simple[0].word.as_str(), simple[0].start, simple[0].end), ("Ada Love", 0, 8));
        assert!((simple[0].score - 0.85).abs() < 1e-6);
        let first = aggregate(text, &pieces, &tags(), Aggregation::First);
        assert_eq!((first[0].word.as_str(), first[0].end), ("Ada Lovelace", 12));
        assert!((first[0].score - 0.85).abs() < 1e-6);
        let average = aggregate(text, &pieces, &tags(), Aggregation::Average);
        assert_eq!(average[0].word, "Ada Lovelace", "Lovelace averages to I-PER 0.55");
        assert!((average[0].score - (0.9 + 0.55) / 2.0).abs() < 1e-6);
        let max = aggregate(text, &pieces, &tags(), Aggregation::Max);
        assert_eq!(max[0].word, "Ada Lovelace", "Lovelace's best sub-word says I-PER 0.8");
        let none = aggregate(text, &pieces, &tags(), Aggregation::None);
        assert_eq!(none.len(), 2);
        assert_eq!((none[1].entity.as_deref(), none[1].index), (Some("I-PER"), Some(2)));
    }
}

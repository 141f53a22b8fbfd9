//! Tokenization as transformers does it, for each kind of tokenizer a supported checkpoint
//! brings: WordPiece (BERT, DistilBERT, ELECTRA; the real all-MiniLM-L6-v2 and the golden files'
//! tiny ones), byte-level BPE (RoBERTa) and SentencePiece Unigram (XLM-RoBERTa). Fifty varied
//! inputs (accents, emoji, CJK, long words, odd spacing, pairs) give transformers' ids exactly,
//! and its token types where it has them. transformers' answer is asked live where a Python
//! with it is found, and kept in `tests/parity/golden/tokenize-<model>.json`.

mod common;
#[path = "parity/golden.rs"]
mod golden;

use finetuned::model::hf::tokenize::{encode_all, encode_pair, load_tokenizer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Single texts, then pairs.
const TEXTS: [&str; 40] = [
    "a gorgeous, witty, seductive movie.",
    "The plot is NOTHING but boilerplate clichés from start to finish,",
    "it's a charming and often affecting journey.",
    "Café crème brûlée à la carte, naïve façade, Ångström, Øresund",
    "résumé vs resume vs RÉSUMÉ",
    "Straße, Fußball, ß",
    "Ça va? Où êtes-vous? Très bien!",
    "El niño comió piñata en Año Nuevo",
    "Zażółć gęślą jaźń",
    "Привет, как дела?",
    "Γειά σου Κόσμε",
    "東京は日本の首都です",
    "我喜欢这部电影",
    "한국어 텍스트",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "great movie 😀😀 loved it ❤️",
    "👍🏽 thumbs up, 👨‍👩‍👧 family",
    "🤖🚀✨",
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    "Donaudampfschifffahrtsgesellschaftskapitänswitwe",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "x",
    "",
    "   leading and trailing spaces   ",
    "multiple     spaces\tand\ttabs\nand\nnewlines",
    "don't won't can't I'm you're we've",
    "e-mail: someone@example.com, url https://example.org/a?b=c&d=e",
    "prices: $3.50, €4,99, ¥1000, 50% off!!!",
    "1234567890 3.14159 1e-10 0x1F",
    "C++ and C# and F# and .NET",
    "snake_case camelCase PascalCase kebab-case",
    "ALL CAPS SHOUTING TEXT",
    "(parentheses) [brackets] {braces} <angles>",
    "quotes \"double\" 'single' «guillemets» „low“",
    "ellipsis… em—dash en–dash",
    "ﬁ ligature and full-width ＡＢＣ１２３",
    "zero\u{200b}width\u{200b}space and soft\u{00ad}hyphen",
];

const PAIRS: [(&str, &str); 10] = [
    ("how old are you?", "I am six years old."),
    ("what is the capital of France?", "Paris is the capital and most populous city of France."),
    ("Café?", "Ça va."),
    ("東京", "日本の首都"),
    ("😀", "🤖"),
    ("", "second only"),
    ("first", "second"),
    ("a", "b"),
    ("The plot is NOTHING but boilerplate", "supercalifragilisticexpialidocious"),
    ("Привет", "мир"),
];

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Encoded {
    ids: Vec<Vec<u32>>,
    /// `None` per input where the tokenizer gives no token types.
    type_ids: Vec<Option<Vec<u32>>>,
    #[serde(default)]
    versions: Value,
}

fn inputs() -> Vec<Value> {
    TEXTS.iter().map(|t| json!(t)).chain(PAIRS.iter().map(|(a, b)| json!([a, b]))).collect()
}

fn theirs(name: &str, model: &Path) -> (Encoded, &'static str) {
    let golden_path = golden::dir().join(format!("tokenize-{name}.json"));
    let Some(py) = golden::python() else {
        eprintln!("tokenization {name}: no Python with transformers here; golden file only");
        return (serde_json::from_slice(&std::fs::read(&golden_path).unwrap()).unwrap(), "the golden file");
    };
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(&inputs()).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/hf.py");
    let out = Command::new(py).arg(script).arg("tokenize").arg(model).arg(file.path()).output().unwrap();
    assert!(out.status.success(), "hf.py tokenize: {}", String::from_utf8_lossy(&out.stderr));
    if golden::writing() {
        std::fs::write(&golden_path, &out.stdout).unwrap();
    }
    (serde_json::from_slice(&out.stdout).unwrap(), "transformers live")
}

fn check(name: &str, model: PathBuf) {
    let (theirs, source) = theirs(name, &model);
    let tok = load_tokenizer(&model).unwrap();
    let singles = encode_all(&tok, &TEXTS).unwrap();
    assert_eq!(theirs.ids.len(), TEXTS.len() + PAIRS.len());
    for (i, ids) in singles.iter().enumerate() {
        assert_eq!(ids, &theirs.ids[i], "{name}: {:?} tokenizes to other ids than {source}'s", TEXTS[i]);
    }
    for (j, (a, b)) in PAIRS.iter().enumerate() {
        let i = TEXTS.len() + j;
        let (ids, types) = encode_pair(&tok, a, b).unwrap();
        assert_eq!(ids, theirs.ids[i], "{name}: the pair ({a:?}, {b:?}) tokenizes to other ids than {source}'s");
        if let Some(their_types) = &theirs.type_ids[i] {
            assert_eq!(&types, their_types, "{name}: the pair ({a:?}, {b:?}) has other token types than {source}'s");
        }
    }
    eprintln!("tokenization {name}: {} inputs match {source}", theirs.ids.len());
}

#[test]
fn wordpiece_of_the_real_minilm_matches_transformers() {
    check("minilm", common::shared().join("models/all-minilm-l6-v2"));
}

#[test]
fn wordpiece_of_bert_distilbert_and_electra_matches_transformers() {
    for arch in ["bert", "distilbert", "electra"] {
        check(arch, golden::dir().join(arch).join("base"));
    }
}

#[test]
fn byte_level_bpe_of_roberta_matches_transformers() {
    check("roberta", golden::dir().join("roberta/base"));
}

#[test]
fn sentencepiece_unigram_of_xlm_roberta_matches_transformers() {
    check("xlm-roberta", golden::dir().join("xlm-roberta/base"));
}

#[test]
fn byte_level_bpe_of_modernbert_matches_transformers() {
    check("modernbert", golden::dir().join("modernbert/base"));
}

#[test]
fn sentencepiece_unigram_of_camembert_matches_transformers() {
    check("camembert", golden::dir().join("camembert/base"));
}

#[test]
fn sentencepiece_unigram_of_deberta_v3_matches_transformers() {
    check("deberta-v2", golden::dir().join("deberta-v2/base"));
}

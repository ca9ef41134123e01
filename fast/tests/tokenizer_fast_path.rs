//! The tokenizing pass's byte-level BPE (`data/bpe.rs`) gives the tokenizers crate's ids
//! (`encode_fast(text, false)`), exactly, for the three shipped tokenizers: on every line of the
//! embedded corpus, on texts made for each branch of GPT-2's split and the added tokens, and on
//! random texts (proptest) drawn from every kind of character the split tells apart plus arbitrary
//! Unicode. Exact equality is the only tolerance: ids are integers.
use std::path::PathBuf;

use fast::data::tokenizer::{SpecialTokenStrings, TextTokenizer};
use proptest::prelude::*;

fn shipped(name: &str) -> TextTokenizer {
    let dir: PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "data", name]
        .iter()
        .collect();
    let t =
        TextTokenizer::load(&dir, &SpecialTokenStrings::default()).expect("a shipped tokenizer");
    assert!(t.has_fast_path(), "{name}: {}", t.encoder());
    t
}

fn tokenizers() -> Vec<(&'static str, TextTokenizer)> {
    ["tokenizer", "minimind2-tokenizer", "minimind3-tokenizer"]
        .into_iter()
        .map(|n| (n, shipped(n)))
        .collect()
}

fn same(tok: &TextTokenizer, text: &str) -> Result<(), String> {
    let ours = tok.encode(text).unwrap();
    let crate_ids = tok.encode_with_crate(text).unwrap();
    if ours == crate_ids {
        Ok(())
    } else {
        Err(format!("{text:?}: fast path {ours:?}, crate {crate_ids:?}"))
    }
}

#[test]
fn every_line_of_the_embedded_corpus_encodes_as_the_crate_does() {
    let corpus: PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "data", "poems.jsonl"]
        .iter()
        .collect();
    let text = std::fs::read_to_string(&corpus).unwrap();
    for (name, tok) in tokenizers() {
        let mut n = 0;
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let doc = v["text"].as_str().unwrap();
            same(&tok, doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            // The raw JSON line too: quotes, colons, braces and escapes.
            same(&tok, line).unwrap_or_else(|e| panic!("{name}: {e}"));
            n += 1;
        }
        assert!(n >= 5000, "{name}: only {n} lines");
    }
}

#[test]
fn hand_made_texts_for_each_branch_encode_as_the_crate_does() {
    let texts = [
        "",
        " ",
        "   ",
        "a",
        "I'm here, they'll've gone; it's 'd 're ''s",
        "don't DON'T o'clock",
        "a  b   c\t\td\n\ne\r\nf",
        "trailing spaces   ",
        "\n",
        " \n ",
        "12 345 6789x 3.14 ٣٤ Ⅻ ½",
        "春眠不覺曉，處處聞啼鳥。\n夜來風雨聲，花落知多少。",
        "全角　空格\u{3000}\u{3000}和\u{a0}不换行\u{2028}分隔\u{85}",
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant",
        "<|im_start|<|im_end|><|endoftext|><|im_start|><|endoftext|",
        "<think>\n想一想\n</think>\n<tool_call>{}</tool_call>",
        "emoji 😀👍🏽 and combining e\u{301} and ZWJ 👨\u{200d}👩\u{200d}👧",
        "𠀀𠀁 𪚥 CJK extension B",
        "Ğ ġ ĉ the byte-level alphabet itself",
        "!!!???...,,,;;;::: -- __ ** ## @@",
        " !x ?y .z",
        "mixed中English文123数字",
        "\u{feff}BOM and \u{0}NUL and \u{7f}DEL",
        "a'b'c's",
    ];
    for (name, tok) in tokenizers() {
        for t in texts {
            same(&tok, t).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}

/// Characters from every class of GPT-2's split, the apostrophe, added-token fragments and
/// arbitrary code points.
fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just(" ".to_string()),
        Just("  ".to_string()),
        Just("\n".to_string()),
        Just("\t".to_string()),
        Just("\u{3000}".to_string()),
        Just("'".to_string()),
        Just("'s".to_string()),
        Just("'ll".to_string()),
        Just("<|im_start|>".to_string()),
        Just("<|im_end|>".to_string()),
        Just("<|endoftext|>".to_string()),
        Just("<|im_".to_string()),
        "[a-zA-Z]{1,6}",
        "[0-9]{1,4}",
        "[，。！？、；：（）《》]{1,3}",
        "[\u{4e00}-\u{9fff}]{1,8}",
        "[!-/:-@\\[-`{-~]{1,3}",
        any::<char>().prop_map(|c| c.to_string()),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]
    #[test]
    fn random_texts_encode_as_the_crate_does(t in text()) {
        for (name, tok) in tokenizers() {
            prop_assert!(same(&tok, &t).is_ok(), "{}: {}", name, same(&tok, &t).unwrap_err());
        }
    }

    #[test]
    fn arbitrary_unicode_encodes_as_the_crate_does(t in any::<String>()) {
        for (name, tok) in tokenizers() {
            prop_assert!(same(&tok, &t).is_ok(), "{}: {}", name, same(&tok, &t).unwrap_err());
        }
    }
}

#[test]
fn other_tokenizer_shapes_keep_the_crate() {
    // A normalizer takes the tokenizer off the fast path; its ids still come from the crate.
    let dir = tempfile::tempdir().unwrap();
    let src: PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "data", "tokenizer"]
        .iter()
        .collect();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    json["normalizer"] = serde_json::json!({"type": "NFC"});
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::copy(
        src.join("tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let tok = TextTokenizer::load(dir.path(), &SpecialTokenStrings::default()).unwrap();
    assert!(!tok.has_fast_path());
    assert!(tok.encoder().contains("normalizer"), "{}", tok.encoder());
    let t = "春眠不覺曉";
    assert_eq!(tok.encode(t).unwrap(), tok.encode_with_crate(t).unwrap());
}

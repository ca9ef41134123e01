//! The embedded default corpus (5,000 Tang poems from chinese-poetry, MIT; see data/ATTRIBUTION.md)
//! and the byte-level BPE tokenizer trained on it, so `fast pretrain` runs with no options from
//! any directory, and MiniMind's own tokenizers (MiniMind2's and MiniMind-3's, Apache-2.0), which
//! `--tokenizer minimind2` / `minimind3` and the model presets name. They are written once to a
//! content-addressed folder under the temp directory.
use std::path::PathBuf;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

const POEMS: &[u8] = include_bytes!("../../../data/poems.jsonl");
const TOKENIZER_JSON: &[u8] = include_bytes!("../../../data/tokenizer/tokenizer.json");
const TOKENIZER_CONFIG: &[u8] = include_bytes!("../../../data/tokenizer/tokenizer_config.json");

/// The built-in tokenizers by name: (tokenizer.json, tokenizer_config.json).
const BUILTIN_TOKENIZERS: [(&str, &[u8], &[u8]); 3] = [
    ("poems", TOKENIZER_JSON, TOKENIZER_CONFIG),
    (
        "minimind2",
        include_bytes!("../../../data/minimind2-tokenizer/tokenizer.json"),
        include_bytes!("../../../data/minimind2-tokenizer/tokenizer_config.json"),
    ),
    (
        "minimind3",
        include_bytes!("../../../data/minimind3-tokenizer/tokenizer.json"),
        include_bytes!("../../../data/minimind3-tokenizer/tokenizer_config.json"),
    ),
];

/// Names `--tokenizer` accepts besides a path.
pub fn builtin_tokenizer_names() -> Vec<&'static str> {
    BUILTIN_TOKENIZERS.iter().map(|(n, _, _)| *n).collect()
}

/// The directory of built-in tokenizer `name` (`poems`, `minimind2`, `minimind3`), if it is one.
pub fn builtin_tokenizer(name: &str) -> Result<Option<PathBuf>> {
    let Some((_, json, config)) = BUILTIN_TOKENIZERS.iter().find(|(n, _, _)| *n == name) else {
        return Ok(None);
    };
    let mut h = Sha256::new();
    for part in [*json, *config] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    let tag: String = h.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = std::env::temp_dir().join(format!("minimind-fast-tokenizer-{name}-{tag}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_if_changed(&dir.join("tokenizer.json"), json)?;
    write_if_changed(&dir.join("tokenizer_config.json"), config)?;
    Ok(Some(dir))
}

/// Paths of the default corpus and tokenizer directory on disk.
pub struct DefaultData {
    pub corpus: PathBuf,
    pub tokenizer_dir: PathBuf,
}

pub fn materialize() -> Result<DefaultData> {
    let mut h = Sha256::new();
    for part in [POEMS, TOKENIZER_JSON, TOKENIZER_CONFIG] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    let digest = h.finalize();
    let tag: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    let dir = std::env::temp_dir().join(format!("minimind-fast-default-data-{tag}"));
    let tokenizer_dir = dir.join("tokenizer");
    std::fs::create_dir_all(&tokenizer_dir)
        .with_context(|| format!("creating {}", tokenizer_dir.display()))?;
    let corpus = dir.join("poems.jsonl");
    write_if_changed(&corpus, POEMS)?;
    write_if_changed(&tokenizer_dir.join("tokenizer.json"), TOKENIZER_JSON)?;
    write_if_changed(
        &tokenizer_dir.join("tokenizer_config.json"),
        TOKENIZER_CONFIG,
    )?;
    Ok(DefaultData {
        corpus,
        tokenizer_dir,
    })
}

/// Write through a uniquely named temp file and rename, so concurrent runs never see a half file.
fn write_if_changed(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    if std::fs::read(path).map(|b| b == bytes).unwrap_or(false) {
        return Ok(());
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

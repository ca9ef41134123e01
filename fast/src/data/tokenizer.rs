//! Any Hugging Face `tokenizer.json` through the `tokenizers` crate, with bos/eos/pad taken from
//! the `tokenizer_config.json` beside it (`bos_token`, `eos_token`, `pad_token`) unless given.
//! A tokenizer.json of MiniMind's byte-level BPE shape encodes through [`super::bpe`] (the same
//! ids, several times faster); any other through the crate.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

/// Special-token strings given on the command line; each overrides tokenizer_config.json.
#[derive(Clone, Debug, Default)]
pub struct SpecialTokenStrings {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
}

/// A loaded tokenizer. Cloning copies it (each copy has its own BPE word cache, so threads
/// that tokenize with their own copies share no lock).
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// The ids-only encoder, when tokenizer.json has its shape; else why not.
    fast: Result<Arc<super::bpe::ByteLevelBpe>, String>,
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    /// The tokenizer.json this was loaded from.
    pub path: PathBuf,
    /// The tokenizer_config.json beside it (it may not exist), and its contents as loaded.
    pub config_path: PathBuf,
    config: Option<serde_json::Value>,
    /// xxh3-128 of tokenizer.json and tokenizer_config.json, 32 hex digits: what a token cache
    /// records of the tokenizer.
    pub hash: String,
}

impl TextTokenizer {
    /// `path` is a directory holding tokenizer.json (and usually tokenizer_config.json), or a
    /// tokenizer.json file (its tokenizer_config.json is looked for beside it).
    pub fn load(path: &Path, given: &SpecialTokenStrings) -> Result<Self> {
        let (json, dir) = if path.is_dir() {
            (path.join("tokenizer.json"), path.to_path_buf())
        } else {
            (
                path.to_path_buf(),
                path.parent().map(Path::to_path_buf).unwrap_or_default(),
            )
        };
        if !json.is_file() {
            bail!(
                "tokenizer {} not found (give --tokenizer a directory with tokenizer.json or the tokenizer.json itself)",
                json.display()
            );
        }
        // Each file is read once: the crate, the fast path and the hash take the same bytes.
        let bytes = std::fs::read(&json).with_context(|| format!("reading {}", json.display()))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            anyhow::anyhow!("{}: not a Hugging Face tokenizer.json: {e}", json.display())
        })?;
        let fast = serde_json::from_slice(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|value| super::bpe::ByteLevelBpe::from_json(&value))
            .map(Arc::new);
        let config_path = dir.join("tokenizer_config.json");
        let config_bytes = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?;
            Some(text.into_bytes())
        } else {
            None
        };
        let config: Option<serde_json::Value> = config_bytes
            .as_deref()
            .map(|b| {
                serde_json::from_slice(b)
                    .with_context(|| format!("{}: invalid JSON", config_path.display()))
            })
            .transpose()?;
        let from_config = |key: &str| config_string(config.as_ref(), key);
        let resolve = |name: &str, flag: &Option<String>, key: &str| -> Result<Option<u32>> {
            let Some(token) = flag.clone().or_else(|| from_config(key)) else {
                return Ok(None);
            };
            match inner.token_to_id(&token) {
                Some(id) => Ok(Some(id)),
                None => bail!(
                    "{name} token {token:?} is not in the vocabulary of {}",
                    json.display()
                ),
            }
        };
        let missing = |name: &str, key: &str| {
            anyhow::anyhow!(
                "no {name} token: {} has no `{key}` and --{name}-token was not given",
                config_path.display()
            )
        };
        let bos =
            resolve("bos", &given.bos, "bos_token")?.ok_or_else(|| missing("bos", "bos_token"))?;
        let eos =
            resolve("eos", &given.eos, "eos_token")?.ok_or_else(|| missing("eos", "eos_token"))?;
        // Many tokenizers have no pad token; padding with eos is the usual stand-in.
        let pad = resolve("pad", &given.pad, "pad_token")?.unwrap_or(eos);
        let hash = content_hash(&bytes, config_bytes.as_deref());
        Ok(Self {
            inner,
            fast,
            bos,
            eos,
            pad,
            path: json,
            config_path,
            config,
            hash,
        })
    }

    /// The id of `token` (a whole token string, e.g. `<mask>`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// A string field of tokenizer_config.json (`mask_token`, ...), plain or `{"content": ..}`.
    pub fn config_token(&self, key: &str) -> Option<String> {
        config_string(self.config.as_ref(), key)
    }

    /// Ids of the added tokens marked special in tokenizer.json, sorted.
    pub fn special_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Token ids of `text` without added special tokens (`add_special_tokens=False`); special-token
    /// strings inside the text still become their ids, as in MiniMind.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if let Ok(fast) = &self.fast {
            return Ok(fast.encode(text));
        }
        self.encode_with_crate(text)
    }

    /// [`TextTokenizer::encode`] through the tokenizers crate whatever the shape (what the fast
    /// path is checked against).
    pub fn encode_with_crate(&self, text: &str) -> Result<Vec<u32>> {
        // encode_fast computes no offsets; the ids are encode's.
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Which encoder [`TextTokenizer::encode`] uses, in words.
    pub fn encoder(&self) -> String {
        match &self.fast {
            Ok(_) => "byte-level BPE fast path (data/bpe.rs)".to_string(),
            Err(why) => format!("the tokenizers crate (no fast path: {why})"),
        }
    }

    /// Whether [`TextTokenizer::encode`] takes the fast path.
    pub fn has_fast_path(&self) -> bool {
        self.fast.is_ok()
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("decoding failed: {e}"))
    }

    /// Vocabulary size including added tokens (the model's vocab must be at least this).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// For a model of `model_vocab` embeddings: the warning to print when this tokenizer has
    /// more tokens (text can encode to ids the model cannot embed), else None.
    pub fn vocab_warning(&self, model_vocab: usize) -> Option<String> {
        (self.vocab_size() > model_vocab).then(|| {
            format!(
                "warning: tokenizer {} has {} tokens but the model's vocabulary is {}: text that encodes to ids past it cannot be run (the --tokenizer the model was trained with has none)",
                self.path.display(),
                self.vocab_size(),
                model_vocab
            )
        })
    }
}

/// A string field of a tokenizer_config.json: plain, or older configs' `{"content": "<s>", ...}`.
fn config_string(config: Option<&serde_json::Value>, key: &str) -> Option<String> {
    match config?.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// xxh3-128 over tokenizer.json's and tokenizer_config.json's bytes, each preceded by its length
/// (a missing config hashes as the marker `u64::MAX`, distinct from an empty file).
fn content_hash(json: &[u8], config: Option<&[u8]>) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&(json.len() as u64).to_le_bytes());
    h.update(json);
    match config {
        Some(bytes) => {
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
        None => h.update(&u64::MAX.to_le_bytes()),
    }
    format!("{:032x}", h.digest128())
}

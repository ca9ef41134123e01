//! `fast train-tokenizer`: byte-level BPE trained the way MiniMind trains its tokenizer
//! (scripts/train_tokenizer.py): BPE model, ByteLevel pre-tokenizer without a prefix space,
//! ByteLevel decoder, special tokens `<|endoftext|>`=0, `<|im_start|>`=1, `<|im_end|>`=2 first,
//! the 256-symbol ByteLevel alphabet as the initial alphabet. Writes `tokenizer.json` and a
//! `tokenizer_config.json` in MiniMind's format (bos `<|im_start|>`, eos `<|im_end|>`,
//! pad/unk `<|endoftext|>`). `--special-tokens` adds more special tokens after those three (ids
//! 3, 4, ...), e.g. `<mask>` for masked LM (written as tokenizer_config.json's `mask_token`).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerImpl,
};

use crate::data::corpus::{JsonlCorpus, LinePolicy};

pub const PAD_TOKEN: &str = "<|endoftext|>";
pub const BOS_TOKEN: &str = "<|im_start|>";
pub const EOS_TOKEN: &str = "<|im_end|>";

#[derive(clap::Args, Debug, Clone)]
pub struct TrainTokenizerArgs {
    /// JSONL corpus, one `{"text": ...}` object per line.
    #[arg(long, alias = "data_path", default_value = "data/poems.jsonl")]
    pub data_path: PathBuf,
    /// Vocabulary size including the three special tokens.
    #[arg(long, alias = "vocab_size", default_value_t = 6400)]
    pub vocab_size: usize,
    /// Output directory for tokenizer.json and tokenizer_config.json (created if missing).
    #[arg(long, default_value = "tokenizer")]
    pub out: PathBuf,
    /// Skip lines that are not valid `{"text": "..."}` objects (with a count) instead of failing.
    #[arg(long, alias = "skip_bad_lines")]
    pub skip_bad_lines: bool,
    /// More special tokens, comma-separated, after MiniMind's three (ids 3, 4, ...): never split
    /// and never merged into other tokens. `<mask>` or `[MASK]` also becomes mask_token.
    #[arg(long, alias = "special_tokens", value_delimiter = ',')]
    pub special_tokens: Vec<String>,
}

pub fn run(args: &TrainTokenizerArgs) -> Result<()> {
    let least = 259 + args.special_tokens.len();
    if args.vocab_size < least {
        bail!(
            "--vocab-size {} is too small: byte-level BPE needs the {} special tokens and 256 byte symbols (at least {least})",
            args.vocab_size,
            3 + args.special_tokens.len()
        );
    }
    for (i, t) in args.special_tokens.iter().enumerate() {
        if t.is_empty() || [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN].contains(&t.as_str()) {
            bail!("--special-tokens {t:?}: empty or already one of MiniMind's three");
        }
        if args.special_tokens[..i].contains(t) {
            bail!("--special-tokens {t:?}: given twice");
        }
    }
    let policy = if args.skip_bad_lines {
        LinePolicy::Skip
    } else {
        LinePolicy::Fail
    };
    let corpus = JsonlCorpus::open(&args.data_path, policy)?;
    println!(
        "training byte-level BPE (vocab {}) on {} documents of {}",
        args.vocab_size,
        corpus.len(),
        args.data_path.display()
    );
    let start = std::time::Instant::now();
    let texts = corpus.iter_texts().collect::<Result<Vec<String>>>()?;
    let tokenizer = train_bpe_with_specials(
        texts.iter().map(String::as_str),
        args.vocab_size,
        &args.special_tokens,
    )?;
    write_tokenizer_dir_with_specials(&tokenizer, &args.out, &args.special_tokens)?;
    println!(
        "wrote {} and {} ({} tokens) in {:.1}s",
        args.out.join("tokenizer.json").display(),
        args.out.join("tokenizer_config.json").display(),
        tokenizer.get_vocab_size(true),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

pub type BpeTokenizer = TokenizerImpl<
    BPE,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// Train MiniMind's byte-level BPE on `texts`.
pub fn train_bpe<'a, I>(texts: I, vocab_size: usize) -> Result<BpeTokenizer>
where
    I: Iterator<Item = &'a str> + Send,
{
    train_bpe_with_specials(texts, vocab_size, &[])
}

/// [`train_bpe`] with `extra` special tokens after MiniMind's three (ids 3, 4, ...).
pub fn train_bpe_with_specials<'a, I>(
    texts: I,
    vocab_size: usize,
    extra: &[String],
) -> Result<BpeTokenizer>
where
    I: Iterator<Item = &'a str> + Send,
{
    let mut tokenizer: BpeTokenizer = TokenizerImpl::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(
        ByteLevel::default().add_prefix_space(false),
    )));
    let names: Vec<&str> = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
        .into_iter()
        .chain(extra.iter().map(String::as_str))
        .collect();
    let special: Vec<AddedToken> = names.iter().map(|t| AddedToken::from(*t, true)).collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .special_tokens(special)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| anyhow::anyhow!("BPE training failed: {e}"))?;
    // Python's decoders.ByteLevel() keeps its defaults (add_prefix_space true); so do we.
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
    for (id, tok) in names.iter().enumerate() {
        if tokenizer.token_to_id(tok) != Some(id as u32) {
            bail!("special token {tok} did not get id {id}");
        }
    }
    Ok(tokenizer)
}

/// Write `tokenizer.json` and MiniMind's `tokenizer_config.json` into `dir`.
pub fn write_tokenizer_dir(tokenizer: &BpeTokenizer, dir: &Path) -> Result<()> {
    write_tokenizer_dir_with_specials(tokenizer, dir, &[])
}

/// [`write_tokenizer_dir`] for a tokenizer trained with `extra` special tokens.
pub fn write_tokenizer_dir_with_specials(
    tokenizer: &BpeTokenizer,
    dir: &Path,
    extra: &[String],
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = tokenizer
        .to_string(true)
        .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
    let path = dir.join("tokenizer_config.json");
    let mut config = tokenizer_config_json();
    for (i, t) in extra.iter().enumerate() {
        config["added_tokens_decoder"][(3 + i).to_string()] = added_token_json(t);
        if let Some(list) = config["additional_special_tokens"].as_array_mut() {
            list.push(serde_json::json!(t));
        }
        if t == "<mask>" || t == "[MASK]" {
            config["mask_token"] = serde_json::json!(t);
        }
    }
    let config = serde_json::to_string_pretty(&config)?;
    std::fs::write(&path, config + "\n").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The fields of MiniMind's tokenizer_config.json that a loader reads (the chat template is
/// omitted: pretraining does not use it).
fn added_token_json(content: &str) -> serde_json::Value {
    serde_json::json!({
        "content": content, "lstrip": false, "normalized": false,
        "rstrip": false, "single_word": false, "special": true
    })
}

pub fn tokenizer_config_json() -> serde_json::Value {
    let added = added_token_json;
    serde_json::json!({
        "add_bos_token": false,
        "add_eos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": {
            "0": added(PAD_TOKEN),
            "1": added(BOS_TOKEN),
            "2": added(EOS_TOKEN),
        },
        "additional_special_tokens": [],
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": false,
        "eos_token": EOS_TOKEN,
        "legacy": true,
        "model_max_length": 32768,
        "pad_token": PAD_TOKEN,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": false,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": PAD_TOKEN,
    })
}

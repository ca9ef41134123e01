//! The data a run trains on, set up one way for `pretrain`, `bench` and `eval`: the corpus's
//! files, its tokenizer, the token cache (built by a tokenizing pass when there is no valid one)
//! and the rows of the chosen layout.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::data::dataset::{DataMode, TokenDataset};
use crate::data::mlm::{MlmMasking, MlmSpec};
use crate::data::pass::DEFAULT_SHARD_TOKENS;
use crate::data::rows::SpecialTokens;
use crate::data::token_cache::{open_or_build, CacheRequest, TokenCache};
use crate::data::tokenizer::{SpecialTokenStrings, TextTokenizer};

/// What to read and how to lay it out.
#[derive(Clone, Debug)]
pub struct DataSpec {
    /// `--data-path` values: files, glob patterns, directories (see `data::sources`).
    pub data_path: Vec<PathBuf>,
    pub tokenizer: PathBuf,
    /// Token strings overriding tokenizer_config.json's.
    pub specials: SpecialTokenStrings,
    pub max_seq_len: usize,
    pub data_mode: DataMode,
    /// Threads of the tokenizing pass (when the cache must be built).
    pub threads: usize,
    pub skip_bad_lines: bool,
    /// Only the first N documents.
    pub max_docs: Option<usize>,
    /// `--token-cache` (None: the default beside the data, see `data::token_cache::default_dir`).
    pub token_cache: Option<PathBuf>,
    /// `--rebuild-cache`: rebuild an invalid `--token-cache` instead of refusing it.
    pub rebuild_cache: bool,
    /// Show the tokenizing pass's progress bar.
    pub progress: bool,
    /// Masked LM (the run's objective): mask every row (`data::mlm`); None for causal LM.
    pub mlm: Option<MlmSpec>,
}

impl DataSpec {
    /// A spec with the defaults of everything but the corpus, tokenizer, row length and layout.
    pub fn new(
        data_path: Vec<PathBuf>,
        tokenizer: PathBuf,
        max_seq_len: usize,
        data_mode: DataMode,
    ) -> DataSpec {
        DataSpec {
            data_path,
            tokenizer,
            specials: SpecialTokenStrings::default(),
            max_seq_len,
            data_mode,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            skip_bad_lines: false,
            max_docs: None,
            token_cache: None,
            rebuild_cache: false,
            progress: false,
            mlm: None,
        }
    }
}

/// A corpus ready to be batched.
pub struct Data {
    pub cache: Arc<TokenCache>,
    pub tokenizer: Arc<TextTokenizer>,
    pub dataset: Arc<TokenDataset>,
}

impl Data {
    /// Opens the tokenizer and the token cache (tokenizing the corpus if needed) and lays out
    /// the rows; `say` gets a line about the cache if it was built or refused, one about skipped
    /// bad lines (if any) and one describing the data.
    pub fn load(spec: &DataSpec, say: &dyn Fn(String)) -> Result<Data> {
        let files = crate::data::sources::resolve(&spec.data_path)?;
        let tokenizer = Arc::new(TextTokenizer::load(&spec.tokenizer, &spec.specials)?);
        let req = CacheRequest {
            given: spec.data_path.clone(),
            files,
            dir: spec.token_cache.clone(),
            rebuild: spec.rebuild_cache,
            skip_bad_lines: spec.skip_bad_lines,
            max_docs: spec.max_docs.map(|n| n as u64),
            threads: spec.threads,
            shard_tokens: DEFAULT_SHARD_TOKENS,
            progress: spec.progress,
        };
        let (cache, stats) = open_or_build(&req, &tokenizer, say)?;
        if let Some(stats) = stats {
            say(format!(
                "tokenized into {}: {}",
                cache.dir.display(),
                stats.describe(spec.threads.max(1))
            ));
        }
        let m = &cache.manifest;
        if m.lines_skipped > 0 {
            say(format!(
                "skipped {} bad line(s) of {}: {}",
                m.lines_skipped,
                show_paths(&req.files),
                m.skipped_examples.join("; ")
            ));
        }
        if m.tokens == 0 {
            bail!(
                "{}: its {} document(s) have no text (every \"text\" is empty), so there is nothing to train on or score",
                show_paths(&req.files),
                m.docs
            );
        }
        let source_bytes: u64 = m.sources.iter().map(|s| s.size).sum();
        let cache = Arc::new(cache);
        let specials = SpecialTokens {
            pad: tokenizer.pad,
            bos: tokenizer.bos,
            eos: tokenizer.eos,
        };
        let mut dataset = TokenDataset::new(
            cache.clone(),
            spec.data_mode,
            spec.max_seq_len,
            specials,
            tokenizer.vocab_size(),
        )?;
        if let Some(mlm) = &spec.mlm {
            let masking = MlmMasking::for_tokenizer(mlm, &tokenizer)?;
            say(format!(
                "masked LM: {:.0}% of non-special tokens selected (80% -> mask id {}, 10% random, 10% kept), {} special ids never selected",
                masking.probability * 100.0,
                masking.mask_token_id,
                masking.special_ids.len()
            ));
            dataset = dataset.with_mlm(masking, mlm.seed);
        }
        let dataset = Arc::new(dataset);
        say(format!(
            "data: {} documents from {} ({:.1} MB; token cache {}) -> {} {} rows of {} tokens; tokenizer {} (vocab {}, bos {}, eos {}, pad {})",
            cache.len(),
            show_paths(&req.files),
            source_bytes as f64 / 1e6,
            cache.dir.display(),
            dataset.len(),
            spec.data_mode.name(),
            spec.max_seq_len,
            tokenizer.path.display(),
            tokenizer.vocab_size(),
            tokenizer.bos,
            tokenizer.eos,
            tokenizer.pad
        ));
        if dataset.is_empty() {
            bail!("{} gives no training rows", show_paths(&req.files));
        }
        Ok(Data {
            cache,
            tokenizer,
            dataset,
        })
    }
}

/// One path, or the first and a count.
fn show_paths(files: &[PathBuf]) -> String {
    match files {
        [one] => one.display().to_string(),
        [first, rest @ ..] => format!("{} and {} more file(s)", first.display(), rest.len()),
        [] => "no files".to_string(),
    }
}

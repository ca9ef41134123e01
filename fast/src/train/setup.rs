//! The data a run trains on, set up one way for `pretrain`, `bench` and `eval`: the corpus, its
//! tokenizer and the rows of the chosen layout.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};

use crate::data::corpus::{JsonlCorpus, LinePolicy};
use crate::data::dataset::{DataMode, TokenDataset};
use crate::data::tokenizer::{SpecialTokenStrings, TextTokenizer};

/// What to read and how to lay it out.
#[derive(Clone, Debug)]
pub struct DataSpec {
    pub data_path: PathBuf,
    pub tokenizer: PathBuf,
    /// Token strings overriding tokenizer_config.json's.
    pub specials: SpecialTokenStrings,
    pub max_seq_len: usize,
    pub data_mode: DataMode,
    /// Threads of the packed layout's tokenizing pass.
    pub threads: usize,
    pub skip_bad_lines: bool,
    /// Only the first N documents.
    pub max_docs: Option<usize>,
}

/// A corpus ready to be batched.
pub struct Data {
    pub corpus: Arc<JsonlCorpus>,
    pub tokenizer: Arc<TextTokenizer>,
    pub dataset: Arc<TokenDataset>,
}

impl Data {
    /// Opens the corpus and the tokenizer and lays out the rows; `say` gets one line about
    /// skipped bad lines (if any) and one describing the data.
    pub fn load(spec: &DataSpec, say: &dyn Fn(String)) -> Result<Data> {
        let policy = if spec.skip_bad_lines {
            LinePolicy::Skip
        } else {
            LinePolicy::Fail
        };
        let mut corpus = JsonlCorpus::open(&spec.data_path, policy)?;
        if corpus.skipped > 0 {
            say(format!(
                "skipped {} bad line(s) of {}: {}",
                corpus.skipped,
                spec.data_path.display(),
                corpus.skipped_examples.join("; ")
            ));
        }
        if let Some(n) = spec.max_docs {
            corpus.truncate(n);
        }
        let tokenizer = Arc::new(TextTokenizer::load(&spec.tokenizer, &spec.specials)?);
        let corpus = Arc::new(corpus);
        let t0 = Instant::now();
        let dataset = Arc::new(match spec.data_mode {
            DataMode::Padded => {
                TokenDataset::padded(corpus.clone(), tokenizer.clone(), spec.max_seq_len)
            }
            DataMode::Packed => TokenDataset::packed(
                corpus.clone(),
                tokenizer.clone(),
                spec.max_seq_len,
                spec.threads,
            )?,
        });
        say(format!(
            "data: {} documents from {} ({:.1} MB) -> {} {:?} rows of {} tokens{}; tokenizer {} (vocab {}, bos {}, eos {}, pad {})",
            corpus.len(),
            spec.data_path.display(),
            corpus.file_bytes as f64 / 1e6,
            dataset.len(),
            spec.data_mode,
            spec.max_seq_len,
            if spec.data_mode == DataMode::Packed {
                format!(" (laid out in {:.1}s)", t0.elapsed().as_secs_f64())
            } else {
                String::new()
            },
            tokenizer.path.display(),
            tokenizer.vocab_size(),
            tokenizer.bos,
            tokenizer.eos,
            tokenizer.pad
        ));
        if dataset.is_empty() {
            bail!("{} gives no training rows", spec.data_path.display());
        }
        Ok(Data {
            corpus,
            tokenizer,
            dataset,
        })
    }
}

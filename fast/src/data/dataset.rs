//! Training rows from a JSONL corpus and a tokenizer, in two layouts.
//!
//! - Padded (MiniMind's PretrainDataset): one document per row,
//!   `[bos] + ids[..max_len-2] + [eos]`, right-padded with pad; labels = input_ids with -100
//!   wherever input_ids == pad (so a pad-valued token inside the text is not learned either,
//!   exactly as MiniMind does).
//! - Packed: every document followed by eos, concatenated in file order into one stream that is
//!   cut into rows of max_len; nothing is truncated and the only padding is the tail of the last
//!   row, whose labels are -100. Rows are fixed by the file; the epoch permutation shuffles rows.
//!
//! Items are produced on demand (the tokenizer runs when a row is asked for), so the loader's
//! worker threads do the tokenizing.
use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::corpus::JsonlCorpus;
use super::tokenizer::TextTokenizer;

pub use super::rows::{counted_labels, Row};
pub use crate::model::loss::IGNORE_INDEX;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataMode {
    /// One document per row, truncated and right-padded (MiniMind's PretrainDataset).
    Padded,
    /// Documents concatenated (each followed by eos) and cut into full rows.
    Packed,
}

/// MiniMind's PretrainDataset encoding of one document's token ids (see `rows::padded_row`).
pub fn padded_row(ids: &[u32], max_len: usize, bos: u32, eos: u32, pad: u32) -> Row {
    super::rows::padded_row(ids, max_len, super::rows::SpecialTokens { pad, bos, eos })
}

enum Layout {
    Padded,
    /// `ends[k]` = stream position just past document k's eos; `rows` = ceil(total / max_len).
    Packed {
        ends: Vec<u64>,
        rows: usize,
    },
}

pub struct TokenDataset {
    pub corpus: Arc<JsonlCorpus>,
    pub tokenizer: Arc<TextTokenizer>,
    pub max_len: usize,
    layout: Layout,
}

impl TokenDataset {
    pub fn padded(corpus: Arc<JsonlCorpus>, tokenizer: Arc<TextTokenizer>, max_len: usize) -> Self {
        Self {
            corpus,
            tokenizer,
            max_len,
            layout: Layout::Padded,
        }
    }

    /// Packed rows need every document's length: one tokenizing pass over the corpus on
    /// `threads` threads (only the lengths are kept).
    pub fn packed(
        corpus: Arc<JsonlCorpus>,
        tokenizer: Arc<TextTokenizer>,
        max_len: usize,
        threads: usize,
    ) -> Result<Self> {
        let lengths = document_lengths(&corpus, &tokenizer, threads)?;
        let mut ends = Vec::with_capacity(lengths.len());
        let mut total = 0u64;
        for len in lengths {
            total += len as u64 + 1; // + eos
            ends.push(total);
        }
        let rows = total.div_ceil(max_len as u64) as usize;
        Ok(Self {
            corpus,
            tokenizer,
            max_len,
            layout: Layout::Packed { ends, rows },
        })
    }

    pub fn mode(&self) -> DataMode {
        match self.layout {
            Layout::Padded => DataMode::Padded,
            Layout::Packed { .. } => DataMode::Packed,
        }
    }

    /// Number of items (documents when padded, rows when packed).
    pub fn len(&self) -> usize {
        match &self.layout {
            Layout::Padded => self.corpus.len(),
            Layout::Packed { rows, .. } => *rows,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Item `i`. `cache` keeps documents tokenized for this call's neighbours (packed rows of one
    /// batch share the documents that straddle their boundaries); pass a fresh map per batch.
    pub fn item(&self, i: usize, cache: &mut HashMap<usize, Vec<u32>>) -> Result<Row> {
        let tok = &self.tokenizer;
        match &self.layout {
            Layout::Padded => {
                let ids = self.doc_ids(i)?;
                Ok(padded_row(&ids, self.max_len, tok.bos, tok.eos, tok.pad))
            }
            Layout::Packed { ends, rows } => {
                anyhow::ensure!(i < *rows, "row {i} out of range ({rows} rows)");
                let l = self.max_len as u64;
                let (start, stop) = (
                    i as u64 * l,
                    ((i as u64 + 1) * l).min(*ends.last().unwrap()),
                );
                // First document whose end lies past `start`.
                let mut k = ends.partition_point(|&e| e <= start);
                let mut input_ids = Vec::with_capacity(self.max_len);
                let mut pos = start;
                while pos < stop {
                    let doc_start = if k == 0 { 0 } else { ends[k - 1] };
                    if !cache.contains_key(&k) {
                        let ids = self.doc_ids(k)?;
                        anyhow::ensure!(
                            doc_start + ids.len() as u64 + 1 == ends[k],
                            "{}:{}: tokenized to a different length than when the rows were laid out",
                            self.corpus.path().display(),
                            self.corpus.line_of(k)
                        );
                        cache.insert(k, ids);
                    }
                    let ids = &cache[&k];
                    let from = (pos - doc_start) as usize;
                    let to = ((stop - doc_start) as usize).min(ids.len() + 1);
                    for j in from..to {
                        input_ids.push(if j < ids.len() {
                            ids[j] as i64
                        } else {
                            tok.eos as i64
                        });
                    }
                    pos = doc_start + to as u64;
                    k += 1;
                }
                let real = input_ids.len();
                let mut labels = input_ids.clone();
                input_ids.resize(self.max_len, tok.pad as i64);
                labels.resize(self.max_len, IGNORE_INDEX);
                debug_assert_eq!(real as u64, stop - start);
                Ok(Row { input_ids, labels })
            }
        }
    }

    fn doc_ids(&self, k: usize) -> Result<Vec<u32>> {
        let text = self.corpus.text(k)?;
        self.tokenizer.encode(&text).with_context(|| {
            format!(
                "{}:{}",
                self.corpus.path().display(),
                self.corpus.line_of(k)
            )
        })
    }
}

/// Token count of every document (without bos/eos), tokenized on `threads` threads.
pub fn document_lengths(
    corpus: &JsonlCorpus,
    tokenizer: &TextTokenizer,
    threads: usize,
) -> Result<Vec<u32>> {
    let n = corpus.len();
    let threads = threads.clamp(1, 64);
    let chunk = n.div_ceil(threads).max(1);
    let mut lengths = vec![0u32; n];
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = lengths
            .chunks_mut(chunk)
            .enumerate()
            .map(|(c, out)| {
                s.spawn(move || -> Result<()> {
                    for (j, slot) in out.iter_mut().enumerate() {
                        let k = c * chunk + j;
                        let text = corpus.text(k)?;
                        let ids = tokenizer.encode(&text).with_context(|| {
                            format!("{}:{}", corpus.path().display(), corpus.line_of(k))
                        })?;
                        *slot = ids.len() as u32;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a tokenizing thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(lengths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_row_is_minimind_pretrain_dataset() {
        let r = padded_row(&[7, 8, 9], 8, 1, 2, 0);
        assert_eq!(r.input_ids, vec![1, 7, 8, 9, 2, 0, 0, 0]);
        assert_eq!(r.labels, vec![1, 7, 8, 9, 2, -100, -100, -100]);
        assert_eq!(counted_labels(&r), 4);
        let r = padded_row(&[7, 8, 9, 10, 11], 5, 1, 2, 0);
        assert_eq!(r.input_ids, vec![1, 7, 8, 9, 2]);
        let r = padded_row(&[], 4, 1, 2, 0);
        assert_eq!(r.input_ids, vec![1, 2, 0, 0]);
    }

    #[test]
    fn pad_valued_tokens_inside_text_get_no_label_as_in_minimind() {
        let r = padded_row(&[5, 0, 6], 6, 1, 2, 0);
        assert_eq!(r.labels, vec![1, 5, -100, 6, 2, -100]);
    }
}

//! Training rows from a token cache, in each layout, built on demand by index.
//!
//! - Padded (MiniMind's PretrainDataset): one document per row,
//!   `[bos] + ids[..max_len-2] + [eos]`, right-padded with pad; labels = input_ids with -100
//!   wherever input_ids == pad (so a pad-valued token inside the text is not learned either,
//!   exactly as MiniMind does).
//! - Packed: every document followed by eos, concatenated in corpus order into one stream that is
//!   cut into rows of max_len; nothing is truncated and the only padding is the tail of the last
//!   row, whose labels are -100. Rows are fixed by the corpus; the epoch permutation shuffles rows.
//! - Packed-docs: every document as `[bos] + ids + [eos]` (never truncated), concatenated, cut
//!   into rows of max_len; labels -100 at every document start (its bos) and at the final row's
//!   padding. Each row carries its segment starts (a document continued from the previous row is
//!   the segment at 0, the padding tail is a segment of its own), and the batch carries per token
//!   `seg_start`, the position of its segment's first token, for attention within documents.
//! - Chunked (Hugging Face's `group_texts`, the textbook recipe): the ids concatenated without
//!   separators, cut into rows of max_len, the remainder dropped; labels = input_ids.
//!
//! Masked LM (`with_mlm`): after the layout, each row is masked by `data::mlm` with the run's
//! seed, the epoch and the row's index; labels become the selected positions' original ids, and
//! the loss that reads them is unshifted (`Counting::Unshifted`).
//!
//! The stream layouts never hold the stream: document k begins at stream position
//! `token_start(k) + k * extra` (extra = the separators each document adds), so a row's documents
//! are found by binary search over the cache's memory-mapped offsets, and its ids are copied from
//! the mapped shards. `rows::` has the same layouts as plain functions of id lists; tests hold
//! the two equal.
use std::sync::Arc;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::batch::HostBatch;
use super::rows::{Counting, SpecialTokens};
use super::token_cache::TokenCache;

pub use super::rows::{counted_labels, Row};
pub use crate::model::loss::IGNORE_INDEX;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DataMode {
    /// One document per row, truncated and right-padded (MiniMind's PretrainDataset).
    Padded,
    /// Documents concatenated (each followed by eos) and cut into full rows.
    Packed,
    /// Documents as [bos] + ids + [eos] concatenated into full rows, each token knowing where its
    /// document starts (seg_start), so attention can stay within documents.
    PackedDocs,
    /// Hugging Face's group_texts: ids concatenated without separators, the remainder dropped.
    Chunked,
}

impl DataMode {
    /// The option's spelling (`--data-mode packed`).
    pub fn name(&self) -> &'static str {
        match self {
            DataMode::Padded => "padded",
            DataMode::Packed => "packed",
            DataMode::PackedDocs => "packed-docs",
            DataMode::Chunked => "chunked",
        }
    }

    /// Stream positions each document adds besides its ids (stream layouts).
    fn extra(&self) -> u64 {
        match self {
            DataMode::Padded | DataMode::Chunked => 0,
            DataMode::Packed => 1,
            DataMode::PackedDocs => 2,
        }
    }
}

/// MiniMind's PretrainDataset encoding of one document's token ids (see `rows::padded_row`).
pub fn padded_row(ids: &[u32], max_len: usize, bos: u32, eos: u32, pad: u32) -> Row {
    super::rows::padded_row(ids, max_len, SpecialTokens { pad, bos, eos })
}

/// Rows of one layout over a token cache.
pub struct TokenDataset {
    pub cache: Arc<TokenCache>,
    pub max_len: usize,
    pub mode: DataMode,
    pub specials: SpecialTokens,
    /// Ids must be below this (the tokenizer's vocabulary).
    pub vocab_size: usize,
    rows: usize,
    /// Stream length of the stream layouts.
    stream: u64,
    /// Masked LM: the masking and the run's seed.
    mlm: Option<(super::mlm::MlmMasking, u64)>,
}

impl TokenDataset {
    pub fn new(
        cache: Arc<TokenCache>,
        mode: DataMode,
        max_len: usize,
        specials: SpecialTokens,
        vocab_size: usize,
    ) -> Result<TokenDataset> {
        if max_len < 2 {
            bail!("--max-seq-len must be at least 2 (got {max_len})");
        }
        let docs = cache.len() as u64;
        let stream = cache.total_tokens()? + docs * mode.extra();
        let l = max_len as u64;
        let rows = match mode {
            DataMode::Padded => docs,
            DataMode::Packed | DataMode::PackedDocs => stream.div_ceil(l),
            DataMode::Chunked => stream / l,
        };
        let rows = usize::try_from(rows)
            .map_err(|_| anyhow::anyhow!("{rows} rows do not fit this machine's indices"))?;
        Ok(TokenDataset {
            cache,
            max_len,
            mode,
            specials,
            vocab_size,
            rows,
            stream,
            mlm: None,
        })
    }

    pub fn mode(&self) -> DataMode {
        self.mode
    }

    /// Number of items (documents when padded, rows otherwise).
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Masks every row for masked LM with `masking`, drawn from `seed` (the run's).
    pub fn with_mlm(mut self, masking: super::mlm::MlmMasking, seed: u64) -> TokenDataset {
        self.mlm = Some((masking, seed));
        self
    }

    pub fn mlm(&self) -> Option<&super::mlm::MlmMasking> {
        self.mlm.as_ref().map(|(m, _)| m)
    }

    /// Which labels the loss counts for these rows: the shifted loss's for the causal layouts,
    /// every selected position for masked LM.
    pub fn counting(&self) -> Counting {
        if self.mlm.is_some() {
            Counting::Unshifted
        } else {
            Counting::Shifted
        }
    }

    /// Item `i` in epoch `epoch` (only masked LM depends on the epoch).
    pub fn item(&self, i: usize, epoch: u64) -> Result<Row> {
        if i >= self.rows {
            bail!("row {i} out of range ({} rows)", self.rows);
        }
        match self.mode {
            DataMode::Padded => self.padded(i as u64),
            DataMode::Packed | DataMode::PackedDocs | DataMode::Chunked => {
                self.stream_row(i as u64)
            }
        }
        .map(|mut row| {
            if let Some((m, seed)) = &self.mlm {
                super::mlm::mask_row(&mut row, m, *seed, epoch, i as u64);
            }
            row
        })
    }

    /// The host batch of `items` in epoch `epoch`.
    pub fn batch(&self, items: &[usize], epoch: u64) -> Result<HostBatch> {
        let rows = items
            .iter()
            .map(|&i| self.item(i, epoch))
            .collect::<Result<Vec<_>>>()?;
        Ok(HostBatch::from_rows_counted(
            &rows,
            self.max_len,
            self.counting(),
        ))
    }

    fn padded(&self, k: u64) -> Result<Row> {
        let sp = self.specials;
        let n = self.cache.doc_len(k)?;
        let keep = n.min(self.max_len as u64 - 2);
        let mut input = Vec::with_capacity(self.max_len);
        input.push(sp.bos as i64);
        self.cache
            .extend_ids(k, 0, keep, self.vocab_size, &mut input)?;
        input.push(sp.eos as i64);
        input.resize(self.max_len, sp.pad as i64);
        let labels = input
            .iter()
            .map(|&t| if t == sp.pad as i64 { IGNORE_INDEX } else { t })
            .collect();
        Ok(Row::new(input, labels))
    }

    /// Stream position where document `k` begins (`k == docs`: the stream's end).
    fn doc_start(&self, k: u64) -> Result<u64> {
        Ok(self.cache.token_start(k)? + k * self.mode.extra())
    }

    /// The document holding stream position `p`: the first k whose next document starts past p.
    fn doc_at(&self, p: u64) -> Result<u64> {
        let (mut lo, mut hi) = (0u64, self.cache.len() as u64);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.doc_start(mid + 1)? <= p {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    fn damaged(&self, row: u64) -> anyhow::Error {
        anyhow::anyhow!(
            "token cache {}: the offsets around row {row} are inconsistent (damaged? rebuild with --rebuild-cache)",
            self.cache.dir.display()
        )
    }

    /// Row `r` of a stream layout: stream positions `r*L .. min((r+1)*L, stream)`.
    fn stream_row(&self, r: u64) -> Result<Row> {
        let l = self.max_len as u64;
        let (start, stop) = (r * l, ((r + 1) * l).min(self.stream));
        let docs = self.cache.len() as u64;
        let sp = self.specials;
        let mut input: Vec<i64> = Vec::with_capacity(self.max_len);
        // packed-docs: row positions where a document's bos lies.
        let mut doc_starts: Vec<usize> = Vec::new();
        let bos = u64::from(self.mode == DataMode::PackedDocs);
        let mut k = self.doc_at(start)?;
        let mut pos = start;
        while pos < stop {
            if k >= docs {
                return Err(self.damaged(r));
            }
            let ds = self.doc_start(k)?;
            let n = self.cache.doc_len(k)?;
            let span = n + self.mode.extra();
            let from = pos.checked_sub(ds).ok_or_else(|| self.damaged(r))?;
            let to = (stop - ds).min(span);
            // Positions within the document's span: [bos (packed-docs)], its ids, then the eos.
            if bos == 1 && from == 0 {
                doc_starts.push(input.len());
                input.push(sp.bos as i64);
            }
            let (a, b) = (from.max(bos) - bos, to.min(n + bos).saturating_sub(bos));
            if a < b {
                self.cache
                    .extend_ids(k, a, b, self.vocab_size, &mut input)?;
            }
            if to > n + bos {
                input.push(sp.eos as i64);
            }
            pos = ds + to;
            k += 1;
        }
        if input.len() as u64 != stop - start {
            return Err(self.damaged(r));
        }
        let real = input.len();
        let mut labels = input.clone();
        input.resize(self.max_len, sp.pad as i64);
        labels.resize(self.max_len, IGNORE_INDEX);
        let mut row = Row::new(input, labels);
        if self.mode == DataMode::PackedDocs {
            for &t in &doc_starts {
                row.labels[t] = IGNORE_INDEX;
            }
            let mut segs = doc_starts;
            if segs.first() != Some(&0) {
                segs.insert(0, 0);
            }
            if real < self.max_len {
                segs.push(real);
            }
            row.segment_starts = Some(segs);
        }
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::rows;

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

    #[test]
    fn rows_from_the_cache_equal_the_in_memory_layouts_across_shards() {
        let dir = tempfile::tempdir().unwrap();
        let docs: Vec<Vec<u32>> = vec![
            vec![10, 11, 12],
            vec![],
            vec![0, 13],
            vec![14; 9],
            vec![15],
            vec![16, 17, 18, 19],
        ];
        let cache =
            Arc::new(crate::data::token_cache::write_from_ids(dir.path(), &docs, 64, 2).unwrap());
        let sp = SpecialTokens::default();
        for max_len in [2, 3, 4, 7, 40] {
            let ds = TokenDataset::new(cache.clone(), DataMode::Packed, max_len, sp, 64).unwrap();
            let want = rows::packed_rows(&docs, max_len, sp);
            let got: Vec<Row> = (0..ds.len()).map(|i| ds.item(i, 0).unwrap()).collect();
            assert_eq!(got, want, "packed, max_len {max_len}");
            let ds =
                TokenDataset::new(cache.clone(), DataMode::PackedDocs, max_len, sp, 64).unwrap();
            let want = rows::packed_doc_rows(&docs, max_len, sp);
            let got: Vec<Row> = (0..ds.len()).map(|i| ds.item(i, 0).unwrap()).collect();
            assert_eq!(got, want, "packed-docs, max_len {max_len}");
            let ds = TokenDataset::new(cache.clone(), DataMode::Chunked, max_len, sp, 64).unwrap();
            let want = rows::chunked_rows(&docs, max_len);
            let got: Vec<Row> = (0..ds.len()).map(|i| ds.item(i, 0).unwrap()).collect();
            assert_eq!(got, want, "chunked, max_len {max_len}");
            let ds = TokenDataset::new(cache.clone(), DataMode::Padded, max_len, sp, 64).unwrap();
            for (k, d) in docs.iter().enumerate() {
                assert_eq!(ds.item(k, 0).unwrap(), rows::padded_row(d, max_len, sp));
            }
        }
    }
}

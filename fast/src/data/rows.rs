//! Token ids to causal-LM rows of `max_len` input ids and labels.
//!
//! - padded (MiniMind's PretrainDataset): `[bos] + ids[..max_len-2] + [eos]`, right-padded with
//!   pad; labels = input_ids with -100 wherever the input equals pad.
//! - packed (ours): every document followed by eos, all concatenated, cut into rows of max_len;
//!   only the final row's padding is labelled -100 (a real token equal to pad keeps its label).
//! - packed-docs: every document as `[bos] + ids + [eos]`, concatenated, cut into rows of max_len;
//!   labels -100 at each document's start (its bos) and at the final row's padding; each row
//!   carries where its segments start (`Row::segment_starts`).
//! - chunked (Hugging Face's `group_texts`): the ids concatenated without separators (no bos or
//!   eos), cut into rows of max_len, the remainder dropped; labels = input_ids.
//!
//! These in-memory functions are the definitions; `dataset::TokenDataset` builds the same rows
//! from a token cache one at a time, and tests hold the two equal.

use crate::model::loss::IGNORE_INDEX;

/// Special token ids (MiniMind: pad `<|endoftext|>` 0, bos `<|im_start|>` 1, eos `<|im_end|>` 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    pub pad: u32,
    pub bos: u32,
    pub eos: u32,
}

impl Default for SpecialTokens {
    fn default() -> Self {
        SpecialTokens {
            pad: 0,
            bos: 1,
            eos: 2,
        }
    }
}

/// One row of `max_len` input ids and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    /// packed-docs only: sorted positions where a segment begins, always holding 0. A document
    /// continued from the previous row is the segment at 0; the final row's padding tail is a
    /// segment of its own (reference::dataset::pack_docs's choice).
    pub segment_starts: Option<Vec<usize>>,
}

impl Row {
    pub fn new(input_ids: Vec<i64>, labels: Vec<i64>) -> Row {
        Row {
            input_ids,
            labels,
            segment_starts: None,
        }
    }

    /// For every position, the position of the first token of its segment (`seg_start`).
    pub fn seg_start(&self) -> Option<Vec<i32>> {
        let starts = self.segment_starts.as_ref()?;
        let mut out = Vec::with_capacity(self.input_ids.len());
        let mut s = 0usize;
        for t in 0..self.input_ids.len() {
            while s + 1 < starts.len() && starts[s + 1] <= t {
                s += 1;
            }
            out.push(starts.get(s).copied().unwrap_or(0) as i32);
        }
        Some(out)
    }
}

/// Which labels a loss counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counting {
    /// Causal LM (every layout): the shifted loss reads `labels[1..]`, so position 0 never counts.
    Shifted,
    /// Masked LM: the loss is unshifted, every position whose label is not -100 counts (the
    /// selected positions).
    Unshifted,
}

/// Labels of `row` that the shifted loss counts (`labels[1..] != -100`).
pub fn counted_labels(row: &Row) -> usize {
    count_labels(&row.labels, Counting::Shifted)
}

/// Labels a loss of `counting` counts in one row's labels.
pub fn count_labels(labels: &[i64], counting: Counting) -> usize {
    let skip = match counting {
        Counting::Shifted => 1,
        Counting::Unshifted => 0,
    };
    labels
        .iter()
        .skip(skip)
        .filter(|&&l| l != IGNORE_INDEX)
        .count()
}

/// The padded encoding of one document. Requires `max_len >= 2`.
pub fn padded_row(ids: &[u32], max_len: usize, sp: SpecialTokens) -> Row {
    assert!(max_len >= 2, "max_len must leave room for bos and eos");
    let keep = ids.len().min(max_len - 2);
    let mut input = Vec::with_capacity(max_len);
    input.push(sp.bos as i64);
    input.extend(ids[..keep].iter().map(|&i| i as i64));
    input.push(sp.eos as i64);
    input.resize(max_len, sp.pad as i64);
    let labels = input
        .iter()
        .map(|&i| if i == sp.pad as i64 { IGNORE_INDEX } else { i })
        .collect();
    Row::new(input, labels)
}

/// The packed rows of a stream of documents.
pub fn packed_rows(docs: &[Vec<u32>], max_len: usize, sp: SpecialTokens) -> Vec<Row> {
    assert!(max_len >= 1, "max_len must be positive");
    let stream: Vec<i64> = docs
        .iter()
        .flat_map(|d| d.iter().map(|&i| i as i64).chain([sp.eos as i64]))
        .collect();
    stream
        .chunks(max_len)
        .map(|c| {
            let mut input = c.to_vec();
            let mut labels = c.to_vec();
            input.resize(max_len, sp.pad as i64);
            labels.resize(max_len, IGNORE_INDEX);
            Row::new(input, labels)
        })
        .collect()
}

/// The packed-docs rows of a stream of documents (see the module doc).
pub fn packed_doc_rows(docs: &[Vec<u32>], max_len: usize, sp: SpecialTokens) -> Vec<Row> {
    assert!(max_len >= 1, "max_len must be positive");
    let mut stream: Vec<i64> = Vec::new();
    let mut is_start: Vec<bool> = Vec::new();
    for d in docs {
        stream.push(sp.bos as i64);
        is_start.push(true);
        stream.extend(d.iter().map(|&i| i as i64));
        stream.push(sp.eos as i64);
        is_start.resize(stream.len(), false);
    }
    stream
        .chunks(max_len)
        .zip(is_start.chunks(max_len))
        .map(|(c, starts)| {
            let mut segs: Vec<usize> = starts
                .iter()
                .enumerate()
                .filter(|(_, &s)| s)
                .map(|(t, _)| t)
                .collect();
            if segs.first() != Some(&0) {
                segs.insert(0, 0);
            }
            let mut labels: Vec<i64> = c
                .iter()
                .zip(starts)
                .map(|(&id, &s)| if s { IGNORE_INDEX } else { id })
                .collect();
            let mut input = c.to_vec();
            if c.len() < max_len {
                segs.push(c.len());
                input.resize(max_len, sp.pad as i64);
                labels.resize(max_len, IGNORE_INDEX);
            }
            Row {
                input_ids: input,
                labels,
                segment_starts: Some(segs),
            }
        })
        .collect()
}

/// Hugging Face's `group_texts`: the ids concatenated without separators, the remainder that
/// does not fill a row dropped, rows of `max_len`; labels = input_ids.
pub fn chunked_rows(docs: &[Vec<u32>], max_len: usize) -> Vec<Row> {
    assert!(max_len >= 1, "max_len must be positive");
    let stream: Vec<i64> = docs.iter().flatten().map(|&i| i as i64).collect();
    stream
        .chunks_exact(max_len)
        .map(|c| Row::new(c.to_vec(), c.to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_rows_ignore_pads_only() {
        let r = padded_row(&[5, 6, 7, 8], 5, SpecialTokens::default());
        assert_eq!(r.input_ids, vec![1, 5, 6, 7, 2]);
        let r = padded_row(&[5], 5, SpecialTokens::default());
        assert_eq!(r.input_ids, vec![1, 5, 2, 0, 0]);
        assert_eq!(r.labels, vec![1, 5, 2, -100, -100]);
    }

    #[test]
    fn packed_rows_keep_real_zero_tokens() {
        let rows = packed_rows(&[vec![0, 4], vec![5]], 3, SpecialTokens::default());
        assert_eq!(rows[0].input_ids, vec![0, 4, 2]);
        assert_eq!(rows[0].labels, vec![0, 4, 2]);
        assert_eq!(rows[1].input_ids, vec![5, 2, 0]);
        assert_eq!(rows[1].labels, vec![5, 2, -100]);
        assert_eq!(counted_labels(&rows[1]), 1);
    }

    #[test]
    fn packed_doc_rows_start_segments_at_documents_and_the_padding() {
        // stream: [1 10 11 2] [1 2] [1 20 21 22 23 2], rows of 5
        let rows = packed_doc_rows(
            &[vec![10, 11], vec![], vec![20, 21, 22, 23]],
            5,
            SpecialTokens::default(),
        );
        assert_eq!(rows[0].input_ids, vec![1, 10, 11, 2, 1]);
        assert_eq!(rows[0].labels, vec![-100, 10, 11, 2, -100]);
        assert_eq!(rows[0].segment_starts, Some(vec![0, 4]));
        assert_eq!(rows[0].seg_start(), Some(vec![0, 0, 0, 0, 4]));
        assert_eq!(rows[1].segment_starts, Some(vec![0, 1]));
        assert_eq!(rows[2].input_ids, vec![23, 2, 0, 0, 0]);
        assert_eq!(rows[2].labels, vec![23, 2, -100, -100, -100]);
        assert_eq!(rows[2].seg_start(), Some(vec![0, 0, 2, 2, 2]));
    }

    #[test]
    fn chunked_rows_drop_the_remainder_and_use_no_separators() {
        let rows = chunked_rows(&[vec![5, 6, 7], vec![8], vec![9, 10, 11]], 3);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].input_ids, vec![8, 9, 10]);
        assert_eq!(rows[1].labels, rows[1].input_ids);
        assert_eq!(count_labels(&rows[1].labels, Counting::Unshifted), 3);
        assert_eq!(count_labels(&rows[1].labels, Counting::Shifted), 2);
    }
}

//! Turning token ids into causal-LM rows (tokenisation itself happens outside).

use crate::loss::IGNORE_INDEX;

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

/// One training row: input ids and labels, both `max_len` long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
}

/// MiniMind PretrainDataset: `[bos] + ids[..max_len-2] + [eos]`, right-padded with pad;
/// labels = input_ids with -100 wherever the input equals pad. Requires max_len >= 2.
pub fn encode_padded(ids: &[u32], max_len: usize, sp: SpecialTokens) -> Row {
    assert!(max_len >= 2, "max_len must leave room for bos and eos");
    let keep = ids.len().min(max_len - 2);
    let mut input: Vec<i64> = Vec::with_capacity(max_len);
    input.push(sp.bos as i64);
    input.extend(ids[..keep].iter().map(|&i| i as i64));
    input.push(sp.eos as i64);
    input.resize(max_len, sp.pad as i64);
    let labels = input
        .iter()
        .map(|&i| if i == sp.pad as i64 { IGNORE_INDEX } else { i })
        .collect();
    Row {
        input_ids: input,
        labels,
    }
}

/// Packed mode (ours): every document followed by eos, all concatenated, cut into rows of
/// `max_len`; the last partial row is right-padded with pad and only that padding is labelled
/// -100 (a real token 0 inside a document keeps its label).
pub fn pack(docs: &[Vec<u32>], max_len: usize, sp: SpecialTokens) -> Vec<Row> {
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
            Row {
                input_ids: input,
                labels,
            }
        })
        .collect()
}

/// One packed row with its document boundaries, `max_len` long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedRow {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    /// Sorted positions where a segment begins; always holds 0. A document begun in an earlier
    /// row continues as the segment at 0; the padding tail of the last row is a segment of its
    /// own. Attention runs causally within segments
    /// ([`crate::attention::AttnMask::Segments`]).
    pub segment_starts: Vec<usize>,
    /// Tokens of the row's first document already placed in earlier rows (0 when a document
    /// starts at position 0): its true RoPE offset, should a consumer want continued positions.
    pub first_offset: usize,
}

/// Packed rows with document boundaries: each document is encoded as `[bos] + ids + [eos]`
/// (never truncated), all are concatenated in order and cut into rows of `max_len`; only the
/// tail of the last row is padding (pad id, label -100). Labels = input_ids except -100 on the
/// padding and at every position where a document starts (its bos: a document's first token is
/// never predicted from the previous document). A continued document's first token in a row
/// keeps its label; the shifted loss never reads position 0's label anyway.
pub fn pack_docs(docs: &[Vec<u32>], max_len: usize, sp: SpecialTokens) -> Vec<PackedRow> {
    assert!(max_len >= 1, "max_len must be positive");
    let mut stream: Vec<i64> = Vec::new();
    let mut doc_starts: Vec<usize> = Vec::with_capacity(docs.len());
    for d in docs {
        doc_starts.push(stream.len());
        stream.push(sp.bos as i64);
        stream.extend(d.iter().map(|&i| i as i64));
        stream.push(sp.eos as i64);
    }
    let mut rows = Vec::with_capacity(stream.len().div_ceil(max_len));
    let mut next_doc = 0; // first document starting at or after the current row
    for (r, chunk) in stream.chunks(max_len).enumerate() {
        let (lo, hi) = (r * max_len, r * max_len + chunk.len());
        let mut starts = Vec::new();
        let first_offset = if doc_starts.get(next_doc) == Some(&lo) {
            0
        } else {
            // the row begins inside the document that started last before it
            starts.push(0);
            lo - doc_starts[next_doc - 1]
        };
        let mut labels = chunk.to_vec();
        while next_doc < doc_starts.len() && doc_starts[next_doc] < hi {
            let at = doc_starts[next_doc] - lo;
            starts.push(at);
            labels[at] = IGNORE_INDEX;
            next_doc += 1;
        }
        let mut input = chunk.to_vec();
        if chunk.len() < max_len {
            starts.push(chunk.len());
            input.resize(max_len, sp.pad as i64);
            labels.resize(max_len, IGNORE_INDEX);
        }
        rows.push(PackedRow {
            input_ids: input,
            labels,
            segment_starts: starts,
            first_offset,
        });
    }
    rows
}

/// Hugging Face's `group_texts`: concatenate the tokenized texts (no separators), drop the
/// remainder that does not fill a block, cut into rows of `block_size`; labels = input_ids.
pub fn group_texts(texts: &[Vec<u32>], block_size: usize) -> Vec<Row> {
    assert!(block_size >= 1, "block_size must be positive");
    let stream: Vec<i64> = texts.iter().flatten().map(|&i| i as i64).collect();
    stream
        .chunks_exact(block_size)
        .map(|c| Row {
            input_ids: c.to_vec(),
            labels: c.to_vec(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{golden_seed004, read_json};

    #[test]
    fn group_texts_reproduces_the_seed_recipe_cases() {
        let j = read_json(&golden_seed004().join("components_seed004.json"));
        let cases = j["group_texts"].as_array().unwrap();
        assert!(!cases.is_empty());
        for c in cases {
            let texts: Vec<Vec<u32>> = serde_json::from_value(c["token_lists"].clone()).unwrap();
            let bs = c["block_size"].as_u64().unwrap() as usize;
            let ids: Vec<Vec<i64>> =
                serde_json::from_value(c["result"]["input_ids"].clone()).unwrap();
            let labels: Vec<Vec<i64>> =
                serde_json::from_value(c["result"]["labels"].clone()).unwrap();
            let rows = group_texts(&texts, bs);
            assert_eq!(
                rows.iter().map(|r| r.input_ids.clone()).collect::<Vec<_>>(),
                ids
            );
            assert_eq!(
                rows.iter().map(|r| r.labels.clone()).collect::<Vec<_>>(),
                labels
            );
        }
    }

    #[test]
    fn packed_docs_mark_every_document_start_and_continue_across_rows() {
        let sp = SpecialTokens::default();
        // stream: [1 10 11 2] [1 2] [1 20 21 22 23 2], rows of 5
        let rows = pack_docs(&[vec![10, 11], vec![], vec![20, 21, 22, 23]], 5, sp);
        let ids: Vec<_> = rows.iter().map(|r| r.input_ids.clone()).collect();
        assert_eq!(
            ids,
            vec![
                vec![1, 10, 11, 2, 1],
                vec![2, 1, 20, 21, 22],
                vec![23, 2, 0, 0, 0]
            ]
        );
        let starts: Vec<_> = rows.iter().map(|r| r.segment_starts.clone()).collect();
        assert_eq!(starts, vec![vec![0, 4], vec![0, 1], vec![0, 2]]);
        let offsets: Vec<_> = rows.iter().map(|r| r.first_offset).collect();
        assert_eq!(offsets, vec![0, 1, 4]);
        let labels: Vec<_> = rows.iter().map(|r| r.labels.clone()).collect();
        assert_eq!(
            labels,
            vec![
                vec![-100, 10, 11, 2, -100],
                vec![2, -100, 20, 21, 22],
                vec![23, 2, -100, -100, -100]
            ]
        );
    }
}

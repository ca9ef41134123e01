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

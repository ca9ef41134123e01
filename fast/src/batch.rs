//! Token ids to causal-LM batches: `input_ids` and `labels` `[B, T]` int64 tensors.
//!
//! - padded (MiniMind's PretrainDataset): `[bos] + ids[..max_len-2] + [eos]`, right-padded with
//!   pad; labels = input_ids with -100 wherever the input equals pad.
//! - packed (ours): every document followed by eos, all concatenated, cut into rows of max_len;
//!   only the final row's padding is labelled -100 (a real token equal to pad keeps its label).

use tch::{Device, Tensor};

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

/// One row of `max_len` input ids and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
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
    Row {
        input_ids: input,
        labels,
    }
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
            Row {
                input_ids: input,
                labels,
            }
        })
        .collect()
}

/// A batch on a device, with its counted labels (positions 1.. that are not -100) known on the host.
pub struct Batch {
    pub input_ids: Tensor,
    pub labels: Tensor,
    /// Labels the shifted loss counts: `labels[:, 1:] != -100`.
    pub count: usize,
}

impl Batch {
    /// Stacks equal-length rows into `[B, T]` tensors on `device`.
    pub fn from_rows(rows: &[Row], device: Device) -> Batch {
        assert!(!rows.is_empty(), "a batch needs at least one row");
        let t = rows[0].input_ids.len();
        assert!(
            rows.iter()
                .all(|r| r.input_ids.len() == t && r.labels.len() == t),
            "ragged rows"
        );
        let ids: Vec<i64> = rows
            .iter()
            .flat_map(|r| r.input_ids.iter().copied())
            .collect();
        let labels: Vec<i64> = rows.iter().flat_map(|r| r.labels.iter().copied()).collect();
        Batch::from_vecs(&ids, &labels, rows.len(), t, device)
    }

    /// Row-major `[b, t]` ids and labels.
    pub fn from_vecs(ids: &[i64], labels: &[i64], b: usize, t: usize, device: Device) -> Batch {
        assert_eq!(ids.len(), b * t);
        assert_eq!(labels.len(), b * t);
        let count = labels
            .chunks(t)
            .map(|r| r.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count())
            .sum();
        let shape = [b as i64, t as i64];
        Batch {
            input_ids: to_device_async(Tensor::from_slice(ids).reshape(shape), device),
            labels: to_device_async(Tensor::from_slice(labels).reshape(shape), device),
            count,
        }
    }
}

/// Host tensor to `device` without stalling the host: a copy from pageable memory waits for the
/// device's stream to drain (CUDA's rule for pageable copies), which would serialise every step's
/// kernel launches behind the previous step; from pinned memory the copy is queued like a kernel.
pub fn to_device_async(t: Tensor, device: Device) -> Tensor {
    match device {
        Device::Cuda(_) => match crate::fused::pin_memory(&t) {
            Ok(pinned) => pinned.to_device_(device, t.kind(), true, false),
            Err(_) => t.to_device(device),
        },
        _ => t.to_device(device),
    }
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
        let b = Batch::from_rows(&rows, Device::Cpu);
        assert_eq!(b.count, 3);
    }
}

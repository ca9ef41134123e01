//! Batches: row-major host batches (what the loader's workers build) and their `[B, T]` int64
//! tensors on the training device.

use tch::{Device, Tensor};

use super::rows::{count_labels, Counting, Row};
use crate::model::loss::IGNORE_INDEX;

/// One batch on the host: `rows` x `cols` row-major.
#[derive(Clone, Debug)]
pub struct HostBatch {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub rows: usize,
    pub cols: usize,
    /// Labels the loss counts (useful tokens): `labels[1..] != -100` per row for the causal
    /// layouts' shifted loss.
    pub counted_labels: usize,
}

impl HostBatch {
    /// Rows of a causal-LM layout (labels counted as the shifted loss reads them).
    pub fn from_rows(rows: &[Row], cols: usize) -> Self {
        Self::from_rows_counted(rows, cols, Counting::Shifted)
    }

    /// Rows whose labels a loss of `counting` reads.
    pub fn from_rows_counted(rows: &[Row], cols: usize, counting: Counting) -> Self {
        let mut input_ids = Vec::with_capacity(rows.len() * cols);
        let mut labels = Vec::with_capacity(rows.len() * cols);
        let mut counted = 0;
        for r in rows {
            input_ids.extend_from_slice(&r.input_ids);
            labels.extend_from_slice(&r.labels);
            counted += count_labels(&r.labels, counting);
        }
        Self {
            input_ids,
            labels,
            rows: rows.len(),
            cols,
            counted_labels: counted,
        }
    }
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
        Device::Cuda(_) => match crate::kernels::ops::pin_memory(&t) {
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
    fn a_batch_counts_the_labels_the_shifted_loss_sees() {
        let rows = crate::data::rows::packed_rows(
            &[vec![0, 4], vec![5]],
            3,
            crate::data::rows::SpecialTokens::default(),
        );
        let b = Batch::from_rows(&rows, Device::Cpu);
        assert_eq!(b.count, 3);
        assert_eq!(HostBatch::from_rows(&rows, 3).counted_labels, 3);
    }
}

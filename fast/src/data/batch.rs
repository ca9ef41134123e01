//! Batches: row-major host batches (what the loader's workers build) and their `[B, T]` int64
//! tensors on the training device, with the packed-docs layout's per-token segment starts
//! (`seg_start`, int32) beside them.

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
    /// packed-docs: for every token (row-major `[rows, cols]`), the position in its row of the
    /// first token of its segment (document); None for layouts without segments.
    pub seg_start: Option<Vec<i32>>,
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
        let mut seg_start: Option<Vec<i32>> = None;
        for r in rows {
            input_ids.extend_from_slice(&r.input_ids);
            labels.extend_from_slice(&r.labels);
            counted += count_labels(&r.labels, counting);
            if let Some(s) = r.seg_start() {
                seg_start
                    .get_or_insert_with(|| Vec::with_capacity(rows.len() * cols))
                    .extend_from_slice(&s);
            }
        }
        Self {
            input_ids,
            labels,
            rows: rows.len(),
            cols,
            seg_start,
            counted_labels: counted,
        }
    }
}

/// A batch on a device, with its counted labels (positions 1.. that are not -100) known on the host.
pub struct Batch {
    pub input_ids: Tensor,
    pub labels: Tensor,
    /// Labels the loss counts (the host batch's `counted_labels`; for `from_vecs`,
    /// `labels[:, 1:] != -100`).
    pub count: usize,
    /// Packed rows with document boundaries: int32 `[B, T]`, for every token the row index of
    /// the first token of its document (attention stays within it, RoPE positions restart).
    pub seg_start: Option<Tensor>,
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

    /// A host batch on `device`: ids, labels and (packed-docs) seg_start, copied the same way.
    pub fn from_host(hb: &HostBatch, device: Device) -> Batch {
        let shape = [hb.rows as i64, hb.cols as i64];
        let mut b = Batch::from_vecs(&hb.input_ids, &hb.labels, hb.rows, hb.cols, device);
        b.count = hb.counted_labels;
        b.seg_start = hb
            .seg_start
            .as_ref()
            .map(|s| to_device_async(Tensor::from_slice(s).reshape(shape), device));
        b
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
            seg_start: None,
        }
    }

    /// The batch with its rows' segment starts (row-major `[B, T]`).
    pub fn with_segments(mut self, seg_start: &[i32], device: Device) -> Batch {
        let shape = self.input_ids.size();
        self.seg_start = Some(to_device_async(
            Tensor::from_slice(seg_start).reshape(shape.as_slice()),
            device,
        ));
        self
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

    #[test]
    fn packed_doc_batches_carry_int32_seg_start_to_the_device() {
        let rows = crate::data::rows::packed_doc_rows(
            &[vec![7, 8], vec![9]],
            4,
            crate::data::rows::SpecialTokens::default(),
        );
        // rows: [1 7 8 2] [1 9 2 pad]
        let hb = HostBatch::from_rows(&rows, 4);
        assert_eq!(hb.seg_start, Some(vec![0, 0, 0, 0, 0, 0, 0, 3]));
        // Shifted counting: 7 8 2 of row 0; 9 2 of row 1 (bos and padding are -100).
        assert_eq!(hb.counted_labels, 5);
        let b = Batch::from_host(&hb, Device::Cpu);
        let s = b.seg_start.expect("packed-docs batches carry seg_start");
        assert_eq!(s.kind(), tch::Kind::Int);
        assert_eq!(s.size(), vec![2, 4]);
        assert_eq!(
            Vec::<i32>::try_from(s.reshape([-1])).unwrap(),
            hb.seg_start.unwrap()
        );
        assert_eq!(b.count, 5);
        let plain = HostBatch::from_rows(
            &crate::data::rows::packed_rows(&[vec![7]], 4, Default::default()),
            4,
        );
        assert!(plain.seg_start.is_none());
    }
}

//! Cross-entropy over labels != -100: shifted for causal LM (`logits[:, :-1]` against
//! `labels[:, 1:]`), unshifted for masked LM (`logits[b, t]` against `labels[b, t]`).

use ndarray::{Array3, ArrayView2, ArrayView3};

/// The label value that is never counted.
pub const IGNORE_INDEX: i64 = -100;

/// logits: [B, T, V], labels: [B, T] -> (mean loss, counted labels, dlogits [B, T, V]).
///
/// dlogits is d(mean loss)/d(logits); position T-1 never predicts and gets zero gradient.
/// With no counted label the loss is 0 and dlogits all zero (PyTorch would give NaN).
pub fn cross_entropy(
    logits: ArrayView3<f64>,
    labels: ArrayView2<i64>,
) -> (f64, usize, Array3<f64>) {
    mean_cross_entropy(logits, labels, 1)
}

/// Masked-LM loss: logits [B, T, V] at position t against labels [B, T] at t (no shift),
/// mean over labels != -100 -> (mean loss, counted labels, dlogits [B, T, V]). No counted label:
/// loss 0 and zero gradient, as for [`cross_entropy`].
pub fn cross_entropy_unshifted(
    logits: ArrayView3<f64>,
    labels: ArrayView2<i64>,
) -> (f64, usize, Array3<f64>) {
    mean_cross_entropy(logits, labels, 0)
}

/// Logits at t predict the label at t + shift.
fn mean_cross_entropy(
    logits: ArrayView3<f64>,
    labels: ArrayView2<i64>,
    shift: usize,
) -> (f64, usize, Array3<f64>) {
    let (b, t, v) = logits.dim();
    let mut dlogits = Array3::zeros((b, t, v));
    let mut total = 0.0;
    let mut count = 0usize;
    for bi in 0..b {
        for ti in 0..t.saturating_sub(shift) {
            let y = labels[[bi, ti + shift]];
            if y == IGNORE_INDEX {
                continue;
            }
            assert!(
                y >= 0 && (y as usize) < v,
                "label {y} outside vocabulary of {v}"
            );
            let row = logits.slice(ndarray::s![bi, ti, ..]);
            let m = row.fold(f64::NEG_INFINITY, |a, &x| a.max(x));
            let lse = m + row.mapv(|x| (x - m).exp()).sum().ln();
            total += lse - row[y as usize];
            let mut d = dlogits.slice_mut(ndarray::s![bi, ti, ..]);
            d.assign(&row.mapv(|x| (x - lse).exp()));
            d[y as usize] -= 1.0;
            count += 1;
        }
    }
    if count == 0 {
        return (0.0, 0, dlogits);
    }
    dlogits /= count as f64;
    (total / count as f64, count, dlogits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, Array3};

    #[test]
    fn unshifted_loss_scores_each_position_against_its_own_label() {
        // logits favour token t at position t: the unshifted loss is low, the shifted one high
        let logits = Array3::from_shape_fn((1, 3, 3), |(_, t, v)| if t == v { 5.0 } else { 0.0 });
        let labels = Array2::from_shape_vec((1, 3), vec![0, IGNORE_INDEX, 2]).unwrap();
        let (l, count, d) = cross_entropy_unshifted(logits.view(), labels.view());
        assert_eq!(count, 2);
        let expected = (2.0f64 + 5f64.exp()).ln() - 5.0;
        assert!((l - expected).abs() < 1e-15);
        assert!(d.slice(ndarray::s![0, 1, ..]).iter().all(|&g| g == 0.0));
        let (shifted, c2, _) = cross_entropy(logits.view(), labels.view());
        assert_eq!(c2, 1);
        assert!(shifted > l);
    }
}

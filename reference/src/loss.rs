//! Shifted causal-LM cross-entropy: `logits[:, :-1]` against `labels[:, 1:]`, -100 ignored.

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
    let (b, t, v) = logits.dim();
    let mut dlogits = Array3::zeros((b, t, v));
    let mut total = 0.0;
    let mut count = 0usize;
    for bi in 0..b {
        for ti in 0..t.saturating_sub(1) {
            let y = labels[[bi, ti + 1]];
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

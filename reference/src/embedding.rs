//! Token embedding lookup (the same matrix is the tied lm_head).

use ndarray::{Array2, ArrayView2, Axis};

/// ids: [N] token ids, table: [V, C] -> [N, C]. Panics on an id outside the vocabulary.
pub fn forward(ids: &[i64], table: ArrayView2<f64>) -> Array2<f64> {
    let rows: Vec<usize> = ids.iter().map(|&i| checked(i, table.nrows())).collect();
    table.select(Axis(0), &rows)
}

/// dy: [N, C] -> dtable [V, C] (scatter-add of rows; repeated ids accumulate).
pub fn backward(dy: ArrayView2<f64>, ids: &[i64], vocab: usize) -> Array2<f64> {
    let mut dt = Array2::zeros((vocab, dy.ncols()));
    for (n, &id) in ids.iter().enumerate() {
        let mut row = dt.row_mut(checked(id, vocab));
        row += &dy.row(n);
    }
    dt
}

fn checked(id: i64, vocab: usize) -> usize {
    assert!(
        id >= 0 && (id as usize) < vocab,
        "token id {id} outside vocabulary of {vocab}"
    );
    id as usize
}

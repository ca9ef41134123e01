//! Bias-free linear layer `y = x W^T` (PyTorch `nn.Linear(bias=False)` weight layout).

use ndarray::{Array2, ArrayView2};

/// x: [N, in], w: [out, in] -> [N, out]. Backward needs x and w.
pub fn forward(x: ArrayView2<f64>, w: ArrayView2<f64>) -> Array2<f64> {
    x.dot(&w.t())
}

/// dy: [N, out] -> (dx [N, in], dw [out, in]).
pub fn backward(
    dy: ArrayView2<f64>,
    x: ArrayView2<f64>,
    w: ArrayView2<f64>,
) -> (Array2<f64>, Array2<f64>) {
    (dy.dot(&w), dy.t().dot(&x))
}

//! RMSNorm: `y = w * x / sqrt(mean(x^2) + eps)` over the last axis.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis};

/// x: [N, C], w: [C] -> (y [N, C], rstd [N] = 1/sqrt(mean(x^2)+eps), cached for backward).
pub fn forward(x: ArrayView2<f64>, w: ArrayView1<f64>, eps: f64) -> (Array2<f64>, Array1<f64>) {
    let rstd = x.map_axis(Axis(1), |r| 1.0 / (r.dot(&r) / r.len() as f64 + eps).sqrt());
    let y = &x * &rstd.view().insert_axis(Axis(1)) * w;
    (y, rstd)
}

/// dy: [N, C] -> (dx [N, C], dw [C]), using the cached x and rstd.
///
/// With g = w*dy and r = rstd: dx = r*g - x * r^3 * mean(g*x).
pub fn backward(
    dy: ArrayView2<f64>,
    x: ArrayView2<f64>,
    w: ArrayView1<f64>,
    rstd: ArrayView1<f64>,
) -> (Array2<f64>, Array1<f64>) {
    let r = rstd.insert_axis(Axis(1));
    let dw = (&dy * &x * r).sum_axis(Axis(0));
    let g = &dy * &w;
    let c = x.ncols() as f64;
    let gx = (&g * &x).sum_axis(Axis(1)).insert_axis(Axis(1)) / c;
    let dx = &g * &r - &x * &(&r * &r * r * &gx);
    (dx, dw)
}

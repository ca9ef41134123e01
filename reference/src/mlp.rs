//! SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.

use ndarray::{Array2, ArrayView2};

use crate::linear;

/// Weights of one SwiGLU block: gate/up [F, C], down [C, F].
pub struct MlpWeights<'a> {
    pub gate: ArrayView2<'a, f64>,
    pub up: ArrayView2<'a, f64>,
    pub down: ArrayView2<'a, f64>,
}

/// What backward needs: the input and the pre-activations.
pub struct MlpCache {
    pub x: Array2<f64>,
    pub g: Array2<f64>,
    pub u: Array2<f64>,
    pub h: Array2<f64>,
}

fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// x: [N, C] -> [N, C]; caches x, g = x Wg^T, u = x Wu^T, h = silu(g)*u (all [N, F]).
pub fn forward(x: ArrayView2<f64>, w: &MlpWeights) -> (Array2<f64>, MlpCache) {
    let g = linear::forward(x, w.gate);
    let u = linear::forward(x, w.up);
    let h = g.mapv(|v| v * sigmoid(v)) * &u;
    let y = linear::forward(h.view(), w.down);
    let cache = MlpCache {
        x: x.to_owned(),
        g,
        u,
        h,
    };
    (y, cache)
}

/// Gradients of one SwiGLU block, in (gate, up, down) order.
pub struct MlpGrads {
    pub gate: Array2<f64>,
    pub up: Array2<f64>,
    pub down: Array2<f64>,
}

/// dy: [N, C] -> (dx [N, C], weight grads).
pub fn backward(dy: ArrayView2<f64>, w: &MlpWeights, c: &MlpCache) -> (Array2<f64>, MlpGrads) {
    let (dh, ddown) = linear::backward(dy, c.h.view(), w.down);
    let silu = c.g.mapv(|v| v * sigmoid(v));
    let dsilu = c.g.mapv(|v| {
        let s = sigmoid(v);
        s * (1.0 + v * (1.0 - s))
    });
    let du = &dh * &silu;
    let dg = &dh * &c.u * &dsilu;
    let (dx_g, dgate) = linear::backward(dg.view(), c.x.view(), w.gate);
    let (dx_u, dup) = linear::backward(du.view(), c.x.view(), w.up);
    let grads = MlpGrads {
        gate: dgate,
        up: dup,
        down: ddown,
    };
    (dx_g + dx_u, grads)
}

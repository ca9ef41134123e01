//! SwiGLU MLP: `down(silu(gate(x)) * up(x))`.

use tch::{Kind, Tensor};

use super::linear;

pub struct Mlp {
    /// [F, d]
    pub gate_proj: Tensor,
    /// [F, d]
    pub up_proj: Tensor,
    /// [d, F]
    pub down_proj: Tensor,
}

impl Mlp {
    /// x `[..., d]` -> `[..., d]` in `compute` kind.
    pub fn forward(&self, x: &Tensor, compute: Kind) -> Tensor {
        let x = super::to_kind(x, compute);
        let g = linear(&x, &self.gate_proj, compute).silu();
        let u = linear(&x, &self.up_proj, compute);
        linear(&(g * u), &self.down_proj, compute)
    }

    pub fn parameters(&self) -> [&Tensor; 3] {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
    }
}

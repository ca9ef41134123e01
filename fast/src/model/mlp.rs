//! SwiGLU MLP: `down(silu(gate(x)) * up(x))`.

use tch::{Kind, Tensor};

use super::{bf16_operand, expect, linear};
use crate::kernels::{fused, Kernels};

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

    /// [`Self::forward`] for the dense model: on CUDA in bf16 with the fused kernels, gate and
    /// up as one matmul against `cat([gate_proj, up_proj])` in bf16 (whose backward can
    /// accumulate both parameters' gradients) and the fused SwiGLU kernel on its `[g | u]`
    /// output: one pass over the `[N, 2F]` tensor each way instead of silu, mul and their
    /// backward kernels. Same values as `forward` up to the matmul's summation order.
    pub fn forward_fused(&self, x: &Tensor, compute: Kind, k: &Kernels) -> Tensor {
        let f = self.gate_proj.size()[0];
        if !k.swiglu_applies(x, f, compute) {
            return self.forward(x, compute);
        }
        let x = super::to_kind(x, compute);
        let w_gu = bf16_operand(&[&self.gate_proj, &self.up_proj], k);
        let gu = x.linear::<Tensor>(&w_gu, None);
        let h = expect("swiglu", fused::swiglu(&gu, f));
        h.linear::<Tensor>(&bf16_operand(&[&self.down_proj], k), None)
    }

    pub fn parameters(&self) -> [&Tensor; 3] {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
    }
}

//! RMSNorm: `w * x / sqrt(mean(x^2) + eps)`, the normalisation computed in fp32 whatever the
//! input's kind (fp64 included) and cast back to the input's kind before the weight multiplies
//! it: MiniMind's `self.weight * self._norm(x.float()).type_as(x)`. The golden fixtures were made
//! by a float64 model and still carry these fp32 roundings (about 1e-7 relative).

use tch::{nn, Kind, Tensor};

use super::expect;
use crate::kernels::{fused, Kernels};

pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(p: &nn::Path, dim: i64, eps: f64) -> Self {
        RmsNorm {
            weight: p.var("weight", &[dim], nn::Init::Const(1.0)),
            eps,
        }
    }

    /// x `[..., dim]` -> same shape.
    pub fn forward(&self, x: &Tensor, k: &Kernels) -> Tensor {
        rms_norm(x, &self.weight, self.eps, k)
    }

    /// The norm of x as the input of projections running in `compute` kind. With the fused
    /// kernels one kernel writes the bf16 the projections would cast it to (same values: the
    /// fp32 norm rounded once); otherwise [`Self::forward`], and the projection casts.
    pub fn forward_for_matmul(&self, x: &Tensor, compute: Kind, k: &Kernels) -> Tensor {
        if k.rms_norm_applies(x, &self.weight, compute) {
            return expect(
                "rms_norm_bf16",
                fused::rms_norm_bf16(x, &self.weight, self.eps),
            );
        }
        self.forward(x, k)
    }

    /// `h = x + a` (a residual branch's output, when there is one) and the norm of h for the
    /// projections: `(h, norm)`. With the fused kernels and a bf16 branch output the add happens
    /// inside the norm's kernel (and its backward adds h's two gradients in the same pass).
    pub fn add_forward_for_matmul(
        &self,
        x: &Tensor,
        a: Option<Tensor>,
        compute: Kind,
        k: &Kernels,
    ) -> (Tensor, Tensor) {
        let Some(a) = a else {
            return (x.shallow_clone(), self.forward_for_matmul(x, compute, k));
        };
        if k.add_rms_norm_applies(x, &a, &self.weight, compute) {
            return expect(
                "add_rms_norm_bf16",
                fused::add_rms_norm_bf16(x, &a, &self.weight, self.eps),
            );
        }
        let h = x + a;
        let y = self.forward_for_matmul(&h, compute, k);
        (h, y)
    }
}

/// RMSNorm over the last dimension (see the module doc for the kinds).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, k: &Kernels) -> Tensor {
    // fp32 input and weight (the residual stream under mixed precision): the cast-back is a
    // no-op, so MiniMind's formula is exactly `x * rsqrt(mean(x^2) + eps) * w`, libtorch's op.
    if k.libtorch_rms_norm_applies(x, w) {
        let d = *x
            .size()
            .last()
            .expect("rms_norm input has a last dimension");
        return x.rms_norm([d], Some(w), eps);
    }
    let f = Kind::Float;
    let xf = super::to_kind(x, f);
    let ms = xf.square().mean_dim(-1, true, f);
    let y = xf * (ms + eps).rsqrt();
    let y = if y.kind() == x.kind() {
        y
    } else {
        y.to_kind(x.kind())
    };
    w * y
}

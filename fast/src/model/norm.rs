//! RMSNorm: `w * x / sqrt(mean(x^2) + eps)`, the normalisation computed in fp32 whatever the
//! input's kind (fp64 included) and cast back to the input's kind before the weight multiplies
//! it: MiniMind's `self.weight * self._norm(x.float()).type_as(x)`. The golden fixtures were made
//! by a float64 model and still carry these fp32 roundings (about 1e-7 relative).

use tch::{nn, Kind, Tensor};

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
    pub fn forward(&self, x: &Tensor) -> Tensor {
        rms_norm(x, &self.weight, self.eps)
    }

    /// Whether the fused kernels take this norm: fp32 x and weight on CUDA, bf16 compute, a
    /// width the kernels handle (a multiple of 8 up to 1024), the fused path enabled.
    fn fused_applies(&self, x: &Tensor, compute: Kind) -> bool {
        let d = self.weight.size().first().copied().unwrap_or(0);
        compute == Kind::BFloat16
            && x.kind() == Kind::Float
            && self.weight.kind() == Kind::Float
            && x.device().is_cuda()
            && d % 8 == 0
            && d <= 1024
            && super::fused::enabled()
    }

    /// The norm of x as the input of projections running in `compute` kind. With the fused
    /// kernels (fp32 x and weight on CUDA, bf16 compute, width a multiple of 8 up to 1024), one
    /// kernel writes the bf16 the projections would cast it to (same values: the fp32 norm
    /// rounded once); otherwise [`Self::forward`], and the projection casts.
    pub fn forward_for_matmul(&self, x: &Tensor, compute: Kind) -> Tensor {
        if self.fused_applies(x, compute) {
            return super::fused::expect(
                "rms_norm_bf16",
                super::fused::rms_norm_bf16(x, &self.weight, self.eps),
            );
        }
        self.forward(x)
    }

    /// `h = x + a` (a residual branch's output, when there is one) and the norm of h for the
    /// projections: `(h, norm)`. With the fused kernels and a bf16 branch output the add happens
    /// inside the norm's kernel (and its backward adds h's two gradients in the same pass).
    pub fn add_forward_for_matmul(
        &self,
        x: &Tensor,
        a: Option<Tensor>,
        compute: Kind,
    ) -> (Tensor, Tensor) {
        let Some(a) = a else {
            return (x.shallow_clone(), self.forward_for_matmul(x, compute));
        };
        if self.fused_applies(x, compute) && a.kind() == Kind::BFloat16 && x.size() == a.size() {
            return super::fused::expect(
                "add_rms_norm_bf16",
                super::fused::add_rms_norm_bf16(x, &a, &self.weight, self.eps),
            );
        }
        let h = x + a;
        let y = self.forward_for_matmul(&h, compute);
        (h, y)
    }
}

/// Whether fp32 inputs on CUDA take libtorch's `rms_norm` (one fused kernel forward and one
/// backward instead of six and about ten). `MM_FUSED_RMSNORM=0` turns it off, so `fast bench`
/// can time both in one session.
fn fused_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MM_FUSED_RMSNORM").map_or(true, |v| v != "0"))
}

/// RMSNorm over the last dimension (see the module doc for the kinds).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    // fp32 input and weight (the residual stream under mixed precision): the cast-back is a
    // no-op, so MiniMind's formula is exactly `x * rsqrt(mean(x^2) + eps) * w`, libtorch's op.
    if x.kind() == Kind::Float && w.kind() == Kind::Float && x.device().is_cuda() && fused_enabled()
    {
        let d = *x
            .size()
            .last()
            .expect("rms_norm input has a last dimension");
        return x.rms_norm([d], Some(w), eps);
    }
    let k = Kind::Float;
    let xf = if x.kind() == k {
        x.shallow_clone()
    } else {
        x.to_kind(k)
    };
    let ms = xf.square().mean_dim(-1, true, k);
    let y = xf * (ms + eps).rsqrt();
    let y = if y.kind() == x.kind() {
        y
    } else {
        y.to_kind(x.kind())
    };
    w * y
}

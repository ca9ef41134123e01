//! Gradient clipping by joint L2 norm (`torch.nn.utils.clip_grad_norm_`), on the device.
//!
//! total = ||all gradients||_2 jointly; coef = max_norm / (total + 1e-6), clamped to 1; every
//! gradient is multiplied by coef (a no-op multiply by 1 when below the threshold, so there is no
//! data-dependent branch and no host sync). Returns the total before clipping as a device scalar.

use anyhow::Result;
use tch::{Kind, Tensor};

/// Multi-tensor version (`_foreach_norm` + `_foreach_mul_`): a few launches for all gradients.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<Tensor> {
    crate::kernels::ops::clip_grad_norm(grads, max_norm)
}

/// Per-tensor version of the same arithmetic (fallback and cross-check).
pub fn clip_grad_norm_plain(grads: &[Tensor], max_norm: f64) -> Tensor {
    let _guard = tch::no_grad_guard();
    let k = grads
        .first()
        .map(|g| crate::model::upcast_kind(g.kind()))
        .unwrap_or(Kind::Float);
    let sq: Vec<Tensor> = grads.iter().map(|g| g.to_kind(k).square().sum(k)).collect();
    let total = Tensor::stack(&sq, 0).sum(k).sqrt();
    let coef = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
    for g in grads {
        let mut g = g.shallow_clone();
        let _ = g.g_mul_(&coef.to_kind(g.kind()));
    }
    total
}

//! Gradient clipping by joint L2 norm (`torch.nn.utils.clip_grad_norm_`).

use crate::Params;

/// L2 norm over every gradient jointly.
pub fn total_norm(grads: &Params) -> f64 {
    grads
        .values()
        .map(|g| g.iter().map(|v| v * v).sum::<f64>())
        .sum::<f64>()
        .sqrt()
}

/// coef = max_norm / (total + 1e-6); if coef < 1 every gradient is multiplied by it.
/// Returns the total norm before clipping.
pub fn clip_grad_norm(grads: &mut Params, max_norm: f64) -> f64 {
    let total = total_norm(grads);
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        grads.values_mut().for_each(|g| *g *= coef);
    }
    total
}

//! Learning-rate schedule: MiniMind's cosine with a 10% floor, optional linear warmup (ours).

use std::f64::consts::PI;

/// MiniMind `get_lr`: `base * (0.1 + 0.45 * (1 + cos(pi * step / total)))`, step and total in
/// micro-steps, step counted from 1 within the run. `base` at step 0, `0.1 * base` at `total`.
pub fn cosine_lr(step: u64, total: u64, base: f64) -> f64 {
    base * (0.1 + 0.45 * (1.0 + (PI * step as f64 / total as f64).cos()))
}

/// With `warmup > 0`, steps below `warmup` ramp linearly from 0 to the cosine value at `warmup`;
/// from `warmup` on it is [`cosine_lr`]. `warmup == 0` (the default) is MiniMind's schedule.
pub fn lr_at(step: u64, total: u64, base: f64, warmup: u64) -> f64 {
    if warmup > 0 && step < warmup {
        cosine_lr(warmup, total, base) * step as f64 / warmup as f64
    } else {
        cosine_lr(step, total, base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_from_base_to_a_tenth() {
        assert!((cosine_lr(0, 100, 1.0) - 1.0).abs() < 1e-15);
        assert!((cosine_lr(100, 100, 1.0) - 0.1).abs() < 1e-15);
        assert_eq!(lr_at(7, 100, 1.0, 0), cosine_lr(7, 100, 1.0));
        assert!(lr_at(5, 100, 1.0, 10) < cosine_lr(10, 100, 1.0));
    }
}

//! Learning-rate schedule: MiniMind's cosine with a 10% floor, optional linear warmup (ours).

use std::f64::consts::PI;

/// MiniMind `get_lr`: `base * (0.1 + 0.45 * (1 + cos(pi * step / total)))`.
/// Runs from `base` at step 0 to `0.1 * base` at step == total.
pub fn cosine_lr(step: u64, total: u64, base: f64) -> f64 {
    base * (0.1 + 0.45 * (1.0 + (PI * step as f64 / total as f64).cos()))
}

/// With `warmup > 0`, steps below `warmup` ramp linearly from 0 to the cosine value at
/// `warmup` (`cosine_lr(warmup) * step / warmup`); from `warmup` on it is [`cosine_lr`].
/// `warmup == 0` (the default) is exactly MiniMind's schedule.
pub fn lr_at(step: u64, total: u64, base: f64, warmup: u64) -> f64 {
    if warmup > 0 && step < warmup {
        cosine_lr(warmup, total, base) * step as f64 / warmup as f64
    } else {
        cosine_lr(step, total, base)
    }
}

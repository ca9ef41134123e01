//! Learning-rate schedules: MiniMind's cosine with a 10% floor and optional linear warmup (ours),
//! transformers' linear warmup then linear decay to 0, and warmup-stable-decay.
//!
//! The cosine counts micro-steps from 1, as MiniMind's loop does. Linear and WSD take the
//! optimizer step k = 0, 1, ... (the rate the k-th optimizer step uses, as transformers'
//! `LambdaLR` stepped once per optimizer step gives it), their warmup counted in optimizer steps.

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

/// Which schedule a run follows.
#[derive(Clone, Copy, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Schedule {
    /// MiniMind's: from the base rate down to a tenth of it over the run, per micro-step.
    #[default]
    Cosine,
    /// transformers' `get_linear_schedule_with_warmup`.
    Linear,
    /// Warmup, the base rate, then a linear decay over the last `decay_fraction` of the
    /// optimizer steps to `min_ratio` of the base rate.
    Wsd { decay_fraction: f64, min_ratio: f64 },
}

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

/// transformers' linear schedule at optimizer step k of `total`: `base * k / max(1, warmup)`
/// below `warmup`, then `base * max(0, (total - k) / max(1, total - warmup))` (base at k =
/// warmup, 0 from k = total on).
pub fn linear_lr(k: u64, total: u64, base: f64, warmup: u64) -> f64 {
    if k < warmup {
        return base * (k as f64 / warmup.max(1) as f64);
    }
    let remaining = total as f64 - k as f64;
    base * (remaining / total.saturating_sub(warmup).max(1) as f64).max(0.0)
}

/// Warmup-stable-decay at optimizer step k of `total`: `base * k / warmup` below `warmup`, `base`
/// until the decay starts at `total - decay` (`decay = min(round(decay_fraction * total), total -
/// warmup)` steps), then `base * (min_ratio + (1 - min_ratio) * (total - k) / decay)` down to
/// `min_ratio * base` at k = total and after.
pub fn wsd_lr(
    k: u64,
    total: u64,
    base: f64,
    warmup: u64,
    decay_fraction: f64,
    min_ratio: f64,
) -> f64 {
    let warmup = warmup.min(total);
    let decay = ((decay_fraction * total as f64).round() as u64).min(total - warmup);
    let decay_start = total - decay;
    if k < warmup {
        base * k as f64 / warmup as f64
    } else if k < decay_start {
        base
    } else if k < total {
        base * (min_ratio + (1.0 - min_ratio) * (total - k) as f64 / decay as f64)
    } else {
        base * min_ratio
    }
}

impl Schedule {
    /// The rate of 1-based micro-step `global` of a run of `epochs` epochs of `iters` micro-steps
    /// with an optimizer step every `accum` micro-steps (and at each epoch's end).
    pub fn lr(
        self,
        global: u64,
        iters: u64,
        epochs: u64,
        accum: u64,
        base: f64,
        warmup: u64,
    ) -> f64 {
        let total = iters * epochs;
        // The optimizer step the micro-step's window ends in: windows restart every epoch.
        let per_epoch = iters.div_ceil(accum);
        let k = |g: u64| {
            let (epoch, step) = ((g - 1) / iters, (g - 1) % iters);
            epoch * per_epoch + step / accum
        };
        let opt_total = epochs * per_epoch;
        match self {
            Schedule::Cosine => lr_at(global, total, base, warmup),
            Schedule::Linear => linear_lr(k(global), opt_total, base, warmup),
            Schedule::Wsd {
                decay_fraction,
                min_ratio,
            } => wsd_lr(
                k(global),
                opt_total,
                base,
                warmup,
                decay_fraction,
                min_ratio,
            ),
        }
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

    /// transformers: 0 at k = 0, the base rate at k = warmup, 0 at k = total.
    #[test]
    fn linear_warms_up_then_decays_to_zero() {
        assert_eq!(linear_lr(0, 100, 1.0, 10), 0.0);
        assert_eq!(linear_lr(10, 100, 1.0, 10), 1.0);
        assert_eq!(linear_lr(100, 100, 1.0, 10), 0.0);
        assert_eq!(linear_lr(120, 100, 1.0, 10), 0.0);
        assert_eq!(linear_lr(55, 100, 1.0, 10), 0.5);
    }

    #[test]
    fn wsd_holds_the_base_rate_then_decays_to_its_floor() {
        let f = |k| wsd_lr(k, 100, 1.0, 10, 0.2, 0.1);
        assert_eq!((f(0), f(5), f(10), f(79)), (0.0, 0.5, 1.0, 1.0));
        assert_eq!(f(80), 1.0);
        assert!((f(90) - 0.55).abs() < 1e-15);
        assert_eq!((f(100), f(150)), (0.1, 0.1));
    }

    /// Every micro-step of a window shares its optimizer step's rate; windows restart per epoch.
    #[test]
    fn optimizer_step_schedules_count_windows_per_epoch() {
        // 5 micro-steps an epoch, accumulation 2: windows {1,2} {3,4} {5}, 3 optimizer steps.
        let lr = |g| Schedule::Linear.lr(g, 5, 2, 2, 1.0, 0);
        assert_eq!(lr(1), lr(2));
        assert_eq!(lr(5), (6.0 - 2.0) / 6.0); // k = 2 of 6 optimizer steps
        assert_eq!(lr(6), (6.0 - 3.0) / 6.0);
        assert_eq!(
            Schedule::Cosine.lr(7, 5, 2, 2, 1.0, 0),
            cosine_lr(7, 10, 1.0)
        );
    }
}

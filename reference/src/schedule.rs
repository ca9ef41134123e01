//! Learning-rate schedules: MiniMind's cosine with a 10% floor and optional linear warmup (ours);
//! transformers' linear warmup + linear decay; warmup-stable-decay.
//!
//! Step conventions differ on purpose: MiniMind's cosine counts micro-steps from 1 (as its loop
//! does); the two schedules below take the optimizer step k = 0, 1, ... (the lr the k-th
//! `optimizer.step()` uses, as a `LambdaLR` stepped after every optimizer step gives it).

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

/// transformers' `get_linear_schedule_with_warmup`: the lr of optimizer step k =
/// `base * k / max(1, warmup)` for k < warmup, else
/// `base * max(0, (total - k) / max(1, total - warmup))`. 0 at k = 0 (when warmup > 0), base at
/// k = warmup, 0 from k = total on.
pub fn linear_with_warmup(step: u64, warmup: u64, total: u64, base: f64) -> f64 {
    let factor = if step < warmup {
        step as f64 / warmup.max(1) as f64
    } else {
        let left = total as f64 - step as f64;
        (left / (total.saturating_sub(warmup)).max(1) as f64).max(0.0)
    };
    base * factor
}

/// Warmup-stable-decay, optimizer step k = 0, 1, ...: with
/// `decay = min(total - warmup, round(decay_frac * total))` steps of decay starting at
/// `d0 = total - decay`:
/// - k < warmup: `base * k / warmup` (0 at k = 0);
/// - warmup <= k < d0: `base`;
/// - d0 <= k < total: `base * (min_ratio + (1 - min_ratio) * (total - k) / decay)`, which is
///   `base` at k = d0 and falls linearly;
/// - k >= total: `min_ratio * base` (the value the decay line reaches at k = total).
///
/// So the last step of a `total`-step run (k = total - 1) uses
/// `base * (min_ratio + (1 - min_ratio) / decay)`. Requires warmup <= total.
pub fn wsd(step: u64, total: u64, base: f64, warmup: u64, decay_frac: f64, min_ratio: f64) -> f64 {
    assert!(
        warmup <= total,
        "warmup {warmup} longer than the run {total}"
    );
    let decay = ((decay_frac * total as f64).round() as u64).min(total - warmup);
    let d0 = total - decay;
    if step < warmup {
        base * step as f64 / warmup as f64
    } else if step < d0 {
        base
    } else if step < total {
        base * (min_ratio + (1.0 - min_ratio) * (total - step) as f64 / decay as f64)
    } else {
        min_ratio * base
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{golden_seed004, read_json};

    /// transformers computes `base_lr * lambda(k)` with the same f64 operations (integer
    /// difference, one division, one product), so the values agree bit for bit.
    #[test]
    fn linear_with_warmup_reproduces_transformers_for_every_case() {
        let j = read_json(&golden_seed004().join("components_seed004.json"));
        let cases = j["linear_schedule_with_warmup"].as_array().unwrap();
        assert!(!cases.is_empty());
        for c in cases {
            let w = c["num_warmup_steps"].as_u64().unwrap();
            let total = c["num_training_steps"].as_u64().unwrap();
            let base = c["base_lr"].as_f64().unwrap();
            let lrs = c["lr_before_optimizer_step"].as_array().unwrap();
            assert_eq!(lrs.len() as u64, total + 2);
            for (k, e) in lrs.iter().enumerate() {
                let e = e.as_f64().unwrap();
                let a = linear_with_warmup(k as u64, w, total, base);
                assert_eq!(
                    a.to_bits(),
                    e.to_bits(),
                    "warmup {w} total {total} step {k}"
                );
            }
        }
    }

    #[test]
    fn wsd_warms_up_holds_then_decays_to_the_floor() {
        let lr = |k| wsd(k, 100, 1.0, 10, 0.2, 0.1);
        assert_eq!((lr(0), lr(5), lr(10), lr(79)), (0.0, 0.5, 1.0, 1.0));
        assert_eq!(lr(80), 1.0);
        assert!((lr(90) - 0.55).abs() < 1e-15);
        assert!((lr(99) - (0.1 + 0.9 / 20.0)).abs() < 1e-15);
        assert_eq!((lr(100), lr(150)), (0.1, 0.1));
    }
}

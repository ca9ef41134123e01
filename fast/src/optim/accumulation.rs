//! Gradient accumulation: when to step, and how each micro-batch's mean loss is weighted.
//!
//! The optimizer steps after 1-based micro-step `step` when `step % accum == 0` (MiniMind after its
//! off-by-one fix) and once more for a trailing partial window. Backward runs on
//! `(ce + aux) * loss_weight(...)`.

/// How micro-batch losses combine into one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Normalisation {
    /// MiniMind: each micro-batch's mean loss / accum (tokens weigh unequally when micro-batches
    /// hold different numbers of counted labels).
    #[default]
    MiniMindMean,
    /// Every counted token weighs the same: mean * count / (counted labels in the whole window,
    /// over all ranks).
    TokenWeighted,
}

/// Optimizer step after 1-based micro-step `step` of `total`.
pub fn is_optimizer_step(step: u64, accum: u64, total: u64) -> bool {
    step % accum == 0 || step == total
}

/// The 1-based micro-steps `(first, last)` of the accumulation window holding `step`.
pub fn window(step: u64, accum: u64, total: u64) -> (u64, u64) {
    let first = (step - 1) / accum * accum + 1;
    (first, (first + accum - 1).min(total))
}

/// Factor on a micro-batch's mean loss before backward. `count`: counted labels in this
/// micro-batch; `window_count`: in its whole window (all ranks). A window with no counted label
/// weighs 0 (its gradient is the aux loss's only under MiniMindMean).
pub fn loss_weight(norm: Normalisation, accum: u64, count: usize, window_count: usize) -> f64 {
    match norm {
        Normalisation::MiniMindMean => 1.0 / accum as f64,
        Normalisation::TokenWeighted if window_count == 0 => 0.0,
        Normalisation::TokenWeighted => count as f64 / window_count as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_on_multiples_and_flushes_the_trailing_window() {
        let steps: Vec<u64> = (1..=7).filter(|&s| is_optimizer_step(s, 2, 7)).collect();
        assert_eq!(steps, vec![2, 4, 6, 7]);
        assert_eq!(window(7, 2, 7), (7, 7));
        assert_eq!(window(4, 3, 7), (4, 6));
    }

    #[test]
    fn token_weights_of_a_window_sum_to_one() {
        let counts = [3usize, 0, 5];
        let total: usize = counts.iter().sum();
        let s: f64 = counts
            .iter()
            .map(|&c| loss_weight(Normalisation::TokenWeighted, 3, c, total))
            .sum();
        assert!((s - 1.0).abs() < 1e-15);
    }
}

//! Gradient accumulation: when to step, and how each micro-batch's loss is weighted.

/// How micro-batch losses are combined into one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalisation {
    /// MiniMind: each micro-batch's mean loss divided by `accum` (unequal per-token weights when
    /// micro-batches hold different numbers of real tokens).
    MiniMindMean,
    /// Every counted token weighs the same: micro-batch mean * count / window total count.
    TokenWeighted,
}

/// Optimizer step after 1-based micro-step `step` of `total`: `step % accum == 0`, or the last
/// micro-step closing a trailing partial window.
pub fn is_optimizer_step(step: u64, accum: u64, total: u64) -> bool {
    step.is_multiple_of(accum) || step == total
}

/// The 1-based micro-steps `(first, last)` of the accumulation window holding `step`.
pub fn window(step: u64, accum: u64, total: u64) -> (u64, u64) {
    let first = (step - 1) / accum * accum + 1;
    (first, (first + accum - 1).min(total))
}

/// Factor that multiplies a micro-batch's mean loss before backward.
/// `count`: counted labels in this micro-batch; `window_count`: in its whole window (all ranks).
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
}

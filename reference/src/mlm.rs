//! Masked-LM inputs: transformers' `DataCollatorForLanguageModeling` masking (select each
//! non-special token with probability p; of the selected, 80% -> mask id, 10% -> a random id,
//! 10% unchanged; labels = the original id where selected, else -100) with a deterministic random
//! stream, so that another implementation (libtorch, another machine, any batch size or number of
//! ranks) reproduces the same bits.
//!
//! # The algorithm, exactly
//! All arithmetic on u64 wraps mod 2^64; `mix64` and SplitMix64 are [`crate::sampler`]'s.
//! 1. Stream per sample: `h = mix64(seed ^ 0x6D6C_6D5F_6D61_736B)` (ASCII "mlm_mask"),
//!    `h = mix64(h ^ epoch)`, `h = mix64(h ^ sample_index)`, where `sample_index` is the sample's
//!    index in the dataset (not its place in a batch); `rng = SplitMix64::new(h)` (its first
//!    output is `mix64(h + 0x9E3779B97F4A7C15)`).
//! 2. `uniform() = (rng.next_u64() >> 11) as f64 * 2^-53`, in [0, 1) with 53 random bits.
//! 3. For each position t = 0, 1, ..., len-1 in order:
//!    - `u = uniform()` (drawn for every position, special or not);
//!    - if `ids[t]` is a special id or `u >= probability`: input = ids[t], label = -100; next t;
//!    - else label = ids[t] and `v = uniform()`:
//!      `v < mask_replace_prob` -> input = mask_token_id;
//!      else `v < mask_replace_prob + random_replace_prob` (that f64 sum) -> input =
//!      `rng.next_u64() % vocab_size` (one more draw; the modulo bias, below vocab / 2^64, is
//!      accepted); else input = ids[t].
//!
//! The fractions are transformers' (`mask_replace_prob` 0.8, `random_replace_prob` 0.1; its
//! random id is drawn over the whole vocabulary, specials included, as here). Its RNG is torch's
//! global generator, which no other program reproduces; this stream replaces it.

use crate::dataset::Row;
use crate::loss::IGNORE_INDEX;
use crate::sampler::{mix64, SplitMix64};

/// Masking options; [`MlmMasking::new`] gives transformers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct MlmMasking {
    /// Probability that a non-special token is selected (transformers' `mlm_probability`).
    pub probability: f64,
    pub mask_token_id: i64,
    /// Random replacements are drawn from `0..vocab_size`.
    pub vocab_size: usize,
    /// Ids never selected (pad, bos, eos, mask ...).
    pub special_ids: Vec<i64>,
    pub mask_replace_prob: f64,
    pub random_replace_prob: f64,
}

impl MlmMasking {
    /// p = 0.15, 80% mask / 10% random / 10% kept.
    pub fn new(mask_token_id: i64, vocab_size: usize, special_ids: Vec<i64>) -> Self {
        MlmMasking {
            probability: 0.15,
            mask_token_id,
            vocab_size,
            special_ids,
            mask_replace_prob: 0.8,
            random_replace_prob: 0.1,
        }
    }
}

/// The random stream of one sample (step 1 of the module doc).
pub fn sample_rng(seed: u64, epoch: u64, sample_index: u64) -> SplitMix64 {
    let mut h = mix64(seed ^ 0x6D6C_6D5F_6D61_736B);
    h = mix64(h ^ epoch);
    h = mix64(h ^ sample_index);
    SplitMix64::new(h)
}

/// `(next_u64() >> 11) * 2^-53`: a uniform f64 in [0, 1).
pub fn uniform(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Masks one sample's ids (the module doc's algorithm) -> masked input ids and labels.
pub fn mask_tokens(ids: &[i64], m: &MlmMasking, seed: u64, epoch: u64, sample_index: u64) -> Row {
    let mut rng = sample_rng(seed, epoch, sample_index);
    let random_below = m.mask_replace_prob + m.random_replace_prob;
    let mut input_ids = Vec::with_capacity(ids.len());
    let mut labels = Vec::with_capacity(ids.len());
    for &id in ids {
        let u = uniform(&mut rng);
        if m.special_ids.contains(&id) || u >= m.probability {
            input_ids.push(id);
            labels.push(IGNORE_INDEX);
            continue;
        }
        labels.push(id);
        let v = uniform(&mut rng);
        input_ids.push(if v < m.mask_replace_prob {
            m.mask_token_id
        } else if v < random_below {
            (rng.next_u64() % m.vocab_size as u64) as i64
        } else {
            id
        });
    }
    Row { input_ids, labels }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bits from an independent Python transcription of the module doc (integers masked to 64
    /// bits, floats as Python's), so the doc alone is enough to reproduce them.
    #[test]
    fn the_documented_algorithm_gives_these_bits_for_seed_42_epoch_3_sample_7() {
        let ids: Vec<i64> = vec![
            1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 2, 1, 30, 31, 32, 33, 34, 35, 36, 37, 2,
            0,
        ];
        let mut m = MlmMasking::new(3, 128, vec![0, 1, 2, 3]);
        m.probability = 0.5;
        let row = mask_tokens(&ids, &m, 42, 3, 7);
        // 8 selected: 5 masked (id 3), 33 -> 40 at random, 30 and 36 kept
        let expected_input = [
            1, 10, 3, 12, 3, 14, 3, 16, 17, 18, 19, 20, 2, 1, 30, 31, 32, 40, 3, 3, 36, 37, 2, 0,
        ];
        let x = IGNORE_INDEX;
        let expected_labels = [
            x, x, 11, x, 13, x, 15, x, x, x, x, x, x, x, 30, x, x, 33, 34, 35, 36, x, x, x,
        ];
        assert_eq!(row.input_ids, expected_input.to_vec());
        assert_eq!(row.labels, expected_labels.to_vec());
    }

    #[test]
    fn probability_one_selects_every_non_special_token_and_zero_none() {
        let ids = [1i64, 5, 6, 0, 7, 2];
        let mut m = MlmMasking::new(3, 50, vec![0, 1, 2, 3]);
        m.probability = 1.0;
        let all = mask_tokens(&ids, &m, 1, 0, 0);
        assert_eq!(all.labels, vec![-100, 5, 6, -100, 7, -100]);
        m.probability = 0.0;
        let none = mask_tokens(&ids, &m, 1, 0, 0);
        assert_eq!(none.input_ids, ids.to_vec());
        assert!(none.labels.iter().all(|&l| l == IGNORE_INDEX));
    }
}

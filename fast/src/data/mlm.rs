//! Masked-LM inputs: transformers' `DataCollatorForLanguageModeling` masking (each non-special
//! token selected with probability p; of the selected, 80% -> the mask id, 10% -> a random id,
//! 10% unchanged; labels = the original id where selected, -100 elsewhere, no shift) drawn from
//! a stream fixed by (seed, epoch, sample index), so a resumed run, another batch size or number
//! of ranks, and the reference oracle all draw the same bits.
//!
//! The stream, exactly (reference/src/mlm.rs documents the same algorithm; this is an
//! independent implementation of that text): all u64 arithmetic wraps; `mix64` and SplitMix64
//! are `order`'s. `h = mix64(seed ^ 0x6D6C_6D5F_6D61_736B)` ("mlm_mask"), `h = mix64(h ^ epoch)`,
//! `h = mix64(h ^ sample_index)`, `rng = SplitMix64(h)`; `uniform() = (next_u64() >> 11) * 2^-53`.
//! For each position in order: `u = uniform()` (drawn at every position, special or not); a
//! special id or `u >= p` keeps its id with label -100; otherwise label = the id and
//! `v = uniform()`: `v < 0.8` -> mask id, `v < 0.8 + 0.1` -> `next_u64() % vocab_size`, else the
//! id is kept. `sample_index` is the row's index in the dataset (never its place in a batch).
use anyhow::{bail, Result};

use super::order::{mix64, SplitMix64};
use super::rows::Row;
use super::tokenizer::TextTokenizer;
use crate::model::loss::IGNORE_INDEX;

/// The masking seed of `fast eval` and of `--eval-data` in a masked-LM run (`fast eval
/// --mask-seed`'s default): a held-out loss always scores the same masked positions.
pub const EVAL_MASK_SEED: u64 = 0;

/// The data side of a masked-LM run: `--mlm-probability`, `--mask-token`, the run's seed.
#[derive(Clone, Debug, PartialEq)]
pub struct MlmSpec {
    pub probability: f64,
    /// `--mask-token` (None: tokenizer_config.json's `mask_token`).
    pub mask_token: Option<String>,
    pub seed: u64,
}

/// Masking options resolved against a tokenizer.
#[derive(Clone, Debug, PartialEq)]
pub struct MlmMasking {
    pub probability: f64,
    pub mask_token_id: i64,
    /// Random replacements are drawn from `0..vocab_size`.
    pub vocab_size: usize,
    /// Ids never selected, sorted: the tokenizer's special added tokens, bos, eos, pad, mask.
    pub special_ids: Vec<i64>,
    pub mask_replace_prob: f64,
    pub random_replace_prob: f64,
}

impl MlmMasking {
    /// transformers' fractions: 80% mask, 10% random, 10% kept.
    pub fn new(
        probability: f64,
        mask_token_id: i64,
        vocab_size: usize,
        mut special_ids: Vec<i64>,
    ) -> Self {
        special_ids.sort_unstable();
        special_ids.dedup();
        MlmMasking {
            probability,
            mask_token_id,
            vocab_size,
            special_ids,
            mask_replace_prob: 0.8,
            random_replace_prob: 0.1,
        }
    }

    /// The masking of `spec` for `tok`; the mask token must be in its vocabulary.
    pub fn for_tokenizer(spec: &MlmSpec, tok: &TextTokenizer) -> Result<MlmMasking> {
        if !(0.0..=1.0).contains(&spec.probability) {
            bail!(
                "--mlm-probability must be between 0 and 1 (got {})",
                spec.probability
            );
        }
        let (token, from) = match &spec.mask_token {
            Some(t) => (t.clone(), "--mask-token"),
            None => match tok.config_token("mask_token") {
                Some(t) => (t, "mask_token of tokenizer_config.json"),
                None => bail!(
                    "masked LM needs a mask token: --mask-token was not given and {} has no mask_token (add one with fast train-tokenizer --special-tokens \"<mask>\")",
                    tok.config_path.display()
                ),
            },
        };
        let Some(mask) = tok.token_id(&token) else {
            bail!(
                "{from} {token:?} is not in the vocabulary of {} (add it with fast train-tokenizer --special-tokens \"{token}\")",
                tok.path.display()
            );
        };
        let mut special: Vec<i64> = tok.special_ids().into_iter().map(i64::from).collect();
        special.extend([tok.bos, tok.eos, tok.pad, mask].map(i64::from));
        Ok(MlmMasking::new(
            spec.probability,
            mask as i64,
            tok.vocab_size(),
            special,
        ))
    }

    fn is_special(&self, id: i64) -> bool {
        self.special_ids.binary_search(&id).is_ok()
    }
}

/// The random stream of one sample (the module doc's first step).
pub fn sample_rng(seed: u64, epoch: u64, sample_index: u64) -> SplitMix64 {
    let h = mix64(seed ^ 0x6D6C_6D5F_6D61_736B);
    let h = mix64(h ^ epoch);
    SplitMix64::new(mix64(h ^ sample_index))
}

/// Masks a row in place: input ids per the draw, labels the original ids at selected positions
/// and -100 elsewhere (the layout's labels are replaced; segment starts are kept).
pub fn mask_row(row: &mut Row, m: &MlmMasking, seed: u64, epoch: u64, sample_index: u64) {
    let mut rng = sample_rng(seed, epoch, sample_index);
    let random_below = m.mask_replace_prob + m.random_replace_prob;
    for (id, label) in row.input_ids.iter_mut().zip(row.labels.iter_mut()) {
        let u = rng.next_f64();
        if m.is_special(*id) || u >= m.probability {
            *label = IGNORE_INDEX;
            continue;
        }
        *label = *id;
        let v = rng.next_f64();
        if v < m.mask_replace_prob {
            *id = m.mask_token_id;
        } else if v < random_below {
            *id = (rng.next_u64() % m.vocab_size as u64) as i64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bits reference/src/mlm.rs pins (from an independent Python transcription of the doc).
    #[test]
    fn the_documented_stream_gives_the_pinned_bits_for_seed_42_epoch_3_sample_7() {
        let ids: Vec<i64> = vec![
            1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 2, 1, 30, 31, 32, 33, 34, 35, 36, 37, 2,
            0,
        ];
        let m = MlmMasking::new(0.5, 3, 128, vec![0, 1, 2, 3]);
        let mut row = Row::new(ids.clone(), ids);
        mask_row(&mut row, &m, 42, 3, 7);
        let want_input = [
            1, 10, 3, 12, 3, 14, 3, 16, 17, 18, 19, 20, 2, 1, 30, 31, 32, 40, 3, 3, 36, 37, 2, 0,
        ];
        let x = IGNORE_INDEX;
        let want_labels = [
            x, x, 11, x, 13, x, 15, x, x, x, x, x, x, x, 30, x, x, 33, 34, 35, 36, x, x, x,
        ];
        assert_eq!(row.input_ids, want_input.to_vec());
        assert_eq!(row.labels, want_labels.to_vec());
    }
}

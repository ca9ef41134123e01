//! Next-token choice and streaming text for `fast generate`.
//!
//! Sampling runs on the CPU in f64 with our own seeded generator, so a fixed seed gives the same
//! tokens on every machine and device for the same logits. Order, as in Hugging Face's
//! `generate`: repetition penalty, temperature, top-k, top-p, then a draw; temperature 0 is greedy.

use anyhow::Result;

use crate::data::order::SplitMix64;

/// Sampling options (the CLI flags of `fast generate`).
#[derive(Clone, Debug)]
pub struct SamplingConfig {
    /// 0 = greedy (argmax).
    pub temperature: f64,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f64,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// HF/CTRL penalty on every token already in the context: logit / p if > 0, logit * p if < 0.
    pub repetition_penalty: f64,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 0.85,
            top_p: 0.85,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    cfg: SamplingConfig,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(cfg: SamplingConfig) -> Self {
        let rng = SplitMix64::new(cfg.seed);
        Sampler { cfg, rng }
    }

    /// Choose the next token from one row of logits, given every token seen so far.
    pub fn next(&mut self, logits: &[f64], context: &[i64]) -> i64 {
        let mut l = logits.to_vec();
        let p = self.cfg.repetition_penalty;
        if p != 1.0 {
            let mut seen = vec![false; l.len()];
            for &t in context {
                if let Some(s) = seen.get_mut(t as usize) {
                    if !*s {
                        *s = true;
                        let x = &mut l[t as usize];
                        *x = if *x < 0.0 { *x * p } else { *x / p };
                    }
                }
            }
        }
        if self.cfg.temperature <= 0.0 {
            return argmax(&l) as i64;
        }
        for x in l.iter_mut() {
            *x /= self.cfg.temperature;
        }
        // Candidates by descending logit (ties by lower id, for determinism).
        let mut idx: Vec<usize> = (0..l.len()).collect();
        // NaN logits (broken weights) rank last, so that the draw stays a distribution.
        for x in l.iter_mut().filter(|x| x.is_nan()) {
            *x = f64::NEG_INFINITY;
        }
        idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        if self.cfg.top_k > 0 && self.cfg.top_k < idx.len() {
            idx.truncate(self.cfg.top_k);
        }
        let max = l[idx[0]];
        let mut probs: Vec<f64> = idx.iter().map(|&i| (l[i] - max).exp()).collect();
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= z);
        if self.cfg.top_p < 1.0 {
            // Keep tokens while the mass *before* them is below top_p (at least one).
            let mut cum = 0.0;
            let mut keep = 0;
            for &q in &probs {
                if keep > 0 && cum >= self.cfg.top_p {
                    break;
                }
                cum += q;
                keep += 1;
            }
            idx.truncate(keep);
            probs.truncate(keep);
            let z: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= z);
        }
        let u = self.rng.next_f64();
        let mut cum = 0.0;
        for (k, &q) in probs.iter().enumerate() {
            cum += q;
            if u < cum {
                return idx[k] as i64;
            }
        }
        *idx.last().unwrap() as i64
    }
}

fn argmax(x: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Turns a growing list of token ids into text pieces safe to print: a byte-level BPE token may
/// end inside a UTF-8 character, so text is held back while its decoding ends in U+FFFD.
pub struct TextStream<D: Fn(&[u32]) -> Result<String>> {
    decode: D,
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

/// A UTF-8 character spans at most 4 bytes, so this many held-back tokens means it never completes.
const MAX_HELD: usize = 8;

impl<D: Fn(&[u32]) -> Result<String>> TextStream<D> {
    /// `decode` turns ids into text (skipping special tokens), e.g. `TextTokenizer::decode`.
    pub fn new(decode: D) -> Self {
        TextStream {
            decode,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        (self.decode)(ids)
    }

    /// Add one token; returns the text that became final (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = self.decode(&self.ids[self.prefix..self.read])?;
        let now = self.decode(&self.ids[self.prefix..])?;
        let held = self.ids.len() - self.read;
        if now.len() > before.len() && (!now.ends_with('\u{FFFD}') || held >= MAX_HELD) {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (an incomplete character prints as U+FFFD).
    pub fn finish(&mut self) -> Result<String> {
        let before = self.decode(&self.ids[self.prefix..self.read])?;
        let now = self.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or("").to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(t: f64, p: f64, k: usize) -> SamplingConfig {
        SamplingConfig {
            temperature: t,
            top_p: p,
            top_k: k,
            repetition_penalty: 1.0,
            seed: 7,
        }
    }

    #[test]
    fn temperature_zero_is_argmax() {
        let mut s = Sampler::new(cfg(0.0, 0.5, 3));
        assert_eq!(s.next(&[0.1, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let mut s = Sampler::new(SamplingConfig {
            repetition_penalty: 2.0,
            ..cfg(0.0, 1.0, 0)
        });
        // token 0 (3.0 -> 1.5) loses to token 1 (2.0).
        assert_eq!(s.next(&[3.0, 2.0, -1.0], &[0, 0]), 1);
        // token 1 (-0.5 -> -1.0) loses to token 2 (-0.9).
        assert_eq!(s.next(&[-2.0, -0.5, -0.9], &[1]), 2);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.5, 0.7, 0.6, 0.1];
        for seed in 0..20 {
            let mut a = Sampler::new(SamplingConfig {
                seed,
                ..cfg(1.0, 1.0, 1)
            });
            let mut b = Sampler::new(SamplingConfig {
                seed,
                ..cfg(1.0, 1e-9, 0)
            });
            assert_eq!(a.next(&logits, &[]), 1);
            assert_eq!(b.next(&logits, &[]), 1);
        }
    }

    #[test]
    fn fixed_seed_repeats_and_frequencies_follow_softmax() {
        let logits = [0.0, (2.0f64).ln(), (3.0f64).ln()];
        let draw = |seed| {
            let mut s = Sampler::new(SamplingConfig {
                seed,
                ..cfg(1.0, 1.0, 0)
            });
            (0..6000).map(|_| s.next(&logits, &[])).collect::<Vec<_>>()
        };
        let a = draw(1);
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
        for (tok, want) in [(0, 1.0 / 6.0), (1, 2.0 / 6.0), (2, 3.0 / 6.0)] {
            let f = a.iter().filter(|&&t| t == tok).count() as f64 / a.len() as f64;
            assert!((f - want).abs() < 0.03, "token {tok}: {f} vs {want}");
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // probs 0.5, 0.3, 0.2: top_p 0.7 keeps tokens 0 and 1 only.
        let logits = [0.5f64.ln(), 0.3f64.ln(), 0.2f64.ln()];
        let mut s = Sampler::new(cfg(1.0, 0.7, 0));
        let draws: Vec<i64> = (0..2000).map(|_| s.next(&logits, &[])).collect();
        assert!(!draws.contains(&2));
        assert!(draws.contains(&1));
    }
}

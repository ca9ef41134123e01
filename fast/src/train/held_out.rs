//! `--eval-data`: the held-out loss during training, computed as `fast eval` computes it (one
//! document per row from bos, MiniMind's padded rows, shifted cross-entropy token-weighted over
//! every counted label of the file), with the model being trained. For `--objective mlm` the
//! rows are masked as `fast eval` masks them: the run's --mlm-probability and --mask-token, but
//! the fixed seed [`crate::data::mlm::EVAL_MASK_SEED`], so every evaluation scores the same
//! masked positions.

use std::time::Instant;

use anyhow::Result;

use super::run_config::RunConfig;
use super::setup::{Data, DataSpec};
use super::trainer::Trainer;
use crate::data::dataset::DataMode;

pub struct HeldOut {
    data: Data,
    batch_size: usize,
    /// Evaluate every this many micro-steps (and at the end of the run).
    pub interval: usize,
}

/// One evaluation: the loss, the tokens it counted, and how long it took.
pub struct Score {
    pub loss: f64,
    pub tokens: i64,
    pub secs: f64,
}

impl HeldOut {
    /// The held-out set of `cfg` (`--eval-data`), if any; `say` gets the line describing it.
    pub fn load(cfg: &RunConfig, say: &dyn Fn(String)) -> Result<Option<HeldOut>> {
        let Some(path) = &cfg.eval_data else {
            return Ok(None);
        };
        let spec = DataSpec {
            data_path: vec![path.clone()],
            data_mode: DataMode::Padded,
            max_docs: cfg.eval_docs,
            skip_bad_lines: false,
            ..cfg.data_spec()
        };
        let spec = DataSpec {
            mlm: spec.mlm.map(|m| crate::data::mlm::MlmSpec {
                seed: crate::data::mlm::EVAL_MASK_SEED,
                ..m
            }),
            ..spec
        };
        let data = Data::load(&spec, &|l| say(format!("held-out {l}")))?;
        Ok(Some(HeldOut {
            data,
            batch_size: cfg.eval_batch_size,
            interval: cfg.eval_interval,
        }))
    }

    /// Whether micro-step `global` evaluates (`last`: the run's last micro-step).
    pub fn due(&self, global: usize, last: bool) -> bool {
        last || global % self.interval == 0
    }

    /// The held-out loss of the trainer's model now (no gradients, the model's kernels).
    pub fn score(&self, tr: &Trainer) -> Result<Score> {
        let t0 = Instant::now();
        let r = crate::commands::eval::evaluate(tr.model(), &self.data.dataset, self.batch_size)?;
        Ok(Score {
            loss: r.loss(),
            tokens: r.tokens,
            secs: t0.elapsed().as_secs_f64(),
        })
    }
}

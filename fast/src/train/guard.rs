//! Optimizer steps whose loss or gradient is not finite: skipped on the device by the step itself
//! (train/trainer.rs), and here, one step later, either counted (`--skip-nonfinite`) or turned
//! into the error that stops the run.

use anyhow::{bail, Result};
use tch::Kind;

use crate::kernels::ops::HostRead;

/// Optimizer steps met with a non-finite loss or gradient (bf16/fp32): skipped on the device;
/// `check_pending` reads the last step's flag and stops the run or counts the step.
pub struct NonFinite {
    skip: bool,
    pub skipped: usize,
    pending: Option<(usize, HostRead)>,
}

impl NonFinite {
    pub fn check_pending(
        &mut self,
        log: &dyn Fn(&str),
        last_saved: Option<usize>,
        checkpoint: &std::path::Path,
    ) -> Result<()> {
        let Some((at, flag)) = self.pending.take() else {
            return Ok(());
        };
        if f64::try_from(flag.wait()?.sum(Kind::Double))? == 0.0 {
            return Ok(());
        }
        if self.skip {
            self.skipped += 1;
            log(&format!(
                "micro-step {at}: non-finite loss or gradient, optimizer step skipped (--skip-nonfinite)"
            ));
            return Ok(());
        }
        let kept = match last_saved {
            Some(g) => format!(
                "the last checkpoint, {} (micro-step {g}), is kept",
                checkpoint.display()
            ),
            None => "no checkpoint had been written yet".to_string(),
        };
        bail!(
            "micro-step {at}: the loss or a gradient is not finite (NaN or inf). The optimizer step \
             was skipped and the run stops without saving: {kept}. Lower --learning-rate, check \
             the data, or pass --skip-nonfinite to skip such steps and count them"
        )
    }
}

impl NonFinite {
    pub fn new(skip: bool) -> Self {
        NonFinite {
            skip,
            skipped: 0,
            pending: None,
        }
    }

    /// The flag of the optimizer step just queued at micro-step `at`, read a step later (without
    /// waiting for the step queued in between).
    pub fn watch(&mut self, at: usize, flag: Option<&tch::Tensor>) -> Result<()> {
        self.pending = match flag {
            Some(f) => Some((at, HostRead::start(f)?)),
            None => None,
        };
        Ok(())
    }
}

//! `grad_events.rs` without `--features cuda`: no device to hold events, so the overlap cannot
//! be built; hooks and stream switches are no-ops for the in-process communicator of the tests.
use anyhow::{bail, Result};
use tch::Tensor;

/// Without `--features cuda` there is no device to hold events.
pub struct GradEvents;

impl GradEvents {
    pub fn new(_device: usize, _n: usize) -> Result<Self> {
        bail!("overlapping the all-reduce with backward needs a binary built with --features cuda (make release-cuda)")
    }
    pub fn hook(&self, _i: usize, _t: &Tensor) -> Result<()> {
        Ok(())
    }
    pub fn enter(&self, _i: usize) -> Result<()> {
        Ok(())
    }
    pub fn leave(&self) -> Result<()> {
        Ok(())
    }
}

//! Without `--features cuda` there is no graph capture: the same API, refusing with the reason.
use anyhow::{bail, Result};

pub struct CudaGraph;

impl CudaGraph {
    pub fn capture(
        _device: usize,
        _warmup: usize,
        _step: impl FnMut() -> Result<()>,
    ) -> Result<Self> {
        bail!("CUDA graphs need a binary built with `--features cuda` (make release-cuda)")
    }

    pub fn replay(&self) -> Result<()> {
        bail!("CUDA graphs need a binary built with `--features cuda` (make release-cuda)")
    }
}

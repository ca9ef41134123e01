//! `graph.rs` without `--features cuda`: no graph capture (the same API, refusing with the
//! reason) and no CUDA allocator to read peak memory from.
use anyhow::{bail, Result};

pub fn peak_memory(_device: usize) -> (u64, u64) {
    (0, 0)
}

pub fn reset_peak_memory(_device: usize) {}

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

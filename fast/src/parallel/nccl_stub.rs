//! `nccl.rs` in a binary built without `--features nccl`: a torchrun job is refused with how to
//! build one that can join it.
use anyhow::{bail, Result};

use super::{Communicator, DistEnv};

pub fn connect(env: &DistEnv) -> Result<Box<dyn Communicator>> {
    bail!(
        "WORLD_SIZE={} needs NCCL, but this binary was built without it; rebuild with \
         `cargo build --release -p fast --features nccl` (after `make setup-cuda`)",
        env.world_size
    )
}

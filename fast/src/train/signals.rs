//! SIGINT / SIGTERM during a run: the loop finishes its micro-step, saves a resume checkpoint and
//! exits 130 / 143 ([`Interrupted`]); a second signal of the same kind exits at once.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};

/// A run stopped by SIGINT or SIGTERM after saving its resume checkpoint. `main` exits with
/// 128 + signal (130, 143), as a shell reports a process killed by it.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
    pub global_step: usize,
    pub total_steps: usize,
    pub checkpoint: PathBuf,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.signal {
            signal_hook::consts::SIGINT => "SIGINT",
            signal_hook::consts::SIGTERM => "SIGTERM",
            _ => "a signal",
        };
        write!(
            f,
            "interrupted by {name} at micro-step {} of {}: resume checkpoint saved to {}; continue with --from-resume 1",
            self.global_step,
            self.total_steps,
            self.checkpoint.display()
        )
    }
}

impl std::error::Error for Interrupted {}

/// SIGINT / SIGTERM flags. A second signal of the same kind while the first is being handled
/// exits at once (the checkpoint being written then is abandoned; the previous one stays).
pub struct Signals {
    got: Arc<std::sync::atomic::AtomicUsize>,
}

impl Signals {
    pub fn install() -> Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let got = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for sig in [SIGINT, SIGTERM] {
            signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, armed.clone())
                .context("installing a signal handler")?;
            signal_hook::flag::register(sig, armed.clone())
                .context("installing a signal handler")?;
            signal_hook::flag::register_usize(sig, got.clone(), sig as usize)
                .context("installing a signal handler")?;
        }
        Ok(Signals { got })
    }

    /// The signal this process (or, data parallel, any rank) received, if any.
    pub fn agreed(&self, comm: &dyn crate::parallel::Communicator) -> Result<Option<i32>> {
        let local = self.got.load(std::sync::atomic::Ordering::Relaxed) as i32;
        let ranks_hit = if comm.world_size() > 1 {
            comm.all_reduce_scalar(f64::from(u8::from(local != 0)))?
        } else {
            f64::from(u8::from(local != 0))
        };
        Ok(match (ranks_hit > 0.0, local) {
            (false, _) => None,
            (true, 0) => Some(signal_hook::consts::SIGTERM),
            (true, sig) => Some(sig),
        })
    }
}

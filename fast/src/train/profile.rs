//! `pretrain --profile DIR`: libtorch's profiler around micro-steps `--profile-at ..` of a real
//! run; every rank writes `DIR/rank<R>/trace.json` and `kernels.tsv`, rank 0 prints the device
//! time per op.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tch::Device;

use crate::kernels::profiler::{self, Session};

pub struct ProfileWindow {
    /// (directory, first micro-step, micro-steps).
    spec: Option<(PathBuf, usize, usize)>,
    session: Option<Session>,
    done: bool,
}

impl ProfileWindow {
    pub fn new(spec: Option<(PathBuf, usize, usize)>) -> Self {
        ProfileWindow {
            spec,
            session: None,
            done: false,
        }
    }

    /// Before micro-step `global` runs: start the profiler if the window begins here.
    pub fn before_step(&mut self, global: usize, device: Device) -> Result<()> {
        if let Some((_, at, _)) = &self.spec {
            if global == *at && self.session.is_none() {
                self.session = Some(Session::start(device.is_cuda())?);
            }
        }
        Ok(())
    }

    /// After micro-step `global`: end the window after its last step, or at the end of the run
    /// (`last` true).
    pub fn after_step(
        &mut self,
        global: usize,
        last: bool,
        rank: usize,
        main: bool,
        device: Device,
    ) -> Result<()> {
        let Some((dir, at, n)) = &self.spec else {
            return Ok(());
        };
        if self.session.is_none() || !(global + 1 == at + n || last) {
            return Ok(());
        }
        let session = self.session.take().expect("checked above");
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        let out = dir.join(format!("rank{rank}"));
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        let rows = session.stop(&out.join("trace.json"))?;
        profiler::write_tsv(&rows, &out.join("kernels.tsv"))?;
        if main {
            eprint!("{}", profiler::report(&rows, global + 1 - at));
            eprintln!(
                "profile: {} (rank<R>/trace.json, kernels.tsv)",
                dir.display()
            );
        }
        self.done = true;
        Ok(())
    }

    /// The sentence for a run that never reached the window (a resumed run past it, a short run).
    pub fn missed(&self) -> Option<String> {
        match &self.spec {
            Some((_, at, _)) if !self.done => Some(format!(
                "--profile-at {at}: this run did not reach micro-step {at}, so nothing was profiled"
            )),
            _ => None,
        }
    }
}

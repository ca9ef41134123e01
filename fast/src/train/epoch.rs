//! One epoch's batches for this rank: the seeded permutation, the resume skip, the split over
//! ranks, prefetched on worker threads and handed out an accumulation window at a time.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::console::Console;
use super::ranks::Ranks;
use super::run_config::RunConfig;
use super::setup::Data;
use crate::data::batch::HostBatch;
use crate::data::loader::Prefetcher;
use crate::data::order::{epoch_permutation_u32, EpochOrder};
use crate::optim::accumulation;

pub struct EpochBatches {
    loader: Prefetcher,
    /// Micro-steps done in this epoch (starting at the resume skip).
    pub step: usize,
    pub skip: usize,
    iters: usize,
    accum: usize,
    started: Instant,
    waited_seen: Duration,
}

/// The rest of an accumulation window (all of it, or what a resume left of it).
pub struct Window {
    pub batches: Vec<HostBatch>,
    /// Whether these batches start the window (a resumed one starts part-way).
    pub starts: bool,
}

impl EpochBatches {
    /// Global batch g is perm[g*W*bs .. (g+1)*W*bs]; this rank takes its bs rows (data::order).
    pub fn new(
        data: &Data,
        cfg: &RunConfig,
        epoch: usize,
        skip: usize,
        iters: usize,
        ranks: &Ranks,
        con: &Console,
    ) -> Self {
        if skip > 0 {
            con.println(format!(
                "Epoch [{}/{}]: skipping the first {skip} steps, continuing at step {}",
                epoch + 1,
                cfg.epochs,
                skip + 1
            ));
        }
        let bs = cfg.batch_size;
        // The u32 permutation is the epoch's one structure that grows with the corpus (4 bytes a
        // row); batches are cut from it as the loader dispatches them (SkipBatchSampler for one
        // rank, data::order's global batches for several).
        let perm = epoch_permutation_u32(data.dataset.len(), cfg.seed, epoch as u64);
        let order = EpochOrder::new(std::sync::Arc::new(perm), bs, ranks.world, ranks.rank, skip);
        let total = order.remaining();
        let workers = cfg.num_workers;
        let depth = (2 * workers).max(cfg.accumulation_steps) + 2;
        let loader = Prefetcher::from_iter(
            data.dataset.clone(),
            Box::new(order),
            total,
            epoch as u64,
            workers,
            depth,
        );
        let waited_seen = loader.waited;
        EpochBatches {
            loader,
            step: skip,
            skip,
            iters,
            accum: cfg.accumulation_steps,
            started: Instant::now(),
            waited_seen,
        }
    }

    /// The rest of the current accumulation window, fetched before its first micro-step:
    /// token-weighted loss needs the window's counted labels before the first backward.
    pub fn next_window(&mut self) -> Result<Option<Window>> {
        if self.step >= self.iters {
            return Ok(None);
        }
        let next = self.step as u64 + 1;
        let (first, last) = accumulation::window(next, self.accum as u64, self.iters as u64);
        let mut batches = Vec::with_capacity((last + 1 - next) as usize);
        for _ in next..=last {
            batches.push(
                self.loader
                    .next()
                    .context("the data loader ended early")??,
            );
        }
        Ok(Some(Window {
            batches,
            starts: first == next,
        }))
    }

    /// Seconds the loop waited for data since the last call.
    pub fn take_waited(&mut self) -> f64 {
        let now = self.loader.waited;
        let w = (now - self.waited_seen).as_secs_f64();
        self.waited_seen = now;
        w
    }

    /// Seconds waited for data in this epoch.
    pub fn waited_total(&self) -> f64 {
        self.loader.waited.as_secs_f64()
    }

    /// Minutes the rest of the epoch will take at this epoch's pace so far.
    pub fn eta_min(&self) -> f64 {
        self.started.elapsed().as_secs_f64() / (self.step - self.skip).max(1) as f64
            * (self.iters - self.step) as f64
            / 60.0
    }

    pub fn is_optimizer_step(&self) -> bool {
        accumulation::is_optimizer_step(self.step as u64, self.accum as u64, self.iters as u64)
    }
}

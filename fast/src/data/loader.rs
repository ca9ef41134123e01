//! Batches built on worker threads ahead of the training loop.
//!
//! The loop hands over the epoch's batches (lists of item indices, already permuted, skipped and
//! sharded by the samplers); `workers` threads lay out rows from the memory-mapped token cache
//! while the device trains on earlier batches. At most `depth` batches are in flight (dispatched and not yet taken), so
//! memory stays bounded however far ahead the workers could run. Batches come out in order;
//! the time the loop spends blocked waiting for one is recorded, so a run can report what share
//! of its step time went to waiting for data.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use crossbeam_channel::{unbounded, Receiver, Sender};

use super::batch::HostBatch;
use super::dataset::TokenDataset;

type Job = (usize, Vec<usize>);
type Done = (usize, Result<HostBatch>);

pub struct Prefetcher {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    pending: BTreeMap<usize, Result<HostBatch>>,
    batches: Box<dyn Iterator<Item = Vec<usize>> + Send>,
    dispatched: usize,
    next: usize,
    total: usize,
    workers: Vec<JoinHandle<()>>,
    /// Time spent blocked in `next()` waiting for a batch that was not ready.
    pub waited: Duration,
}

impl Prefetcher {
    /// Batches of `epoch` (0-based; layouts drawn per epoch, such as masked LM, depend on it).
    pub fn new(
        dataset: Arc<TokenDataset>,
        batches: Vec<Vec<usize>>,
        epoch: u64,
        workers: usize,
        depth: usize,
    ) -> Self {
        let total = batches.len();
        Self::from_iter(
            dataset,
            Box::new(batches.into_iter()),
            total,
            epoch,
            workers,
            depth,
        )
    }

    /// `total` batches drawn from `batches` as they are dispatched (an epoch's order need not
    /// be materialised: see `order::EpochOrder`).
    pub fn from_iter(
        dataset: Arc<TokenDataset>,
        batches: Box<dyn Iterator<Item = Vec<usize>> + Send>,
        total: usize,
        epoch: u64,
        workers: usize,
        depth: usize,
    ) -> Self {
        let (jobs_tx, jobs_rx) = unbounded::<Job>();
        let (done_tx, done_rx) = unbounded::<Done>();
        let workers = (0..workers.max(1))
            .map(|w| {
                let (jobs_rx, done_tx, ds) = (jobs_rx.clone(), done_tx.clone(), dataset.clone());
                std::thread::Builder::new()
                    .name(format!("data-{w}"))
                    .spawn(move || {
                        for (index, items) in jobs_rx {
                            let batch = ds.batch(&items, epoch);
                            if done_tx.send((index, batch)).is_err() {
                                return;
                            }
                        }
                    })
                    .expect("spawning a data worker thread")
            })
            .collect();
        let mut p = Self {
            jobs: Some(jobs_tx),
            done: done_rx,
            pending: BTreeMap::new(),
            batches,
            dispatched: 0,
            next: 0,
            total,
            workers,
            waited: Duration::ZERO,
        };
        for _ in 0..depth.max(1) {
            p.dispatch();
        }
        p
    }

    fn dispatch(&mut self) {
        if let (Some(items), Some(jobs)) = (self.batches.next(), self.jobs.as_ref()) {
            let _ = jobs.send((self.dispatched, items));
            self.dispatched += 1;
        }
    }

    /// Batches not yet taken.
    pub fn remaining(&self) -> usize {
        self.total - self.next
    }
}

impl Iterator for Prefetcher {
    type Item = Result<HostBatch>;

    fn next(&mut self) -> Option<Result<HostBatch>> {
        if self.next >= self.total {
            return None;
        }
        let started = Instant::now();
        let mut blocked = false;
        let batch = loop {
            if let Some(b) = self.pending.remove(&self.next) {
                break b;
            }
            blocked = true;
            match self.done.recv() {
                Ok((i, b)) => {
                    self.pending.insert(i, b);
                }
                Err(_) => break Err(anyhow::anyhow!("data worker threads stopped unexpectedly")),
            }
        };
        if blocked {
            self.waited += started.elapsed();
        }
        self.next += 1;
        self.dispatch();
        Some(batch)
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Closing the job channel ends the workers once they finish what they hold.
        self.jobs = None;
        for _ in &mut self.batches {}
        while self.done.try_recv().is_ok() {}
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

//! W simulated ranks in one process (one thread each), for CPU tests of partitioning and
//! averaging. Collectives meet in a shared slot table behind a Mutex: the last rank to arrive
//! combines the contributions in rank order (deterministic), every rank takes the result, and the
//! table resets when all have taken it. Values travel as f64, so sums are at least as exact as
//! NCCL's in the tensors' own dtype.

use super::{for_each_bucket, Communicator, DEFAULT_BUCKET_BYTES};
use anyhow::{anyhow, bail, ensure, Result};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Sum,
    Broadcast(usize),
    Barrier,
}

#[derive(Default)]
struct State {
    /// Each rank's contribution to the collective in progress.
    slots: Vec<Option<(Op, Vec<f64>)>>,
    arrived: usize,
    /// Set by the last arrival; ranks take it, the last taker resets the table.
    result: Option<Arc<Vec<f64>>>,
    taken: usize,
    /// Set by abort or a mismatch: every waiting and later call fails with it.
    failed: Option<String>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

/// One simulated rank. Create a whole world with [`InProcess::world`] and move one handle into
/// each thread (or use [`run_ranks`]).
pub struct InProcess {
    rank: usize,
    shared: Arc<Shared>,
    bucket_bytes: usize,
}

impl InProcess {
    /// Handles for ranks 0..world sharing one reducer; a rank waiting longer than `timeout` for
    /// the others fails (and fails them).
    pub fn world(world: usize, timeout: Duration) -> Vec<InProcess> {
        assert!(world >= 1, "world size must be at least 1");
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(State {
                slots: vec![None; world],
                ..State::default()
            }),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| InProcess {
                rank,
                shared: shared.clone(),
                bucket_bytes: DEFAULT_BUCKET_BYTES,
            })
            .collect()
    }

    /// Smaller buckets exercise the bucketing logic in tests.
    pub fn with_bucket_bytes(mut self, bytes: usize) -> Self {
        self.bucket_bytes = bytes.max(1);
        self
    }

    fn fail(&self, st: &mut State, msg: String) -> anyhow::Error {
        if st.failed.is_none() {
            st.failed = Some(msg.clone());
        }
        self.shared.cv.notify_all();
        anyhow!(msg)
    }

    /// Contributes `data` to collective `op` and returns the combined result.
    fn collective(&self, op: Op, data: Vec<f64>) -> Result<Arc<Vec<f64>>> {
        let sh = &*self.shared;
        let deadline = Instant::now() + sh.timeout;
        let mut st = sh
            .state
            .lock()
            .map_err(|_| anyhow!("in-process reducer poisoned"))?;
        // Wait for the previous collective to drain (a fast rank may come back early).
        loop {
            if let Some(msg) = &st.failed {
                bail!("rank {}: collective failed: {msg}", self.rank);
            }
            if st.result.is_none() && st.slots[self.rank].is_none() {
                break;
            }
            st = self.wait(st, deadline, op)?;
        }
        st.slots[self.rank] = Some((op, data));
        st.arrived += 1;
        if st.arrived == sh.world {
            let combined = combine(&st.slots, sh.world);
            match combined {
                Ok(v) => {
                    st.result = Some(Arc::new(v));
                    st.taken = 0;
                    sh.cv.notify_all();
                }
                Err(e) => return Err(self.fail(&mut st, e)),
            }
        }
        while st.result.is_none() {
            if let Some(msg) = &st.failed {
                bail!("rank {}: collective failed: {msg}", self.rank);
            }
            st = self.wait(st, deadline, op)?;
        }
        let out = st.result.clone().expect("result present");
        st.taken += 1;
        if st.taken == sh.world {
            st.slots.iter_mut().for_each(|s| *s = None);
            st.arrived = 0;
            st.result = None;
            st.taken = 0;
            sh.cv.notify_all();
        }
        Ok(out)
    }

    fn wait<'a>(
        &self,
        st: std::sync::MutexGuard<'a, State>,
        deadline: Instant,
        op: Op,
    ) -> Result<std::sync::MutexGuard<'a, State>> {
        let now = Instant::now();
        if now >= deadline {
            let mut st = st;
            let msg = format!(
                "rank {} timed out after {:.1}s in {op:?} ({} of {} ranks arrived)",
                self.rank,
                self.shared.timeout.as_secs_f64(),
                st.arrived,
                self.shared.world
            );
            return Err(self.fail(&mut st, msg));
        }
        let (st, _) = self
            .shared
            .cv
            .wait_timeout(st, deadline - now)
            .map_err(|_| anyhow!("in-process reducer poisoned"))?;
        Ok(st)
    }

    fn reduce_tensor(&self, t: &mut Tensor, op: Op) -> Result<()> {
        let flat = t
            .f_reshape([-1])?
            .f_to_kind(Kind::Double)?
            .f_to_device(tch::Device::Cpu)?;
        let data = Vec::<f64>::try_from(&flat)?;
        let out = self.collective(op, data)?;
        let back = Tensor::f_from_slice(out.as_slice())?
            .f_to_kind(t.kind())?
            .f_to_device(t.device())?
            .f_view_as(t)?;
        t.f_copy_(&back)?;
        Ok(())
    }
}

/// Rank-order combination of one collective's contributions; a mismatch is an error for all.
fn combine(slots: &[Option<(Op, Vec<f64>)>], world: usize) -> Result<Vec<f64>, String> {
    let (op0, v0) = slots[0].as_ref().expect("all arrived");
    for (r, s) in slots.iter().enumerate() {
        let (op, v) = s.as_ref().expect("all arrived");
        if op != op0 || v.len() != v0.len() {
            return Err(format!(
                "ranks disagree: rank 0 called {op0:?} with {} values, rank {r} called {op:?} with {}",
                v0.len(),
                v.len()
            ));
        }
    }
    Ok(match *op0 {
        Op::Sum | Op::Barrier => {
            let mut acc = vec![0.0; v0.len()];
            for s in slots.iter().take(world) {
                for (a, x) in acc.iter_mut().zip(&s.as_ref().expect("all arrived").1) {
                    *a += x;
                }
            }
            acc
        }
        Op::Broadcast(root) => slots[root].as_ref().expect("all arrived").1.clone(),
    })
}

impl Communicator for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()> {
        for_each_bucket(tensors, self.bucket_bytes, |flat| {
            self.reduce_tensor(flat, Op::Sum)
        })
    }
    fn broadcast(&self, tensors: &mut [Tensor], root: usize) -> Result<()> {
        ensure!(
            root < self.shared.world,
            "broadcast root {root} outside world {}",
            self.shared.world
        );
        for_each_bucket(tensors, self.bucket_bytes, |flat| {
            self.reduce_tensor(flat, Op::Broadcast(root))
        })
    }
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        let out = self.collective(Op::Sum, values.to_vec())?;
        values.copy_from_slice(&out);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        let out = self.collective(Op::Barrier, vec![1.0])?;
        ensure!(
            out[0] == self.shared.world as f64,
            "barrier counted {} ranks",
            out[0]
        );
        Ok(())
    }
    fn abort(&self) {
        if let Ok(mut st) = self.shared.state.lock() {
            let msg = format!("rank {} aborted", self.rank);
            let _ = self.fail(&mut st, msg);
        }
    }
}

/// Runs `f(rank_handle)` for every rank of a simulated world in its own thread and returns the
/// results in rank order. A rank returning an error aborts the world, so the others fail fast.
pub fn run_ranks<R: Send>(
    world: usize,
    timeout: Duration,
    f: impl Fn(&InProcess) -> Result<R> + Sync,
) -> Vec<Result<R>> {
    let handles = InProcess::world(world, timeout);
    std::thread::scope(|s| {
        let joins: Vec<_> = handles
            .iter()
            .map(|h| {
                let f = &f;
                s.spawn(move || {
                    let out = f(h);
                    if out.is_err() {
                        h.abort();
                    }
                    out
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| {
                j.join()
                    .unwrap_or_else(|_| Err(anyhow!("rank thread panicked")))
            })
            .collect()
    })
}

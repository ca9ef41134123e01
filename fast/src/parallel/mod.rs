//! Data parallelism: W processes (one per GPU, started by torchrun) each run the whole model on
//! their share of every global batch and sum their gradients before the optimizer step.
//!
//! - [`DistEnv`] reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...).
//! - [`Communicator`] is the small set of collectives training needs. [`SingleProcess`] is world 1
//!   (every call a no-op), [`InProcess`] simulates W ranks in threads for CPU tests, and `Nccl`
//!   (cargo feature `nccl`; `nccl_stub.rs` without it) is PyTorch's own c10d ProcessGroupNCCL through
//!   `csrc/c10d_shim.cpp`.
//! - `data::order` defines the data order globally, so a run can resume on another number of GPUs.
//!
//! Launch: `torchrun --nproc_per_node N --no-python target/release/fast pretrain ...`
//! (across nodes add `--nnodes M --node-rank i --master-addr HOST --master-port PORT`).

mod in_process;
#[cfg_attr(not(feature = "nccl"), path = "monitor_stub.rs")]
mod monitor;
#[cfg_attr(not(feature = "nccl"), path = "nccl_stub.rs")]
mod nccl;
pub mod overlap;
#[cfg(test)]
mod tests;

pub use in_process::{run_ranks, InProcess};

/// Tells the other ranks of a data-parallel run that this one failed with `msg` (they print it
/// and exit 1 instead of waiting in a collective); `main` calls it before exiting on an error.
/// No-op without a process group.
pub fn report_failure(msg: &str) {
    monitor::report_failure(msg);
}

use anyhow::{bail, ensure, Context, Result};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// Gradients travel in buckets of about this many bytes: one collective per bucket.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;
/// A collective that has not completed after this long fails (NCCL's watchdog then aborts the
/// communicators and ends the process, so a dead peer never leaves the others hanging).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Environment variable overriding [`DEFAULT_TIMEOUT`], in seconds.
pub const TIMEOUT_ENV: &str = "FAST_DIST_TIMEOUT_SEC";

/// Where this process sits in a torchrun job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent already hosts the TCPStore at MASTER_ADDR:MASTER_PORT, so every rank
    /// connects as a client; otherwise rank 0 hosts it.
    pub use_agent_store: bool,
    /// TORCHELASTIC_RESTART_COUNT: keys of a restarted attempt never meet the last one's.
    pub restart_count: usize,
    pub timeout: Duration,
}

impl DistEnv {
    /// World size 1 (rank 0, no store), as when the program runs without torchrun.
    pub fn single() -> Self {
        DistEnv {
            rank: 0,
            local_rank: 0,
            world_size: 1,
            master_addr: String::new(),
            master_port: 0,
            use_agent_store: false,
            restart_count: 0,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Reads the process environment; see [`DistEnv::from_vars`].
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|key| std::env::var(key).ok())
    }

    /// Parses torchrun's variables from `get`. WORLD_SIZE unset (and RANK unset) means one process.
    /// With WORLD_SIZE > 1, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT are required and must be
    /// consistent (rank < world, local rank < LOCAL_WORLD_SIZE when given).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |key: &str| {
            get(key)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let num = |key: &str| -> Result<Option<usize>> {
            get(key)
                .map(|v| {
                    v.parse::<usize>()
                        .with_context(|| format!("{key}={v:?} is not a non-negative integer"))
                })
                .transpose()
        };
        let timeout = match get(TIMEOUT_ENV) {
            None => DEFAULT_TIMEOUT,
            Some(v) => {
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .with_context(|| {
                        format!("{TIMEOUT_ENV}={v:?} must be a positive number of seconds")
                    })?;
                Duration::from_secs_f64(secs)
            }
        };
        let (world, rank) = match (num("WORLD_SIZE")?, num("RANK")?) {
            (None, None) => {
                return Ok(DistEnv {
                    timeout,
                    ..Self::single()
                })
            }
            (None, Some(r)) => bail!("RANK={r} is set but WORLD_SIZE is not; launch with torchrun"),
            (Some(w), r) => (w, r),
        };
        ensure!(world >= 1, "WORLD_SIZE=0: a job needs at least one process");
        let rank = match rank {
            Some(r) => r,
            None if world == 1 => 0,
            None => bail!("WORLD_SIZE={world} but RANK is not set; launch with torchrun"),
        };
        ensure!(
            rank < world,
            "RANK={rank} is outside WORLD_SIZE={world} (ranks are 0..{world})"
        );
        let local_rank = match num("LOCAL_RANK")? {
            Some(l) => l,
            None if world == 1 => 0,
            None => bail!("WORLD_SIZE={world} but LOCAL_RANK is not set; it picks this rank's GPU"),
        };
        ensure!(
            local_rank <= rank,
            "LOCAL_RANK={local_rank} exceeds RANK={rank}"
        );
        if let Some(lw) = num("LOCAL_WORLD_SIZE")? {
            ensure!(
                local_rank < lw && lw <= world,
                "LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={lw}, WORLD_SIZE={world} are inconsistent"
            );
        }
        let use_agent_store = match get("TORCHELASTIC_USE_AGENT_STORE").as_deref() {
            None | Some("False") | Some("false") | Some("0") => false,
            Some("True") | Some("true") | Some("1") => true,
            Some(v) => bail!("TORCHELASTIC_USE_AGENT_STORE={v:?}: expected True or False"),
        };
        let restart_count = num("TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0);
        let mut env = DistEnv {
            rank,
            local_rank,
            world_size: world,
            use_agent_store,
            restart_count,
            timeout,
            ..Self::single()
        };
        if world > 1 {
            env.master_addr = get("MASTER_ADDR")
                .with_context(|| format!("WORLD_SIZE={world} but MASTER_ADDR is not set"))?;
            let port = get("MASTER_PORT")
                .with_context(|| format!("WORLD_SIZE={world} but MASTER_PORT is not set"))?;
            env.master_port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .with_context(|| format!("MASTER_PORT={port:?} is not a port number (1..65535)"))?;
        }
        Ok(env)
    }

    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }

    /// This rank's device: `cuda:LOCAL_RANK` when distributed, else `requested`.
    pub fn device(&self, requested: Device) -> Device {
        if self.is_distributed() {
            Device::Cuda(self.local_rank)
        } else {
            requested
        }
    }

    /// This rank hosts the TCPStore (rank 0, unless torchrun's agent hosts it).
    pub fn is_store_server(&self) -> bool {
        self.rank == 0 && !self.use_agent_store
    }

    /// Key prefix in the store, as torch.distributed's `/worker/attempt_{restart}` plus our name.
    pub fn store_prefix(&self) -> String {
        format!("/worker/attempt_{}/fast_pg", self.restart_count)
    }

    /// One line for the start-of-run log.
    pub fn describe(&self) -> String {
        if !self.is_distributed() {
            return "single process".to_string();
        }
        format!(
            "rank {}/{} local_rank {} store {}:{} ({}) timeout {:.0}s",
            self.rank,
            self.world_size,
            self.local_rank,
            self.master_addr,
            self.master_port,
            if self.use_agent_store {
                "torchrun agent"
            } else if self.rank == 0 {
                "hosted here"
            } else {
                "rank 0"
            },
            self.timeout.as_secs_f64()
        )
    }
}

/// The collectives data-parallel training needs. Every rank must make the same calls in the same
/// order with tensors of the same shapes and dtypes.
pub trait Communicator {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Rank 0 logs and writes checkpoints.
    fn is_main(&self) -> bool {
        self.rank() == 0
    }
    /// In place: every tensor becomes the sum of that tensor over ranks (bucketed).
    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()>;
    /// As [`Communicator::all_reduce_sum`] of one dense contiguous tensor, ordered after the
    /// work queued on the current CUDA stream so far, but later work does not wait for it until
    /// [`Communicator::wait_pending`]. Without a device queue (the default) it completes here.
    fn all_reduce_sum_async(&self, t: &mut Tensor) -> Result<()> {
        self.all_reduce_sum(std::slice::from_mut(t))
    }
    /// The current stream's later work waits for every [`Communicator::all_reduce_sum_async`]
    /// started so far (no host wait).
    fn wait_pending(&self) -> Result<()> {
        Ok(())
    }
    /// In place: every rank's tensors receive rank `root`'s values (bucketed).
    fn broadcast(&self, tensors: &mut [Tensor], root: usize) -> Result<()>;
    /// In place: each value becomes its sum over ranks (f64, exact for counts below 2^53).
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Sum of one value over ranks (token counts, losses for logging).
    fn all_reduce_scalar(&self, value: f64) -> Result<f64> {
        let mut v = [value];
        self.all_reduce_f64(&mut v)?;
        Ok(v[0])
    }
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Error path: tear down without waiting, so peers blocked in a collective fail rather than
    /// hang. Later calls fail.
    fn abort(&self) {}
    /// Normal end of a run: wait for every rank, then release the communicators.
    fn finish(&self) -> Result<()> {
        Ok(())
    }
}

/// World size 1: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [Tensor]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &mut [Tensor], root: usize) -> Result<()> {
        ensure!(root == 0, "broadcast from rank {root} in a world of 1");
        Ok(())
    }
    fn all_reduce_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// The communicator `env` asks for: [`SingleProcess`] for world 1, NCCL otherwise (which needs a
/// binary built with `--features nccl` and a CUDA device per rank).
pub fn communicator_from_env(env: &DistEnv) -> Result<Box<dyn Communicator>> {
    if !env.is_distributed() {
        return Ok(Box::new(SingleProcess));
    }
    nccl::connect(env)
}

/// How per-rank gradients combine into the step's gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradAverage {
    /// MiniMind / PyTorch DDP: each rank's loss is its own token mean; gradients are averaged over
    /// ranks (sum, then / W). Ranks with fewer real tokens weigh their tokens more.
    RankMean,
    /// Every counted token weighs the same: each rank backpropagates its summed token loss divided
    /// by the global token count (see [`global_token_count`]); gradients are then only summed.
    TokenWeighted,
}

/// Combines gradients across ranks in place before clipping. Undefined gradients are an error
/// (every rank must send the same list); zero them instead of leaving them unset.
pub fn average_gradients(
    comm: &dyn Communicator,
    grads: &mut [Tensor],
    mode: GradAverage,
) -> Result<()> {
    let w = comm.world_size();
    if w == 1 {
        return Ok(());
    }
    comm.all_reduce_sum(grads)?;
    finish_average(grads, mode, w)
}

/// After the sum over `world` ranks: MiniMind's rank mean divides by the world size;
/// token-weighted sums are already the average.
pub(crate) fn finish_average(grads: &mut [Tensor], mode: GradAverage, world: usize) -> Result<()> {
    if mode == GradAverage::RankMean {
        let _guard = tch::no_grad_guard();
        for g in grads.iter_mut() {
            let _ = g.f_mul_scalar_(1.0 / world as f64)?;
        }
    }
    Ok(())
}

/// Sum over ranks of the counted (label != -100) tokens of the current step: the denominator of
/// token-weighted normalisation, known before backward.
pub fn global_token_count(comm: &dyn Communicator, local: usize) -> Result<usize> {
    let total = comm.all_reduce_scalar(local as f64)?;
    ensure!(
        total >= 0.0 && total.fract() == 0.0,
        "token count all-reduce gave {total}"
    );
    Ok(total as usize)
}

/// [`global_token_count`] left on `device` (fp64, exact below 2^53): the all-reduce is queued on
/// the stream and nothing waits for it on the host.
pub fn global_token_count_device(
    comm: &dyn Communicator,
    local: usize,
    device: tch::Device,
) -> Result<Tensor> {
    let mut t = [Tensor::full([1], local as f64, (tch::Kind::Double, device))];
    if comm.world_size() > 1 {
        comm.all_reduce_sum(&mut t)?;
    }
    let [t] = t;
    Ok(t)
}

/// Makes every rank start from rank 0's weights (call once after building the model or loading a
/// checkpoint, before the first step).
pub fn broadcast_parameters(comm: &dyn Communicator, params: &mut [Tensor]) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    comm.broadcast(params, 0)
}

/// A checksum of parameters that is identical across ranks exactly when their weights are
/// (sum and sum of |x| · position weights, in f64), for logs and checks.
pub fn weight_checksum(params: &[Tensor]) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let mut total = 0.0;
    for (i, p) in params.iter().enumerate() {
        let x = p.f_to_kind(Kind::Double)?;
        let s = x.f_sum(Kind::Double)?.f_double_value(&[])?;
        let a = x.f_abs()?.f_sum(Kind::Double)?.f_double_value(&[])?;
        total += s + (i as f64 + 1.0).sqrt() * a;
    }
    Ok(total)
}

/// Groups consecutive tensors of one dtype and device into buckets of about `cap` bytes, runs `op`
/// on each bucket flattened into one contiguous 1-D tensor, and copies the result back. A bucket of
/// one contiguous tensor is passed as itself (no copy).
pub fn for_each_bucket(
    tensors: &mut [Tensor],
    cap: usize,
    mut op: impl FnMut(&mut Tensor) -> Result<()>,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for (i, t) in tensors.iter().enumerate() {
        ensure!(
            t.defined(),
            "tensor {i} of {} is undefined (a parameter without gradient?)",
            tensors.len()
        );
    }
    let nbytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
    let mut start = 0;
    while start < tensors.len() {
        let (kind, device) = (tensors[start].kind(), tensors[start].device());
        let mut end = start + 1;
        let mut bytes = nbytes(&tensors[start]);
        while end < tensors.len()
            && tensors[end].kind() == kind
            && tensors[end].device() == device
            && bytes + nbytes(&tensors[end]) <= cap
        {
            bytes += nbytes(&tensors[end]);
            end += 1;
        }
        let bucket = &mut tensors[start..end];
        if bucket.len() == 1 && bucket[0].is_contiguous() {
            op(&mut bucket[0])?;
        } else {
            let flats = bucket
                .iter()
                .map(|t| t.f_reshape([-1]))
                .collect::<Result<Vec<_>, _>>()?;
            let mut flat = Tensor::f_cat(&flats, 0)?;
            drop(flats);
            op(&mut flat)?;
            let mut offset = 0i64;
            for t in bucket.iter_mut() {
                let n = t.numel() as i64;
                let part = flat.f_narrow(0, offset, n)?.f_view_as(t)?;
                t.f_copy_(&part)?;
                offset += n;
            }
        }
        start = end;
    }
    Ok(())
}

// ---- glue for the training loop ----------------------------------------------------------------

impl From<crate::optim::accumulation::Normalisation> for GradAverage {
    /// MiniMind's per-micro-batch mean goes with DDP's rank mean; token weighting across the
    /// window goes with token weighting across ranks (the window count is then global).
    fn from(n: crate::optim::accumulation::Normalisation) -> Self {
        match n {
            crate::optim::accumulation::Normalisation::MiniMindMean => GradAverage::RankMean,
            crate::optim::accumulation::Normalisation::TokenWeighted => GradAverage::TokenWeighted,
        }
    }
}

/// Before saving in the middle of an accumulation window: rank 0's gradients become the sum of
/// every rank's partial gradients and the other ranks' become zero. The sum over ranks (what the
/// window's all-reduce will combine) is unchanged, and rank 0's checkpoint holds all of it.
/// A resumed run restores them on rank 0 and zeroes them elsewhere.
pub fn consolidate_partial_gradients(comm: &dyn Communicator, grads: &mut [Tensor]) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    comm.all_reduce_sum(grads)?;
    if comm.rank() != 0 {
        let _guard = tch::no_grad_guard();
        for g in grads.iter_mut() {
            let _ = g.f_zero_()?;
        }
    }
    Ok(())
}

/// Turns rank-local log values into the global batch's (every rank calls it at the same steps):
/// ce weighted by each rank's counted labels (what one process with the whole global batch logs),
/// aux and the interval mean averaged over ranks, throughput summed. `useful_tokens_seen` stays
/// rank 0's running count (the one its checkpoint carries).
pub fn globalize_metric_row(
    comm: &dyn Communicator,
    row: &mut crate::train::metrics::MetricRow,
    counted_labels: usize,
) -> Result<()> {
    let w = comm.world_size() as f64;
    if w == 1.0 {
        return Ok(());
    }
    let c = counted_labels as f64;
    let mut v = [
        row.ce * c,
        c,
        row.aux,
        row.loss_avg,
        row.tokens_per_s,
        row.useful_tokens_per_s,
    ];
    comm.all_reduce_f64(&mut v)?;
    row.ce = if v[1] > 0.0 { v[0] / v[1] } else { 0.0 };
    row.aux = v[2] / w;
    row.loss = row.ce + row.aux;
    row.loss_avg = v[3] / w;
    row.tokens_per_s = v[4];
    row.useful_tokens_per_s = v[5];
    Ok(())
}

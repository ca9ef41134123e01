//! `fast dist-check`: checks the communicator of this launch (torchrun sets the environment) with
//! known values, then times a gradient-sized all-reduce. Every rank prints one line; rank 0 adds
//! a table. Exits non-zero on any wrong value.

use crate::parallel::{
    average_gradients, broadcast_parameters, communicator_from_env, weight_checksum, DistEnv,
    GradAverage,
};
use anyhow::{bail, ensure, Context, Result};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(clap::Args, Debug, Clone)]
pub struct DistCheckArgs {
    /// Floats in the timed all-reduce [default: 26M, the MiniMind-26M gradient].
    #[arg(long, default_value_t = 26_000_000)]
    pub numel: i64,
    /// Timed repetitions.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Device when not launched by torchrun (world 1): cpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Failure drill: this rank fails before the timed all-reduce; the others must not hang
    /// (they end within FAST_DIST_TIMEOUT_SEC, or sooner when torchrun stops them).
    #[arg(long)]
    pub fail_rank: Option<usize>,
}

fn max_err(got: &Tensor, want: &Tensor) -> Result<f64> {
    Ok(
        (got.f_to_kind(Kind::Double)? - want.f_to_kind(Kind::Double)?)
            .f_abs()?
            .f_max()?
            .f_double_value(&[])?,
    )
}

pub fn run(args: &DistCheckArgs) -> Result<()> {
    if args.numel < 1 || args.iters == 0 {
        bail!(
            "--numel and --iters must be at least 1 (got {} and {})",
            args.numel,
            args.iters
        );
    }
    let env = DistEnv::from_env()?;
    let requested = match args.device.as_str() {
        "cuda" if !tch::Cuda::is_available() => {
            bail!("--device cuda: libtorch sees no CUDA device here")
        }
        "cuda" => Device::Cuda(0),
        "cpu" => Device::Cpu,
        other => bail!("--device {other:?}: give cpu or cuda"),
    };
    let device = env.device(requested);
    let t0 = Instant::now();
    let comm = communicator_from_env(&env).context("creating the communicator")?;
    let init_s = t0.elapsed().as_secs_f64();
    let (r, w) = (comm.rank(), comm.world_size());
    let wf = w as f64;
    let result = (|| -> Result<Vec<(String, String)>> {
        let mut rows = vec![(
            "init".to_string(),
            format!("{init_s:.2}s, {}", env.describe()),
        )];
        // 1. Sum of mixed dtypes and shapes, one tensor larger than a bucket: rank r holds (r+1)*x.
        let shapes: &[(&[i64], Kind)] = &[
            (&[3, 5], Kind::Float),
            (&[7_000_001], Kind::Float), // 28 MB: its own bucket
            (&[1], Kind::Float),
            (&[1000, 33], Kind::BFloat16),
            (&[17], Kind::Double),
        ];
        let base: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, (s, k))| {
                let n: i64 = s.iter().product();
                (Tensor::arange(n, (Kind::Float, device)).fmod(7.0) + i as f64)
                    .reshape(*s)
                    .to_kind(*k)
            })
            .collect();
        let mut ts: Vec<Tensor> = base.iter().map(|t| t * (r as f64 + 1.0)).collect();
        comm.all_reduce_sum(&mut ts)?;
        let factor = wf * (wf + 1.0) / 2.0;
        let mut worst = 0.0f64;
        for (got, b) in ts.iter().zip(&base) {
            worst = worst.max(max_err(got, &(b * factor))?);
        }
        ensure!(worst == 0.0, "rank {r}: all_reduce_sum is off by {worst}");
        rows.push((
            "all_reduce_sum (5 tensors, 3 dtypes)".into(),
            "exact".into(),
        ));

        // 2. Broadcast from the last rank; gradient averaging; scalars; barrier.
        let mut ps: Vec<Tensor> = base.iter().map(|t| t * (r as f64 + 1.0)).collect();
        broadcast_parameters(&*comm, &mut ps)?;
        for (got, b) in ps.iter().zip(&base) {
            ensure!(
                max_err(got, b)? == 0.0,
                "rank {r}: broadcast from rank 0 differs"
            );
        }
        let root = w - 1;
        let mut qs: Vec<Tensor> = base.iter().map(|t| t * (r as f64 + 1.0)).collect();
        comm.broadcast(&mut qs, root)?;
        for (got, b) in qs.iter().zip(&base) {
            ensure!(
                max_err(got, &(b * wf))? == 0.0,
                "rank {r}: broadcast from rank {root} differs"
            );
        }
        rows.push(("broadcast (root 0 and last)".into(), "exact".into()));
        let mut gs = vec![Tensor::full(
            [4],
            r as f64 * 2.0 + 1.0,
            (Kind::Float, device),
        )];
        average_gradients(&*comm, &mut gs, GradAverage::RankMean)?;
        ensure!(
            max_err(&gs[0], &Tensor::full([4], wf, (Kind::Float, device)))? == 0.0,
            "rank {r}: rank mean wrong"
        );
        let count = comm.all_reduce_scalar(1000.0 + r as f64)?;
        ensure!(
            count == 1000.0 * wf + wf * (wf - 1.0) / 2.0,
            "rank {r}: all_reduce_scalar gave {count}"
        );
        comm.barrier()?;
        rows.push(("rank mean, scalar, barrier".into(), "exact".into()));

        ensure!(
            args.fail_rank != Some(r),
            "rank {r}: failing on purpose (--fail-rank)"
        );
        // 3. Timed: one gradient-sized fp32 all-reduce (bucketed), after a warm-up.
        let mut grad = vec![Tensor::ones([args.numel], (Kind::Float, device))];
        comm.all_reduce_sum(&mut grad)?;
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        let t = Instant::now();
        for _ in 0..args.iters {
            comm.all_reduce_sum(&mut grad)?;
        }
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        let per = t.elapsed().as_secs_f64() / args.iters.max(1) as f64;
        let want = wf.powi(args.iters as i32 + 1);
        let got = grad[0].f_get(0)?.f_double_value(&[])?;
        ensure!(
            got == want,
            "rank {r}: repeated all-reduce gave {got}, expected {want}"
        );
        let mb = args.numel as f64 * 4.0 / 1e6;
        // Bus bandwidth as nccl-tests defines it for all-reduce: 2 (W-1)/W * bytes / time.
        let bus = 2.0 * (wf - 1.0) / wf * mb / 1e3 / per;
        rows.push((
            format!("all_reduce {mb:.0} MB fp32"),
            format!("{:.2} ms, bus {bus:.1} GB/s", per * 1e3),
        ));
        // 4. GPUs: the all-reduce overlapped with backward, eager and under graph replay.
        if device.is_cuda() && crate::kernels::BUILT_WITH_CUDA {
            rows.push(overlap_check(&*comm, device)?);
        }
        let sum = weight_checksum(&ps)?;
        println!("dist: rank {r} weight checksum {sum:.17e}");
        Ok(rows)
    })();
    match result {
        Ok(rows) => {
            comm.finish()?;
            println!("dist-check: rank {r}/{w} on {device:?}: ok");
            if r == 0 {
                println!("\n| dist-check (world {w}) | result |\n|---|---|");
                for (k, v) in rows {
                    println!("| {k} | {v} |");
                }
            }
            Ok(())
        }
        Err(e) => {
            comm.abort();
            Err(e.context(format!("dist-check failed on rank {r}/{w}")))
        }
    }
}

/// The bucketed all-reduce started from gradient hooks (parallel/overlap.rs) leaves what one
/// all-reduce after backward leaves. Each rank runs a micro-step of the 26M model (bf16) on its
/// own batch; the reference sums that micro-step's local gradients after it has finished. Then
/// the same micro-step runs with the overlap, eagerly and as a replayed CUDA graph (the host
/// queues the collectives right after the launch, so they must wait for the marks inside it).
/// Two backward passes of one batch differ only by the order of atomic adds (fp32 round-off);
/// a collective that started before its bucket was final would miss whole layers' gradients, a
/// relative error of order 1. Tolerance 1e-3 separates the two.
fn overlap_check(
    comm: &dyn crate::parallel::Communicator,
    device: Device,
) -> Result<(String, String)> {
    use crate::kernels::graph::CudaGraph;
    use crate::train::trainer::{Trainer, TrainerConfig};
    let Device::Cuda(index) = device else {
        unreachable!("called on CUDA only")
    };
    let r = comm.rank();
    let cfg = crate::model::config::ModelConfig::default();
    let tc = TrainerConfig {
        precision: crate::model::precision::Precision::Bf16,
        device,
        seed: 7,
        ..Default::default()
    };
    let mut tr = Trainer::new(&cfg, tc)?;
    tch::manual_seed(1000 + r as i64);
    let ids = Tensor::randint(cfg.vocab_size as i64, [8, 128], (Kind::Int64, device));
    let labels = ids.copy();
    let weight = Tensor::ones([], (Kind::Float, device));
    tr.micro_step_weighted(&ids, &labels, &weight)?;
    let mut want = [tr.flat_grads().copy()];
    comm.all_reduce_sum(&mut want)?;
    let want = &want[0];
    ensure!(
        tr.enable_overlap(crate::kernels::KernelConfig::default().dp_bucket_layers as usize)?,
        "rank {r}: the 26M model has no overlap plan"
    );
    let rel = |got: &Tensor| -> Result<f64> {
        Ok((got - want).f_norm()?.f_double_value(&[])? / want.f_norm()?.f_double_value(&[])?)
    };
    let mode = GradAverage::TokenWeighted;
    tr.zero_grad()?;
    tr.micro_step_weighted(&ids, &labels, &weight)?;
    tr.average_gradients(comm, mode)?;
    let eager = rel(tr.flat_grads())?;
    let graph = CudaGraph::capture(index, 1, || {
        tr.micro_step_weighted(&ids, &labels, &weight)?;
        Ok(())
    })?;
    let mut worst_replay = 0.0f64;
    for _ in 0..3 {
        tr.zero_grad()?;
        graph.replay()?;
        tr.average_gradients(comm, mode)?;
        worst_replay = worst_replay.max(rel(tr.flat_grads())?);
    }
    ensure!(
        eager <= 1e-3 && worst_replay <= 1e-3,
        "rank {r}: the overlapped all-reduce differs from one after backward by {eager:.2e} \
         (eager) / {worst_replay:.2e} (graph replay), relative norm; tolerance 1e-3"
    );
    Ok((
        "all-reduce overlapped with backward (26M, bf16)".into(),
        format!("rel. diff {eager:.1e} eager, {worst_replay:.1e} graph replay (tol 1e-3)"),
    ))
}

//! This process's place in a run: world 1, or one rank of a torchrun job on its own GPU.

use anyhow::{bail, Result};
use tch::Device;

use super::run_config::RunConfig;
use super::trainer::Trainer;
use crate::kernels::OnOff;
use crate::parallel::{self, Communicator, DistEnv};

pub struct Ranks {
    pub env: DistEnv,
    pub comm: Box<dyn Communicator>,
    pub device: Device,
    pub rank: usize,
    pub world: usize,
    /// Rank 0: it logs and saves.
    pub main: bool,
}

impl Ranks {
    /// torchrun's environment (world 1 without it): one process per GPU on cuda:LOCAL_RANK,
    /// gradients summed over ranks before clipping, rank 0 logs and saves.
    pub fn join(cfg: &RunConfig) -> Result<Ranks> {
        let env = DistEnv::from_env()?;
        let requested = crate::model::precision::parse_device(&cfg.device)?;
        if env.is_distributed() && requested == Device::Cpu {
            bail!(
                "WORLD_SIZE={}: data parallelism runs on GPUs over NCCL, not with --device cpu",
                env.world_size
            );
        }
        let device = env.device(requested);
        crate::model::precision::host_threads_for(device);
        let comm = parallel::communicator_from_env(&env)?;
        let (rank, world, main) = (comm.rank(), comm.world_size(), comm.is_main());
        Ok(Ranks {
            env,
            comm,
            device,
            rank,
            world,
            main,
        })
    }

    /// Every rank starts from rank 0's weights (fresh init, --from-weight or resume alike); on
    /// GPUs each bucket's all-reduce then starts while backward computes the layers below it
    /// (parallel/overlap.rs), unless `--dp-overlap off`. Returns a line describing the overlap.
    pub fn start(&self, tr: &mut Trainer, cfg: &RunConfig) -> Result<Option<String>> {
        parallel::broadcast_parameters(&*self.comm, &mut tr.param_tensors())?;
        let k = &cfg.kernels;
        if self.world > 1
            && self.device.is_cuda()
            && crate::kernels::BUILT_WITH_CUDA
            && k.dp_overlap == OnOff::On
            && tr.enable_overlap(k.dp_bucket_layers as usize)?
        {
            let plan = tr.overlap_plan().expect("enabled above");
            let marks: Vec<String> = plan.marks().iter().map(|l| l.to_string()).collect();
            return Ok(Some(format!(
                "gradient all-reduce overlapped with backward: {} buckets, started as backward finishes layers {}; the embedding's after backward",
                plan.buckets().len(),
                marks.join(", ")
            )));
        }
        Ok(None)
    }
}

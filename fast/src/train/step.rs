//! One micro-step and one optimizer step of the loop, eager or replayed from CUDA graphs, and the
//! accumulation window's token count that weighs each micro-step's loss.

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::console::Console;
use super::graph::{self, GraphedStep};
use super::guard::NonFinite;
use super::ranks::Ranks;
use super::run_config::RunConfig;
use super::trainer::{MicroStep, Trainer};
use crate::data::batch::{Batch, HostBatch};
use crate::optim::accumulation::{self, Normalisation};

/// Counted labels of the current accumulation window: on the host, and (data parallel,
/// token-weighted) summed over ranks on the device, so no rank waits on the host for it.
pub struct WindowCount {
    pub host: usize,
    pub dev: Option<Tensor>,
}

impl WindowCount {
    /// A window resumed half-way keeps the count it started with (saved in the checkpoint).
    pub fn resumed(host: usize) -> Self {
        WindowCount { host, dev: None }
    }

    /// The first micro-batches of a window are here: count them (all ranks, where needed).
    pub fn start(
        &mut self,
        window: &[HostBatch],
        norm: Normalisation,
        ranks: &Ranks,
    ) -> Result<()> {
        self.host = window.iter().map(|b| b.counted_labels).sum();
        self.dev = None;
        if norm == Normalisation::TokenWeighted && ranks.world > 1 {
            // Queued on the device: the weights divide by it without a host wait.
            self.dev = Some(crate::parallel::global_token_count_device(
                &*ranks.comm,
                self.host,
                ranks.device,
            )?);
        }
        Ok(())
    }

    /// After the window's optimizer step.
    pub fn clear(&mut self) {
        self.host = 0;
        self.dev = None;
    }

    /// The count a checkpoint saves: a half-finished window resumes with its global count (one
    /// host read).
    pub fn for_checkpoint(&mut self) -> Result<usize> {
        if let Some(global) = &self.dev {
            self.host = f64::try_from(global.reshape([-1]).get(0))? as usize;
        }
        Ok(self.host)
    }
}

/// The steps of a run: eager until the first optimizer step, then (`--cuda-graph`) replays.
pub struct Stepper {
    graphed: Option<GraphedStep>,
    capture: bool,
    norm: Normalisation,
    pub guard: NonFinite,
    pub last_grad_norm: Option<Tensor>,
}

impl Stepper {
    pub fn new(cfg: &RunConfig, tr: &Trainer) -> Result<Self> {
        if cfg.cuda_graph {
            if let Some(why) = graph::unsupported(tr) {
                bail!("--cuda-graph: {why}");
            }
        }
        Ok(Stepper {
            graphed: None,
            capture: cfg.cuda_graph,
            norm: cfg.normalisation(),
            guard: NonFinite::new(cfg.skip_nonfinite),
            last_grad_norm: None,
        })
    }

    /// Forward and backward of one micro-batch, weighted for its window.
    pub fn micro(
        &self,
        tr: &mut Trainer,
        cfg: &RunConfig,
        hb: &HostBatch,
        batch: &Batch,
        count: &WindowCount,
    ) -> Result<MicroStep> {
        let weight = accumulation::loss_weight(
            self.norm,
            cfg.accumulation_steps as u64,
            hb.counted_labels,
            count.host,
        );
        // Data parallel, token-weighted: the weight divides by the device-side count.
        let weight_dev = count
            .dev
            .as_ref()
            .map(|global| (global.reciprocal() * hb.counted_labels as f64).to_kind(Kind::Float));
        match (self.graphed.as_ref().filter(|g| g.fits(batch)), &weight_dev) {
            (Some(g), Some(w)) => g.micro_step(batch, w),
            (Some(g), None) => g.micro_step(batch, &graph::weight_tensor(tr, weight)),
            (None, Some(w)) => {
                tr.micro_step_on(&batch.input_ids, &batch.labels, batch.seg_start.as_ref(), w)
            }
            (None, None) => {
                let w = graph::weight_tensor(tr, weight);
                tr.micro_step_on(
                    &batch.input_ids,
                    &batch.labels,
                    batch.seg_start.as_ref(),
                    &w,
                )
            }
        }
    }

    /// The end of a window: gradients averaged over ranks, clip, AdamW; the last step's
    /// non-finite flag read (stopping the run unless `--skip-nonfinite`); this step's flag queued.
    #[allow(clippy::too_many_arguments)]
    pub fn optimize(
        &mut self,
        tr: &mut Trainer,
        cfg: &RunConfig,
        ranks: &Ranks,
        lr: f64,
        global: usize,
        con: &Console,
        last_saved: Option<usize>,
    ) -> Result<()> {
        // The flat gradient buffer summed over ranks: in buckets started during backward with
        // the overlap, else one collective (no-op on one rank).
        tr.average_gradients(&*ranks.comm, self.norm.into())?;
        self.last_grad_norm = Some(match &self.graphed {
            Some(g) => g.optimizer_step(tr, lr)?,
            None => tr.optimizer_step(lr, cfg.grad_clip)?,
        });
        self.guard
            .check_pending(&|l| con.println(l), last_saved, &cfg.resume_path())?;
        self.guard.watch(global, tr.nonfinite())
    }

    /// After one eager optimizer step every library is initialised: capture the graphs for full
    /// batches of this shape (an epoch's shorter last batch runs eagerly).
    pub fn capture_if_due(
        &mut self,
        tr: &mut Trainer,
        cfg: &RunConfig,
        batch: &Batch,
        global: usize,
        con: &Console,
    ) -> Result<()> {
        let (rows, cols) = batch.input_ids.size2()?;
        if !self.capture || self.graphed.is_some() || rows as usize != cfg.batch_size {
            return Ok(());
        }
        self.graphed = Some(GraphedStep::capture(tr, batch, cfg.grad_clip)?);
        con.println(format!(
            "captured the micro-step and the optimizer step as CUDA graphs (batch {rows}x{cols}); replaying them from micro-step {}",
            global + 1
        ));
        Ok(())
    }
}

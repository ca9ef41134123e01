//! `pretrain --cuda-graph`: the micro-step (forward + backward) and the optimizer step (clip,
//! AdamW, zero) each captured once as a CUDA graph and replayed, so a step costs two launches of
//! host time instead of ~1,500. Between them the data-parallel all-reduce runs eagerly on the
//! flat gradient buffer, so no collective is ever captured (with the overlap, the micro-step's
//! graph only records the events its buckets wait for: parallel/overlap.rs).
//!
//! A replay computes exactly what the eager calls compute: the same kernels on the same
//! persistent tensors (parameters, `.grad` views, AdamW moments, the device learning rate). Only
//! the batch and the loss weight are inputs, copied into fixed tensors before each replay; a
//! batch of another shape (an epoch's last, shorter one) runs eagerly into the same gradients.
//!
//! Capture runs the step once on a side stream first (libraries initialise per stream), which
//! would change the training state; the state is saved before and restored after capture, so a
//! run with graphs follows the same arithmetic as one without.

use anyhow::{bail, Context, Result};
use tch::{Device, Tensor};

use super::trainer::{MicroStep, Trainer};
use crate::data::batch::Batch;
use crate::kernels::graph::CudaGraph;

pub struct GraphedStep {
    /// Fixed inputs: `[B, T]` token ids and labels (and packed documents' starts), the
    /// micro-step's loss weight (device scalar).
    ids: Tensor,
    labels: Tensor,
    seg_start: Option<Tensor>,
    weight: Tensor,
    micro: CudaGraph,
    micro_out: MicroStep,
    opt: CudaGraph,
    grad_norm: Tensor,
    nonfinite: Option<Tensor>,
}

/// Why `--cuda-graph` cannot run with this configuration, if it cannot.
pub fn unsupported(tr: &Trainer) -> Option<&'static str> {
    if !crate::kernels::BUILT_WITH_CUDA {
        return Some("this binary was built without `--features cuda` (make release-cuda)");
    }
    if !tr.device().is_cuda() {
        return Some("it needs a CUDA device");
    }
    if tr.config().use_moe {
        let (cfg, compute) = (tr.config(), tr.precision().compute_kind());
        let (d, f) = (cfg.hidden_size as i64, cfg.expert_width() as i64);
        if let Some(why) = tr.kernels().moe_graph_refusal(compute, d, f) {
            return Some(why);
        }
        if !grouped_mm_reads_no_host(tr.device()) {
            return Some(
                "MoE's grouped expert matmuls run without a host read on sm90/sm100 GPUs only \
                 (libtorch's bf16 grouped kernel); elsewhere they loop over the experts",
            );
        }
    }
    if tr.scaler().is_some() {
        return Some("fp16's GradScaler updates its scale on the host; use bfloat16 or float32");
    }
    None
}

/// Whether libtorch's bf16 `_grouped_mm` on this device is its CUTLASS kernel (compute
/// capability 9.x or 10.x), which reads the group offsets on the device; on other GPUs it falls
/// back to a loop that reads them on the host.
fn grouped_mm_reads_no_host(device: Device) -> bool {
    match device {
        Device::Cuda(i) => crate::commands::doctor::cuda_driver::properties(i)
            .is_ok_and(|p| matches!(p.major, 9 | 10)),
        _ => false,
    }
}

impl GraphedStep {
    /// Captures both graphs for batches shaped like `batch` (which is only used for its shape).
    /// Call it after at least one eager step (cuBLAS/cuDNN handles and plans exist by then).
    pub fn capture(tr: &mut Trainer, batch: &Batch, clip: f64) -> Result<Self> {
        if let Some(why) = unsupported(tr) {
            bail!("--cuda-graph: {why}");
        }
        let device = tr.device();
        let Device::Cuda(index) = device else {
            unreachable!("checked above")
        };
        let ids = batch.input_ids.zeros_like();
        let labels = batch.labels.zeros_like();
        let _ = ids.shallow_clone().copy_(&batch.input_ids);
        let _ = labels.shallow_clone().copy_(&batch.labels);
        let seg_start = batch.seg_start.as_ref().map(Tensor::copy);
        let k = crate::model::upcast_kind(tr.precision().param_kind());
        let weight = Tensor::ones([], (k, device));

        // Kept on the host: a device copy of the whole training state (four times the weights)
        // would raise the run's peak memory for the moment of capture.
        let saved: Vec<Tensor> = {
            let _guard = tch::no_grad_guard();
            tr.persistent_state()
                .iter()
                .map(|t| t.to_device(Device::Cpu))
                .collect()
        };
        let mut micro_out = None;
        let micro = CudaGraph::capture(index, 1, || {
            micro_out = Some(tr.micro_step_on(&ids, &labels, seg_start.as_ref(), &weight)?);
            Ok(())
        })
        .context("capturing the micro-step")?;
        let mut grad_norm = None;
        let opt = CudaGraph::capture(index, 1, || {
            grad_norm = Some(tr.optimizer_step_at_set_lr(clip)?);
            Ok(())
        })
        .context("capturing the optimizer step")?;
        {
            let _guard = tch::no_grad_guard();
            for (mut s, v) in tr.persistent_state().into_iter().zip(&saved) {
                s.f_copy_(v)?;
            }
        }
        Ok(GraphedStep {
            ids,
            labels,
            seg_start,
            weight,
            micro,
            micro_out: micro_out.context("the micro-step was not captured")?,
            opt,
            grad_norm: grad_norm.context("the optimizer step was not captured")?,
            nonfinite: tr.nonfinite().map(Tensor::shallow_clone),
        })
    }

    /// Whether batches of this shape replay the graph (others run eagerly).
    pub fn fits(&self, batch: &Batch) -> bool {
        batch.input_ids.size() == self.ids.size()
            && batch.seg_start.is_some() == self.seg_start.is_some()
    }

    /// Forward + backward of `batch` weighted by `weight` (a device scalar), as
    /// [`Trainer::micro_step_weighted`]. The returned loss is a copy (the graph's own output is
    /// overwritten by the next replay); ce, aux and count are the graph's outputs, valid until
    /// the next replay.
    pub fn micro_step(&self, batch: &Batch, weight: &Tensor) -> Result<MicroStep> {
        let (mut ids, mut labels, mut w) = (
            self.ids.shallow_clone(),
            self.labels.shallow_clone(),
            self.weight.shallow_clone(),
        );
        ids.f_copy_(&batch.input_ids)?;
        labels.f_copy_(&batch.labels)?;
        if let (Some(fixed), Some(given)) = (&self.seg_start, &batch.seg_start) {
            fixed.shallow_clone().f_copy_(given)?;
        }
        w.f_copy_(&weight.to_kind(w.kind()).reshape([]))?;
        self.micro.replay()?;
        let o = &self.micro_out;
        Ok(MicroStep {
            loss: o.loss.copy(),
            ce: o.ce.shallow_clone(),
            aux: o.aux.shallow_clone(),
            count: o.count.shallow_clone(),
        })
    }

    /// As [`Trainer::optimizer_step`]: sets the device learning rate, replays. Returns a copy of
    /// the gradient norm, and leaves a copy of the non-finite flag in `tr.nonfinite`.
    pub fn optimizer_step(&self, tr: &mut Trainer, lr: f64) -> Result<Tensor> {
        tr.set_lr(lr);
        self.opt.replay()?;
        tr.set_nonfinite(self.nonfinite.as_ref().map(Tensor::copy));
        Ok(self.grad_norm.copy())
    }
}

/// The loss weight of a micro-step as a device scalar of `tr`'s upcast kind.
pub fn weight_tensor(tr: &Trainer, weight: f64) -> Tensor {
    let k = crate::model::upcast_kind(tr.precision().param_kind());
    Tensor::full([], weight, (k, tr.device()))
}

//! The model with its optimizer state: one training step, as the training loop calls it.
//!
//! ```text
//! let mut tr = Trainer::new(&model_cfg, TrainerConfig { precision, device, seed, ..Default::default() })?;
//! // or Trainer::from_named(&model_cfg, tc, weights) to start from given weights
//! for step in 1..=total {                                   // 1-based micro-steps
//!     let lr = schedule::lr_at(step, total, base_lr, warmup);
//!     let w = accumulation::loss_weight(norm, accum, batch.count, window_count);
//!     let out = tr.micro_step(&batch.input_ids, &batch.labels, w)?;   // forward + backward
//!     if accumulation::is_optimizer_step(step, accum, total) {
//!         tr.average_gradients(comm, mode)?;            // data parallel; no-op on one rank
//!         let grad_norm = tr.optimizer_step(lr, clip)?;  // unscale, clip, AdamW, zero grads
//!     }
//!     // log: out.loss / out.ce / out.aux / grad_norm are device tensors; read them
//!     // (f64::try_from) only when logging, to keep host syncs out of the hot path.
//! }
//! ```
//!
//! `micro_step` backpropagates `(ce + aux) * weight` (times the loss scale in fp16) into the
//! parameters' `.grad`, which accumulate until `optimizer_step` clips them jointly, runs AdamW
//! (with `--optimizer muon`: Muon on the block matrices, AdamW on the rest, on the averaged
//! and accumulated gradients) and zeroes them. Gradients are defined (zero) from construction on, so parameters a
//! micro-batch never reaches (an MoE expert that got no token) still have a gradient tensor for
//! the multi-tensor kernels and collectives. Only MoE dispatch reads the host (expert sizes).
//! [`Trainer::state_dict`] / [`Trainer::load_state_dict`] are everything a resume needs.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::kernels::{ops, KernelConfig, Kernels};
use crate::model::loss::Objective;
use crate::model::precision::Precision;
use crate::model::{load_named, named_parameters, MiniMindForCausalLM, ModelConfig};
use crate::optim::adamw::{AdamW, AdamWConfig, AdamWImpl};
use crate::optim::muon::{is_muon_param, Muon, MuonConfig};
use crate::optim::scaler::GradScaler;
use crate::parallel::overlap::{Overlap, Plan};
use crate::parallel::{Communicator, GradAverage};

#[derive(Debug, Clone)]
pub struct TrainerConfig {
    pub precision: Precision,
    pub device: Device,
    /// tch::manual_seed before the init.
    pub seed: i64,
    pub adamw: AdamWConfig,
    pub adamw_impl: AdamWImpl,
    /// `--optimizer muon`: Muon for the block matrices, AdamW for the rest; `None`: AdamW for all.
    pub muon: Option<MuonSettings>,
    pub kernels: KernelConfig,
    /// Causal LM (shifted loss, causal attention) or masked LM (unshifted loss over the masked
    /// positions, bidirectional attention).
    pub objective: Objective,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            precision: Precision::Fp32,
            device: Device::Cpu,
            seed: 42,
            adamw: AdamWConfig::default(),
            adamw_impl: AdamWImpl::Fused,
            muon: None,
            kernels: KernelConfig::default(),
            objective: Objective::CausalLm,
        }
    }
}

/// Muon's hyper-parameters and its peak rate relative to AdamW's: the schedule's rate `lr` runs
/// AdamW at `lr` and Muon at `lr * lr_ratio`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MuonSettings {
    pub cfg: MuonConfig,
    pub lr_ratio: f64,
}

/// Outputs of one micro-step, detached device scalars: `loss = ce + aux` (before weighting),
/// `ce` the mean over counted labels, `aux` the summed MoE aux loss, `count` counted labels.
pub struct MicroStep {
    pub loss: Tensor,
    pub ce: Tensor,
    pub aux: Tensor,
    pub count: Tensor,
}

pub struct Trainer {
    precision: Precision,
    vs: VarStore,
    model: MiniMindForCausalLM,
    /// Parameters sorted by name (shallow handles into `vs`).
    params: Vec<(String, Tensor)>,
    /// AdamW over the parameters `adamw_index` names (all of them without Muon).
    opt: AdamW,
    /// Per parameter (name order): its index among AdamW's tensors, or `None` if Muon's.
    adamw_index: Vec<Option<usize>>,
    muon: Option<(Muon, f64)>,
    /// fp16 only.
    scaler: Option<GradScaler>,
    /// Without a scaler: after each optimizer step, a one-element device tensor, 1 if that step
    /// met a non-finite gradient norm and was skipped (weights and moments untouched), else 0.
    nonfinite: Option<Tensor>,
    /// Every parameter's `.grad` is a view into this one contiguous buffer (name order), so a
    /// data-parallel all-reduce works on it, or on ranges of it, with no copies.
    flat_grads: Tensor,
    /// Data parallel: the all-reduce overlapped with backward ([`Trainer::enable_overlap`]).
    overlap: Option<Overlap>,
    objective: Objective,
}

impl Trainer {
    /// A freshly initialised model (seeded) with zeroed gradients and optimizer state.
    pub fn new(cfg: &ModelConfig, tc: TrainerConfig) -> Result<Self> {
        tch::manual_seed(tc.seed);
        let mut vs = VarStore::new(tc.device);
        let mut model = MiniMindForCausalLM::new(&vs.root(), cfg)?;
        if tc.precision.param_kind() != Kind::Float {
            vs.set_kind(tc.precision.param_kind());
        }
        model.set_compute_kind(tc.precision.compute_kind());
        model.kernels = Kernels::new(tc.kernels);
        model.causal = tc.objective == Objective::CausalLm;
        let params = named_parameters(&vs);
        // Every .grad a zeroed view into one flat buffer (all parameters share one kind).
        let total: i64 = params.iter().map(|(_, p)| p.numel() as i64).sum();
        let kind = tc.precision.param_kind();
        let flat_grads = Tensor::zeros([total], (kind, tc.device));
        let mut offset = 0;
        for (name, p) in &params {
            let n = p.numel() as i64;
            let view = flat_grads.narrow(0, offset, n).view(p.size().as_slice());
            ops::set_grad(p, &view).with_context(|| format!("gradient of {name}"))?;
            offset += n;
        }
        let tensors: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
        let to_muon: Vec<bool> = params
            .iter()
            .map(|(n, p)| tc.muon.is_some() && is_muon_param(n, &p.size()))
            .collect();
        let mut adamw_index = Vec::with_capacity(params.len());
        let mut adamw_tensors = Vec::new();
        for (p, &m) in tensors.iter().zip(&to_muon) {
            adamw_index.push((!m).then_some(adamw_tensors.len()));
            if !m {
                adamw_tensors.push(p.shallow_clone());
            }
        }
        let opt = AdamW::new(&adamw_tensors, tc.adamw, tc.adamw_impl);
        let muon = match tc.muon {
            Some(m) => {
                let idx: Vec<usize> = (0..params.len()).filter(|&i| to_muon[i]).collect();
                let ns_kind = tc.precision.compute_kind();
                Some((Muon::new(&tensors, &idx, m.cfg, ns_kind)?, m.lr_ratio))
            }
            None => None,
        };
        let scaler = tc
            .precision
            .needs_scaler()
            .then(|| GradScaler::new_default(tc.device));
        Ok(Trainer {
            precision: tc.precision,
            vs,
            model,
            params,
            opt,
            adamw_index,
            muon,
            scaler,
            nonfinite: None,
            flat_grads,
            overlap: None,
            objective: tc.objective,
        })
    }

    /// As [`Trainer::new`], then the weights `named` (MiniMind names, any float kind).
    pub fn from_named(
        cfg: &ModelConfig,
        tc: TrainerConfig,
        named: HashMap<String, Tensor>,
        source: &str,
    ) -> Result<Self> {
        let mut tr = Trainer::new(cfg, tc)?;
        tr.load_weights(named, source)?;
        Ok(tr)
    }

    /// Replaces the weights with `named` (MiniMind names, any float kind; `--from-weight`).
    pub fn load_weights(&mut self, named: HashMap<String, Tensor>, source: &str) -> Result<()> {
        load_named(&mut self.vs, named, source)
    }

    pub fn model(&self) -> &MiniMindForCausalLM {
        &self.model
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn kernels(&self) -> Kernels {
        self.model.kernels
    }

    /// Another kernel choice from now on (`fast kernels` compares them in one process).
    pub fn set_kernels(&mut self, k: KernelConfig) {
        self.model.kernels = Kernels::new(k);
    }

    /// AdamW (over every parameter without Muon; see [`Trainer::muon`]).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// One line: which optimizer steps which parameters.
    pub fn describe_optimizer(&self) -> String {
        let adamw = self.adamw_index.iter().filter(|a| a.is_some()).count();
        match &self.muon {
            None => format!("optimizer: AdamW for all {adamw} tensors"),
            Some((m, ratio)) => {
                let (n, groups) = m.layout();
                let c = &m.cfg;
                format!(
                    "optimizer: Muon for {n} block matrices in {groups} batched shape groups (rate {ratio:.4}x AdamW's, momentum {}{}, {} Newton-Schulz steps in {}, weight decay {}, {} shape scaling), AdamW for the other {adamw} tensors",
                    c.momentum,
                    if c.nesterov { " Nesterov" } else { "" },
                    c.ns_steps,
                    crate::model::precision::kind_name(m.ns_kind()),
                    c.weight_decay,
                    match c.adjust_lr {
                        crate::optim::muon::AdjustLr::Original => "original",
                        crate::optim::muon::AdjustLr::MatchRmsAdamw => "match-rms-adamw",
                    },
                )
            }
        }
    }

    /// Muon and its rate relative to AdamW's, under `--optimizer muon`.
    pub fn muon(&self) -> Option<&(Muon, f64)> {
        self.muon.as_ref()
    }

    pub fn scaler(&self) -> Option<&GradScaler> {
        self.scaler.as_ref()
    }

    /// Parameters by name, in name order (handles: in-place edits reach the model).
    pub fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Parameter handles in name order.
    pub fn param_tensors(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, p)| p.shallow_clone()).collect()
    }

    /// Gradient handles in name order (in place edits reach the parameters' .grad).
    pub fn grads(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, p)| p.grad()).collect()
    }

    /// The one buffer every `.grad` is a view into (name order).
    pub fn flat_grads(&self) -> &Tensor {
        &self.flat_grads
    }

    /// Zeroes every gradient (one kernel).
    pub fn zero_grad(&self) -> Result<()> {
        let _ = self.flat_grads.shallow_clone().f_zero_()?;
        Ok(())
    }

    /// The non-finite flag of the last optimizer step (see the field's doc); `None` with a scaler.
    pub fn nonfinite(&self) -> Option<&Tensor> {
        self.nonfinite.as_ref()
    }

    /// Sets the device learning rate the next [`Trainer::optimizer_step_at_set_lr`] reads.
    pub fn set_lr(&mut self, lr: f64) {
        self.opt.set_lr(lr);
        if let Some((m, ratio)) = self.muon.as_mut() {
            m.set_lr(lr * *ratio);
        }
    }

    /// Every tensor a step writes that outlives it (weights, gradients, AdamW state): what a CUDA
    /// graph's warm-up must leave as it found.
    pub fn persistent_state(&self) -> Vec<Tensor> {
        let mut s = self.param_tensors();
        s.push(self.flat_grads.shallow_clone());
        s.extend(self.opt.exp_avg.iter().map(Tensor::shallow_clone));
        s.extend(self.opt.exp_avg_sq.iter().map(Tensor::shallow_clone));
        s.extend(self.opt.steps.iter().map(Tensor::shallow_clone));
        if let Some((m, _)) = &self.muon {
            s.extend(m.buffers());
        }
        s
    }

    /// Data parallel: from now on each micro-step's forward marks where backward finishes each
    /// bucket of gradients, and [`Trainer::average_gradients`] starts a bucket's all-reduce there
    /// instead of after backward (parallel/overlap.rs). Returns false, changing nothing, when the
    /// parameters are not laid out as embedding, layers, final norm.
    pub fn enable_overlap(&mut self, layers_per_bucket: usize) -> Result<bool> {
        let sizes: Vec<(String, i64)> = self
            .params
            .iter()
            .map(|(n, p)| (n.clone(), p.numel() as i64))
            .collect();
        let Some(plan) = Plan::new(&sizes, self.model.cfg.num_hidden_layers, layers_per_bucket)
        else {
            return Ok(false);
        };
        self.overlap = Some(Overlap::new(plan, self.device())?);
        Ok(true)
    }

    /// The overlapped all-reduce's buckets, once [`Trainer::enable_overlap`] ran.
    pub fn overlap_plan(&self) -> Option<&Plan> {
        self.overlap.as_ref().map(Overlap::plan)
    }

    /// Averages the gradients over ranks before an optimizer step (no-op on one rank): the
    /// overlapped buckets if [`Trainer::enable_overlap`] ran, else one all-reduce of the flat
    /// buffer.
    pub fn average_gradients(&self, comm: &dyn Communicator, mode: GradAverage) -> Result<()> {
        match &self.overlap {
            Some(o) => o.average(comm, &self.flat_grads, mode),
            None => crate::parallel::average_gradients(
                comm,
                &mut [self.flat_grads.shallow_clone()],
                mode,
            ),
        }
    }

    /// Forward and backward of `(ce + aux) * weight`; gradients accumulate.
    pub fn micro_step(
        &mut self,
        input_ids: &Tensor,
        labels: &Tensor,
        weight: f64,
    ) -> Result<MicroStep> {
        let k = crate::model::upcast_kind(self.precision.param_kind());
        let w = Tensor::full([], weight, (k, self.device()));
        self.micro_step_weighted(input_ids, labels, &w)
    }

    /// [`Trainer::micro_step`] with the weight a device scalar: data-parallel token-weighted
    /// normalisation divides by a global token count that an all-reduce leaves on the device, so
    /// no rank waits on the host for it.
    pub fn micro_step_weighted(
        &mut self,
        input_ids: &Tensor,
        labels: &Tensor,
        weight: &Tensor,
    ) -> Result<MicroStep> {
        self.micro_step_on(input_ids, labels, None, weight)
    }

    /// [`Trainer::micro_step_weighted`] over packed rows whose documents `seg_start` (int32
    /// `[B, T]`: every token's document start) keeps apart.
    pub fn micro_step_on(
        &mut self,
        input_ids: &Tensor,
        labels: &Tensor,
        seg_start: Option<&Tensor>,
        weight: &Tensor,
    ) -> Result<MicroStep> {
        let (h, aux) = match &self.overlap {
            Some(o) => self
                .model
                .forward_hidden_with(input_ids, seg_start, &|i, f| o.mark(i, f))?,
            None => self
                .model
                .forward_hidden_with(input_ids, seg_start, &|_, _| Ok(()))?,
        };
        let aux = aux.to_kind(crate::model::upcast_kind(h.kind()));
        super::head::backward(self, &h, aux, labels, weight)
    }

    pub fn objective(&self) -> Objective {
        self.objective
    }

    /// Pieces the chunked lm_head + loss of `train/head.rs` needs.
    pub(super) fn head_parts(&self) -> (&MiniMindForCausalLM, Option<&GradScaler>) {
        (&self.model, self.scaler.as_ref())
    }

    /// Unscale (fp16), clip to `clip` (joint L2; `f64::INFINITY` = no clip), AdamW at `lr`
    /// (and Muon at `lr` times its ratio), scaler update, zero gradients. Returns the total gradient norm before clipping (device
    /// scalar; inf/NaN on a non-finite step, which is then skipped: see [`Trainer::nonfinite`]).
    pub fn optimizer_step(&mut self, lr: f64, clip: f64) -> Result<Tensor> {
        self.set_lr(lr);
        self.optimizer_step_at_set_lr(clip)
    }

    /// [`Trainer::optimizer_step`] at the rate last given to [`Trainer::set_lr`]: every value it
    /// reads lives on the device, so (bf16/fp32, no scaler) it can be captured in a CUDA graph.
    pub fn optimizer_step_at_set_lr(&mut self, clip: f64) -> Result<Tensor> {
        let grads = self.grads();
        let params = self.param_tensors();
        if let Some(s) = self.scaler.as_mut() {
            s.unscale(&grads)?;
        }
        let norm = crate::optim::clip::clip_grad_norm(&grads, clip)?;
        // A non-finite gradient skips the step on the device, like fp16's scaler does: with a
        // scaler that is its found_inf (then it backs off), otherwise a non-finite total norm,
        // which the loop reads a step later (no host sync here) to stop or count.
        let found = match &self.scaler {
            Some(s) => s.found_inf.shallow_clone(),
            None => {
                let _guard = tch::no_grad_guard();
                norm.isfinite()
                    .logical_not()
                    .to_kind(Kind::Float)
                    .reshape([1])
            }
        };
        let adamw = |v: &[Tensor]| -> Vec<Tensor> {
            v.iter()
                .zip(&self.adamw_index)
                .filter(|(_, a)| a.is_some())
                .map(|(t, _)| t.shallow_clone())
                .collect()
        };
        let (ap, ag) = (adamw(&params), adamw(&grads));
        self.opt.step_at_set_lr(&ap, &ag, Some(&found))?;
        if let Some((m, _)) = &self.muon {
            m.step(&params, &grads, Some(&found))?;
        }
        self.nonfinite = self.scaler.is_none().then_some(found);
        if let Some(s) = self.scaler.as_mut() {
            s.update();
        }
        // One kernel: every .grad is a view into flat_grads.
        let _ = self.flat_grads.f_zero_()?;
        Ok(norm)
    }

    /// A graph replay of the optimizer step left its flag here (see [`Trainer::nonfinite`]).
    pub(super) fn set_nonfinite(&mut self, flag: Option<Tensor>) {
        self.nonfinite = flag;
    }

    /// Current weights by name, detached copies on the CPU in fp64 (for checks and exports).
    pub fn named_f64(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, p)| {
                (
                    n.clone(),
                    p.detach().to_device(Device::Cpu).to_kind(Kind::Double),
                )
            })
            .collect()
    }

    /// Current gradients by name, copies on the CPU in fp64.
    pub fn named_grads_f64(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, p)| {
                (
                    n.clone(),
                    p.grad().to_device(Device::Cpu).to_kind(Kind::Double),
                )
            })
            .collect()
    }

    /// Everything a resume needs, as tensors (fp32 weights, the gradients accumulated so far in
    /// the current window, AdamW moments and step counts) and as host values (AdamW's step
    /// count, the scaler). The gradients are zero right after an optimizer step.
    pub fn state_dict(&self) -> (Vec<(String, Tensor)>, serde_json::Value) {
        let mut out = Vec::with_capacity(self.params.len() * 5);
        for (i, (name, p)) in self.params.iter().enumerate() {
            out.push((format!("param.{name}"), p.detach()));
            out.push((format!("grad.{name}"), p.grad()));
            match (self.adamw_index[i], &self.muon) {
                (Some(a), _) => {
                    out.push((
                        format!("adam.exp_avg.{name}"),
                        self.opt.exp_avg[a].shallow_clone(),
                    ));
                    out.push((
                        format!("adam.exp_avg_sq.{name}"),
                        self.opt.exp_avg_sq[a].shallow_clone(),
                    ));
                    out.push((
                        format!("adam.step.{name}"),
                        self.opt.steps[a].shallow_clone(),
                    ));
                }
                (None, Some((m, _))) => {
                    if let Some(b) = m.momentum_of(i) {
                        out.push((format!("muon.momentum.{name}"), b.contiguous()));
                    }
                }
                (None, None) => unreachable!("a parameter without AdamW is Muon's"),
            }
        }
        let host = json!({
            "adam_t": self.opt.t,
            "scaler": self.scaler.as_ref().map(|s| {
                let (scale, tracker) = s.state();
                json!({"scale": scale, "growth_tracker": tracker})
            }),
        });
        (out, host)
    }

    /// Restores what [`Trainer::state_dict`] returned; errors name `path` and the tensor.
    pub fn load_state_dict(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        host: &serde_json::Value,
        path: &std::path::Path,
    ) -> Result<()> {
        let get = |key: String| -> Result<&Tensor> {
            tensors.get(&key).with_context(|| {
                format!("{}: resume checkpoint lacks tensor {key}", path.display())
            })
        };
        let params: HashMap<String, Tensor> = self
            .params
            .iter()
            .map(|(n, _)| Ok((n.clone(), get(format!("param.{n}"))?.shallow_clone())))
            .collect::<Result<_>>()?;
        load_named(&mut self.vs, params, &path.display().to_string())?;
        let _guard = tch::no_grad_guard();
        let copy = |dst: &Tensor, key: String| -> Result<()> {
            let src = get(key.clone())?;
            if dst.size() != src.size() {
                bail!(
                    "{}: {key} has shape {:?}, the model needs {:?}",
                    path.display(),
                    src.size(),
                    dst.size()
                );
            }
            let mut d = dst.shallow_clone();
            d.f_copy_(&src.to_kind(dst.kind()).to_device(dst.device()))?;
            Ok(())
        };
        for (i, (name, p)) in self.params.iter().enumerate() {
            copy(&p.grad(), format!("grad.{name}"))?;
            match (self.adamw_index[i], &self.muon) {
                (Some(a), _) => {
                    copy(&self.opt.exp_avg[a], format!("adam.exp_avg.{name}"))?;
                    copy(&self.opt.exp_avg_sq[a], format!("adam.exp_avg_sq.{name}"))?;
                    copy(&self.opt.steps[a], format!("adam.step.{name}"))?;
                }
                (None, Some((m, _))) => {
                    let b = m
                        .momentum_of(i)
                        .with_context(|| format!("Muon has no buffer for {name}"))?;
                    copy(&b, format!("muon.momentum.{name}"))?;
                }
                (None, None) => unreachable!("a parameter without AdamW is Muon's"),
            }
        }
        self.opt.t = host["adam_t"].as_u64().unwrap_or(0);
        if let (Some(s), Some(v)) = (self.scaler.as_mut(), host.get("scaler")) {
            if !v.is_null() {
                s.set_state(
                    v["scale"].as_f64().unwrap_or(65536.0),
                    v["growth_tracker"].as_i64().unwrap_or(0),
                );
            }
        }
        Ok(())
    }
}

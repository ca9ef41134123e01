//! One training step, as the training loop calls it.
//!
//! ```text
//! let mut tr = Trainer::new(&model_cfg, TrainerConfig { precision, device, seed, ..Default::default() })?;
//! // or Trainer::from_named(&model_cfg, tc, weights) to start from given weights
//! for step in 1..=total {                                   // 1-based micro-steps
//!     let lr = schedule::lr_at(step, total, base_lr, warmup);
//!     let w = accumulation::loss_weight(norm, accum, batch.count, window_count);
//!     let out = tr.micro_step(&batch.input_ids, &batch.labels, w)?;   // forward + backward
//!     if accumulation::is_optimizer_step(step, accum, total) {
//!         // data parallel: dist::average_gradients(comm, &mut tr.grads(), mode)?
//!         let grad_norm = tr.optimizer_step(lr, clip)?;  // unscale, clip, AdamW, zero grads
//!     }
//!     // log: out.loss / out.ce / out.aux / grad_norm are device tensors; read them
//!     // (f64::try_from) only when logging, to keep host syncs out of the hot path.
//! }
//! ```
//!
//! `micro_step` backpropagates `(ce + aux) * weight` (times the loss scale in fp16) into the
//! parameters' `.grad`, which accumulate until `optimizer_step` clips them jointly, runs AdamW
//! and zeroes them. Gradients are defined (zero) from construction on, so parameters a
//! micro-batch never reaches (an MoE expert that got no token) still have a gradient tensor for
//! the multi-tensor kernels and collectives. Only MoE dispatch reads the host (expert sizes).

use std::collections::HashMap;

use anyhow::{Context, Result};
use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::adamw::{AdamW, AdamWConfig, AdamWImpl};
use crate::config::ModelConfig;
use crate::model::{load_named, named_parameters, MiniMindForCausalLM};
use crate::precision::Precision;
use crate::scaler::GradScaler;

#[derive(Debug, Clone)]
pub struct TrainerConfig {
    pub precision: Precision,
    pub device: Device,
    /// tch::manual_seed before the init.
    pub seed: i64,
    pub adamw: AdamWConfig,
    pub adamw_impl: AdamWImpl,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            precision: Precision::Fp32,
            device: Device::Cpu,
            seed: 42,
            adamw: AdamWConfig::default(),
            adamw_impl: AdamWImpl::Fused,
        }
    }
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
    pub cfg: ModelConfig,
    pub precision: Precision,
    pub vs: VarStore,
    pub model: MiniMindForCausalLM,
    /// Parameters sorted by name (shallow handles into `vs`).
    pub params: Vec<(String, Tensor)>,
    pub opt: AdamW,
    /// fp16 only.
    pub scaler: Option<GradScaler>,
}

impl Trainer {
    /// A freshly initialised model (seeded) with zeroed gradients and optimizer state.
    pub fn new(cfg: &ModelConfig, tc: TrainerConfig) -> Result<Self> {
        tch::manual_seed(tc.seed);
        let mut vs = VarStore::new(tc.device);
        let mut model = MiniMindForCausalLM::new(&vs.root(), cfg)?;
        if tc.precision.param_kind() != tch::Kind::Float {
            vs.set_kind(tc.precision.param_kind());
        }
        model.set_compute_kind(tc.precision.compute_kind());
        let params = named_parameters(&vs);
        // Define every .grad as zeros: one backward of 0 * sum(params).
        let zero: Tensor = params.iter().map(|(_, p)| p.sum(p.kind()) * 0.0).sum();
        zero.backward();
        let tensors: Vec<Tensor> = params.iter().map(|(_, p)| p.shallow_clone()).collect();
        let opt = AdamW::new(&tensors, tc.adamw, tc.adamw_impl);
        let scaler = tc
            .precision
            .needs_scaler()
            .then(|| GradScaler::new_default(tc.device));
        Ok(Trainer {
            cfg: cfg.clone(),
            precision: tc.precision,
            vs,
            model,
            params,
            opt,
            scaler,
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
        load_named(&mut tr.vs, named, source)?;
        Ok(tr)
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Parameter handles in name order.
    pub fn param_tensors(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, p)| p.shallow_clone()).collect()
    }

    /// Gradient handles in name order (in place edits reach the parameters' .grad).
    pub fn grads(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, p)| p.grad()).collect()
    }

    /// Forward and backward of `(ce + aux) * weight`; gradients accumulate.
    pub fn micro_step(
        &mut self,
        input_ids: &Tensor,
        labels: &Tensor,
        weight: f64,
    ) -> Result<MicroStep> {
        let out = self.model.forward(input_ids);
        let (ce, count) = crate::loss::shifted_cross_entropy(&out.logits, labels);
        let aux = out.aux_loss.to_kind(ce.kind());
        let loss = &ce + &aux;
        let scaled = &loss * weight;
        let scaled = match &self.scaler {
            Some(s) => s.scale_loss(&scaled),
            None => scaled,
        };
        scaled.f_backward().context("backward")?;
        Ok(MicroStep {
            loss: loss.detach(),
            ce: ce.detach(),
            aux: aux.detach(),
            count,
        })
    }

    /// Unscale (fp16), clip to `clip` (joint L2; `f64::INFINITY` = no clip), AdamW at `lr`,
    /// scaler update, zero gradients. Returns the total gradient norm before clipping (device
    /// scalar; inf/NaN on an fp16 overflow step, which is then skipped).
    pub fn optimizer_step(&mut self, lr: f64, clip: f64) -> Result<Tensor> {
        let grads = self.grads();
        let params = self.param_tensors();
        if let Some(s) = self.scaler.as_mut() {
            s.unscale(&grads)?;
        }
        let norm = crate::clip::clip_grad_norm(&grads, clip)?;
        let found = self.scaler.as_ref().map(|s| s.found_inf.shallow_clone());
        self.opt.step(&params, &grads, lr, found.as_ref())?;
        if let Some(s) = self.scaler.as_mut() {
            s.update();
        }
        crate::fused::zero(&grads)?;
        Ok(norm)
    }

    /// Current weights by name, detached copies on the CPU in fp64 (for checks and exports).
    pub fn named_f64(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, p)| {
                (
                    n.clone(),
                    p.detach().to_device(Device::Cpu).to_kind(tch::Kind::Double),
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
                    p.grad().to_device(Device::Cpu).to_kind(tch::Kind::Double),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn cfg() -> ModelConfig {
        ModelConfig {
            hidden_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            vocab_size: 32,
            use_moe: true,
            n_routed_experts: 4,
            num_experts_per_tok: 1,
            ..Default::default()
        }
    }

    /// Every parameter has a gradient tensor, even experts no token reached, and the step moves
    /// the weights and zeroes the gradients.
    #[test]
    fn a_step_moves_weights_and_zeroes_grads() {
        let mut tr = Trainer::new(&cfg(), TrainerConfig::default()).unwrap();
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).reshape([1, 4]);
        let before: Vec<Tensor> = tr
            .param_tensors()
            .iter()
            .map(|p| p.detach().copy())
            .collect();
        let out = tr.micro_step(&ids, &ids, 1.0).unwrap();
        assert!(f64::try_from(&out.loss).unwrap() > 0.0);
        assert!(tr.grads().iter().all(|g| g.defined()));
        let norm = tr.optimizer_step(1e-2, 1.0).unwrap();
        assert!(f64::try_from(&norm).unwrap() > 0.0);
        let moved = tr
            .param_tensors()
            .iter()
            .zip(&before)
            .any(|(p, b)| !p.equal(b));
        assert!(moved);
        let total: f64 = tr
            .grads()
            .iter()
            .map(|g| f64::try_from(g.abs().sum(Kind::Double)).unwrap())
            .sum();
        assert_eq!(total, 0.0);
    }

    /// fp16 with a scaler: an overflowing step is skipped on the device and the scale halves.
    #[test]
    fn fp16_skips_a_non_finite_step() {
        let tc = TrainerConfig {
            precision: Precision::Fp16,
            ..Default::default()
        };
        let mut tr = Trainer::new(&cfg(), tc).unwrap();
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).reshape([1, 4]);
        tr.micro_step(&ids, &ids, 1.0).unwrap();
        let _ = tr.grads()[0].get(0).get(0).fill_(f64::INFINITY);
        let before: Vec<Tensor> = tr
            .param_tensors()
            .iter()
            .map(|p| p.detach().copy())
            .collect();
        let norm = tr.optimizer_step(1e-2, 1.0).unwrap();
        assert!(!f64::try_from(&norm).unwrap().is_finite());
        assert!(tr
            .param_tensors()
            .iter()
            .zip(&before)
            .all(|(p, b)| p.equal(b)));
        assert_eq!(tr.scaler.as_ref().unwrap().scale_value(), 32768.0);
    }
}

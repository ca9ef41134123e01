//! AdamW with torch semantics (`torch.optim.AdamW`, no amsgrad), on state tensors we own.
//!
//! `p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;`
//! `p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)`.
//!
//! `Fused` runs libtorch's `_fused_adamw_` (the kernel behind `AdamW(fused=True)`, CPU and CUDA):
//! one multi-tensor launch, lr read from a device tensor refilled each step (no host sync), and
//! with fp16 the whole step skips itself on the device when the scaler found a non-finite grad.
//! `PerTensor` is the same update written with plain tensor ops (fallback and cross-check); it
//! reads `found_inf` on the host.

use anyhow::Result;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch's defaults except weight decay: MiniMind's 0.01.
    fn default() -> Self {
        AdamWConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

fn lr_kind(params: &[Tensor]) -> Kind {
    // The CUDA fused kernel reads lr as fp32 whatever the parameters' kind; on the CPU it takes
    // an fp64 rate for fp64 parameters (an fp32 one would round lr by 3e-8 relative).
    match params.first().map(|p| (p.kind(), p.device())) {
        Some((Kind::Double, tch::Device::Cpu)) => Kind::Double,
        _ => Kind::Float,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdamWImpl {
    #[default]
    Fused,
    PerTensor,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    pub imp: AdamWImpl,
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
    /// Per-parameter step counts (fp32 scalars on the device, as torch keeps them for fused).
    pub steps: Vec<Tensor>,
    /// Host step count: steps taken (`PerTensor`) or attempted (`Fused`, whose device `steps`
    /// are the authority: a step skipped for a non-finite gradient does not count there).
    pub t: u64,
    lr: Tensor,
}

impl AdamW {
    pub fn new(params: &[Tensor], cfg: AdamWConfig, imp: AdamWImpl) -> Self {
        let dev = params
            .first()
            .map(|p| p.device())
            .unwrap_or(tch::Device::Cpu);
        AdamW {
            cfg,
            imp,
            exp_avg: params.iter().map(|p| p.zeros_like().detach()).collect(),
            exp_avg_sq: params.iter().map(|p| p.zeros_like().detach()).collect(),
            steps: params
                .iter()
                .map(|_| Tensor::zeros([], (Kind::Float, dev)))
                .collect(),
            t: 0,
            lr: Tensor::zeros([1], (lr_kind(params), dev)),
        }
    }

    /// One step at `lr`. `found_inf` (fp16): skip when non-zero.
    pub fn step(
        &mut self,
        params: &[Tensor],
        grads: &[Tensor],
        lr: f64,
        found_inf: Option<&Tensor>,
    ) -> Result<()> {
        self.set_lr(lr);
        self.step_at_set_lr(params, grads, found_inf)
    }

    /// Writes `lr` into the device tensor the fused kernel reads. A captured CUDA graph sets the
    /// rate here, outside the graph, before each replay.
    pub fn set_lr(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        let _ = self.lr.fill_(lr);
    }

    /// One step at the rate last given to [`AdamW::set_lr`]: no host value enters the kernels
    /// (`Fused`), so the step can be captured in a CUDA graph.
    pub fn step_at_set_lr(
        &mut self,
        params: &[Tensor],
        grads: &[Tensor],
        found_inf: Option<&Tensor>,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        match self.imp {
            AdamWImpl::Fused => {
                let h = crate::kernels::ops::AdamWHyper {
                    beta1: self.cfg.betas.0,
                    beta2: self.cfg.betas.1,
                    eps: self.cfg.eps,
                    weight_decay: self.cfg.weight_decay,
                };
                let p: Vec<Tensor> = params.iter().map(|t| t.detach()).collect();
                crate::kernels::ops::adamw_step(
                    &p,
                    grads,
                    &self.exp_avg,
                    &self.exp_avg_sq,
                    &self.steps,
                    &self.lr,
                    h,
                    None,
                    found_inf,
                )?;
                // Steps attempted; a skipped one (found_inf) is undone in the device counters.
                self.t += 1;
                Ok(())
            }
            AdamWImpl::PerTensor => {
                let lr = f64::try_from(self.lr.reshape([-1]).get(0))?;
                if let Some(f) = found_inf {
                    if f64::try_from(f.reshape([-1]).get(0))? != 0.0 {
                        return Ok(());
                    }
                }
                self.t += 1;
                for s in &self.steps {
                    let mut s = s.shallow_clone();
                    let _ = s.fill_(self.t as f64);
                }
                let (b1, b2) = self.cfg.betas;
                let bc1 = 1.0 - b1.powi(self.t as i32);
                let bc2_sqrt = (1.0 - b2.powi(self.t as i32)).sqrt();
                let step_size = lr / bc1;
                for (i, (p, g)) in params.iter().zip(grads).enumerate() {
                    let mut p = p.detach();
                    let mut m = self.exp_avg[i].shallow_clone();
                    let mut v = self.exp_avg_sq[i].shallow_clone();
                    let _ = p.g_mul_scalar_(1.0 - lr * self.cfg.weight_decay);
                    let _ = m.lerp_(g, 1.0 - b1);
                    let _ = v.g_mul_scalar_(b2);
                    let _ = v.addcmul_(g, &(g * (1.0 - b2)));
                    let denom = v.sqrt() / bc2_sqrt + self.cfg.eps;
                    let _ = p.addcdiv_(&(&m * (-step_size)), &denom);
                }
                Ok(())
            }
        }
    }
}

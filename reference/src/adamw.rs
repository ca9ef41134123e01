//! AdamW with PyTorch's (non-fused, non-amsgrad) semantics.

use crate::params::zeros_like;
use crate::Params;

/// Hyper-parameters; defaults are torch's except weight decay, which is MiniMind's 0.01.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Optimizer state: first and second moments per parameter and the step count t.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub m: Params,
    pub v: Params,
    pub t: u64,
}

impl AdamW {
    pub fn new(params: &Params, cfg: AdamWConfig) -> Self {
        AdamW {
            cfg,
            m: zeros_like(params),
            v: zeros_like(params),
            t: 0,
        }
    }

    /// One step at learning rate `lr`, in torch's operation order:
    /// `p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;`
    /// `p -= (lr / (1-b1^t)) * m / (sqrt(v) / sqrt(1-b2^t) + eps)`.
    pub fn step(&mut self, params: &mut Params, grads: &Params, lr: f64) {
        self.t += 1;
        let (b1, b2) = self.cfg.betas;
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2_sqrt = (1.0 - b2.powi(self.t as i32)).sqrt();
        let step_size = lr / bc1;
        for (name, p) in params.iter_mut() {
            let g = grads
                .get(name)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let m = self.m.get_mut(name).expect("moment exists");
            let v = self.v.get_mut(name).expect("moment exists");
            *p *= 1.0 - lr * self.cfg.weight_decay;
            ndarray::Zip::from(p)
                .and(m)
                .and(v)
                .and(g)
                .for_each(|p, m, v, &g| {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    let denom = v.sqrt() / bc2_sqrt + self.cfg.eps;
                    *p -= step_size * *m / denom;
                });
        }
    }
}

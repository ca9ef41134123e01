//! Dynamic loss scaling for fp16 (`torch.amp.GradScaler` semantics).

use crate::Params;

#[derive(Debug, Clone, PartialEq)]
pub struct GradScaler {
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u32,
    /// Clean steps since the last change of scale.
    pub growth_tracker: u32,
}

impl Default for GradScaler {
    /// init 2^16, growth 2, backoff 0.5, growth_interval 2000.
    fn default() -> Self {
        GradScaler::new(65536.0, 2.0, 0.5, 2000)
    }
}

impl GradScaler {
    pub fn new(scale: f64, growth_factor: f64, backoff_factor: f64, growth_interval: u32) -> Self {
        GradScaler {
            scale,
            growth_factor,
            backoff_factor,
            growth_interval,
            growth_tracker: 0,
        }
    }

    /// Multiplies every gradient by `1/scale`; returns true if any gradient is non-finite
    /// (the optimizer step must then be skipped).
    pub fn unscale(&self, grads: &mut Params) -> bool {
        let inv = 1.0 / self.scale;
        let mut found_inf = false;
        for g in grads.values_mut() {
            g.mapv_inplace(|v| {
                found_inf |= !v.is_finite();
                v * inv
            });
        }
        found_inf
    }

    /// After a step: non-finite -> scale *= backoff, tracker = 0; otherwise tracker += 1 and
    /// on reaching `growth_interval` scale *= growth, tracker = 0.
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker == self.growth_interval {
                self.scale *= self.growth_factor;
                self.growth_tracker = 0;
            }
        }
    }
}

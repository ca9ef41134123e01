//! Dynamic loss scaling for fp16 (`torch.amp.GradScaler` semantics), kept on the device.
//!
//! `scale` (fp32 `[1]`), `growth_tracker` (int32 `[1]`) and `found_inf` (fp32 `[1]`) are device
//! tensors; unscaling uses `_amp_foreach_non_finite_check_and_unscale_` and the update
//! `_amp_update_scale_`, so a step never waits for the GPU. Order per optimizer step:
//! `scale_loss` before backward; `unscale` before clipping; the optimizer step skips itself when
//! `found_inf` (fused AdamW reads it on the device); then `update`.

use anyhow::Result;
use tch::{Device, Kind, Tensor};

pub struct GradScaler {
    pub scale: Tensor,
    pub growth_tracker: Tensor,
    pub found_inf: Tensor,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: i64,
}

impl GradScaler {
    /// torch's defaults: init 2^16, growth 2, backoff 0.5, growth_interval 2000.
    pub fn new_default(device: Device) -> Self {
        GradScaler::new(65536.0, 2.0, 0.5, 2000, device)
    }

    pub fn new(
        init: f64,
        growth_factor: f64,
        backoff_factor: f64,
        growth_interval: i64,
        device: Device,
    ) -> Self {
        GradScaler {
            scale: Tensor::full([1], init, (Kind::Float, device)),
            growth_tracker: Tensor::zeros([1], (Kind::Int, device)),
            found_inf: Tensor::zeros([1], (Kind::Float, device)),
            growth_factor,
            backoff_factor,
            growth_interval,
        }
    }

    /// loss * scale (before backward).
    pub fn scale_loss(&self, loss: &Tensor) -> Tensor {
        loss * self.scale.to_kind(loss.kind()).reshape([])
    }

    /// grads *= 1/scale; `found_inf` = 1 if any gradient is non-finite (reset first).
    pub fn unscale(&mut self, grads: &[Tensor]) -> Result<()> {
        let _ = self.found_inf.zero_();
        let inv = self.scale.reciprocal();
        crate::kernels::ops::unscale(grads, &self.found_inf, &inv)
    }

    /// After the (possibly skipped) step: backoff on found_inf, else count towards growth.
    pub fn update(&mut self) {
        let _ = self.scale.internal_amp_update_scale_(
            &self.growth_tracker,
            &self.found_inf,
            self.growth_factor,
            self.backoff_factor,
            self.growth_interval,
        );
    }

    /// The current scale (host sync: for logs and checkpoints only).
    pub fn scale_value(&self) -> f64 {
        f64::try_from(self.scale.reshape([])).expect("scale is a scalar")
    }

    /// Whether the last unscale found a non-finite gradient (host sync).
    pub fn found_inf_value(&self) -> bool {
        f64::try_from(self.found_inf.reshape([])).expect("found_inf is a scalar") != 0.0
    }

    /// (scale, growth_tracker) for checkpoints (host sync).
    pub fn state(&self) -> (f64, i64) {
        (
            self.scale_value(),
            i64::try_from(self.growth_tracker.reshape([])).expect("tracker"),
        )
    }

    pub fn set_state(&mut self, scale: f64, tracker: i64) {
        let _ = self.scale.fill_(scale);
        let _ = self.growth_tracker.fill_(tracker);
    }
}

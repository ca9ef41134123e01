//! The reference pretraining loop (MiniMind `train_epoch` after its accumulation fix).

use ndarray::Array2;

use crate::accumulation::is_optimizer_step;
use crate::adamw::{AdamW, AdamWConfig};
use crate::params::zeros_like;
use crate::{clip, model, schedule, ModelConfig, Params};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainConfig {
    pub base_lr: f64,
    pub accumulation_steps: u64,
    pub clip: f64,
    pub adamw: AdamWConfig,
}

/// One micro-step: lr in force, loss (ce + aux, before dividing by accum), and the grad norm
/// before clipping when an optimizer step happened.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRow {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub ce: f64,
    pub aux: f64,
    pub grad_norm: Option<f64>,
}

/// Runs every (input_ids, labels) batch once, in order, updating `params`:
/// before micro-step s (1-based) lr = cosine_lr(s, total, base); grads += d(total/accum);
/// on `s % accum == 0` or the last step: clip, AdamW at lr, zero grads.
pub fn train(
    cfg: &ModelConfig,
    params: &mut Params,
    batches: &[(Array2<i64>, Array2<i64>)],
    tc: &TrainConfig,
) -> Vec<StepRow> {
    let total = batches.len() as u64;
    let mut opt = AdamW::new(params, tc.adamw);
    let mut acc = zeros_like(params);
    let mut rows = Vec::with_capacity(batches.len());
    for (i, (ids, labels)) in batches.iter().enumerate() {
        let step = i as u64 + 1;
        let lr = schedule::cosine_lr(step, total, tc.base_lr);
        let (out, g) = model::forward_backward(cfg, params, ids.view(), labels.view());
        model::add_scaled(&mut acc, &g, 1.0 / tc.accumulation_steps as f64);
        let grad_norm = is_optimizer_step(step, tc.accumulation_steps, total).then(|| {
            let norm = clip::clip_grad_norm(&mut acc, tc.clip);
            opt.step(params, &acc, lr);
            acc = zeros_like(params);
            norm
        });
        rows.push(StepRow {
            step,
            lr,
            loss: out.total,
            ce: out.ce,
            aux: out.aux,
            grad_norm,
        });
    }
    rows
}

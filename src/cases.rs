//! Model cases made by the reference implementation (the float64 oracle) instead of MiniMind, for
//! shapes the golden fixtures do not reach; the fast path is checked against them.

use ndarray::Array2;
use reference::{adamw::AdamW, clip, ModelConfig};

use crate::fixtures::{AdamWJson, ModelFixture};

/// The reference's clip_grad_norm_(fx.clip) on unclipped `grads`, then one AdamW step from the
/// fixture's initial weights.
pub fn reference_step(fx: &ModelFixture, mut grads: reference::Params) -> reference::Params {
    clip::clip_grad_norm(&mut grads, fx.clip);
    let mut params = fx.params.clone();
    let mut opt = AdamW::new(&params, fx.adamw.config());
    opt.step(&mut params, &grads, fx.adamw.lr);
    params
}

/// Every reference-made case.
pub fn all() -> Vec<ModelFixture> {
    vec![head_dim_64()]
}

/// A model case made by the reference implementation (the float64 oracle) instead of MiniMind,
/// for a shape the golden fixtures do not reach: head dim 64 (the fixtures' is 16), where the
/// bf16 CUDA path runs our own attention kernels (fast/csrc/attention.cu). d 128, 2 layers,
/// 2 query heads on 1 kv head (GQA), vocab 512, FFN derived (384); B 2, T 100 (a full 64-row
/// tile and a partial one); the second row's last 9 labels are padding (-100). Weights from
/// `reference::params::init_params` (seed 64), token ids from a fixed LCG; logits, losses and
/// gradients from `reference::model::forward_backward`, and the weights after clip 1.0 + one
/// AdamW step (the golden fixtures' settings) from the reference's clip and AdamW.
pub fn head_dim_64() -> ModelFixture {
    let config = ModelConfig {
        hidden_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        vocab_size: 512,
        ..ModelConfig::default()
    };
    let (b, t) = (2, 100);
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let input_ids = Array2::from_shape_fn((b, t), |_| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 33) % config.vocab_size as u64) as i64
    });
    let mut labels = input_ids.clone();
    labels
        .slice_mut(ndarray::s![1, t - 9..])
        .fill(reference::loss::IGNORE_INDEX);
    let params = reference::params::init_params(&config, 64);
    let (out, grads) =
        reference::model::forward_backward(&config, &params, input_ids.view(), labels.view());
    let mut fx = ModelFixture {
        name: "ref_head_dim_64".to_string(),
        ce_loss: out.ce,
        aux_loss: out.aux,
        total_loss: out.total,
        grad_total_norm_before_clip: reference::clip::total_norm(&grads),
        clip: 1.0,
        adamw: AdamWJson {
            lr: 5e-4,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        },
        input_ids,
        labels,
        logits: out.logits.into_dyn(),
        params,
        grads: reference::Params::new(),
        after_step: reference::Params::new(),
        config,
    };
    fx.after_step = reference_step(&fx, grads.clone());
    fx.grads = grads;
    fx
}

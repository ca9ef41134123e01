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
    vec![head_dim_64(), packed_documents()]
}

/// Tokens from a fixed LCG, `[b, t]`, in `0..vocab`.
fn lcg_ids(b: usize, t: usize, vocab: usize, mut state: u64) -> Array2<i64> {
    Array2::from_shape_fn((b, t), |_| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 33) % vocab as u64) as i64
    })
}

/// A fixture made by the reference from `config`, its weights (seed), the batch and how it runs:
/// logits, losses and gradients of `reference::model::forward_backward_with`, and the weights
/// after clip 1.0 + one AdamW step (the golden fixtures' settings).
fn made_by_reference(
    name: &str,
    config: ModelConfig,
    seed: u64,
    input_ids: Array2<i64>,
    labels: Array2<i64>,
    run: crate::fixtures::FixtureRun,
) -> ModelFixture {
    let params = reference::params::init_params(&config, seed);
    let (out, grads) = reference::model::forward_backward_with(
        &config,
        &params,
        input_ids.view(),
        labels.view(),
        &run.reference(),
    );
    let mut fx = ModelFixture {
        name: name.to_string(),
        run,
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

/// Packed rows with document boundaries (`--data-mode packed-docs`), laid out by the reference's
/// `pack_docs` from documents of 3 to 90 tokens: several documents per row, a document continued
/// from the previous row (its segment at 0), single-token segments at row ends, the padded tail
/// of the last row; d 128, head dim 64 (our attention kernels on the bf16 CUDA path), B 3, T 100.
pub fn packed_documents() -> ModelFixture {
    let config = ModelConfig {
        hidden_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        vocab_size: 512,
        ..ModelConfig::default()
    };
    let lengths = [40usize, 3, 90, 7, 1, 55, 12, 60];
    let raw = lcg_ids(1, lengths.iter().sum(), 500, 0x9e37_79b9_7f4a_7c15);
    let mut at = 0;
    let docs: Vec<Vec<u32>> = lengths
        .iter()
        .map(|&n| {
            let d = raw
                .row(0)
                .slice(ndarray::s![at..at + n])
                .iter()
                .map(|&x| x as u32 + 3)
                .collect();
            at += n;
            d
        })
        .collect();
    let rows =
        reference::dataset::pack_docs(&docs, 100, reference::dataset::SpecialTokens::default());
    let take = 3.min(rows.len());
    let input_ids = Array2::from_shape_fn((take, 100), |(r, c)| rows[r].input_ids[c]);
    let labels = Array2::from_shape_fn((take, 100), |(r, c)| rows[r].labels[c]);
    let run = crate::fixtures::FixtureRun {
        masked_lm: false,
        segments: Some(
            rows[..take]
                .iter()
                .map(|r| r.segment_starts.clone())
                .collect(),
        ),
    };
    made_by_reference("ref_packed_documents", config, 65, input_ids, labels, run)
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
        run: Default::default(),
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

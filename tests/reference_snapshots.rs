//! Snapshots of reference outputs (golden/snapshots/): a change in any of these numbers is a
//! change of behaviour and must be reviewed. Floats are rounded so snapshots are stable.

use ndarray::Array2;
use reference::adamw::AdamWConfig;
use reference::sampler::{self, SplitMix64};
use reference::scaler::GradScaler;
use reference::{params, schedule, train, ModelConfig, Params};
use serde_json::json;

fn round(v: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (v * m).round() / m
}

macro_rules! snapshot {
    ($name:expr, $value:expr) => {
        insta::with_settings!({snapshot_path => "../golden/snapshots", prepend_module_to_snapshot => false}, {
            insta::assert_json_snapshot!($name, $value);
        });
    };
}

#[test]
fn lr_table() {
    // base 5e-4 over 10 micro-steps, plus the same with 2 warmup steps
    let rows: Vec<_> = (0..=10)
        .map(|s| {
            json!({
                "step": s,
                "lr": round(schedule::cosine_lr(s, 10, 5e-4), 12),
                "lr_warmup2": round(schedule::lr_at(s, 10, 5e-4, 2), 12),
            })
        })
        .collect();
    snapshot!("lr_table", rows);
}

#[test]
fn sampler_outputs() {
    let perm0 = sampler::epoch_permutation(10, 42, 0);
    let perm1 = sampler::epoch_permutation(10, 42, 1);
    let mut rng = SplitMix64::new(0);
    let first3: Vec<String> = (0..3).map(|_| rng.next_u64().to_string()).collect();
    let value = json!({
        "splitmix64_seed0_first3": first3,
        "epoch_permutation_n10_seed42_epoch0": perm0,
        "epoch_permutation_n10_seed42_epoch1": perm1,
        "skip_batches_bs3_skip1": sampler::skip_batches(&perm0, 3, 1),
        "distributed_w3": (0..3).map(|r| sampler::distributed_indices(&perm0, 3, r, false)).collect::<Vec<_>>(),
        "distributed_w3_drop_last": (0..3).map(|r| sampler::distributed_indices(&perm0, 3, r, true)).collect::<Vec<_>>(),
        "global_batch_g1_bs2_w2": (0..2).map(|r| sampler::global_batch(&perm0, 1, 2, 2, r)).collect::<Vec<_>>(),
    });
    snapshot!("sampler_outputs", value);
}

#[test]
fn scaler_trajectory() {
    // growth_interval 3; overflow injected at steps 2, 3 and 9
    let mut s = GradScaler::new(65536.0, 2.0, 0.5, 3);
    let rows: Vec<_> = (0..12)
        .map(|step| {
            let overflow = matches!(step, 2 | 3 | 9);
            let g = if overflow { f64::INFINITY } else { s.scale };
            let mut grads = Params::from([("w".to_string(), ndarray::arr1(&[g]).into_dyn())]);
            let found = s.unscale(&mut grads);
            s.update(found);
            json!({"step": step, "skipped": found, "scale": s.scale, "tracker": s.growth_tracker})
        })
        .collect();
    snapshot!("scaler_trajectory", rows);
}

#[test]
fn tiny_model_loss_trajectory() {
    let cfg = ModelConfig {
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        vocab_size: 32,
        ..ModelConfig::default()
    };
    let mut p = params::init_params(&cfg, 0);
    // six micro-batches of 2 x 8 tokens drawn from SplitMix64(1); the last row has 3 pads
    let mut r = SplitMix64::new(1);
    let batches: Vec<(Array2<i64>, Array2<i64>)> = (0..6)
        .map(|_| {
            let ids = Array2::from_shape_fn((2, 8), |(i, j)| {
                if i == 1 && j >= 5 {
                    0
                } else {
                    1 + (r.next_u64() % 31) as i64
                }
            });
            let labels = ids.mapv(|v| if v == 0 { -100 } else { v });
            (ids, labels)
        })
        .collect();
    let tc = train::TrainConfig {
        base_lr: 5e-3,
        accumulation_steps: 2,
        clip: 1.0,
        adamw: AdamWConfig::default(),
    };
    let rows: Vec<_> = train::train(&cfg, &mut p, &batches, &tc)
        .into_iter()
        .map(|s| {
            json!({
                "step": s.step,
                "lr": round(s.lr, 12),
                "loss": round(s.loss, 8),
                "grad_norm": s.grad_norm.map(|g| round(g, 8)),
            })
        })
        .collect();
    snapshot!("tiny_model_loss_trajectory", rows);
}

//! The training step (`fast::train::trainer::Trainer`): gradients always defined, optimizer
//! steps that move the weights or, when not finite, are skipped on the device, and the chunked
//! lm_head + loss equal to one pass.
use std::collections::HashMap;

use fast::kernels::KernelConfig;
use fast::model::precision::Precision;
use fast::model::ModelConfig;
use fast::train::trainer::{Trainer, TrainerConfig};
use tch::{Kind, Tensor};

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
    assert_eq!(tr.scaler().unwrap().scale_value(), 32768.0);
}

/// fp32 without a scaler: a non-finite gradient skips the whole step on the device (weights,
/// moments and step counters untouched) and raises the `nonfinite` flag; a clean step clears it.
#[test]
fn fp32_skips_a_non_finite_step_and_flags_it() {
    let mut tr = Trainer::new(&cfg(), TrainerConfig::default()).unwrap();
    let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).reshape([1, 4]);
    tr.micro_step(&ids, &ids, 1.0).unwrap();
    let _ = tr.grads()[0].get(0).get(0).fill_(f64::NAN);
    let before: Vec<Tensor> = tr
        .param_tensors()
        .iter()
        .map(|p| p.detach().copy())
        .collect();
    let _ = tr.optimizer_step(1e-2, 1.0).unwrap();
    assert!(tr
        .param_tensors()
        .iter()
        .zip(&before)
        .all(|(p, b)| p.equal(b)));
    assert_eq!(
        f64::try_from(tr.nonfinite().unwrap().sum(Kind::Double)).unwrap(),
        1.0
    );
    assert_eq!(f64::try_from(&tr.optimizer().steps[0]).unwrap(), 0.0);
    assert_eq!(
        f64::try_from(tr.optimizer().exp_avg[0].abs().sum(Kind::Double)).unwrap(),
        0.0
    );
    tr.micro_step(&ids, &ids, 1.0).unwrap();
    let _ = tr.optimizer_step(1e-2, 1.0).unwrap();
    assert_eq!(
        f64::try_from(tr.nonfinite().unwrap().sum(Kind::Double)).unwrap(),
        0.0
    );
    assert_eq!(f64::try_from(&tr.optimizer().steps[0]).unwrap(), 1.0);
}

/// The chunked lm_head + loss gives the loss and gradients of one pass over the whole batch
/// (fp64: equal to round-off), pads and the unpredicted last position included.
#[test]
fn chunked_loss_equals_one_pass() {
    let tc = TrainerConfig {
        precision: Precision::Fp64,
        ..Default::default()
    };
    let ids = Tensor::from_slice(&[1i64, 5, 7, 9, 2, 0, 3, 4, 6, 8, 10, 2]).reshape([2, 6]);
    let labels = Tensor::from_slice(&[1i64, 5, 7, 9, 2, -100, 3, 4, 6, 8, 10, 2]).reshape([2, 6]);
    // One set of weights for every run (the seeded init shares libtorch's global generator
    // with tests running in parallel).
    let weights: HashMap<String, Tensor> = Trainer::new(&cfg(), tc.clone())
        .unwrap()
        .named_f64()
        .into_iter()
        .collect();
    let run = |chunk: Option<i64>| {
        let named = weights.iter().map(|(k, v)| (k.clone(), v.copy())).collect();
        let mut tr = Trainer::from_named(&cfg(), tc.clone(), named, "test").unwrap();
        tr.set_kernels(KernelConfig {
            loss_chunk_rows: chunk.unwrap_or(0) as usize,
            ..KernelConfig::default()
        });
        let out = tr.micro_step(&ids, &labels, 0.5).unwrap();
        (f64::try_from(&out.loss).unwrap(), tr.named_grads_f64())
    };
    let (l1, g1) = run(None);
    for chunk in [1, 3, 4, 100] {
        let (l2, g2) = run(Some(chunk));
        assert!((l1 - l2).abs() < 1e-12, "chunk {chunk}: loss {l1} vs {l2}");
        for ((n, a), (_, b)) in g1.iter().zip(&g2) {
            let diff = f64::try_from((a - b).abs().max()).unwrap();
            assert!(diff < 1e-12, "chunk {chunk}: {n} differs by {diff}");
        }
    }
}

//! Fast (libtorch, fp32, CPU) against reference (ndarray, f64) on the same inputs, per component
//! and for the whole training step, at two sizes. Names are `component/size/path`.
//!
//! `cargo bench --bench fast_vs_reference -- --quick` for a short run.

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use harness::convert::{to_tensor, to_tensor_i64};
use harness::verify::fast as verify_fast;
use ndarray::Array2;
use tch::{Device, Kind, Tensor};

struct Size {
    name: &'static str,
    cfg: reference::ModelConfig,
    b: usize,
    t: usize,
}

fn sizes() -> Vec<Size> {
    let tiny = reference::ModelConfig {
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        vocab_size: 512,
        intermediate_size: Some(192),
        ..Default::default()
    };
    let small = reference::ModelConfig {
        hidden_size: 128,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        vocab_size: 2048,
        intermediate_size: None,
        ..Default::default()
    };
    vec![
        Size {
            name: "tiny",
            cfg: tiny,
            b: 2,
            t: 16,
        },
        Size {
            name: "small",
            cfg: small,
            b: 4,
            t: 64,
        },
    ]
}

fn batch(s: &Size) -> (Array2<i64>, Array2<i64>) {
    let mut rng = fast::data::order::SplitMix64::new(7);
    let ids = Array2::from_shape_fn((s.b, s.t), |_| {
        1 + (rng.next_u64() % (s.cfg.vocab_size as u64 - 1)) as i64
    });
    (ids.clone(), ids)
}

fn bench(c: &mut Criterion) {
    for s in sizes() {
        let params = reference::params::init_params(&s.cfg, 1);
        let (ids, labels) = batch(&s);
        let (fi, fl) = (to_tensor_i64(&ids), to_tensor_i64(&labels));
        let adamw = fast::optim::adamw::AdamWConfig::default();
        let mut tr = verify_fast::trainer(
            &s.cfg,
            &params,
            adamw,
            fast::model::precision::Precision::Fp32,
            Device::Cpu,
        )
        .expect("trainer");
        let n = s.name;

        // Model forward (logits and losses).
        c.bench_function(&format!("forward/{n}/reference"), |b| {
            b.iter(|| reference::model::forward(&s.cfg, &params, ids.view(), labels.view()))
        });
        c.bench_function(&format!("forward/{n}/fast"), |b| {
            b.iter(|| {
                tch::no_grad(|| {
                    let out = tr.model().forward(&fi, None);
                    black_box(fast::model::loss::shifted_cross_entropy(&out.logits, &fl))
                })
            })
        });

        // Forward + backward.
        c.bench_function(&format!("forward_backward/{n}/reference"), |b| {
            b.iter(|| {
                reference::model::forward_backward(&s.cfg, &params, ids.view(), labels.view())
            })
        });
        c.bench_function(&format!("forward_backward/{n}/fast"), |b| {
            b.iter(|| black_box(tr.micro_step(&fi, &fl, 1.0).unwrap().loss))
        });

        // Shifted cross-entropy (forward + gradient) on [B, T, V] logits.
        let v = s.cfg.vocab_size;
        let logits_nd = ndarray::Array3::from_shape_fn((s.b, s.t, v), |(i, j, k)| {
            ((i * 31 + j * 17 + k * 7) % 13) as f64 * 0.1
        });
        let logits_t = to_tensor(&logits_nd.clone().into_dyn()).to_kind(Kind::Float);
        c.bench_function(&format!("cross_entropy/{n}/reference"), |b| {
            b.iter(|| reference::loss::cross_entropy(logits_nd.view(), labels.view()))
        });
        c.bench_function(&format!("cross_entropy/{n}/fast"), |b| {
            b.iter(|| {
                let l = logits_t.detach().set_requires_grad(true);
                let (loss, _) = fast::model::loss::shifted_cross_entropy(&l, &fl);
                loss.backward();
                black_box(l.grad())
            })
        });

        // Clip (joint norm + scale) over every gradient.
        let (_, grads) =
            reference::model::forward_backward(&s.cfg, &params, ids.view(), labels.view());
        let fgrads: Vec<Tensor> = grads
            .values()
            .map(|g| to_tensor(g).to_kind(Kind::Float))
            .collect();
        c.bench_function(&format!("clip/{n}/reference"), |b| {
            b.iter_batched(
                || grads.clone(),
                |mut g| reference::clip::clip_grad_norm(&mut g, 1.0),
                criterion::BatchSize::LargeInput,
            )
        });
        c.bench_function(&format!("clip/{n}/fast"), |b| {
            b.iter(|| fast::optim::clip::clip_grad_norm(&fgrads, 1e9).unwrap())
        });

        // AdamW step over every parameter.
        let mut rp = params.clone();
        let mut ropt = reference::adamw::AdamW::new(&rp, reference::adamw::AdamWConfig::default());
        c.bench_function(&format!("adamw/{n}/reference"), |b| {
            b.iter(|| ropt.step(&mut rp, &grads, 1e-4))
        });
        let fparams: Vec<Tensor> = grads
            .values()
            .map(|g| to_tensor(g).to_kind(Kind::Float))
            .collect();
        for (imp, label) in [
            (fast::optim::adamw::AdamWImpl::Fused, "fast"),
            (fast::optim::adamw::AdamWImpl::PerTensor, "fast_per_tensor"),
        ] {
            let mut fopt = fast::optim::adamw::AdamW::new(&fparams, adamw, imp);
            c.bench_function(&format!("adamw/{n}/{label}"), |b| {
                b.iter(|| fopt.step(&fparams, &fgrads, 1e-4, None).unwrap())
            });
        }

        // The whole training step: forward, backward, clip, AdamW.
        let mut rp = params.clone();
        let mut ropt = reference::adamw::AdamW::new(&rp, reference::adamw::AdamWConfig::default());
        c.bench_function(&format!("train_step/{n}/reference"), |b| {
            b.iter(|| {
                let (out, mut g) =
                    reference::model::forward_backward(&s.cfg, &rp, ids.view(), labels.view());
                reference::clip::clip_grad_norm(&mut g, 1.0);
                ropt.step(&mut rp, &g, 1e-4);
                out.total
            })
        });
        c.bench_function(&format!("train_step/{n}/fast"), |b| {
            b.iter(|| {
                let out = tr.micro_step(&fi, &fl, 1.0).unwrap();
                let gn = tr.optimizer_step(1e-4, 1.0).unwrap();
                black_box((out.loss, gn))
            })
        });

        // Epoch permutation (same function on both sides).
        c.bench_function(&format!("epoch_permutation/{n}/reference"), |b| {
            b.iter(|| reference::sampler::epoch_permutation(black_box(100_000), 1, 2))
        });
        c.bench_function(&format!("epoch_permutation/{n}/fast"), |b| {
            b.iter(|| fast::data::order::epoch_permutation(black_box(100_000), 1, 2))
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);

//! Property tests of the reference: central-difference gradient checks in float64 for every
//! layer and the whole model, accumulation, samplers, schedule and scaler invariants.
//!
//! FD tolerance: central differences with h = 1e-5 have truncation error ~h^2 * f''' ~ 1e-10 and
//! round-off ~eps * |f| / h ~ 1e-11 for these O(1) objectives, so analytic and numeric
//! derivatives must agree to 1e-6 absolute + 1e-5 relative; a wrong formula misses by >= 1e-3.

use ndarray::{Array1, Array2, ArrayD, IxDyn};
use proptest::prelude::*;
use reference::accumulation::{loss_weight, Normalisation};
use reference::attention::{self, AttnShape, AttnWeights};
use reference::mlp::{self, MlpWeights};
use reference::moe::{self, MoeShape, MoeWeights};
use reference::sampler::{self, SplitMix64};
use reference::scaler::GradScaler;
use reference::{embedding, loss, model, params, rmsnorm, rope, schedule, ModelConfig, Params};

const H: f64 = 1e-5;

fn close(analytic: f64, numeric: f64) -> bool {
    (analytic - numeric).abs() <= 1e-6 + 1e-5 * analytic.abs().max(numeric.abs())
}

/// Deterministic values in [-1, 1) from a seed (SplitMix64), so shrinking stays meaningful.
fn rand_vec(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut r = SplitMix64::new(seed);
    (0..n)
        .map(|_| ((r.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale)
        .collect()
}

fn rand2(seed: u64, r: usize, c: usize, scale: f64) -> Array2<f64> {
    Array2::from_shape_vec((r, c), rand_vec(seed, r * c, scale)).unwrap()
}

/// Checks d f / d x[i] against central differences at a few positions of x; returns the first
/// mismatch. Positions where f is not smooth (a MoE top-k flip) are skipped: there the
/// differences with h and 2h disagree.
fn fd_check(
    x: &ArrayD<f64>,
    grad: &ArrayD<f64>,
    f: &dyn Fn(&ArrayD<f64>) -> f64,
    seed: u64,
) -> Result<(), String> {
    let n = x.len();
    let picks: Vec<usize> = {
        let mut r = SplitMix64::new(seed);
        (0..n.min(4))
            .map(|_| (r.next_u64() % n as u64) as usize)
            .collect()
    };
    let mut checked = 0;
    for i in picks {
        let at = |d: f64| {
            let mut y = x.clone();
            let v = y.as_slice_mut().expect("contiguous");
            v[i] += d;
            f(&y)
        };
        let fd = (at(H) - at(-H)) / (2.0 * H);
        let fd2 = (at(2.0 * H) - at(-2.0 * H)) / (4.0 * H);
        if (fd - fd2).abs() > 1e-6 {
            continue; // kink between the probes
        }
        let a = grad.as_slice().expect("contiguous")[i];
        if !close(a, fd) {
            return Err(format!(
                "element {i}: analytic {a:.12e} vs numeric {fd:.12e}"
            ));
        }
        checked += 1;
    }
    if checked == 0 {
        return Err("every probed element sat on a kink".into());
    }
    Ok(())
}

fn dyn2(a: &Array2<f64>) -> ArrayD<f64> {
    a.clone().into_dyn()
}

fn as2(a: &ArrayD<f64>) -> Array2<f64> {
    a.clone().into_dimensionality().unwrap()
}

/// Objective sum(y * r) for a fixed random r: its gradient w.r.t. y is r.
fn dot(y: &Array2<f64>, r: &Array2<f64>) -> f64 {
    (y * r).sum()
}

// ---------- layers ----------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn rmsnorm_backward_matches_finite_differences(seed in any::<u64>(), n in 1usize..4, c in 2usize..9) {
        let x = rand2(seed, n, c, 1.0);
        let w = Array1::from(rand_vec(seed ^ 1, c, 1.0));
        let r = rand2(seed ^ 2, n, c, 1.0);
        let (_, rstd) = rmsnorm::forward(x.view(), w.view(), 1e-5);
        let (dx, dw) = rmsnorm::backward(r.view(), x.view(), w.view(), rstd.view());
        let fx = |xx: &ArrayD<f64>| dot(&rmsnorm::forward(as2(xx).view(), w.view(), 1e-5).0, &r);
        prop_assert_eq!(fd_check(&dyn2(&x), &dx.into_dyn(), &fx, seed), Ok(()));
        let fw = |ww: &ArrayD<f64>| {
            let w1: Array1<f64> = ww.clone().into_dimensionality().unwrap();
            dot(&rmsnorm::forward(x.view(), w1.view(), 1e-5).0, &r)
        };
        prop_assert_eq!(fd_check(&w.clone().into_dyn(), &dw.into_dyn(), &fw, seed), Ok(()));
    }

    #[test]
    fn rope_backward_matches_finite_differences(seed in any::<u64>(), t in 1usize..6, half in 1usize..4) {
        let hd = 2 * half;
        let (cos, sin) = rope::tables(t, hd, 1e6);
        let x = rand2(seed, t, hd, 1.0);
        let r = rand2(seed ^ 2, t, hd, 1.0);
        let dx = rope::backward(r.view(), cos.view(), sin.view());
        let f = |xx: &ArrayD<f64>| dot(&rope::forward(as2(xx).view(), cos.view(), sin.view()), &r);
        prop_assert_eq!(fd_check(&dyn2(&x), &dx.into_dyn(), &f, seed), Ok(()));
    }

    #[test]
    fn mlp_backward_matches_finite_differences(seed in any::<u64>(), n in 1usize..4) {
        let (c, f) = (4, 6);
        let x = rand2(seed, n, c, 1.0);
        let (g, u, d) = (rand2(seed ^ 3, f, c, 0.5), rand2(seed ^ 4, f, c, 0.5), rand2(seed ^ 5, c, f, 0.5));
        let r = rand2(seed ^ 2, n, c, 1.0);
        let w = MlpWeights { gate: g.view(), up: u.view(), down: d.view() };
        let (_, cache) = mlp::forward(x.view(), &w);
        let (dx, gr) = mlp::backward(r.view(), &w, &cache);
        let fx = |xx: &ArrayD<f64>| dot(&mlp::forward(as2(xx).view(), &w).0, &r);
        prop_assert_eq!(fd_check(&dyn2(&x), &dx.into_dyn(), &fx, seed), Ok(()));
        let fg = |gg: &ArrayD<f64>| {
            let g2 = as2(gg);
            dot(&mlp::forward(x.view(), &MlpWeights { gate: g2.view(), up: u.view(), down: d.view() }).0, &r)
        };
        prop_assert_eq!(fd_check(&dyn2(&g), &gr.gate.into_dyn(), &fg, seed), Ok(()));
        let fd_ = |dd: &ArrayD<f64>| {
            let d2 = as2(dd);
            dot(&mlp::forward(x.view(), &MlpWeights { gate: g.view(), up: u.view(), down: d2.view() }).0, &r)
        };
        prop_assert_eq!(fd_check(&dyn2(&d), &gr.down.into_dyn(), &fd_, seed), Ok(()));
    }

    #[test]
    fn attention_backward_matches_finite_differences(
        seed in any::<u64>(), kv in 1usize..3, n_rep in 1usize..5, qk_norm in any::<bool>()
    ) {
        let (b, t, hd) = (2, 4, 4);
        let heads = kv * n_rep;
        let c = 8;
        let sh = AttnShape { b, t, heads, kv_heads: kv, head_dim: hd, theta: 1e4, eps: 1e-5 };
        let x = rand2(seed, b * t, c, 1.0);
        let wq = rand2(seed ^ 3, heads * hd, c, 0.4);
        let wk = rand2(seed ^ 4, kv * hd, c, 0.4);
        let wv = rand2(seed ^ 5, kv * hd, c, 0.4);
        let wo = rand2(seed ^ 6, c, heads * hd, 0.4);
        let qn = Array1::from(rand_vec(seed ^ 7, hd, 1.0)) + 1.0;
        let kn = Array1::from(rand_vec(seed ^ 8, hd, 1.0)) + 1.0;
        let r = rand2(seed ^ 2, b * t, c, 1.0);
        let run = |x: &Array2<f64>, q: &Array2<f64>, k: &Array2<f64>, qn_: &Array1<f64>| {
            let w = AttnWeights {
                q: q.view(), k: k.view(), v: wv.view(), o: wo.view(),
                q_norm: qk_norm.then(|| qn_.view()), k_norm: qk_norm.then(|| kn.view()),
            };
            dot(&attention::forward(x.view(), &w, sh).0, &r)
        };
        let w = AttnWeights {
            q: wq.view(), k: wk.view(), v: wv.view(), o: wo.view(),
            q_norm: qk_norm.then(|| qn.view()), k_norm: qk_norm.then(|| kn.view()),
        };
        let (_, cache) = attention::forward(x.view(), &w, sh);
        let (dx, g) = attention::backward(r.view(), &w, &cache, sh);
        let fx = |xx: &ArrayD<f64>| run(&as2(xx), &wq, &wk, &qn);
        prop_assert_eq!(fd_check(&dyn2(&x), &dx.into_dyn(), &fx, seed), Ok(()));
        let fq = |qq: &ArrayD<f64>| run(&x, &as2(qq), &wk, &qn);
        prop_assert_eq!(fd_check(&dyn2(&wq), &g.q.into_dyn(), &fq, seed), Ok(()));
        let fk = |kk: &ArrayD<f64>| run(&x, &wq, &as2(kk), &qn);
        prop_assert_eq!(fd_check(&dyn2(&wk), &g.k.into_dyn(), &fk, seed), Ok(()));
        if qk_norm {
            let fqn = |v: &ArrayD<f64>| run(&x, &wq, &wk, &v.clone().into_dimensionality().unwrap());
            prop_assert_eq!(fd_check(&qn.clone().into_dyn(), &g.q_norm.unwrap().into_dyn(), &fqn, seed), Ok(()));
        }
    }

    #[test]
    fn moe_backward_through_experts_router_and_aux_matches_finite_differences(
        seed in any::<u64>(), top_k in 1usize..3, shared in 0usize..2, seq_aux in any::<bool>()
    ) {
        let (b, t, c, f, ne) = (2, 3, 4, 6, 4);
        let x = rand2(seed, b * t, c, 1.0);
        let router = rand2(seed ^ 9, ne, c, 1.0);
        let ex: Vec<[Array2<f64>; 3]> = (0..ne + shared)
            .map(|e| {
                let s = seed ^ (100 + e as u64);
                [rand2(s, f, c, 0.5), rand2(s ^ 1, f, c, 0.5), rand2(s ^ 2, c, f, 0.5)]
            })
            .collect();
        let sh = MoeShape { b, t, top_k, norm_topk_prob: true, aux_alpha: 0.1, seq_aux };
        let r = rand2(seed ^ 2, b * t, c, 1.0);
        // objective: sum(y * r) + aux, so d/d aux = 1
        let obj = |xx: &Array2<f64>, rt: &Array2<f64>| {
            let (y, aux, _) = moe::forward(xx.view(), &moe_weights(rt, &ex, ne), sh);
            dot(&y, &r) + aux
        };
        let w = moe_weights(&router, &ex, ne);
        let (_, _, cache) = moe::forward(x.view(), &w, sh);
        let (dx, g) = moe::backward(r.view(), 1.0, &w, &cache, sh);
        let fx = |xx: &ArrayD<f64>| obj(&as2(xx), &router);
        prop_assert_eq!(fd_check(&dyn2(&x), &dx.into_dyn(), &fx, seed), Ok(()));
        let fr = |rr: &ArrayD<f64>| obj(&x, &as2(rr));
        prop_assert_eq!(fd_check(&dyn2(&router), &g.router.into_dyn(), &fr, seed), Ok(()));
    }

    #[test]
    fn shifted_cross_entropy_backward_matches_finite_differences(seed in any::<u64>(), ignore_every in 1usize..4) {
        let (b, t, v) = (2, 4, 5);
        let logits = ndarray::Array3::from_shape_vec((b, t, v), rand_vec(seed, b * t * v, 3.0)).unwrap();
        let labels = Array2::from_shape_fn((b, t), |(i, j)| {
            if (i * t + j) % ignore_every == 0 && ignore_every > 1 { -100 } else { ((i + 2 * j) % v) as i64 }
        });
        let (l, count, dl) = loss::cross_entropy(logits.view(), labels.view());
        prop_assert!(l.is_finite() && count > 0);
        let f = |z: &ArrayD<f64>| loss::cross_entropy(z.view().into_dimensionality().unwrap(), labels.view()).0;
        prop_assert_eq!(fd_check(&logits.into_dyn(), &dl.into_dyn(), &f, seed), Ok(()));
    }

    #[test]
    fn embedding_backward_scatters_rows(seed in any::<u64>()) {
        let table = rand2(seed, 5, 3, 1.0);
        let ids = [1i64, 3, 1, 0];
        let r = rand2(seed ^ 2, 4, 3, 1.0);
        let dt = embedding::backward(r.view(), &ids, 5);
        let f = |tt: &ArrayD<f64>| dot(&embedding::forward(&ids, as2(tt).view()), &r);
        prop_assert_eq!(fd_check(&dyn2(&table), &dt.into_dyn(), &f, seed), Ok(()));
    }
}

fn moe_weights<'a>(
    router: &'a Array2<f64>,
    ex: &'a [[Array2<f64>; 3]],
    ne: usize,
) -> MoeWeights<'a> {
    let m = |w: &'a [Array2<f64>; 3]| MlpWeights {
        gate: w[0].view(),
        up: w[1].view(),
        down: w[2].view(),
    };
    MoeWeights {
        router: router.view(),
        experts: ex[..ne].iter().map(m).collect(),
        shared: ex[ne..].iter().map(m).collect(),
    }
}

// ---------- whole model ----------

fn tiny_config(
    kv: usize,
    n_rep: usize,
    qk_norm: bool,
    moe: Option<(usize, usize, bool)>,
) -> ModelConfig {
    let heads = kv * n_rep;
    let mut cfg = ModelConfig {
        hidden_size: heads * 4,
        num_hidden_layers: 2,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        vocab_size: 11,
        intermediate_size: Some(8),
        rope_theta: 1e4,
        qk_norm,
        ..ModelConfig::default()
    };
    if let Some((k, shared, seq_aux)) = moe {
        cfg.use_moe = true;
        cfg.num_experts_per_tok = k;
        cfg.n_routed_experts = 3;
        cfg.n_shared_experts = shared;
        cfg.seq_aux = seq_aux;
        cfg.aux_loss_alpha = 0.1;
    }
    cfg
}

/// Batch of ids with pad 0 at the end of row 0 when `pads`; labels -100 on pads.
fn tiny_batch(
    seed: u64,
    b: usize,
    t: usize,
    vocab: usize,
    pads: bool,
) -> (Array2<i64>, Array2<i64>) {
    let mut r = SplitMix64::new(seed);
    let ids = Array2::from_shape_fn((b, t), |(i, j)| {
        if pads && i == 0 && j >= t - 2 {
            0
        } else {
            1 + (r.next_u64() % (vocab as u64 - 1)) as i64
        }
    });
    let labels = ids.mapv(|v| if v == 0 { -100 } else { v });
    (ids, labels)
}

fn scaled_params(cfg: &ModelConfig, seed: u64) -> Params {
    // std 0.02 makes every derivative tiny; larger weights exercise the nonlinearities.
    let mut p = params::init_params(cfg, seed);
    for (name, t) in p.iter_mut() {
        if t.ndim() == 2 {
            *t *= 15.0;
        } else {
            *t = ArrayD::from_shape_vec(
                IxDyn(t.shape()),
                rand_vec(seed ^ name.len() as u64, t.len(), 0.5),
            )
            .unwrap()
                + 1.0;
        }
    }
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn model_gradients_of_ce_plus_aux_match_finite_differences(
        seed in any::<u64>(), kv in 1usize..3, n_rep in 1usize..5, qk_norm in any::<bool>(),
        moe in prop::option::of((1usize..3, 0usize..2, any::<bool>())), pads in any::<bool>()
    ) {
        let cfg = tiny_config(kv, n_rep, qk_norm, moe);
        let p = scaled_params(&cfg, seed);
        let (ids, labels) = tiny_batch(seed, 2, 5, cfg.vocab_size, pads);
        let (out, g) = model::forward_backward(&cfg, &p, ids.view(), labels.view());
        prop_assert!(out.total.is_finite());
        prop_assert_eq!(g.keys().collect::<Vec<_>>(), p.keys().collect::<Vec<_>>());
        for (name, t) in &p {
            let f = |v: &ArrayD<f64>| {
                let mut q = p.clone();
                q.insert(name.clone(), v.clone());
                model::forward(&cfg, &q, ids.view(), labels.view()).total
            };
            let r = fd_check(t, &g[name], &f, seed ^ name.len() as u64);
            prop_assert_eq!(r, Ok(()), "{}", name);
        }
    }

    #[test]
    fn token_weighted_accumulation_of_micro_batches_equals_one_big_batch(seed in any::<u64>(), split in 1usize..4) {
        let cfg = tiny_config(1, 2, false, None);
        let p = scaled_params(&cfg, seed);
        let (ids, mut labels) = tiny_batch(seed, 4, 5, cfg.vocab_size, true);
        labels[[1, 3]] = -100; // micro-batches hold different numbers of counted tokens
        let (big, g_big) = model::forward_backward(&cfg, &p, ids.view(), labels.view());
        let parts = [(0, split), (split, 4)];
        let counts: Vec<usize> = parts
            .iter()
            .map(|&(a, z)| model::forward(&cfg, &p, ids.slice(ndarray::s![a..z, ..]), labels.slice(ndarray::s![a..z, ..])).count)
            .collect();
        let window: usize = counts.iter().sum();
        prop_assert_eq!(window, big.count);
        let mut acc = params::zeros_like(&p);
        let mut loss = 0.0;
        for (&(a, z), &c) in parts.iter().zip(&counts) {
            let (o, g) = model::forward_backward(&cfg, &p, ids.slice(ndarray::s![a..z, ..]), labels.slice(ndarray::s![a..z, ..]));
            let w = loss_weight(Normalisation::TokenWeighted, 2, c, window);
            loss += w * o.ce;
            model::add_scaled(&mut acc, &g, w);
        }
        // same sums in a different order: float64 round-off
        prop_assert!((loss - big.ce).abs() < 1e-12 * big.ce.abs());
        for (name, gb) in &g_big {
            let err = (&acc[name] - gb).mapv(f64::abs).fold(0.0f64, |a, &v| a.max(v));
            prop_assert!(err < 1e-12, "{} differs by {}", name, err);
        }
    }
}

#[test]
fn an_all_ignored_batch_gives_zero_loss_and_zero_gradient() {
    let cfg = tiny_config(1, 2, false, None);
    let p = scaled_params(&cfg, 3);
    let (ids, _) = tiny_batch(3, 2, 5, cfg.vocab_size, false);
    let labels = Array2::from_elem((2, 5), -100i64);
    let (out, g) = model::forward_backward(&cfg, &p, ids.view(), labels.view());
    assert_eq!((out.ce, out.count), (0.0, 0));
    assert!(g.values().all(|t| t.iter().all(|&v| v == 0.0)));
}

#[test]
fn minimind_mean_weights_each_micro_batch_equally() {
    assert_eq!(loss_weight(Normalisation::MiniMindMean, 4, 10, 100), 0.25);
    assert_eq!(loss_weight(Normalisation::TokenWeighted, 4, 10, 100), 0.1);
    assert_eq!(loss_weight(Normalisation::TokenWeighted, 4, 0, 0), 0.0);
}

// ---------- samplers, schedule, scaler ----------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn skipped_batches_are_never_yielded_and_the_rest_is_the_tail(n in 0usize..40, bs in 1usize..7, skip in 0usize..10) {
        let idx = sampler::epoch_permutation(n, 7, 1);
        let batches = sampler::skip_batches(&idx, bs, skip);
        prop_assert_eq!(batches.len(), sampler::skip_batch_len(n, bs, skip));
        let flat: Vec<usize> = batches.concat();
        prop_assert_eq!(&flat[..], &idx[(skip * bs).min(n)..]);
    }

    #[test]
    fn distributed_ranks_cover_the_padded_set_exactly_once(n in 1usize..40, world in 1usize..6, drop_last in any::<bool>()) {
        let idx: Vec<usize> = (0..n).collect();
        let per_rank: Vec<Vec<usize>> = (0..world).map(|r| sampler::distributed_indices(&idx, world, r, drop_last)).collect();
        let len = per_rank[0].len();
        prop_assert!(per_rank.iter().all(|r| r.len() == len));
        let total = if drop_last { n / world * world } else { n.div_ceil(world) * world };
        prop_assert_eq!(len * world, total);
        // interleave back: position p belongs to rank p % W
        let merged: Vec<usize> = (0..total).map(|p| per_rank[p % world][p / world]).collect();
        let expected: Vec<usize> = idx.iter().copied().cycle().take(total).collect();
        prop_assert_eq!(merged, expected);
    }

    #[test]
    fn epoch_permutation_is_a_seeded_permutation(n in 0usize..200, seed in any::<u64>(), epoch in 0u64..5) {
        let p = sampler::epoch_permutation(n, seed, epoch);
        let mut sorted = p.clone();
        sorted.sort();
        prop_assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        prop_assert_eq!(p, sampler::epoch_permutation(n, seed, epoch));
    }

    #[test]
    fn global_batches_cover_the_epoch_once_and_survive_a_world_size_change(
        n in 1usize..60, bs in 1usize..5, w in 1usize..5, w2 in 1usize..5, done in 0usize..10
    ) {
        let perm_vec = sampler::epoch_permutation(n, 3, 0);
        let perm = &perm_vec;
        let order = |world: usize, from: usize| -> Vec<usize> {
            (from..sampler::global_batches(n, bs, world))
                .flat_map(|g| (0..world).flat_map(move |r| sampler::global_batch(perm, g, bs, world, r)))
                .collect()
        };
        prop_assert_eq!(order(w, 0), perm_vec.clone());
        let done = done.min(sampler::global_batches(n, bs, w));
        let resumed = sampler::rescale_step(done as u64, w as u64, w2 as u64) as usize;
        if (done * w) % w2 == 0 {
            // exact arithmetic: the resumed run sees exactly the samples not yet seen
            let seen = (done * bs * w).min(n);
            prop_assert_eq!(order(w2, resumed), perm[seen..].to_vec());
        }
    }

    #[test]
    fn lr_stays_between_the_floor_and_base_and_never_rises(total in 1u64..500, base in 1e-5f64..1e-2) {
        let mut prev = f64::INFINITY;
        for s in 0..=total {
            let lr = schedule::cosine_lr(s, total, base);
            prop_assert!(lr >= 0.1 * base * (1.0 - 1e-12) && lr <= base * (1.0 + 1e-12));
            prop_assert!(lr <= prev * (1.0 + 1e-12));
            prev = lr;
        }
        prop_assert!((schedule::cosine_lr(0, total, base) - base).abs() < 1e-15);
        prop_assert!((schedule::cosine_lr(total, total, base) - 0.1 * base).abs() < 1e-15);
        // warmup ramps from 0 and joins the cosine at the end of warmup
        let wu = total.div_ceil(10);
        prop_assert_eq!(schedule::lr_at(0, total, base, wu), 0.0);
        prop_assert_eq!(schedule::lr_at(wu, total, base, wu), schedule::cosine_lr(wu, total, base));
        prop_assert_eq!(schedule::lr_at(5, total, base, 0), schedule::cosine_lr(5, total, base));
    }

    #[test]
    fn scaler_halves_on_overflow_and_doubles_after_growth_interval_clean_steps(
        pattern in prop::collection::vec(any::<bool>(), 0..40), interval in 1u32..5
    ) {
        let mut s = GradScaler::new(65536.0, 2.0, 0.5, interval);
        let mut clean_run = 0u32;
        for &overflow in &pattern {
            let before = s.scale;
            let mut g = Params::from([("w".to_string(), ndarray::arr1(&[before, if overflow { f64::NAN } else { 2.0 * before }]).into_dyn())]);
            let found = s.unscale(&mut g);
            prop_assert_eq!(found, overflow);
            if !overflow {
                prop_assert_eq!(g["w"].as_slice().unwrap(), &[1.0, 2.0][..]);
            }
            s.update(found);
            if overflow {
                clean_run = 0;
                prop_assert_eq!(s.scale, before * 0.5);
            } else {
                clean_run += 1;
                if clean_run == interval {
                    clean_run = 0;
                    prop_assert_eq!(s.scale, before * 2.0);
                } else {
                    prop_assert_eq!(s.scale, before);
                }
            }
            prop_assert_eq!(s.growth_tracker, clean_run);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn packed_rows_hold_every_document_and_eos_and_mask_only_the_final_padding(
        docs in prop::collection::vec(prop::collection::vec(0u32..50, 0..12), 0..6), max_len in 1usize..10
    ) {
        use reference::dataset::{pack, SpecialTokens};
        let sp = SpecialTokens::default();
        let rows = pack(&docs, max_len, sp);
        let stream: Vec<i64> = docs.iter().flat_map(|d| d.iter().map(|&i| i as i64).chain([2])).collect();
        prop_assert_eq!(rows.len(), stream.len().div_ceil(max_len));
        let inputs: Vec<i64> = rows.iter().flat_map(|r| r.input_ids.clone()).collect();
        let labels: Vec<i64> = rows.iter().flat_map(|r| r.labels.clone()).collect();
        prop_assert_eq!(&inputs[..stream.len()], &stream[..]);
        prop_assert_eq!(&labels[..stream.len()], &stream[..]);
        prop_assert!(inputs[stream.len()..].iter().all(|&i| i == 0));
        prop_assert!(labels[stream.len()..].iter().all(|&l| l == -100));
    }

    #[test]
    fn padded_rows_keep_bos_a_prefix_and_eos_and_mask_pads(
        ids in prop::collection::vec(3u32..50, 0..20), max_len in 2usize..12
    ) {
        use reference::dataset::{encode_padded, SpecialTokens};
        let row = encode_padded(&ids, max_len, SpecialTokens::default());
        let keep = ids.len().min(max_len - 2);
        prop_assert_eq!(row.input_ids.len(), max_len);
        prop_assert_eq!(row.input_ids[0], 1);
        prop_assert_eq!(row.input_ids[keep + 1], 2);
        prop_assert_eq!(row.labels.iter().filter(|&&l| l == -100).count(), max_len - keep - 2);
    }
}

#[test]
fn topk_breaks_ties_towards_the_lower_index() {
    assert_eq!(moe::topk(&[0.25, 0.5, 0.25, 0.5], 2), vec![1, 3]);
    assert_eq!(moe::topk(&[0.25, 0.25, 0.25, 0.25], 3), vec![0, 1, 2]);
}

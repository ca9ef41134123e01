//! Property tests of the reference's MiniMind-3, packed-documents and masked-LM additions:
//! central-difference gradient checks (attention with an explicit head_dim and qk-norm, causal
//! within segments, bidirectional; MiniMind-3 MoE with its aux loss; the whole model on packed
//! rows and with the masked-LM loss), segment semantics (documents do not see each other, a
//! continued document's RoPE offset does not matter), the MLM masking statistics, pack_docs /
//! group_texts layouts and the schedules' endpoints.
//!
//! FD tolerance, as in reference_props.rs: central differences with h = 1e-5 have truncation
//! error ~h^2 * f''' ~ 1e-10 and round-off ~eps * |f| / h ~ 1e-11 for these O(1) objectives, so
//! analytic and numeric derivatives must agree to 1e-6 absolute + 1e-5 relative; a wrong formula
//! misses by >= 1e-3.

use ndarray::{s, Array1, Array2, ArrayD, IxDyn};
use proptest::prelude::*;
use reference::attention::{self, AttnMask, AttnShape, AttnWeights, RowSegments};
use reference::dataset::{group_texts, pack_docs, SpecialTokens};
use reference::mlm::{mask_tokens, MlmMasking};
use reference::mlp::MlpWeights;
use reference::model::{self, RunOptions};
use reference::moe::{self, Moe3Shape, MoeWeights};
use reference::sampler::SplitMix64;
use reference::{params, schedule, ModelConfig, Params};

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

/// Checks d f / d x[i] against central differences at a few positions of x (reference_props.rs's
/// helper): positions where f is not smooth (a MoE top-k flip) are skipped, there the differences
/// with h and 2h disagree.
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

fn as1(a: &ArrayD<f64>) -> Array1<f64> {
    a.clone().into_dimensionality().unwrap()
}

/// Objective sum(y * r) for a fixed random r: its gradient w.r.t. y is r.
fn dot(y: &Array2<f64>, r: &Array2<f64>) -> f64 {
    (y * r).sum()
}

/// Sorted segment starts for a row of `t`: 0 plus each later position with probability ~1/3.
fn random_starts(seed: u64, t: usize) -> Vec<usize> {
    let mut r = SplitMix64::new(seed);
    std::iter::once(0)
        .chain((1..t).filter(|_| r.next_u64() % 3 == 0))
        .collect()
}

// ---------- attention under each mask ----------

/// Random weights of one attention block: x [B*T, C], q/k/v/o, q/k norm weights near 1.
struct AttnCase {
    x: Array2<f64>,
    wq: Array2<f64>,
    wk: Array2<f64>,
    wv: Array2<f64>,
    wo: Array2<f64>,
    qn: Array1<f64>,
    kn: Array1<f64>,
    r: Array2<f64>,
    sh: AttnShape,
    qk_norm: bool,
}

impl AttnCase {
    fn new(seed: u64, sh: AttnShape, c: usize, qk_norm: bool) -> Self {
        let (n, hq, hk) = (
            sh.b * sh.t,
            sh.heads * sh.head_dim,
            sh.kv_heads * sh.head_dim,
        );
        AttnCase {
            x: rand2(seed, n, c, 1.0),
            wq: rand2(seed ^ 3, hq, c, 0.4),
            wk: rand2(seed ^ 4, hk, c, 0.4),
            wv: rand2(seed ^ 5, hk, c, 0.4),
            wo: rand2(seed ^ 6, c, hq, 0.4),
            qn: Array1::from(rand_vec(seed ^ 7, sh.head_dim, 0.5)) + 1.0,
            kn: Array1::from(rand_vec(seed ^ 8, sh.head_dim, 0.5)) + 1.0,
            r: rand2(seed ^ 2, n, c, 1.0),
            sh,
            qk_norm,
        }
    }

    fn weights<'a>(
        &'a self,
        q: &'a Array2<f64>,
        k: &'a Array2<f64>,
        v: &'a Array2<f64>,
        qn: &'a Array1<f64>,
    ) -> AttnWeights<'a> {
        AttnWeights {
            q: q.view(),
            k: k.view(),
            v: v.view(),
            o: self.wo.view(),
            q_norm: self.qk_norm.then(|| qn.view()),
            k_norm: self.qk_norm.then(|| self.kn.view()),
        }
    }

    fn out(&self, x: &Array2<f64>, mask: &AttnMask) -> Array2<f64> {
        let w = self.weights(&self.wq, &self.wk, &self.wv, &self.qn);
        attention::forward_masked(x.view(), &w, self.sh, mask).0
    }

    /// FD checks of dx, dWq, dWk, dWv and (with qk-norm) dq_norm under `mask`.
    fn check(&self, mask: &AttnMask, seed: u64) -> Result<(), String> {
        let run = |x: &Array2<f64>,
                   q: &Array2<f64>,
                   k: &Array2<f64>,
                   v: &Array2<f64>,
                   qn: &Array1<f64>| {
            let w = self.weights(q, k, v, qn);
            dot(
                &attention::forward_masked(x.view(), &w, self.sh, mask).0,
                &self.r,
            )
        };
        let (x, wq, wk, wv, qn) = (&self.x, &self.wq, &self.wk, &self.wv, &self.qn);
        let w = self.weights(wq, wk, wv, qn);
        let (_, cache) = attention::forward_masked(x.view(), &w, self.sh, mask);
        let (dx, g) = attention::backward(self.r.view(), &w, &cache, self.sh);
        fd_check(
            &dyn2(x),
            &dx.into_dyn(),
            &|t| run(&as2(t), wq, wk, wv, qn),
            seed,
        )
        .map_err(|e| format!("dx: {e}"))?;
        fd_check(
            &dyn2(wq),
            &g.q.into_dyn(),
            &|t| run(x, &as2(t), wk, wv, qn),
            seed,
        )
        .map_err(|e| format!("dWq: {e}"))?;
        fd_check(
            &dyn2(wk),
            &g.k.into_dyn(),
            &|t| run(x, wq, &as2(t), wv, qn),
            seed,
        )
        .map_err(|e| format!("dWk: {e}"))?;
        fd_check(
            &dyn2(wv),
            &g.v.into_dyn(),
            &|t| run(x, wq, wk, &as2(t), qn),
            seed,
        )
        .map_err(|e| format!("dWv: {e}"))?;
        if self.qk_norm {
            let dqn = g.q_norm.expect("qk-norm gradient").into_dyn();
            fd_check(
                &qn.clone().into_dyn(),
                &dqn,
                &|t| run(x, wq, wk, wv, &as1(t)),
                seed,
            )
            .map_err(|e| format!("dq_norm: {e}"))?;
        }
        Ok(())
    }
}

fn shape(b: usize, t: usize, kv: usize, n_rep: usize, hd: usize) -> AttnShape {
    AttnShape {
        b,
        t,
        heads: kv * n_rep,
        kv_heads: kv,
        head_dim: hd,
        theta: 1e4,
        eps: 1e-6,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn attention_with_head_dim_apart_from_hidden_over_heads_matches_finite_differences(
        seed in any::<u64>(), kv in 1usize..3, n_rep in 1usize..4, half in 1usize..5, qk_norm in any::<bool>()
    ) {
        // C = 6 while heads * head_dim ranges over 2..24: q/o are not square
        let sh = shape(2, 4, kv, n_rep, 2 * half);
        let case = AttnCase::new(seed, sh, 6, qk_norm);
        prop_assert_eq!(case.check(&AttnMask::Causal, seed), Ok(()));
    }

    #[test]
    fn attention_causal_within_segments_matches_finite_differences(
        seed in any::<u64>(), kv in 1usize..3, n_rep in 1usize..3, first_position in 0usize..30
    ) {
        // row 0 continues a document from an earlier row (offset first_position), row 1 restarts
        let (b, t) = (2, 7);
        let sh = shape(b, t, kv, n_rep, 4);
        let case = AttnCase::new(seed, sh, 6, true);
        let mask = AttnMask::Segments(vec![
            RowSegments { starts: random_starts(seed, t), first_position },
            RowSegments { starts: vec![0, 2, 3, 6], first_position: 0 },
        ]);
        prop_assert_eq!(case.check(&mask, seed), Ok(()));
    }

    #[test]
    fn bidirectional_attention_matches_finite_differences(
        seed in any::<u64>(), kv in 1usize..3, n_rep in 1usize..3, qk_norm in any::<bool>()
    ) {
        let case = AttnCase::new(seed, shape(2, 5, kv, n_rep, 6), 6, qk_norm);
        prop_assert_eq!(case.check(&AttnMask::Bidirectional, seed), Ok(()));
    }

    #[test]
    fn a_token_never_sees_another_segment_and_bidirectional_sees_the_future(seed in any::<u64>()) {
        let (b, t) = (2, 8);
        let case = AttnCase::new(seed, shape(b, t, 1, 2, 4), 6, true);
        let starts = vec![random_starts(seed, t), vec![0, 3, 5]];
        let mask = AttnMask::segments(starts.clone());
        let base = case.out(&case.x, &mask);
        // perturbing token j changes only the outputs of j's segment at or after j
        for (bi, row) in starts.iter().enumerate() {
            for j in 0..t {
                let mut x = case.x.clone();
                x.row_mut(bi * t + j).mapv_inplace(|v| v + 0.5);
                let moved = case.out(&x, &mask);
                let seg = RowSegments { starts: row.clone(), first_position: 0 };
                for i in 0..b * t {
                    let same_seg = i / t == bi && seg.segment_start(i % t) == seg.segment_start(j);
                    let may_change = same_seg && i % t >= j;
                    let changed = moved.row(i) != base.row(i);
                    prop_assert!(may_change || !changed, "token {} of row {} reached output {}", j, bi, i);
                    if i == bi * t + j {
                        prop_assert!(changed, "token {} does not see itself", i);
                    }
                }
            }
        }
        // bidirectional: the first token's output depends on the last token
        let mut x = case.x.clone();
        x.row_mut(t - 1).mapv_inplace(|v| v + 0.5);
        let (a0, a1) = (case.out(&case.x, &AttnMask::Bidirectional), case.out(&x, &AttnMask::Bidirectional));
        prop_assert!(a0.row(0) != a1.row(0));
    }
}

// ---------- MiniMind-3 MoE ----------

fn moe_weights<'a>(router: &'a Array2<f64>, ex: &'a [[Array2<f64>; 3]]) -> MoeWeights<'a> {
    MoeWeights {
        router: router.view(),
        experts: ex
            .iter()
            .map(|w| MlpWeights {
                gate: w[0].view(),
                up: w[1].view(),
                down: w[2].view(),
            })
            .collect(),
        shared: Vec::new(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn minimind3_moe_backward_through_experts_router_and_aux_matches_finite_differences(
        seed in any::<u64>(), top_k in 1usize..4, norm_topk_prob in any::<bool>()
    ) {
        let (n, c, f, ne) = (6, 4, 5, 4);
        let x = rand2(seed, n, c, 1.0);
        let router = rand2(seed ^ 9, ne, c, 1.0);
        let ex: Vec<[Array2<f64>; 3]> = (0..ne)
            .map(|e| {
                let s = seed ^ (100 + e as u64);
                [rand2(s, f, c, 0.5), rand2(s ^ 1, f, c, 0.5), rand2(s ^ 2, c, f, 0.5)]
            })
            .collect();
        // a large aux coefficient so its gradient is not lost in the tolerance
        let sh = Moe3Shape { top_k, norm_topk_prob, aux_coef: 0.3 };
        let r = rand2(seed ^ 2, n, c, 1.0);
        // objective: sum(y * r) + aux, so d/d aux = 1
        let obj = |xx: &Array2<f64>, rt: &Array2<f64>, e0: &Array2<f64>| {
            let mut ex2 = ex.clone();
            ex2[0][0] = e0.clone();
            let (y, aux, _) = moe::forward3(xx.view(), &moe_weights(rt, &ex2), sh);
            dot(&y, &r) + aux
        };
        let w = moe_weights(&router, &ex);
        let (_, aux, cache) = moe::forward3(x.view(), &w, sh);
        prop_assert!(aux > 0.0);
        let (dx, g) = moe::backward3(r.view(), 1.0, &w, &cache, sh);
        prop_assert!(g.shared.is_empty());
        let fx = |t: &ArrayD<f64>| obj(&as2(t), &router, &ex[0][0]);
        prop_assert_eq!(fd_check(&dyn2(&x), &dx.into_dyn(), &fx, seed), Ok(()));
        let fr = |t: &ArrayD<f64>| obj(&x, &as2(t), &ex[0][0]);
        prop_assert_eq!(fd_check(&dyn2(&router), &g.router.into_dyn(), &fr, seed), Ok(()));
        let fe = |t: &ArrayD<f64>| obj(&x, &router, &as2(t));
        prop_assert_eq!(fd_check(&dyn2(&ex[0][0]), &g.experts[0].gate.clone().into_dyn(), &fe, seed), Ok(()));
    }

    #[test]
    fn minimind3_aux_is_coef_times_experts_times_load_dot_mean_scores(seed in any::<u64>(), top_k in 1usize..4) {
        // the formula from the fixture README, computed here from the scores and the choice
        let (n, c, ne) = (7, 3, 4);
        let x = rand2(seed, n, c, 1.0);
        let router = rand2(seed ^ 9, ne, c, 1.0);
        let ex: Vec<[Array2<f64>; 3]> = (0..ne)
            .map(|e| [rand2(seed ^ e as u64, 2, c, 0.5), rand2(seed ^ 11, 2, c, 0.5), rand2(seed ^ 12, c, 2, 0.5)])
            .collect();
        let sh = Moe3Shape { top_k, norm_topk_prob: true, aux_coef: 5e-4 };
        let (_, aux, _) = moe::forward3(x.view(), &moe_weights(&router, &ex), sh);
        let logits = x.dot(&router.t());
        let mut load = vec![0.0; ne];
        let mut mean = vec![0.0; ne];
        for i in 0..n {
            let z = logits.row(i);
            let m = z.fold(f64::NEG_INFINITY, |a, &v| a.max(v));
            let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|v| v / sum).collect();
            for (k, pk) in p.iter().enumerate() {
                mean[k] += pk / n as f64;
            }
            for idx in moe::topk(&p, top_k) {
                load[idx] += 1.0 / n as f64;
            }
        }
        let expected: f64 = (0..ne).map(|e| load[e] * mean[e]).sum::<f64>() * ne as f64 * 5e-4;
        // the same sums in another order: float64 round-off
        prop_assert!((aux - expected).abs() <= 1e-14 * expected.abs(), "{} vs {}", aux, expected);
    }
}

// ---------- whole model: packed rows, masked LM ----------

/// A tiny MiniMind-3: d 8, 2 heads of head_dim 6 (not d / heads = 4), qk-norm, FFN 8; MoE with
/// 3 experts of width 6 and a large aux coefficient when `moe` gives top-k.
fn tiny3(kv: usize, moe: Option<usize>) -> ModelConfig {
    let mut cfg = ModelConfig {
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: kv,
        head_dim: Some(6),
        vocab_size: 11,
        intermediate_size: Some(8),
        rope_theta: 1e4,
        ..ModelConfig::minimind3()
    };
    if let Some(k) = moe {
        cfg.use_moe = true;
        cfg.num_experts = 3;
        cfg.num_experts_per_tok = k;
        cfg.moe_intermediate_size = Some(6);
        cfg.router_aux_loss_coef = 0.1;
    }
    cfg
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

/// Every parameter's gradient against central differences of `total` under `opts`.
fn check_model(
    cfg: &ModelConfig,
    p: &Params,
    ids: &Array2<i64>,
    labels: &Array2<i64>,
    opts: &RunOptions,
    seed: u64,
) -> Result<(), String> {
    let (out, g) = model::forward_backward_with(cfg, p, ids.view(), labels.view(), opts);
    if !out.total.is_finite() || out.count == 0 {
        return Err(format!("degenerate batch: {out:?}"));
    }
    if g.keys().ne(p.keys()) {
        return Err("gradient names differ from parameter names".into());
    }
    for (name, t) in p {
        let f = |v: &ArrayD<f64>| {
            let mut q = p.clone();
            q.insert(name.clone(), v.clone());
            model::forward_with(cfg, &q, ids.view(), labels.view(), opts).total
        };
        fd_check(t, &g[name], &f, seed ^ name.len() as u64).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

/// Random documents of ids 3..vocab, packed into rows of `max_len`; -> (ids, labels, rows).
fn packed_batch(
    seed: u64,
    n_docs: usize,
    max_len: usize,
    vocab: usize,
) -> (Array2<i64>, Array2<i64>, Vec<reference::dataset::PackedRow>) {
    let mut r = SplitMix64::new(seed);
    let docs: Vec<Vec<u32>> = (0..n_docs)
        .map(|_| {
            let len = (r.next_u64() % 5) as usize;
            (0..len)
                .map(|_| 3 + (r.next_u64() % (vocab as u64 - 3)) as u32)
                .collect()
        })
        .collect();
    let rows = pack_docs(&docs, max_len, SpecialTokens::default());
    let b = rows.len();
    let ids = Array2::from_shape_fn((b, max_len), |(i, j)| rows[i].input_ids[j]);
    let labels = Array2::from_shape_fn((b, max_len), |(i, j)| rows[i].labels[j]);
    (ids, labels, rows)
}

fn segment_mask(rows: &[reference::dataset::PackedRow], continued: bool) -> AttnMask {
    AttnMask::Segments(
        rows.iter()
            .map(|r| RowSegments {
                starts: r.segment_starts.clone(),
                first_position: if continued { r.first_offset } else { 0 },
            })
            .collect(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn model_gradients_on_packed_rows_with_segments_match_finite_differences(
        seed in any::<u64>(), kv in 1usize..3, moe in prop::option::of(1usize..3)
    ) {
        let cfg = tiny3(kv, moe);
        let p = scaled_params(&cfg, seed);
        // 6 documents of 2..6 tokens in rows of 7: several segments per row, some continued
        let (ids, labels, rows) = packed_batch(seed, 6, 7, cfg.vocab_size);
        prop_assume!(rows.len() >= 2);
        let opts = RunOptions::packed(rows.iter().map(|r| r.segment_starts.clone()).collect());
        prop_assert_eq!(check_model(&cfg, &p, &ids, &labels, &opts, seed), Ok(()));
    }

    #[test]
    fn model_gradients_of_the_masked_lm_loss_match_finite_differences(
        seed in any::<u64>(), kv in 1usize..3, moe in prop::option::of(1usize..3)
    ) {
        let cfg = tiny3(kv, moe);
        let p = scaled_params(&cfg, seed);
        let mut m = MlmMasking::new(3, cfg.vocab_size, vec![0, 1, 2, 3]);
        m.probability = 0.4;
        let mut r = SplitMix64::new(seed);
        let rows: Vec<_> = (0..2u64)
            .map(|i| {
                let orig: Vec<i64> = (0..6).map(|_| 4 + (r.next_u64() % 7) as i64).collect();
                mask_tokens(&orig, &m, seed, 0, i)
            })
            .collect();
        prop_assume!(rows.iter().any(|r| r.labels.iter().any(|&l| l != -100)));
        let ids = Array2::from_shape_fn((2, 6), |(i, j)| rows[i].input_ids[j]);
        let labels = Array2::from_shape_fn((2, 6), |(i, j)| rows[i].labels[j]);
        prop_assert_eq!(check_model(&cfg, &p, &ids, &labels, &RunOptions::masked_lm(), seed), Ok(()));
    }

    #[test]
    fn continued_and_restarted_positions_of_a_split_document_give_equal_logits(
        seed in any::<u64>(), max_len in 3usize..9, moe in prop::option::of(1usize..3)
    ) {
        let cfg = tiny3(1, moe);
        let p = scaled_params(&cfg, seed);
        let (ids, labels, rows) = packed_batch(seed, 8, max_len, cfg.vocab_size);
        prop_assume!(rows.iter().any(|r| r.first_offset > 0));
        let run = |continued: bool| {
            let opts = RunOptions { mask: segment_mask(&rows, continued), ..RunOptions::causal() };
            model::forward_with(&cfg, &p, ids.view(), labels.view(), &opts).logits
        };
        // RoPE scores depend on position differences only (attention.rs, RowSegments); the
        // larger angles of the continued offsets change cos/sin at round-off, ~1e-14 here
        let diff = (&run(true) - &run(false)).mapv(f64::abs).fold(0.0f64, |a, &v| a.max(v));
        prop_assert!(diff < 1e-10, "logits differ by {}", diff);
    }

    #[test]
    fn each_segment_of_a_packed_row_gives_the_logits_of_its_document_run_alone(
        seed in any::<u64>(), moe in prop::option::of(1usize..3)
    ) {
        // dense MiniMind-3 and the MoE both route per token, so a segment's tokens see exactly
        // what they would see alone; MiniMind2's seq aux would mix rows, the logits do not
        let cfg = tiny3(1, moe);
        let p = scaled_params(&cfg, seed);
        let (ids, labels, rows) = packed_batch(seed, 5, 9, cfg.vocab_size);
        let opts = RunOptions::packed(rows.iter().map(|r| r.segment_starts.clone()).collect());
        let packed = model::forward_with(&cfg, &p, ids.view(), labels.view(), &opts).logits;
        for (bi, row) in rows.iter().enumerate() {
            let ends: Vec<usize> = row.segment_starts.iter().skip(1).copied().chain([9]).collect();
            for (&a, &z) in row.segment_starts.iter().zip(&ends) {
                let alone_ids = ids.slice(s![bi..bi + 1, a..z]).to_owned();
                let alone = model::forward(&cfg, &p, alone_ids.view(), alone_ids.view()).logits;
                let err = (&packed.slice(s![bi, a..z, ..]) - &alone.slice(s![0, .., ..]))
                    .mapv(f64::abs)
                    .fold(0.0f64, |m, &v| m.max(v));
                // the same products over the same keys; only summation order may differ
                prop_assert!(err < 1e-12, "row {} segment {}..{} differs by {}", bi, a, z, err);
            }
        }
    }
}

// ---------- masked-LM masking ----------

/// |x - n p| <= 5 sqrt(n p (1 - p)) + 1: a binomial count at 5 sigma (false alarm ~6e-7 per
/// check), plus one for the discreteness of small counts.
fn within_binomial(x: usize, n: usize, p: f64) -> bool {
    let (n, x) = (n as f64, x as f64);
    (x - n * p).abs() <= 5.0 * (n * p * (1.0 - p)).sqrt() + 1.0
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn masking_selects_at_the_rate_splits_80_10_10_and_never_touches_specials(
        seed in any::<u64>(), epoch in 0u64..4, p in 0.05f64..0.6, len in 500usize..3000
    ) {
        let vocab = 1000;
        let specials = vec![0i64, 1, 2, 3];
        let m = MlmMasking { probability: p, ..MlmMasking::new(3, vocab, specials.clone()) };
        let mut r = SplitMix64::new(seed ^ 0xABCD);
        // about one token in eight is special
        let ids: Vec<i64> = (0..len)
            .map(|_| if r.next_u64() % 8 == 0 { (r.next_u64() % 3) as i64 } else { 4 + (r.next_u64() % 996) as i64 })
            .collect();
        let row = mask_tokens(&ids, &m, seed, epoch, 17);
        let eligible = ids.iter().filter(|i| !specials.contains(i)).count();
        let mut selected = 0;
        let (mut masked, mut kept) = (0, 0);
        for ((&orig, &inp), &lab) in ids.iter().zip(&row.input_ids).zip(&row.labels) {
            if lab == -100 {
                prop_assert_eq!(inp, orig, "an unselected token changed");
                continue;
            }
            prop_assert!(!specials.contains(&orig), "special id {} selected", orig);
            prop_assert_eq!(lab, orig);
            prop_assert!((0..vocab as i64).contains(&inp));
            selected += 1;
            if inp == 3 { masked += 1 } else if inp == orig { kept += 1 }
        }
        prop_assert!(within_binomial(selected, eligible, p), "{} of {} at p {}", selected, eligible, p);
        // a random replacement equals the mask id or the original with probability 1/vocab each,
        // inside the 5-sigma margin
        prop_assert!(within_binomial(masked, selected, 0.8), "{} masked of {}", masked, selected);
        prop_assert!(within_binomial(kept, selected, 0.1), "{} kept of {}", kept, selected);
        prop_assert!(within_binomial(selected - masked - kept, selected, 0.1));
    }

    #[test]
    fn masking_is_a_function_of_seed_epoch_and_sample_index_only(
        seed in any::<u64>(), epoch in 0u64..4, index in 0u64..1000,
        ids in prop::collection::vec(0i64..50, 1..64)
    ) {
        let m = MlmMasking { probability: 0.3, ..MlmMasking::new(3, 50, vec![0, 1, 2, 3]) };
        let a = mask_tokens(&ids, &m, seed, epoch, index);
        prop_assert_eq!(&a, &mask_tokens(&ids, &m, seed, epoch, index));
        // a prefix of a sample is masked as the sample's prefix: the stream runs position by position
        let half = mask_tokens(&ids[..ids.len() / 2], &m, seed, epoch, index);
        prop_assert_eq!(&half.input_ids[..], &a.input_ids[..ids.len() / 2]);
        // other epochs and samples draw other masks (a long enough row tells them apart)
        if ids.iter().filter(|&&i| i > 3).count() >= 40 {
            prop_assert_ne!(&a, &mask_tokens(&ids, &m, seed, epoch + 1, index));
            prop_assert_ne!(&a, &mask_tokens(&ids, &m, seed, epoch, index + 1));
        }
    }
}

// ---------- layouts and schedules ----------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn packed_docs_keep_every_document_whole_and_mark_its_start(
        docs in prop::collection::vec(prop::collection::vec(3u32..50, 0..12), 0..6), max_len in 1usize..10
    ) {
        let rows = pack_docs(&docs, max_len, SpecialTokens::default());
        let stream: Vec<i64> = docs.iter().flat_map(|d| {
            std::iter::once(1).chain(d.iter().map(|&i| i as i64)).chain([2])
        }).collect();
        let mut starts = Vec::new();
        let mut at = 0;
        for d in &docs {
            starts.push(at);
            at += d.len() + 2;
        }
        prop_assert_eq!(rows.len(), stream.len().div_ceil(max_len));
        let inputs: Vec<i64> = rows.iter().flat_map(|r| r.input_ids.clone()).collect();
        let labels: Vec<i64> = rows.iter().flat_map(|r| r.labels.clone()).collect();
        prop_assert_eq!(&inputs[..stream.len()], &stream[..]);
        prop_assert!(inputs[stream.len()..].iter().all(|&i| i == 0));
        for (pos, (&l, &i)) in labels.iter().zip(&inputs).enumerate() {
            let expected = if pos >= stream.len() || starts.contains(&pos) { -100 } else { i };
            prop_assert_eq!(l, expected, "label at stream position {}", pos);
        }
        for (r, row) in rows.iter().enumerate() {
            let lo = r * max_len;
            let mut expected: Vec<usize> = starts.iter().filter(|&&s| s >= lo && s < lo + max_len).map(|s| s - lo).collect();
            if !expected.contains(&0) {
                expected.insert(0, 0);
            }
            let real = stream.len().saturating_sub(lo).min(max_len);
            if real < max_len {
                expected.push(real); // the padding tail
            }
            prop_assert_eq!(&row.segment_starts, &expected, "row {}", r);
            let doc_start = starts.iter().rev().find(|&&s| s <= lo).copied().unwrap();
            prop_assert_eq!(row.first_offset, lo - doc_start);
        }
    }

    #[test]
    fn group_texts_cuts_the_concatenation_into_full_blocks(
        texts in prop::collection::vec(prop::collection::vec(0u32..50, 0..12), 0..6), bs in 1usize..8
    ) {
        let rows = group_texts(&texts, bs);
        let stream: Vec<i64> = texts.iter().flatten().map(|&i| i as i64).collect();
        prop_assert_eq!(rows.len(), stream.len() / bs);
        for (r, row) in rows.iter().enumerate() {
            prop_assert_eq!(&row.input_ids[..], &stream[r * bs..(r + 1) * bs]);
            prop_assert_eq!(&row.labels, &row.input_ids);
        }
    }

    #[test]
    fn linear_schedule_rises_to_base_at_warmup_and_falls_to_zero_at_total(
        warmup in 0u64..50, extra in 0u64..200, base in 1e-5f64..1e-2
    ) {
        let total = warmup + extra;
        let lr = |k| schedule::linear_with_warmup(k, warmup, total, base);
        if warmup > 0 {
            prop_assert_eq!(lr(0), 0.0);
        }
        prop_assert_eq!(lr(warmup), if extra > 0 { base } else { 0.0 });
        prop_assert_eq!(lr(total), 0.0);
        prop_assert_eq!(lr(total + 5), 0.0);
        for k in 0..total + 2 {
            let (a, b) = (lr(k), lr(k + 1));
            prop_assert!((0.0..=base).contains(&a));
            if k + 1 < warmup { prop_assert!(b > a) } else if k >= warmup { prop_assert!(b <= a) }
        }
    }

    #[test]
    fn wsd_warms_up_holds_base_and_decays_to_min_ratio_at_total(
        warmup in 0u64..30, stable in 0u64..100, decay_frac in 0.0f64..0.5, min_ratio in 0.0f64..0.5,
        base in 1e-5f64..1e-2
    ) {
        let total = warmup + stable + 1;
        let lr = |k| schedule::wsd(k, total, base, warmup, decay_frac, min_ratio);
        let decay = ((decay_frac * total as f64).round() as u64).min(total - warmup);
        if warmup > 0 {
            prop_assert_eq!(lr(0), 0.0);
        }
        for k in warmup..total - decay {
            prop_assert_eq!(lr(k), base);
        }
        prop_assert_eq!(lr(total), min_ratio * base);
        prop_assert_eq!(lr(total + 7), min_ratio * base);
        for k in warmup..total + 1 {
            prop_assert!(lr(k + 1) <= lr(k) * (1.0 + 1e-15));
            prop_assert!(lr(k) >= min_ratio * base * (1.0 - 1e-15));
        }
        for k in 0..warmup {
            prop_assert!(lr(k) < lr(k + 1));
        }
    }
}

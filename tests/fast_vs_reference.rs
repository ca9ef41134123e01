//! The fast path (libtorch, fp32, CPU) equals the reference oracle (ndarray, f64) on random small
//! models and inputs: dense and MoE, GQA n_rep 1..4, qk-norm on/off, padded rows on/off, batches
//! with no counted label. Discrete components (samplers, schedule, accumulation, rescale, scaler,
//! batching) must agree exactly.
//!
//! Tolerances are fp32's, as verify_fast states them: max error relative to the expected tensor's
//! largest magnitude, 1e-5 for logits and losses, 1e-4 for gradients, 1e-5 for one clip + AdamW
//! update applied to the same gradients, 1e-3 for weights after a few-step trajectory (run with
//! AdamW eps 1e-5, see `adamw_traj`). The reference computes RMSNorm in f64, MiniMind (and fast) in
//! fp32: that difference (~1e-7) is inside these bounds.

use std::collections::BTreeMap;

use harness::convert::{from_named, scalar, to_array, to_tensor_i64};
use harness::report::Row;
use harness::verify::fast as verify_fast;
use ndarray::Array2;
use proptest::prelude::*;
use tch::{Device, Tensor};

const LOGITS_TOL: f64 = 1e-5;
const LOSS_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;
const STEP_TOL: f64 = 1e-3;
/// Clip + AdamW on the same fp32 gradients: a handful of fp32 roundings of the update (lr ~ 1e-3)
/// on weights of ~0.05: ~1e-10 absolute, ~1e-8 relative; the ratio m/(sqrt(v)+eps) near g ~ eps
/// loses a few more bits.
const UPDATE_TOL: f64 = 1e-5;

#[derive(Debug, Clone)]
struct Case {
    cfg: reference::ModelConfig,
    b: usize,
    t: usize,
    seed: u64,
    /// Per row: number of trailing pads (labels -100).
    pads: Vec<usize>,
    all_ignored: bool,
}

fn config() -> impl Strategy<Value = reference::ModelConfig> {
    (
        (
            1usize..=2,
            prop_oneof![Just(8usize), Just(16)],
            1usize..=4,
            1usize..=2,
        ),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        (2usize..=4, 1usize..=2, 0usize..=1),
        prop_oneof![Just(32usize), Just(48)],
    )
        .prop_map(
            |((layers, hd, n_rep, kv), (moe, qk, seq_aux, norm_topk), (e, k, shared), vocab)| {
                let heads = kv * n_rep;
                reference::ModelConfig {
                    hidden_size: heads * hd,
                    num_hidden_layers: layers,
                    num_attention_heads: heads,
                    num_key_value_heads: kv,
                    vocab_size: vocab,
                    intermediate_size: Some(2 * heads * hd),
                    use_moe: moe,
                    num_experts_per_tok: k.min(e),
                    n_routed_experts: e,
                    n_shared_experts: shared,
                    seq_aux,
                    norm_topk_prob: norm_topk,
                    qk_norm: qk,
                    ..Default::default()
                }
            },
        )
}

fn case() -> impl Strategy<Value = Case> {
    (
        config(),
        1usize..=3,
        2usize..=8,
        any::<u64>(),
        any::<bool>(),
        prop::bool::weighted(0.1),
    )
        .prop_flat_map(|(cfg, b, t, seed, padded, all_ignored)| {
            let pads = prop::collection::vec(if padded { 0..t } else { 0..1 }, b);
            (
                Just(cfg),
                Just(b),
                Just(t),
                Just(seed),
                pads,
                Just(all_ignored),
            )
        })
        .prop_map(|(cfg, b, t, seed, pads, all_ignored)| Case {
            cfg,
            b,
            t,
            seed,
            pads,
            all_ignored,
        })
}

/// Token ids from a seeded generator; pads (id 0, label -100) at the end of rows.
fn batch(c: &Case, salt: u64) -> (Array2<i64>, Array2<i64>) {
    let mut rng = fast::data::order::SplitMix64::new(c.seed ^ salt.wrapping_mul(0x9E37_79B9));
    let v = c.cfg.vocab_size as u64;
    let mut ids = Array2::<i64>::zeros((c.b, c.t));
    let mut labels = Array2::<i64>::zeros((c.b, c.t));
    for r in 0..c.b {
        for s in 0..c.t {
            let pad = s >= c.t - c.pads[r];
            let id = if pad {
                0
            } else {
                1 + (rng.next_u64() % (v - 1)) as i64
            };
            ids[[r, s]] = id;
            labels[[r, s]] = if pad || c.all_ignored { -100 } else { id };
        }
    }
    (ids, labels)
}

fn check(rows: &[Row]) -> Result<(), TestCaseError> {
    let bad: Vec<String> = rows
        .iter()
        .filter(|r| !r.ok)
        .map(|r| {
            format!(
                "{} {}: max_rel {:e} > {:e}",
                r.fixture, r.group, r.max_rel, r.tol
            )
        })
        .collect();
    prop_assert!(bad.is_empty(), "{}", bad.join("\n"));
    Ok(())
}

/// Per tensor: max error relative to the tensor's largest magnitude, floored at 1e-3 of the
/// largest magnitude of the whole set and at 1e-5, so that a tensor whose exact value vanishes
/// (MoE aux gradients cancel mathematically when every expert is chosen and no label counts) is
/// judged by a meaningful scale instead of demanding round-off-for-round-off agreement.
fn named_rows(what: &str, a: &reference::Params, e: &reference::Params, tol: f64) -> Vec<Row> {
    let global = e
        .values()
        .flat_map(|t| t.iter())
        .fold(0.0f64, |m, v| m.max(v.abs()));
    let mut rows = Vec::new();
    for (n, ev) in e {
        match a.get(n) {
            Some(av) => {
                let (max_abs, _) = harness::report::errors(av.view(), ev.view());
                let scale = ev
                    .iter()
                    .fold(0.0f64, |m, v| m.max(v.abs()))
                    .max(1e-3 * global)
                    .max(1e-5);
                let rel = if max_abs == 0.0 { 0.0 } else { max_abs / scale };
                rows.push(Row {
                    fixture: what.into(),
                    group: n.clone(),
                    max_abs,
                    max_rel: rel,
                    tol,
                    ok: rel <= tol,
                });
            }
            None => rows.push(Row::exact(what, &format!("{n} missing"), false)),
        }
    }
    rows.push(Row::exact(what, "same names", a.len() == e.len()));
    rows
}

fn adamw() -> (
    reference::adamw::AdamWConfig,
    fast::optim::adamw::AdamWConfig,
) {
    (
        reference::adamw::AdamWConfig::default(),
        fast::optim::adamw::AdamWConfig::default(),
    )
}

/// Multi-step runs use eps 1e-5: AdamW's t = 1 update lr * g / (|g| + eps) has sensitivity up
/// to lr / eps to its gradient, so with torch's 1e-8 any weight whose gradient is within fp32
/// round-off of zero (a few per 10^4 weights) moves by up to 2 lr differently. eps 1e-5 keeps
/// that amplification at 100 while every other part of the update is the same arithmetic.
fn adamw_traj() -> (
    reference::adamw::AdamWConfig,
    fast::optim::adamw::AdamWConfig,
) {
    let (mut r, mut f) = adamw();
    r.eps = 1e-5;
    f.eps = 1e-5;
    (r, f)
}

/// Forward, losses, every gradient, the clipped AdamW update.
fn one_step(c: &Case) -> Result<(), TestCaseError> {
    let params = reference::params::init_params(&c.cfg, c.seed);
    let (ids, labels) = batch(c, 1);
    let (out, mut grads) =
        reference::model::forward_backward(&c.cfg, &params, ids.view(), labels.view());
    let mut tr = verify_fast::trainer(
        &c.cfg,
        &params,
        adamw().1,
        fast::model::precision::Precision::Fp32,
        Device::Cpu,
    )
    .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
    let (fi, fl) = (to_tensor_i64(&ids), to_tensor_i64(&labels));
    let logits = tch::no_grad(|| tr.model().forward(&fi, None).logits);
    let o = tr
        .micro_step(&fi, &fl, 1.0)
        .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
    let s = scalar;
    let mut rows = vec![
        Row::compare(
            "fwd",
            "logits",
            to_array(&logits).view(),
            out.logits.view().into_dyn(),
            LOGITS_TOL,
        ),
        Row::scalar("fwd", "ce", s(&o.ce), out.ce, LOSS_TOL),
        Row::scalar("fwd", "aux", s(&o.aux), out.aux, LOSS_TOL),
        Row::scalar("fwd", "total", s(&o.loss), out.total, LOSS_TOL),
        Row::exact(
            "fwd",
            "count",
            i64::try_from(&o.count).unwrap() as usize == out.count,
        ),
    ];
    let fast_grads = from_named(&tr.named_grads_f64());
    rows.extend(named_rows("grad", &fast_grads, &grads, GRAD_TOL));
    let clip = 0.5;
    let norm = reference::clip::clip_grad_norm(&mut grads, clip);
    // The update is checked on fast's own gradients: the clip and AdamW arithmetic in isolation,
    // free of AdamW's amplification of gradient differences near eps (see adamw_traj).
    let mut g = fast_grads.clone();
    reference::clip::clip_grad_norm(&mut g, clip);
    let mut p = from_named(&tr.named_f64());
    reference::adamw::AdamW::new(&p, adamw().0).step(&mut p, &g, 1e-3);
    let fnorm = tr
        .optimizer_step(1e-3, clip)
        .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
    // Floored like the gradients: a norm of pure round-off (all gradients vanish) is ~0 on both.
    rows.push(Row::scalar(
        "step",
        "grad_norm",
        s(&fnorm).max(1e-5),
        norm.max(1e-5),
        GRAD_TOL,
    ));
    rows.extend(named_rows(
        "after_step",
        &from_named(&tr.named_f64()),
        &p,
        UPDATE_TOL,
    ));
    check(&rows)
}

/// The reference loop with either normalisation (reference::train is MiniMind-mean only).
fn reference_trajectory(
    cfg: &reference::ModelConfig,
    params: &mut reference::Params,
    batches: &[(Array2<i64>, Array2<i64>)],
    accum: u64,
    base_lr: f64,
    clip: f64,
    norm: reference::accumulation::Normalisation,
) -> Vec<(f64, f64, Option<f64>)> {
    use reference::accumulation::{is_optimizer_step, loss_weight, window};
    let total = batches.len() as u64;
    let mut opt = reference::adamw::AdamW::new(params, adamw_traj().0);
    let mut acc = reference::params::zeros_like(params);
    let counts: Vec<usize> = batches
        .iter()
        .map(|(_, l)| {
            l.slice(ndarray::s![.., 1..])
                .iter()
                .filter(|&&x| x != -100)
                .count()
        })
        .collect();
    let mut rows = Vec::new();
    for (i, (ids, labels)) in batches.iter().enumerate() {
        let step = i as u64 + 1;
        let lr = reference::schedule::cosine_lr(step, total, base_lr);
        let (first, last) = window(step, accum, total);
        let wc = counts[(first - 1) as usize..last as usize].iter().sum();
        let (out, g) = reference::model::forward_backward(cfg, params, ids.view(), labels.view());
        reference::model::add_scaled(&mut acc, &g, loss_weight(norm, accum, counts[i], wc));
        let gn = is_optimizer_step(step, accum, total).then(|| {
            let n = reference::clip::clip_grad_norm(&mut acc, clip);
            opt.step(params, &acc, lr);
            acc = reference::params::zeros_like(params);
            n
        });
        rows.push((lr, out.total, gn));
    }
    rows
}

/// A few micro-steps with accumulation (trailing partial window included).
fn trajectory(
    c: &Case,
    steps: usize,
    accum: u64,
    token_weighted: bool,
) -> Result<(), TestCaseError> {
    let mut params = reference::params::init_params(&c.cfg, c.seed);
    let batches: Vec<_> = (0..steps).map(|i| batch(c, 10 + i as u64)).collect();
    let mut tr = verify_fast::trainer(
        &c.cfg,
        &params,
        adamw_traj().1,
        fast::model::precision::Precision::Fp32,
        Device::Cpu,
    )
    .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
    let (rn, fnorm) = if token_weighted {
        (
            reference::accumulation::Normalisation::TokenWeighted,
            fast::optim::accumulation::Normalisation::TokenWeighted,
        )
    } else {
        (
            reference::accumulation::Normalisation::MiniMindMean,
            fast::optim::accumulation::Normalisation::MiniMindMean,
        )
    };
    let expected = reference_trajectory(&c.cfg, &mut params, &batches, accum, 1e-3, 1.0, rn);
    let fb: Vec<(Tensor, Tensor)> = batches
        .iter()
        .map(|(i, l)| (to_tensor_i64(i), to_tensor_i64(l)))
        .collect();
    let got = verify_fast::run_trajectory(&mut tr, &fb, accum, 1e-3, 1.0, fnorm)
        .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
    let mut rows = Vec::new();
    for (g, (lr, loss, gn)) in got.iter().zip(&expected) {
        rows.push(Row::exact(
            "traj",
            &format!("step{} lr", g.step),
            g.lr == *lr,
        ));
        rows.push(Row::scalar(
            "traj",
            &format!("step{} loss", g.step),
            g.loss,
            *loss,
            LOSS_TOL * 10.0,
        ));
        rows.push(Row::exact(
            "traj",
            &format!("step{} stepped", g.step),
            g.grad_norm.is_some() == gn.is_some(),
        ));
        if let (Some(a), Some(b)) = (g.grad_norm, gn) {
            rows.push(Row::scalar(
                "traj",
                &format!("step{} grad_norm", g.step),
                a.max(1e-5),
                b.max(1e-5),
                GRAD_TOL,
            ));
        }
    }
    rows.extend(named_rows(
        "final",
        &from_named(&tr.named_f64()),
        &params,
        STEP_TOL,
    ));
    check(&rows)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Logits, ce/aux/total, counted labels, every gradient, grad norm and the clipped AdamW step.
    #[test]
    fn one_training_step_matches_the_reference(c in case()) {
        one_step(&c)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    /// 3..5 micro-steps, accumulation 2..3, MiniMind-mean or token-weighted normalisation.
    #[test]
    fn a_few_step_trajectory_matches_the_reference(
        c in case(), steps in 3usize..=5, accum in 2u64..=3, tw in any::<bool>()
    ) {
        trajectory(&c, steps, accum, tw)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// Epoch order, SkipBatchSampler, DistributedSampler and the rescale are the same functions.
    #[test]
    fn samplers_agree_exactly(
        n in 0usize..200, seed in any::<u64>(), epoch in 0u64..1000,
        bs in 1usize..17, skip in 0usize..20, world in 1usize..9, drop_last in any::<bool>(),
        step in 0u64..100_000, saved in 1u64..9, current in 1u64..9,
    ) {
        let perm = fast::data::order::epoch_permutation(n, seed, epoch);
        prop_assert_eq!(&perm, &reference::sampler::epoch_permutation(n, seed, epoch));
        let s = fast::data::order::SkipBatchSampler::new(&perm, bs, skip);
        let got: Vec<Vec<usize>> = s.iter().map(|b| b.to_vec()).collect();
        prop_assert_eq!(got, reference::sampler::skip_batches(&perm, bs, skip));
        prop_assert_eq!(s.len(), reference::sampler::skip_batch_len(n, bs, skip));
        for rank in 0..world {
            prop_assert_eq!(
                fast::data::order::distributed_indices(&perm, world, rank, drop_last),
                reference::sampler::distributed_indices(&perm, world, rank, drop_last)
            );
        }
        prop_assert_eq!(
            fast::data::order::rescale_step(step as usize, saved as usize, current as usize) as u64,
            reference::sampler::rescale_step(step, saved, current)
        );
    }

    /// Schedule (with and without warmup) and accumulation bit for bit.
    #[test]
    fn schedule_and_accumulation_agree_exactly(
        total in 1u64..5000, frac in 0.0f64..=1.0, base in 1e-6f64..1e-2, warmup in 0u64..100,
        accum in 1u64..9, count in 0usize..500, extra in 0usize..500,
    ) {
        let step = ((total as f64 * frac) as u64).max(1);
        prop_assert_eq!(
            fast::optim::schedule::cosine_lr(step, total, base).to_bits(),
            reference::schedule::cosine_lr(step, total, base).to_bits()
        );
        prop_assert_eq!(
            fast::optim::schedule::lr_at(step, total, base, warmup).to_bits(),
            reference::schedule::lr_at(step, total, base, warmup).to_bits()
        );
        prop_assert_eq!(
            fast::optim::accumulation::is_optimizer_step(step, accum, total),
            reference::accumulation::is_optimizer_step(step, accum, total)
        );
        prop_assert_eq!(fast::optim::accumulation::window(step, accum, total), reference::accumulation::window(step, accum, total));
        for (f, r) in [
            (fast::optim::accumulation::Normalisation::MiniMindMean, reference::accumulation::Normalisation::MiniMindMean),
            (fast::optim::accumulation::Normalisation::TokenWeighted, reference::accumulation::Normalisation::TokenWeighted),
        ] {
            prop_assert_eq!(
                fast::optim::accumulation::loss_weight(f, accum, count, count + extra).to_bits(),
                reference::accumulation::loss_weight(r, accum, count, count + extra).to_bits()
            );
        }
    }

    /// Padded and packed batching equal the reference's dataset rows.
    #[test]
    fn batching_agrees_exactly(
        docs in prop::collection::vec(prop::collection::vec(0u32..50, 0..20), 1..6), max_len in 2usize..24,
    ) {
        let sp = fast::data::rows::SpecialTokens::default();
        let rsp = reference::dataset::SpecialTokens::default();
        for d in &docs {
            let f = fast::data::rows::padded_row(d, max_len, sp);
            let r = reference::dataset::encode_padded(d, max_len, rsp);
            prop_assert_eq!((f.input_ids, f.labels), (r.input_ids, r.labels));
        }
        let f = fast::data::rows::packed_rows(&docs, max_len, sp);
        let r = reference::dataset::pack(&docs, max_len, rsp);
        prop_assert_eq!(f.len(), r.len());
        for (a, b) in f.into_iter().zip(r) {
            prop_assert_eq!((a.input_ids, a.labels), (b.input_ids, b.labels));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]

    /// The device-side GradScaler follows the reference's scale trajectory exactly, and skips
    /// exactly the steps with a non-finite gradient.
    #[test]
    fn scaler_trajectories_agree_exactly(
        events in prop::collection::vec(prop_oneof![4 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)], 1..40),
        interval in 1u32..5,
    ) {
        let mut r = reference::scaler::GradScaler::new(1024.0, 2.0, 0.5, interval);
        let mut f = fast::optim::scaler::GradScaler::new(1024.0, 2.0, 0.5, interval as i64, Device::Cpu);
        for ev in events {
            let bad = match ev { 1 => f64::INFINITY, 2 => f64::NAN, _ => 3.0 };
            let mut rg = BTreeMap::from([("p".to_string(), ndarray::arr1(&[1.0, bad]).into_dyn())]);
            let found_r = r.unscale(&mut rg);
            let g = Tensor::from_slice(&[1.0f32, bad as f32]) * f.scale_value();
            f.unscale(std::slice::from_ref(&g)).unwrap();
            prop_assert_eq!(f.found_inf_value(), found_r);
            r.update(found_r);
            f.update();
            prop_assert_eq!(f.scale_value(), r.scale);
        }
    }
}

/// Rows of `mode` read from a token cache written from `docs` (3 documents a shard, so rows
/// cross shards), all of them in index order.
fn cache_rows(
    docs: &[Vec<u32>],
    mode: fast::data::dataset::DataMode,
    max_len: usize,
    epoch: u64,
) -> Vec<fast::data::rows::Row> {
    let dir = tempfile::tempdir().unwrap();
    let cache = std::sync::Arc::new(
        fast::data::token_cache::write_from_ids(dir.path(), docs, 64, 3).unwrap(),
    );
    let sp = fast::data::rows::SpecialTokens::default();
    let ds = fast::data::dataset::TokenDataset::new(cache, mode, max_len, sp, 64).unwrap();
    (0..ds.len()).map(|i| ds.item(i, epoch).unwrap()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// The rows the training loop reads from the token cache equal the reference's rows of the
    /// same documents: padded and packed.
    #[test]
    fn rows_from_the_token_cache_agree_exactly(
        docs in prop::collection::vec(prop::collection::vec(0u32..50, 0..20), 1..9), max_len in 2usize..24,
    ) {
        use fast::data::dataset::DataMode;
        let rsp = reference::dataset::SpecialTokens::default();
        let got = cache_rows(&docs, DataMode::Padded, max_len, 0);
        prop_assert_eq!(got.len(), docs.len());
        for (g, d) in got.iter().zip(&docs) {
            let r = reference::dataset::encode_padded(d, max_len, rsp);
            prop_assert_eq!((&g.input_ids, &g.labels), (&r.input_ids, &r.labels));
        }
        let got = cache_rows(&docs, DataMode::Packed, max_len, 0);
        let want = reference::dataset::pack(&docs, max_len, rsp);
        prop_assert_eq!(got.len(), want.len());
        for (g, r) in got.iter().zip(&want) {
            prop_assert_eq!((&g.input_ids, &g.labels), (&r.input_ids, &r.labels));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// packed-docs rows from the token cache equal the reference's pack_docs: ids, labels (-100
    /// at every document start and the padding), segment starts (a document split across rows
    /// continues as the segment at 0), and the batch's per-token seg_start and counted labels.
    #[test]
    fn packed_doc_rows_agree_with_the_reference_pack_docs(
        docs in prop::collection::vec(prop::collection::vec(0u32..50, 0..20), 1..9), max_len in 1usize..24,
    ) {
        let max_len = max_len.max(2);
        let rsp = reference::dataset::SpecialTokens::default();
        let want = reference::dataset::pack_docs(&docs, max_len, rsp);
        let got = cache_rows(&docs, fast::data::dataset::DataMode::PackedDocs, max_len, 0);
        prop_assert_eq!(got.len(), want.len());
        for (g, r) in got.iter().zip(&want) {
            prop_assert_eq!((&g.input_ids, &g.labels), (&r.input_ids, &r.labels));
            prop_assert_eq!(g.segment_starts.as_ref(), Some(&r.segment_starts));
            // seg_start: each position's segment start, from the reference's starts.
            let seg: Vec<i32> = (0..max_len)
                .map(|t| *r.segment_starts.iter().rev().find(|&&s| s <= t).unwrap() as i32)
                .collect();
            prop_assert_eq!(g.seg_start(), Some(seg));
        }
        let hb = fast::data::batch::HostBatch::from_rows(&got, max_len);
        let counted: usize = want
            .iter()
            .map(|r| r.labels[1..].iter().filter(|&&l| l != -100).count())
            .sum();
        prop_assert_eq!(hb.counted_labels, counted);
        prop_assert_eq!(hb.seg_start.as_ref().map(Vec::len), Some(got.len() * max_len));
    }
}

/// reference::mlm's options for fast's.
fn reference_masking(m: &fast::data::mlm::MlmMasking) -> reference::mlm::MlmMasking {
    let mut r =
        reference::mlm::MlmMasking::new(m.mask_token_id, m.vocab_size, m.special_ids.clone());
    r.probability = m.probability;
    r
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// chunked rows from the token cache equal the reference's group_texts.
    #[test]
    fn chunked_rows_agree_with_the_reference_group_texts(
        docs in prop::collection::vec(prop::collection::vec(0u32..50, 0..20), 1..9), max_len in 1usize..24,
    ) {
        let max_len = max_len.max(2);
        let want = reference::dataset::group_texts(&docs, max_len);
        let got = cache_rows(&docs, fast::data::dataset::DataMode::Chunked, max_len, 0);
        prop_assert_eq!(got.len(), want.len());
        for (g, r) in got.iter().zip(&want) {
            prop_assert_eq!((&g.input_ids, &g.labels), (&r.input_ids, &r.labels));
        }
    }

    /// The masking draws the reference's bits for any ids, probability, seed, epoch and index.
    #[test]
    fn mlm_masking_agrees_with_the_reference_bit_for_bit(
        ids in prop::collection::vec(0i64..40, 0..64), p in prop_oneof![Just(0.0), Just(1.0), 0.0f64..1.0],
        seed in any::<u64>(), epoch in 0u64..1000, index in any::<u64>(), vocab in 40usize..100,
    ) {
        let m = fast::data::mlm::MlmMasking::new(p, 3, vocab, vec![2, 0, 1, 3]);
        let mut row = fast::data::rows::Row::new(ids.clone(), ids.clone());
        fast::data::mlm::mask_row(&mut row, &m, seed, epoch, index);
        let r = reference::mlm::mask_tokens(&ids, &reference_masking(&m), seed, epoch, index);
        prop_assert_eq!((&row.input_ids, &row.labels), (&r.input_ids, &r.labels));
        let selected = r.labels.iter().filter(|&&l| l != -100).count();
        prop_assert_eq!(
            fast::data::rows::count_labels(&row.labels, fast::data::rows::Counting::Unshifted),
            selected
        );
    }

    /// Masked rows from the dataset are the reference's masking of the reference's rows, drawn by
    /// each row's index and the epoch (so any batch order, size or rank split draws the same).
    #[test]
    fn masked_dataset_rows_are_drawn_by_sample_index_and_epoch(
        docs in prop::collection::vec(prop::collection::vec(4u32..50, 0..20), 1..9), max_len in 2usize..24,
        seed in any::<u64>(), epoch in 0u64..5, chunked in any::<bool>(),
    ) {
        use fast::data::dataset::{DataMode, TokenDataset};
        let dir = tempfile::tempdir().unwrap();
        let cache = std::sync::Arc::new(fast::data::token_cache::write_from_ids(dir.path(), &docs, 64, 3).unwrap());
        let sp = fast::data::rows::SpecialTokens::default();
        let mode = if chunked { DataMode::Chunked } else { DataMode::Padded };
        let m = fast::data::mlm::MlmMasking::new(0.3, 3, 64, vec![0, 1, 2, 3]);
        let ds = TokenDataset::new(cache, mode, max_len, sp, 64).unwrap().with_mlm(m.clone(), seed);
        let plain: Vec<reference::dataset::Row> = if chunked {
            reference::dataset::group_texts(&docs, max_len)
        } else {
            docs.iter().map(|d| reference::dataset::encode_padded(d, max_len, reference::dataset::SpecialTokens::default())).collect()
        };
        prop_assert_eq!(ds.len(), plain.len());
        for (i, r) in plain.iter().enumerate().rev() {
            let want = reference::mlm::mask_tokens(&r.input_ids, &reference_masking(&m), seed, epoch, i as u64);
            let got = ds.item(i, epoch).unwrap();
            prop_assert_eq!((&got.input_ids, &got.labels), (&want.input_ids, &want.labels));
        }
        let items: Vec<usize> = (0..ds.len()).collect();
        let hb = ds.batch(&items, epoch).unwrap();
        let selected = hb.labels.iter().filter(|&&l| l != -100).count();
        prop_assert_eq!(hb.counted_labels, selected, "MLM counts every selected position");
    }
}

/// The group_texts cases of golden/seed004 (Hugging Face's run_clm recipe), through the cache.
#[test]
fn chunked_rows_reproduce_the_seed004_group_texts_cases() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden/seed004/components_seed004.json");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = j["group_texts"].as_array().unwrap();
    assert!(!cases.is_empty());
    for c in cases {
        let docs: Vec<Vec<u32>> = serde_json::from_value(c["token_lists"].clone()).unwrap();
        let bs = c["block_size"].as_u64().unwrap() as usize;
        let ids: Vec<Vec<i64>> = serde_json::from_value(c["result"]["input_ids"].clone()).unwrap();
        let labels: Vec<Vec<i64>> = serde_json::from_value(c["result"]["labels"].clone()).unwrap();
        let rows = cache_rows(&docs, fast::data::dataset::DataMode::Chunked, bs, 0);
        assert_eq!(
            rows.iter().map(|r| r.input_ids.clone()).collect::<Vec<_>>(),
            ids
        );
        assert_eq!(
            rows.iter().map(|r| r.labels.clone()).collect::<Vec<_>>(),
            labels
        );
    }
}

/// Counts of a masking: (selected, of those set to the mask id, set to another id, kept).
fn masking_counts(ids: &[i64], input: &[i64], labels: &[i64], mask: i64) -> [usize; 4] {
    let mut c = [0usize; 4];
    for ((&id, &x), &l) in ids.iter().zip(input).zip(labels) {
        if l == -100 {
            assert_eq!(x, id, "an unselected position keeps its id");
            continue;
        }
        assert_eq!(l, id, "a selected position's label is its original id");
        c[0] += 1;
        c[if x == mask {
            1
        } else if x != id {
            2
        } else {
            3
        }] += 1;
    }
    c
}

/// fast's and the reference's masking have transformers' statistics over 25,600 positions:
/// each non-special id selected with p = 0.15, of the selected 80% masked, 10% replaced, 10%
/// kept, specials never selected. Bounds are 6 binomial standard deviations (a false failure
/// about 1e-9); a random replacement equal to the mask id or to the original (1/1000 each)
/// shifts the shares by under 0.1% of the selected, far inside them.
#[test]
fn mlm_masking_has_the_documented_statistics_in_fast_and_the_reference() {
    let (vocab, mask, specials) = (1000usize, 3i64, vec![0i64, 1, 2, 3]);
    let m = fast::data::mlm::MlmMasking::new(0.15, mask, vocab, specials.clone());
    let mut rng = fast::data::order::SplitMix64::new(2024);
    let mut fast_c = [0usize; 4];
    let mut ref_c = [0usize; 4];
    let mut non_special = 0usize;
    for index in 0..200u64 {
        let ids: Vec<i64> = (0..128)
            .map(|_| (rng.next_u64() % vocab as u64) as i64)
            .collect();
        non_special += ids.iter().filter(|i| !specials.contains(i)).count();
        let mut row = fast::data::rows::Row::new(ids.clone(), ids.clone());
        fast::data::mlm::mask_row(&mut row, &m, 11, 0, index);
        for (id, l) in ids.iter().zip(&row.labels) {
            if specials.contains(id) {
                assert_eq!(*l, -100, "special id {id} selected");
            }
        }
        let c = masking_counts(&ids, &row.input_ids, &row.labels, mask);
        let r = reference::mlm::mask_tokens(&ids, &reference_masking(&m), 11, 0, index);
        let d = masking_counts(&ids, &r.input_ids, &r.labels, mask);
        for k in 0..4 {
            fast_c[k] += c[k];
            ref_c[k] += d[k];
        }
    }
    let within = |k: usize, n: usize, p: f64| {
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        (k as f64 - n as f64 * p).abs() <= 6.0 * sd
    };
    for (who, c) in [("fast", fast_c), ("reference", ref_c)] {
        assert!(
            within(c[0], non_special, 0.15),
            "{who}: {c:?} of {non_special}"
        );
        assert!(within(c[1], c[0], 0.8), "{who} masked: {c:?}");
        assert!(within(c[2], c[0], 0.1), "{who} replaced: {c:?}");
        assert!(within(c[3], c[0], 0.1), "{who} kept: {c:?}");
    }
}

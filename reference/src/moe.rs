//! Mixture-of-experts feed-forward (`MOEFeedForward`, training mode) with its aux loss, in
//! MiniMind2's form ([`forward`] / [`backward`]: shared experts, top-k renormalised only for
//! k > 1, per-sequence or global aux) and MiniMind-3's ([`forward3`] / [`backward3`]: no shared
//! experts, renormalised whenever `norm_topk_prob`, one global aux). Routing and the experts are
//! the same code for both.

use ndarray::{Array1, Array2, ArrayView2, Axis};

use crate::linear;
use crate::mlp::{self, MlpCache, MlpGrads, MlpWeights};

/// Router [E, C], routed experts, shared experts (always applied).
pub struct MoeWeights<'a> {
    pub router: ArrayView2<'a, f64>,
    pub experts: Vec<MlpWeights<'a>>,
    pub shared: Vec<MlpWeights<'a>>,
}

/// Routing options and the batch layout (b sequences of t tokens) the seq aux loss needs.
#[derive(Clone, Copy, Debug)]
pub struct MoeShape {
    pub b: usize,
    pub t: usize,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    pub aux_alpha: f64,
    pub seq_aux: bool,
}

/// MiniMind-3 routing options (`num_experts_per_tok`, `norm_topk_prob`, `router_aux_loss_coef`).
#[derive(Clone, Copy, Debug)]
pub struct Moe3Shape {
    pub top_k: usize,
    pub norm_topk_prob: bool,
    pub aux_coef: f64,
}

pub struct MoeCache {
    x: Array2<f64>,
    /// Whether the top-k weights were renormalised (the backward differs).
    renormalised: bool,
    /// Router softmax scores: [N, E].
    scores: Array2<f64>,
    /// Chosen experts per token, best first: [N][k].
    topk_idx: Vec<Vec<usize>>,
    /// Weights after optional renormalisation: [N][k].
    topk_w: Vec<Vec<f64>>,
    /// Per routed expert: the (token, slot) pairs it served, its output rows and its cache.
    expert_rows: Vec<Vec<(usize, usize)>>,
    expert_out: Vec<Array2<f64>>,
    expert_cache: Vec<MlpCache>,
    shared_cache: Vec<MlpCache>,
    /// d aux / d score[n, e] = aux_ce[row(n), e] * scale, per form: MiniMind2 per sequence
    /// (seq_aux, [B, E]) or global ([1, E]) routed fractions; MiniMind-3 `E * load` ([1, E]).
    aux_ce: Array2<f64>,
}

pub struct MoeGrads {
    pub router: Array2<f64>,
    pub experts: Vec<MlpGrads>,
    pub shared: Vec<MlpGrads>,
}

/// Indices of the k largest entries, largest first; ties go to the lower index.
pub fn topk(row: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

fn softmax_rows(z: &Array2<f64>) -> Array2<f64> {
    let mut s = z.clone();
    for mut row in s.rows_mut() {
        let m = row.fold(f64::NEG_INFINITY, |a, &v| a.max(v));
        row.mapv_inplace(|v| (v - m).exp());
        let sum = row.sum();
        row /= sum;
    }
    s
}

/// Router scores, top-k choice and weights, every expert's output: everything but the aux loss.
/// `renorm`: divide the top-k weights by their sum + 1e-20.
fn route_and_mix(
    x: ArrayView2<f64>,
    w: &MoeWeights,
    k: usize,
    renorm: bool,
) -> (Array2<f64>, MoeCache) {
    let n = x.nrows();
    let ne = w.experts.len();
    let scores = softmax_rows(&linear::forward(x, w.router));
    let mut topk_idx = Vec::with_capacity(n);
    let mut topk_w = Vec::with_capacity(n);
    let mut expert_rows = vec![Vec::new(); ne];
    for i in 0..n {
        let row = scores.row(i).to_vec();
        let idx = topk(&row, k);
        let mut wts: Vec<f64> = idx.iter().map(|&e| row[e]).collect();
        if renorm {
            let denom = wts.iter().sum::<f64>() + 1e-20;
            wts.iter_mut().for_each(|v| *v /= denom);
        }
        for (slot, &e) in idx.iter().enumerate() {
            expert_rows[e].push((i, slot));
        }
        topk_idx.push(idx);
        topk_w.push(wts);
    }
    let mut y = Array2::zeros(x.raw_dim());
    let mut expert_out = Vec::with_capacity(ne);
    let mut expert_cache = Vec::with_capacity(ne);
    for (e, ew) in w.experts.iter().enumerate() {
        let rows: Vec<usize> = expert_rows[e].iter().map(|&(i, _)| i).collect();
        let xe = x.select(Axis(0), &rows);
        let (ye, cache) = mlp::forward(xe.view(), ew);
        for (r, &(i, slot)) in expert_rows[e].iter().enumerate() {
            let mut yrow = y.row_mut(i);
            yrow.scaled_add(topk_w[i][slot], &ye.row(r));
        }
        expert_out.push(ye);
        expert_cache.push(cache);
    }
    let mut shared_cache = Vec::with_capacity(w.shared.len());
    for sw in &w.shared {
        let (ys, cache) = mlp::forward(x, sw);
        y += &ys;
        shared_cache.push(cache);
    }
    let cache = MoeCache {
        x: x.to_owned(),
        renormalised: renorm,
        scores,
        topk_idx,
        topk_w,
        expert_rows,
        expert_out,
        expert_cache,
        shared_cache,
        aux_ce: Array2::zeros((1, ne)),
    };
    (y, cache)
}

/// MiniMind2. x: [B*T, C] -> (y [B*T, C], aux loss scalar). Aux is 0 unless `aux_alpha > 0`.
///
/// y = sum_slots w * expert(x) + sum_shared expert(x); scores = softmax(x Wr^T); the top-k
/// weights are renormalised (+1e-20) only when k > 1 and norm_topk_prob.
/// seq_aux: ce[b,e] = count(b,e) / (T*k/E); aux = alpha * mean_b sum_e ce[b,e] * mean_t score.
/// else: aux = alpha * sum_e mean_n(score[n,e]) * E * count(e)/(N*k).
pub fn forward(x: ArrayView2<f64>, w: &MoeWeights, sh: MoeShape) -> (Array2<f64>, f64, MoeCache) {
    let k = sh.top_k;
    let (y, mut cache) = route_and_mix(x, w, k, k > 1 && sh.norm_topk_prob);
    let (aux, aux_ce) = aux_loss(&cache.scores, &cache.topk_idx, w.experts.len(), sh);
    cache.aux_ce = aux_ce;
    (y, aux, cache)
}

/// MiniMind-3. x: [N, C] (all B*T tokens) -> (y [N, C], aux loss scalar).
///
/// scores = softmax(x Wg^T) [N, E]; top-k per token; with norm_topk_prob the k weights are
/// divided by their sum + 1e-20, for k = 1 too (upstream applies it unconditionally; for k = 1 the
/// weight is then 1 up to 1e-20 and the router learns only through the aux loss);
/// y = sum_slots w * expert(x); `w.shared` is applied too but MiniMind-3 builds none.
/// Aux (when aux_coef > 0): load = one_hot(topk_idx, E).float().mean(0), [k, E], so
/// sum over slots of load[:, e] = count(e) / N; aux = sum(load * scores.mean(0)) * E * coef
/// = coef * E * sum_e (count(e) / N) * mean_n score[n, e]. Counts carry no gradient.
pub fn forward3(x: ArrayView2<f64>, w: &MoeWeights, sh: Moe3Shape) -> (Array2<f64>, f64, MoeCache) {
    let n = x.nrows();
    let ne = w.experts.len();
    let (y, mut cache) = route_and_mix(x, w, sh.top_k, sh.norm_topk_prob);
    if sh.aux_coef <= 0.0 {
        return (y, 0.0, cache);
    }
    let mut load = Array2::zeros((1, ne));
    for idx in &cache.topk_idx {
        for &e in idx {
            load[[0, e]] += 1.0;
        }
    }
    load /= n as f64;
    let mean_score = cache.scores.mean_axis(Axis(0)).expect("n > 0");
    let aux = (&load.row(0) * &mean_score).sum() * ne as f64 * sh.aux_coef;
    cache.aux_ce = load * ne as f64;
    (y, aux, cache)
}

fn aux_loss(
    scores: &Array2<f64>,
    topk_idx: &[Vec<usize>],
    ne: usize,
    sh: MoeShape,
) -> (f64, Array2<f64>) {
    let n = scores.nrows();
    let k = sh.top_k as f64;
    if sh.aux_alpha <= 0.0 {
        return (0.0, Array2::zeros((1, ne)));
    }
    if sh.seq_aux {
        let mut ce = Array2::zeros((sh.b, ne));
        for (i, idx) in topk_idx.iter().enumerate() {
            for &e in idx {
                ce[[i / sh.t, e]] += 1.0;
            }
        }
        ce /= sh.t as f64 * k / ne as f64;
        let mut aux = 0.0;
        for bi in 0..sh.b {
            let mean_score = scores
                .slice(ndarray::s![bi * sh.t..(bi + 1) * sh.t, ..])
                .mean_axis(Axis(0))
                .expect("t > 0");
            aux += ce.row(bi).dot(&mean_score);
        }
        (aux / sh.b as f64 * sh.aux_alpha, ce)
    } else {
        let mut ce = Array2::zeros((1, ne));
        for idx in topk_idx {
            for &e in idx {
                ce[[0, e]] += 1.0;
            }
        }
        ce /= n as f64 * k;
        let fi = &ce * ne as f64;
        let pi = scores.mean_axis(Axis(0)).expect("n > 0");
        ((&pi * &fi.row(0)).sum() * sh.aux_alpha, fi)
    }
}

/// Backward of everything [`route_and_mix`] did: (dx from experts and shared experts, grads of
/// the experts, d loss / d scores through the top-k weights).
fn backward_mix(
    dy: ArrayView2<f64>,
    w: &MoeWeights,
    c: &MoeCache,
) -> (Array2<f64>, Vec<MlpGrads>, Vec<MlpGrads>, Array2<f64>) {
    let n = c.x.nrows();
    let k = c.topk_idx.first().map_or(0, |v| v.len());
    let mut dx = Array2::zeros(c.x.raw_dim());
    // d loss / d topk weight, per token and slot
    let mut dtw = vec![vec![0.0; k]; n];
    let mut experts = Vec::with_capacity(w.experts.len());
    for (e, ew) in w.experts.iter().enumerate() {
        let rows = &c.expert_rows[e];
        let mut dye = Array2::zeros(c.expert_out[e].raw_dim());
        for (r, &(i, slot)) in rows.iter().enumerate() {
            dtw[i][slot] = dy.row(i).dot(&c.expert_out[e].row(r));
            dye.row_mut(r).assign(&(&dy.row(i) * c.topk_w[i][slot]));
        }
        let (dxe, g) = mlp::backward(dye.view(), ew, &c.expert_cache[e]);
        for (r, &(i, _)) in rows.iter().enumerate() {
            let mut dxr = dx.row_mut(i);
            dxr += &dxe.row(r);
        }
        experts.push(g);
    }
    let mut shared = Vec::with_capacity(w.shared.len());
    for (sw, sc) in w.shared.iter().zip(&c.shared_cache) {
        let (dxs, g) = mlp::backward(dy, sw, sc);
        dx += &dxs;
        shared.push(g);
    }
    let mut dscores = Array2::<f64>::zeros(c.scores.raw_dim());
    for i in 0..n {
        let idx = &c.topk_idx[i];
        let p: Vec<f64> = idx.iter().map(|&e| c.scores[[i, e]]).collect();
        if c.renormalised {
            // w_s = p_s / (S + 1e-20), S = sum p
            let denom = p.iter().sum::<f64>() + 1e-20;
            let dot: f64 = (0..k).map(|s| dtw[i][s] * p[s]).sum::<f64>() / (denom * denom);
            for s in 0..k {
                dscores[[i, idx[s]]] += dtw[i][s] / denom - dot;
            }
        } else {
            for s in 0..k {
                dscores[[i, idx[s]]] += dtw[i][s];
            }
        }
    }
    (dx, experts, shared, dscores)
}

/// Router backward: d scores -> softmax -> linear; adds into dx.
fn backward_router(
    dscores: Array2<f64>,
    w: &MoeWeights,
    c: &MoeCache,
    dx: &mut Array2<f64>,
) -> Array2<f64> {
    let dot: Array1<f64> = (&dscores * &c.scores).sum_axis(Axis(1));
    let dlogits = &c.scores * &(&dscores - &dot.insert_axis(Axis(1)));
    let (dxr, drouter) = linear::backward(dlogits.view(), c.x.view(), w.router);
    *dx += &dxr;
    drouter
}

/// MiniMind2. dy: [B*T, C], daux: gradient of the loss w.r.t. the aux scalar ->
/// (dx [B*T, C], grads). Routing counts are constants; gradient flows through the top-k
/// weights and the aux scores.
pub fn backward(
    dy: ArrayView2<f64>,
    daux: f64,
    w: &MoeWeights,
    c: &MoeCache,
    sh: MoeShape,
) -> (Array2<f64>, MoeGrads) {
    let n = c.x.nrows();
    let (mut dx, experts, shared, mut dscores) = backward_mix(dy, w, c);
    if sh.aux_alpha > 0.0 && daux != 0.0 {
        if sh.seq_aux {
            let f = daux * sh.aux_alpha / (sh.b as f64 * sh.t as f64);
            for i in 0..n {
                let mut row = dscores.row_mut(i);
                row.scaled_add(f, &c.aux_ce.row(i / sh.t));
            }
        } else {
            let f = daux * sh.aux_alpha / n as f64;
            for mut row in dscores.rows_mut() {
                row.scaled_add(f, &c.aux_ce.row(0));
            }
        }
    }
    let router = backward_router(dscores, w, c, &mut dx);
    let grads = MoeGrads {
        router,
        experts,
        shared,
    };
    (dx, grads)
}

/// MiniMind-3. dy: [N, C], daux: d loss / d aux -> (dx [N, C], grads). d aux / d score[n, e]
/// = coef * E * load(e) / N (load is a constant); the rest is [`backward`]'s.
pub fn backward3(
    dy: ArrayView2<f64>,
    daux: f64,
    w: &MoeWeights,
    c: &MoeCache,
    sh: Moe3Shape,
) -> (Array2<f64>, MoeGrads) {
    let n = c.x.nrows();
    let (mut dx, experts, shared, mut dscores) = backward_mix(dy, w, c);
    if sh.aux_coef > 0.0 && daux != 0.0 {
        let f = daux * sh.aux_coef / n as f64;
        for mut row in dscores.rows_mut() {
            row.scaled_add(f, &c.aux_ce.row(0));
        }
    }
    let router = backward_router(dscores, w, c, &mut dx);
    let grads = MoeGrads {
        router,
        experts,
        shared,
    };
    (dx, grads)
}

//! Mixture of experts, training mode: MiniMind2's MOEFeedForward + MoEGate and MiniMind-3's
//! MOEFeedForward.
//!
//! Router: `scores = softmax(x Wg^T)`, both in fp32, over the routed experts; top-k; the k weights
//! divided by their sum + 1e-20 when `norm_topk_prob` (MiniMind2: only for k > 1; MiniMind-3:
//! for every k, so with top-1 the weight is 1 and the router learns through the aux loss alone).
//! Output: the weighted sum of the routed experts' outputs plus every shared expert's output
//! (MiniMind-3 has none). Aux loss:
//! - MiniMind2, seq_aux: `ce[b,e] = #(t, slot) routed to e / (T*k/E)`; `alpha * mean_b sum_e
//!   ce[b,e] * mean_t score[b,t,e]`;
//! - MiniMind2 otherwise: `alpha * sum_e mean(score[:, e]) * E * fraction of (token, slot) pairs
//!   routed to e`;
//! - MiniMind-3: `coef * E * sum_e (#(token, slot) routed to e / N) * mean_n score[n, e]` over all
//!   N = B*T tokens (upstream's `(one_hot(topk_idx).mean(0) * scores.mean(0)).sum()`).
//!
//! Counts carry no gradient (as in MiniMind); pads are routed and counted. Dispatch: the N*k
//! (token, slot) pairs are sorted by expert, each expert runs once on its contiguous slice, and
//! `index_add` scatters the weighted outputs back. The per-expert sizes are read to the host once
//! per layer (one sync per MoE layer).

use tch::{Kind, Tensor};

use super::{linear, Mlp, ModelConfig};

/// How a MoE layer weighs its experts and what aux loss it adds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MoeRouting {
    MiniMind2 {
        norm_topk_prob: bool,
        alpha: f64,
        seq_aux: bool,
    },
    MiniMind3 {
        norm_topk_prob: bool,
        coef: f64,
    },
}

impl MoeRouting {
    pub fn of(cfg: &ModelConfig) -> Self {
        if cfg.is_minimind3() {
            MoeRouting::MiniMind3 {
                norm_topk_prob: cfg.norm_topk_prob,
                coef: cfg.router_aux_loss_coef,
            }
        } else {
            MoeRouting::MiniMind2 {
                norm_topk_prob: cfg.norm_topk_prob,
                alpha: cfg.aux_loss_alpha,
                seq_aux: cfg.seq_aux,
            }
        }
    }

    /// Whether the top-k weights are renormalised for `k`.
    fn renormalises(&self, k: i64) -> bool {
        match *self {
            MoeRouting::MiniMind2 { norm_topk_prob, .. } => k > 1 && norm_topk_prob,
            MoeRouting::MiniMind3 { norm_topk_prob, .. } => norm_topk_prob,
        }
    }
}

pub struct MoeFeedForward {
    /// Router [E, d].
    pub gate: Tensor,
    pub experts: Vec<Mlp>,
    pub shared_experts: Vec<Mlp>,
    pub top_k: i64,
    pub routing: MoeRouting,
}

impl MoeFeedForward {
    /// x `[B, T, d]` -> (`[B, T, d]`, aux loss scalar fp32).
    pub fn forward(&self, x: &Tensor, compute: Kind) -> (Tensor, Tensor) {
        let (b, t, d) = x.size3().expect("MoE input must be [B, T, d]");
        let n = b * t;
        let e_n = self.experts.len() as i64;
        let k = self.top_k;
        let xf = x.reshape([n, d]);
        let sk = super::upcast_kind(x.kind());
        // The router in fp32 (its matmul is [N, d] x [d, E], a rounding error next to the
        // experts'): in bf16 a top-k choice between near-equal scores flips with round-off.
        let scores = linear(&xf, &self.gate, sk).softmax(-1, sk); // [N, E]
        let (mut topw, topi) = scores.topk(k, -1, true, true); // [N, k]
        if self.routing.renormalises(k) {
            topw = &topw / (topw.sum_dim_intlist(-1, true, sk) + 1e-20);
        }
        let aux = self.aux_loss(&scores, &topi, b, t);

        // Dispatch (token, slot) pairs sorted by expert.
        let flat = topi.reshape([n * k]);
        let (_, order) = flat.sort_stable(true, 0, false);
        let token = order.divide_scalar_mode(k, "floor");
        let counts: Vec<i64> =
            Vec::<i64>::try_from(flat.bincount::<Tensor>(None, e_n)).expect("expert counts");
        let xs = xf.index_select(0, &token);
        let ws = topw.reshape([n * k]).index_select(0, &order).unsqueeze(-1);
        let mut outs = Vec::with_capacity(self.experts.len());
        let mut start = 0;
        for (expert, &c) in self.experts.iter().zip(&counts) {
            if c > 0 {
                outs.push(expert.forward(&xs.narrow(0, start, c), compute));
            }
            start += c;
        }
        let ys = Tensor::cat(&outs, 0).to_kind(x.kind()) * ws.to_kind(x.kind());
        let mut y = Tensor::zeros([n, d], (x.kind(), x.device())).index_add(0, &token, &ys);
        let mut y3 = y.reshape([b, t, d]);
        for s in &self.shared_experts {
            y3 = y3 + s.forward(x, compute);
        }
        y = y3;
        (y, aux)
    }

    fn aux_loss(&self, scores: &Tensor, topi: &Tensor, b: i64, t: i64) -> Tensor {
        let dev = scores.device();
        let e_n = self.experts.len() as i64;
        let k = self.top_k;
        let sk = scores.kind();
        // Fraction of (token, slot) pairs routed to each expert, over `rows` groups: [rows, E].
        let routed = |rows: i64| {
            let idx = topi.reshape([rows, -1]);
            Tensor::zeros([rows, e_n], (sk, dev)).scatter_add(
                1,
                &idx,
                &Tensor::ones(idx.size(), (sk, dev)),
            )
        };
        match self.routing {
            MoeRouting::MiniMind2 { alpha, .. } | MoeRouting::MiniMind3 { coef: alpha, .. }
                if alpha <= 0.0 =>
            {
                Tensor::zeros([], (sk, dev))
            }
            MoeRouting::MiniMind2 {
                alpha,
                seq_aux: true,
                ..
            } => {
                let ce = routed(b) / ((t * k) as f64 / e_n as f64);
                let mean_scores = scores.reshape([b, t, e_n]).mean_dim(1, false, sk);
                (ce * mean_scores).sum_dim_intlist(1, false, sk).mean(sk) * alpha
            }
            MoeRouting::MiniMind2 { alpha, .. } => {
                let ce = topi
                    .reshape([-1])
                    .one_hot(e_n)
                    .to_kind(sk)
                    .mean_dim(0, false, sk);
                let pi = scores.mean_dim(0, false, sk);
                (pi * ce * e_n as f64).sum(sk) * alpha
            }
            MoeRouting::MiniMind3 { coef, .. } => {
                let load = routed(1).reshape([e_n]) / (b * t) as f64;
                let pi = scores.mean_dim(0, false, sk);
                (load * pi).sum(sk) * (e_n as f64 * coef)
            }
        }
    }
}

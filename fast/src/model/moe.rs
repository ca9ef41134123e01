//! Mixture of experts (MiniMind's MOEFeedForward + MoEGate, training mode).
//!
//! Router: `scores = softmax(x Wg^T)` in fp32 over n_routed experts; top-k; if k > 1 and
//! norm_topk_prob the k weights are divided by their sum + 1e-20. Output: weighted sum of the
//! routed experts' outputs plus every shared expert's output. Aux loss (alpha > 0):
//! - seq_aux: `ce[b,e] = #(t, slot) routed to e / (T*k/E)`; `alpha * mean_b sum_e ce[b,e] *
//!   mean_t score[b,t,e]`;
//! - else: `alpha * sum_e mean(score[:, e]) * E * fraction of (token, slot) pairs routed to e`.
//!
//! Counts carry no gradient (as in MiniMind); pads are routed and counted. Dispatch: the N*k
//! (token, slot) pairs are sorted by expert, each expert runs once on its contiguous slice, and
//! `index_add` scatters the weighted outputs back. The per-expert sizes are read to the host once
//! per layer (one sync per MoE layer).

use tch::{Kind, Tensor};

use super::{linear, Mlp};

pub struct MoeFeedForward {
    /// Router [E, d].
    pub gate: Tensor,
    pub experts: Vec<Mlp>,
    pub shared_experts: Vec<Mlp>,
    pub top_k: i64,
    pub norm_topk_prob: bool,
    pub alpha: f64,
    pub seq_aux: bool,
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
        let scores = linear(&xf, &self.gate, compute).to_kind(sk).softmax(-1, sk); // [N, E]
        let (mut topw, topi) = scores.topk(k, -1, true, true); // [N, k]
        if k > 1 && self.norm_topk_prob {
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
        let xs3 = x;
        let mut y3 = y.reshape([b, t, d]);
        for s in &self.shared_experts {
            y3 = y3 + s.forward(xs3, compute);
        }
        y = y3;
        (y, aux)
    }

    fn aux_loss(&self, scores: &Tensor, topi: &Tensor, b: i64, t: i64) -> Tensor {
        let dev = scores.device();
        if self.alpha <= 0.0 {
            return Tensor::zeros([], (scores.kind(), dev));
        }
        let e_n = self.experts.len() as i64;
        let k = self.top_k;
        let sk = scores.kind();
        let aux = if self.seq_aux {
            let idx = topi.reshape([b, t * k]);
            let ce = Tensor::zeros([b, e_n], (sk, dev)).scatter_add(
                1,
                &idx,
                &Tensor::ones([b, t * k], (sk, dev)),
            ) / ((t * k) as f64 / e_n as f64);
            let mean_scores = scores.reshape([b, t, e_n]).mean_dim(1, false, sk);
            (ce * mean_scores).sum_dim_intlist(1, false, sk).mean(sk) * self.alpha
        } else {
            let ce = topi
                .reshape([-1])
                .one_hot(e_n)
                .to_kind(sk)
                .mean_dim(0, false, sk);
            let pi = scores.mean_dim(0, false, sk);
            (pi * ce * e_n as f64).sum(sk) * self.alpha
        };
        aux
    }
}

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
//! Counts carry no gradient (as in MiniMind); pads are routed and counted. With top-1
//! renormalised the weight is exactly 1 and the combine skips it (`MoeRouting::unit_weights`).
//! No capacity limit: every (token, slot) pair reaches its expert. Dispatch: the N*k (token,
//! slot) pairs are sorted by expert (stable, so each expert sees its tokens in order) into one
//! buffer `[N*k, d]`; the experts run on their contiguous slices; their outputs go back to
//! (token, slot) order by a gather and are weighted and summed per token, in the experts'
//! compute kind. Both directions are gathers with a gather backward (`ops::slot_rows`,
//! `ops::permute_rows`): no atomics, the same numbers on every run. With our kernels (bf16 on
//! CUDA) the gather, weights and sum are one kernel with fp32 products and one rounding
//! ([`fused::moe_combine`]), and in the model the layer's residual add, its norm and the
//! router's fp32 matmul are one kernel too ([`MoeFeedForward::forward_after`]). Two ways to run
//! the experts ([`Kernels::moe_grouped_applies`]):
//! - grouped (`--moe-experts grouped`, bf16 and fp32): the experts' weights stacked `[E, in,
//!   out]` at use time and each projection one `torch._grouped_mm` over the whole buffer, with
//!   the per-expert row ranges given as a device tensor (`offs`, cumulative ends, int32) found
//!   by a binary search in the sorted ids, a fixed `[E]`: static shapes, no host read, so a CUDA
//!   graph captures it.
//!   On the bf16 CUDA path with our kernels gate and up are one grouped matmul against
//!   `[gate_e; up_e]` and our SwiGLU kernel follows, as in the dense MLP; elsewhere three
//!   grouped matmuls and `silu(g) * u`, which on the CPU computes exactly the loop's numbers
//!   (the same per-group matmuls). Both under autograd with `--moe-recompute off`. With
//!   `swiglu` or `gate-up` ([`Kernels::moe_node_applies`]) gate and up are merged on every
//!   device and the experts run as one autograd node (fast/csrc/grouped_experts.h; its SwiGLU
//!   our kernel on the bf16 CUDA path, [`fused::grouped_experts`], libtorch's ops elsewhere,
//!   [`ops::grouped_experts`]) that keeps the layer's input rows in the compute kind rather
//!   than the gathered ones and recomputes the SwiGLU output (with `gate-up` the gate/up
//!   projection too) in backward; the router then keeps the same rows for its weight gradient
//!   ([`ops::linear_saving_rounded`]) instead of the fp32 ones (its forward stays fp32), except
//!   in the model's fused entry ([`MoeFeedForward::forward_after`]), whose backward recomputes
//!   the fp32 norm for it in every `--moe-recompute` mode.
//! - loop (`--moe-experts loop`, and always in fp64, which `_grouped_mm` refuses): each expert
//!   once on its slice, the slice sizes read to the host once per layer.
//!
//! Shared experts run as the dense MLP does (our fused SwiGLU where it applies), on both paths.
//!
//! The parameters stay one tensor per expert under MiniMind's names
//! (`model.layers.{i}.mlp.experts.{j}.gate_proj.weight`): the grouped path stacks them per
//! call. That stack is the copy a bf16 cast makes anyway (on the fused path one weight-cast
//! node writes all experts' bf16 operand and adds their gradients into `.grad` in place), so a
//! persistently stacked layout would save launches, not bytes; `fast kernels --only moe` times
//! the grouped layer with the weights stacked per call against the same layer on pre-stacked
//! weights.

use tch::{Kind, Tensor};

use super::{bf16_operand, expect, linear, to_kind, Mlp, ModelConfig, RmsNorm};
use crate::kernels::{fused, ops, Kernels};

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

    /// Whether the top-k weights are all exactly 1: top-1 renormalised (MiniMind-3's default).
    /// `s / (s + 1e-20)` for the top score s >= 1/E rounds to 1 in fp32 and bf16 (1e-20 is far
    /// below half an ulp of s), and its gradient in exact arithmetic, `1e-20 / s^2`, is below
    /// anything fp32 resolves next to the aux loss's; computed, it would be the round-off of
    /// `1/s - s/s^2`. So the combine adds the experts' outputs unweighted and the router learns
    /// through the aux loss alone, as MiniMind-3 intends.
    fn unit_weights(&self, k: i64) -> bool {
        k == 1 && self.renormalises(k)
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

/// The routed experts' weights stacked for grouped matmuls, in the compute kind: gate and up as
/// one `[E, 2F, d]` (`[gate_e; up_e]` per expert) or as two `[E, F, d]`, down `[E, d, F]`.
pub struct StackedExperts {
    gate_up: GateUp,
    down: Tensor,
}

impl StackedExperts {
    /// Detached copies that require grad (leaves of their own).
    pub fn as_leaves(&self) -> StackedExperts {
        let leaf = |t: &Tensor| t.detach().copy().set_requires_grad(true);
        StackedExperts {
            gate_up: match &self.gate_up {
                GateUp::Merged(gu) => GateUp::Merged(leaf(gu)),
                GateUp::Split(g, u) => GateUp::Split(leaf(g), leaf(u)),
            },
            down: leaf(&self.down),
        }
    }

    pub fn tensors(&self) -> Vec<Tensor> {
        let mut v = match &self.gate_up {
            GateUp::Merged(gu) => vec![gu.shallow_clone()],
            GateUp::Split(g, u) => vec![g.shallow_clone(), u.shallow_clone()],
        };
        v.push(self.down.shallow_clone());
        v
    }
}

enum GateUp {
    Merged(Tensor),
    Split(Tensor, Tensor),
}

/// The N*k (token, slot) pairs sorted by expert.
struct Dispatch {
    /// The sorted pairs' expert ids `[N*k]`.
    expert: Tensor,
    /// The sorted pairs' tokens `[N*k]` (row of `[N, d]`).
    token: Tensor,
    /// Where each sorted pair came from: pair `t*k + s` (slot s of token t) `[N*k]`.
    order: Tensor,
    /// Its inverse: the sorted row of pair `t*k + s` `[N*k]`.
    slot: Tensor,
    /// The routing weights `[N, k]` (router kind), in (token, slot) order; `None` where all are
    /// 1.
    weight: Option<Tensor>,
}

impl MoeFeedForward {
    /// x `[B, T, d]` -> (`[B, T, d]` in x's kind, aux loss scalar fp32). The routed experts run
    /// grouped where [`Kernels::moe_grouped_applies`], else one after another.
    pub fn forward(&self, x: &Tensor, compute: Kind, k: &Kernels) -> (Tensor, Tensor) {
        self.forward_with(x, compute, k, None)
    }

    /// [`Self::forward`], the grouped path on `stacked` weights when given (instead of
    /// stacking the experts' own): what a persistently stacked layout would run.
    pub fn forward_with(
        &self,
        x: &Tensor,
        compute: Kind,
        k: &Kernels,
        stacked: Option<&StackedExperts>,
    ) -> (Tensor, Tensor) {
        let (b, t, d) = x.size3().expect("MoE input must be [B, T, d]");
        let xf = x.reshape([b * t, d]);
        let f = self.width();
        let grouped = k.moe_grouped_applies(x, compute, d, f);
        // The N tokens cast once to the compute kind: the experts' input rows, gathered from
        // it in that kind (half the bytes of gathering fp32 rows; the gather's backward adds a
        // token's k slot gradients in that kind). With the experts as one node the router's
        // weight gradient is taken from these rows too, so the fp32 rows are not kept.
        let node = k.moe_node_applies(x, compute, d, f);
        let xc = grouped.then(|| to_kind(&xf, compute));
        let logits = self.logits(&xf, xc.as_ref().filter(|_| node));
        let (y, aux) = self.routed(&xf, xc.as_ref(), &logits, (b, t), compute, k, stacked);
        let y = (self.shared_experts.iter()).fold(y.reshape([b, t, d]), |y, s| {
            y + s.forward_fused(x, compute, k)
        });
        (y, aux)
    }

    /// The layer after attention: `h = x + a` (the residual stream x, the attention output a,
    /// `[B, T, d]`), the post-attention `norm` of h, and the layer on that norm -> (h, output,
    /// aux loss). Where [`Kernels::moe_norm_router_applies`] the add, the norm, the router's fp32
    /// matmul and the bf16 copies the experts take are one kernel ([`fused::moe_norm_router`]);
    /// otherwise [`Self::forward`] on `norm.forward(x + a)`. Several shared experts share one
    /// bf16 copy (their gradients summed in bf16 by autograd; MiniMind's presets have one or
    /// none).
    pub fn forward_after(
        &self,
        x: &Tensor,
        a: Tensor,
        norm: &RmsNorm,
        compute: Kind,
        k: &Kernels,
    ) -> (Tensor, Tensor, Tensor) {
        if !k.moe_norm_router_applies(x, &a, &norm.weight, &self.gate, compute, self.width()) {
            let h = x + a;
            let (y, aux) = self.forward(&norm.forward(&h, k), compute, k);
            return (h, y, aux);
        }
        let (b, t, d) = x.size3().expect("MoE input must be [B, T, d]");
        let copies = if self.shared_experts.is_empty() { 1 } else { 2 };
        let o = expect(
            "moe_norm_router",
            fused::moe_norm_router(x, &a, &norm.weight, &self.gate, norm.eps, copies),
        );
        let xc = o.y.reshape([b * t, d]);
        let logits = o.logits.reshape([b * t, -1]);
        let (y, aux) = self.routed(&xc, Some(&xc), &logits, (b, t), compute, k, None);
        let y = match &o.y2 {
            Some(y2) => (self.shared_experts.iter()).fold(y.reshape([b, t, d]), |y, s| {
                y + s.forward_fused(y2, compute, k)
            }),
            None => y.reshape([b, t, d]),
        };
        (o.h, y, aux)
    }

    /// The routed experts' weighted sum `[N, d]` for the router's logits `[N, E]` (fp32) over
    /// the rows xf `[N, d]` (x's kind), or their copy xc in the compute kind where the experts
    /// run grouped (`None`: the loop on xf); and the aux loss (N = b t).
    #[allow(clippy::too_many_arguments)]
    fn routed(
        &self,
        xf: &Tensor,
        xc: Option<&Tensor>,
        logits: &Tensor,
        (b, t): (i64, i64),
        compute: Kind,
        k: &Kernels,
        stacked: Option<&StackedExperts>,
    ) -> (Tensor, Tensor) {
        let d = xf.size()[1];
        let f = self.width();
        let (topw, topi, scores) = self.top(logits);
        let aux = self.aux_loss(&scores, &topi, b, t);
        let disp = dispatch(topw, &topi);
        let ys = match xc {
            Some(xc) => {
                let offs = self.offsets(&disp);
                let own;
                let w = match stacked {
                    Some(w) => w,
                    None => {
                        own = self.stacked(compute, xc, k);
                        &own
                    }
                };
                match (&w.gate_up, k.moe_node_applies(xc, compute, d, f)) {
                    (GateUp::Merged(gu), true) => {
                        let run = if k.moe_fused_applies(xc, compute, d, f) {
                            fused::grouped_experts
                        } else {
                            ops::grouped_experts
                        };
                        let r = k.moe_recomputes_gate_up();
                        expect(
                            "grouped_experts",
                            run(xc, &disp.token, &disp.slot, gu, &w.down, &offs, r),
                        )
                    }
                    _ => self.grouped_experts(&disp.rows(xc), &offs, w),
                }
            }
            None => self.looped_experts(xf, &disp, compute),
        };
        // Back in (token, slot) order, weighted and summed per token in the experts' kind (bf16
        // on the fused path, which the next norm's residual add takes as the dense MLP's output;
        // x's kind otherwise): a gather and one reduction, no atomics.
        // With our kernels the gather, the weights and the sum are one pass (fp32 products, one
        // rounding: [`fused::moe_combine`]).
        let yk = ys.kind();
        let rows = || {
            expect(
                "permute_rows",
                ops::permute_rows(&ys, &disp.slot, &disp.order),
            )
        };
        let y = match &disp.weight {
            None if self.top_k == 1 => rows(),
            None => rows()
                .view([b * t, self.top_k, d])
                .sum_dim_intlist(1, false, yk),
            Some(w) if k.moe_combine_applies(&ys, w) => {
                expect("moe_combine", fused::moe_combine(&ys, &disp.slot, w))
            }
            Some(w) => (rows().view([b * t, self.top_k, d]) * w.to_kind(yk).unsqueeze(-1))
                .sum_dim_intlist(1, false, yk),
        };
        (y, aux)
    }

    /// Each expert's FFN width F.
    pub fn width(&self) -> i64 {
        self.experts.first().map_or(0, |e| e.gate_proj.size()[0])
    }

    /// The router's logits `[N, E]` in fp32 on xf `[N, d]`. With `rounded` (xf in bf16, kept
    /// for the experts anyway) the router's weight gradient is taken from it instead of keeping
    /// xf.
    fn logits(&self, xf: &Tensor, rounded: Option<&Tensor>) -> Tensor {
        let sk = super::upcast_kind(xf.kind());
        // The router in fp32 (its matmul is [N, d] x [d, E], a rounding error next to the
        // experts'): in bf16 a top-k choice between near-equal scores flips with round-off.
        match rounded {
            Some(r) if xf.kind() == sk && self.gate.kind() == sk => expect(
                "linear_saving_rounded",
                ops::linear_saving_rounded(xf, r, &self.gate),
            ),
            _ => linear(xf, &self.gate, sk),
        }
    }

    /// The top-k of `softmax(logits)`: weights `[N, k]` (the logits' kind, renormalised as the
    /// variant does; `None` where they are all exactly 1), expert ids `[N, k]` and the scores
    /// `[N, E]`.
    fn top(&self, logits: &Tensor) -> (Option<Tensor>, Tensor, Tensor) {
        let k = self.top_k;
        let sk = logits.kind();
        // [N, E]. The top k of E: the first k of a stable descending sort (ties to the lower
        // expert), one small sorting kernel where topk launches a selection and then a sort.
        let scores = logits.softmax(-1, sk);
        let (sorted, order) = scores.sort_stable(true, -1, true);
        let (topw, topi) = (sorted.narrow(-1, 0, k), order.narrow(-1, 0, k).contiguous()); // [N, k]
        let topw = if self.routing.unit_weights(k) {
            None
        } else if self.routing.renormalises(k) {
            Some(&topw / (topw.sum_dim_intlist(-1, true, sk) + 1e-20))
        } else {
            Some(topw)
        };
        (topw, topi, scores)
    }

    /// Cumulative ends of the experts' row ranges in the sorted buffer, int32 `[E]` on the
    /// device: for each expert e the number of sorted pairs with expert <= e, a binary search in
    /// the sorted ids (a fixed `[E]`, where bincount's shape would depend on the data).
    fn offsets(&self, disp: &Dispatch) -> Tensor {
        let e_n = self.experts.len() as i64;
        let ids = Tensor::arange(e_n, (Kind::Int64, disp.expert.device()));
        ids.searchsorted(&disp.expert, true, true, "right", None::<&Tensor>)
    }

    /// The experts' weights stacked for [`Self::grouped_experts`] on activations like `xs`:
    /// merged gate/up where our SwiGLU kernel applies or the experts run as one node
    /// (`--moe-recompute`). On CUDA in bf16 the fp32 weights become
    /// one bf16 operand through the weight-cast node where it applies; elsewhere cat (+ cast).
    pub fn stacked(&self, compute: Kind, xs: &Tensor, k: &Kernels) -> StackedExperts {
        let (e_n, f) = (self.experts.len() as i64, self.width());
        let d = self.gate.size()[1];
        let operand = |ws: &[&Tensor]| {
            if compute == Kind::BFloat16 && xs.device().is_cuda() {
                bf16_operand(ws, k)
            } else {
                to_kind(&Tensor::cat(ws, 0), compute)
            }
        };
        let of = |w: fn(&Mlp) -> &Tensor| self.experts.iter().map(w).collect::<Vec<_>>();
        let gate_up = if k.swiglu_applies(xs, f, compute) || k.moe_recomputes() {
            let ws: Vec<&Tensor> = self
                .experts
                .iter()
                .flat_map(|e| [&e.gate_proj, &e.up_proj])
                .collect();
            GateUp::Merged(operand(&ws).view([e_n, 2 * f, d]))
        } else {
            GateUp::Split(
                operand(&of(|e| &e.gate_proj)).view([e_n, f, d]),
                operand(&of(|e| &e.up_proj)).view([e_n, f, d]),
            )
        };
        StackedExperts {
            gate_up,
            down: operand(&of(|e| &e.down_proj)).view([e_n, d, f]),
        }
    }

    /// Every routed expert at once on the sorted buffer xs `[N*k, d]` (compute kind), expert e
    /// on rows `offs[e-1] .. offs[e]`: `down(silu(gate(x)) * up(x))` as grouped matmuls against
    /// the stacked weights `w` -> `[N*k, d]` in compute kind.
    fn grouped_experts(&self, xs: &Tensor, offs: &Tensor, w: &StackedExperts) -> Tensor {
        // `_grouped_mm(a [M, K], b [E, K, N])`: the weights' transposed views, no copy.
        let mm = |a: &Tensor, b: &Tensor| {
            a.internal_grouped_mm(&b.transpose(1, 2), Some(offs), None::<&Tensor>, None)
        };
        let h = match &w.gate_up {
            GateUp::Merged(gu) => expect("swiglu", fused::swiglu(&mm(xs, gu), self.width())),
            GateUp::Split(g, u) => mm(xs, g).silu() * mm(xs, u),
        };
        mm(&h, &w.down)
    }

    /// Each expert once on its slice of the sorted pairs (sizes read on the host) -> `[N*k, d]`
    /// in compute kind.
    fn looped_experts(&self, xf: &Tensor, disp: &Dispatch, compute: Kind) -> Tensor {
        let e_n = self.experts.len() as i64;
        let counts: Vec<i64> =
            Vec::<i64>::try_from(disp.expert.bincount::<Tensor>(None, e_n)).expect("expert counts");
        let xs = disp.rows(xf);
        let mut outs = Vec::with_capacity(self.experts.len());
        let mut start = 0;
        for (expert, &c) in self.experts.iter().zip(&counts) {
            if c > 0 {
                outs.push(expert.forward(&xs.narrow(0, start, c), compute));
            }
            start += c;
        }
        Tensor::cat(&outs, 0)
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

/// Sorts the (token, slot) pairs of top-k ids `[N, k]` by expert, stably.
fn dispatch(topw: Option<Tensor>, topi: &Tensor) -> Dispatch {
    let k = topi.size()[1];
    let flat = topi.reshape([-1]);
    let (expert, order) = flat.sort_stable(true, 0, false);
    let slot = order.zeros_like().scatter(
        0,
        &order,
        &Tensor::arange(order.size()[0], (Kind::Int64, order.device())),
    );
    Dispatch {
        expert,
        token: order.divide_scalar_mode(k, "floor"),
        order,
        slot,
        weight: topw,
    }
}

impl Dispatch {
    /// The experts' input rows `x[token]` `[N*k, d]` of x `[N, d]`, sorted by expert; backward
    /// sums each token's slot gradients without atomics ([`ops::slot_rows`]).
    fn rows(&self, x: &Tensor) -> Tensor {
        expect("slot_rows", ops::slot_rows(x, &self.token, &self.slot))
    }
}

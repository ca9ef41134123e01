// A MoE layer's routed experts, SwiGLU FFNs, over the (token, slot) pairs sorted by expert, as one
// autograd function. Included by ops.cpp (SwiGLU as libtorch ops: every build, every device) and
// by fused_ops.cpp (SwiGLU as our CUDA kernels), so both run the same node:
//   xs = x[token]                          [M, d]    (M = N*k rows, expert e on rows
//   gu = xs gate_up[e]^T                   [M, 2F]    offs[e-1] .. offs[e]; offs int32 [E],
//   h  = silu(g) * u                       [M, F]     the cumulative ends)
//   y  = h down[e]^T                       [M, d]
// with x [N, d], gate_up [E, 2F, d] ([gate_e; up_e]), down [E, d, F] of one kind, token int64
// [M] (M = N k: every token has k slots), slot int64 [M] its inverse (pair q = t k + s, slot s
// of token t, is row slot[q] of the sorted buffer), each projection one torch._grouped_mm. The
// values are those of index_select, _grouped_mm and the SwiGLU under autograd, except that dx
// sums a token's k slot gradients in one reduction (sum_slots) where index_select's backward
// adds them one at a time with atomics (the same numbers for k <= 2, in a fixed order for
// every k); what differs is what is kept for backward: x (which the caller keeps anyway),
// token, slot, offs and the weights, plus gu unless recompute_gate_up.
// Backward recomputes xs (a gather), h (the SwiGLU) and, with recompute_gate_up, gu (one grouped
// matmul), instead of holding [M, d] + [M, F] (+ [M, 2F]) per layer until then. Backward, with
// the formulas of _grouped_mm's autograd:
//   dh = dy down[e]  dgu = swiglu'(gu, dh)  ddown[e] = dy_e^T h_e  dgate_up[e] = dgu_e^T xs_e
//   dxs = dgu gate_up[e]  dx = sum_slots(dxs, slot, N) (in x's kind).
//
// Act supplies the SwiGLU: `check(x, op)` (what it needs of the tensors' kind and device),
// `forward(gu, f, op)` -> h, and `backward(gu, dh, f, op)` -> dgu; and `sum_slots(g, slot, n)`,
// the numbers of sum_slots below (our kernel computes them in one pass).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/_grouped_mm.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/sum.h>
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/autograd/custom_function.h>

namespace mm_moe {

// dx [N, d] with dx[t] = sum over s < k of g[slot[t k + s]]: the rows of g [N k, d] (sorted by
// expert) summed per token, a gather and one reduction (fp32 accumulation, one rounding), with
// no atomics: the same numbers on every run. k = 1 is the gather alone.
inline at::Tensor sum_slots(const at::Tensor &g, const at::Tensor &slot, int64_t n) {
  TORCH_CHECK(g.dim() == 2 && slot.dim() == 1 && g.size(0) == slot.size(0) && n > 0 &&
                  slot.size(0) % n == 0,
              "sum_slots: expected g [N k, d] and slot [N k] for N = ", n, "; got g ", g.sizes(),
              ", slot ", slot.sizes());
  const int64_t k = slot.size(0) / n;
  at::Tensor rows = at::index_select(g, 0, slot);
  return k == 1 ? rows : rows.view({n, k, g.size(1)}).sum(1);
}

template <class Act>
struct GroupedExperts : public torch::autograd::Function<GroupedExperts<Act>> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &x,
                            const at::Tensor &token, const at::Tensor &slot,
                            const at::Tensor &gate_up, const at::Tensor &down,
                            const at::Tensor &offs, bool recompute_gate_up) {
    const char *op = "grouped_experts";
    TORCH_CHECK(x.defined() && token.defined() && slot.defined() && gate_up.defined() &&
                    down.defined() && offs.defined(),
                op, ": an input is undefined");
    TORCH_CHECK(x.dim() == 2 && down.dim() == 3 && gate_up.dim() == 3 && token.dim() == 1 &&
                    slot.sizes() == token.sizes() && offs.dim() == 1 && x.size(0) > 0 &&
                    token.size(0) % x.size(0) == 0,
                op, ": expected x [N, d], token and slot [M] (M a multiple of N), gate_up [E, "
                "2F, d], down [E, d, F], offs [E]; got ", x.sizes(), ", ", token.sizes(), ", ",
                slot.sizes(), ", ", gate_up.sizes(), ", ", down.sizes(), ", ", offs.sizes());
    const int64_t e = down.size(0), d = down.size(1), f = down.size(2);
    TORCH_CHECK(x.size(1) == d && gate_up.size(0) == e && gate_up.size(1) == 2 * f &&
                    gate_up.size(2) == d && offs.size(0) == e,
                op, ": shapes disagree: x ", x.sizes(), ", gate_up ", gate_up.sizes(), ", down ",
                down.sizes(), ", offs ", offs.sizes());
    TORCH_CHECK(x.scalar_type() == gate_up.scalar_type() && x.scalar_type() == down.scalar_type(),
                op, ": x, gate_up and down must share a kind, got ", x.scalar_type(), ", ",
                gate_up.scalar_type(), ", ", down.scalar_type());
    TORCH_CHECK(token.scalar_type() == at::kLong && slot.scalar_type() == at::kLong &&
                    offs.scalar_type() == at::kInt,
                op, ": token and slot must be int64 and offs int32, got ", token.scalar_type(),
                ", ", slot.scalar_type(), " and ", offs.scalar_type());
    TORCH_CHECK(token.device() == x.device() && slot.device() == x.device() &&
                    gate_up.device() == x.device() && down.device() == x.device() &&
                    offs.device() == x.device(),
                op, ": every input must be on x's device, ", x.device());
    Act::check(x, op);
    c10::DeviceGuard guard(x.device());
    at::Tensor xs = at::index_select(x, 0, token);
    at::Tensor gu = at::_grouped_mm(xs, gate_up.transpose(1, 2), offs).contiguous();
    at::Tensor h = Act::forward(gu, f, op);
    at::Tensor y = at::_grouped_mm(h, down.transpose(1, 2), offs);
    if (recompute_gate_up) {
      ctx->save_for_backward({x, token, slot, gate_up, down, offs});
    } else {
      ctx->save_for_backward({x, token, slot, gate_up, down, offs, gu});
    }
    ctx->saved_data["f"] = f;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grads) {
    const char *op = "grouped_experts backward";
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &token = saved[1], &slot = saved[2], &gate_up = saved[3],
                     &down = saved[4], &offs = saved[5];
    const int64_t f = ctx->saved_data["f"].toInt();
    TORCH_CHECK(grads[0].defined() && grads[0].scalar_type() == x.scalar_type(), op,
                ": the output's gradient must be ", x.scalar_type());
    c10::DeviceGuard guard(x.device());
    at::Tensor dy = grads[0].contiguous();
    at::Tensor xs = at::index_select(x, 0, token);
    at::Tensor gu = saved.size() > 6
                        ? saved[6]
                        : at::_grouped_mm(xs, gate_up.transpose(1, 2), offs).contiguous();
    at::Tensor h = Act::forward(gu, f, op);
    at::Tensor dh = at::_grouped_mm(dy, down, offs);
    at::Tensor ddown = at::_grouped_mm(dy.t(), h, offs);
    h.reset();
    at::Tensor dgu = Act::backward(gu, dh, f, op);
    dh.reset();
    gu.reset();
    at::Tensor dgate_up = at::_grouped_mm(dgu.t(), xs, offs);
    xs.reset();
    at::Tensor dxs = at::_grouped_mm(dgu, gate_up, offs);
    dgu.reset();
    at::Tensor dx = Act::sum_slots(dxs, slot, x.size(0));
    return {dx, at::Tensor(), at::Tensor(), dgate_up, ddown, at::Tensor(), at::Tensor()};
  }
};

}  // namespace mm_moe

// A MoE layer's routed experts, SwiGLU FFNs, over the (token, slot) pairs sorted by expert, as one
// autograd function. Included by ops.cpp (SwiGLU as libtorch ops: every build, every device) and
// by fused_ops.cpp (SwiGLU as our CUDA kernels), so both run the same node:
//   xs = x[token]                          [M, d]    (M = N*k rows, expert e on rows
//   gu = xs gate_up[e]^T                   [M, 2F]    offs[e-1] .. offs[e]; offs int32 [E],
//   h  = silu(g) * u                       [M, F]     the cumulative ends)
//   y  = h down[e]^T                       [M, d]
// with x [N, d], gate_up [E, 2F, d] ([gate_e; up_e]), down [E, d, F] of one kind, token int64
// [M], each projection one torch._grouped_mm. The values are those of index_select,
// _grouped_mm and the SwiGLU under autograd; what differs is what is kept for backward: x (which
// the caller keeps anyway), token, offs and the weights, plus gu unless recompute_gate_up.
// Backward recomputes xs (a gather), h (the SwiGLU) and, with recompute_gate_up, gu (one grouped
// matmul), instead of holding [M, d] + [M, F] (+ [M, 2F]) per layer until then. Backward, with
// the formulas of _grouped_mm's autograd:
//   dh = dy down[e]  dgu = swiglu'(gu, dh)  ddown[e] = dy_e^T h_e  dgate_up[e] = dgu_e^T xs_e
//   dxs = dgu gate_up[e]  dx = index_add(0, token, dxs) (in x's kind, as index_select's backward).
//
// Act supplies the SwiGLU: `check(x, op)` (what it needs of the tensors' kind and device),
// `forward(gu, f, op)` -> h, and `backward(gu, dh, f, op)` -> dgu.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/_grouped_mm.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/autograd/custom_function.h>

namespace mm_moe {

template <class Act>
struct GroupedExperts : public torch::autograd::Function<GroupedExperts<Act>> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &x,
                            const at::Tensor &token, const at::Tensor &gate_up,
                            const at::Tensor &down, const at::Tensor &offs,
                            bool recompute_gate_up) {
    const char *op = "grouped_experts";
    TORCH_CHECK(x.defined() && token.defined() && gate_up.defined() && down.defined() &&
                    offs.defined(),
                op, ": an input is undefined");
    TORCH_CHECK(x.dim() == 2 && down.dim() == 3 && gate_up.dim() == 3 && token.dim() == 1 &&
                    offs.dim() == 1,
                op, ": expected x [N, d], token [M], gate_up [E, 2F, d], down [E, d, F], offs "
                "[E]; got ", x.sizes(), ", ", token.sizes(), ", ", gate_up.sizes(), ", ",
                down.sizes(), ", ", offs.sizes());
    const int64_t e = down.size(0), d = down.size(1), f = down.size(2);
    TORCH_CHECK(x.size(1) == d && gate_up.size(0) == e && gate_up.size(1) == 2 * f &&
                    gate_up.size(2) == d && offs.size(0) == e,
                op, ": shapes disagree: x ", x.sizes(), ", gate_up ", gate_up.sizes(), ", down ",
                down.sizes(), ", offs ", offs.sizes());
    TORCH_CHECK(x.scalar_type() == gate_up.scalar_type() && x.scalar_type() == down.scalar_type(),
                op, ": x, gate_up and down must share a kind, got ", x.scalar_type(), ", ",
                gate_up.scalar_type(), ", ", down.scalar_type());
    TORCH_CHECK(token.scalar_type() == at::kLong && offs.scalar_type() == at::kInt, op,
                ": token must be int64 and offs int32, got ", token.scalar_type(), " and ",
                offs.scalar_type());
    TORCH_CHECK(token.device() == x.device() && gate_up.device() == x.device() &&
                    down.device() == x.device() && offs.device() == x.device(),
                op, ": every input must be on x's device, ", x.device());
    Act::check(x, op);
    c10::DeviceGuard guard(x.device());
    at::Tensor xs = at::index_select(x, 0, token);
    at::Tensor gu = at::_grouped_mm(xs, gate_up.transpose(1, 2), offs).contiguous();
    at::Tensor h = Act::forward(gu, f, op);
    at::Tensor y = at::_grouped_mm(h, down.transpose(1, 2), offs);
    if (recompute_gate_up) {
      ctx->save_for_backward({x, token, gate_up, down, offs});
    } else {
      ctx->save_for_backward({x, token, gate_up, down, offs, gu});
    }
    ctx->saved_data["f"] = f;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grads) {
    const char *op = "grouped_experts backward";
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &token = saved[1], &gate_up = saved[2], &down = saved[3],
                     &offs = saved[4];
    const int64_t f = ctx->saved_data["f"].toInt();
    TORCH_CHECK(grads[0].defined() && grads[0].scalar_type() == x.scalar_type(), op,
                ": the output's gradient must be ", x.scalar_type());
    c10::DeviceGuard guard(x.device());
    at::Tensor dy = grads[0].contiguous();
    at::Tensor xs = at::index_select(x, 0, token);
    at::Tensor gu = saved.size() > 5
                        ? saved[5]
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
    at::Tensor dx = at::zeros_like(x).index_add_(0, token, dxs);
    return {dx, at::Tensor(), dgate_up, ddown, at::Tensor(), at::Tensor()};
  }
};

}  // namespace mm_moe

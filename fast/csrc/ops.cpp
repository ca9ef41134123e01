// libtorch's multi-tensor ("foreach") and fused optimizer ops, and the autograd nodes of MoE
// (LinearSavingRounded; SlotRows and PermuteRows, the dispatch and the combine without atomics;
// GroupedExperts with SwiGLU as libtorch ops), which tch's generated API does not expose. Each
// entry point takes arrays of `at::Tensor*` (tch's C_tensor), never throws into Rust, and returns
// nullptr on success or a malloc'd error message the caller frees with mm_free_error.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_amp_foreach_non_finite_check_and_unscale.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_sub.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <ATen/ops/stack.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <cstdlib>
#include <memory>
#include <vector>

#include "ffi_error.h"
#include "grouped_experts.h"

namespace {
std::vector<at::Tensor> list(at::Tensor **ts, int64_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int64_t i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}

// y = x w^T (at::linear, in x's kind) where backward keeps not x but `rounded`, x's values in a
// narrower kind that the caller keeps anyway: dx = dy w exactly, dw = dy^T rounded (upcast to
// w's kind), the weight gradient from rounded inputs as every projection's is under mixed
// precision. x [N, d], rounded [N, d], w [E, d]; `rounded` gets no gradient from this node.
// MoE's fp32 router uses it with the bf16 rows its experts read: the fp32 [N, d] copy is not held
// until backward.
struct LinearSavingRounded : public torch::autograd::Function<LinearSavingRounded> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &x,
                            const at::Tensor &rounded, const at::Tensor &w) {
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) &&
                    rounded.sizes() == x.sizes(),
                "linear_saving_rounded: expected x [N, d], rounded [N, d], w [E, d]; got x ",
                x.sizes(), ", rounded ", rounded.sizes(), ", w ", w.sizes());
    TORCH_CHECK(x.scalar_type() == w.scalar_type() && x.device() == w.device() &&
                    rounded.device() == x.device(),
                "linear_saving_rounded: x and w must share a kind and a device (x ",
                x.scalar_type(), " on ", x.device(), ", w ", w.scalar_type(), " on ", w.device(),
                ", rounded on ", rounded.device(), ")");
    ctx->save_for_backward({rounded, w});
    return at::linear(x, w);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &rounded = saved[0], &w = saved[1];
    const at::Tensor &dy = grads[0];
    at::Tensor dx = at::mm(dy, w);
    at::Tensor dw = at::mm(dy.t(), rounded.to(w.scalar_type()));
    return {dx, at::Tensor(), dw};
  }
};

// GroupedExperts' SwiGLU (grouped_experts.h) as libtorch's ops, any kind and device: h =
// silu(g) * u, and backward with the functions autograd uses for it (silu_backward of dh * u,
// dh * silu(g)), so the node's values are those of the same ops under autograd.
struct OpsSwiGlu {
  static void check(const at::Tensor &, const char *) {}
  static at::Tensor forward(const at::Tensor &gu, int64_t f, const char *) {
    return at::silu(gu.narrow(-1, 0, f)).mul(gu.narrow(-1, f, f));
  }
  static at::Tensor backward(const at::Tensor &gu, const at::Tensor &dh, int64_t f,
                             const char *) {
    const at::Tensor g = gu.narrow(-1, 0, f), u = gu.narrow(-1, f, f);
    return at::cat(std::vector<at::Tensor>{at::silu_backward(dh.mul(u), g), dh.mul(at::silu(g))},
                   -1);
  }
  static at::Tensor sum_slots(const at::Tensor &g, const at::Tensor &slot, int64_t n) {
    return mm_moe::sum_slots(g, slot, n);
  }
};

// The row indices a and b of node `op` (`names` in the message) must be int64 on x's device.
void check_indices(const char *op, const char *names, const at::Tensor &x, const at::Tensor &a,
                   const at::Tensor &b) {
  TORCH_CHECK(a.scalar_type() == at::kLong && b.scalar_type() == at::kLong &&
                  a.device() == x.device() && b.device() == x.device(),
              op, ": ", names, " must be int64 on x's device (", x.device(), "), got ",
              a.scalar_type(), " on ", a.device(), " and ", b.scalar_type(), " on ", b.device());
}

// MoE's dispatch: x [N, d] -> x[token] [N k, d] (the (token, slot) pairs sorted by expert),
// backward dx = sum_slots(dy, slot, N) (grouped_experts.h): a gather and one reduction per token
// instead of index_select's backward, which adds the k slot gradients with atomics.
struct SlotRows : public torch::autograd::Function<SlotRows> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &x,
                            const at::Tensor &token, const at::Tensor &slot) {
    TORCH_CHECK(x.dim() == 2 && token.dim() == 1 && slot.sizes() == token.sizes() &&
                    x.size(0) > 0 && token.size(0) % x.size(0) == 0,
                "slot_rows: expected x [N, d], token and slot [N k]; got x ", x.sizes(),
                ", token ", token.sizes(), ", slot ", slot.sizes());
    check_indices("slot_rows", "token and slot", x, token, slot);
    c10::DeviceGuard guard(x.device());
    ctx->save_for_backward({slot});
    ctx->saved_data["n"] = x.size(0);
    return at::index_select(x, 0, token);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    c10::DeviceGuard guard(saved[0].device());
    return {mm_moe::sum_slots(grads[0].contiguous(), saved[0], ctx->saved_data["n"].toInt()),
            at::Tensor(), at::Tensor()};
  }
};

// Rows of x [M, d] in another order: y = x[idx], idx a permutation of 0 .. M-1 and inv its
// inverse; backward dx = dy[inv] (a gather, where index_select's backward would add with
// atomics). MoE's combine: the experts' rows, sorted by expert, back in (token, slot) order.
struct PermuteRows : public torch::autograd::Function<PermuteRows> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &x,
                            const at::Tensor &idx, const at::Tensor &inv) {
    TORCH_CHECK(x.dim() == 2 && idx.dim() == 1 && inv.sizes() == idx.sizes() &&
                    idx.size(0) == x.size(0),
                "permute_rows: expected x [M, d], idx and inv [M]; got x ", x.sizes(), ", idx ",
                idx.sizes(), ", inv ", inv.sizes());
    check_indices("permute_rows", "idx and inv", x, idx, inv);
    c10::DeviceGuard guard(x.device());
    ctx->save_for_backward({inv});
    return at::index_select(x, 0, idx);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    c10::DeviceGuard guard(saved[0].device());
    return {at::index_select(grads[0], 0, saved[0]), at::Tensor(), at::Tensor()};
  }
};
}  // namespace

using mm_ffi::guard;

extern "C" {
void mm_free_error(char *e) { std::free(e); }

// torch.optim.AdamW(fused=True) for one step: params, grads, exp_avg, exp_avg_sq and step
// counters (float32 scalars, incremented in place) are parallel arrays of n tensors. `lr` is a
// one-element float tensor on the params' device, so a captured graph can replay with new rates.
// grad_scale / found_inf may be null (fp16 scaler: grads are unscaled and the step skipped inside).
char *mm_fused_adamw(at::Tensor **params, at::Tensor **grads, at::Tensor **exp_avgs,
                     at::Tensor **exp_avg_sqs, at::Tensor **steps, int64_t n, at::Tensor *lr,
                     double beta1, double beta2, double weight_decay, double eps,
                     at::Tensor *grad_scale, at::Tensor *found_inf) {
  return guard([&] {
    std::optional<at::Tensor> gs, fi;
    if (grad_scale) gs = *grad_scale;
    if (found_inf) fi = *found_inf;
    auto st = list(steps, n);
    // As torch/optim/adamw.py does: the kernel reads the already-incremented step, and a step
    // skipped for non-finite grads (fp16) does not count.
    at::_foreach_add_(st, 1);
    at::_fused_adamw_(list(params, n), list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n), {},
                      st, *lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false,
                      /*maximize=*/false, gs, fi);
    if (fi) at::_foreach_sub_(st, std::vector<at::Tensor>(n, fi->reshape({})));
  });
}

// clip_grad_norm_: total = ||all grads||_2 jointly; grads *= min(1, max_norm / (total + 1e-6)).
// Writes the total (before clipping) into *total_out. No host synchronisation.
char *mm_clip_grad_norm(at::Tensor **grads, int64_t n, double max_norm, at::Tensor **total_out) {
  return guard([&] {
    auto gs = list(grads, n);
    auto norms = at::_foreach_norm(gs, 2);
    auto total = at::linalg_vector_norm(at::stack(norms), 2);
    auto coef = total.add(1e-6).reciprocal().mul(max_norm).clamp_max(1.0);
    at::_foreach_mul_(gs, coef);
    *total_out = new at::Tensor(total);
  });
}

// Muon's weight update: params[i] *= factor; params[i] -= updates[i] (factor a one-element
// tensor on the params' device). Two multi-tensor launches for any number of matrices.
char *mm_foreach_scale_sub(at::Tensor **params, at::Tensor **updates, int64_t n, at::Tensor *factor) {
  return guard([&] {
    auto ps = list(params, n);
    at::_foreach_mul_(ps, factor->reshape({}));
    at::_foreach_sub_(ps, list(updates, n), 1);
  });
}

// GradScaler.unscale_: grads *= inv_scale; found_inf = 1 if any grad is non-finite.
char *mm_unscale(at::Tensor **grads, int64_t n, at::Tensor *found_inf, at::Tensor *inv_scale) {
  return guard([&] {
    auto gs = list(grads, n);
    at::_amp_foreach_non_finite_check_and_unscale_(gs, *found_inf, *inv_scale);
  });
}

// torch.autograd.backward(tensors, grad_tensors): backpropagates each tensor with its given
// gradient in one pass (tch's backward takes no gradient argument).
char *mm_backward(at::Tensor **tensors, at::Tensor **grads, int64_t n) {
  return guard([&] { torch::autograd::backward(list(tensors, n), list(grads, n)); });
}

// p.grad = g (Python's `p.grad = g`): makes a parameter's gradient a given tensor, e.g. a view
// into one flat buffer. Autograd then accumulates into it in place.
char *mm_set_grad(at::Tensor *p, at::Tensor *g) {
  return guard([&] {
    TORCH_CHECK(p->sizes() == g->sizes() && p->dtype() == g->dtype() && p->device() == g->device(),
                "set_grad: the gradient must match the parameter's shape, dtype and device");
    p->mutable_grad() = *g;
  });
}

// A device tensor read on the host without waiting for the work queued after it: `src` is copied
// into the pinned CPU tensor `dst` on the current stream without blocking, and an event recorded
// behind the copy goes to *event_out (nullptr for a CPU `src`: the copy is done on return).
// mm_host_read_wait blocks until that event, i.e. until the copy has landed, then frees it.
char *mm_host_read_start(at::Tensor *src, at::Tensor *dst, void **event_out) {
  *event_out = nullptr;
  return guard([&] {
    TORCH_CHECK(dst->device().is_cpu(), "host read: the destination must be a CPU tensor");
    const auto device = src->device();
    if (device.is_cpu()) {
      dst->copy_(*src);
      return;
    }
    TORCH_CHECK(dst->is_pinned(), "host read: the destination must be pinned");
    dst->copy_(*src, /*non_blocking=*/true);
    c10::impl::VirtualGuardImpl impl(device.type());
    auto ev = std::make_unique<c10::Event>(device.type());
    ev->record(impl.getStream(device));
    *event_out = ev.release();
  });
}

char *mm_host_read_wait(void *event) {
  return guard([&] {
    std::unique_ptr<c10::Event> ev(static_cast<c10::Event *>(event));
    if (ev) ev->synchronize();
  });
}

void mm_host_read_free(void *event) { delete static_cast<c10::Event *>(event); }

// Tensor.pin_memory() with the current accelerator (tch's binding passes a device argument,
// which libtorch 2.11 warns is deprecated).
char *mm_pin_memory(at::Tensor *t, at::Tensor **out) {
  return guard([&] { *out = new at::Tensor(t->pin_memory()); });
}

// y = LinearSavingRounded(x, rounded, w): see above.
char *mm_linear_saving_rounded(at::Tensor *x, at::Tensor *rounded, at::Tensor *w,
                               at::Tensor **out) {
  return guard([&] { *out = new at::Tensor(LinearSavingRounded::apply(*x, *rounded, *w)); });
}

// xs = SlotRows(x, token, slot): see above.
char *mm_slot_rows(at::Tensor *x, at::Tensor *token, at::Tensor *slot, at::Tensor **out) {
  return guard([&] { *out = new at::Tensor(SlotRows::apply(*x, *token, *slot)); });
}

// y = PermuteRows(x, idx, inv): see above.
char *mm_permute_rows(at::Tensor *x, at::Tensor *idx, at::Tensor *inv, at::Tensor **out) {
  return guard([&] { *out = new at::Tensor(PermuteRows::apply(*x, *idx, *inv)); });
}

// y = GroupedExperts(x, token, slot, gate_up, down, offs) with SwiGLU as libtorch's ops:
// grouped_experts.h.
char *mm_grouped_experts_ops(at::Tensor *x, at::Tensor *token, at::Tensor *slot,
                             at::Tensor *gate_up, at::Tensor *down, at::Tensor *offs,
                             int64_t recompute_gate_up, at::Tensor **out) {
  return guard([&] {
    *out = new at::Tensor(mm_moe::GroupedExperts<OpsSwiGlu>::apply(
        *x, *token, *slot, *gate_up, *down, *offs, recompute_gate_up != 0));
  });
}
}

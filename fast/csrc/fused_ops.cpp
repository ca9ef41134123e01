// The fused CUDA kernels of kernels.cu as autograd functions (torch::autograd::Function), so the
// model's tensors flow through them under libtorch's autograd like any aten op: forward saves
// what backward needs, backward launches the backward kernels. The fused cross-entropy of
// cross_entropy.cu is a plain function instead (forward and backward in one kernel, outside
// autograd: the training step calls it under no_grad and does the lm_head's matmuls itself). Exposed to Rust through C entry
// points in ops.cpp's style: never throw into Rust, return nullptr or a malloc'd message (freed
// with mm_free_error from ops.cpp).
//
// Kernels run on libtorch's current stream of the input's device, so CUDA graph capture and the
// autograd engine's stream handling see them as ordinary kernels.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "ffi_error.h"
#include "grouped_experts.h"
#include "kernels.h"

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

cudaStream_t stream_of(const at::Tensor &t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

void launched(const char *err, const char *what) {
  TORCH_CHECK(err == nullptr, what, ": kernel launch failed: ", err ? err : "");
}

bool aligned16(const at::Tensor &t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Contiguous and 16-byte aligned (the kernels load 8 or 16 bytes at a time).
at::Tensor dense(const at::Tensor &t) {
  at::Tensor c = t.contiguous();
  return aligned16(c) ? c : c.clone();
}

void check_cuda(const at::Tensor &t, at::ScalarType kind, const char *op, const char *name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == kind, op, ": ", name, " must be ", kind, ", got ",
              t.scalar_type());
}

// The norms' shape rule: w is [d], x's last dimension is d, and the kernels take d. Returns d.
int64_t norm_width(const at::Tensor &x, const at::Tensor &w, const char *op) {
  TORCH_CHECK(w.dim() == 1 && x.dim() >= 1 && x.size(-1) == w.size(0), op,
              ": x's last dimension must equal w's length; x ", x.sizes(), ", w ", w.sizes());
  const int64_t d = w.size(0);
  TORCH_CHECK(d > 0 && d % 8 == 0 && d <= mm::kRmsMaxDim, op,
              ": the width must be a positive multiple of 8 up to ", mm::kRmsMaxDim, ", got ", d);
  return d;
}

// y = bf16(w * (x * rsqrt(mean(x^2) + eps))) over the last dimension; x, w fp32.
struct RmsNormBf16 : public torch::autograd::Function<RmsNormBf16> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &w,
                            double eps) {
    const char *op = "rms_norm_bf16";
    check_cuda(x, at::kFloat, op, "x");
    check_cuda(w, at::kFloat, op, "w");
    TORCH_CHECK(x.device() == w.device(), op, ": x on ", x.device(), ", w on ", w.device());
    const int64_t d = norm_width(x, w, op);
    c10::DeviceGuard guard(x.device());
    at::Tensor xc = dense(x), wc = dense(w);
    const int64_t n = xc.numel() / d;
    at::Tensor y = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
    at::Tensor rstd = at::empty({n}, x.options());
    launched(mm::rms_norm_fwd(xc.data_ptr<float>(), nullptr, wc.data_ptr<float>(), y.data_ptr(),
                              nullptr, rstd.data_ptr<float>(), n, d, static_cast<float>(eps),
                              stream_of(x)),
             op);
    ctx->save_for_backward({xc, wc, rstd});
    return y;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const char *op = "rms_norm_bf16 backward";
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &rstd = saved[2];
    check_cuda(grads[0], at::kBFloat16, op, "grad_y");
    c10::DeviceGuard guard(x.device());
    at::Tensor gy = dense(grads[0]);
    const int64_t d = w.size(0), n = x.numel() / d;
    const int64_t parts = mm::rms_norm_bwd_parts(n);
    at::Tensor dx = at::empty(x.sizes(), x.options());
    at::Tensor dw_part = at::empty({parts, d}, x.options());
    at::Tensor dw = at::empty({d}, w.options());
    launched(mm::rms_norm_bwd(x.data_ptr<float>(), w.data_ptr<float>(), rstd.data_ptr<float>(),
                              gy.data_ptr(), nullptr, dx.data_ptr<float>(), nullptr,
                              dw_part.data_ptr<float>(), dw.data_ptr<float>(), n, d, parts,
                              stream_of(x)),
             op);
    return {dx, dw, at::Tensor()};
  }
};

// The residual add before a norm, fused into it: h = x + a (x fp32, a bf16: fp32 sum, as type
// promotion computes it), y = bf16(w * (h * rsqrt(mean(h^2) + eps))). Returns (h, y). Backward:
// dh_total = dh + norm backward of dy (h's two uses: the residual stream and the norm),
// dx = dh_total (fp32), da = bf16(dh_total), dw as RmsNormBf16's.
struct AddRmsNormBf16 : public torch::autograd::Function<AddRmsNormBf16> {
  static variable_list forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &a,
                               const at::Tensor &w, double eps) {
    const char *op = "add_rms_norm_bf16";
    check_cuda(x, at::kFloat, op, "x");
    check_cuda(a, at::kBFloat16, op, "a");
    check_cuda(w, at::kFloat, op, "w");
    TORCH_CHECK(x.sizes() == a.sizes(), op, ": x ", x.sizes(), " and a ", a.sizes(),
                " must have one shape");
    TORCH_CHECK(x.device() == w.device() && a.device() == x.device(), op,
                ": x, a and w must be on one device");
    const int64_t d = norm_width(x, w, op);
    c10::DeviceGuard guard(x.device());
    at::Tensor xc = dense(x), ac = dense(a), wc = dense(w);
    const int64_t n = xc.numel() / d;
    at::Tensor h = at::empty(x.sizes(), x.options());
    at::Tensor y = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
    at::Tensor rstd = at::empty({n}, x.options());
    launched(mm::rms_norm_fwd(xc.data_ptr<float>(), ac.data_ptr(), wc.data_ptr<float>(),
                              y.data_ptr(), h.data_ptr<float>(), rstd.data_ptr<float>(), n, d,
                              static_cast<float>(eps), stream_of(x)),
             op);
    ctx->save_for_backward({h, wc, rstd});
    return {h, y};
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const char *op = "add_rms_norm_bf16 backward";
    auto saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &w = saved[1], &rstd = saved[2];
    c10::DeviceGuard guard(h.device());
    const int64_t d = w.size(0), n = h.numel() / d;
    // h feeds nothing after the final norm: autograd materialises its gradient as zeros (an
    // undefined one is taken as none).
    at::Tensor gres;
    if (grads[0].defined()) {
      check_cuda(grads[0], at::kFloat, op, "grad_h");
      gres = dense(grads[0]);
    }
    at::Tensor gy;
    if (grads[1].defined()) {
      check_cuda(grads[1], at::kBFloat16, op, "grad_y");
      gy = dense(grads[1]);
    } else {
      gy = at::zeros(h.sizes(), h.options().dtype(at::kBFloat16));
    }
    const int64_t parts = mm::rms_norm_bwd_parts(n);
    at::Tensor dx = at::empty(h.sizes(), h.options());
    at::Tensor da = at::empty(h.sizes(), h.options().dtype(at::kBFloat16));
    at::Tensor dw_part = at::empty({parts, d}, h.options());
    at::Tensor dw = at::empty({d}, w.options());
    launched(mm::rms_norm_bwd(h.data_ptr<float>(), w.data_ptr<float>(), rstd.data_ptr<float>(),
                              gy.data_ptr(), gres.defined() ? gres.data_ptr<float>() : nullptr,
                              dx.data_ptr<float>(), da.data_ptr(), dw_part.data_ptr<float>(),
                              dw.data_ptr<float>(), n, d, parts, stream_of(h)),
             op);
    return {dx, da, dw, at::Tensor()};
  }
};

// A MoE layer's entry in one pass: the residual add, the post-attention norm and the router's
// logits. h = x + a (fp32); n = w * (h * rsqrt(mean(h^2) + eps)) in fp32; y = bf16(n) for the
// routed experts; y2 = the same values again for the shared experts when copies is 2 (so that
// the two consumers' gradients meet in fp32 in the backward kernel, as two casts' gradients
// would; an empty, non-differentiable tensor when copies is 1); logits = n wg^T (fp32 [N, E]),
// the router's fp32 matmul. Returns (h, y, y2, logits). Backward: the norm's gradient is
// dy + dy2 + dlogits wg (fp32), then as AddRmsNormBf16's (dx fp32, da bf16, dw), and dwg =
// dlogits^T n with n recomputed from h and rstd (the forward's values).
struct MoeNormRouter : public torch::autograd::Function<MoeNormRouter> {
  static variable_list forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &a,
                               const at::Tensor &w, const at::Tensor &wg, double eps,
                               int64_t copies) {
    const char *op = "moe_norm_router";
    check_cuda(x, at::kFloat, op, "x");
    check_cuda(a, at::kBFloat16, op, "a");
    check_cuda(w, at::kFloat, op, "w");
    check_cuda(wg, at::kFloat, op, "wg");
    TORCH_CHECK(x.sizes() == a.sizes(), op, ": x ", x.sizes(), " and a ", a.sizes(),
                " must have one shape");
    TORCH_CHECK(x.device() == w.device() && a.device() == x.device() && wg.device() == x.device(),
                op, ": x, a, w and wg must be on one device");
    const int64_t d = norm_width(x, w, op);
    TORCH_CHECK(wg.dim() == 2 && wg.size(1) == d && wg.size(0) >= 1 &&
                    wg.size(0) <= mm::kRouterMaxExperts,
                op, ": the router's weight must be [E, ", d, "] with 1 <= E <= ",
                mm::kRouterMaxExperts, ", got ", wg.sizes());
    TORCH_CHECK(copies == 1 || copies == 2, op, ": copies must be 1 or 2, got ", copies);
    c10::DeviceGuard guard(x.device());
    at::Tensor xc = dense(x), ac = dense(a), wc = dense(w), gc = dense(wg);
    const int64_t n = xc.numel() / d, e_n = gc.size(0);
    at::Tensor h = at::empty(x.sizes(), x.options());
    at::Tensor y = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
    at::Tensor y2 = copies == 2 ? at::empty(x.sizes(), x.options().dtype(at::kBFloat16))
                                : at::empty({0}, x.options().dtype(at::kBFloat16));
    std::vector<int64_t> lsize(x.sizes().begin(), x.sizes().end() - 1);
    lsize.push_back(e_n);
    at::Tensor logits = at::empty(lsize, x.options());
    at::Tensor rstd = at::empty({n}, x.options());
    launched(mm::rms_norm_router_fwd(xc.data_ptr<float>(), ac.data_ptr(), wc.data_ptr<float>(),
                                     y.data_ptr(), copies == 2 ? y2.data_ptr() : nullptr,
                                     h.data_ptr<float>(), rstd.data_ptr<float>(),
                                     gc.data_ptr<float>(), logits.data_ptr<float>(), e_n, n, d,
                                     static_cast<float>(eps), stream_of(x)),
             op);
    if (copies == 1) ctx->mark_non_differentiable({y2});
    ctx->save_for_backward({h, wc, gc, rstd});
    return {h, y, y2, logits};
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const char *op = "moe_norm_router backward";
    auto saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &w = saved[1], &wg = saved[2], &rstd = saved[3];
    c10::DeviceGuard guard(h.device());
    const int64_t d = w.size(0), n = h.numel() / d, e_n = wg.size(0);
    // Autograd materialises an unused output's gradient as zeros (the empty y2 of copies 1 as
    // an empty one); an undefined or empty gradient is passed as null, which the kernels read
    // as zero.
    auto take = [&](int i, at::ScalarType kind, const char *name) {
      if (!grads[i].defined() || grads[i].numel() == 0) return at::Tensor();
      check_cuda(grads[i], kind, op, name);
      TORCH_CHECK(grads[i].numel() == (i == 3 ? n * e_n : n * d), op, ": ", name, " has ",
                  grads[i].numel(), " elements");
      return dense(grads[i]);
    };
    at::Tensor gres = take(0, at::kFloat, "grad_h"), gy = take(1, at::kBFloat16, "grad_y"),
               gy2 = take(2, at::kBFloat16, "grad_y2"), gl = take(3, at::kFloat, "grad_logits");
    const int64_t parts = mm::rms_norm_bwd_parts(n);
    at::Tensor dx = at::empty(h.sizes(), h.options());
    at::Tensor da = at::empty(h.sizes(), h.options().dtype(at::kBFloat16));
    at::Tensor dw_part = at::empty({parts, d}, h.options());
    at::Tensor dw = at::empty({d}, w.options());
    at::Tensor dwg_part = at::empty({mm::router_dw_parts(n), e_n, d}, h.options());
    at::Tensor dwg = at::empty({e_n, d}, wg.options());
    auto ptr_or_null = [](const at::Tensor &t) { return t.defined() ? t.data_ptr() : nullptr; };
    launched(mm::rms_norm_router_bwd(
                 h.data_ptr<float>(), w.data_ptr<float>(), rstd.data_ptr<float>(),
                 ptr_or_null(gy), ptr_or_null(gy2),
                 gl.defined() ? gl.data_ptr<float>() : nullptr, wg.data_ptr<float>(), e_n,
                 gres.defined() ? gres.data_ptr<float>() : nullptr, dx.data_ptr<float>(),
                 da.data_ptr(), dw_part.data_ptr<float>(), dw.data_ptr<float>(),
                 dwg_part.data_ptr<float>(), dwg.data_ptr<float>(), n, d, parts, stream_of(h)),
             op);
    return {dx, da, dw, dwg, at::Tensor(), at::Tensor()};
  }
};

// The checks shared by the ops over a merged projection qkv [B, T, (heads + 2 kv_heads) hd] (bf16)
// with RoPE tables cos/sin [T, hd] (fp32), all on one CUDA device. Returns hd.
int64_t merged_qkv_head_dim(const at::Tensor &qkv, const at::Tensor &cos, const at::Tensor &sin,
                            int64_t heads, int64_t kv_heads, const char *op) {
  check_cuda(qkv, at::kBFloat16, op, "qkv");
  check_cuda(cos, at::kFloat, op, "cos");
  check_cuda(sin, at::kFloat, op, "sin");
  TORCH_CHECK(qkv.dim() == 3, op, ": qkv must be [B, T, (heads + 2 kv_heads) head_dim], got ",
              qkv.sizes());
  TORCH_CHECK(heads >= 1 && kv_heads >= 1 && heads % kv_heads == 0, op, ": ", heads,
              " heads are not a multiple of ", kv_heads, " kv heads");
  const int64_t t = qkv.size(1);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == t && sin.sizes() == cos.sizes(), op,
              ": cos/sin must be [T, head_dim] with T = ", t, ", got ", cos.sizes(), " and ",
              sin.sizes());
  const int64_t hd = cos.size(1), ld = (heads + 2 * kv_heads) * hd;
  TORCH_CHECK(qkv.size(2) == ld, op, ": qkv's last dimension must be (", heads, " + 2 x ",
              kv_heads, ") x ", hd, " = ", ld, ", got ", qkv.size(2));
  TORCH_CHECK(cos.device() == qkv.device() && sin.device() == qkv.device(), op,
              ": qkv, cos and sin must be on one device");
  return hd;
}

// The merged projection qkv [B, T, (H + 2 KV) hd] bf16 -> q, k, v [B, T, H, hd] bf16 contiguous:
// RoPE + repeat_kv + head layout of its three column blocks (q: RoPE; k: RoPE + repeat_kv; v:
// repeat_kv) as one autograd node, whose backward writes the three gradients straight into one
// [B, T, (H+2KV) hd] tensor (three nodes on split views would meet in a cat: one more pass).
struct QkvHeads : public torch::autograd::Function<QkvHeads> {
  static variable_list forward(AutogradContext *ctx, const at::Tensor &qkv, const at::Tensor &cos,
                               const at::Tensor &sin, int64_t heads, int64_t kv_heads) {
    const char *op = "qkv_heads";
    const int64_t hd = merged_qkv_head_dim(qkv, cos, sin, heads, kv_heads, op);
    TORCH_CHECK(hd % 16 == 0, op, ": head_dim must be a multiple of 16, got ", hd);
    const int64_t b = qkv.size(0), t = qkv.size(1);
    const int64_t ld = (heads + 2 * kv_heads) * hd, n_rep = heads / kv_heads;
    c10::DeviceGuard guard(qkv.device());
    at::Tensor x = dense(qkv), c = dense(cos), s = dense(sin);
    const auto *base = static_cast<const char *>(x.data_ptr());
    const int64_t esz = 2;  // bf16
    variable_list out;
    const int64_t nhs[3] = {heads, kv_heads, kv_heads}, reps[3] = {1, n_rep, n_rep};
    int64_t col = 0;
    for (int i = 0; i < 3; ++i) {
      at::Tensor y = at::empty({b, t, heads, hd}, x.options());
      launched(mm::rope_fwd(base + col * esz, t * ld, ld, hd, c.data_ptr<float>(),
                            s.data_ptr<float>(), y.data_ptr(), b, t, nhs[i], hd, reps[i], i < 2,
                            stream_of(x)),
               op);
      out.push_back(y);
      col += nhs[i] * hd;
    }
    ctx->save_for_backward({c, s});
    ctx->saved_data["b"] = b;
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["kv_heads"] = kv_heads;
    return out;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const char *op = "qkv_heads backward";
    auto saved = ctx->get_saved_variables();
    const at::Tensor &c = saved[0], &s = saved[1];
    const int64_t b = ctx->saved_data["b"].toInt(), heads = ctx->saved_data["heads"].toInt();
    const int64_t kv_heads = ctx->saved_data["kv_heads"].toInt();
    const int64_t t = c.size(0), hd = c.size(1), ld = (heads + 2 * kv_heads) * hd;
    const int64_t n_rep = heads / kv_heads;
    c10::DeviceGuard guard(c.device());
    at::Tensor dqkv = at::empty({b, t, ld}, c.options().dtype(at::kBFloat16));
    auto *base = static_cast<char *>(dqkv.data_ptr());
    const int64_t nhs[3] = {heads, kv_heads, kv_heads}, reps[3] = {1, n_rep, n_rep};
    int64_t col = 0;
    for (int i = 0; i < 3; ++i) {
      // An output nothing used (never, in the model) has an undefined gradient: zeros.
      at::Tensor gy = grads[i].defined()
                          ? dense(grads[i])
                          : at::zeros({b, t, heads, hd}, c.options().dtype(at::kBFloat16));
      check_cuda(gy, at::kBFloat16, op, "grad");
      launched(mm::rope_bwd(gy.data_ptr(), c.data_ptr<float>(), s.data_ptr<float>(),
                            base + col * 2, ld, b, t, nhs[i], hd, reps[i], i < 2, stream_of(c)),
               op);
      col += nhs[i] * hd;
    }
    return {dqkv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The merged projection qkv [B, T, (H + 2 KV) hd] bf16 (hd 64, 80, 96 or 128) -> o [B, T, H * hd]
// bf16: attention with RoPE on q and k and query head h reading kv head h / (H / KV), in
// attention.cu's kernels (no repeat_kv copies, no fp32 dQ). `mask` is an mm::AttnMask: causal,
// segments (seg_start int32 [B, T], positions restarting at each segment) or bidirectional.
// With q_norm / k_norm (fp32 [hd], both or neither) q and k go through MiniMind-3's RMSNorm over
// head_dim (eps) before RoPE. Saves qkv (for v and the norm's input), the RoPE'd q and k, o, the
// logsumexp and the norm's rstd; backward writes the merged projection's gradient and the norm
// weights' gradients. Differentiable in qkv, q_norm and k_norm. Replaces QkvHeads + SDPA (or the
// libtorch path with qk-norm).
struct QkvAttention : public torch::autograd::Function<QkvAttention> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &qkv, const at::Tensor &cos,
                            const at::Tensor &sin, int64_t heads, int64_t kv_heads, int64_t mask,
                            const std::optional<at::Tensor> &seg_start,
                            const std::optional<at::Tensor> &q_norm,
                            const std::optional<at::Tensor> &k_norm, double eps) {
    const char *op = "qkv_attention";
    const int64_t hd = merged_qkv_head_dim(qkv, cos, sin, heads, kv_heads, op);
    TORCH_CHECK(hd == 64 || hd == 80 || hd == 96 || hd == 128, op,
                ": head dim 64, 80, 96 or 128 only, got ", hd);
    TORCH_CHECK(mask == mm::kAttnCausal || mask == mm::kAttnSegments ||
                    mask == mm::kAttnBidirectional,
                op, ": mask must be ", int(mm::kAttnCausal), " (causal), ", int(mm::kAttnSegments),
                " (segments) or ", int(mm::kAttnBidirectional), " (bidirectional), got ", mask);
    const int64_t b = qkv.size(0), t = qkv.size(1);
    TORCH_CHECK(t >= 1 && t <= (INT32_MAX / 128) && b <= 65535 && heads <= 65535, op,
                ": shape out of range: B ", b, ", T ", t, ", heads ", heads);
    const bool segments = mask == mm::kAttnSegments;
    const bool has_seg = seg_start.has_value() && seg_start->defined();
    TORCH_CHECK(segments == has_seg, op,
                segments ? ": the segments mask needs seg_start"
                         : ": seg_start is given but the mask is not segments");
    at::Tensor seg;
    if (has_seg) {
      check_cuda(*seg_start, at::kInt, op, "seg_start");
      TORCH_CHECK(seg_start->dim() == 2 && seg_start->size(0) == b && seg_start->size(1) == t, op,
                  ": seg_start must be [B, T] = [", b, ", ", t, "], got ", seg_start->sizes());
      TORCH_CHECK(seg_start->device() == qkv.device(), op, ": seg_start on ",
                  seg_start->device(), ", qkv on ", qkv.device());
      seg = dense(*seg_start);
    }
    const bool has_q = q_norm.has_value() && q_norm->defined();
    const bool has_k = k_norm.has_value() && k_norm->defined();
    TORCH_CHECK(has_q == has_k, op, ": q_norm and k_norm come together, got ",
                has_q ? "q_norm only" : "k_norm only");
    at::Tensor wq, wk;
    if (has_q) {
      for (const at::Tensor *w : {&*q_norm, &*k_norm}) {
        const char *name = w == &*q_norm ? "q_norm" : "k_norm";
        check_cuda(*w, at::kFloat, op, name);
        TORCH_CHECK(w->dim() == 1 && w->size(0) == hd, op, ": ", name, " must be [", hd,
                    "], got ", w->sizes());
        TORCH_CHECK(w->device() == qkv.device(), op, ": ", name, " on ", w->device(),
                    ", qkv on ", qkv.device());
      }
      TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
      wq = dense(*q_norm);
      wk = dense(*k_norm);
    }
    c10::DeviceGuard guard(qkv.device());
    at::Tensor x = dense(qkv), c = dense(cos), s = dense(sin);
    at::Tensor qr = at::empty({b, heads, t, hd}, x.options());
    at::Tensor kr = at::empty({b, kv_heads, t, hd}, x.options());
    at::Tensor o = at::empty({b, t, heads * hd}, x.options());
    at::Tensor lse = at::empty({b, heads, t}, x.options().dtype(at::kFloat));
    at::Tensor rstd;
    if (has_q) rstd = at::empty({b, t, heads + kv_heads}, x.options().dtype(at::kFloat));
    launched(mm::attn_fwd(x.data_ptr(), c.data_ptr<float>(), s.data_ptr<float>(),
                          has_seg ? seg.data_ptr<int32_t>() : nullptr,
                          has_q ? wq.data_ptr<float>() : nullptr,
                          has_q ? wk.data_ptr<float>() : nullptr, static_cast<float>(eps),
                          qr.data_ptr(), kr.data_ptr(), has_q ? rstd.data_ptr<float>() : nullptr,
                          o.data_ptr(), lse.data_ptr<float>(), b, t, heads, kv_heads, hd,
                          static_cast<int>(mask), stream_of(x)),
             op);
    // Undefined tensors (no segments, no qk-norm) are saved as undefined.
    ctx->save_for_backward({x, qr, kr, c, s, o, lse, seg, wq, wk, rstd});
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["kv_heads"] = kv_heads;
    ctx->saved_data["mask"] = mask;
    return o;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const char *op = "qkv_attention backward";
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &qr = saved[1], &kr = saved[2], &c = saved[3], &s = saved[4];
    const at::Tensor &o = saved[5], &lse = saved[6], &seg = saved[7], &wq = saved[8];
    const at::Tensor &wk = saved[9], &rstd = saved[10];
    const int64_t heads = ctx->saved_data["heads"].toInt();
    const int64_t kv_heads = ctx->saved_data["kv_heads"].toInt();
    const int64_t mask = ctx->saved_data["mask"].toInt();
    const int64_t b = x.size(0), t = x.size(1), hd = c.size(1);
    const bool norm = wq.defined();
    c10::DeviceGuard guard(x.device());
    check_cuda(grads[0], at::kBFloat16, op, "grad_o");
    at::Tensor dout = dense(grads[0]);
    at::Tensor delta = at::empty({b, heads, t}, lse.options());
    at::Tensor dqkv = at::empty(x.sizes(), x.options());
    at::Tensor dw_part, dwq, dwk;
    int64_t parts = 0;
    if (norm) {
      parts = mm::attn_norm_bwd_parts(b, t, heads, hd);
      dw_part = at::empty({2, parts, hd}, lse.options());
      dwq = at::empty({hd}, wq.options());
      dwk = at::empty({hd}, wk.options());
    }
    auto fp = [](const at::Tensor &v) { return v.defined() ? v.data_ptr<float>() : nullptr; };
    launched(mm::attn_bwd(x.data_ptr(), qr.data_ptr(), kr.data_ptr(), c.data_ptr<float>(),
                          s.data_ptr<float>(), seg.defined() ? seg.data_ptr<int32_t>() : nullptr,
                          fp(wq), fp(wk), fp(rstd), o.data_ptr(), lse.data_ptr<float>(),
                          dout.data_ptr(), delta.data_ptr<float>(), dqkv.data_ptr(), fp(dw_part),
                          fp(dwq), fp(dwk), parts, b, t, heads, kv_heads, hd,
                          static_cast<int>(mask), stream_of(x)),
             op);
    // One per forward argument: qkv, cos, sin, heads, kv_heads, mask, seg_start, q_norm, k_norm,
    // eps.
    return {dqkv,        at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), dwq,          dwk,          at::Tensor()};
  }
};

// acc (fp32) += g (bf16) in place: kernels.cu's vectorized add where both are contiguous CUDA
// tensors of one size, 16-byte aligned, a multiple of 8 long; libtorch's add_ otherwise (same
// values: g converted to fp32, one fp32 add).
void add_bf16_into(const at::Tensor &acc, const at::Tensor &g) {
  const bool fast = acc.is_cuda() && g.is_cuda() && acc.device() == g.device() &&
                    acc.scalar_type() == at::kFloat && g.scalar_type() == at::kBFloat16 &&
                    acc.sizes() == g.sizes() && acc.is_contiguous() && g.is_contiguous() &&
                    aligned16(acc) && aligned16(g) && acc.numel() % 8 == 0;
  if (!fast) {
    acc.add_(g);
    return;
  }
  c10::DeviceGuard guard(acc.device());
  launched(mm::add_bf16(acc.data_ptr<float>(), g.data_ptr(), acc.numel(), stream_of(acc)),
           "add_bf16");
}

// fp32 master weights w_i [rows_i, d] -> one bf16 [sum rows_i, d], the merged operand of a
// projection's matmul (cat + cast, one copy kernel per weight). Backward, in a full backward pass
// (torch.autograd.backward: every leaf's AccumulateGrad runs) for a weight whose .grad is defined
// (the trainer's flat buffer): its rows of the bf16 gradient are added to .grad in place, fp32 +=
// bf16 in one vectorized kernel (add_bf16_into), and no gradient is returned, so AccumulateGrad
// has nothing to do. These are the values of the cast's backward then AccumulateGrad, which take
// a temporary fp32 copy and a second pass. Otherwise (autograd.grad, or no .grad yet) it returns the fp32 gradients as the
// cast's backward does. The node sits where the cast's would, so it runs at the same point of
// backward (data parallel's bucket events rely on a layer's gradients being final once backward
// has passed the layer).
struct WeightsBf16 : public torch::autograd::Function<WeightsBf16> {
  static at::Tensor forward(AutogradContext *ctx, at::TensorList ws) {
    const char *op = "weights_bf16";
    TORCH_CHECK(!ws.empty(), op, ": no weights");
    const int64_t d = ws[0].size(-1);
    int64_t rows = 0;
    for (const at::Tensor &w : ws) {
      check_cuda(w, at::kFloat, op, "a weight");
      TORCH_CHECK(w.dim() == 2 && w.size(1) == d && w.device() == ws[0].device(), op,
                  ": weights must be [rows, ", d, "] on one device, got ", w.sizes(), " on ",
                  w.device());
      rows += w.size(0);
    }
    c10::DeviceGuard guard(ws[0].device());
    at::Tensor out = at::empty({rows, d}, ws[0].options().dtype(at::kBFloat16));
    int64_t at_row = 0;
    for (const at::Tensor &w : ws) {
      out.narrow(0, at_row, w.size(0)).copy_(w);
      at_row += w.size(0);
    }
    ctx->saved_data["ws"] = ws.vec();
    return out;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const auto ws = ctx->saved_data["ws"].toTensorVector();
    const auto *exec_info = torch::autograd::get_current_graph_task_exec_info();
    const bool accumulate_here = exec_info != nullptr && exec_info->empty();
    variable_list out;
    int64_t at_row = 0;
    for (const at::Tensor &w : ws) {
      at::Tensor g = grads[0].defined() ? grads[0].narrow(0, at_row, w.size(0)) : at::Tensor();
      at_row += w.size(0);
      const at::Tensor &acc = w.grad();
      if (!g.defined()) {
        out.emplace_back();
      } else if (accumulate_here && acc.defined() && acc.sizes() == w.sizes() &&
                 acc.scalar_type() == at::kFloat) {
        add_bf16_into(acc, g);
        out.emplace_back();
      } else {
        out.push_back(g.to(w.scalar_type()));
      }
    }
    return out;
  }
};

// gu [..., 2F] = [g | u] bf16 (dense) -> h [..., F] = bf16(bf16(silu(g)) * u).
at::Tensor swiglu_forward(const at::Tensor &g, int64_t f, const char *op) {
  const int64_t n = g.numel() / (2 * f);
  std::vector<int64_t> sizes = g.sizes().vec();
  sizes.back() = f;
  at::Tensor h = at::empty(sizes, g.options());
  launched(mm::swiglu_fwd(g.data_ptr(), h.data_ptr(), n, f, stream_of(g)), op);
  return h;
}

// The gradient of gu (dense, as in swiglu_forward) from the gradient dh of h.
at::Tensor swiglu_backward(const at::Tensor &g, const at::Tensor &grad_h, int64_t f,
                           const char *op) {
  check_cuda(grad_h, at::kBFloat16, op, "grad_h");
  at::Tensor dh = dense(grad_h);
  const int64_t n = g.numel() / (2 * f);
  at::Tensor dgu = at::empty(g.sizes(), g.options());
  launched(mm::swiglu_bwd(g.data_ptr(), dh.data_ptr(), dgu.data_ptr(), n, f, stream_of(g)), op);
  return dgu;
}

void check_swiglu_input(const at::Tensor &gu, int64_t f, const char *op) {
  check_cuda(gu, at::kBFloat16, op, "gu");
  TORCH_CHECK(gu.dim() >= 1 && f > 0 && gu.size(-1) == 2 * f, op,
              ": gu's last dimension must be 2 * F = ", 2 * f, ", got ", gu.sizes());
  TORCH_CHECK(f % 8 == 0, op, ": F must be a multiple of 8, got ", f);
}

// gu [..., 2F] = [g | u] bf16 -> h [..., F] = bf16(bf16(silu(g)) * u).
struct SwiGlu : public torch::autograd::Function<SwiGlu> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &gu, int64_t f) {
    const char *op = "swiglu";
    check_swiglu_input(gu, f, op);
    c10::DeviceGuard guard(gu.device());
    at::Tensor g = dense(gu);
    ctx->save_for_backward({g});
    ctx->saved_data["f"] = f;
    return swiglu_forward(g, f, op);
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &g = saved[0];
    c10::DeviceGuard guard(g.device());
    return {swiglu_backward(g, grads[0], ctx->saved_data["f"].toInt(), "swiglu backward"),
            at::Tensor()};
  }
};

// out [N, d] = sum over s < k of w[t, s] g[slot[t k + s]] (kernels.h's slot_sum): g bf16 [N k, d]
// (d a multiple of 8), slot int64 [N k] the sorted rows of the pairs (a permutation, as the
// dispatch makes it), w fp32 [N, k] or none (weights 1).
at::Tensor slot_sum(const at::Tensor &g, const at::Tensor &slot, const std::optional<at::Tensor> &w,
                    int64_t n, const char *op) {
  check_cuda(g, at::kBFloat16, op, "g");
  check_cuda(slot, at::kLong, op, "slot");
  TORCH_CHECK(g.dim() == 2 && slot.dim() == 1 && g.size(0) == slot.size(0) && n > 0 &&
                  slot.size(0) % n == 0 && g.size(1) % 8 == 0,
              op, ": expected g [N k, d] (d a multiple of 8) and slot [N k] for N = ", n,
              "; got g ", g.sizes(), ", slot ", slot.sizes());
  TORCH_CHECK(slot.device() == g.device(), op, ": slot must be on g's device, ", g.device());
  const int64_t k = slot.size(0) / n, d = g.size(1);
  if (w.has_value()) {
    check_cuda(*w, at::kFloat, op, "w");
    TORCH_CHECK(w->dim() == 2 && w->size(0) == n && w->size(1) == k &&
                    w->device() == g.device(),
                op, ": w must be [", n, ", ", k, "] on g's device, got ", w->sizes());
  }
  at::Tensor gc = dense(g), sc = slot.contiguous();
  at::Tensor wc = w.has_value() ? w->contiguous() : at::Tensor();
  at::Tensor out = at::empty({n, d}, g.options());
  launched(mm::slot_sum(gc.data_ptr(), sc.data_ptr<int64_t>(),
                        wc.defined() ? wc.data_ptr<float>() : nullptr, out.data_ptr(), n, k, d,
                        stream_of(g)),
           op);
  return out;
}

// A MoE layer's weighted combine: ys [N k, d] bf16 (the experts' outputs, sorted by expert) ->
// y [N, d] = bf16(sum_s w[t, s] ys[slot[t k + s]]), in fp32 with one rounding, w fp32 [N, k] the
// routing weights; one pass where permute_rows, the weights' multiply and the sum over k are
// three. Backward: dys[slot[t k + s]] = bf16(w[t, s] dy[t]), dw[t, s] = ys[slot[t k + s]] . dy[t]
// (fp32), one pass.
struct MoeCombine : public torch::autograd::Function<MoeCombine> {
  static at::Tensor forward(AutogradContext *ctx, const at::Tensor &ys, const at::Tensor &slot,
                            const at::Tensor &w) {
    const char *op = "moe_combine";
    TORCH_CHECK(w.defined() && w.dim() == 2, op, ": w must be [N, k], got ",
                w.defined() ? w.sizes() : at::IntArrayRef());
    c10::DeviceGuard guard(ys.device());
    at::Tensor out = slot_sum(ys, slot, w, w.size(0), op);
    ctx->save_for_backward({dense(ys), slot.contiguous(), w.contiguous()});
    return out;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const char *op = "moe_combine backward";
    auto saved = ctx->get_saved_variables();
    const at::Tensor &ys = saved[0], &slot = saved[1], &w = saved[2];
    c10::DeviceGuard guard(ys.device());
    check_cuda(grads[0], at::kBFloat16, op, "grad_y");
    at::Tensor dy = dense(grads[0]);
    const int64_t n = w.size(0), k = w.size(1), d = ys.size(1);
    TORCH_CHECK(dy.numel() == n * d, op, ": grad_y has ", dy.numel(), " elements, expected ",
                n * d);
    at::Tensor dys = at::empty(ys.sizes(), ys.options());
    at::Tensor dw = at::empty(w.sizes(), w.options());
    launched(mm::slot_sum_bwd(dy.data_ptr(), ys.data_ptr(), slot.data_ptr<int64_t>(),
                              w.data_ptr<float>(), dys.data_ptr(), dw.data_ptr<float>(), n, k, d,
                              stream_of(ys)),
             op);
    return {dys, at::Tensor(), dw};
  }
};

// GroupedExperts' SwiGLU (grouped_experts.h) as our kernels: bf16 on CUDA, F a multiple of 8.
struct KernelSwiGlu {
  static void check(const at::Tensor &x, const char *op) { check_cuda(x, at::kBFloat16, op, "x"); }
  static at::Tensor forward(const at::Tensor &gu, int64_t f, const char *op) {
    check_swiglu_input(gu, f, op);
    return swiglu_forward(dense(gu), f, op);
  }
  static at::Tensor backward(const at::Tensor &gu, const at::Tensor &dh, int64_t f,
                             const char *op) {
    return swiglu_backward(dense(gu), dh, f, op);
  }
  // mm_moe::sum_slots's numbers in one pass (no [N k, d] gather in between), bf16 rows of a
  // width that is a multiple of 8; elsewhere mm_moe::sum_slots.
  static at::Tensor sum_slots(const at::Tensor &g, const at::Tensor &slot, int64_t n) {
    if (g.scalar_type() != at::kBFloat16 || g.size(1) % 8 != 0) {
      return mm_moe::sum_slots(g, slot, n);
    }
    return slot_sum(g, slot, std::nullopt, n, "grouped_experts backward");
  }
};

// logits [N, V] bf16 (contiguous, not requiring grad) are overwritten with the bf16 gradient of
// `seed * sum of the rows' cross-entropy` (labels int64 [N], -100 ignored; seed one fp32 on the
// device); returns that sum (unscaled) as an fp32 0-dim tensor. Per-row losses go to an [N]
// buffer summed by libtorch: deterministic, no atomics.
at::Tensor ce_fwd_bwd(const at::Tensor &logits, const at::Tensor &labels, const at::Tensor &seed) {
  const char *op = "ce_fwd_bwd";
  check_cuda(logits, at::kBFloat16, op, "logits");
  check_cuda(labels, at::kLong, op, "labels");
  check_cuda(seed, at::kFloat, op, "seed");
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), op,
              ": logits must be contiguous (the gradient is written over them in place)");
  TORCH_CHECK(!logits.requires_grad(), op,
              ": logits must not require grad (the gradient is written over them in place)");
  const int64_t n = logits.size(0), v = logits.size(1);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, op, ": labels must be [", n, "], got ",
              labels.sizes());
  TORCH_CHECK(seed.numel() == 1, op, ": seed must hold one value, got ", seed.sizes());
  TORCH_CHECK(labels.device() == logits.device() && seed.device() == logits.device(), op,
              ": logits, labels and seed must be on one device");
  TORCH_CHECK(n <= INT32_MAX, op, ": at most ", INT32_MAX, " rows, got ", n);
  c10::DeviceGuard guard(logits.device());
  at::Tensor lb = labels.contiguous(), sd = seed.contiguous();
  at::Tensor row_loss = at::empty({n}, logits.options().dtype(at::kFloat));
  launched(mm::ce_fwd_bwd(logits.data_ptr(), lb.data_ptr<int64_t>(), sd.data_ptr<float>(),
                          row_loss.data_ptr<float>(), n, v, stream_of(logits)),
           op);
  return at::sum(row_loss);
}

}  // namespace

using mm_ffi::guard;

extern "C" {

char *mm_rms_norm_bf16(at::Tensor *x, at::Tensor *w, double eps, at::Tensor **out) {
  return guard([&] { *out = new at::Tensor(RmsNormBf16::apply(*x, *w, eps)); });
}

// (h, y) = (x + a, bf16 rms_norm(x + a) * w): the residual add and the next norm in one kernel.
char *mm_add_rms_norm_bf16(at::Tensor *x, at::Tensor *a, at::Tensor *w, double eps,
                           at::Tensor **h, at::Tensor **y) {
  return guard([&] {
    auto out = AddRmsNormBf16::apply(*x, *a, *w, eps);
    *h = new at::Tensor(out[0]);
    *y = new at::Tensor(out[1]);
  });
}

// (h, y, y2, logits) = MoeNormRouter(x, a, w, wg): see above.
char *mm_moe_norm_router(at::Tensor *x, at::Tensor *a, at::Tensor *w, at::Tensor *wg, double eps,
                         int64_t copies, at::Tensor **h, at::Tensor **y, at::Tensor **y2,
                         at::Tensor **logits) {
  return guard([&] {
    auto out = MoeNormRouter::apply(*x, *a, *w, *wg, eps, copies);
    *h = new at::Tensor(out[0]);
    *y = new at::Tensor(out[1]);
    *y2 = new at::Tensor(out[2]);
    *logits = new at::Tensor(out[3]);
  });
}

// (q, k, v) = QkvHeads(qkv): see above.
char *mm_qkv_heads(at::Tensor *qkv, at::Tensor *cos, at::Tensor *sin, int64_t heads,
                   int64_t kv_heads, at::Tensor **q, at::Tensor **k, at::Tensor **v) {
  return guard([&] {
    auto out = QkvHeads::apply(*qkv, *cos, *sin, heads, kv_heads);
    *q = new at::Tensor(out[0]);
    *k = new at::Tensor(out[1]);
    *v = new at::Tensor(out[2]);
  });
}

// The bf16 merged weight of n fp32 weights: see WeightsBf16.
char *mm_weights_bf16(at::Tensor **ws, int64_t n, at::Tensor **out) {
  return guard([&] {
    std::vector<at::Tensor> list;
    for (int64_t i = 0; i < n; ++i) list.push_back(*ws[i]);
    *out = new at::Tensor(WeightsBf16::apply(at::TensorList(list)));
  });
}

// acc += g (fp32 += bf16) in place: see add_bf16_into.
char *mm_add_bf16_(at::Tensor *acc, at::Tensor *g) {
  return guard([&] {
    at::NoGradGuard no_grad;
    TORCH_CHECK(acc->sizes() == g->sizes(), "add_bf16_: acc ", acc->sizes(), " and g ",
                g->sizes(), " must have one shape");
    add_bf16_into(*acc, *g);
  });
}

// o = QkvAttention(qkv, ...): see above. q_norm, k_norm (both or neither) and seg_start (only
// with mask segments) may be null; mask is an mm::AttnMask.
char *mm_qkv_attention(at::Tensor *qkv, at::Tensor *cos, at::Tensor *sin, int64_t heads,
                       int64_t kv_heads, at::Tensor *q_norm, at::Tensor *k_norm, double eps,
                       int64_t mask, at::Tensor *seg_start, at::Tensor **out) {
  return guard([&] {
    auto opt = [](at::Tensor *p) {
      return p != nullptr ? std::optional<at::Tensor>(*p) : std::optional<at::Tensor>();
    };
    *out = new at::Tensor(QkvAttention::apply(*qkv, *cos, *sin, heads, kv_heads, mask,
                                              opt(seg_start), opt(q_norm), opt(k_norm), eps));
  });
}

char *mm_swiglu(at::Tensor *gu, int64_t f, at::Tensor **out) {
  return guard([&] { *out = new at::Tensor(SwiGlu::apply(*gu, f)); });
}

// y = GroupedExperts(x, token, slot, gate_up, down, offs) with our SwiGLU kernels:
// grouped_experts.h.
char *mm_grouped_experts(at::Tensor *x, at::Tensor *token, at::Tensor *slot,
                         at::Tensor *gate_up, at::Tensor *down, at::Tensor *offs,
                         int64_t recompute_gate_up, at::Tensor **out) {
  return guard([&] {
    *out = new at::Tensor(mm_moe::GroupedExperts<KernelSwiGlu>::apply(
        *x, *token, *slot, *gate_up, *down, *offs, recompute_gate_up != 0));
  });
}

// y = MoeCombine(ys, slot, w): see above.
char *mm_moe_combine(at::Tensor *ys, at::Tensor *slot, at::Tensor *w, at::Tensor **out) {
  return guard([&] { *out = new at::Tensor(MoeCombine::apply(*ys, *slot, *w)); });
}

char *mm_ce_fwd_bwd(at::Tensor *logits, at::Tensor *labels, at::Tensor *seed,
                    at::Tensor **loss_sum) {
  return guard([&] { *loss_sum = new at::Tensor(ce_fwd_bwd(*logits, *labels, *seed)); });
}

}

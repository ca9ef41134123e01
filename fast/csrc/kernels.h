// Host launchers of the fused CUDA kernels in kernels.cu, cross_entropy.cu and attention.cu
// (compiled by nvcc). Raw pointers only, so fused_ops.cpp (compiled by the host compiler against
// libtorch) needs no CUDA device headers.
// bf16 buffers are passed as void*. Every launcher enqueues on `stream` and returns nullptr, or
// the CUDA error string of the launch.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

namespace mm {

// Largest row width the RMSNorm kernels take (one warp per row, 4 floats per lane per chunk).
constexpr int64_t kRmsMaxDim = 1024;

// y[N, d] (bf16) = bf16(w * (x * rstd)), rstd[N] = rsqrt(mean(x^2) + eps); x, w fp32.
// With a (bf16 [N, d], else null): x is first replaced by h = x + a, written to h_out (fp32).
const char *rms_norm_fwd(const float *x, const void *a, const float *w, void *y, float *h_out,
                         float *rstd, int64_t n, int64_t d, float eps, cudaStream_t stream);

// Most experts the fused MoE norm + router takes (rms_norm_router_fwd / _bwd).
constexpr int kRouterMaxExperts = 16;

// The MoE layer's entry, rms_norm_fwd with two more consumers of the fp32 norm n = w * (h *
// rstd): y2 (bf16 [N, d], or null) a second bf16 copy of y, and (wg fp32 [E, d], E = e_n <=
// kRouterMaxExperts, or null with e_n 0) logits[N, E] = n wg^T in fp32 (the router's).
const char *rms_norm_router_fwd(const float *x, const void *a, const float *w, void *y, void *y2,
                                float *h_out, float *rstd, const float *wg, float *logits,
                                int64_t e_n, int64_t n, int64_t d, float eps,
                                cudaStream_t stream);

// Number of per-block partial rows of dw the backward writes (the size of `dw_part`'s first dim).
int64_t rms_norm_bwd_parts(int64_t n);

// dx[N, d] fp32 and dw[d] fp32 from gy[N, d] bf16; dw_part is scratch [parts, d] fp32.
// gres (fp32 [N, d], or null) is added to dx (the residual stream's own gradient); da (bf16
// [N, d], or null) receives bf16(dx), the gradient of the fused add's bf16 addend.
const char *rms_norm_bwd(const float *x, const float *w, const float *rstd, const void *gy,
                         const float *gres, float *dx, void *da, float *dw_part, float *dw,
                         int64_t n, int64_t d, int64_t parts, cudaStream_t stream);

// Number of per-block partial rows of the router's weight gradient (dwg_part's first dim): 32
// rows a block, so that enough blocks stream the norm's input.
int64_t router_dw_parts(int64_t n);

// rms_norm_bwd for rms_norm_router_fwd: the norm's gradient is gy (bf16, or null: zero) + gy2
// (bf16, or null) + glogits wg (glogits fp32 [N, E], or null), summed in fp32; with dwg (fp32
// [E, d], or null) also the router's weight gradient dwg = glogits^T n (zero without glogits),
// dwg_part scratch [router_dw_parts(n), E, d] fp32.
const char *rms_norm_router_bwd(const float *x, const float *w, const float *rstd, const void *gy,
                                const void *gy2, const float *glogits, const float *wg,
                                int64_t e_n, const float *gres, float *dx, void *da,
                                float *dw_part, float *dw, float *dwg_part, float *dwg, int64_t n,
                                int64_t d, int64_t parts, cudaStream_t stream);

// MoE, the rows of the N k (token, slot) pairs sorted by expert back per token: out[t] (bf16
// [N, d]) = sum over s < k of w[t, s] g[slot[t k + s]] (g bf16 [N k, d]; slot int64 [N k], a
// permutation of 0 .. N k; w fp32 [N, k], or null for weights 1), in fp32, one rounding. d a
// multiple of 8.
const char *slot_sum(const void *g, const int64_t *slot, const float *w, void *out, int64_t n,
                     int64_t k, int64_t d, cudaStream_t stream);

// slot_sum's backward with weights, from dy (bf16 [N, d]): dg[slot[t k + s]] = bf16(w[t, s] dy[t])
// (bf16 [N k, d]) and dw[t, s] = g[slot[t k + s]] . dy[t] (fp32 [N, k]).
const char *slot_sum_bwd(const void *dy, const void *g, const int64_t *slot, const float *w,
                         void *dg, float *dw, int64_t n, int64_t k, int64_t d,
                         cudaStream_t stream);

// y[B, T, nh*n_rep, hd] (bf16, contiguous) from x[B, T, nh, hd] (bf16, strides sb, st, sh, 1):
// RoPE (rotate) or a plain copy, each head written to its n_rep query heads.
const char *rope_fwd(const void *x, int64_t sb, int64_t st, int64_t sh, const float *cos,
                     const float *sin, void *y, int64_t b, int64_t t, int64_t nh, int64_t hd,
                     int64_t n_rep, bool rotate, cudaStream_t stream);

// dx[B, T, nh, hd] (bf16; rows of ld elements: nh*hd when contiguous, wider when dx is a slice
// of a merged projection's gradient) from gy[B, T, nh*n_rep, hd] (bf16, contiguous).
const char *rope_bwd(const void *gy, const float *cos, const float *sin, void *dx, int64_t ld,
                     int64_t b, int64_t t, int64_t nh, int64_t hd, int64_t n_rep, bool rotate,
                     cudaStream_t stream);

// h[N, F] = bf16(bf16(silu(g)) * u) from gu[N, 2F] = [g | u] (bf16, contiguous).
const char *swiglu_fwd(const void *gu, void *h, int64_t n, int64_t f, cudaStream_t stream);

// dgu[N, 2F] = [dg | du] from gu[N, 2F] and dh[N, F] (bf16, contiguous).
const char *swiglu_bwd(const void *gu, const void *dh, void *dgu, int64_t n, int64_t f,
                       cudaStream_t stream);

// Cross-entropy forward + backward over logits[N, V] (bf16, contiguous), in place: row_loss[N]
// (fp32) = lse(x) - x[label], and each row of logits becomes bf16((softmax(x) - onehot(label)) *
// *seed). Rows whose label is not in [0, V) (ignore_index -100, or out of range) get loss 0 and a
// zero gradient. labels int64 [N], seed one fp32 on the device.
const char *ce_fwd_bwd(void *logits, const int64_t *labels, const float *seed, float *row_loss,
                       int64_t n, int64_t v, cudaStream_t stream);

// acc[n] (fp32) += g[n] (bf16); n a multiple of 8, both 16-byte aligned.
const char *add_bf16(float *acc, const void *g, int64_t n, cudaStream_t stream);

// Which keys each query of attn_fwd / attn_bwd sees (the `mask` argument).
enum AttnMask : int {
  // Key j visible to query i iff j <= i; RoPE position t.
  kAttnCausal = 0,
  // iff seg_start[i] <= j <= i, seg_start int32 [B, T] (for every token the row index of the
  // first token of its segment: non-decreasing within a row, seg_start[t] <= t); RoPE position
  // t - seg_start[t].
  kAttnSegments = 1,
  // Every key of the row; RoPE position t.
  kAttnBidirectional = 2,
};

// Attention over the merged projection qkv [B, T, (H + 2 KV) hd] (bf16, contiguous; hd 64, 80,
// 96 or 128), query head h reading kv head h / (H / KV), softmax scale 1 / sqrt(hd), keys as `mask`
// says (seg_start: null unless kAttnSegments). With q_norm and k_norm (fp32 [hd], both or
// neither) each head vector of q and k first becomes w * x * rsqrt(mean(x^2) + eps) in fp32,
// rstd [B, T, H + KV] (fp32) saved; rstd may be null without them. Then RoPE (fp32 tables
// cos/sin [T, hd], row = position) of q and k into qr [B, H, T, hd] and kr [B, KV, T, hd] (bf16,
// kept for attn_bwd), then o [B, T, H, hd] (bf16) and lse [B, H, T] (fp32, base-2 units of the
// scaled scores). attention.cu.
const char *attn_fwd(const void *qkv, const float *cos, const float *sin, const int32_t *seg_start,
                     const float *q_norm, const float *k_norm, float eps, void *qr, void *kr,
                     float *rstd, void *o, float *lse, int64_t b, int64_t t, int64_t heads,
                     int64_t kv_heads, int64_t head_dim, int mask, cudaStream_t stream);

// Rows of per-block partial sums the qk-norm backward writes for each weight (dw_part's second
// dimension).
int64_t attn_norm_bwd_parts(int64_t b, int64_t t, int64_t heads, int64_t head_dim);

// Its backward: dqkv [B, T, (H + 2 KV) hd] (bf16, every element of rows < T written; dq and dk
// through RoPE's transpose, and with qk-norm through the norm's backward) from dout
// [B, T, H, hd] (bf16, contiguous); delta [B, H, T] fp32 is scratch. The same mask, seg_start,
// norm weights and the forward's rstd; with qk-norm also dw_part [2, parts, hd] (fp32 scratch,
// parts from attn_norm_bwd_parts) and the weights' gradients dq_norm, dk_norm [hd] (fp32,
// summed over B, T and heads in a fixed order: deterministic).
const char *attn_bwd(const void *qkv, const void *qr, const void *kr, const float *cos,
                     const float *sin, const int32_t *seg_start, const float *q_norm,
                     const float *k_norm, const float *rstd, const void *o, const float *lse,
                     const void *dout, float *delta, void *dqkv, float *dw_part, float *dq_norm,
                     float *dk_norm, int64_t parts, int64_t b, int64_t t, int64_t heads,
                     int64_t kv_heads, int64_t head_dim, int mask, cudaStream_t stream);

}  // namespace mm

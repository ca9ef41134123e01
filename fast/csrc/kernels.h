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

// Number of per-block partial rows of dw the backward writes (the size of `dw_part`'s first dim).
int64_t rms_norm_bwd_parts(int64_t n);

// dx[N, d] fp32 and dw[d] fp32 from gy[N, d] bf16; dw_part is scratch [parts, d] fp32.
// gres (fp32 [N, d], or null) is added to dx (the residual stream's own gradient); da (bf16
// [N, d], or null) receives bf16(dx), the gradient of the fused add's bf16 addend.
const char *rms_norm_bwd(const float *x, const float *w, const float *rstd, const void *gy,
                         const float *gres, float *dx, void *da, float *dw_part, float *dw,
                         int64_t n, int64_t d, int64_t parts, cudaStream_t stream);

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

// Causal attention over the merged projection qkv [B, T, (H + 2 KV) 64] (bf16, contiguous; head
// dim 64), query head h reading kv head h / (H / KV). First RoPE (fp32 tables cos/sin [T, 64])
// of q and k into qr [B, H, T, 64] and kr [B, KV, T, 64] (bf16, kept for attn_bwd), then o
// [B, T, H, 64] (bf16) and lse [B, H, T] (fp32, base-2 units of the scaled scores). attention.cu.
const char *attn_fwd(const void *qkv, const float *cos, const float *sin, void *qr, void *kr,
                     void *o, float *lse, int64_t b, int64_t t, int64_t heads, int64_t kv_heads,
                     cudaStream_t stream);

// Its backward: dqkv [B, T, (H + 2 KV) 64] (bf16, every element of rows < T written; dq and dk
// through RoPE's transpose) from dout [B, T, H, 64] (bf16, contiguous); delta [B, H, T] fp32 is
// scratch.
const char *attn_bwd(const void *qkv, const void *qr, const void *kr, const float *cos,
                     const float *sin, const void *o, const float *lse, const void *dout,
                     float *delta, void *dqkv, int64_t b, int64_t t, int64_t heads,
                     int64_t kv_heads, cudaStream_t stream);

}  // namespace mm

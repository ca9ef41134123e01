// Fused element-wise kernels of the bf16 training step (RMSNorm -> bf16, RoPE + head layout +
// repeat_kv, SwiGLU), forward and backward. Compiled by nvcc for sm_90 without --use_fast_math:
// expf, division and rsqrtf are the same IEEE-accurate functions libtorch's kernels use, and the
// products/sums that libtorch rounds separately are written with __fmul_rn / __fadd_rn so nvcc
// cannot contract them into an FMA. Launched on the caller's stream (libtorch's current stream),
// so they are captured by CUDA graphs like any libtorch kernel.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels.h"

namespace {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float round_bf16(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

// 8 bf16 (16 bytes, 16-byte aligned) <-> 8 floats.
__device__ __forceinline__ void load8(const bf16 *p, float out[8]) {
  uint4 raw = *reinterpret_cast<const uint4 *>(p);
  const bf16 *h = reinterpret_cast<const bf16 *>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = __bfloat162float(h[i]);
}

__device__ __forceinline__ void store8(bf16 *p, const float v[8]) {
  uint4 raw;
  bf16 *h = reinterpret_cast<bf16 *>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) h[i] = __float2bfloat16_rn(v[i]);
  *reinterpret_cast<uint4 *>(p) = raw;
}

// 8 floats (32 bytes, 16-byte aligned).
__device__ __forceinline__ void load8f(const float *p, float out[8]) {
  float4 a = reinterpret_cast<const float4 *>(p)[0];
  float4 b = reinterpret_cast<const float4 *>(p)[1];
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
  out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}

// 4 bf16 (8 bytes) <-> 4 floats.
__device__ __forceinline__ void load4(const bf16 *p, float out[4]) {
  uint2 raw = *reinterpret_cast<const uint2 *>(p);
  const bf16 *h = reinterpret_cast<const bf16 *>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = __bfloat162float(h[i]);
}

__device__ __forceinline__ void store4(bf16 *p, float a, float b, float c, float d) {
  uint2 raw;
  bf16 *h = reinterpret_cast<bf16 *>(&raw);
  h[0] = __float2bfloat16_rn(a);
  h[1] = __float2bfloat16_rn(b);
  h[2] = __float2bfloat16_rn(c);
  h[3] = __float2bfloat16_rn(d);
  *reinterpret_cast<uint2 *>(p) = raw;
}

const char *launched() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

unsigned blocks_for(int64_t items, int threads) {
  return static_cast<unsigned>((items + threads - 1) / threads);
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: one warp per row, lane l owns the float4 chunks l, l+32, ... (d <= 1024: <= 8 each).

constexpr int kRowsPerBlock = 8;  // warps per block
// Chunks per lane: C = 4 covers d <= 512, C = 8 covers d <= 1024 = kRmsMaxDim (two instances,
// so the common d = 512 does not pay registers for 1024).

// With `a` (bf16) the row is first h = x + a (fp32, as bf16 + fp32 type promotion computes it),
// written to h_out: the residual add before the norm, fused (a and h_out both null otherwise).
template <int C>
__global__ void rms_norm_fwd_kernel(const float *__restrict__ x, const bf16 *__restrict__ a,
                                    const float *__restrict__ w, bf16 *__restrict__ y,
                                    bf16 *__restrict__ y2, float *__restrict__ h_out,
                                    float *__restrict__ rstd, const float *__restrict__ wg,
                                    float *__restrict__ logits, int e_n, int64_t n, int d,
                                    float eps) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp;
  if (row >= n) return;
  const int nc = d / 4;
  const float4 *xr = reinterpret_cast<const float4 *>(x + row * d);
  const float4 *wr = reinterpret_cast<const float4 *>(w);
  float4 xv[C];
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < C; ++j) {
    const int c = lane + 32 * j;
    if (c < nc) {
      xv[j] = xr[c];
      if (a != nullptr) {
        float av[4];
        load4(a + row * d + 4 * c, av);
        xv[j].x += av[0], xv[j].y += av[1], xv[j].z += av[2], xv[j].w += av[3];
        reinterpret_cast<float4 *>(h_out + row * d)[c] = xv[j];
      }
      ss += xv[j].x * xv[j].x + xv[j].y * xv[j].y + xv[j].z * xv[j].z + xv[j].w * xv[j].w;
    }
  }
  ss = warp_sum(ss);
  const float r = rsqrtf(ss / static_cast<float>(d) + eps);
  if (lane == 0) rstd[row] = r;
  bf16 *yr = y + row * d;
#pragma unroll
  for (int j = 0; j < C; ++j) {
    const int c = lane + 32 * j;
    if (c < nc) {
      const float4 wv = wr[c];
      // MiniMind: weight * (x * rstd), in fp32, one rounding to bf16.
      const float o[4] = {wv.x * (xv[j].x * r), wv.y * (xv[j].y * r), wv.z * (xv[j].z * r),
                          wv.w * (xv[j].w * r)};
      store4(yr + 4 * c, o[0], o[1], o[2], o[3]);
      if (y2 != nullptr) store4(y2 + row * d + 4 * c, o[0], o[1], o[2], o[3]);
    }
  }
  // The router's logits from the fp32 norm: logits[row, e] = sum_col n[col] wg[e, col].
  for (int e = 0; e < e_n; ++e) {
    const float4 *gr = reinterpret_cast<const float4 *>(wg + static_cast<int64_t>(e) * d);
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < C; ++j) {
      const int c = lane + 32 * j;
      if (c < nc) {
        const float4 wv = wr[c], g4 = gr[c];
        dot += (wv.x * (xv[j].x * r)) * g4.x + (wv.y * (xv[j].y * r)) * g4.y +
               (wv.z * (xv[j].z * r)) * g4.z + (wv.w * (xv[j].w * r)) * g4.w;
      }
    }
    dot = warp_sum(dot);
    if (lane == 0) logits[row * e_n + e] = dot;
  }
}

// dx = rstd * (w g - xhat * mean(w g xhat)); each block also writes its rows' sum of g * xhat
// (one row of dw_part), which rms_norm_dw_kernel sums over blocks: no atomics, deterministic.
// Two passes over a row (the second re-reads x, w, g from L1/L2) keep registers low enough for
// two blocks per SM.
template <int C>
__global__ void __launch_bounds__(32 * kRowsPerBlock, 2)
    rms_norm_bwd_kernel(const float *__restrict__ x, const float *__restrict__ w,
                        const float *__restrict__ rstd, const bf16 *__restrict__ gy,
                        const bf16 *__restrict__ gy2, const float *__restrict__ glogits,
                        const float *__restrict__ wg, int e_n, const float *__restrict__ gres,
                        float *__restrict__ dx, bf16 *__restrict__ da,
                        float *__restrict__ dw_part, int64_t n, int d) {
  __shared__ float red[kRowsPerBlock][32 * 4 * C];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nc = d / 4;
  const float4 *wr = reinterpret_cast<const float4 *>(w);
  float acc[C][4];
#pragma unroll
  for (int j = 0; j < C; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  const float inv_d = 1.f / static_cast<float>(d);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp; row < n;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const float r = rstd[row];
    const float4 *xr = reinterpret_cast<const float4 *>(x + row * d);
    const float4 *rr = reinterpret_cast<const float4 *>(gres + row * d);
    const bf16 *gr = gy + row * d;
    // The row's loads are issued before the reduction and kept in registers for the second
    // pass; up to d 512 (C 4) the residual gradient's too, so a row takes one round trip to
    // memory, not two (past that they would not fit in the registers of 2 blocks an SM).
    constexpr bool kEarlyRes = C <= 4;
    float4 xv[C], rv[C];
    float g[C][4];
#pragma unroll
    for (int j = 0; j < C; ++j) {
      const int c = lane + 32 * j;
      if (c < nc) {
        xv[j] = xr[c];
        if (gy != nullptr) {
          load4(gr + 4 * c, g[j]);
        } else {
          g[j][0] = g[j][1] = g[j][2] = g[j][3] = 0.f;
        }
        if (kEarlyRes && gres != nullptr) rv[j] = rr[c];
      }
    }
    // The norm's other consumers (the MoE layer's): a second bf16 copy and the router's
    // logits, whose gradient reaches the norm as glogits[row] wg; all summed here in fp32.
    if (gy2 != nullptr || glogits != nullptr) {
#pragma unroll
      for (int j = 0; j < C; ++j) {
        const int c = lane + 32 * j;
        if (c < nc) {
          if (gy2 != nullptr) {
            float g2[4];
            load4(gy2 + row * d + 4 * c, g2);
#pragma unroll
            for (int i = 0; i < 4; ++i) g[j][i] += g2[i];
          }
          for (int e = 0; e < e_n; ++e) {
            const float ge = glogits[row * e_n + e];
            const float4 g4 = reinterpret_cast<const float4 *>(wg + static_cast<int64_t>(e) * d)[c];
            g[j][0] += ge * g4.x, g[j][1] += ge * g4.y, g[j][2] += ge * g4.z, g[j][3] += ge * g4.w;
          }
        }
      }
    }
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < C; ++j) {
      const int c = lane + 32 * j;
      if (c < nc) {
        const float4 wv = wr[c];
        const float xh[4] = {xv[j].x * r, xv[j].y * r, xv[j].z * r, xv[j].w * r};
        const float wv4[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          acc[j][i] += g[j][i] * xh[i];
          dot += (wv4[i] * g[j][i]) * xh[i];
        }
      }
    }
    const float m = warp_sum(dot) * inv_d;
    float4 *dxr = reinterpret_cast<float4 *>(dx + row * d);
#pragma unroll
    for (int j = 0; j < C; ++j) {
      const int c = lane + 32 * j;
      if (c < nc) {
        const float4 x4 = xv[j], wv = wr[c];
        float4 o = make_float4(r * (wv.x * g[j][0] - (x4.x * r) * m),
                               r * (wv.y * g[j][1] - (x4.y * r) * m),
                               r * (wv.z * g[j][2] - (x4.z * r) * m),
                               r * (wv.w * g[j][3] - (x4.w * r) * m));
        // The fused residual add: x's other use (the residual stream) brings gres, and the
        // bf16 addend's gradient is the total cast to bf16 (the type-promotion backward).
        if (gres != nullptr) {
          const float4 r4 = kEarlyRes ? rv[j] : rr[c];
          o.x += r4.x, o.y += r4.y, o.z += r4.z, o.w += r4.w;
        }
        dxr[c] = o;
        if (da != nullptr) store4(da + row * d + 4 * c, o.x, o.y, o.z, o.w);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < C; ++j) {
    const int c = lane + 32 * j;
    if (c < nc) {
#pragma unroll
      for (int i = 0; i < 4; ++i) red[warp][4 * c + i] = acc[j][i];
    }
  }
  __syncthreads();
  for (int col = threadIdx.x; col < d; col += blockDim.x) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kRowsPerBlock; ++k) s += red[k][col];
    dw_part[static_cast<int64_t>(blockIdx.x) * d + col] = s;
  }
}

// dw[col] = sum over parts of dw_part[part, col]: a block per 32 columns, 8 slices of parts.
__global__ void rms_norm_dw_kernel(const float *__restrict__ dw_part, float *__restrict__ dw,
                                   int64_t parts, int d) {
  __shared__ float red[8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (col < d) {
    for (int64_t p = threadIdx.y; p < parts; p += 8) s += dw_part[p * d + col];
  }
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < d) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) t += red[k][threadIdx.x];
    dw[col] = t;
  }
}

// dwg_part[p, e, col] = sum over part p's rows of glogits[row, e] * n[row, col], with the norm's
// fp32 output n = w * (h * rstd) recomputed (the values the forward's logits were taken from): the
// router's weight gradient per part, summed over parts by rms_norm_dw_kernel (no atomics). One
// thread per 4 columns (d <= 4 * blockDim), rows_per_part rows a block.
__global__ void router_dw_kernel(const float *__restrict__ h, const float *__restrict__ w,
                                 const float *__restrict__ rstd, const float *__restrict__ glogits,
                                 float *__restrict__ dwg_part, int64_t n, int d, int e_n,
                                 int64_t rows_per_part) {
  const int c = threadIdx.x, nc = d / 4;
  if (c >= nc) return;
  float acc[mm::kRouterMaxExperts][4];
#pragma unroll
  for (int e = 0; e < mm::kRouterMaxExperts; ++e) acc[e][0] = acc[e][1] = acc[e][2] = acc[e][3] = 0.f;
  const float4 wv = reinterpret_cast<const float4 *>(w)[c];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_part;
  const int64_t r1 = r0 + rows_per_part < n ? r0 + rows_per_part : n;
#pragma unroll 4
  for (int64_t row = r0; row < r1; ++row) {
    const float r = rstd[row];
    const float4 hv = reinterpret_cast<const float4 *>(h + row * d)[c];
    const float nv[4] = {wv.x * (hv.x * r), wv.y * (hv.y * r), wv.z * (hv.z * r),
                         wv.w * (hv.w * r)};
#pragma unroll
    for (int e = 0; e < mm::kRouterMaxExperts; ++e) {
      if (e < e_n) {
        const float ge = glogits[row * e_n + e];
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[e][i] += ge * nv[i];
      }
    }
  }
#pragma unroll
  for (int e = 0; e < mm::kRouterMaxExperts; ++e) {
    if (e < e_n) {
      reinterpret_cast<float4 *>(dwg_part + (static_cast<int64_t>(blockIdx.x) * e_n + e) * d)[c] =
          make_float4(acc[e][0], acc[e][1], acc[e][2], acc[e][3]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// MoE: the rows of the (token, slot) pairs sorted by expert back per token. slot [N k] (int64) is
// the sorted row of pair t k + s (a permutation of 0 .. N k). One warp per token, each lane 8
// columns at a time.

// out[t] = bf16(sum_s w[t, s] g[slot[t k + s]]) (w fp32 [N, k], or null: weights 1), summed in
// fp32 in slot order, one rounding.
__global__ void slot_sum_kernel(const bf16 *__restrict__ g, const int64_t *__restrict__ slot,
                                const float *__restrict__ w, bf16 *__restrict__ out, int64_t n,
                                int k, int d) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp;
  if (t >= n) return;
  for (int c = 8 * lane; c < d; c += 8 * 32) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < k; ++s) {
      const int64_t q = t * k + s;
      const float ws = w != nullptr ? w[q] : 1.f;
      float v[8];
      load8(g + slot[q] * d + c, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += ws * v[i];
    }
    store8(out + t * d + c, acc);
  }
}

// The backward of slot_sum_kernel with weights: dg[slot[t k + s]] = bf16(w[t, s] dy[t]) and
// dw[t, s] = sum_c g[slot[t k + s], c] dy[t, c] (fp32).
__global__ void slot_sum_bwd_kernel(const bf16 *__restrict__ dy, const bf16 *__restrict__ g,
                                    const int64_t *__restrict__ slot, const float *__restrict__ w,
                                    bf16 *__restrict__ dg, float *__restrict__ dw, int64_t n,
                                    int k, int d) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp;
  if (t >= n) return;
  for (int s = 0; s < k; ++s) {
    const int64_t q = t * k + s, r = slot[q];
    const float ws = w[q];
    float dot = 0.f;
    for (int c = 8 * lane; c < d; c += 8 * 32) {
      float gy[8], v[8], o[8];
      load8(dy + t * d + c, gy);
      load8(g + r * d + c, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        dot += v[i] * gy[i];
        o[i] = ws * gy[i];
      }
      store8(dg + r * d + c, o);
    }
    dot = warp_sum(dot);
    if (lane == 0) dw[q] = dot;
  }
}

// ---------------------------------------------------------------------------------------------
// RoPE + repeat_kv: [B, T, nh, hd] -> [B, T, nh*n_rep, hd] (attention takes its transpose, a
// view: SDPA then writes its output, and its gradients, in this layout too, so the output's
// transpose back to [B, T, d] is free). One thread per 8 elements of the
// first half of a head (and the matching 8 of the second half): item = ((b*T + t)*nh + h)*nq + q.

// The 8 elements a thread of the head kernels owns: batch b, position t, head h, first element
// i = 8q of its slice, from item = ((b*T + t)*nh + h)*nq + q. False past the last item.
struct HeadItem {
  int64_t b, t, h, i;
};

__device__ __forceinline__ bool head_item(int64_t b_n, int64_t t_n, int64_t nh, int64_t nq,
                                          HeadItem &it) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= b_n * t_n * nh * nq) return false;
  it.i = (item % nq) * 8;
  int64_t rest = item / nq;
  it.h = rest % nh;
  rest /= nh;
  it.t = rest % t_n;
  it.b = rest / t_n;
  return true;
}

// Where copy r of head h at (b, t) starts in the repeated [B, T, nh*n_rep, hd] layout.
__device__ __forceinline__ int64_t repeated_head(int64_t b, int64_t t, int64_t h, int64_t r,
                                                 int64_t t_n, int64_t nh, int64_t hd,
                                                 int64_t n_rep) {
  return ((b * t_n + t) * (nh * n_rep) + h * n_rep + r) * hd;
}

__global__ void rope_fwd_kernel(const bf16 *__restrict__ x, int64_t sb, int64_t st, int64_t sh,
                                const float *__restrict__ cos, const float *__restrict__ sin,
                                bf16 *__restrict__ y, int64_t b_n, int64_t t_n, int64_t nh,
                                int64_t hd, int64_t n_rep) {
  const int64_t half = hd / 2, nq = half / 8;
  HeadItem it;
  if (!head_item(b_n, t_n, nh, nq, it)) return;
  const int64_t b = it.b, t = it.t, h = it.h, i = it.i;
  const bf16 *xp = x + b * sb + t * st + h * sh;
  float x1[8], x2[8], c1[8], c2[8], s1[8], s2[8], y1[8], y2[8];
  load8(xp + i, x1);
  load8(xp + half + i, x2);
  load8f(cos + t * hd + i, c1);
  load8f(cos + t * hd + half + i, c2);
  load8f(sin + t * hd + i, s1);
  load8f(sin + t * hd + half + i, s2);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    // x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]: each product and the sum
    // rounded to fp32 separately, as libtorch's unfused ops do.
    y1[k] = __fadd_rn(__fmul_rn(x1[k], c1[k]), __fmul_rn(-x2[k], s1[k]));
    y2[k] = __fadd_rn(__fmul_rn(x2[k], c2[k]), __fmul_rn(x1[k], s2[k]));
  }
  for (int64_t r = 0; r < n_rep; ++r) {
    bf16 *yp = y + repeated_head(b, t, h, r, t_n, nh, hd, n_rep);
    store8(yp + i, y1);
    store8(yp + half + i, y2);
  }
}

// The copy variant (v): 8 elements of a head per thread, item = ((b*T + t)*nh + h)*nq + q.
__global__ void heads_copy_kernel(const bf16 *__restrict__ x, int64_t sb, int64_t st, int64_t sh,
                                  bf16 *__restrict__ y, int64_t b_n, int64_t t_n, int64_t nh,
                                  int64_t hd, int64_t n_rep) {
  const int64_t nq = hd / 8;
  HeadItem it;
  if (!head_item(b_n, t_n, nh, nq, it)) return;
  const int64_t b = it.b, t = it.t, h = it.h, i = it.i;
  const uint4 v = *reinterpret_cast<const uint4 *>(x + b * sb + t * st + h * sh + i);
  for (int64_t r = 0; r < n_rep; ++r) {
    *reinterpret_cast<uint4 *>(y + repeated_head(b, t, h, r, t_n, nh, hd, n_rep) + i) = v;
  }
}

// Backward: s = sum over the n_rep copies (fp32); y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 give
// dx1 = s1 c1 + s2 sin2, dx2 = s2 c2 - s1 sin1.
__global__ void rope_bwd_kernel(const bf16 *__restrict__ gy, const float *__restrict__ cos,
                                const float *__restrict__ sin, bf16 *__restrict__ dx, int64_t ld,
                                int64_t b_n, int64_t t_n, int64_t nh, int64_t hd, int64_t n_rep) {
  const int64_t half = hd / 2, nq = half / 8;
  HeadItem it;
  if (!head_item(b_n, t_n, nh, nq, it)) return;
  const int64_t b = it.b, t = it.t, h = it.h, i = it.i;
  float g1[8] = {0, 0, 0, 0, 0, 0, 0, 0}, g2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t r = 0; r < n_rep; ++r) {
    const bf16 *gp = gy + repeated_head(b, t, h, r, t_n, nh, hd, n_rep);
    float a[8], c[8];
    load8(gp + i, a);
    load8(gp + half + i, c);
#pragma unroll
    for (int k = 0; k < 8; ++k) g1[k] += a[k], g2[k] += c[k];
  }
  float c1[8], c2[8], s1[8], s2[8], d1[8], d2[8];
  load8f(cos + t * hd + i, c1);
  load8f(cos + t * hd + half + i, c2);
  load8f(sin + t * hd + i, s1);
  load8f(sin + t * hd + half + i, s2);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    d1[k] = g1[k] * c1[k] + g2[k] * s2[k];
    d2[k] = g2[k] * c2[k] - g1[k] * s1[k];
  }
  bf16 *dp = dx + (b * t_n + t) * ld + h * hd;
  store8(dp + i, d1);
  store8(dp + half + i, d2);
}

__global__ void heads_sum_kernel(const bf16 *__restrict__ gy, bf16 *__restrict__ dx, int64_t ld,
                                 int64_t b_n, int64_t t_n, int64_t nh, int64_t hd, int64_t n_rep) {
  const int64_t nq = hd / 8;
  HeadItem it;
  if (!head_item(b_n, t_n, nh, nq, it)) return;
  const int64_t b = it.b, t = it.t, h = it.h, i = it.i;
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t r = 0; r < n_rep; ++r) {
    float a[8];
    load8(gy + repeated_head(b, t, h, r, t_n, nh, hd, n_rep) + i, a);
#pragma unroll
    for (int k = 0; k < 8; ++k) s[k] += a[k];
  }
  store8(dx + (b * t_n + t) * ld + h * hd + i, s);
}

// ---------------------------------------------------------------------------------------------
// SwiGLU over gu = [g | u] rows; one thread per 8 columns of F.

__device__ __forceinline__ float silu_bf16(float g) {
  // libtorch's silu: x / (1 + exp(-x)) in fp32, rounded to the bf16 output.
  return round_bf16(g / (1.f + expf(-g)));
}

__global__ void swiglu_fwd_kernel(const bf16 *__restrict__ gu, bf16 *__restrict__ h, int64_t n,
                                  int64_t f) {
  const int64_t nq = f / 8;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= n * nq) return;
  const int64_t row = item / nq, i = (item % nq) * 8;
  float g[8], u[8], o[8];
  load8(gu + row * 2 * f + i, g);
  load8(gu + row * 2 * f + f + i, u);
#pragma unroll
  for (int k = 0; k < 8; ++k) o[k] = silu_bf16(g[k]) * u[k];
  store8(h + row * f + i, o);
}

__global__ void swiglu_bwd_kernel(const bf16 *__restrict__ gu, const bf16 *__restrict__ dh,
                                  bf16 *__restrict__ dgu, int64_t n, int64_t f) {
  const int64_t nq = f / 8;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= n * nq) return;
  const int64_t row = item / nq, i = (item % nq) * 8;
  float g[8], u[8], d[8], dg[8], du[8];
  load8(gu + row * 2 * f + i, g);
  load8(gu + row * 2 * f + f + i, u);
  load8(dh + row * f + i, d);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float s = silu_bf16(g[k]);
    du[k] = d[k] * s;                 // mul's backward: bf16(dh * s)
    const float ds = round_bf16(d[k] * u[k]);  // bf16(dh * u)
    // libtorch's silu_backward: dy * sig * (1 + x * (1 - sig)).
    const float sig = 1.f / (1.f + expf(-g[k]));
    dg[k] = ds * sig * (1.f + g[k] * (1.f - sig));
  }
  store8(dgu + row * 2 * f + i, dg);
  store8(dgu + row * 2 * f + f + i, du);
}

int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (cached[dev] == 0) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        sms <= 0) {
      sms = 132;
    }
    cached[dev] = sms;
  }
  return cached[dev];
}

constexpr int kThreads = 256;

// ---------------------------------------------------------------------------------------------
// acc (fp32) += g (bf16), 8 elements a thread: a bf16 gradient accumulated into an fp32 `.grad`
// in one pass (libtorch's mixed-dtype add_ takes its unvectorized path with a cast per element).

__global__ void add_bf16_kernel(float *__restrict__ acc, const bf16 *__restrict__ g, int64_t n8) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n8) return;
  float a[8], b[8];
  load8f(acc + 8 * i, a);
  load8(g + 8 * i, b);
  float4 *out = reinterpret_cast<float4 *>(acc + 8 * i);
  out[0] = make_float4(a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]);
  out[1] = make_float4(a[4] + b[4], a[5] + b[5], a[6] + b[6], a[7] + b[7]);
}

}  // namespace

namespace mm {

const char *rms_norm_fwd(const float *x, const void *a, const float *w, void *y, float *h_out,
                         float *rstd, int64_t n, int64_t d, float eps, cudaStream_t stream) {
  return rms_norm_router_fwd(x, a, w, y, nullptr, h_out, rstd, nullptr, nullptr, 0, n, d, eps,
                             stream);
}

const char *rms_norm_router_fwd(const float *x, const void *a, const float *w, void *y, void *y2,
                                float *h_out, float *rstd, const float *wg, float *logits,
                                int64_t e_n, int64_t n, int64_t d, float eps,
                                cudaStream_t stream) {
  if (n == 0) return nullptr;
  const unsigned blocks = blocks_for(n, kRowsPerBlock), threads = 32 * kRowsPerBlock;
  bf16 *yp = static_cast<bf16 *>(y), *y2p = static_cast<bf16 *>(y2);
  const bf16 *ap = static_cast<const bf16 *>(a);
  const int e = static_cast<int>(e_n);
  if (d <= 512) {
    rms_norm_fwd_kernel<4><<<blocks, threads, 0, stream>>>(x, ap, w, yp, y2p, h_out, rstd, wg,
                                                          logits, e, n, int(d), eps);
  } else {
    rms_norm_fwd_kernel<8><<<blocks, threads, 0, stream>>>(x, ap, w, yp, y2p, h_out, rstd, wg,
                                                          logits, e, n, int(d), eps);
  }
  return launched();
}

int64_t rms_norm_bwd_parts(int64_t n) {
  const int64_t by_rows = (n + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t by_sms = 4 * static_cast<int64_t>(sm_count());
  const int64_t p = by_rows < by_sms ? by_rows : by_sms;
  return p > 0 ? p : 1;
}

const char *rms_norm_bwd(const float *x, const float *w, const float *rstd, const void *gy,
                         const float *gres, float *dx, void *da, float *dw_part, float *dw,
                         int64_t n, int64_t d, int64_t parts, cudaStream_t stream) {
  return rms_norm_router_bwd(x, w, rstd, gy, nullptr, nullptr, nullptr, 0, gres, dx, da, dw_part,
                             dw, nullptr, nullptr, n, d, parts, stream);
}

int64_t router_dw_parts(int64_t n) {
  const int64_t p = (n + 31) / 32;
  return p > 0 ? p : 1;
}

const char *rms_norm_router_bwd(const float *x, const float *w, const float *rstd, const void *gy,
                                const void *gy2, const float *glogits, const float *wg,
                                int64_t e_n, const float *gres, float *dx, void *da,
                                float *dw_part, float *dw, float *dwg_part, float *dwg, int64_t n,
                                int64_t d, int64_t parts, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(parts), threads = 32 * kRowsPerBlock;
  const bf16 *gp = static_cast<const bf16 *>(gy), *g2p = static_cast<const bf16 *>(gy2);
  bf16 *dap = static_cast<bf16 *>(da);
  const int e = glogits != nullptr ? static_cast<int>(e_n) : 0;
  if (d <= 512) {
    rms_norm_bwd_kernel<4><<<blocks, threads, 0, stream>>>(x, w, rstd, gp, g2p, glogits, wg, e,
                                                          gres, dx, dap, dw_part, n, int(d));
  } else {
    rms_norm_bwd_kernel<8><<<blocks, threads, 0, stream>>>(x, w, rstd, gp, g2p, glogits, wg, e,
                                                          gres, dx, dap, dw_part, n, int(d));
  }
  if (const char *err = launched()) return err;
  rms_norm_dw_kernel<<<blocks_for(d, 32), dim3(32, 8), 0, stream>>>(dw_part, dw, parts,
                                                                   static_cast<int>(d));
  if (const char *err = launched()) return err;
  if (dwg != nullptr) {
    if (e > 0) {
      const int64_t rparts = router_dw_parts(n), rows = (n + rparts - 1) / rparts;
      router_dw_kernel<<<static_cast<unsigned>(rparts), 256, 0, stream>>>(
          x, w, rstd, glogits, dwg_part, n, int(d), e, rows);
      if (const char *err = launched()) return err;
      rms_norm_dw_kernel<<<blocks_for(e_n * d, 32), dim3(32, 8), 0, stream>>>(
          dwg_part, dwg, rparts, static_cast<int>(e_n * d));
    } else {
      cudaMemsetAsync(dwg, 0, sizeof(float) * e_n * d, stream);
    }
  }
  return launched();
}

const char *slot_sum(const void *g, const int64_t *slot, const float *w, void *out, int64_t n,
                     int64_t k, int64_t d, cudaStream_t stream) {
  if (n == 0) return nullptr;
  slot_sum_kernel<<<blocks_for(n, kRowsPerBlock), 32 * kRowsPerBlock, 0, stream>>>(
      static_cast<const bf16 *>(g), slot, w, static_cast<bf16 *>(out), n, static_cast<int>(k),
      static_cast<int>(d));
  return launched();
}

const char *slot_sum_bwd(const void *dy, const void *g, const int64_t *slot, const float *w,
                         void *dg, float *dw, int64_t n, int64_t k, int64_t d,
                         cudaStream_t stream) {
  if (n == 0) return nullptr;
  slot_sum_bwd_kernel<<<blocks_for(n, kRowsPerBlock), 32 * kRowsPerBlock, 0, stream>>>(
      static_cast<const bf16 *>(dy), static_cast<const bf16 *>(g), slot, w,
      static_cast<bf16 *>(dg), dw, n, static_cast<int>(k), static_cast<int>(d));
  return launched();
}

const char *rope_fwd(const void *x, int64_t sb, int64_t st, int64_t sh, const float *cos,
                     const float *sin, void *y, int64_t b, int64_t t, int64_t nh, int64_t hd,
                     int64_t n_rep, bool rotate, cudaStream_t stream) {
  const int64_t items = b * t * nh * (rotate ? hd / 16 : hd / 8);
  if (items == 0) return nullptr;
  const bf16 *xp = static_cast<const bf16 *>(x);
  bf16 *yp = static_cast<bf16 *>(y);
  if (rotate) {
    rope_fwd_kernel<<<blocks_for(items, kThreads), kThreads, 0, stream>>>(
        xp, sb, st, sh, cos, sin, yp, b, t, nh, hd, n_rep);
  } else {
    heads_copy_kernel<<<blocks_for(items, kThreads), kThreads, 0, stream>>>(xp, sb, st, sh, yp,
                                                                           b, t, nh, hd, n_rep);
  }
  return launched();
}

const char *rope_bwd(const void *gy, const float *cos, const float *sin, void *dx, int64_t ld,
                     int64_t b, int64_t t, int64_t nh, int64_t hd, int64_t n_rep, bool rotate,
                     cudaStream_t stream) {
  const int64_t items = b * t * nh * (rotate ? hd / 16 : hd / 8);
  if (items == 0) return nullptr;
  const bf16 *gp = static_cast<const bf16 *>(gy);
  bf16 *dp = static_cast<bf16 *>(dx);
  if (rotate) {
    rope_bwd_kernel<<<blocks_for(items, kThreads), kThreads, 0, stream>>>(gp, cos, sin, dp, ld, b,
                                                                         t, nh, hd, n_rep);
  } else {
    heads_sum_kernel<<<blocks_for(items, kThreads), kThreads, 0, stream>>>(gp, dp, ld, b, t, nh,
                                                                          hd, n_rep);
  }
  return launched();
}

const char *swiglu_fwd(const void *gu, void *h, int64_t n, int64_t f, cudaStream_t stream) {
  const int64_t items = n * (f / 8);
  if (items == 0) return nullptr;
  swiglu_fwd_kernel<<<blocks_for(items, kThreads), kThreads, 0, stream>>>(
      static_cast<const bf16 *>(gu), static_cast<bf16 *>(h), n, f);
  return launched();
}

const char *swiglu_bwd(const void *gu, const void *dh, void *dgu, int64_t n, int64_t f,
                       cudaStream_t stream) {
  const int64_t items = n * (f / 8);
  if (items == 0) return nullptr;
  swiglu_bwd_kernel<<<blocks_for(items, kThreads), kThreads, 0, stream>>>(
      static_cast<const bf16 *>(gu), static_cast<const bf16 *>(dh), static_cast<bf16 *>(dgu), n,
      f);
  return launched();
}

const char *add_bf16(float *acc, const void *g, int64_t n, cudaStream_t stream) {
  if (n == 0) return nullptr;
  const int64_t n8 = n / 8;
  add_bf16_kernel<<<blocks_for(n8, kThreads), kThreads, 0, stream>>>(
      acc, static_cast<const bf16 *>(g), n8);
  return launched();
}

}  // namespace mm

// Fused cross-entropy forward + backward over bf16 logits, for the chunked lm_head of the bf16
// training step (fast/src/train/head.rs). One block per row: read the bf16 row, reduce its max and its
// sum of exp in fp32, write the row's loss to an fp32 [n] buffer and overwrite the row, in place,
// with the bf16 gradient of `seed * sum of losses`. This replaces libtorch's fp32 copy of the
// logits, log_softmax forward and backward, nll_loss forward and backward and their fp32
// temporaries.
//
// The math follows libtorch's own kernels (log_softmax's forward epilogue and backward, nll_loss's
// backward), in fp32 with IEEE expf/logf (compiled without --use_fast_math, as kernels.cu):
//   m = max_j x_j, s = sum_j exp(x_j - m), logsum = log(s), o_j = (x_j - m) - logsum
//   loss = -o_label
//   grad_j = seed * exp(o_j) - (j == label ? seed : 0), rounded once to bf16
// which is what autograd computes for `(cross_entropy(x.float(), label, sum) * seed).backward()`
// and then casts to bf16; only the order of the fp32 sums differs.
//
// Rows whose label is -100 (ignore_index) have loss 0 and gradient 0. So do rows whose label lies
// outside [0, V) (libtorch would raise a device-side assert there; a kernel here cannot report it
// without a host synchronisation, so it drops the row instead). Launched on the caller's stream.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

#include "kernels.h"

namespace {

using bf16 = __nv_bfloat16;

constexpr int kCeThreads = 256;
constexpr int kCeWarps = kCeThreads / 32;

__device__ __forceinline__ float ce_warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float ce_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The block's max (kMax) or sum of v, returned to every thread. `red` holds kCeWarps floats; the
// trailing __syncthreads lets the caller reuse it.
template <bool kMax>
__device__ __forceinline__ float ce_block_reduce(float v, float *red) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  v = kMax ? ce_warp_max(v) : ce_warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
#pragma unroll
  for (int w = 1; w < kCeWarps; ++w) r = kMax ? fmaxf(r, red[w]) : r + red[w];
  __syncthreads();
  return r;
}

// kVec = 8: the row is read and written 8 bf16 (16 bytes) at a time (V % 8 == 0, 16-byte aligned
// rows); kVec = 1: one element at a time (any V).
template <int kVec>
__global__ void __launch_bounds__(kCeThreads)
    ce_fwd_bwd_kernel(bf16 *__restrict__ logits, const int64_t *__restrict__ labels,
                      const float *__restrict__ seed_p, float *__restrict__ row_loss, int64_t v) {
  __shared__ float red[kCeWarps];
  const int64_t row = blockIdx.x;
  bf16 *x = logits + row * v;
  const int64_t label = labels[row];
  const int64_t nvec = v / kVec;
  if (label < 0 || label >= v) {
    // Ignored (-100) or out of range: no loss, zero gradient.
    if (threadIdx.x == 0) row_loss[row] = 0.f;
    for (int64_t i = threadIdx.x; i < nvec; i += kCeThreads) {
      if (kVec == 8) {
        reinterpret_cast<uint4 *>(x)[i] = make_uint4(0u, 0u, 0u, 0u);
      } else {
        x[i] = __float2bfloat16_rn(0.f);
      }
    }
    return;
  }
  // Pass 1: max.
  float m = -CUDART_INF_F;
  for (int64_t i = threadIdx.x; i < nvec; i += kCeThreads) {
    if (kVec == 8) {
      const uint4 raw = reinterpret_cast<const uint4 *>(x)[i];
      const bf16 *h = reinterpret_cast<const bf16 *>(&raw);
#pragma unroll
      for (int k = 0; k < 8; ++k) m = fmaxf(m, __bfloat162float(h[k]));
    } else {
      m = fmaxf(m, __bfloat162float(x[i]));
    }
  }
  m = ce_block_reduce<true>(m, red);
  // Pass 2: sum of exp(x - m) (the row is in L1/L2 by now).
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < nvec; i += kCeThreads) {
    if (kVec == 8) {
      const uint4 raw = reinterpret_cast<const uint4 *>(x)[i];
      const bf16 *h = reinterpret_cast<const bf16 *>(&raw);
#pragma unroll
      for (int k = 0; k < 8; ++k) s += expf(__bfloat162float(h[k]) - m);
    } else {
      s += expf(__bfloat162float(x[i]) - m);
    }
  }
  s = ce_block_reduce<false>(s, red);
  const float logsum = logf(s);
  const float seed = *seed_p;
  // The loss reads x[label] before pass 3 overwrites it; the barrier orders the read before
  // every thread's writes.
  if (threadIdx.x == 0) row_loss[row] = -((__bfloat162float(x[label]) - m) - logsum);
  __syncthreads();
  // Pass 3: the gradient, in place.
  for (int64_t i = threadIdx.x; i < nvec; i += kCeThreads) {
    if (kVec == 8) {
      uint4 raw = reinterpret_cast<const uint4 *>(x)[i];
      bf16 *h = reinterpret_cast<bf16 *>(&raw);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int64_t j = i * 8 + k;
        const float p = expf((__bfloat162float(h[k]) - m) - logsum);
        const float g = __fmul_rn(p, seed);
        h[k] = __float2bfloat16_rn(j == label ? __fsub_rn(g, seed) : g);
      }
      reinterpret_cast<uint4 *>(x)[i] = raw;
    } else {
      const float p = expf((__bfloat162float(x[i]) - m) - logsum);
      const float g = __fmul_rn(p, seed);
      x[i] = __float2bfloat16_rn(i == label ? __fsub_rn(g, seed) : g);
    }
  }
}

}  // namespace

namespace mm {

const char *ce_fwd_bwd(void *logits, const int64_t *labels, const float *seed, float *row_loss,
                       int64_t n, int64_t v, cudaStream_t stream) {
  if (n == 0 || v == 0) return nullptr;
  bf16 *x = static_cast<bf16 *>(logits);
  const bool vec = v % 8 == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0;
  const unsigned blocks = static_cast<unsigned>(n);
  if (vec) {
    ce_fwd_bwd_kernel<8><<<blocks, kCeThreads, 0, stream>>>(x, labels, seed, row_loss, v);
  } else {
    ce_fwd_bwd_kernel<1><<<blocks, kCeThreads, 0, stream>>>(x, labels, seed, row_loss, v);
  }
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace mm

// Grouped-query attention for short rows, straight from the merged q/k/v projection
// qkv [B, T, (H + 2 KV) hd]: kv heads are read once per group (no repeat_kv copies), and the
// backward writes the merged projection's gradient itself, RoPE undone on dq and dk as they are
// stored, with no fp32 dQ pass. bf16 in and out, fp32 softmax and accumulators, tensor cores
// through mma.sync m16n8k16 (bf16 -> fp32) with ldmatrix operands, tiles copied by cp.async one
// step ahead of the math (double buffers). Flash attention's algorithm (online softmax forward,
// the logsumexp kept for backward; Dao, 2023).
//
// Compile-time variants (every kernel is a template over both, so no variant pays for another's
// masks at run time):
// - head dim HD 64, 80, 96 or 128: tiles are 64 rows (queries or keys) by HD columns;
// - mask MODE: causal (key j visible to query i iff j <= i); segments (iff seg_start[i] <= j <=
//   i, seg_start [B, T] int32 the row index of the first token of each token's segment, and RoPE
//   positions t - seg_start[t], restarting at every segment); bidirectional (every key 0 .. T-1,
//   positions t).
// Optionally (a run-time choice of the first pass and one extra backward pass, not of the
// attention kernels) q/k RMSNorm over head_dim before RoPE, MiniMind-3's q_norm / k_norm.
//
// - rope_heads: q and k (normalised first with qk-norm, saving rstd [B, T, H + KV]) RoPE'd once
//   into head-major qr [B, H, T, hd], kr [B, KV, T, hd] (bf16, saved for backward), so every
//   tile copied later is one piece.
// - forward: one block per (64-query tile, head, batch); 4 warps of 16 query rows; key/value
//   tiles of 64 over the visible range. Writes o [B, T, H, hd] (bf16) and lse [B, H, T] (fp32,
//   in base-2 units of the scaled scores: log2(sum exp2(s * scale * log2 e))).
// - backward, kernel 1 (dQ): one block per (query tile, head, batch). Computes
//   delta = rowsum(dO * O) for its rows (written for kernel 2), then over the visible key tiles:
//   S = Q K^T, P = exp2(S' - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K.
// - backward, kernel 2 (dK, dV): one block per (key tile, kv head, batch); 4 warps of 16 key
//   rows; over the group's query heads and the query tiles that see the key tile, with
//   S^T = K Q^T: dV += P^T dO, dP^T = V dO^T, dK += dS^T Q. No atomics: every gradient element
//   has one writer. Both backward kernels recompute S and P (7 matmuls of a tile pair in all,
//   against 5 with atomics on dQ).
// - backward with qk-norm: qk_norm_bwd turns the q and k columns of dqkv (the gradient of the
//   normalised, pre-RoPE q and k) into the gradient of the projection, in place, and writes
//   per-block partial sums of g * xhat; qk_norm_dw sums them in a fixed order (deterministic).
//
// Visible ranges: causal, query tile qt sees key tiles 0 .. qt; segments, from the tile of the
// query tile's smallest seg_start (its first row's: seg_start is non-decreasing within a row)
// to qt, and a warp skips a tile wholly before its own first row's segment; bidirectional, all.
// Kernel 2 mirrors it: key tile kt is seen by query tiles kt .. (causal), by the prefix of those
// whose first query's segment starts at or before the key tile's last key (segments), by all
// (bidirectional). Elementwise masks only on the diagonal tile (causal), on tiles some query's
// segment start falls past the tile's first key (segments), and on the last key tile past T
// (bidirectional). On a diagonal or last tile a warp skips the 16-column blocks that lie wholly
// past its rows or past T (or before its keys), and a warp whose rows are all past T only helps
// copy. Rows past T are zero-filled and never written. Measured and not kept (one H200): a warp
// also skipping the 16-key blocks before its first row's segment (and in kernel 2 the 16-query
// blocks whose segments start past its keys) made the 26M packed-docs b128 step slower, 22.0 /
// 22.2 against 21.6 / 21.6 ms in one call: the kernels are latency-bound at these lengths (ncu:
// 0.2-0.4 instructions issued per scheduler per cycle), and the (lo, hi) variants cost more than
// the skipped mma. The same skips as warp-uniform run-time branches around one copy of the code
// were slower still (22.8 against 21.2 ms, one call): the branches break the interleaving of the
// ldmatrix and mma chains.
//
// Rounding: q and k are normalised and RoPE'd in fp32 from the bf16 projection and rounded to
// bf16 once (as the qkv_heads kernel does), P and dS are rounded to bf16 for their matmuls (as
// every flash attention does), accumulators are fp32. With qk-norm the gradient of the
// normalised q and k is rounded to bf16 (in dqkv) before the norm's backward.
//
// seg_start is not validated on the device (that would need a host synchronisation): each value
// is clamped to [0, t] where it is read, so a bad table gives wrong numbers, never a wild read.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace {

using bf16 = __nv_bfloat16;

constexpr int kTile = 64;  // rows of a query or key tile
constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

constexpr int kCausal = mm::kAttnCausal;
constexpr int kSegments = mm::kAttnSegments;
constexpr int kBidirectional = mm::kAttnBidirectional;

// One 64-row tile of one head in shared memory, rows HD + 8 elements apart: (HD + 8) * 2 bytes
// is 16 (HD 64, 128), 48 (HD 80) or 80 (HD 96) mod 128, so the 8 rows one ldmatrix reads hit
// distinct 16-byte bank groups.
template <int HD>
struct Tile {
  bf16 r[kTile][HD + 8];
};

// Blocks an SM each kernel is compiled for (registers: 65536 / (128 x blocks)), as their shared
// memory allows past head dim 64: forward 3, 3 and 2 at 80, 96 and 128, backward 2. At head dim
// 64 the forward reads Q from shared memory per k-step (kFwdQInSmem) and fits 4 blocks (128
// registers), and the dQ kernel takes 3 blocks (168 registers, no spills) rather than 4 (128,
// spilling). Measured on one H200, 26M packed-docs b128 step, same call: 21.02 ms against 21.27
// with the forward at 3 blocks (Q in registers) and dQ at 4; dK/dV at 4 blocks (128 registers,
// spilling) was slower, 21.53.
template <int HD>
constexpr int kFwdBlocks = HD == 64 ? 4 : HD <= 96 ? 3 : 2;
template <int HD>
constexpr bool kFwdQInSmem = HD == 64;
template <int HD>
constexpr int kDqBlocks = HD == 64 ? 3 : 2;
template <int HD>
constexpr int kDkvBlocks = HD == 64 ? 3 : 2;

// Threads per head vector in rope_heads and qk_norm_bwd (a power of two, 8 elements of each half
// a thread; for HD 80 and 96 three and two of the 8 only take part in the norm's reduction).
constexpr int head_lanes(int64_t hd) { return hd / 16 <= 4 ? 4 : 8; }
template <int HD>
constexpr int kHeadLanes = head_lanes(HD);

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(const void *p, uint32_t r[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm_x4_t(const void *p, uint32_t r[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// 16 bytes global -> shared without a register round trip; src_bytes 0 writes zeros.
__device__ __forceinline__ void cp_async16(void *dst, const void *src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// d[4] += a[4] (16x16, row) * b0,b1 (16x8, col): one m16n8k16 bf16 mma with fp32 accumulators.
__device__ __forceinline__ void mma(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}

// Fragment layouts (PTX ISA, mma.m16n8k16; lane l, g = l / 4, c = 2 (l % 4)):
//   C/D 16x8: {0,1} at (g, c..c+1), {2,3} at (g + 8, c..c+1).
//   A 16x16:  a0 (g, c), a1 (g + 8, c), a2 (g, c + 8), a3 (g + 8, c + 8), two bf16 each.
//   B 16x8:   b0 (k = c..c+1, n = g), b1 (k = c + 8.., n = g).
// So the C fragments of two neighbouring n-tiles are the A fragment of one k-step of 16.

// A fragment of rows m0..m0+15, columns 16 kk.. of a row-major tile.
template <int HD>
__device__ __forceinline__ void load_a(const Tile<HD> &s, int m0, int kk, uint32_t a[4]) {
  const int l = threadIdx.x % 32, j = l / 8, i = l % 8;
  ldsm_x4(&s.r[m0 + i + 8 * (j & 1)][16 * kk + 8 * (j >> 1)], a);
}

// B fragments of n-tiles n0/8 and n0/8 + 1 (b[0..1], b[2..3]) for k-step kk, from a tile stored
// [n][k] (B = the tile transposed: K in Q K^T).
template <int HD>
__device__ __forceinline__ void load_b_nk(const Tile<HD> &s, int n0, int kk, uint32_t b[4]) {
  const int l = threadIdx.x % 32, j = l / 8, i = l % 8;
  ldsm_x4(&s.r[n0 + i + 8 * (j >> 1)][16 * kk + 8 * (j & 1)], b);
}

// The same from a tile stored [k][n] (B = the tile: V in P V), through ldmatrix's transpose.
template <int HD>
__device__ __forceinline__ void load_b_kn(const Tile<HD> &s, int kk, int n0, uint32_t b[4]) {
  const int l = threadIdx.x % 32, j = l / 8, i = l % 8;
  ldsm_x4_t(&s.r[16 * kk + i + 8 * (j & 1)][n0 + 8 * (j >> 1)], b);
}

// acc[8][4] (16 x 64) += A (16 x HD, as HD/16 k-steps in registers) * B^T, B a [64][HD] tile
// [n][k]; only the column blocks of 16 in [LO, HI] (the others are masked out: causal, or past
// T).
template <int LO, int HI, int HD>
__device__ __forceinline__ void mma_nk(float acc[8][4], const uint32_t a[HD / 16][4],
                                       const Tile<HD> &s) {
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
    for (int np = LO; np <= HI; ++np) {
      uint32_t b[4];
      load_b_nk(s, 16 * np, kk, b);
      mma(acc[2 * np], a[kk], b[0], b[1]);
      mma(acc[2 * np + 1], a[kk], b[2], b[3]);
    }
  }
}

// The same with A = rows m0 .. m0+15 of a row-major tile, read per k-step (fewer registers).
template <int LO, int HI, int HD>
__device__ __forceinline__ void mma_nk(float acc[8][4], const Tile<HD> &a_tile, int m0,
                                       const Tile<HD> &s) {
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    uint32_t a[4];
    load_a(a_tile, m0, kk, a);
#pragma unroll
    for (int np = LO; np <= HI; ++np) {
      uint32_t b[4];
      load_b_nk(s, 16 * np, kk, b);
      mma(acc[2 * np], a, b[0], b[1]);
      mma(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[HD/8][4] (16 x HD) += A (16 x 64) * B, B a [64][HD] tile stored [k][n]; only the k-steps
// in [LO, HI] (A is zero elsewhere).
template <int LO, int HI, int HD>
__device__ __forceinline__ void mma_kn(float acc[HD / 8][4], const uint32_t a[4][4],
                                       const Tile<HD> &s) {
#pragma unroll
  for (int kk = LO; kk <= HI; ++kk) {
#pragma unroll
    for (int np = 0; np < HD / 16; ++np) {
      uint32_t b[4];
      load_b_kn(s, kk, 16 * np, b);
      mma(acc[2 * np], a[kk], b[0], b[1]);
      mma(acc[2 * np + 1], a[kk], b[2], b[3]);
    }
  }
}

template <int N>
using Int = std::integral_constant<int, N>;

// f(Int<v>{}) for a warp-uniform v in 0..3: the tile loops of each case unroll at compile time.
template <typename F>
__device__ __forceinline__ void dispatch4(int v, F &&f) {
  switch (v) {
    case 0: f(Int<0>{}); break;
    case 1: f(Int<1>{}); break;
    case 2: f(Int<2>{}); break;
    default: f(Int<3>{}); break;
  }
}

// The A fragments (bf16) of a 16 x 64 C tile in registers.
__device__ __forceinline__ void to_a(const float c[8][4], uint32_t a[4][4]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    a[kk][0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
}

// seg_start of token t of one row (`seg` points at the row), clamped to [0, t].
__device__ __forceinline__ int seg_of(const int *__restrict__ seg, int t) {
  return min(max(__ldg(seg + t), 0), t);
}

// Rows t0 .. t0+63 of one head (HD bf16 at `src`, rows `ld` elements apart) into a tile by
// cp.async (16 bytes a thread a step); rows at or past T are zero-filled.
template <int HD>
__device__ __forceinline__ void load_tile_async(Tile<HD> &s, const bf16 *__restrict__ src,
                                                int64_t ld, int t0, int t_n) {
  constexpr int kChunks = HD / 8;  // 16-byte pieces of a row
#pragma unroll
  for (int k = 0; k < kTile * kChunks / kThreads; ++k) {
    const int it = threadIdx.x + k * kThreads, r = it / kChunks, i = (it % kChunks) * 8;
    const int t = t0 + r;
    const bool in = t < t_n;
    cp_async16(&s.r[r][i], src + static_cast<int64_t>(in ? t : 0) * ld + i, in ? 16 : 0);
  }
}

// RoPE (rotate-half, fp32 tables [T, HD] indexed by position) of q and k from the merged
// projection, rounded to bf16 once as the qkv_heads kernel rounds, into head-major
// qr [B, H, T, HD] and kr [B, KV, T, HD]: every tile the attention kernels load is then one
// piece. kHeadLanes threads per head vector, each 8 elements of its first half and the matching
// 8 of its second: item = ((b T + t)(H + KV) + head) kHeadLanes + lane. NORM: first
// w * x * rsqrt(mean(x^2) + eps) over the head vector in fp32 (w = wq for q heads, wk for k
// heads), rstd [B, T, H + KV] saved. SEG: position t - seg_start[t], else t.
template <int HD, bool NORM, bool SEG>
__global__ void rope_heads_kernel(const bf16 *__restrict__ qkv, const float *__restrict__ cos,
                                  const float *__restrict__ sin, const int *__restrict__ seg,
                                  const float *__restrict__ wq, const float *__restrict__ wk,
                                  float eps, float *__restrict__ rstd, bf16 *__restrict__ qr,
                                  bf16 *__restrict__ kr, int64_t b_n, int t_n, int heads,
                                  int kv_heads) {
  constexpr int kLanes = kHeadLanes<HD>, kHalf = HD / 2;
  const int nh = heads + kv_heads;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int i = static_cast<int>(item % kLanes) * 8;
  // Lanes past a head's first half (HD 80, 96) and items past the end only join the reduction.
  const bool in = item < b_n * t_n * nh * kLanes && i < kHalf;
  if (!NORM && !in) return;
  int64_t rest = item / kLanes;
  const int head = static_cast<int>(rest % nh);
  rest /= nh;
  const int t = static_cast<int>(rest % t_n);
  const int64_t b = rest / t_n;
  const int64_t ld = static_cast<int64_t>(heads + 2 * kv_heads) * HD;
  float a[8], bb[8];
  if (in) {
    const bf16 *p = qkv + (b * t_n + t) * ld + head * HD;
    const uint4 x1r = *reinterpret_cast<const uint4 *>(p + i);
    const uint4 x2r = *reinterpret_cast<const uint4 *>(p + kHalf + i);
    const bf16 *x1 = reinterpret_cast<const bf16 *>(&x1r);
    const bf16 *x2 = reinterpret_cast<const bf16 *>(&x2r);
#pragma unroll
    for (int k = 0; k < 8; ++k) a[k] = __bfloat162float(x1[k]), bb[k] = __bfloat162float(x2[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) a[k] = bb[k] = 0.f;
  }
  if constexpr (NORM) {
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) ss += a[k] * a[k] + bb[k] * bb[k];
    // The kLanes lanes of a head are aligned neighbours in a warp; every lane gets here.
#pragma unroll
    for (int o = 1; o < kLanes; o *= 2) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float r = rsqrtf(ss / static_cast<float>(HD) + eps);
    if (!in) return;
    if (i == 0) rstd[(b * t_n + t) * nh + head] = r;
    const float *w = head < heads ? wq : wk;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      // MiniMind: weight * (x * rstd), in fp32.
      a[k] = w[i + k] * (a[k] * r);
      bb[k] = w[kHalf + i + k] * (bb[k] * r);
    }
  }
  int pos = t;
  if constexpr (SEG) pos = t - seg_of(seg + b * t_n, t);
  const float *c = cos + static_cast<int64_t>(pos) * HD;
  const float *sn = sin + static_cast<int64_t>(pos) * HD;
  uint4 lo, hi;
  bf16 *y1 = reinterpret_cast<bf16 *>(&lo), *y2 = reinterpret_cast<bf16 *>(&hi);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    y1[k] = __float2bfloat16_rn(
        __fadd_rn(__fmul_rn(a[k], c[i + k]), __fmul_rn(-bb[k], sn[i + k])));
    y2[k] = __float2bfloat16_rn(
        __fadd_rn(__fmul_rn(bb[k], c[kHalf + i + k]), __fmul_rn(a[k], sn[kHalf + i + k])));
  }
  bf16 *dst = head < heads ? qr + ((b * heads + head) * t_n + t) * HD
                           : kr + ((b * kv_heads + (head - heads)) * t_n + t) * HD;
  *reinterpret_cast<uint4 *>(dst + i) = lo;
  *reinterpret_cast<uint4 *>(dst + kHalf + i) = hi;
}

// A 16 x HD fp32 result (rows row0 + g, row0 + g + 8 of this lane) through RoPE's transpose
// (rope = true: g1 c1 + g2 s2, g2 c2 - g1 s1 for the column pairs (i, i + HD/2), which one lane
// holds: n-tiles nt and nt + HD/16; SEG: at position t - seg_start[t], `seg` the batch's row) or
// as it is, times `mul`, to bf16 rows `ld` apart at dst.
template <int HD, bool SEG>
__device__ void store_rows(float acc[HD / 8][4], bf16 *__restrict__ dst, int64_t ld, int row0,
                           int t_n, const float *__restrict__ cos, const float *__restrict__ sin,
                           const int *__restrict__ seg, bool rope, float mul) {
  constexpr int kH = HD / 16, kHalf = HD / 2;
  const int l = threadIdx.x % 32, g = l / 4, c = 2 * (l % 4);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int t = row0 + g + 8 * half;
    if (t >= t_n) continue;
    bf16 *p = dst + static_cast<int64_t>(t) * ld;
    int pos = t;
    if constexpr (SEG) pos = t - seg_of(seg, t);
    const float *cs = rope ? cos + static_cast<int64_t>(pos) * HD : nullptr;
    const float *sn = rope ? sin + static_cast<int64_t>(pos) * HD : nullptr;
#pragma unroll
    for (int nt = 0; nt < kH; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int i = nt * 8 + c + e;
        float g1 = acc[nt][2 * half + e] * mul, g2 = acc[nt + kH][2 * half + e] * mul;
        if (rope) {
          const float d1 = g1 * cs[i] + g2 * sn[i + kHalf];
          const float d2 = g2 * cs[i + kHalf] - g1 * sn[i];
          g1 = d1, g2 = d2;
        }
        acc[nt][2 * half + e] = g1, acc[nt + kH][2 * half + e] = g2;
      }
      *reinterpret_cast<uint32_t *>(p + nt * 8 + c) =
          pack_bf16(acc[nt][2 * half], acc[nt][2 * half + 1]);
      *reinterpret_cast<uint32_t *>(p + kHalf + nt * 8 + c) =
          pack_bf16(acc[nt + kH][2 * half], acc[nt + kH][2 * half + 1]);
    }
  }
}

struct Shape {
  int t_n, heads, kv_heads;
  int64_t ld;  // (heads + 2 kv_heads) * HD: a row of the merged projection
  float scale_log2;
};

// Where the pieces of batch b start: q head h, k head j (RoPE'd, head-major), v head j (in the
// merged projection, rows ld apart), o / dO head h (rows H * HD apart), the row of seg_start.
template <int HD>
struct Heads {
  const Shape &sh;
  int64_t b;
  __device__ const bf16 *q(const bf16 *qr, int h) const {
    return qr + (b * sh.heads + h) * static_cast<int64_t>(sh.t_n) * HD;
  }
  __device__ const bf16 *k(const bf16 *kr, int j) const {
    return kr + (b * sh.kv_heads + j) * static_cast<int64_t>(sh.t_n) * HD;
  }
  __device__ int64_t v_col(int j) const { return (sh.heads + sh.kv_heads + j) * HD; }
  __device__ int64_t k_col(int j) const { return (sh.heads + j) * HD; }
  __device__ int64_t row0() const { return b * sh.t_n * sh.ld; }  // of qkv / dqkv
  __device__ int64_t o_head(int h) const { return (b * sh.t_n * sh.heads + h) * HD; }
  __device__ int64_t lse_row0(int h) const { return (b * sh.heads + h) * sh.t_n; }
  __device__ const int *seg(const int *seg_start) const { return seg_start + b * sh.t_n; }
};

// Key tile and value tile of kv head j, rows t0 .. t0+63, into k and v by cp.async (not committed).
template <int HD>
__device__ __forceinline__ void load_kv_async(Tile<HD> &k, Tile<HD> &v, const Heads<HD> &at,
                                              const bf16 *kr, const bf16 *qkv, int j, int t0) {
  load_tile_async(k, at.k(kr, j), HD, t0, at.sh.t_n);
  load_tile_async(v, qkv + at.row0() + at.v_col(j), at.sh.ld, t0, at.sh.t_n);
}

// q, k x 2, v x 2.
template <int HD>
constexpr int fwd_smem() {
  return 5 * sizeof(Tile<HD>);
}
// q, dO (or k, v), k x 2, v x 2 (or q x 2, dO x 2), then kernel 2's lse and delta x 2 (and
// seg_start x 2 with segments).
template <int HD, int MODE>
constexpr int bwd_smem() {
  return 6 * sizeof(Tile<HD>) + (MODE == kSegments ? 6 : 4) * kTile * sizeof(float);
}

// The visible key tiles j0 .. j1 of query tile qt (rows t0 ..), and with segments what the masks
// need: the largest seg_start of the tile's rows (key tiles from it on need no segment mask),
// this warp's first row's (a key tile wholly before it is skipped) and this lane's two rows'.
template <int MODE>
struct QueryRange {
  int j0 = 0, j1 = 0, seg_hi = 0, warp_lo = 0, row_lo[2] = {0, 0};
  __device__ QueryRange(const int *seg, int qt, int t0, int w, int g, int t_n, int tiles) {
    j1 = MODE == kBidirectional ? tiles - 1 : qt;
    if constexpr (MODE == kSegments) {
      j0 = seg_of(seg, t0) / kTile;
      seg_hi = seg_of(seg, min(t0 + kTile, t_n) - 1);
      const int r0 = t0 + 16 * w;
      warp_lo = r0 < t_n ? seg_of(seg, r0) : 0;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int q = r0 + g + 8 * half;
        row_lo[half] = q < t_n ? seg_of(seg, q) : 0;
      }
    }
  }
};

template <int HD, int MODE>
__global__ void __launch_bounds__(kThreads, kFwdBlocks<HD>) attn_fwd_kernel(
    const bf16 *__restrict__ qkv, const bf16 *__restrict__ qr, const bf16 *__restrict__ kr,
    const int *__restrict__ seg_start, bf16 *__restrict__ out, float *__restrict__ lse,
    Shape sh) {
  constexpr bool kSeg = MODE == kSegments, kBidir = MODE == kBidirectional;
  extern __shared__ __align__(16) unsigned char smem[];
  Tile<HD> *tiles = reinterpret_cast<Tile<HD> *>(smem);
  Tile<HD> &qs = tiles[0], *ks = tiles + 1, *vs = tiles + 3;
  const int qt = gridDim.x - 1 - blockIdx.x;  // the longest rows first
  const int h = blockIdx.y, kvh = h / (sh.heads / sh.kv_heads);
  const Heads<HD> at{sh, blockIdx.z};
  const int t0 = qt * kTile, w = threadIdx.x / 32, l = threadIdx.x % 32, g = l / 4;
  const int c = 2 * (l % 4);
  const bool live = t0 + 16 * w < sh.t_n;  // a warp whose rows are all past T only copies
  const int last = gridDim.x - 1;
  const QueryRange<MODE> rg(kSeg ? at.seg(seg_start) : nullptr, qt, t0, w, g, sh.t_n,
                            gridDim.x);
  load_tile_async(qs, at.q(qr, h), HD, t0, sh.t_n);
  load_kv_async(ks[0], vs[0], at, kr, qkv, kvh, rg.j0 * kTile);
  cp_async_commit();
  uint32_t qa[HD / 16][4];
  float o[HD / 8][4], m[2] = {-INFINITY, -INFINITY}, lsum[2] = {0.f, 0.f};
  zero(o);
  for (int j = rg.j0; j <= rg.j1; ++j) {
    const int buf = (j - rg.j0) & 1;
    cp_async_wait_all();
    __syncthreads();  // tile j is in, and every warp is done with tile j - 1's buffers
    if (!kFwdQInSmem<HD> && j == rg.j0) {
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) load_a(qs, 16 * w, kk, qa[kk]);
    }
    if (j < rg.j1) {
      load_kv_async(ks[buf ^ 1], vs[buf ^ 1], at, kr, qkv, kvh, (j + 1) * kTile);
      cp_async_commit();
    }
    if (!live) continue;
    if constexpr (kSeg) {
      if (j * kTile + kTile - 1 < rg.warp_lo) continue;  // before all of this warp's segments
    }
    const bool diag = j == qt;
    // The tile whose key blocks are cut: the diagonal (causal, segments), the last (past T).
    const bool edge = kBidir ? j == last : diag;
    const bool seg_part = kSeg && j * kTile < rg.seg_hi;
    // Key blocks of 16 up to HI: past this warp's last row on the diagonal, or past T, all
    // masked.
    auto step = [&](auto hi_c) {
      constexpr int HI = decltype(hi_c)::value;
      float s[8][4];
      zero(s);
      if constexpr (kFwdQInSmem<HD>)
        mma_nk<0, HI>(s, qs, 16 * w, ks[buf]);
      else
        mma_nk<0, HI>(s, qa, ks[buf]);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        [[maybe_unused]] const int q = t0 + 16 * w + g + 8 * half;
        float mx = m[half];
#pragma unroll
        for (int nt = 0; nt < 2 * (HI + 1); ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int key = j * kTile + nt * 8 + c + e;
            float v = s[nt][2 * half + e] * sh.scale_log2;
            if constexpr (kBidir) {
              if (edge && key >= sh.t_n) v = -INFINITY;
            } else {
              if (diag && key > q) v = -INFINITY;
            }
            if constexpr (kSeg) {
              if (seg_part && key < rg.row_lo[half]) v = -INFINITY;
            }
            s[nt][2 * half + e] = v;
            mx = fmaxf(mx, v);
          }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // With segments a row may have seen no key yet (mx -inf): exp2(-inf - -inf) would be
        // NaN, so the reference point is 0 then (p and alpha 0, o and lsum stay 0).
        const float mref = kSeg && mx == -INFINITY ? 0.f : mx;
        const float alpha = exp2f(m[half] - mref);
        m[half] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < 2 * (HI + 1); ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = exp2f(s[nt][2 * half + e] - mref);
            s[nt][2 * half + e] = p;
            sum += p;
          }
        }
#pragma unroll
        for (int nt = 0; nt < HD / 8; ++nt) {
          o[nt][2 * half] *= alpha;
          o[nt][2 * half + 1] *= alpha;
        }
        lsum[half] = lsum[half] * alpha + sum;
      }
      uint32_t pa[4][4];
      to_a(s, pa);
      mma_kn<0, HI>(o, pa, vs[buf]);
    };
    if (edge) {
      const int hi = min(kBidir || !diag ? 3 : w, (sh.t_n - 1 - j * kTile) / 16);
      dispatch4(hi, step);
    } else {
      step(Int<3>{});
    }
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = lsum[half];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int t = t0 + 16 * w + g + 8 * half;
    const float inv = 1.f / sum;
#pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt) o[nt][2 * half] *= inv, o[nt][2 * half + 1] *= inv;
    if (t < sh.t_n && l % 4 == 0) lse[at.lse_row0(h) + t] = m[half] + log2f(sum);
  }
  store_rows<HD, false>(o, out + at.o_head(h), sh.heads * HD, t0 + 16 * w, sh.t_n, nullptr,
                        nullptr, nullptr, false, 1.f);
}

// dQ, and delta = rowsum(dO * O) for kernel 2. dqkv's q columns. Q and dO stay in shared memory
// and are read per k-step (not held in more registers), so 4 blocks fit an SM at head dim 64,
// which was faster than 3 blocks with them in registers.
template <int HD, int MODE>
__global__ void __launch_bounds__(kThreads, kDqBlocks<HD>) attn_bwd_dq_kernel(
    const bf16 *__restrict__ qkv, const bf16 *__restrict__ qr, const bf16 *__restrict__ kr,
    const float *__restrict__ cos, const float *__restrict__ sin,
    const int *__restrict__ seg_start, const bf16 *__restrict__ out,
    const float *__restrict__ lse, const bf16 *__restrict__ dout, float *__restrict__ delta,
    bf16 *__restrict__ dqkv, Shape sh) {
  constexpr bool kSeg = MODE == kSegments, kBidir = MODE == kBidirectional;
  extern __shared__ __align__(16) unsigned char smem[];
  Tile<HD> *tiles = reinterpret_cast<Tile<HD> *>(smem);
  Tile<HD> &qs = tiles[0], &dos = tiles[1], *ks = tiles + 2, *vs = tiles + 4;
  const int qt = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, kvh = h / (sh.heads / sh.kv_heads);
  const Heads<HD> at{sh, blockIdx.z};
  const int t0 = qt * kTile, w = threadIdx.x / 32, l = threadIdx.x % 32, g = l / 4;
  const int c = 2 * (l % 4);
  const int64_t od = static_cast<int64_t>(sh.heads) * HD;  // a row of o and dO
  const bool live = t0 + 16 * w < sh.t_n;
  const int last = gridDim.x - 1;
  const int *seg = kSeg ? at.seg(seg_start) : nullptr;
  const QueryRange<MODE> rg(seg, qt, t0, w, g, sh.t_n, gridDim.x);
  load_tile_async(qs, at.q(qr, h), HD, t0, sh.t_n);
  load_tile_async(dos, dout + at.o_head(h), od, t0, sh.t_n);
  load_kv_async(ks[0], vs[0], at, kr, qkv, kvh, rg.j0 * kTile);
  cp_async_commit();
  float dl[2], lrow[2], dq[HD / 8][4];
  zero(dq);
  for (int j = rg.j0; j <= rg.j1; ++j) {
    const int buf = (j - rg.j0) & 1;
    cp_async_wait_all();
    __syncthreads();
    if (j == rg.j0) {
      // delta for the two rows of this lane: lanes 4g .. 4g+3 share a row, HD/4 columns each.
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = 16 * w + g + 8 * half, t = t0 + r;
        float acc = 0.f;
        if (t < sh.t_n) {
          const bf16 *op =
              out + at.o_head(h) + static_cast<int64_t>(t) * od + (l % 4) * (HD / 4);
          const bf16 *dp = &dos.r[r][(l % 4) * (HD / 4)];
          if constexpr ((HD / 4) % 8 == 0) {
            // 16-byte pieces (the quarter row starts 16-byte aligned), summed in column order.
#pragma unroll
            for (int k = 0; k < HD / 4; k += 8) {
              const uint4 ov = *reinterpret_cast<const uint4 *>(op + k);
              const uint4 dv = *reinterpret_cast<const uint4 *>(dp + k);
              const bf16 *o8 = reinterpret_cast<const bf16 *>(&ov);
              const bf16 *d8 = reinterpret_cast<const bf16 *>(&dv);
#pragma unroll
              for (int e = 0; e < 8; ++e) acc += __bfloat162float(o8[e]) * __bfloat162float(d8[e]);
            }
          } else {
#pragma unroll
            for (int k = 0; k < HD / 4; ++k) acc += __bfloat162float(op[k]) * __bfloat162float(dp[k]);
          }
        }
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        acc += __shfl_xor_sync(0xffffffffu, acc, 2);
        dl[half] = acc;
        lrow[half] = t < sh.t_n ? lse[at.lse_row0(h) + t] : 0.f;
        if (t < sh.t_n && l % 4 == 0) delta[at.lse_row0(h) + t] = acc;
      }
    }
    if (j < rg.j1) {
      load_kv_async(ks[buf ^ 1], vs[buf ^ 1], at, kr, qkv, kvh, (j + 1) * kTile);
      cp_async_commit();
    }
    if (!live) continue;
    if constexpr (kSeg) {
      if (j * kTile + kTile - 1 < rg.warp_lo) continue;
    }
    const bool diag = j == qt;
    const bool edge = kBidir ? j == last : diag;
    const bool seg_part = kSeg && j * kTile < rg.seg_hi;
    const Tile<HD> &kt = ks[buf], &vt = vs[buf];
    auto step = [&](auto hi_c) {
      constexpr int HI = decltype(hi_c)::value;
      float s[8][4], dp[8][4];
      zero(s);
      zero(dp);
      mma_nk<0, HI>(s, qs, 16 * w, kt);
      mma_nk<0, HI>(dp, dos, 16 * w, vt);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        [[maybe_unused]] const int q = t0 + 16 * w + g + 8 * half;
#pragma unroll
        for (int nt = 0; nt < 2 * (HI + 1); ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int key = j * kTile + nt * 8 + c + e;
            float p = exp2f(s[nt][2 * half + e] * sh.scale_log2 - lrow[half]);
            if constexpr (kBidir) {
              if (edge && key >= sh.t_n) p = 0.f;
            } else {
              if (diag && key > q) p = 0.f;
            }
            if constexpr (kSeg) {
              if (seg_part && key < rg.row_lo[half]) p = 0.f;
            }
            s[nt][2 * half + e] = p * (dp[nt][2 * half + e] - dl[half]);
          }
        }
      }
      uint32_t dsa[4][4];
      to_a(s, dsa);
      mma_kn<0, HI>(dq, dsa, kt);
    };
    if (edge) {
      const int hi = min(kBidir || !diag ? 3 : w, (sh.t_n - 1 - j * kTile) / 16);
      dispatch4(hi, step);
    } else {
      step(Int<3>{});
    }
  }
  const float scale = sh.scale_log2 / kLog2e;
  store_rows<HD, kSeg>(dq, dqkv + at.row0() + h * HD, sh.ld, t0 + 16 * w, sh.t_n, cos, sin, seg,
                       true, scale);
}

// dK, dV of one key tile of one kv head: the k and v columns of dqkv. Iterates over the
// group's query heads and, for each, the query tiles that see the key tile (flattened, so the
// next tile's copy overlaps this one's math). K and V stay in shared memory (as Q and dO in the
// dQ kernel). Measured and not kept at head dim 64: two key tiles a block, and 2 or 4 query
// heads a block in the other kernels (each copied tile serving more rows): all slower.
template <int HD, int MODE>
__global__ void __launch_bounds__(kThreads, kDkvBlocks<HD>) attn_bwd_dkv_kernel(
    const bf16 *__restrict__ qkv, const bf16 *__restrict__ qr, const bf16 *__restrict__ kr,
    const float *__restrict__ cos, const float *__restrict__ sin,
    const int *__restrict__ seg_start, const float *__restrict__ lse,
    const bf16 *__restrict__ dout, const float *__restrict__ delta, bf16 *__restrict__ dqkv,
    Shape sh) {
  constexpr bool kSeg = MODE == kSegments, kBidir = MODE == kBidirectional;
  extern __shared__ __align__(16) unsigned char smem[];
  Tile<HD> *tiles = reinterpret_cast<Tile<HD> *>(smem);
  Tile<HD> &ks = tiles[0], &vs = tiles[1], *qs = tiles + 2, *dos = tiles + 4;
  float(*ls)[kTile] = reinterpret_cast<float(*)[kTile]>(tiles + 6);
  float(*ds)[kTile] = ls + 2;
  int(*ss)[kTile] = reinterpret_cast<int(*)[kTile]>(ds + 2);  // segments only
  const int kt = gridDim.x - 1 - blockIdx.x;  // the first key tiles see the most queries
  const int kvh = blockIdx.y, n_rep = sh.heads / sh.kv_heads;
  const Heads<HD> at{sh, blockIdx.z};
  const int k0 = kt * kTile, w = threadIdx.x / 32, l = threadIdx.x % 32, g = l / 4;
  const int c = 2 * (l % 4);
  const int64_t od = static_cast<int64_t>(sh.heads) * HD;
  const bool live = k0 + 16 * w < sh.t_n;
  const int q_tiles = (sh.t_n + kTile - 1) / kTile;
  // Query tiles i0 .. i0 + per_head - 1 see this key tile.
  const int i0 = kBidir ? 0 : kt;
  int per_head = q_tiles - i0;
  const int *seg = kSeg ? at.seg(seg_start) : nullptr;
  if constexpr (kSeg) {
    // Those from the diagonal whose first (smallest) seg_start is at or before the key tile's
    // last key: a prefix, seg_start being non-decreasing; counted by all threads at once.
    per_head = 0;
    for (int base = kt; base < q_tiles; base += kThreads) {
      const int i = base + threadIdx.x;
      per_head += __syncthreads_count(i < q_tiles && seg_of(seg, i * kTile) <= k0 + kTile - 1);
    }
  }
  const int steps = n_rep * per_head;
  // Step it: query head kvh n_rep + it / per_head, query tile i0 + it % per_head.
  auto issue = [&](int it, int buf) {
    const int h = kvh * n_rep + it / per_head, t0 = (i0 + it % per_head) * kTile;
    load_tile_async(qs[buf], at.q(qr, h), HD, t0, sh.t_n);
    load_tile_async(dos[buf], dout + at.o_head(h), od, t0, sh.t_n);
    cp_async_commit();
    if (threadIdx.x < kTile) {
      const int t = t0 + threadIdx.x;
      // Past T: lse +inf makes P 0 (the zero-filled Q gives finite scores).
      ls[buf][threadIdx.x] = t < sh.t_n ? lse[at.lse_row0(h) + t] : INFINITY;
      ds[buf][threadIdx.x] = t < sh.t_n ? delta[at.lse_row0(h) + t] : 0.f;
      if constexpr (kSeg) ss[buf][threadIdx.x] = t < sh.t_n ? seg_of(seg, t) : 0;
    }
  };
  load_kv_async(ks, vs, at, kr, qkv, kvh, k0);
  issue(0, 0);
  float dk[HD / 8][4], dv[HD / 8][4];
  zero(dk);
  zero(dv);
  for (int it = 0; it < steps; ++it) {
    const int buf = it & 1, i = i0 + it % per_head;
    cp_async_wait_all();
    __syncthreads();
    if (it + 1 < steps) issue(it + 1, buf ^ 1);
    if (!live) continue;
    bool seg_part = false;
    if constexpr (kSeg) {
      // Every query of the tile in a segment after this warp's last key: nothing to add.
      if (ss[buf][0] > k0 + 16 * w + 15) continue;
      seg_part = ss[buf][min(kTile - 1, sh.t_n - 1 - i * kTile)] > k0;
    }
    const bool diag = !kBidir && i == kt;
    const Tile<HD> &q = qs[buf], &dO = dos[buf];
    // Query blocks of 16 from LO to HI: before this warp's first key on the diagonal, all
    // masked; past T, nothing.
    auto step = [&](auto lo_c, auto hi_c) {
      constexpr int LO = decltype(lo_c)::value, HI = decltype(hi_c)::value;
      float s[8][4], dp[8][4];
      zero(s);
      zero(dp);
      mma_nk<LO, HI>(s, ks, 16 * w, q);    // S^T: [key][query]
      mma_nk<LO, HI>(dp, vs, 16 * w, dO);  // dP^T
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        [[maybe_unused]] const int key = k0 + 16 * w + g + 8 * half;
#pragma unroll
        for (int nt = 2 * LO; nt < 2 * (HI + 1); ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int qc = nt * 8 + c + e;
            float p = exp2f(s[nt][2 * half + e] * sh.scale_log2 - ls[buf][qc]);
            if constexpr (!kBidir) {
              if (diag && i * kTile + qc < key) p = 0.f;
            }
            if constexpr (kSeg) {
              if (seg_part && ss[buf][qc] > key) p = 0.f;
            }
            s[nt][2 * half + e] = p;
            dp[nt][2 * half + e] = p * (dp[nt][2 * half + e] - ds[buf][qc]);
          }
        }
      }
      uint32_t pa[4][4], dsa[4][4];
      to_a(s, pa);
      to_a(dp, dsa);
      mma_kn<LO, HI>(dv, pa, dO);
      mma_kn<LO, HI>(dk, dsa, q);
    };
    const int lo = diag ? w : 0, hi = min(3, (sh.t_n - 1 - i * kTile) / 16);
    if (lo == 0 && hi == 3) {
      step(Int<0>{}, Int<3>{});
    } else {
      dispatch4(lo, [&](auto lo_c) {
        dispatch4(hi, [&](auto hi_c) {
          if constexpr (decltype(lo_c)::value <= decltype(hi_c)::value) step(lo_c, hi_c);
        });
      });
    }
  }
  const float scale = sh.scale_log2 / kLog2e;
  bf16 *dst = dqkv + at.row0();
  store_rows<HD, kSeg>(dk, dst + at.k_col(kvh), sh.ld, k0 + 16 * w, sh.t_n, cos, sin, seg, true,
                       scale);
  store_rows<HD, false>(dv, dst + at.v_col(kvh), sh.ld, k0 + 16 * w, sh.t_n, cos, sin, nullptr,
                        false, 1.f);
}

constexpr int kNormThreads = 256;

// qk-norm's backward over the q heads (blockIdx.y 0) or the k heads (1) of dqkv, in place:
// g (the gradient of y = w * xhat, xhat = x * rstd, as the attention kernels stored it) becomes
// dx = rstd * (w g - xhat * mean(w g xhat)). Rows (b, t, head) of the kind are taken kSlots at a
// time, block-strided over a fixed grid, kHeadLanes threads a row (as rope_heads); each thread
// keeps the sum of g * xhat of its 16 columns over its rows, and the block sums its slots in
// slot order into dw_part[kind][blockIdx.x] (no atomics: the same sums in the same order on
// every run).
template <int HD>
__global__ void __launch_bounds__(kNormThreads) qk_norm_bwd_kernel(
    const bf16 *__restrict__ qkv, const float *__restrict__ wq, const float *__restrict__ wk,
    const float *__restrict__ rstd, bf16 *__restrict__ dqkv, float *__restrict__ dw_part,
    int64_t b_n, int t_n, int heads, int kv_heads) {
  constexpr int kLanes = kHeadLanes<HD>, kHalf = HD / 2, kSlots = kNormThreads / kLanes;
  __shared__ float red[kSlots][HD];
  const bool is_k = blockIdx.y == 1;
  const int nh = heads + kv_heads, nk = is_k ? kv_heads : heads, first = is_k ? heads : 0;
  const int64_t n = b_n * t_n * nk, ld = static_cast<int64_t>(heads + 2 * kv_heads) * HD;
  const int slot = threadIdx.x / kLanes, i = (threadIdx.x % kLanes) * 8;
  const bool lane_in = i < kHalf;
  const float *w = is_k ? wk : wq;
  float w1[8], w2[8], acc1[8], acc2[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    w1[k] = lane_in ? w[i + k] : 0.f;
    w2[k] = lane_in ? w[kHalf + i + k] : 0.f;
    acc1[k] = acc2[k] = 0.f;
  }
  // r0 is uniform over the block, so every lane of a row reaches the shuffles.
  for (int64_t r0 = static_cast<int64_t>(blockIdx.x) * kSlots; r0 < n;
       r0 += static_cast<int64_t>(gridDim.x) * kSlots) {
    const int64_t r = r0 + slot;
    const bool in = lane_in && r < n;
    const int64_t bt = r / nk;
    const int head = first + static_cast<int>(r % nk);
    const int64_t off = bt * ld + static_cast<int64_t>(head) * HD + i;
    float x1[8], x2[8], g1[8], g2[8], rs = 0.f;
    if (in) {
      const uint4 xa = *reinterpret_cast<const uint4 *>(qkv + off);
      const uint4 xb = *reinterpret_cast<const uint4 *>(qkv + off + kHalf);
      const uint4 ga = *reinterpret_cast<const uint4 *>(dqkv + off);
      const uint4 gb = *reinterpret_cast<const uint4 *>(dqkv + off + kHalf);
      const bf16 *pxa = reinterpret_cast<const bf16 *>(&xa), *pxb = reinterpret_cast<const bf16 *>(&xb);
      const bf16 *pga = reinterpret_cast<const bf16 *>(&ga), *pgb = reinterpret_cast<const bf16 *>(&gb);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        x1[k] = __bfloat162float(pxa[k]), x2[k] = __bfloat162float(pxb[k]);
        g1[k] = __bfloat162float(pga[k]), g2[k] = __bfloat162float(pgb[k]);
      }
      rs = rstd[bt * nh + head];
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) x1[k] = x2[k] = g1[k] = g2[k] = 0.f;
    }
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      x1[k] *= rs, x2[k] *= rs;  // xhat
      acc1[k] += g1[k] * x1[k];
      acc2[k] += g2[k] * x2[k];
      g1[k] *= w1[k], g2[k] *= w2[k];  // w g
      dot += g1[k] * x1[k] + g2[k] * x2[k];
    }
#pragma unroll
    for (int o = 1; o < kLanes; o *= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    const float mean = dot / static_cast<float>(HD);
    if (in) {
      uint4 ya, yb;
      bf16 *pya = reinterpret_cast<bf16 *>(&ya), *pyb = reinterpret_cast<bf16 *>(&yb);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        pya[k] = __float2bfloat16_rn(rs * (g1[k] - x1[k] * mean));
        pyb[k] = __float2bfloat16_rn(rs * (g2[k] - x2[k] * mean));
      }
      *reinterpret_cast<uint4 *>(dqkv + off) = ya;
      *reinterpret_cast<uint4 *>(dqkv + off + kHalf) = yb;
    }
  }
  if (lane_in) {
#pragma unroll
    for (int k = 0; k < 8; ++k) red[slot][i + k] = acc1[k], red[slot][kHalf + i + k] = acc2[k];
  }
  __syncthreads();
  for (int col = threadIdx.x; col < HD; col += kNormThreads) {
    float s = 0.f;
#pragma unroll 8
    for (int k = 0; k < kSlots; ++k) s += red[k][col];
    dw_part[(static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * HD + col] = s;
  }
}

// dwq / dwk [hd] = the sums over parts of dw_part [2, parts, hd]: a block per 32 columns of one
// kind, 8 slices of parts, summed in a fixed order.
__global__ void qk_norm_dw_kernel(const float *__restrict__ dw_part, float *__restrict__ dwq,
                                  float *__restrict__ dwk, int64_t parts, int hd) {
  __shared__ float red[8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  const float *part = dw_part + static_cast<int64_t>(blockIdx.y) * parts * hd;
  float s = 0.f;
  if (col < hd) {
    for (int64_t p = threadIdx.y; p < parts; p += 8) s += part[p * hd + col];
  }
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < hd) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) t += red[k][threadIdx.x];
    (blockIdx.y == 0 ? dwq : dwk)[col] = t;
  }
}

const char *launch_error() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

Shape shape_of(int64_t t, int64_t heads, int64_t kv_heads, int hd) {
  Shape s;
  s.t_n = static_cast<int>(t);
  s.heads = static_cast<int>(heads);
  s.kv_heads = static_cast<int>(kv_heads);
  s.ld = (heads + 2 * kv_heads) * hd;
  s.scale_log2 = kLog2e / sqrtf(static_cast<float>(hd));
  return s;
}

// Dynamic shared memory over 48 KB needs an opt-in per kernel (once per process).
template <typename K>
cudaError_t allow_smem(K kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

// f(Int<hd>{}, Int<mask>{}) for the supported head dims and mask modes, else an error string.
template <typename F>
const char *with_variant(int64_t hd, int mask, F &&f) {
  auto by_mask = [&](auto hd_c) -> const char * {
    switch (mask) {
      case kCausal: return f(hd_c, Int<kCausal>{});
      case kSegments: return f(hd_c, Int<kSegments>{});
      case kBidirectional: return f(hd_c, Int<kBidirectional>{});
      default: return "attention: the mask mode must be causal, segments or bidirectional";
    }
  };
  switch (hd) {
    case 64: return by_mask(Int<64>{});
    case 80: return by_mask(Int<80>{});
    case 96: return by_mask(Int<96>{});
    case 128: return by_mask(Int<128>{});
    default: return "attention: the head dim must be 64, 80, 96 or 128";
  }
}

// f(Int<hd>{}) for the supported head dims.
template <typename F>
const char *with_head_dim(int64_t hd, F &&f) {
  switch (hd) {
    case 64: return f(Int<64>{});
    case 80: return f(Int<80>{});
    case 96: return f(Int<96>{});
    case 128: return f(Int<128>{});
    default: return "attention: the head dim must be 64, 80, 96 or 128";
  }
}

const char *check_args(int mask, const int *seg_start, const float *q_norm, const float *k_norm,
                       const float *rstd) {
  if ((mask == kSegments) != (seg_start != nullptr))
    return "attention: seg_start is needed by, and only by, the segments mask";
  if ((q_norm == nullptr) != (k_norm == nullptr) || (q_norm != nullptr && rstd == nullptr))
    return "attention: qk-norm needs both weights and rstd";
  return nullptr;
}

}  // namespace

namespace mm {

const char *attn_fwd(const void *qkv, const float *cos, const float *sin, const int32_t *seg_start,
                     const float *q_norm, const float *k_norm, float eps, void *qr, void *kr,
                     float *rstd, void *o, float *lse, int64_t b, int64_t t, int64_t heads,
                     int64_t kv_heads, int64_t head_dim, int mask, cudaStream_t stream) {
  if (const char *e = check_args(mask, seg_start, q_norm, k_norm, rstd)) return e;
  return with_variant(head_dim, mask, [&](auto hd_c, auto mask_c) -> const char * {
    constexpr int HD = decltype(hd_c)::value, MODE = decltype(mask_c)::value;
    constexpr bool kSeg = MODE == kSegments;
    constexpr int smem = fwd_smem<HD>();
    static const cudaError_t smem_ok = allow_smem(attn_fwd_kernel<HD, MODE>, smem);
    if (smem_ok != cudaSuccess) return cudaGetErrorString(smem_ok);
    const auto *x = static_cast<const bf16 *>(qkv);
    auto *q = static_cast<bf16 *>(qr), *k = static_cast<bf16 *>(kr);
    const int64_t items = b * t * (heads + kv_heads) * kHeadLanes<HD>;
    const unsigned blocks = static_cast<unsigned>((items + 255) / 256);
    const int ti = static_cast<int>(t), hi = static_cast<int>(heads);
    const int kvi = static_cast<int>(kv_heads);
    if (q_norm != nullptr)
      rope_heads_kernel<HD, true, kSeg><<<blocks, 256, 0, stream>>>(
          x, cos, sin, seg_start, q_norm, k_norm, eps, rstd, q, k, b, ti, hi, kvi);
    else
      rope_heads_kernel<HD, false, kSeg><<<blocks, 256, 0, stream>>>(
          x, cos, sin, seg_start, nullptr, nullptr, 0.f, nullptr, q, k, b, ti, hi, kvi);
    if (const char *e = launch_error()) return e;
    const dim3 grid(static_cast<unsigned>((t + kTile - 1) / kTile), static_cast<unsigned>(heads),
                    static_cast<unsigned>(b));
    attn_fwd_kernel<HD, MODE><<<grid, kThreads, smem, stream>>>(
        x, q, k, seg_start, static_cast<bf16 *>(o), lse, shape_of(t, heads, kv_heads, HD));
    return launch_error();
  });
}

int64_t attn_norm_bwd_parts(int64_t b, int64_t t, int64_t heads, int64_t head_dim) {
  const int64_t lanes = head_lanes(head_dim);
  const int64_t slots = kNormThreads / (lanes > 0 ? lanes : 1);
  const int64_t rows_per_part = slots * 8;  // about 8 q rows a thread
  const int64_t parts = (b * t * heads + rows_per_part - 1) / rows_per_part;
  return parts < 1 ? 1 : parts > 1024 ? 1024 : parts;
}

const char *attn_bwd(const void *qkv, const void *qr, const void *kr, const float *cos,
                     const float *sin, const int32_t *seg_start, const float *q_norm,
                     const float *k_norm, const float *rstd, const void *o, const float *lse,
                     const void *dout, float *delta, void *dqkv, float *dw_part, float *dq_norm,
                     float *dk_norm, int64_t parts, int64_t b, int64_t t, int64_t heads,
                     int64_t kv_heads, int64_t head_dim, int mask, cudaStream_t stream) {
  if (const char *e = check_args(mask, seg_start, q_norm, k_norm, rstd)) return e;
  if (q_norm != nullptr && (dw_part == nullptr || dq_norm == nullptr || dk_norm == nullptr ||
                            parts < 1 || parts > 65535))
    return "attention backward: qk-norm needs dw_part [2, parts, hd], dq_norm and dk_norm";
  const char *err = with_variant(head_dim, mask, [&](auto hd_c, auto mask_c) -> const char * {
    constexpr int HD = decltype(hd_c)::value, MODE = decltype(mask_c)::value;
    constexpr int smem = bwd_smem<HD, MODE>();
    static const cudaError_t dq_ok = allow_smem(attn_bwd_dq_kernel<HD, MODE>, smem);
    static const cudaError_t dkv_ok = allow_smem(attn_bwd_dkv_kernel<HD, MODE>, smem);
    if (dq_ok != cudaSuccess) return cudaGetErrorString(dq_ok);
    if (dkv_ok != cudaSuccess) return cudaGetErrorString(dkv_ok);
    const Shape sh = shape_of(t, heads, kv_heads, HD);
    const unsigned tiles = static_cast<unsigned>((t + kTile - 1) / kTile);
    const auto *x = static_cast<const bf16 *>(qkv);
    const auto *q = static_cast<const bf16 *>(qr), *k = static_cast<const bf16 *>(kr);
    const auto *dy = static_cast<const bf16 *>(dout);
    auto *dx = static_cast<bf16 *>(dqkv);
    attn_bwd_dq_kernel<HD, MODE>
        <<<dim3(tiles, static_cast<unsigned>(heads), static_cast<unsigned>(b)), kThreads, smem,
           stream>>>(x, q, k, cos, sin, seg_start, static_cast<const bf16 *>(o), lse, dy, delta,
                     dx, sh);
    if (const char *e = launch_error()) return e;
    attn_bwd_dkv_kernel<HD, MODE>
        <<<dim3(tiles, static_cast<unsigned>(kv_heads), static_cast<unsigned>(b)), kThreads,
           smem, stream>>>(x, q, k, cos, sin, seg_start, lse, dy, delta, dx, sh);
    return launch_error();
  });
  if (err != nullptr || q_norm == nullptr) return err;
  return with_head_dim(head_dim, [&](auto hd_c) -> const char * {
    constexpr int HD = decltype(hd_c)::value;
    qk_norm_bwd_kernel<HD><<<dim3(static_cast<unsigned>(parts), 2), kNormThreads, 0, stream>>>(
        static_cast<const bf16 *>(qkv), q_norm, k_norm, rstd, static_cast<bf16 *>(dqkv), dw_part,
        b, static_cast<int>(t), static_cast<int>(heads), static_cast<int>(kv_heads));
    if (const char *e = launch_error()) return e;
    qk_norm_dw_kernel<<<dim3((HD + 31) / 32, 2), dim3(32, 8), 0, stream>>>(
        dw_part, dq_norm, dk_norm, parts, HD);
    return launch_error();
  });
}

}  // namespace mm

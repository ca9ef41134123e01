// Causal grouped-query attention for short rows, straight from the merged q/k/v projection
// qkv [B, T, (H + 2 KV) 64]: kv heads are read once per group (no repeat_kv copies), and the
// backward writes the merged projection's gradient itself, RoPE undone on dq and dk as they are
// stored, with no fp32 dQ pass. Head dim 64, bf16 in and out, fp32 softmax and accumulators,
// tensor cores through mma.sync m16n8k16 (bf16 -> fp32) with ldmatrix operands, tiles copied by
// cp.async one step ahead of the math (double buffers). Flash attention's algorithm (online
// softmax forward, the logsumexp kept for backward; Dao, 2023):
//
// - rope_heads: q and k RoPE'd once into head-major qr [B, H, T, 64], kr [B, KV, T, 64] (bf16,
//   saved for backward), so every tile copied later is 8 KB in one piece.
// - forward: one block per (64-query tile, head, batch); 4 warps of 16 query rows; key/value
//   tiles of 64 up to the diagonal. Writes o [B, T, H, 64] (bf16) and lse [B, H, T] (fp32, in
//   base-2 units of the scaled scores: log2(sum exp2(s * scale * log2 e))).
// - backward, kernel 1 (dQ): one block per (query tile, head, batch). Computes
//   delta = rowsum(dO * O) for its rows (written for kernel 2), then over key tiles up to the
//   diagonal: S = Q K^T, P = exp2(S' - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K.
// - backward, kernel 2 (dK, dV): one block per (key tile, kv head, batch); 4 warps of 16 key
//   rows; over the group's query heads and the query tiles from the diagonal on, with S^T = K Q^T:
//   dV += P^T dO, dP^T = V dO^T, dK += dS^T Q. No atomics: every gradient element has one writer.
//   Both backward kernels recompute S and P (7 matmuls of a tile pair in all, against 5 with
//   atomics on dQ).
//
// On a diagonal tile a warp skips the 16-column blocks that lie wholly past its rows (or before
// its keys), and a warp whose rows are all past T only helps copy. Rows past T are zero-filled
// and never written.
//
// Rounding: q and k are RoPE'd in fp32 from the bf16 projection and rounded to bf16 once (as the
// qkv_heads kernel does), P and dS are rounded to bf16 for their matmuls (as every flash
// attention does), accumulators are fp32.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace {

using bf16 = __nv_bfloat16;

constexpr int kHd = 64;    // head dim
constexpr int kTile = 64;  // rows of a query or key tile
constexpr int kPad = 72;   // smem row stride (elements): 144 bytes, so ldmatrix rows hit distinct banks
constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

using Tile = bf16[kTile][kPad];

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
__device__ __forceinline__ void load_a(const Tile &s, int m0, int kk, uint32_t a[4]) {
  const int l = threadIdx.x % 32, j = l / 8, i = l % 8;
  ldsm_x4(&s[m0 + i + 8 * (j & 1)][16 * kk + 8 * (j >> 1)], a);
}

// B fragments of n-tiles n0/8 and n0/8 + 1 (b[0..1], b[2..3]) for k-step kk, from a tile stored
// [n][k] (B = the tile transposed: K in Q K^T).
__device__ __forceinline__ void load_b_nk(const Tile &s, int n0, int kk, uint32_t b[4]) {
  const int l = threadIdx.x % 32, j = l / 8, i = l % 8;
  ldsm_x4(&s[n0 + i + 8 * (j >> 1)][16 * kk + 8 * (j & 1)], b);
}

// The same from a tile stored [k][n] (B = the tile: V in P V), through ldmatrix's transpose.
__device__ __forceinline__ void load_b_kn(const Tile &s, int kk, int n0, uint32_t b[4]) {
  const int l = threadIdx.x % 32, j = l / 8, i = l % 8;
  ldsm_x4_t(&s[16 * kk + i + 8 * (j & 1)][n0 + 8 * (j >> 1)], b);
}

// acc[8][4] (16 x 64) += A (16 x 64, as 4 k-steps in registers) * B^T, B a [64][64] tile [n][k];
// only the column blocks of 16 in [LO, HI] (the others are masked out: causal, or past T).
template <int LO, int HI>
__device__ __forceinline__ void mma_nk(float acc[8][4], const uint32_t a[4][4], const Tile &s) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
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
template <int LO, int HI>
__device__ __forceinline__ void mma_nk(float acc[8][4], const Tile &a_tile, int m0,
                                       const Tile &s) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
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

// acc[8][4] (16 x 64) += A (16 x 64) * B, B a [64][64] tile stored [k][n]; only the k-steps
// in [LO, HI] (A is zero elsewhere).
template <int LO, int HI>
__device__ __forceinline__ void mma_kn(float acc[8][4], const uint32_t a[4][4], const Tile &s) {
#pragma unroll
  for (int kk = LO; kk <= HI; ++kk) {
#pragma unroll
    for (int np = 0; np < 4; ++np) {
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

__device__ __forceinline__ void zero(float acc[8][4]) {
#pragma unroll
  for (int n = 0; n < 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
}

// Rows t0 .. t0+63 of one head (64 bf16 at `src`, rows `ld` elements apart) into a tile by
// cp.async (16 bytes a thread a step); rows at or past T are zero-filled.
__device__ __forceinline__ void load_tile_async(Tile &s, const bf16 *__restrict__ src, int64_t ld,
                                                int t0, int t_n) {
#pragma unroll
  for (int k = 0; k < kTile * 8 / kThreads; ++k) {
    const int it = threadIdx.x + k * kThreads, r = it / 8, i = (it % 8) * 8, t = t0 + r;
    const bool in = t < t_n;
    cp_async16(&s[r][i], src + static_cast<int64_t>(in ? t : 0) * ld + i, in ? 16 : 0);
  }
}

// RoPE (rotate-half, fp32 tables [T, 64]) of q and k from the merged projection, rounded to bf16
// once as the qkv_heads kernel rounds, into head-major qr [B, H, T, 64] and kr [B, KV, T, 64]:
// every tile the attention kernels load is then 8 KB in one piece. One thread per 8 elements of
// a head's first half and the matching 8 of its second: item = ((b T + t)(H + KV) + head) 4 + q.
__global__ void rope_heads_kernel(const bf16 *__restrict__ qkv, const float *__restrict__ cos,
                                  const float *__restrict__ sin, bf16 *__restrict__ qr,
                                  bf16 *__restrict__ kr, int64_t b_n, int t_n, int heads,
                                  int kv_heads) {
  const int nh = heads + kv_heads;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= b_n * t_n * nh * 4) return;
  const int i = static_cast<int>(item % 4) * 8;
  int64_t rest = item / 4;
  const int head = static_cast<int>(rest % nh);
  rest /= nh;
  const int t = static_cast<int>(rest % t_n);
  const int64_t b = rest / t_n;
  const int64_t ld = static_cast<int64_t>(heads + 2 * kv_heads) * kHd;
  const bf16 *p = qkv + (b * t_n + t) * ld + head * kHd;
  const uint4 x1r = *reinterpret_cast<const uint4 *>(p + i);
  const uint4 x2r = *reinterpret_cast<const uint4 *>(p + 32 + i);
  const bf16 *x1 = reinterpret_cast<const bf16 *>(&x1r);
  const bf16 *x2 = reinterpret_cast<const bf16 *>(&x2r);
  const float *c = cos + static_cast<int64_t>(t) * kHd, *sn = sin + static_cast<int64_t>(t) * kHd;
  uint4 lo, hi;
  bf16 *y1 = reinterpret_cast<bf16 *>(&lo), *y2 = reinterpret_cast<bf16 *>(&hi);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float a = __bfloat162float(x1[k]), bb = __bfloat162float(x2[k]);
    y1[k] = __float2bfloat16_rn(__fadd_rn(__fmul_rn(a, c[i + k]), __fmul_rn(-bb, sn[i + k])));
    y2[k] = __float2bfloat16_rn(__fadd_rn(__fmul_rn(bb, c[32 + i + k]), __fmul_rn(a, sn[32 + i + k])));
  }
  bf16 *dst = head < heads ? qr + ((b * heads + head) * t_n + t) * kHd
                           : kr + ((b * kv_heads + (head - heads)) * t_n + t) * kHd;
  *reinterpret_cast<uint4 *>(dst + i) = lo;
  *reinterpret_cast<uint4 *>(dst + 32 + i) = hi;
}

// A 16 x 64 fp32 result (rows row0 + g, row0 + g + 8 of this lane) through RoPE's transpose
// (rope = true: g1 c1 + g2 s2, g2 c2 - g1 s1 for the column pairs (i, i + 32), which one lane
// holds: n-tiles nt and nt + 4) or as it is, times `mul`, to bf16 rows `ld` apart at dst.
__device__ void store_rows(float acc[8][4], bf16 *__restrict__ dst, int64_t ld, int row0,
                           int t_n, const float *__restrict__ cos, const float *__restrict__ sin,
                           bool rope, float mul) {
  const int l = threadIdx.x % 32, g = l / 4, c = 2 * (l % 4);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int t = row0 + g + 8 * half;
    if (t >= t_n) continue;
    bf16 *p = dst + static_cast<int64_t>(t) * ld;
    const float *cs = rope ? cos + static_cast<int64_t>(t) * kHd : nullptr;
    const float *sn = rope ? sin + static_cast<int64_t>(t) * kHd : nullptr;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int i = nt * 8 + c + e;
        float g1 = acc[nt][2 * half + e] * mul, g2 = acc[nt + 4][2 * half + e] * mul;
        if (rope) {
          const float d1 = g1 * cs[i] + g2 * sn[i + 32];
          const float d2 = g2 * cs[i + 32] - g1 * sn[i];
          g1 = d1, g2 = d2;
        }
        acc[nt][2 * half + e] = g1, acc[nt + 4][2 * half + e] = g2;
      }
      *reinterpret_cast<uint32_t *>(p + nt * 8 + c) =
          pack_bf16(acc[nt][2 * half], acc[nt][2 * half + 1]);
      *reinterpret_cast<uint32_t *>(p + 32 + nt * 8 + c) =
          pack_bf16(acc[nt + 4][2 * half], acc[nt + 4][2 * half + 1]);
    }
  }
}

// The last key block of 16 (0..3) that warp w (query rows t0 + 16w ..) needs in key tile j of
// query tile qt: all four below the diagonal, up to its own rows on it, none past T.
__device__ __forceinline__ int key_blocks(int j, int qt, int w, int t_n) {
  const int hi = j == qt ? w : 3;
  return min(hi, (t_n - 1 - j * kTile) / 16);
}

struct Shape {
  int t_n, heads, kv_heads;
  int64_t ld;  // (heads + 2 kv_heads) * 64: a row of the merged projection
  float scale_log2;
};

// Where the pieces of batch b start: q head h, k head j (RoPE'd, head-major), v head j (in the
// merged projection, rows ld apart), o / dO head h (rows H * 64 apart).
struct Heads {
  const Shape &sh;
  int64_t b;
  __device__ const bf16 *q(const bf16 *qr, int h) const {
    return qr + (b * sh.heads + h) * static_cast<int64_t>(sh.t_n) * kHd;
  }
  __device__ const bf16 *k(const bf16 *kr, int j) const {
    return kr + (b * sh.kv_heads + j) * static_cast<int64_t>(sh.t_n) * kHd;
  }
  __device__ int64_t v_col(int j) const { return (sh.heads + sh.kv_heads + j) * kHd; }
  __device__ int64_t k_col(int j) const { return (sh.heads + j) * kHd; }
  __device__ int64_t row0() const { return b * sh.t_n * sh.ld; }  // of qkv / dqkv
  __device__ int64_t o_head(int h) const { return (b * sh.t_n * sh.heads + h) * kHd; }
  __device__ int64_t lse_row0(int h) const { return (b * sh.heads + h) * sh.t_n; }
};

// Key tile and value tile of kv head j, rows t0 .. t0+63, into k and v by cp.async (not committed).
__device__ __forceinline__ void load_kv_async(Tile &k, Tile &v, const Heads &at, const bf16 *kr,
                                              const bf16 *qkv, int j, int t0) {
  load_tile_async(k, at.k(kr, j), kHd, t0, at.sh.t_n);
  load_tile_async(v, qkv + at.row0() + at.v_col(j), at.sh.ld, t0, at.sh.t_n);
}

constexpr int kFwdSmem = 5 * sizeof(Tile);  // q, k x 2, v x 2
constexpr int kBwdSmem = 6 * sizeof(Tile) + 4 * kTile * sizeof(float);

__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(
    const bf16 *__restrict__ qkv, const bf16 *__restrict__ qr, const bf16 *__restrict__ kr,
    bf16 *__restrict__ out, float *__restrict__ lse, Shape sh) {
  extern __shared__ __align__(16) unsigned char smem[];
  Tile *tiles = reinterpret_cast<Tile *>(smem);
  Tile &qs = tiles[0], *ks = tiles + 1, *vs = tiles + 3;
  const int qt = gridDim.x - 1 - blockIdx.x;  // the longest rows first
  const int h = blockIdx.y, kvh = h / (sh.heads / sh.kv_heads);
  const Heads at{sh, blockIdx.z};
  const int t0 = qt * kTile, w = threadIdx.x / 32, l = threadIdx.x % 32, g = l / 4;
  const int c = 2 * (l % 4);
  const bool live = t0 + 16 * w < sh.t_n;  // a warp whose rows are all past T only copies
  load_tile_async(qs, at.q(qr, h), kHd, t0, sh.t_n);
  load_kv_async(ks[0], vs[0], at, kr, qkv, kvh, 0);
  cp_async_commit();
  uint32_t qa[4][4];
  float o[8][4], m[2] = {-INFINITY, -INFINITY}, lsum[2] = {0.f, 0.f};
  zero(o);
  for (int j = 0; j <= qt; ++j) {
    cp_async_wait_all();
    __syncthreads();  // tile j is in, and every warp is done with tile j - 1's buffers
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) load_a(qs, 16 * w, kk, qa[kk]);
    }
    if (j < qt) {
      load_kv_async(ks[(j + 1) & 1], vs[(j + 1) & 1], at, kr, qkv, kvh, (j + 1) * kTile);
      cp_async_commit();
    }
    if (!live) continue;
    const bool diag = j == qt;
    // Key blocks of 16 up to HI: past this warp's last row on the diagonal, all masked.
    auto step = [&](auto hi_c) {
      constexpr int HI = decltype(hi_c)::value;
      float s[8][4];
      zero(s);
      mma_nk<0, HI>(s, qa, ks[j & 1]);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int q = t0 + 16 * w + g + 8 * half;
        float mx = m[half];
#pragma unroll
        for (int nt = 0; nt < 2 * (HI + 1); ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float v = s[nt][2 * half + e] * sh.scale_log2;
            if (diag && j * kTile + nt * 8 + c + e > q) v = -INFINITY;
            s[nt][2 * half + e] = v;
            mx = fmaxf(mx, v);
          }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float alpha = exp2f(m[half] - mx);
        m[half] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < 2 * (HI + 1); ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = exp2f(s[nt][2 * half + e] - mx);
            s[nt][2 * half + e] = p;
            sum += p;
          }
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          o[nt][2 * half] *= alpha;
          o[nt][2 * half + 1] *= alpha;
        }
        lsum[half] = lsum[half] * alpha + sum;
      }
      uint32_t pa[4][4];
      to_a(s, pa);
      mma_kn<0, HI>(o, pa, vs[j & 1]);
    };
    if (diag)
      dispatch4(key_blocks(j, qt, w, sh.t_n), step);
    else
      step(Int<3>{});
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = lsum[half];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int t = t0 + 16 * w + g + 8 * half;
    const float inv = 1.f / sum;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) o[nt][2 * half] *= inv, o[nt][2 * half + 1] *= inv;
    if (t < sh.t_n && l % 4 == 0) lse[at.lse_row0(h) + t] = m[half] + log2f(sum);
  }
  store_rows(o, out + at.o_head(h), sh.heads * kHd, t0 + 16 * w, sh.t_n, nullptr, nullptr,
             false, 1.f);
}

// dQ, and delta = rowsum(dO * O) for kernel 2. dqkv's q columns. Q and dO stay in shared memory
// and are read per k-step (not held in 32 more registers), so 4 blocks fit an SM, which was
// faster than 3 blocks with them in registers.
__global__ void __launch_bounds__(kThreads, 4) attn_bwd_dq_kernel(
    const bf16 *__restrict__ qkv, const bf16 *__restrict__ qr, const bf16 *__restrict__ kr,
    const float *__restrict__ cos, const float *__restrict__ sin, const bf16 *__restrict__ out,
    const float *__restrict__ lse, const bf16 *__restrict__ dout, float *__restrict__ delta,
    bf16 *__restrict__ dqkv, Shape sh) {
  extern __shared__ __align__(16) unsigned char smem[];
  Tile *tiles = reinterpret_cast<Tile *>(smem);
  Tile &qs = tiles[0], &dos = tiles[1], *ks = tiles + 2, *vs = tiles + 4;
  const int qt = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, kvh = h / (sh.heads / sh.kv_heads);
  const Heads at{sh, blockIdx.z};
  const int t0 = qt * kTile, w = threadIdx.x / 32, l = threadIdx.x % 32, g = l / 4;
  const int c = 2 * (l % 4);
  const int64_t od = static_cast<int64_t>(sh.heads) * kHd;  // a row of o and dO
  const bool live = t0 + 16 * w < sh.t_n;
  load_tile_async(qs, at.q(qr, h), kHd, t0, sh.t_n);
  load_tile_async(dos, dout + at.o_head(h), od, t0, sh.t_n);
  load_kv_async(ks[0], vs[0], at, kr, qkv, kvh, 0);
  cp_async_commit();
  float dl[2], lrow[2], dq[8][4];
  zero(dq);
  for (int j = 0; j <= qt; ++j) {
    cp_async_wait_all();
    __syncthreads();
    if (j == 0) {
      // delta for the two rows of this lane: lanes 4g .. 4g+3 share a row, 16 columns each.
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = 16 * w + g + 8 * half, t = t0 + r;
        float acc = 0.f;
        if (t < sh.t_n) {
          const bf16 *op = out + at.o_head(h) + static_cast<int64_t>(t) * od + (l % 4) * 16;
#pragma unroll
          for (int k = 0; k < 16; ++k)
            acc += __bfloat162float(op[k]) * __bfloat162float(dos[r][(l % 4) * 16 + k]);
        }
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        acc += __shfl_xor_sync(0xffffffffu, acc, 2);
        dl[half] = acc;
        lrow[half] = t < sh.t_n ? lse[at.lse_row0(h) + t] : 0.f;
        if (t < sh.t_n && l % 4 == 0) delta[at.lse_row0(h) + t] = acc;
      }
    }
    if (j < qt) {
      load_kv_async(ks[(j + 1) & 1], vs[(j + 1) & 1], at, kr, qkv, kvh, (j + 1) * kTile);
      cp_async_commit();
    }
    if (!live) continue;
    const bool diag = j == qt;
    const Tile &kt = ks[j & 1], &vt = vs[j & 1];
    auto step = [&](auto hi_c) {
      constexpr int HI = decltype(hi_c)::value;
      float s[8][4], dp[8][4];
      zero(s);
      zero(dp);
      mma_nk<0, HI>(s, qs, 16 * w, kt);
      mma_nk<0, HI>(dp, dos, 16 * w, vt);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int q = t0 + 16 * w + g + 8 * half;
#pragma unroll
        for (int nt = 0; nt < 2 * (HI + 1); ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int key = j * kTile + nt * 8 + c + e;
            float p = exp2f(s[nt][2 * half + e] * sh.scale_log2 - lrow[half]);
            if (diag && key > q) p = 0.f;
            s[nt][2 * half + e] = p * (dp[nt][2 * half + e] - dl[half]);
          }
        }
      }
      uint32_t dsa[4][4];
      to_a(s, dsa);
      mma_kn<0, HI>(dq, dsa, kt);
    };
    if (diag)
      dispatch4(key_blocks(j, qt, w, sh.t_n), step);
    else
      step(Int<3>{});
  }
  const float scale = sh.scale_log2 / kLog2e;
  store_rows(dq, dqkv + at.row0() + h * kHd, sh.ld, t0 + 16 * w, sh.t_n, cos, sin, true, scale);
}

// dK, dV of one key tile of one kv head: the k and v columns of dqkv. Iterates over the
// group's query heads and, for each, the query tiles from the diagonal on (flattened, so the
// next tile's copy overlaps this one's math). K and V stay in shared memory (3 blocks an SM, as
// for the dQ kernel). Measured and not kept: two key tiles a block, and 2 or 4 query heads a
// block in the other kernels (each copied tile serving more rows): all slower.
__global__ void __launch_bounds__(kThreads, 3) attn_bwd_dkv_kernel(
    const bf16 *__restrict__ qkv, const bf16 *__restrict__ qr, const bf16 *__restrict__ kr,
    const float *__restrict__ cos, const float *__restrict__ sin, const float *__restrict__ lse,
    const bf16 *__restrict__ dout, const float *__restrict__ delta, bf16 *__restrict__ dqkv,
    Shape sh) {
  extern __shared__ __align__(16) unsigned char smem[];
  Tile *tiles = reinterpret_cast<Tile *>(smem);
  Tile &ks = tiles[0], &vs = tiles[1], *qs = tiles + 2, *dos = tiles + 4;
  float(*ls)[kTile] = reinterpret_cast<float(*)[kTile]>(tiles + 6);
  float(*ds)[kTile] = ls + 2;
  const int kt = gridDim.x - 1 - blockIdx.x;  // the first key tiles see the most queries
  const int kvh = blockIdx.y, n_rep = sh.heads / sh.kv_heads;
  const Heads at{sh, blockIdx.z};
  const int k0 = kt * kTile, w = threadIdx.x / 32, l = threadIdx.x % 32, g = l / 4;
  const int c = 2 * (l % 4);
  const int64_t od = static_cast<int64_t>(sh.heads) * kHd;
  const bool live = k0 + 16 * w < sh.t_n;
  const int q_tiles = (sh.t_n + kTile - 1) / kTile, per_head = q_tiles - kt;
  const int steps = n_rep * per_head;
  // Step it: query head kvh n_rep + it / per_head, query tile kt + it % per_head.
  auto issue = [&](int it, int buf) {
    const int h = kvh * n_rep + it / per_head, t0 = (kt + it % per_head) * kTile;
    load_tile_async(qs[buf], at.q(qr, h), kHd, t0, sh.t_n);
    load_tile_async(dos[buf], dout + at.o_head(h), od, t0, sh.t_n);
    cp_async_commit();
    if (threadIdx.x < kTile) {
      const int t = t0 + threadIdx.x;
      // Past T: lse +inf makes P 0 (the zero-filled Q gives finite scores).
      ls[buf][threadIdx.x] = t < sh.t_n ? lse[at.lse_row0(h) + t] : INFINITY;
      ds[buf][threadIdx.x] = t < sh.t_n ? delta[at.lse_row0(h) + t] : 0.f;
    }
  };
  load_kv_async(ks, vs, at, kr, qkv, kvh, k0);
  issue(0, 0);
  float dk[8][4], dv[8][4];
  zero(dk);
  zero(dv);
  for (int it = 0; it < steps; ++it) {
    const int buf = it & 1, i = kt + it % per_head;
    cp_async_wait_all();
    __syncthreads();
    if (it + 1 < steps) issue(it + 1, buf ^ 1);
    if (!live) continue;
    const bool diag = i == kt;
    const Tile &q = qs[buf], &dO = dos[buf];
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
        const int key = k0 + 16 * w + g + 8 * half;
#pragma unroll
        for (int nt = 2 * LO; nt < 2 * (HI + 1); ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int qc = nt * 8 + c + e;
            float p = exp2f(s[nt][2 * half + e] * sh.scale_log2 - ls[buf][qc]);
            if (diag && i * kTile + qc < key) p = 0.f;
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
  store_rows(dk, dst + at.k_col(kvh), sh.ld, k0 + 16 * w, sh.t_n, cos, sin, true, scale);
  store_rows(dv, dst + at.v_col(kvh), sh.ld, k0 + 16 * w, sh.t_n, cos, sin, false, 1.f);
}

const char *launch_error() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

Shape shape_of(int64_t t, int64_t heads, int64_t kv_heads) {
  Shape s;
  s.t_n = static_cast<int>(t);
  s.heads = static_cast<int>(heads);
  s.kv_heads = static_cast<int>(kv_heads);
  s.ld = (heads + 2 * kv_heads) * kHd;
  s.scale_log2 = kLog2e / sqrtf(static_cast<float>(kHd));
  return s;
}

// Dynamic shared memory over 48 KB needs an opt-in per kernel (once per process).
template <typename K>
cudaError_t allow_smem(K kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

}  // namespace

namespace mm {

const char *attn_fwd(const void *qkv, const float *cos, const float *sin, void *qr, void *kr,
                     void *o, float *lse, int64_t b, int64_t t, int64_t heads, int64_t kv_heads,
                     cudaStream_t stream) {
  static const cudaError_t smem_ok = allow_smem(attn_fwd_kernel, kFwdSmem);
  if (smem_ok != cudaSuccess) return cudaGetErrorString(smem_ok);
  const auto *x = static_cast<const bf16 *>(qkv);
  auto *q = static_cast<bf16 *>(qr), *k = static_cast<bf16 *>(kr);
  const int64_t items = b * t * (heads + kv_heads) * 4;
  rope_heads_kernel<<<static_cast<unsigned>((items + 255) / 256), 256, 0, stream>>>(
      x, cos, sin, q, k, b, static_cast<int>(t), static_cast<int>(heads),
      static_cast<int>(kv_heads));
  if (const char *e = launch_error()) return e;
  const dim3 grid(static_cast<unsigned>((t + kTile - 1) / kTile), static_cast<unsigned>(heads),
                  static_cast<unsigned>(b));
  attn_fwd_kernel<<<grid, kThreads, kFwdSmem, stream>>>(x, q, k, static_cast<bf16 *>(o), lse,
                                                        shape_of(t, heads, kv_heads));
  return launch_error();
}

const char *attn_bwd(const void *qkv, const void *qr, const void *kr, const float *cos,
                     const float *sin, const void *o, const float *lse, const void *dout,
                     float *delta, void *dqkv, int64_t b, int64_t t, int64_t heads,
                     int64_t kv_heads, cudaStream_t stream) {
  static const cudaError_t dq_ok = allow_smem(attn_bwd_dq_kernel, kBwdSmem);
  static const cudaError_t dkv_ok = allow_smem(attn_bwd_dkv_kernel, kBwdSmem);
  if (dq_ok != cudaSuccess) return cudaGetErrorString(dq_ok);
  if (dkv_ok != cudaSuccess) return cudaGetErrorString(dkv_ok);
  const Shape sh = shape_of(t, heads, kv_heads);
  const unsigned tiles = static_cast<unsigned>((t + kTile - 1) / kTile);
  const auto *x = static_cast<const bf16 *>(qkv);
  const auto *q = static_cast<const bf16 *>(qr), *k = static_cast<const bf16 *>(kr);
  const auto *dy = static_cast<const bf16 *>(dout);
  auto *dx = static_cast<bf16 *>(dqkv);
  attn_bwd_dq_kernel<<<dim3(tiles, static_cast<unsigned>(heads), static_cast<unsigned>(b)),
                       kThreads, kBwdSmem, stream>>>(x, q, k, cos, sin,
                                                     static_cast<const bf16 *>(o), lse, dy,
                                                     delta, dx, sh);
  if (const char *e = launch_error()) return e;
  attn_bwd_dkv_kernel<<<dim3(tiles, static_cast<unsigned>(kv_heads), static_cast<unsigned>(b)),
                        kThreads, kBwdSmem, stream>>>(x, q, k, cos, sin, lse, dy, delta, dx, sh);
  return launch_error();
}

}  // namespace mm

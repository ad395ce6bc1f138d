// Soft-mask attention (docs/DESIGN.md section 4): fused CUDA forward and backward.
//
// Specification: megatron_conan/ops/soft_mask_attention/reference.py. Restated for row i (0-based
// positions) whose key window is [lo_i, hi_i), its text:
//   logit[i, j] = scale * q_i . k_j + log M[i, j],
//   M[i, j] = 1 (lo_i <= j <= i), m_i (i < j < hi_i), 0 otherwise
//   out_i = sum_j softmax(logit[i, :])_j v_j, zero for rows with an empty window.
// Right-padded rows of true length L are the case [0, L) on rows i < L (empty beyond); packed rows
// (several texts per row) pass lo, hi [b, s] explicitly (reference.key_windows_from_cu_seqlens).
//
// Structure (a simple tiled flash-attention, fp32 accumulation, no tensor cores yet):
// - a warp owns kRowsPerWarp rows; each lane holds kDPL = ceil(d / 32) elements of a row, so a
//   dot product is kDPL FMAs and a warp reduction; the head dim is padded to 32 * kDPL inside.
// - key/value (or query/grad) tiles of kTile rows are staged in shared memory as fp32.
// - forward: online softmax per tile (lane t keeps the logit of key t of the tile); a query block
//   visits the key tiles of the union of its valid rows' windows, up to its diagonal, and the tiles
//   above it only if one of its valid rows has m_i > 0 (with a = 0 the kernel costs what causal
//   attention costs; tiles holding only other texts' keys are never visited). Keys outside a row's
//   own window are masked per element: a tile may straddle a text boundary.
// - backward: delta = rowsum(dO * O); dQ by query blocks over the forward's key tiles; dK, dV by key
//   blocks over the query tiles of the union of their keys' windows (a key's window is its text, and
//   the rows that see a key are that text's rows) and the query heads of the KV group (GQA) - no
//   atomics, so it is deterministic.
//
// Header choice: no ATen/cuda or c10/cuda headers (CUDAContext.h needs cusparse headers, and the
// CPU torch wheel where CI compile-checks this file lacks c10/cuda's generated cmake macros). The
// caller passes the CUDA stream and has made the tensors' device current (cuda_binding.py does).

#include "soft_mask_attention.h"

#include <ATen/Dispatch.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace megatron_conan {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kRowsPerWarp = 4;
constexpr int kBlockRows = kWarps * kRowsPerWarp;  // query rows (or key rows) per thread block
constexpr int kTile = 32;                          // staged rows per shared tile: one per lane
constexpr int kMaxHeadDim = 128;
constexpr unsigned kFullMask = 0xffffffffu;

// Element strides of a [b, heads, s, d] tensor whose d stride is 1.
struct Strides {
  int64_t b;
  int64_t h;
  int64_t s;
};

Strides strides_of(const at::Tensor& t) { return Strides{t.stride(0), t.stride(1), t.stride(2)}; }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1)
    x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

// log M[i, j] for a key j in row i's window: 0 at/below the diagonal, log m_i above it (-inf when
// m_i = 0).
__device__ __forceinline__ float log_weight(int i, int j, float log_m_i) { return j <= i ? 0.f : log_m_i; }

__device__ __forceinline__ float log_or_minus_inf(float x) { return x > 0.f ? logf(x) : -CUDART_INF_F; }

// Stages rows [first, first + kTile) of one head of a [b, h, s, d] tensor as fp32, zero outside
// `span` (positions [span.x, span.y), within the sequence: no row of the block reads others) and
// beyond head_dim. Called by all threads of the block.
template <typename scalar_t>
__device__ __forceinline__ void stage_tile(float (*tile)[kMaxHeadDim], const scalar_t* base, int64_t stride_s,
                                           int first, int2 span, int head_dim) {
  for (int idx = threadIdx.x; idx < kTile * kMaxHeadDim; idx += kThreads) {
    const int row = idx / kMaxHeadDim;
    const int d = idx % kMaxHeadDim;
    const int pos = first + row;
    tile[row][d] = (pos >= span.x && pos < span.y && d < head_dim) ? to_float(base[pos * stride_s + d]) : 0.f;
  }
}

// This lane's kDPL elements of row `pos` of one head (zero unless `valid`, and beyond head_dim).
template <typename scalar_t, int kDPL>
__device__ __forceinline__ void load_row(float (&dst)[kDPL], const scalar_t* base, int64_t stride_s, int pos,
                                         bool valid, int head_dim, float factor) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int e = 0; e < kDPL; ++e) {
    const int d = lane * kDPL + e;
    dst[e] = (valid && d < head_dim) ? to_float(base[pos * stride_s + d]) * factor : 0.f;
  }
}

template <int kDPL>
__device__ __forceinline__ float dot_with_tile(const float (&row)[kDPL], const float* tile_row) {
  const int lane = threadIdx.x % kWarpSize;
  float partial = 0.f;
#pragma unroll
  for (int e = 0; e < kDPL; ++e) partial += row[e] * tile_row[lane * kDPL + e];
  return warp_sum(partial);
}

template <typename scalar_t, int kDPL>
__device__ __forceinline__ void store_row(scalar_t* base, int64_t stride_s, int pos, int seq, int head_dim,
                                          const float (&src)[kDPL], float factor) {
  if (pos >= seq) return;
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int e = 0; e < kDPL; ++e) {
    const int d = lane * kDPL + e;
    if (d < head_dim) base[pos * stride_s + d] = static_cast<scalar_t>(src[e] * factor);
  }
}

// Both tiles of one step of a tile loop; the leading barrier lets the previous step finish reading.
template <typename scalar_t>
__device__ __forceinline__ void stage_tile_pair(float (*tile_a)[kMaxHeadDim], float (*tile_b)[kMaxHeadDim],
                                                const scalar_t* base_a, const scalar_t* base_b, int64_t stride_a,
                                                int64_t stride_b, int first, int2 span, int head_dim) {
  __syncthreads();
  stage_tile(tile_a, base_a, stride_a, first, span, head_dim);
  stage_tile(tile_b, base_b, stride_b, first, span, head_dim);
  __syncthreads();
}

// The key windows of one sequence (reference.py): [lo_i, hi_i) read from the packed rows' lo, hi
// when given, else [0, L) on the real rows of a right-padded sequence. Positions outside the
// sequence have an empty window, and a window is clipped to [0, seq), so that a malformed window
// never makes a kernel read outside the sequence. An empty window is (0, 0).
struct SequenceWindows {
  const int* lo;  // row bz of lo [b, s], or nullptr (right padding)
  const int* hi;
  int L, seq;

  __device__ SequenceWindows(const int* key_lo, const int* key_hi, const int* lengths, int bz, int seq_len)
      : lo(key_lo == nullptr ? nullptr : key_lo + static_cast<int64_t>(bz) * seq_len),
        hi(key_hi == nullptr ? nullptr : key_hi + static_cast<int64_t>(bz) * seq_len),
        L(min(max(lengths[bz], 0), seq_len)),
        seq(seq_len) {}

  __device__ int2 operator()(int i) const {
    if (i < 0 || i >= seq) return make_int2(0, 0);
    if (lo == nullptr || hi == nullptr) return i < L ? make_int2(0, L) : make_int2(0, 0);
    const int first = max(lo[i], 0);
    const int end = min(hi[i], seq);
    return first < end ? make_int2(first, end) : make_int2(0, 0);
  }
};

__device__ __forceinline__ bool in_window(int j, int2 window) { return j >= window.x && j < window.y; }

// The union [min lo, max hi) of the windows the warps pass (each warp the union over its rows,
// warp-uniform; (seq, 0) for none), for the whole thread block; (seq, 0) or any empty span when no
// row has a window. Called once per kernel by all threads (it ends with a barrier).
__device__ __forceinline__ int2 block_span(int2 warp_span) {
  __shared__ int span_lo[kWarps];
  __shared__ int span_hi[kWarps];
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) {
    span_lo[warp] = warp_span.x;
    span_hi[warp] = warp_span.y;
  }
  __syncthreads();
  int2 span = warp_span;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    span.x = min(span.x, span_lo[w]);
    span.y = max(span.y, span_hi[w]);
  }
  return span;
}

// Adds a non-empty window to a span (warp-uniform arguments).
__device__ __forceinline__ int2 widen(int2 span, int2 window) {
  return window.y > window.x ? make_int2(min(span.x, window.x), max(span.y, window.y)) : span;
}

// A thread block owning query rows [start_m, start_m + kBlockRows) of head h of sequence bz
// (grid (ceil(s / kBlockRows), b * hq)).
struct QueryBlock {
  int bh, bz, h, kvh, start_m;

  __device__ QueryBlock(int heads, int group)
      : bh(blockIdx.y),
        bz(blockIdx.y / heads),
        h(blockIdx.y % heads),
        kvh(blockIdx.y % heads / group),
        start_m(blockIdx.x * kBlockRows) {}

  // The key tiles to visit, [first tile start, end): those of `keys` (the union of the block's
  // valid rows' windows) up to the diagonal, or all of them when a valid row has m_i > 0. The number
  // visited is triton_kernel.windowed_block_count's with blocks of kBlockRows queries and kTile keys.
  __device__ int2 key_tiles(int2 keys, bool block_open) const {
    if (keys.y <= keys.x) return make_int2(0, 0);
    const int end = block_open ? keys.y : min(start_m + kBlockRows, keys.y);
    return make_int2(keys.x / kTile * kTile, end);
  }
};

// ------------------------------------------------------------------------------------------------
// Forward: grid (ceil(s / kBlockRows), b * hq).

template <typename scalar_t, int kDPL>
__global__ void __launch_bounds__(kThreads)
    soft_mask_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                         const scalar_t* __restrict__ v, const float* __restrict__ m,
                         const int* __restrict__ lengths, const int* __restrict__ key_lo,
                         const int* __restrict__ key_hi, scalar_t* __restrict__ out, float* __restrict__ lse,
                         int* __restrict__ block_counter, Strides sq, Strides sk, Strides sv, Strides so,
                         int heads, int group, int seq, int head_dim, float scale) {
  __shared__ float k_tile[kTile][kMaxHeadDim];
  __shared__ float v_tile[kTile][kMaxHeadDim];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const QueryBlock blk(heads, group);
  const int bh = blk.bh, bz = blk.bz, h = blk.h, start_m = blk.start_m;
  const SequenceWindows windows(key_lo, key_hi, lengths, bz, seq);
  const scalar_t* k_base = k + bz * sk.b + blk.kvh * sk.h;
  const scalar_t* v_base = v + bz * sv.b + blk.kvh * sv.h;
  const scalar_t* q_base = q + bz * sq.b + h * sq.h;

  float q_row[kRowsPerWarp][kDPL];
  float acc[kRowsPerWarp][kDPL];
  float row_max[kRowsPerWarp];
  float row_sum[kRowsPerWarp];
  float log_m[kRowsPerWarp];
  int2 window[kRowsPerWarp];  // warp-uniform, (0, 0) on padded rows
  int2 warp_keys = make_int2(seq, 0);
  bool any_open = false;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = start_m + warp * kRowsPerWarp + r;
    window[r] = windows(i);
    const bool valid = window[r].y > window[r].x;
    warp_keys = widen(warp_keys, window[r]);
    const float m_i = valid ? m[static_cast<int64_t>(bz) * seq + i] : 0.f;
    any_open |= m_i > 0.f;
    log_m[r] = log_or_minus_inf(m_i);
    load_row<scalar_t, kDPL>(q_row[r], q_base, sq.s, i, valid, head_dim, scale);  // scale folded into q
#pragma unroll
    for (int e = 0; e < kDPL; ++e) acc[r][e] = 0.f;
    row_max[r] = -CUDART_INF_F;
    row_sum[r] = 0.f;
  }
  const int2 keys = block_span(warp_keys);
  const int2 tiles = blk.key_tiles(keys, __syncthreads_or(any_open));
  for (int first = tiles.x; first < tiles.y; first += kTile) {
    stage_tile_pair(k_tile, v_tile, k_base, v_base, sk.s, sv.s, first, keys, head_dim);
    if (block_counter != nullptr && threadIdx.x == 0) atomicAdd(block_counter, 1);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int i = start_m + warp * kRowsPerWarp + r;
      // warp-uniform: a padded row, or a tile wholly outside the row's window (another text)
      if (first >= window[r].y || first + kTile <= window[r].x) continue;
      float my_logit = -CUDART_INF_F;  // lane t: logit of key first + t
      for (int t = 0; t < kTile; ++t) {
        const int j = first + t;
        const float s = dot_with_tile<kDPL>(q_row[r], k_tile[t]);
        if (lane == t) my_logit = in_window(j, window[r]) ? s + log_weight(i, j, log_m[r]) : -CUDART_INF_F;
      }
      const float new_max = fmaxf(row_max[r], warp_max(my_logit));
      if (new_max == -CUDART_INF_F) continue;  // nothing visible to this row yet
      const float p = __expf(my_logit - new_max);
      const float correction = __expf(row_max[r] - new_max);
      row_sum[r] = row_sum[r] * correction + warp_sum(p);
#pragma unroll
      for (int e = 0; e < kDPL; ++e) acc[r][e] *= correction;
      for (int t = 0; t < kTile; ++t) {
        const float p_t = __shfl_sync(kFullMask, p, t);
        if (p_t == 0.f) continue;  // uniform after the shuffle
#pragma unroll
        for (int e = 0; e < kDPL; ++e) acc[r][e] += p_t * v_tile[t][lane * kDPL + e];
      }
      row_max[r] = new_max;
    }
  }

  scalar_t* o_base = out + bz * so.b + h * so.h;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = start_m + warp * kRowsPerWarp + r;
    if (i >= seq) continue;
    const bool valid = window[r].y > window[r].x && row_sum[r] > 0.f;
    store_row<scalar_t, kDPL>(o_base, so.s, i, seq, head_dim, acc[r], valid ? 1.f / row_sum[r] : 0.f);
    if (lane == 0) lse[static_cast<int64_t>(bh) * seq + i] = valid ? row_max[r] + logf(row_sum[r]) : CUDART_INF_F;
  }
}

// ------------------------------------------------------------------------------------------------
// Backward, step 1: delta = rowsum(dO * O), one warp per row.

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    soft_mask_bwd_delta_kernel(const scalar_t* __restrict__ out, const scalar_t* __restrict__ grad_out,
                               float* __restrict__ delta, Strides so, Strides sdo, int heads, int seq,
                               int head_dim, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // warp-uniform
  const int lane = threadIdx.x % kWarpSize;
  const int64_t bh = row / seq;
  const int i = static_cast<int>(row % seq);
  const int64_t bz = bh / heads;
  const int64_t h = bh % heads;
  const scalar_t* o_row = out + bz * so.b + h * so.h + i * so.s;
  const scalar_t* do_row = grad_out + bz * sdo.b + h * sdo.h + i * sdo.s;
  float partial = 0.f;
  for (int d = lane; d < head_dim; d += kWarpSize) partial += to_float(o_row[d]) * to_float(do_row[d]);
  const float total = warp_sum(partial);
  if (lane == 0) delta[row] = total;
}

// ------------------------------------------------------------------------------------------------
// Backward, step 2: dQ. Grid (ceil(s / kBlockRows), b * hq); the same key tiles as the forward.

template <typename scalar_t, int kDPL>
__global__ void __launch_bounds__(kThreads)
    soft_mask_bwd_dq_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                            const scalar_t* __restrict__ v, const scalar_t* __restrict__ grad_out,
                            const float* __restrict__ m, const int* __restrict__ lengths,
                            const int* __restrict__ key_lo, const int* __restrict__ key_hi,
                            const float* __restrict__ lse, const float* __restrict__ delta,
                            scalar_t* __restrict__ dq, Strides sq, Strides sk, Strides sv, Strides sdo,
                            Strides sdq, int heads, int group, int seq, int head_dim, float scale) {
  __shared__ float k_tile[kTile][kMaxHeadDim];
  __shared__ float v_tile[kTile][kMaxHeadDim];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const QueryBlock blk(heads, group);
  const int bh = blk.bh, bz = blk.bz, h = blk.h, start_m = blk.start_m;
  const SequenceWindows windows(key_lo, key_hi, lengths, bz, seq);
  const scalar_t* k_base = k + bz * sk.b + blk.kvh * sk.h;
  const scalar_t* v_base = v + bz * sv.b + blk.kvh * sv.h;

  float q_row[kRowsPerWarp][kDPL];
  float do_row[kRowsPerWarp][kDPL];
  float dq_acc[kRowsPerWarp][kDPL];
  float row_lse[kRowsPerWarp];
  float row_delta[kRowsPerWarp];
  float log_m[kRowsPerWarp];
  int2 window[kRowsPerWarp];  // warp-uniform, (0, 0) on padded rows
  int2 warp_keys = make_int2(seq, 0);
  bool any_open = false;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = start_m + warp * kRowsPerWarp + r;
    window[r] = windows(i);
    const bool valid = window[r].y > window[r].x;
    warp_keys = widen(warp_keys, window[r]);
    const float m_i = valid ? m[static_cast<int64_t>(bz) * seq + i] : 0.f;
    any_open |= m_i > 0.f;
    log_m[r] = log_or_minus_inf(m_i);
    load_row<scalar_t, kDPL>(q_row[r], q + bz * sq.b + h * sq.h, sq.s, i, valid, head_dim, scale);
    load_row<scalar_t, kDPL>(do_row[r], grad_out + bz * sdo.b + h * sdo.h, sdo.s, i, valid, head_dim, 1.f);
    row_lse[r] = valid ? lse[static_cast<int64_t>(bh) * seq + i] : CUDART_INF_F;
    row_delta[r] = valid ? delta[static_cast<int64_t>(bh) * seq + i] : 0.f;
#pragma unroll
    for (int e = 0; e < kDPL; ++e) dq_acc[r][e] = 0.f;
  }
  const int2 keys = block_span(warp_keys);
  const int2 tiles = blk.key_tiles(keys, __syncthreads_or(any_open));
  for (int first = tiles.x; first < tiles.y; first += kTile) {
    stage_tile_pair(k_tile, v_tile, k_base, v_base, sk.s, sv.s, first, keys, head_dim);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int i = start_m + warp * kRowsPerWarp + r;
      if (first >= window[r].y || first + kTile <= window[r].x) continue;  // as in the forward
      float my_ds = 0.f;  // lane t: dS of key first + t
      for (int t = 0; t < kTile; ++t) {
        const int j = first + t;
        const float s = dot_with_tile<kDPL>(q_row[r], k_tile[t]);
        const float dp = dot_with_tile<kDPL>(do_row[r], v_tile[t]);
        if (lane == t && in_window(j, window[r])) {
          const float p = __expf(s + log_weight(i, j, log_m[r]) - row_lse[r]);
          my_ds = p * (dp - row_delta[r]);
        }
      }
      for (int t = 0; t < kTile; ++t) {
        const float ds_t = __shfl_sync(kFullMask, my_ds, t);
        if (ds_t == 0.f) continue;
#pragma unroll
        for (int e = 0; e < kDPL; ++e) dq_acc[r][e] += ds_t * k_tile[t][lane * kDPL + e];
      }
    }
  }
  scalar_t* dq_base = dq + bz * sdq.b + h * sdq.h;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = start_m + warp * kRowsPerWarp + r;
    store_row<scalar_t, kDPL>(dq_base, sdq.s, i, seq, head_dim, dq_acc[r], scale);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward, step 3: dK and dV. Grid (ceil(s / kBlockRows), b * hkv); each warp owns kRowsPerWarp
// keys and loops over the query heads of its group and the query tiles that see its keys: those of
// the union of the keys' windows (a key's window is its text, whose rows are the ones that attend
// to it), less the tiles wholly before the keys whose rows all have m_i = 0.

template <typename scalar_t, int kDPL>
__global__ void __launch_bounds__(kThreads)
    soft_mask_bwd_dkdv_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                              const scalar_t* __restrict__ v, const scalar_t* __restrict__ grad_out,
                              const float* __restrict__ m, const int* __restrict__ lengths,
                              const int* __restrict__ key_lo, const int* __restrict__ key_hi,
                              const float* __restrict__ lse, const float* __restrict__ delta,
                              scalar_t* __restrict__ dk, scalar_t* __restrict__ dv, Strides sq, Strides sk,
                              Strides sv, Strides sdo, Strides sdk, Strides sdv, int heads, int kv_heads,
                              int group, int seq, int head_dim, float scale) {
  __shared__ float q_tile[kTile][kMaxHeadDim];
  __shared__ float do_tile[kTile][kMaxHeadDim];
  __shared__ float lse_tile[kTile];
  __shared__ float delta_tile[kTile];
  __shared__ float log_m_tile[kTile];
  __shared__ int2 window_tile[kTile];  // the staged query rows' windows
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int bz = blockIdx.y / kv_heads;
  const int kvh = blockIdx.y % kv_heads;
  const int start_n = blockIdx.x * kBlockRows;
  const SequenceWindows windows(key_lo, key_hi, lengths, bz, seq);

  float k_row[kRowsPerWarp][kDPL];
  float v_row[kRowsPerWarp][kDPL];
  float dk_acc[kRowsPerWarp][kDPL];
  float dv_acc[kRowsPerWarp][kDPL];
  bool key_valid[kRowsPerWarp];  // warp-uniform
  int2 warp_queries = make_int2(seq, 0);
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int j = start_n + warp * kRowsPerWarp + r;
    const int2 window = windows(j);
    key_valid[r] = window.y > window.x;
    warp_queries = widen(warp_queries, window);
    load_row<scalar_t, kDPL>(k_row[r], k + bz * sk.b + kvh * sk.h, sk.s, j, key_valid[r], head_dim, scale);
    load_row<scalar_t, kDPL>(v_row[r], v + bz * sv.b + kvh * sv.h, sv.s, j, key_valid[r], head_dim, 1.f);
#pragma unroll
    for (int e = 0; e < kDPL; ++e) dk_acc[r][e] = dv_acc[r][e] = 0.f;
  }
  const int2 queries = block_span(warp_queries);
  const bool any_query = queries.y > queries.x;
  const int query_begin = any_query ? queries.x / kTile * kTile : 0;
  const int query_end = any_query ? queries.y : 0;

  for (int g = 0; g < group; ++g) {
    const int h = kvh * group + g;
    const int64_t bh = static_cast<int64_t>(bz) * heads + h;
    const scalar_t* q_base = q + bz * sq.b + h * sq.h;
    const scalar_t* do_base = grad_out + bz * sdo.b + h * sdo.h;
    for (int first = query_begin; first < query_end; first += kTile) {
      stage_tile_pair(q_tile, do_tile, q_base, do_base, sq.s, sdo.s, first, queries, head_dim);
      bool open = false;
      if (threadIdx.x < kTile) {
        const int i = first + threadIdx.x;
        const int2 window = windows(i);
        const bool valid = window.y > window.x;
        const float m_i = valid ? m[static_cast<int64_t>(bz) * seq + i] : 0.f;
        open = m_i > 0.f;
        window_tile[threadIdx.x] = window;
        log_m_tile[threadIdx.x] = log_or_minus_inf(m_i);
        lse_tile[threadIdx.x] = valid ? lse[bh * seq + i] : CUDART_INF_F;
        delta_tile[threadIdx.x] = valid ? delta[bh * seq + i] : 0.f;
      }
      // Rows of a tile that ends before this key block see its keys only through m_i. (The barrier
      // also publishes the per-row values written above.)
      const bool tile_open = __syncthreads_or(open);
      if (first + kTile <= start_n && !tile_open) continue;  // block-uniform
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int j = start_n + warp * kRowsPerWarp + r;
        if (!key_valid[r]) continue;
        for (int t = 0; t < kTile; ++t) {
          const int i = first + t;
          if (!in_window(j, window_tile[t])) continue;  // another text's row, or padding
          const float weight = log_weight(i, j, log_m_tile[t]);
          if (weight == -CUDART_INF_F) continue;
          const float s = dot_with_tile<kDPL>(k_row[r], q_tile[t]);  // k is pre-scaled
          const float p = __expf(s + weight - lse_tile[t]);
          const float dp = dot_with_tile<kDPL>(v_row[r], do_tile[t]);
          const float ds = p * (dp - delta_tile[t]);
#pragma unroll
          for (int e = 0; e < kDPL; ++e) {
            dv_acc[r][e] += p * do_tile[t][lane * kDPL + e];
            dk_acc[r][e] += ds * q_tile[t][lane * kDPL + e];
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int j = start_n + warp * kRowsPerWarp + r;
    store_row<scalar_t, kDPL>(dk + bz * sdk.b + kvh * sdk.h, sdk.s, j, seq, head_dim, dk_acc[r], scale);
    store_row<scalar_t, kDPL>(dv + bz * sdv.b + kvh * sdv.h, sdv.s, j, seq, head_dim, dv_acc[r], 1.f);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& m,
                  const at::Tensor& lengths) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda() && m.is_cuda() && lengths.is_cuda(),
              "soft-mask attention (CUDA): all tensors must be on the GPU");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be [b, heads, s, d]");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              "q [b, hq, s, d] and k [b, hkv, s, d] disagree");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of KV groups");
  TORCH_CHECK(q.size(3) <= kMaxHeadDim, "head dim must be <= ", kMaxHeadDim);
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must share a dtype");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q, k, v need stride 1 on d");
  TORCH_CHECK(m.scalar_type() == at::kFloat && m.is_contiguous() && m.dim() == 2 && m.size(0) == q.size(0) &&
                  m.size(1) == q.size(2),
              "m must be contiguous float32 [b, s]");
  TORCH_CHECK(lengths.scalar_type() == at::kInt && lengths.is_contiguous() && lengths.numel() == q.size(0),
              "lengths must be contiguous int32 [b]");
}

// The packed rows' key windows as device pointers {lo, hi}, or {nullptr, nullptr} (right padding:
// the kernels derive [0, L) from lengths). Both or neither; contiguous int32 [b, s] beside q.
std::pair<const int*, const int*> key_window_pointers(const at::Tensor& q, const std::optional<at::Tensor>& key_lo,
                                                      const std::optional<at::Tensor>& key_hi) {
  TORCH_CHECK(key_lo.has_value() == key_hi.has_value(), "key windows: pass both key_lo and key_hi, or neither");
  if (!key_lo.has_value()) return {nullptr, nullptr};
  for (const at::Tensor* window : {&*key_lo, &*key_hi}) {
    TORCH_CHECK(window->is_cuda() && window->device() == q.device(), "key windows must be on q's GPU");
    TORCH_CHECK(window->scalar_type() == at::kInt && window->is_contiguous() && window->dim() == 2 &&
                    window->size(0) == q.size(0) && window->size(1) == q.size(2),
                "key windows (key_lo, key_hi) must be contiguous int32 [b, s]");
  }
  return {key_lo->data_ptr<int>(), key_hi->data_ptr<int>()};
}

void check_launch() {
  const cudaError_t error = cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess, "soft-mask attention kernel launch failed: ", cudaGetErrorString(error));
}

template <typename Launch>
void dispatch_head_dim(int head_dim, Launch&& launch) {
  if (head_dim <= 32) {
    launch(std::integral_constant<int, 1>{});
  } else if (head_dim <= 64) {
    launch(std::integral_constant<int, 2>{});
  } else {
    launch(std::integral_constant<int, 4>{});
  }
}

}  // namespace

std::vector<at::Tensor> soft_mask_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const at::Tensor& m,
                                                    const at::Tensor& lengths, double softmax_scale,
                                                    const std::optional<at::Tensor>& block_counter,
                                                    int64_t cuda_stream, const std::optional<at::Tensor>& key_lo,
                                                    const std::optional<at::Tensor>& key_hi) {
  check_inputs(q, k, v, m, lengths);
  // not a structured binding: C++17 lambdas (the dispatch below) cannot capture one
  const std::pair<const int*, const int*> windows = key_window_pointers(q, key_lo, key_hi);
  const int batch = q.size(0), heads = q.size(1), seq = q.size(2), head_dim = q.size(3);
  const int group = heads / k.size(1);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({batch, heads, seq}, q.options().dtype(at::kFloat));
  int* counter = nullptr;
  if (block_counter.has_value()) {
    TORCH_CHECK(block_counter->is_cuda() && block_counter->scalar_type() == at::kInt,
                "block_counter must be an int32 CUDA tensor");
    counter = block_counter->data_ptr<int>();
  }
  if (q.numel() == 0) return {out, lse};
  const dim3 grid((seq + kBlockRows - 1) / kBlockRows, batch * heads);
  const auto stream = reinterpret_cast<cudaStream_t>(cuda_stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "soft_mask_attention_forward", [&] {
    dispatch_head_dim(head_dim, [&](auto dpl) {
      soft_mask_fwd_kernel<scalar_t, decltype(dpl)::value><<<grid, kThreads, 0, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), m.data_ptr<float>(),
          lengths.data_ptr<int>(), windows.first, windows.second, out.data_ptr<scalar_t>(), lse.data_ptr<float>(),
          counter, strides_of(q), strides_of(k), strides_of(v), strides_of(out), heads, group, seq, head_dim,
          static_cast<float>(softmax_scale));
      check_launch();
    });
  });
  return {out, lse};
}

std::vector<at::Tensor> soft_mask_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                     const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& out, const at::Tensor& lse,
                                                     const at::Tensor& m, const at::Tensor& lengths,
                                                     double softmax_scale, int64_t cuda_stream,
                                                     const std::optional<at::Tensor>& key_lo,
                                                     const std::optional<at::Tensor>& key_hi) {
  check_inputs(q, k, v, m, lengths);
  // not a structured binding: C++17 lambdas (the dispatch below) cannot capture one
  const std::pair<const int*, const int*> windows = key_window_pointers(q, key_lo, key_hi);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "grad_out and out must match q");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "grad_out and out must have q's dtype");
  TORCH_CHECK(grad_out.stride(3) == 1 && out.stride(3) == 1, "grad_out and out need stride 1 on d");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous(), "lse must be contiguous float32");
  const int batch = q.size(0), heads = q.size(1), seq = q.size(2), head_dim = q.size(3);
  const int kv_heads = k.size(1);
  const int group = heads / kv_heads;
  auto dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  auto dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  auto delta = at::empty({batch, heads, seq}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {dq, dk, dv};
  const auto stream = reinterpret_cast<cudaStream_t>(cuda_stream);
  const int64_t rows = static_cast<int64_t>(batch) * heads * seq;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "soft_mask_attention_backward", [&] {
    soft_mask_bwd_delta_kernel<scalar_t><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0,
                                           stream>>>(out.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                                                     delta.data_ptr<float>(), strides_of(out),
                                                     strides_of(grad_out), heads, seq, head_dim, rows);
    check_launch();
    dispatch_head_dim(head_dim, [&](auto dpl) {
      constexpr int kDPL = decltype(dpl)::value;
      const dim3 dq_grid((seq + kBlockRows - 1) / kBlockRows, batch * heads);
      soft_mask_bwd_dq_kernel<scalar_t, kDPL><<<dq_grid, kThreads, 0, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
          m.data_ptr<float>(), lengths.data_ptr<int>(), windows.first, windows.second, lse.data_ptr<float>(),
          delta.data_ptr<float>(),
          dq.data_ptr<scalar_t>(), strides_of(q), strides_of(k), strides_of(v), strides_of(grad_out),
          strides_of(dq), heads, group, seq, head_dim, static_cast<float>(softmax_scale));
      check_launch();
      const dim3 dkdv_grid((seq + kBlockRows - 1) / kBlockRows, batch * kv_heads);
      soft_mask_bwd_dkdv_kernel<scalar_t, kDPL><<<dkdv_grid, kThreads, 0, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
          m.data_ptr<float>(), lengths.data_ptr<int>(), windows.first, windows.second, lse.data_ptr<float>(),
          delta.data_ptr<float>(),
          dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), strides_of(q), strides_of(k), strides_of(v),
          strides_of(grad_out), strides_of(dk), strides_of(dv), heads, kv_heads, group, seq, head_dim,
          static_cast<float>(softmax_scale));
      check_launch();
    });
  });
  return {dq, dk, dv};
}

}  // namespace megatron_conan

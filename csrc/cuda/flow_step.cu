// CUDA kernels of the fused sparse flow step (docs/maths.md 2): routing of the active pairs, grouped
// products over the per-field pair segments, the elementwise epilogues of csrc/flow_math.h (the
// same bodies as the CPU backend, in grid-stride loops), and the per-sample combination.
// The host pipeline that strings them together is csrc/flow_step_pipeline.h, shared with the CPU
// backend; flow_step_binding.cpp is its CUDA device policy.
//
// CUDA runtime headers and flow_math.h only; launchers take raw pointers, int64 sizes and the
// stream as an integer, so this file compiles with plain nvcc against any torch (checked by
// tests/test_cuda_compile.py for sm_80 and sm_90, with ptxas register/spill reports).
//
// Why our own products instead of cuBLAS (the CPU backend calls BLAS per segment): a cuBLAS
// call needs the segment lengths on the host, i.e. a device-to-host copy of the routing every
// step. That sync forbids CUDA-graph capture and by itself costs more than the whole step budget
// at the benchmark size (B=128, D=H=226: 256 active pairs, ~25 MFLOP per product). The grouped
// kernels below read the segment bounds on the device; blocks past the end of their segment exit
// at once, so the work follows the active pairs. Not yet measured against cuBLAS on a GPU.
//
// Accumulation in acc_t (float for float, double for double). int64 indexing throughout.
#include <cuda_runtime.h>

#include <cstdint>

#include "../flow_math.h"
#include "flow_step_cuda.h"

namespace sta {
namespace cuda {
namespace {

using sta::math::acc_t;

inline cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// =============================================================================================
// Routing
// =============================================================================================

constexpr int kRouteMaxThreads = 1024;

// One block walks g column by column (field by field), in chunks of blockDim.x samples, with a
// block-wide exclusive scan of the "active" flags: pairs come out sorted by field, then sample,
// like the CPU routing. One block because the output order is a global prefix sum over (k, b);
// its cost is K * ceil(B / 1024) block scans (5 for the benchmark size).
template <typename T>
__global__ void __launch_bounds__(kRouteMaxThreads)
    route_kernel(const T* __restrict__ g,          // (B, K)
                 int64_t B, int64_t K,
                 int64_t* __restrict__ pair_of,      // (B, K) out: row of pair (b, k) or -1
                 int64_t* __restrict__ pair_sample,  // (cap,) out: sample of each pair
                 int64_t* __restrict__ pair_field,   // (cap,) out: field of each pair
                 int64_t* __restrict__ offsets) {    // (K + 1,) out: segment bounds
  __shared__ int64_t warp_offset[kRouteMaxThreads / 32];
  __shared__ int64_t chunk_total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  int64_t base = 0;  // pairs routed so far: the same value in every thread
  if (threadIdx.x == 0) offsets[0] = 0;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t start = 0; start < B; start += blockDim.x) {
      const int64_t b = start + threadIdx.x;
      const bool active = b < B && g[b * K + k] != T(0);  // NaN counts as active, as on the CPU
      const unsigned ballot = __ballot_sync(0xffffffffu, active);
      const int64_t before = __popc(ballot & ((1u << lane) - 1u));
      if (lane == 0) warp_offset[warp] = __popc(ballot);
      __syncthreads();
      if (warp == 0) {  // exclusive scan of the per-warp counts
        const int64_t count = lane < num_warps ? warp_offset[lane] : 0;
        int64_t inclusive = count;
        for (int d = 1; d < 32; d <<= 1) {
          const int64_t other = __shfl_up_sync(0xffffffffu, inclusive, d);
          if (lane >= d) inclusive += other;
        }
        if (lane < num_warps) warp_offset[lane] = inclusive - count;
        if (lane == 31) chunk_total = inclusive;
      }
      __syncthreads();
      if (b < B) {
        if (active) {
          const int64_t row = base + warp_offset[warp] + before;
          pair_of[b * K + k] = row;
          pair_sample[row] = b;
          pair_field[row] = k;
        } else {
          pair_of[b * K + k] = -1;
        }
      }
      base += chunk_total;
      __syncthreads();  // warp_offset and chunk_total are rewritten by the next chunk
    }
    if (threadIdx.x == 0) offsets[k + 1] = base;
  }
}

// =============================================================================================
// Gather
// =============================================================================================

template <typename T>
__global__ void gather_rows_kernel(const T* __restrict__ src,              // (B, N) or nullptr (zeros)
                                   const int64_t* __restrict__ pair_sample,  // (cap,)
                                   const int64_t* __restrict__ num_pairs,    // &offsets[K]
                                   int64_t N, T* __restrict__ out) {         // (cap, N)
  const int64_t total = *num_pairs * N;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t p = i / N, n = i - p * N;
    out[i] = src ? src[pair_sample[p] * N + n] : T(0);
  }
}

// =============================================================================================
// Grouped products over the pair segments
// =============================================================================================

// Tile of one block: BM rows x BN columns, depth consumed BD at a time, 256 threads each owning
// a 2 x 4 sub-tile (rows ty + 16 i, columns tx + 16 j: conflict-free shared-memory reads).
// A plain smem-tiled SGEMM: the products are ~25 MFLOP at the benchmark size, latency-bound, so
// the tile is chosen to give enough blocks (4 x 4 x K per segment of 51 rows) rather than peak
// FLOP/s. Not tuned on hardware yet.
constexpr int BM = 32, BN = 64, BD = 16, TM = 2, TN = 4, kMmThreads = 256;
static_assert(BM == 16 * TM && BN == 16 * TN && kMmThreads == 256, "thread layout is 16 x 16");

// The register tile of one thread, c[i][j] for rows ty + 16 i and columns tx + 16 j of the block.
template <typename acc>
__device__ __forceinline__ void zero_tile(acc (&c)[TM][TN]) {
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) c[i][j] = acc(0);
}

// c += L^T R over one BD-deep slice staged in shared memory (L: BD x BM, R: BD x BN).
template <typename T, typename acc>
__device__ __forceinline__ void tile_fma(const T (&L)[BD][BM + 1], const T (&R)[BD][BN + 1], int ty, int tx,
                                         acc (&c)[TM][TN]) {
#pragma unroll
  for (int kk = 0; kk < BD; ++kk) {
    acc a[TM], b[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) a[i] = L[kk][ty + 16 * i];
#pragma unroll
    for (int j = 0; j < TN; ++j) b[j] = R[kk][tx + 16 * j];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) c[i][j] += a[i] * b[j];
  }
}

template <typename T, bool TRANS>
__global__ void __launch_bounds__(kMmThreads)
    segment_mm_kernel(const T* __restrict__ A,              // (*, depth) rows
                      const int64_t* __restrict__ a_index,   // (cap,) row of A per pair, or nullptr
                      const T* __restrict__ mats,            // (K, N, depth) if TRANS else (K, depth, N)
                      const T* __restrict__ bias,            // (K, N) or nullptr
                      T* __restrict__ out,                   // (cap, N)
                      const int64_t* __restrict__ offsets,   // (K + 1,)
                      int64_t N, int64_t depth, bool act_tanh) {
  using acc = acc_t<T>;
  const int64_t k = blockIdx.z;
  const int64_t seg_end = offsets[k + 1];
  const int64_t row0 = offsets[k] + static_cast<int64_t>(blockIdx.x) * BM;
  if (row0 >= seg_end) return;  // block-uniform, before any barrier
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * BN;
  const T* mat = mats + k * N * depth;
  __shared__ T As[BD][BM + 1];
  __shared__ T Bs[BD][BN + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

  // The two A rows this thread loads (elements tid and tid + 256 of the BM x BD tile), as
  // pointers (nullptr: past the segment end). Scalars, not an array: ptxas spilled the array.
  const T* a_ptr0 = nullptr;
  const T* a_ptr1 = nullptr;
  {
    const int64_t p0 = row0 + tid / BD, p1 = row0 + (tid + kMmThreads) / BD;
    if (p0 < seg_end) a_ptr0 = A + (a_index ? a_index[p0] : p0) * depth;
    if (p1 < seg_end) a_ptr1 = A + (a_index ? a_index[p1] : p1) * depth;
  }
  acc c[TM][TN];
  zero_tile(c);

  for (int64_t d0 = 0; d0 < depth; d0 += BD) {
    {
      const int kk = tid % BD;  // (tid + 256) % BD == tid % BD
      const int64_t d = d0 + kk;
      As[kk][tid / BD] = (a_ptr0 && d < depth) ? a_ptr0[d] : T(0);
      As[kk][(tid + kMmThreads) / BD] = (a_ptr1 && d < depth) ? a_ptr1[d] : T(0);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int e = tid + kMmThreads * r;
      if (TRANS) {  // mat (N, depth): consecutive threads walk the depth (contiguous)
        const int kk = e % BD, n = e / BD;
        const int64_t col = col0 + n, d = d0 + kk;
        Bs[kk][n] = (col < N && d < depth) ? mat[col * depth + d] : T(0);
      } else {  // mat (depth, N): consecutive threads walk the columns (contiguous)
        const int n = e % BN, kk = e / BN;
        const int64_t col = col0 + n, d = d0 + kk;
        Bs[kk][n] = (col < N && d < depth) ? mat[d * N + col] : T(0);
      }
    }
    __syncthreads();
    tile_fma(As, Bs, ty, tx, c);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t p = row0 + ty + 16 * i;
    if (p >= seg_end) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t col = col0 + tx + 16 * j;
      if (col >= N) continue;
      acc v = c[i][j];
      if (bias) v += acc(bias[k * N + col]);
      // tanh only follows the transposed products (h = x W^T + c); keeping the call out of the
      // other variant saves the 4-8 bytes of stack ptxas spilled around it (double, sm_90).
      if (TRANS && act_tanh) v = sta::math::sta_tanh(v);
      out[p * N + col] = T(v);
    }
  }
}

// grad[k] (m x n) = X[seg_k]^T Y[seg_k] (or += when accumulate): the same tiling, with the reduction
// running over the segment's pairs. Each output element belongs to one thread: deterministic, no
// atomics. Overwriting spares the caller a zero fill of the whole (K, m, n) gradient.
template <typename T>
__global__ void __launch_bounds__(kMmThreads)
    segment_outer_kernel(const T* __restrict__ X,             // (cap, m)
                         const T* __restrict__ Y,             // (cap, n)
                         T* __restrict__ grad,                // (K, m, n)
                         const int64_t* __restrict__ offsets,  // (K + 1,)
                         int64_t m, int64_t n, bool accumulate) {
  using acc = acc_t<T>;
  const int64_t k = blockIdx.z;
  const int64_t seg_begin = offsets[k], seg_end = offsets[k + 1];
  if (seg_begin >= seg_end && accumulate) return;  // nothing to add (overwriting writes zeros)
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM, j0 = static_cast<int64_t>(blockIdx.y) * BN;
  __shared__ T Xs[BD][BM + 1];
  __shared__ T Ys[BD][BN + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  acc c[TM][TN];
  zero_tile(c);
  for (int64_t p0 = seg_begin; p0 < seg_end; p0 += BD) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int e = tid + kMmThreads * r, i = e % BM, kk = e / BM;
      const int64_t p = p0 + kk;
      Xs[kk][i] = (p < seg_end && i0 + i < m) ? X[p * m + i0 + i] : T(0);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int e = tid + kMmThreads * r, j = e % BN, kk = e / BN;
      const int64_t p = p0 + kk;
      Ys[kk][j] = (p < seg_end && j0 + j < n) ? Y[p * n + j0 + j] : T(0);
    }
    __syncthreads();
    tile_fma(Xs, Ys, ty, tx, c);
    __syncthreads();
  }
  T* g = grad + k * m * n;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = i0 + ty + 16 * i;
    if (row >= m) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t col = j0 + tx + 16 * j;
      if (col < n) g[row * n + col] = accumulate ? T(acc(g[row * n + col]) + c[i][j]) : T(c[i][j]);
    }
  }
}

constexpr int kColsumThreads = 256;

template <typename T>
__global__ void segment_colsum_kernel(const T* __restrict__ X,             // (cap, N)
                                      T* __restrict__ out,                 // (K, out_stride)
                                      const int64_t* __restrict__ offsets,  // (K + 1,)
                                      int64_t N, int64_t out_stride) {
  using acc = acc_t<T>;
  const int64_t k = blockIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= N) return;
  acc total = 0;
  for (int64_t p = offsets[k]; p < offsets[k + 1]; ++p) total += acc(X[p * N + col]);
  out[k * out_stride + col] = T(total);
}

// =============================================================================================
// Row bodies (flow_math.h) in grid-stride loops
// =============================================================================================

// One thread per row (pair or sample), looping over H or D inside the shared body. 64 threads
// per block so the few hundred pairs of a typical step spread over several SMs.
constexpr int kRowThreads = 64;

template <typename Args>
__global__ void __launch_bounds__(kRowThreads)
    rows_kernel(const Args args, const int64_t* __restrict__ n_dev, int64_t n_max) {
  const int64_t n = n_dev ? *n_dev : n_max;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step)
    sta::math::run_row(i, args);
}

}  // namespace

// =============================================================================================
// Launchers (declared in flow_step_cuda.h)
// =============================================================================================

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

template <typename T>
int route(const T* g, int64_t B, int64_t K, int64_t* pair_of, int64_t* pair_sample, int64_t* pair_field,
          int64_t* offsets, int64_t stream) {
  int64_t threads = ceil_div(B > 0 ? B : 1, 32) * 32;
  if (threads > kRouteMaxThreads) threads = kRouteMaxThreads;
  route_kernel<T><<<1, static_cast<unsigned>(threads), 0, as_stream(stream)>>>(g, B, K, pair_of, pair_sample,
                                                                                pair_field, offsets);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int gather_rows(const T* src, const int64_t* pair_sample, const int64_t* offsets, int64_t K, int64_t cap,
                int64_t N, T* out, int64_t stream) {
  const int64_t total = cap * N;
  if (total <= 0) return cudaSuccess;
  const int64_t blocks = ceil_div(total, 256);
  gather_rows_kernel<T><<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), 256, 0, as_stream(stream)>>>(
      src, pair_sample, offsets + K, N, out);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int segment_mm(const T* A, const int64_t* a_index, const T* mats, const T* bias, T* out, const int64_t* offsets,
               int64_t K, int64_t max_rows, int64_t N, int64_t depth, bool trans, bool act_tanh, int64_t stream) {
  if (K <= 0 || max_rows <= 0 || N <= 0) return cudaSuccess;
  if (act_tanh && !trans) return cudaErrorInvalidValue;  // not compiled: see the kernel's epilogue
  const dim3 grid(static_cast<unsigned>(ceil_div(max_rows, BM)), static_cast<unsigned>(ceil_div(N, BN)),
                  static_cast<unsigned>(K));
  if (trans)
    segment_mm_kernel<T, true><<<grid, kMmThreads, 0, as_stream(stream)>>>(A, a_index, mats, bias, out, offsets, N,
                                                                           depth, act_tanh);
  else
    segment_mm_kernel<T, false><<<grid, kMmThreads, 0, as_stream(stream)>>>(A, a_index, mats, bias, out, offsets, N,
                                                                            depth, act_tanh);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int segment_outer(const T* X, const T* Y, T* grad, const int64_t* offsets, int64_t K, int64_t m, int64_t n,
                  bool accumulate, int64_t stream) {
  if (K <= 0 || m <= 0 || n <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(ceil_div(m, BM)), static_cast<unsigned>(ceil_div(n, BN)),
                  static_cast<unsigned>(K));
  segment_outer_kernel<T><<<grid, kMmThreads, 0, as_stream(stream)>>>(X, Y, grad, offsets, m, n, accumulate);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int segment_colsum(const T* X, T* out, const int64_t* offsets, int64_t K, int64_t N, int64_t out_stride,
                   int64_t stream) {
  if (K <= 0 || N <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kColsumThreads)), static_cast<unsigned>(K));
  segment_colsum_kernel<T><<<grid, kColsumThreads, 0, as_stream(stream)>>>(X, out, offsets, N, out_stride);
  return static_cast<int>(cudaGetLastError());
}

#define STA_CUDA_INSTANTIATE(T)                                                                                    \
  template int route<T>(const T*, int64_t, int64_t, int64_t*, int64_t*, int64_t*, int64_t*, int64_t);              \
  template int gather_rows<T>(const T*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t, T*, int64_t);   \
  template int segment_mm<T>(const T*, const int64_t*, const T*, const T*, T*, const int64_t*, int64_t, int64_t,   \
                             int64_t, int64_t, bool, bool, int64_t);                                               \
  template int segment_outer<T>(const T*, const T*, T*, const int64_t*, int64_t, int64_t, int64_t, bool, int64_t); \
  template int segment_colsum<T>(const T*, T*, const int64_t*, int64_t, int64_t, int64_t, int64_t);
STA_CUDA_INSTANTIATE(float)
STA_CUDA_INSTANTIATE(double)
#undef STA_CUDA_INSTANTIATE

template <typename Args>
int launch_rows(const Args& args, const int64_t* n_dev, int64_t n_max, int64_t stream) {
  if (n_max <= 0) return cudaSuccess;
  // 65535 blocks cap the grid; the grid-stride loop covers any larger n_max.
  const int64_t blocks = ceil_div(n_max, kRowThreads);
  rows_kernel<Args><<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), kRowThreads, 0, as_stream(stream)>>>(
      args, n_dev, n_max);
  return static_cast<int>(cudaGetLastError());
}

// One row launcher per flow_math.h body (by its argument struct), float and double.
#define STA_CUDA_ROWS_INSTANTIATE(BODY, ARGS)                                                                 \
  template int launch_rows<sta::math::ARGS<float>>(const sta::math::ARGS<float>&, const int64_t*, int64_t,   \
                                                   int64_t);                                                \
  template int launch_rows<sta::math::ARGS<double>>(const sta::math::ARGS<double>&, const int64_t*, int64_t, \
                                                    int64_t);
STA_FLOW_ROW_BODIES(STA_CUDA_ROWS_INSTANTIATE)
#undef STA_CUDA_ROWS_INSTANTIATE

}  // namespace cuda
}  // namespace sta

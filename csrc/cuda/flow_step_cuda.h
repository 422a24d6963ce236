// Launchers of the CUDA flow-step kernels (csrc/cuda/flow_step.cu), called by the torch binding
// (csrc/cuda/flow_step_binding.cpp). No CUDA and no torch headers: raw device pointers, int64
// sizes, and the stream as an integer handle (a cudaStream_t cast to int64), so the kernels compile
// with plain nvcc and the binding with any torch, CUDA headers or not.
//
// Every launcher returns a cudaError_t value (0 = success); error_string() names it.
//
// Sync-free by design: the number of active pairs P is never read back by the host. Per-pair
// buffers have the worst-case capacity B * K rows; the kernels read the pair counts from the
// device-side offsets (routing output) and blocks past them exit at once, so the work scales with
// the active pairs while the launch configuration depends only on (B, K, D, H). That is what lets
// a flow step be captured in a CUDA graph.
//
// Layout: see csrc/flow_math.h (pairs sorted by field then sample; pair_of (B, K) = row or -1).
#pragma once

#include <cstdint>

#include "../flow_math.h"

namespace sta {
namespace cuda {

/// The message of a cudaError_t value returned by a launcher.
const char* error_string(int err);

/// Routing of g: (B, K) (contiguous): pair_of (B, K), pair_sample / pair_field (capacity B * K;
/// the first P rows written), offsets (K + 1), offsets[K] = P. One block, deterministic order.
template <typename T>
int route(const T* g, int64_t B, int64_t K, int64_t* pair_of, int64_t* pair_sample, int64_t* pair_field,
          int64_t* offsets, int64_t stream);

/// out[p, :] = src[pair_sample[p], :] for p < P (src == nullptr: zeros). src: (B, N), out: (cap, N).
template <typename T>
int gather_rows(const T* src, const int64_t* pair_sample, const int64_t* offsets, int64_t K, int64_t cap,
                int64_t N, T* out, int64_t stream);

/// Grouped product over the pair segments of each field k (rows offsets[k] .. offsets[k+1]-1):
///   out[p, n] = act(bias[k, n] + sum_i A[row(p), i] * op(mats[k])[i, n])
/// row(p) = a_index[p] (a_index == nullptr: p); A: (*, depth) row-major;
/// trans: mats[k] is (N, depth) and op = transpose, else mats[k] is (depth, N);
/// bias: (K, N) or nullptr; act_tanh: apply tanh (transposed products only). max_rows: an upper bound of any segment's length
/// (B). out: (cap, N), rows outside the segments untouched.
template <typename T>
int segment_mm(const T* A, const int64_t* a_index, const T* mats, const T* bias, T* out, const int64_t* offsets,
               int64_t K, int64_t max_rows, int64_t N, int64_t depth, bool trans, bool act_tanh, int64_t stream);

/// Per-field weight gradients: grad[k] = X[seg_k]^T Y[seg_k] (0 for an empty segment), or += when
/// accumulate; X: (cap, m), Y: (cap, n), grad: (K, m, n). Deterministic (each output element owned
/// by one thread).
template <typename T>
int segment_outer(const T* X, const T* Y, T* grad, const int64_t* offsets, int64_t K, int64_t m, int64_t n,
                  bool accumulate, int64_t stream);

/// Per-field column sums: out[k * out_stride + c] = sum_{p in seg_k} X[p, c]  (0 for an empty
/// segment); X: (cap, N).
template <typename T>
int segment_colsum(const T* X, T* out, const int64_t* offsets, int64_t K, int64_t N, int64_t out_stride,
                   int64_t stream);

/// The flow_math.h row body of `args` (sta::math::run_row) over rows i < n, n = *n_dev when
/// n_dev != nullptr (the pair count offsets[K]) else n_max; grid-stride loop sized for n_max.
/// Instantiated in flow_step.cu for every argument struct of STA_FLOW_ROW_BODIES, float and double.
template <typename Args>
int launch_rows(const Args& args, const int64_t* n_dev, int64_t n_max, int64_t stream);

}  // namespace cuda
}  // namespace sta

// CUDA kernel of sta::grid_transport: one conservative finite-volume step on a regular 2-D / 3-D
// grid (docs/maths.md section 3). The per-cell body is sta::grid::transport_cell in flow_math.h, shared with
// the CPU op (csrc/cpu/grid_transport.cpp); the reference is sta/grid/transport.py:transport_reference.
// CUDA runtime headers only: the torch binding is csrc/cuda/grid_transport_binding.cpp, and the
// stream comes in as an integer handle, so this file compiles with plain nvcc against any torch.
#include <cuda_runtime.h>

#include <cstdint>

#include "../grid_math.h"

namespace {

// One thread per cell, grid-stride loop; every cell reads its 5-point line per axis (neighbouring
// threads read neighbouring addresses along the last axis, so the loads coalesce).
template <typename T, int LIMITER, bool PERIODIC>
__global__ void grid_transport_kernel(const T* __restrict__ rho,  // (n0, n1, n2)
                                      const T* __restrict__ u0,   // (n0 + 1, n1, n2)
                                      const T* __restrict__ u1,   // (n0, n1 + 1, n2)
                                      const T* __restrict__ u2,   // (n0, n1, n2 + 1) or unused (ndim 2)
                                      T* __restrict__ out,        // (n0, n1, n2)
                                      int64_t n0, int64_t n1, int64_t n2, int ndim, T c0, T c1, T c2) {
  const int64_t numel = n0 * n1 * n2;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t cell = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; cell < numel; cell += step) {
    const int64_t i2 = cell % n2, line = cell / n2;
    const int64_t i1 = line % n1, i0 = line / n1;
    out[cell] = sta::grid::transport_cell<T, LIMITER, PERIODIC>(rho, u0, u1, u2, n0, n1, n2, ndim, i0, i1, i2, c0,
                                                                c1, c2);
  }
}

template <typename T>
cudaError_t launch(const void* rho, const void* u0, const void* u1, const void* u2, void* out, int64_t n0,
                   int64_t n1, int64_t n2, int ndim, double c0, double c1, double c2, bool periodic, int limiter,
                   cudaStream_t stream) {
  const int64_t numel = n0 * n1 * n2;
  if (numel == 0) return cudaSuccess;
  // 256 threads: the kernel is memory bound with ~40 registers; enough blocks to fill any GPU,
  // capped so the grid-stride loop covers the rest.
  const int threads = 256;
  const int64_t blocks = (numel + threads - 1) / threads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 32 ? blocks : 65535 * 32);
  const T* r = static_cast<const T*>(rho);
  const T* p0 = static_cast<const T*>(u0);
  const T* p1 = static_cast<const T*>(u1);
  const T* p2 = static_cast<const T*>(u2);
  T* o = static_cast<T*>(out);
  const T k0 = static_cast<T>(c0), k1 = static_cast<T>(c1), k2 = static_cast<T>(c2);
#define STA_GRID_LAUNCH(LIM, PER) \
  grid_transport_kernel<T, LIM, PER><<<grid, threads, 0, stream>>>(r, p0, p1, p2, o, n0, n1, n2, ndim, k0, k1, k2)
  switch (limiter * 2 + (periodic ? 1 : 0)) {
    case 0: STA_GRID_LAUNCH(sta::grid::kUpwind, false); break;
    case 1: STA_GRID_LAUNCH(sta::grid::kUpwind, true); break;
    case 2: STA_GRID_LAUNCH(sta::grid::kMinmod, false); break;
    case 3: STA_GRID_LAUNCH(sta::grid::kMinmod, true); break;
    case 4: STA_GRID_LAUNCH(sta::grid::kVanLeer, false); break;
    default: STA_GRID_LAUNCH(sta::grid::kVanLeer, true); break;
  }
#undef STA_GRID_LAUNCH
  return cudaGetLastError();
}

}  // namespace

namespace sta {
namespace grid {

// Launcher called by the torch binding. dtype: 0 = float32, 1 = float64. Pointers are contiguous
// device buffers in the layout above; stream is a cudaStream_t passed as an integer.
// Returns a cudaError_t value (0 on success) and the error string through *message.
int grid_transport_cuda(int dtype, const void* rho, const void* u0, const void* u1, const void* u2, void* out,
                        int64_t n0, int64_t n1, int64_t n2, int ndim, double c0, double c1, double c2, bool periodic,
                        int limiter, int64_t stream, const char** message) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  cudaError_t err = dtype == 1 ? launch<double>(rho, u0, u1, u2, out, n0, n1, n2, ndim, c0, c1, c2, periodic, limiter, s)
                               : launch<float>(rho, u0, u1, u2, out, n0, n1, n2, ndim, c0, c1, c2, periodic, limiter, s);
  if (message) *message = cudaGetErrorString(err);
  return static_cast<int>(err);
}

}  // namespace grid
}  // namespace sta

// CUDA device policy of the flow-step pipeline (csrc/flow_step_pipeline.h), registered for the
// CUDA dispatch key of sta::potential_fwd/_bwd, sta::hamiltonian_fwd/_bwd, sta::mlp_fwd/_bwd
// (schemas: csrc/cpu/flow_step.cpp and csrc/README.md). Compiled only when sta._C is built with
// CUDA (STA_BUILD_CUDA, sta/_build.py); the kernels are in flow_step.cu.
//
// The pipeline is the CPU one; the primitives differ so that a step never synchronises with the
// host (CUDA-graph capturable):
//   * the pair count P stays on the device: per-pair buffers have capacity B * K rows and every
//     kernel reads the segment bounds (routing offsets) itself;
//   * the products run in our grouped kernels (cuBLAS would need the segment lengths on the host),
//     which also fuse the gather of z rows and the tanh of the first layer.
// Small per-step parameter algebra (|W|^2, C + C^T) goes through ATen on the CUDA tensors, on the
// same (current) stream.
//
// No CUDA headers: the current stream is read through c10's device-generic interface and passed
// to the launchers as an integer, so this file builds against any torch.
#include <ATen/ATen.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cstdint>

#include "../flow_step_pipeline.h"
#include "flow_step_cuda.h"

namespace sta {
namespace cuda {
namespace {

using at::Tensor;
using pipeline::Routing;
using pipeline::Rows;

#define STA_CUDA_CHECK(expr)                                                                    \
  do {                                                                                          \
    const int sta_err_ = (expr);                                                                \
    TORCH_CHECK(sta_err_ == 0, "sta CUDA kernel launch failed (", #expr, "): ", error_string(sta_err_)); \
  } while (0)

struct CudaDevice {
  explicit CudaDevice(const Tensor& z)
      : opt_(z.options()),
        stream_(reinterpret_cast<int64_t>(
            c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(z.device()).native_handle())) {}

  Routing route(const Tensor& g) const {
    Routing r;
    r.B = g.size(0);
    r.K = g.size(1);
    r.rows = r.B * r.K;
    const auto lopt = g.options().dtype(at::kLong);
    r.pair_of = at::empty({r.B, r.K}, lopt);
    r.pair_sample = at::empty({r.rows}, lopt);
    r.pair_field = at::empty({r.rows}, lopt);
    r.offsets = at::empty({r.K + 1}, lopt);
    if (r.rows == 0) {
      r.offsets.zero_();
      return r;
    }
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sta_cuda_route", [&] {
      STA_CUDA_CHECK(cuda::route<scalar_t>(g.const_data_ptr<scalar_t>(), r.B, r.K, r.pair_of.data_ptr<int64_t>(),
                                           r.pair_sample.data_ptr<int64_t>(), r.pair_field.data_ptr<int64_t>(),
                                           r.offsets.data_ptr<int64_t>(), stream_));
    });
    return r;
  }

  Tensor gather(const Tensor& src, int64_t N, const Routing& r) const {
    Tensor out = at::empty({r.rows, N}, opt_);
    dispatch(out, [&](auto t) {
      using T = decltype(t);
      STA_CUDA_CHECK(gather_rows<T>(pipeline::ptr<T>(src), r.pair_sample.const_data_ptr<int64_t>(),
                                    r.offsets.const_data_ptr<int64_t>(), r.K, r.rows, N, out.data_ptr<T>(), stream_));
    });
    return out;
  }

  void mm(const Tensor& out, const Tensor& A, Rows rows, const Tensor& mats, bool trans, const Routing& r,
          const Tensor& bias, bool act_tanh) const {
    const int64_t* a_index = rows == Rows::kSamples ? r.pair_sample.const_data_ptr<int64_t>() : nullptr;
    dispatch(out, [&](auto t) {
      using T = decltype(t);
      STA_CUDA_CHECK(segment_mm<T>(A.const_data_ptr<T>(), a_index, mats.const_data_ptr<T>(), pipeline::ptr<T>(bias),
                                   out.data_ptr<T>(), r.offsets.const_data_ptr<int64_t>(), r.K, r.B, out.size(1),
                                   A.size(1), trans, act_tanh, stream_));
    });
  }

  void outer(const Tensor& grad, const Tensor& X, const Tensor& Y, const Routing& r, bool accumulate) const {
    dispatch(grad, [&](auto t) {
      using T = decltype(t);
      STA_CUDA_CHECK(segment_outer<T>(X.const_data_ptr<T>(), Y.const_data_ptr<T>(), grad.data_ptr<T>(),
                                      r.offsets.const_data_ptr<int64_t>(), r.K, X.size(1), Y.size(1), accumulate,
                                      stream_));
    });
  }

  void colsum(const Tensor& out, const Tensor& X, const Routing& r) const {  // out (K, L, N), X (L, rows, N)
    const int64_t L = X.size(0), N = X.size(2);
    dispatch(out, [&](auto t) {
      using T = decltype(t);
      for (int64_t l = 0; l < L; ++l)
        STA_CUDA_CHECK(segment_colsum<T>(X.const_data_ptr<T>() + l * r.rows * N, out.data_ptr<T>() + l * N,
                                         r.offsets.const_data_ptr<int64_t>(), r.K, N, L * N, stream_));
    });
  }

  template <class Args>
  void for_pairs(const Routing& r, int64_t, const Args& args) const {  // P read on the device: offsets[K]
    STA_CUDA_CHECK(launch_rows(args, r.offsets.const_data_ptr<int64_t>() + r.K, r.rows, stream_));
  }

  template <class Args>
  void for_rows(int64_t n, int64_t, const Args& args) const {
    STA_CUDA_CHECK(launch_rows(args, nullptr, n, stream_));
  }

 private:
  at::TensorOptions opt_;  // z's
  int64_t stream_;         // z's current stream, as an integer (a cudaStream_t)

  // f(T()) with T the C++ type of t's dtype (float or double: the pipeline checked).
  template <class F>
  static void dispatch(const Tensor& t, const F& f) {
    if (t.scalar_type() == at::kDouble)
      f(double());
    else
      f(float());
  }
};

#undef STA_CUDA_CHECK

}  // namespace
}  // namespace cuda
}  // namespace sta

TORCH_LIBRARY_IMPL(sta, CUDA, m) { STA_REGISTER_FLOW_STEP_OPS(m, sta::cuda::CudaDevice); }

// Torch binding of the CUDA grid transport kernel (csrc/cuda/grid_transport.cu) for the CUDA
// dispatch key of sta::grid_transport (schema in csrc/cpu/grid_transport.cpp). No CUDA headers:
// the current stream is read through c10's device-generic interface and passed as an integer.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cstdint>

namespace sta {
namespace grid {
int grid_transport_cuda(int dtype, const void* rho, const void* u0, const void* u1, const void* u2, void* out,
                        int64_t n0, int64_t n1, int64_t n2, int ndim, double c0, double c1, double c2, bool periodic,
                        int limiter, int64_t stream, const char** message);
}  // namespace grid
}  // namespace sta

namespace {

at::Tensor grid_transport_cuda_op(const at::Tensor& rho_in, const at::Tensor& u0_in, const at::Tensor& u1_in,
                                  const at::Tensor& u2_in, double c0, double c1, double c2, bool periodic,
                                  int64_t limiter) {
  TORCH_CHECK(rho_in.dim() == 2 || rho_in.dim() == 3, "grid_transport: rho must be (N1, N2) or (N1, N2, N3), got ",
              rho_in.sizes());
  TORCH_CHECK(rho_in.scalar_type() == at::kFloat || rho_in.scalar_type() == at::kDouble,
              "grid_transport: rho must be float32 or float64");
  TORCH_CHECK(limiter >= 0 && limiter <= 2, "grid_transport: limiter code must be 0, 1 or 2, got ", limiter);
  const int ndim = static_cast<int>(rho_in.dim());
  const int64_t n0 = rho_in.size(0), n1 = rho_in.size(1), n2 = ndim == 3 ? rho_in.size(2) : 1;
  auto check = [&](const at::Tensor& u, const char* name, int axis) {
    std::vector<int64_t> shape{n0, n1, n2};
    shape[axis] += 1;
    if (ndim == 2) shape.pop_back();
    TORCH_CHECK(u.sizes() == at::IntArrayRef(shape), "grid_transport: ", name, " must have shape ",
                at::IntArrayRef(shape), ", got ", u.sizes());
    TORCH_CHECK(u.scalar_type() == rho_in.scalar_type() && u.device() == rho_in.device(), "grid_transport: ",
                name, " must have the dtype and device of rho");
  };
  check(u0_in, "u0", 0);
  check(u1_in, "u1", 1);
  if (ndim == 3) check(u2_in, "u2", 2);
  c10::DeviceGuard guard(rho_in.device());
  const at::Tensor rho = rho_in.contiguous(), u0 = u0_in.contiguous(), u1 = u1_in.contiguous();
  const at::Tensor u2 = ndim == 3 ? u2_in.contiguous() : u1;  // never read for 2-D
  at::Tensor out = at::empty_like(rho);
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(rho.device());
  const char* message = nullptr;
  const int err = sta::grid::grid_transport_cuda(
      rho.scalar_type() == at::kDouble ? 1 : 0, rho.data_ptr(), u0.data_ptr(), u1.data_ptr(), u2.data_ptr(),
      out.data_ptr(), n0, n1, n2, ndim, c0, c1, c2, periodic, static_cast<int>(limiter),
      reinterpret_cast<int64_t>(stream.native_handle()), &message);
  TORCH_CHECK(err == 0, "grid_transport: CUDA launch failed: ", message ? message : "unknown error");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sta, CUDA, m) { m.impl("grid_transport", &grid_transport_cuda_op); }

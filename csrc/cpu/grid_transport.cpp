// sta::grid_transport -- one conservative finite-volume step of the continuity equation on a
// regular 2-D / 3-D grid (SPEC section 4). Schema + CPU kernel; the per-cell body is
// sta::grid::transport_cell in flow_math.h (shared with csrc/cuda/grid_transport.cu); the reference
// and the validation (shapes, CFL) are in sta/grid.py, which calls this op with checked inputs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../flow_math.h"

namespace {

// Checks the layout the kernels index (sta/grid.py validates the user-facing arguments).
void check_grid_inputs(const at::Tensor& rho, const at::Tensor& u0, const at::Tensor& u1, const at::Tensor& u2) {
  TORCH_CHECK(rho.dim() == 2 || rho.dim() == 3, "grid_transport: rho must be (N1, N2) or (N1, N2, N3), got ",
              rho.sizes());
  const int64_t n0 = rho.size(0), n1 = rho.size(1), n2 = rho.dim() == 3 ? rho.size(2) : 1;
  auto expect = [&](const at::Tensor& u, const char* name, std::vector<int64_t> shape) {
    if (rho.dim() == 2) shape.pop_back();
    TORCH_CHECK(u.sizes() == at::IntArrayRef(shape), "grid_transport: ", name, " must have shape ",
                at::IntArrayRef(shape), ", got ", u.sizes());
    TORCH_CHECK(u.scalar_type() == rho.scalar_type() && u.device() == rho.device(), "grid_transport: ", name,
                " must have the dtype and device of rho");
  };
  expect(u0, "u0", {n0 + 1, n1, n2});
  expect(u1, "u1", {n0, n1 + 1, n2});
  if (rho.dim() == 3) expect(u2, "u2", {n0, n1, n2 + 1});
}

at::Tensor grid_transport_cpu(const at::Tensor& rho_in, const at::Tensor& u0_in, const at::Tensor& u1_in,
                              const at::Tensor& u2_in, double c0, double c1, double c2, bool periodic,
                              int64_t limiter) {
  check_grid_inputs(rho_in, u0_in, u1_in, u2_in);
  TORCH_CHECK(limiter >= 0 && limiter <= 2, "grid_transport: limiter code must be 0, 1 or 2, got ", limiter);
  const at::Tensor rho = rho_in.contiguous(), u0 = u0_in.contiguous(), u1 = u1_in.contiguous();
  const at::Tensor u2 = u2_in.contiguous();
  const int ndim = static_cast<int>(rho.dim());
  const int64_t n0 = rho.size(0), n1 = rho.size(1), n2 = ndim == 3 ? rho.size(2) : 1;
  at::Tensor out = at::empty_like(rho);
  AT_DISPATCH_FLOATING_TYPES(rho.scalar_type(), "grid_transport_cpu", [&] {
    const scalar_t* r = rho.data_ptr<scalar_t>();
    const scalar_t* p0 = u0.data_ptr<scalar_t>();
    const scalar_t* p1 = u1.data_ptr<scalar_t>();
    const scalar_t* p2 = ndim == 3 ? u2.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t k0 = static_cast<scalar_t>(c0), k1 = static_cast<scalar_t>(c1), k2 = static_cast<scalar_t>(c2);
    const int lim = static_cast<int>(limiter);
    // One task = one line of n2 cells; 64 lines (>= 8k cells at 128^2) amortise the task overhead.
    at::parallel_for(0, n0 * n1, 64, [&](int64_t begin, int64_t end) {
      for (int64_t line = begin; line < end; ++line) {
        const int64_t i0 = line / n1, i1 = line % n1;
        for (int64_t i2 = 0; i2 < n2; ++i2) {
          o[line * n2 + i2] = sta::grid::transport_cell<scalar_t>(r, p0, p1, p2, n0, n1, n2, ndim, i0, i1, i2, k0,
                                                                  k1, k2, periodic, lim);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sta, m) {
  // rho: (N1, N2) or (N1, N2, N3); u0: (N1+1, N2[, N3]); u1: (N1, N2+1[, N3]); u2: (N1, N2, N3+1) or
  // empty for 2-D; c_a = dt / dx_a; limiter: 0 upwind, 1 minmod, 2 van Leer. Returns the new rho.
  m.def("grid_transport(Tensor rho, Tensor u0, Tensor u1, Tensor u2, float c0, float c1, float c2, "
        "bool periodic, int limiter) -> Tensor");
}

TORCH_LIBRARY_IMPL(sta, CPU, m) { m.impl("grid_transport", &grid_transport_cpu); }

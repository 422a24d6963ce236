// CPU device policy of the flow-step pipeline (csrc/flow_step_pipeline.h) and the schemas of the
// flow-step ops sta::potential_fwd/_bwd, sta::hamiltonian_fwd/_bwd, sta::mlp_fwd/_bwd (full text
// and semantics in csrc/README.md; the CUDA backend registers its kernels for the same schemas).
//
// Why this policy: the matrix products go through ATen (MKL/OpenBLAS: a hand-written OpenMP loop
// was 5x slower here), on the rows of each field gathered contiguously (pairs sorted by field);
// only the elementwise work is ours, fused into one pass per row (flow_math.h bodies in
// at::parallel_for). tanh runs through ATen's vectorised kernel. The routing runs on the host, so
// per-pair buffers have exactly P rows and the per-field loops skip empty fields.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../flow_step_pipeline.h"

namespace sta {
namespace {

using at::Tensor;
using pipeline::Routing;
using pipeline::Rows;

struct CpuDevice {
  explicit CpuDevice(const Tensor& z) : opt_(z.options()) {}

  // One pass over g, field by field: pairs come out sorted by field, then sample.
  Routing route(const Tensor& g) const {
    Routing r;
    r.B = g.size(0);
    r.K = g.size(1);
    const int64_t B = r.B, K = r.K;
    const auto lopt = g.options().dtype(at::kLong);
    r.pair_of = at::empty({B, K}, lopt);
    r.offsets = at::zeros({K + 1}, lopt);
    int64_t* po = r.pair_of.data_ptr<int64_t>();
    int64_t* off = r.offsets.data_ptr<int64_t>();
    std::vector<int64_t> samples, fields;
    samples.reserve(B * K);
    fields.reserve(B * K);
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sta_route", [&] {
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t b = 0; b < B; ++b) {
          if (gp[b * K + k] != scalar_t(0)) {  // NaN counts as active, as on CUDA
            po[b * K + k] = static_cast<int64_t>(samples.size());
            samples.push_back(b);
            fields.push_back(k);
          } else {
            po[b * K + k] = -1;
          }
        }
        off[k + 1] = static_cast<int64_t>(samples.size());
      }
    });
    r.rows = static_cast<int64_t>(samples.size());
    r.pair_sample = at::empty({r.rows}, lopt);
    r.pair_field = at::empty({r.rows}, lopt);
    std::copy(samples.begin(), samples.end(), r.pair_sample.data_ptr<int64_t>());
    std::copy(fields.begin(), fields.end(), r.pair_field.data_ptr<int64_t>());
    return r;
  }

  Tensor gather(const Tensor& src, int64_t N, const Routing& r) const {
    Tensor out = buffer_pool::empty({r.rows, N}, opt_);
    return src.defined() ? at::index_select_out(out, src, 0, r.pair_sample) : out.zero_();
  }

  void mm(const Tensor& out, const Tensor& A, Rows rows, const Tensor& mats, bool trans, const Routing& r,
          const Tensor& bias, bool act_tanh) const {
    const Tensor Ap = rows == Rows::kSamples ? gather(A, A.size(1), r) : A;
    for_segments(r, [&](int64_t k, int64_t o, int64_t n) {
      Tensor dst = out.narrow(0, o, n);
      const Tensor w = trans ? mats[k].t() : mats[k];
      if (bias.defined())
        at::addmm_out(dst, bias[k], Ap.narrow(0, o, n), w);
      else
        at::mm_out(dst, Ap.narrow(0, o, n), w);
    });
    if (act_tanh) out.tanh_();
  }

  // Overwriting (mm_out) rather than zero-filling and adding: at D = H = 1024, K = 32 a zero fill
  // of a (K, D, H) gradient took 55 ms, 16 of them (hamiltonian grad_W, grad_M) per 8-step training
  // iteration (0.9 of 15 s, benchmarks/bench_train.py d1024).
  void outer(const Tensor& grad, const Tensor& X, const Tensor& Y, const Routing& r, bool accumulate) const {
    const int64_t* off = r.offsets.const_data_ptr<int64_t>();
    for (int64_t k = 0; k < r.K; ++k) {
      const int64_t o = off[k], n = off[k + 1] - o;
      Tensor dst = grad[k];
      if (n > 0 && accumulate)
        dst.addmm_(X.narrow(0, o, n).t(), Y.narrow(0, o, n));
      else if (n > 0)
        at::mm_out(dst, X.narrow(0, o, n).t(), Y.narrow(0, o, n));
      else if (!accumulate)
        dst.zero_();
    }
  }

  void colsum(const Tensor& out, const Tensor& X, const Routing& r) const {
    const int64_t* off = r.offsets.const_data_ptr<int64_t>();
    for (int64_t k = 0; k < r.K; ++k) {
      const int64_t o = off[k], n = off[k + 1] - o;
      if (n == 0)
        out[k].zero_();
      else
        out[k].copy_(X.narrow(1, o, n).sum(1));
    }
  }

  template <class Args>
  void for_pairs(const Routing& r, int64_t row_cost, const Args& args) const {
    for_rows(r.rows, row_cost, args);
  }

  // Rows are grouped so each task has ~at::internal::GRAIN_SIZE flops (ATen's own threshold).
  template <class Args>
  void for_rows(int64_t n, int64_t row_cost, const Args& args) const {
    if (n <= 0) return;
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, row_cost));
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) math::run_row(i, args);
    });
  }

 private:
  at::TensorOptions opt_;  // z's

  // f(k, first row, rows) for every field with at least one pair.
  template <class F>
  static void for_segments(const Routing& r, const F& f) {
    const int64_t* off = r.offsets.const_data_ptr<int64_t>();
    for (int64_t k = 0; k < r.K; ++k)
      if (off[k + 1] > off[k]) f(k, off[k], off[k + 1] - off[k]);
  }
};

}  // namespace
}  // namespace sta

TORCH_LIBRARY_FRAGMENT(sta, m) {
  m.def("potential_fwd(Tensor z, Tensor g, Tensor W, Tensor c, Tensor a, Tensor de, bool save=False) "
        "-> (Tensor velocity, Tensor div, Tensor hj, Tensor u, Tensor s, Tensor v)");
  m.def("potential_bwd(Tensor? grad_velocity, Tensor? grad_div, Tensor? grad_hj, Tensor? grad_u, "
        "Tensor z, Tensor g, Tensor W, Tensor c, Tensor a, Tensor de, Tensor? s=None, Tensor? v=None) "
        "-> (Tensor grad_z, Tensor grad_g, Tensor grad_W, Tensor grad_c, Tensor grad_a, Tensor grad_de)");
  m.def("hamiltonian_fwd(Tensor z, Tensor g, Tensor W, Tensor c, Tensor a, Tensor M, Tensor? C, "
        "bool save=False) -> (Tensor velocity, Tensor curl, Tensor s)");
  m.def("hamiltonian_bwd(Tensor? grad_velocity, Tensor? grad_curl, Tensor z, Tensor g, Tensor W, "
        "Tensor c, Tensor a, Tensor M, Tensor? C, Tensor? s=None) -> (Tensor grad_z, Tensor grad_g, Tensor grad_W, "
        "Tensor grad_c, Tensor grad_a, Tensor grad_M, Tensor grad_C)");
  m.def("mlp_fwd(Tensor z, Tensor g, Tensor W1, Tensor c1, Tensor W2, Tensor b2, Tensor? Pdiv, "
        "bool save=False) -> (Tensor velocity, Tensor div, Tensor div_rot, Tensor s, Tensor r, Tensor e)");
  m.def("mlp_bwd(Tensor? grad_velocity, Tensor? grad_div, Tensor? grad_div_rot, Tensor z, Tensor g, "
        "Tensor W1, Tensor c1, Tensor W2, Tensor b2, Tensor? Pdiv, Tensor? s=None, Tensor? r=None, "
        "Tensor? e=None) -> (Tensor grad_z, Tensor grad_g, "
        "Tensor grad_W1, Tensor grad_c1, Tensor grad_W2, Tensor grad_b2, Tensor grad_Pdiv)");
}

TORCH_LIBRARY_IMPL(sta, CPU, m) { STA_REGISTER_FLOW_STEP_OPS(m, sta::CpuDevice); }

// flow_step_pipeline.h -- the host pipeline of the six flow-step ops (sta::potential_fwd/_bwd,
// sta::hamiltonian_fwd/_bwd, sta::mlp_fwd/_bwd), written once for the CPU (csrc/cpu/flow_step.cpp)
// and the CUDA (csrc/cuda/flow_step_binding.cpp) backends. Schemas: csrc/README.md; names of the
// quantities: the table at the top of csrc/flow_math.h.
//
// Each op is a function template over a device policy `Dev` that supplies the primitives; the
// pipeline (checks, device guard, contiguity, allocation, routing, products, flow_math.h
// epilogues, per-sample combination, parameter gradients) is the same text for both devices:
//
//   struct Dev {
//     explicit Dev(const Tensor& z);   // per call (the CUDA policy reads z's current stream)
//     Routing route(const Tensor& g) const;   // active pairs of g: (B, K), sorted by field
//     // (r.rows, N) = src[pair_sample] (rows of src: (B, N)); src undefined: zeros
//     Tensor gather(const Tensor& src, int64_t N, const Routing& r) const;
//     // out[seg_k] = act(A'[seg_k] op(mats[k]) + bias[k]) with op = transpose when trans,
//     // A' = A (Rows::kPairs) or A[pair_sample] (Rows::kSamples), act = tanh or identity
//     void mm(const Tensor& out, const Tensor& A, Rows rows, const Tensor& mats, bool trans,
//             const Routing& r, const Tensor& bias, bool act_tanh) const;
//     void outer(const Tensor& grad, const Tensor& X, const Tensor& Y, const Routing& r, bool accumulate) const;
//         // grad[k] = X[seg_k]^T Y[seg_k] (0 for an empty segment), or += with accumulate
//     void colsum(const Tensor& out, const Tensor& X, const Routing& r) const;
//         // out (K, L, N) = per-field sums of X (L, r.rows, N) over the pair segments (0 if empty)
//     template <class Args> void for_pairs(const Routing& r, int64_t row_cost, const Args& a) const;
//     template <class Args> void for_rows(int64_t n, int64_t row_cost, const Args& a) const;
//         // math::run_row(i, a) for every pair i < P / every i < n; row_cost ~ flops of a row
//   };
//
// Both devices allocate per-pair buffers of r.rows rows: P on the CPU, where the routing runs on
// the host; the capacity B * K on CUDA, where P stays on the device so that a step never waits
// for the host (kernels read the segment bounds themselves). Nothing here depends on which: the
// empty case (no active pair) runs the same code and every output is then written by the row
// bodies, the column sums and potential_param_body (no separate "P == 0" / "B == 0" branch).
//
// Host-side C++ only: ATen and c10 headers, no CUDA headers (the .cu files never include this).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>

#include <array>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>

#include "buffer_pool.h"
#include "flow_math.h"

namespace sta {
namespace pipeline {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

/// The active pairs of g: (B, K), sorted by field then sample (csrc/flow_math.h, "Data layout").
struct Routing {
  Tensor pair_of;      // (B, K) int64: row of pair (b, k), or -1 when g[b, k] == 0
  Tensor pair_sample;  // (rows,) int64: sample of each pair (the first P rows are valid)
  Tensor pair_field;   // (rows,) int64: field of each pair
  Tensor offsets;      // (K + 1,) int64 on the op's device: field k owns rows offsets[k] .. offsets[k+1]-1
  int64_t B = 0, K = 0;
  int64_t rows = 0;    // rows of a per-pair buffer: P (CPU) or the capacity B * K (CUDA)
};

/// Where the rows of a product's left factor come from.
enum class Rows { kPairs, kSamples };
constexpr bool kTrans = true, kNoTrans = false, kTanh = true;

/// Undefined for a missing optional gradient or matrix, else contiguous.
inline Tensor contiguous_or_undefined(const OptTensor& t) {
  return (t && t->defined()) ? t->contiguous() : Tensor();
}

template <typename T>
const T* ptr(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* mut(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

/// The tensors of one op call, checked and made contiguous: in[i] is the i-th (name, tensor) given,
/// with in[0] = z: (B, D), in[1] = g: (B, K), in[2] = the first weight (K, H, D); every other defined
/// tensor must have z's dtype and device; a missing optional stays undefined. While it lives, z's
/// device is the current one (a c10::DeviceGuard).
template <size_t N>
class Inputs {
 public:
  Inputs(const char* op, std::initializer_list<std::pair<const char*, OptTensor>> named)
      : guard_(checked_device(op, named)) {
    size_t i = 0;
    for (const auto& item : named) t_[i++] = contiguous_or_undefined(item.second);
  }
  const Tensor& operator[](size_t i) const { return t_[i]; }

 private:
  static c10::Device checked_device(const char* op, std::initializer_list<std::pair<const char*, OptTensor>> named) {
    TORCH_CHECK(named.size() == N && N >= 3, op, ": internal error, ", named.size(), " inputs for ", N);
    const Tensor& z = *named.begin()[0].second;
    const Tensor& g = *named.begin()[1].second;
    const Tensor& W = *named.begin()[2].second;
    TORCH_CHECK(z.dim() == 2, op, ": z must be (B, D), got ", z.sizes());
    TORCH_CHECK(g.dim() == 2 && g.size(0) == z.size(0), op, ": g must be (B, K) with B = ", z.size(0), ", got ",
                g.sizes());
    TORCH_CHECK(W.dim() == 3 && W.size(0) == g.size(1) && W.size(2) == z.size(1), op, ": ", named.begin()[2].first,
                " must be (K, H, D) = (", g.size(1), ", H, ", z.size(1), "), got ", W.sizes());
    TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, op,
                ": float32 or float64 expected, got ", z.scalar_type());
    for (const auto& item : named) {
      if (!item.second || !item.second->defined()) continue;
      const Tensor& t = *item.second;
      TORCH_CHECK(t.scalar_type() == z.scalar_type(), op, ": ", item.first, " must have z's dtype ",
                  z.scalar_type(), ", got ", t.scalar_type());
      TORCH_CHECK(t.device() == z.device(), op, ": ", item.first, " must be on z's device ", z.device(), ", got ",
                  t.device());
    }
    return z.device();
  }

  c10::DeviceGuard guard_;
  std::array<Tensor, N> t_;
};

/// wn = |W_kj|^2: (K, H), the Laplacian weights. The norm reduces without a (K, H, D) temporary:
/// K=16, H=D=1024, one CPU thread: 6.8 ms against 39 ms for W.square().sum(-1).
inline Tensor field_row_norms_sq(const Tensor& W) { return at::linalg_vector_norm(W, 2, {-1}).square(); }

inline Tensor pair_buffer(const Routing& r, int64_t N, const Tensor& like) {
  return buffer_pool::empty({r.rows, N}, like.options());
}

// Saved rows. A forward called with save = true returns the per-pair rows its backward would
// otherwise recompute with a (rows x D x H) product per field (the tanh activations s; the
// potential fields' velocity rows v; the mlp fields' r and E) in (B * K, N) buffers, of which the
// first r.rows rows are the pairs' (r.rows <= B * K: P on the CPU, the capacity on CUDA; the
// backward routes g again and finds the same rows). save = false returns an empty (0,) tensor.
// B * K rows keep the output shape static (fake kernels, torch.compile) whatever the sparsity; the
// rows past the pairs' are zeros, so that the output is deterministic.

/// The saved-rows output of a forward: (B * K, N), or (0,) when not saving.
inline Tensor saved_rows(bool save, const Routing& r, int64_t N, const Tensor& like) {
  if (!save) return buffer_pool::empty({0}, like.options());
  const int64_t capacity = r.B * r.K;
  if (!like.is_cpu()) return at::zeros({capacity, N}, like.options());  // P is known on the device only
  Tensor rows = buffer_pool::empty({capacity, N}, like.options());
  rows.narrow(0, r.rows, capacity - r.rows).zero_();
  return rows;
}

/// Whether a backward received saved rows (an undefined or empty tensor: recompute them).
inline bool has_rows(const Tensor& saved) { return saved.defined() && saved.numel() > 0; }

/// The pair rows inside saved rows (a view), or a fresh pair buffer when there are none.
inline Tensor rows_of(const Tensor& saved, const Routing& r, int64_t N, const Tensor& like) {
  return has_rows(saved) ? saved.narrow(0, 0, r.rows) : pair_buffer(r, N, like);
}

inline void check_saved_rows(const char* op, const char* name, const Tensor& saved, int64_t rows, int64_t N) {
  if (!has_rows(saved)) return;
  TORCH_CHECK(saved.dim() == 2 && saved.size(0) == rows && saved.size(1) == N, op, ": ", name,
              " must be the rows its forward saved, (B * K, ", N, ") = (", rows, ", ", N, "), got ", saved.sizes());
}

/// out (B, N) = sum_k weight[b, k] rows[pair_of[b, k]] (weight == nullptr: 1).
template <typename T, class Dev>
void pair_sum(const Dev& dev, const Routing& r, const Tensor& out, const Tensor& rows, const T* weight) {
  const int64_t N = out.size(1);
  const math::PairSumArgs<T> A{rows.const_data_ptr<T>(), r.pair_of.const_data_ptr<int64_t>(), weight,
                               out.data_ptr<T>(), r.K, N};
  dev.for_rows(r.B, r.K * N + 1, A);
}

/// Per-pair scalars vals (rows,) -> pair_out (B, K) and / or sum_out (B,) = sum_k weight vals.
template <typename T, class Dev>
void pair_scatter(const Dev& dev, const Routing& r, const Tensor& vals, const T* weight, T* pair_out, T* sum_out) {
  const math::PairScatterArgs<T> A{vals.const_data_ptr<T>(), r.pair_of.const_data_ptr<int64_t>(), weight,
                                   pair_out, sum_out, r.K, false};
  dev.for_rows(r.B, r.K + 1, A);
}

// =============================================================================================
// Potential fields
// =============================================================================================

template <class Dev>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> potential_fwd(const Tensor& z_, const Tensor& g_,
                                                                         const Tensor& W_, const Tensor& c_,
                                                                         const Tensor& a_, const Tensor& de_,
                                                                         bool save) {
  const Inputs<6> in("sta::potential_fwd", {{"z", z_}, {"g", g_}, {"W", W_}, {"c", c_}, {"a", a_}, {"de", de_}});
  const Tensor &z = in[0], &g = in[1], &W = in[2], &c = in[3], &a = in[4], &de = in[5];
  const int64_t B = z.size(0), D = z.size(1), K = W.size(0), H = W.size(1);
  const auto opt = z.options();
  Tensor velocity = buffer_pool::empty({B, D}, opt), div = buffer_pool::empty({B}, opt);
  Tensor hj = buffer_pool::empty({B, K}, opt), u = buffer_pool::empty({B, K}, opt);
  const Dev dev(z);
  const Routing r = dev.route(g);
  const Tensor wn = field_row_norms_sq(W);
  const Tensor saved_s = saved_rows(save, r, H, z), saved_v = saved_rows(save, r, D, z);
  Tensor S = rows_of(saved_s, r, H, z), V = rows_of(saved_v, r, D, z);
  const Tensor Q = save ? pair_buffer(r, H, z) : S;  // q over s unless s is saved
  Tensor lap = buffer_pool::empty({r.rows}, opt), dudt = buffer_pool::empty({r.rows}, opt), up = buffer_pool::empty({r.rows}, opt);
  dev.mm(S, z, Rows::kSamples, W, kTrans, r, c, kTanh);  // s = tanh(W x + c)
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sta_potential_fwd", [&] {
    using T = scalar_t;
    const math::PotentialFwdArgs<T> A{S.const_data_ptr<T>(), Q.data_ptr<T>(), r.pair_field.const_data_ptr<int64_t>(),
                                      a.const_data_ptr<T>(),
                                      de.const_data_ptr<T>(), wn.const_data_ptr<T>(), lap.data_ptr<T>(),
                                      dudt.data_ptr<T>(), up.data_ptr<T>(), H};
    dev.for_pairs(r, 8 * H, A);
    dev.mm(V, Q, Rows::kPairs, W, kNoTrans, r, Tensor(), false);  // v = W^T q per pair
    const math::PotentialCombineArgs<T> C{V.const_data_ptr<T>(), lap.const_data_ptr<T>(), dudt.const_data_ptr<T>(),
                                          up.const_data_ptr<T>(), r.pair_of.const_data_ptr<int64_t>(),
                                          g.const_data_ptr<T>(), velocity.data_ptr<T>(), div.data_ptr<T>(),
                                          hj.data_ptr<T>(), u.data_ptr<T>(), K, D};
    dev.for_rows(B, 2 * K * D + 1, C);
  });
  return {velocity, div, hj, u, saved_s, saved_v};
}

template <class Dev>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> potential_bwd(
    const OptTensor& grad_velocity_, const OptTensor& grad_div_, const OptTensor& grad_hj_, const OptTensor& grad_u_,
    const Tensor& z_, const Tensor& g_, const Tensor& W_, const Tensor& c_, const Tensor& a_, const Tensor& de_,
    const OptTensor& s_, const OptTensor& v_) {
  const Inputs<12> in("sta::potential_bwd", {{"z", z_}, {"g", g_}, {"W", W_}, {"c", c_}, {"a", a_}, {"de", de_},
                                             {"grad_velocity", grad_velocity_}, {"grad_div", grad_div_},
                                             {"grad_hj", grad_hj_}, {"grad_u", grad_u_}, {"s", s_}, {"v", v_}});
  const Tensor &z = in[0], &g = in[1], &W = in[2], &c = in[3], &a = in[4], &de = in[5];
  const Tensor &gV = in[6], &gdiv = in[7], &ghj = in[8], &gu = in[9], &saved_s = in[10], &saved_v = in[11];
  const int64_t B = z.size(0), D = z.size(1), K = W.size(0), H = W.size(1);
  check_saved_rows("sta::potential_bwd", "s", saved_s, B * K, H);
  check_saved_rows("sta::potential_bwd", "v", saved_v, B * K, D);
  const auto opt = z.options();
  Tensor grad_z = buffer_pool::empty({B, D}, opt), grad_g = buffer_pool::empty({B, K}, opt), grad_W = buffer_pool::empty(W.sizes(), W.options());
  Tensor grad_c = buffer_pool::empty({K, H}, opt), grad_a = buffer_pool::empty({K, H}, opt), grad_de = buffer_pool::empty({K, H}, opt);
  const Dev dev(z);
  const Routing r = dev.route(g);
  const Tensor wn = field_row_norms_sq(W);
  const Tensor X = dev.gather(z, D, r);
  // s: the forward's (a copy: the epilogue writes Qx over it) or recomputed
  Tensor S = pair_buffer(r, H, z);
  if (has_rows(saved_s))
    S.copy_(saved_s.narrow(0, 0, r.rows));
  else
    dev.mm(S, X, Rows::kPairs, W, kTrans, r, c, kTanh);
  Tensor G = dev.gather(gV, D, r);
  Tensor gw = buffer_pool::empty({r.rows}, opt);
  Tensor buf = buffer_pool::empty({4, r.rows, H}, opt);  // GQ -> GH, A2, A3, A4 (flow_math.h)
  Tensor GQ = buf[0];
  Tensor GZ = pair_buffer(r, D, z);
  Tensor sums = buffer_pool::empty({K, 4, H}, opt);  // per-field sums of buf
  const bool weighted = ghj.defined();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sta_potential_bwd", [&] {
    using T = scalar_t;
    if (weighted) {  // the HJ residual needs v: G <- w gV + gh v, gw = gV . v
      Tensor V = rows_of(saved_v, r, D, z);
      if (!has_rows(saved_v)) {  // v = W^T q, recomputed
        Tensor Q = pair_buffer(r, H, z);
        const math::HamiltonianFwdArgs<T> QA{S.const_data_ptr<T>(), Q.data_ptr<T>(), nullptr,
                                             r.pair_field.const_data_ptr<int64_t>(), a.const_data_ptr<T>(), H};
        dev.for_pairs(r, 4 * H, QA);
        dev.mm(V, Q, Rows::kPairs, W, kNoTrans, r, Tensor(), false);
      }
      const math::PotentialBwdVArgs<T> VA{G.data_ptr<T>(), V.const_data_ptr<T>(),
                                          r.pair_sample.const_data_ptr<int64_t>(),
                                          r.pair_field.const_data_ptr<int64_t>(), g.const_data_ptr<T>(),
                                          ghj.const_data_ptr<T>(), gw.data_ptr<T>(), K, D};
      dev.for_pairs(r, 4 * D, VA);
    }
    dev.mm(GQ, G, Rows::kPairs, W, kTrans, r, Tensor(), false);
    const math::PotentialBwdArgs<T> A{S.data_ptr<T>(), GQ.data_ptr<T>(), buf[1].data_ptr<T>(), buf[2].data_ptr<T>(),
                                      buf[3].data_ptr<T>(), gw.data_ptr<T>(), r.pair_sample.const_data_ptr<int64_t>(),
                                      r.pair_field.const_data_ptr<int64_t>(), g.const_data_ptr<T>(), ptr<T>(gdiv),
                                      ptr<T>(ghj), ptr<T>(gu), a.const_data_ptr<T>(), de.const_data_ptr<T>(),
                                      wn.const_data_ptr<T>(), K, H, weighted};
    dev.for_pairs(r, 24 * H, A);
    pair_scatter<T>(dev, r, gw, nullptr, grad_g.data_ptr<T>(), nullptr);
    dev.mm(GZ, GQ, Rows::kPairs, W, kNoTrans, r, Tensor(), false);  // dL/dx = W^T dL/dh
    pair_sum<T>(dev, r, grad_z, GZ, nullptr);
    // Field parameters: the closed-form chain rule on the per-field sums (zeros for unused fields).
    dev.colsum(sums, buf, r);
    const math::PotentialParamArgs<T> PA{sums.const_data_ptr<T>(), W.const_data_ptr<T>(), a.const_data_ptr<T>(),
                                         de.const_data_ptr<T>(), wn.const_data_ptr<T>(),
                                         r.offsets.const_data_ptr<int64_t>(), grad_W.data_ptr<T>(),
                                         grad_c.data_ptr<T>(), grad_a.data_ptr<T>(), grad_de.data_ptr<T>(), H, D};
    dev.for_rows(K * H, 2 * D + 8, PA);
  });
  dev.outer(grad_W, S, G, r, true);   // v = W^T Qx  (Qx = q or w q, see flow_math.h)
  dev.outer(grad_W, GQ, X, r, true);  // h = W x + c
  return {grad_z, grad_g, grad_W, grad_c, grad_a, grad_de};
}

// =============================================================================================
// Hamiltonian rotational fields
// =============================================================================================

template <class Dev>
std::tuple<Tensor, Tensor, Tensor> hamiltonian_fwd(const Tensor& z_, const Tensor& g_, const Tensor& W_,
                                                   const Tensor& c_, const Tensor& a_, const Tensor& M_,
                                                   const OptTensor& C_, bool save) {
  const Inputs<7> in("sta::hamiltonian_fwd",
                     {{"z", z_}, {"g", g_}, {"W", W_}, {"c", c_}, {"a", a_}, {"M", M_}, {"C", C_}});
  const Tensor &z = in[0], &g = in[1], &W = in[2], &c = in[3], &a = in[4], &M = in[5], &C = in[6];
  const int64_t B = z.size(0), D = z.size(1), K = W.size(0), H = W.size(1);
  const auto opt = z.options();
  Tensor velocity = buffer_pool::empty({B, D}, opt), curl = buffer_pool::empty({B, K}, opt);
  const Dev dev(z);
  const Routing r = dev.route(g);
  const bool with_curl = C.defined();
  const Tensor saved_s = saved_rows(save, r, H, z);
  Tensor S = rows_of(saved_s, r, H, z), V = pair_buffer(r, D, z);
  const Tensor Q = save ? pair_buffer(r, H, z) : S;  // q over s unless s is saved
  Tensor Dm = with_curl ? pair_buffer(r, H, z) : Tensor();
  Tensor curl_p = at::zeros({r.rows}, opt);
  dev.mm(S, z, Rows::kSamples, W, kTrans, r, c, kTanh);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sta_hamiltonian_fwd", [&] {
    using T = scalar_t;
    const math::HamiltonianFwdArgs<T> A{S.const_data_ptr<T>(), Q.data_ptr<T>(), mut<T>(Dm),
                                        r.pair_field.const_data_ptr<int64_t>(), a.const_data_ptr<T>(), H};
    dev.for_pairs(r, 6 * H, A);
    dev.mm(V, Q, Rows::kPairs, M, kTrans, r, Tensor(), false);  // r = M q
    if (with_curl) {
      Tensor T_ = pair_buffer(r, H, z);
      dev.mm(T_, Dm, Rows::kPairs, C, kNoTrans, r, Tensor(), false);  // d^T C
      const math::RowDotArgs<T> RA{T_.const_data_ptr<T>(), Dm.const_data_ptr<T>(), curl_p.data_ptr<T>(), H, false};
      dev.for_pairs(r, 2 * H, RA);
    }
    pair_sum<T>(dev, r, velocity, V, g.const_data_ptr<T>());
    pair_scatter<T>(dev, r, curl_p, nullptr, curl.data_ptr<T>(), nullptr);
  });
  return {velocity, curl, saved_s};
}

template <class Dev>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> hamiltonian_bwd(
    const OptTensor& grad_velocity_, const OptTensor& grad_curl_, const Tensor& z_, const Tensor& g_, const Tensor& W_,
    const Tensor& c_, const Tensor& a_, const Tensor& M_, const OptTensor& C_, const OptTensor& s_) {
  const Inputs<10> in("sta::hamiltonian_bwd", {{"z", z_}, {"g", g_}, {"W", W_}, {"c", c_}, {"a", a_}, {"M", M_},
                                              {"C", C_}, {"grad_velocity", grad_velocity_}, {"grad_curl", grad_curl_},
                                              {"s", s_}});
  const Tensor &z = in[0], &g = in[1], &W = in[2], &c = in[3], &a = in[4], &M = in[5], &C = in[6];
  const Tensor &gV = in[7], &gcurl = in[8], &saved_s = in[9];
  const int64_t B = z.size(0), D = z.size(1), K = W.size(0), H = W.size(1);
  check_saved_rows("sta::hamiltonian_bwd", "s", saved_s, B * K, H);
  const auto opt = z.options();
  Tensor grad_z = buffer_pool::empty({B, D}, opt), grad_g = buffer_pool::empty({B, K}, opt);
  Tensor grad_W = buffer_pool::empty(W.sizes(), W.options()), grad_M = buffer_pool::empty(M.sizes(), opt);  // written whole by dev.outer
  Tensor grad_c = buffer_pool::empty({K, H}, opt), grad_a = buffer_pool::empty({K, H}, opt);
  const Dev dev(z);
  const Routing r = dev.route(g);
  const bool curl = C.defined() && gcurl.defined();
  Tensor grad_C = !C.defined() ? at::zeros({0}, opt) : curl ? at::empty_like(C) : at::zeros_like(C);
  const Tensor X = dev.gather(z, D, r);
  const Tensor S = rows_of(saved_s, r, H, z);  // s: the forward's (read only here) or recomputed
  if (!has_rows(saved_s)) dev.mm(S, X, Rows::kPairs, W, kTrans, r, c, kTanh);
  const Tensor G = dev.gather(gV, D, r);
  Tensor GQ = pair_buffer(r, H, z), Q = pair_buffer(r, H, z), A4 = pair_buffer(r, H, z), GZ = pair_buffer(r, D, z);
  Tensor gw = buffer_pool::empty({r.rows}, opt);
  Tensor Dm, T_;
  dev.mm(GQ, G, Rows::kPairs, M, kNoTrans, r, Tensor(), false);  // M^T gV per pair
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sta_hamiltonian_bwd", [&] {
    using T = scalar_t;
    if (curl) {
      Dm = pair_buffer(r, H, z);
      const math::HamiltonianFwdArgs<T> DA{S.const_data_ptr<T>(), Q.data_ptr<T>(), Dm.data_ptr<T>(),
                                           r.pair_field.const_data_ptr<int64_t>(), a.const_data_ptr<T>(), H};
      dev.for_pairs(r, 6 * H, DA);
      const Tensor Csym = (C + C.transpose(1, 2)).contiguous();
      T_ = pair_buffer(r, H, z);
      dev.mm(T_, Dm, Rows::kPairs, Csym, kNoTrans, r, Tensor(), false);  // d curl / d d = Csym d
    }
    const math::HamiltonianBwdArgs<T> A{S.const_data_ptr<T>(), GQ.data_ptr<T>(), Q.data_ptr<T>(), A4.data_ptr<T>(),
                                        mut<T>(T_), gw.data_ptr<T>(), r.pair_sample.const_data_ptr<int64_t>(),
                                        r.pair_field.const_data_ptr<int64_t>(), g.const_data_ptr<T>(),
                                        curl ? gcurl.const_data_ptr<T>() : nullptr, a.const_data_ptr<T>(), K, H};
    dev.for_pairs(r, 20 * H, A);
    pair_scatter<T>(dev, r, gw, nullptr, grad_g.data_ptr<T>(), nullptr);
    dev.mm(GZ, GQ, Rows::kPairs, W, kNoTrans, r, Tensor(), false);
    pair_sum<T>(dev, r, grad_z, GZ, nullptr);
  });
  dev.outer(grad_W, GQ, X, r, false);
  dev.outer(grad_M, G, Q, r, false);  // d r / d M = gv (w q)^T
  dev.colsum(grad_c.unsqueeze(1), GQ.unsqueeze(0), r);
  dev.colsum(grad_a.unsqueeze(1), A4.unsqueeze(0), r);
  if (curl) dev.outer(grad_C, Dm, T_, r, false);  // sum gc d d^T
  return {grad_z, grad_g, grad_W, grad_c, grad_a, grad_M, grad_C};
}

// =============================================================================================
// MLP rotational fields
// =============================================================================================

struct MlpForward {
  Tensor S, DS1, R, E;  // (rows, H), (rows, H) or undefined, (rows, D), (rows, D) or undefined
};

/// ds1 = tanh'(h1) of the mlp fields' first layer, from s = tanh(h1).
template <class Dev>
Tensor mlp_hidden_derivative(const Dev& dev, const Tensor& S, const Routing& r) {
  const int64_t H = S.size(1);
  Tensor DS1 = pair_buffer(r, H, S);
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "sta_mlp_hidden", [&] {
    const math::MlpHiddenArgs<scalar_t> HA{S.const_data_ptr<scalar_t>(), DS1.data_ptr<scalar_t>(), H};
    dev.for_pairs(r, 2 * H, HA);
  });
  return DS1;
}

/// The per-pair activations of the mlp fields; A: z (Rows::kSamples) or X (Rows::kPairs). The
/// rows s, r (and E = Pdiv ds1 when Pdiv is defined) are written into `into`'s S, R, E when those
/// are defined (saved rows), else into fresh pair buffers.
template <class Dev>
MlpForward mlp_recompute(const Dev& dev, const Tensor& A, Rows rows, const Tensor& W1, const Tensor& c1,
                         const Tensor& W2, const Tensor& b2, const Tensor& Pdiv, const Routing& r,
                         MlpForward into = {}) {
  const int64_t D = W2.size(1), H = W1.size(1);
  MlpForward f;
  f.S = into.S.defined() ? into.S : pair_buffer(r, H, A);
  dev.mm(f.S, A, rows, W1, kTrans, r, c1, kTanh);
  f.R = into.R.defined() ? into.R : pair_buffer(r, D, A);
  dev.mm(f.R, f.S, Rows::kPairs, W2, kTrans, r, b2, kTanh);
  if (Pdiv.defined()) {
    f.DS1 = mlp_hidden_derivative(dev, f.S, r);
    f.E = into.E.defined() ? into.E : pair_buffer(r, D, A);
    dev.mm(f.E, f.DS1, Rows::kPairs, Pdiv, kTrans, r, Tensor(), false);  // E = Pdiv ds1
  }
  return f;
}

template <class Dev>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_fwd(const Tensor& z_, const Tensor& g_,
                                                                   const Tensor& W1_, const Tensor& c1_,
                                                                   const Tensor& W2_, const Tensor& b2_,
                                                                   const OptTensor& Pdiv_, bool save) {
  const Inputs<7> in("sta::mlp_fwd",
                     {{"z", z_}, {"g", g_}, {"W1", W1_}, {"c1", c1_}, {"W2", W2_}, {"b2", b2_}, {"Pdiv", Pdiv_}});
  const Tensor &z = in[0], &g = in[1], &W1 = in[2], &c1 = in[3], &W2 = in[4], &b2 = in[5], &Pdiv = in[6];
  const int64_t B = z.size(0), D = z.size(1), K = W1.size(0);
  const auto opt = z.options();
  Tensor velocity = buffer_pool::empty({B, D}, opt), div = buffer_pool::empty({B}, opt), div_rot = buffer_pool::empty({B, K}, opt);
  const Dev dev(z);
  const Routing r = dev.route(g);
  const int64_t H = W1.size(1);
  const Tensor saved_s = saved_rows(save, r, H, z), saved_r = saved_rows(save, r, D, z);
  const Tensor saved_e = saved_rows(save && Pdiv.defined(), r, D, z);
  // the saved rows' views, or fresh pair buffers when not saving
  const MlpForward into{rows_of(saved_s, r, H, z), Tensor(), rows_of(saved_r, r, D, z),
                        Pdiv.defined() ? rows_of(saved_e, r, D, z) : Tensor()};
  const MlpForward f = mlp_recompute(dev, z, Rows::kSamples, W1, c1, W2, b2, Pdiv, r, into);
  Tensor divp = buffer_pool::empty({r.rows}, opt);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sta_mlp_fwd", [&] {
    using T = scalar_t;
    const math::MlpFwdArgs<T> A{f.R.const_data_ptr<T>(), ptr<T>(f.E), divp.data_ptr<T>(), D};
    dev.for_pairs(r, 4 * D, A);
    pair_sum<T>(dev, r, velocity, f.R, g.const_data_ptr<T>());
    pair_scatter<T>(dev, r, divp, g.const_data_ptr<T>(), div_rot.data_ptr<T>(), div.data_ptr<T>());
  });
  return {velocity, div, div_rot, saved_s, saved_r, saved_e};
}

template <class Dev>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_bwd(
    const OptTensor& grad_velocity_, const OptTensor& grad_div_, const OptTensor& grad_div_rot_, const Tensor& z_,
    const Tensor& g_, const Tensor& W1_, const Tensor& c1_, const Tensor& W2_, const Tensor& b2_,
    const OptTensor& Pdiv_, const OptTensor& s_, const OptTensor& r_, const OptTensor& e_) {
  const Inputs<13> in("sta::mlp_bwd", {{"z", z_}, {"g", g_}, {"W1", W1_}, {"c1", c1_}, {"W2", W2_}, {"b2", b2_},
                                         {"Pdiv", Pdiv_}, {"grad_velocity", grad_velocity_},
                                         {"grad_div", grad_div_}, {"grad_div_rot", grad_div_rot_},
                                         {"s", s_}, {"r", r_}, {"e", e_}});
  const Tensor &z = in[0], &g = in[1], &W1 = in[2], &c1 = in[3], &W2 = in[4], &b2 = in[5], &Pdiv_in = in[6];
  const Tensor &gV = in[7], &gdiv = in[8], &gdr = in[9], &saved_s = in[10], &saved_r = in[11], &saved_e = in[12];
  const int64_t B = z.size(0), D = z.size(1), K = W1.size(0), H = W1.size(1);
  check_saved_rows("sta::mlp_bwd", "s", saved_s, B * K, H);
  check_saved_rows("sta::mlp_bwd", "r", saved_r, B * K, D);
  check_saved_rows("sta::mlp_bwd", "e", saved_e, B * K, D);
  const auto opt = z.options();
  Tensor grad_z = buffer_pool::empty({B, D}, opt), grad_g = buffer_pool::empty({B, K}, opt);
  Tensor grad_W1 = buffer_pool::empty(W1.sizes(), opt), grad_W2 = buffer_pool::empty(W2.sizes(), opt);  // written whole by dev.outer
  Tensor grad_c1 = buffer_pool::empty({K, H}, opt), grad_b2 = buffer_pool::empty({K, D}, opt);
  const Dev dev(z);
  const Routing r = dev.route(g);
  // the divergence branch is differentiated only when its output received a gradient
  const Tensor Pdiv = (Pdiv_in.defined() && (gdiv.defined() || gdr.defined())) ? Pdiv_in : Tensor();
  Tensor grad_Pdiv = !Pdiv_in.defined() ? at::zeros({0}, opt)
                     : Pdiv.defined()    ? buffer_pool::empty(Pdiv.sizes(), opt)  // written whole by dev.outer
                                         : buffer_pool::empty(Pdiv_in.sizes(), opt).zero_();
  const Tensor X = dev.gather(z, D, r);
  MlpForward f;
  if (has_rows(saved_s) && has_rows(saved_r) && (!Pdiv.defined() || has_rows(saved_e))) {  // the forward's rows
    f.S = saved_s.narrow(0, 0, r.rows);
    f.R = saved_r.narrow(0, 0, r.rows);
    if (Pdiv.defined()) {
      f.DS1 = mlp_hidden_derivative(dev, f.S, r);
      f.E = pair_buffer(r, D, z).copy_(saved_e.narrow(0, 0, r.rows));  // the epilogue writes dL/dE over it
    }
  } else {
    f = mlp_recompute(dev, X, Rows::kPairs, W1, c1, W2, b2, Pdiv, r);
  }
  Tensor G = dev.gather(gV, D, r);
  Tensor gw = buffer_pool::empty({r.rows}, opt);
  Tensor GS = pair_buffer(r, H, z), GZ = pair_buffer(r, D, z);
  Tensor GDS = Pdiv.defined() ? pair_buffer(r, H, z) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sta_mlp_bwd", [&] {
    using T = scalar_t;
    const math::MlpBwdOutArgs<T> A{f.R.const_data_ptr<T>(), G.data_ptr<T>(), mut<T>(f.E), gw.data_ptr<T>(),
                                   r.pair_sample.const_data_ptr<int64_t>(), r.pair_field.const_data_ptr<int64_t>(),
                                   g.const_data_ptr<T>(), Pdiv.defined() ? ptr<T>(gdiv) : nullptr,
                                   Pdiv.defined() ? ptr<T>(gdr) : nullptr, K, D};
    dev.for_pairs(r, 12 * D, A);
    pair_scatter<T>(dev, r, gw, nullptr, grad_g.data_ptr<T>(), nullptr);
    dev.mm(GS, G, Rows::kPairs, W2, kNoTrans, r, Tensor(), false);  // dL/ds via h2 = W2 s + b2
    if (Pdiv.defined()) dev.mm(GDS, f.E, Rows::kPairs, Pdiv, kNoTrans, r, Tensor(), false);  // via E = Pdiv ds1
    const math::MlpBwdHiddenArgs<T> HA{f.S.const_data_ptr<T>(), GS.data_ptr<T>(), ptr<T>(GDS), H};
    dev.for_pairs(r, 6 * H, HA);
    dev.mm(GZ, GS, Rows::kPairs, W1, kNoTrans, r, Tensor(), false);
    pair_sum<T>(dev, r, grad_z, GZ, nullptr);
  });
  dev.outer(grad_W2, G, f.S, r, false);
  dev.colsum(grad_b2.unsqueeze(1), G.unsqueeze(0), r);
  if (Pdiv.defined()) dev.outer(grad_Pdiv, f.E, f.DS1, r, false);
  dev.outer(grad_W1, GS, X, r, false);
  dev.colsum(grad_c1.unsqueeze(1), GS.unsqueeze(0), r);
  return {grad_z, grad_g, grad_W1, grad_c1, grad_W2, grad_b2, grad_Pdiv};
}

}  // namespace pipeline
}  // namespace sta

/// Registers the six flow-step ops of this file for one dispatch key with the policy DEV
/// (inside TORCH_LIBRARY_IMPL(sta, KEY, m)).
#define STA_REGISTER_FLOW_STEP_OPS(m, DEV)                                      \
  do {                                                                          \
    (m).impl("potential_fwd", &sta::pipeline::potential_fwd<DEV>);              \
    (m).impl("potential_bwd", &sta::pipeline::potential_bwd<DEV>);              \
    (m).impl("hamiltonian_fwd", &sta::pipeline::hamiltonian_fwd<DEV>);          \
    (m).impl("hamiltonian_bwd", &sta::pipeline::hamiltonian_bwd<DEV>);          \
    (m).impl("mlp_fwd", &sta::pipeline::mlp_fwd<DEV>);                          \
    (m).impl("mlp_bwd", &sta::pipeline::mlp_bwd<DEV>);                          \
  } while (0)

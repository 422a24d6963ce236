// CPU implementation of the fused sparse flow step (SPEC 2): sta::potential_fwd/_bwd,
// sta::hamiltonian_fwd/_bwd, sta::mlp_fwd/_bwd. The schemas are defined here (full text and
// semantics in csrc/README.md); the CUDA backend registers its kernels for the same schemas.
//
// Schemas (namespace sta; every tensor has z's dtype; Tensor? grads are None when unused):
//   potential_fwd(z, g, W, c, a, de) -> (velocity (B,D), div (B,), hj (B,K), u (B,K))
//   potential_bwd(grad_velocity?, grad_div?, grad_hj?, grad_u?, z, g, W, c, a, de)
//       -> (grad_z, grad_g, grad_W, grad_c, grad_a, grad_de)
//   hamiltonian_fwd(z, g, W, c, a, M, C?) -> (velocity (B,D), curl (B,K))
//   hamiltonian_bwd(grad_velocity?, grad_curl?, z, g, W, c, a, M, C?)
//       -> (grad_z, grad_g, grad_W, grad_c, grad_a, grad_M, grad_C ((K,H,H) or (0,)))
//   mlp_fwd(z, g, W1, c1, W2, b2, P?) -> (velocity (B,D), div (B,), div_rot (B,K))
//   mlp_bwd(grad_velocity?, grad_div?, grad_div_rot?, z, g, W1, c1, W2, b2, P?)
//       -> (grad_z, grad_g, grad_W1, grad_c1, grad_W2, grad_b2, grad_P ((K,D,H) or (0,)))
//   z: (B, D), g: (B, K), W, W1: (K, H, D), c, a, de, c1: (K, H), M, W2, P: (K, D, H),
//   b2: (K, D), C: (K, H, H).
//
// Why this shape of code: the matrix products go through ATen (MKL/OpenBLAS: a hand-written
// OpenMP loop was 5x slower here), on the rows of each field gathered contiguously (pairs
// sorted by field); only the elementwise work is ours, fused into one pass per row
// (flow_math.h bodies in at::parallel_for). tanh runs through ATen's vectorised kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../flow_math.h"

namespace sta {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---------------------------------------------------------------------------------------------
// Routing: the active pairs sorted by field.
// ---------------------------------------------------------------------------------------------
struct Routing {
  Tensor pair_sample;            // (P,) int64
  Tensor pair_field;             // (P,) int64
  Tensor pair_of;                // (B, K) int64, row of pair (b, k) or -1
  std::vector<int64_t> offsets;  // (K + 1,)
  int64_t P = 0;
};

Routing route(const Tensor& g) {  // g: (B, K) contiguous
  const int64_t B = g.size(0), K = g.size(1);
  Routing r;
  r.pair_of = at::empty({B, K}, g.options().dtype(at::kLong));
  r.offsets.assign(K + 1, 0);
  int64_t* po = r.pair_of.data_ptr<int64_t>();
  std::vector<int64_t> samples, fields;
  samples.reserve(B * K);
  fields.reserve(B * K);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sta_route", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t b = 0; b < B; ++b) {
        if (gp[b * K + k] != scalar_t(0)) {
          po[b * K + k] = static_cast<int64_t>(samples.size());
          samples.push_back(b);
          fields.push_back(k);
        } else {
          po[b * K + k] = -1;
        }
      }
      r.offsets[k + 1] = static_cast<int64_t>(samples.size());
    }
  });
  r.P = static_cast<int64_t>(samples.size());
  auto lopt = g.options().dtype(at::kLong);
  r.pair_sample = at::empty({r.P}, lopt);
  r.pair_field = at::empty({r.P}, lopt);
  std::copy(samples.begin(), samples.end(), r.pair_sample.data_ptr<int64_t>());
  std::copy(fields.begin(), fields.end(), r.pair_field.data_ptr<int64_t>());
  return r;
}

// Run body(i) for i in [0, n) on the intra-op thread pool. `row_cost` ~ flops per row; rows are
// grouped so each task has ~at::internal::GRAIN_SIZE work (ATen's own threshold).
template <typename F>
void parallel_rows(int64_t n, int64_t row_cost, const F& body) {
  if (n <= 0) return;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, row_cost));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) body(i);
  });
}

// Per-field products over the pair segments: out[seg_k] = A[seg_k] @ op(Wk), with Wk = mats[k]
// (transposed when trans) and an optional per-field bias row. out, A: (P, *) contiguous.
void segment_mm(Tensor& out, const Tensor& A, const Tensor& mats, bool trans, const Routing& r,
                const OptTensor& bias = std::nullopt) {
  const int64_t K = static_cast<int64_t>(r.offsets.size()) - 1;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t o = r.offsets[k], n = r.offsets[k + 1] - o;
    if (n == 0) continue;
    Tensor dst = out.narrow(0, o, n);
    Tensor w = trans ? mats[k].t() : mats[k];
    if (bias)
      at::addmm_out(dst, (*bias)[k], A.narrow(0, o, n), w);
    else
      at::mm_out(dst, A.narrow(0, o, n), w);
  }
}

// Per-field weight gradients: grad[k] += X[seg_k]^T @ Y[seg_k]  (grad: (K, m, n)).
void segment_outer_add(Tensor& grad, const Tensor& X, const Tensor& Y, const Routing& r) {
  const int64_t K = static_cast<int64_t>(r.offsets.size()) - 1;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t o = r.offsets[k], n = r.offsets[k + 1] - o;
    if (n == 0) continue;
    Tensor dst = grad[k];
    dst.addmm_(X.narrow(0, o, n).t(), Y.narrow(0, o, n));
  }
}

// Per-field column sums of a (..., P, N) buffer over the pair segments: out[k] = sum over seg.
void segment_sum(Tensor& out, const Tensor& X, const Routing& r, int64_t dim) {
  const int64_t K = static_cast<int64_t>(r.offsets.size()) - 1;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t o = r.offsets[k], n = r.offsets[k + 1] - o;
    if (n == 0) continue;
    out[k].copy_(X.narrow(dim, o, n).sum(dim));
  }
}

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return t ? t->const_data_ptr<T>() : nullptr;
}

OptTensor contiguous_opt(const OptTensor& t) {
  if (t && t->defined()) return t->contiguous();
  return std::nullopt;
}

void check_inputs(const char* op, const Tensor& z, const Tensor& g, const Tensor& W) {
  TORCH_CHECK(z.dim() == 2, op, ": z must be (B, D), got ", z.sizes());
  TORCH_CHECK(g.dim() == 2 && g.size(0) == z.size(0), op, ": g must be (B, K) with B = ", z.size(0),
              ", got ", g.sizes());
  TORCH_CHECK(W.dim() == 3 && W.size(0) == g.size(1) && W.size(2) == z.size(1), op,
              ": first weight must be (K, H, D) = (", g.size(1), ", H, ", z.size(1), "), got ", W.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, op,
              ": float32 or float64 expected, got ", z.scalar_type());
  TORCH_CHECK(g.scalar_type() == z.scalar_type() && W.scalar_type() == z.scalar_type(), op,
              ": all tensors must have z's dtype ", z.scalar_type());
}

// Per-sample combination of per-pair rows: out (B, N) = sum_k weight[b,k] rows[pair_of[b,k]].
template <typename scalar_t>
void pair_sum(Tensor& out, const Tensor& rows, const Routing& r, const scalar_t* weight) {
  const int64_t B = out.size(0), N = out.size(1), K = r.pair_of.size(1);
  math::PairSumArgs<scalar_t> A{r.P ? rows.const_data_ptr<scalar_t>() : nullptr,
                                r.pair_of.const_data_ptr<int64_t>(), weight,
                                out.data_ptr<scalar_t>(), K, N};
  parallel_rows(B, K * N + 1, [&](int64_t b) { math::pair_sum_body(b, A); });
}

template <typename scalar_t>
void pair_scatter(const Tensor& vals, const Routing& r, const scalar_t* weight, scalar_t* pair_out,
                  scalar_t* sum_out, bool accumulate) {
  const int64_t B = r.pair_of.size(0), K = r.pair_of.size(1);
  math::PairScatterArgs<scalar_t> A{r.P ? vals.const_data_ptr<scalar_t>() : nullptr,
                                    r.pair_of.const_data_ptr<int64_t>(), weight, pair_out, sum_out, K,
                                    accumulate};
  parallel_rows(B, K + 1, [&](int64_t b) { math::pair_scatter_body(b, A); });
}

// =============================================================================================
// Potential fields
// =============================================================================================

std::tuple<Tensor, Tensor, Tensor, Tensor> potential_fwd_cpu(const Tensor& z_, const Tensor& g_,
                                                             const Tensor& W_, const Tensor& c_,
                                                             const Tensor& a_, const Tensor& de_) {
  check_inputs("sta::potential_fwd", z_, g_, W_);
  const Tensor g = g_.contiguous(), W = W_.contiguous(), c = c_.contiguous(), a = a_.contiguous(),
               de = de_.contiguous();
  const int64_t B = z_.size(0), D = z_.size(1), K = W.size(0), H = W.size(1);
  Tensor velocity = at::empty({B, D}, z_.options());
  Tensor div = at::empty({B}, z_.options());
  Tensor hj = at::empty({B, K}, z_.options());
  Tensor u = at::empty({B, K}, z_.options());
  Routing r = route(g);
  Tensor V, lap, dudt, up;
  if (r.P > 0) {
    const Tensor X = z_.index_select(0, r.pair_sample);
    Tensor S = at::empty({r.P, H}, z_.options());
    segment_mm(S, X, W, /*trans=*/true, r, c);
    S.tanh_();
    // (K, H): |W_kj|^2, the Laplacian weights. The norm reduces without a (K, H, D) temporary:
    // K=16, H=D=1024, one thread: 6.8 ms against 39 ms for W.square().sum(-1).
    const Tensor wn = at::linalg_vector_norm(W, 2, {-1}).square();
    lap = at::empty({r.P}, z_.options());
    dudt = at::empty({r.P}, z_.options());
    up = at::empty({r.P}, z_.options());
    V = at::empty({r.P, D}, z_.options());
    AT_DISPATCH_FLOATING_TYPES(z_.scalar_type(), "sta_potential_fwd", [&] {
      math::PotentialFwdArgs<scalar_t> A{S.data_ptr<scalar_t>(), r.pair_field.const_data_ptr<int64_t>(),
                                         a.const_data_ptr<scalar_t>(), de.const_data_ptr<scalar_t>(),
                                         wn.const_data_ptr<scalar_t>(), lap.data_ptr<scalar_t>(),
                                         dudt.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(), H};
      parallel_rows(r.P, 8 * H, [&](int64_t p) { math::potential_fwd_body(p, A); });
    });
    segment_mm(V, S, W, /*trans=*/false, r);  // v = W^T q per pair
  }
  AT_DISPATCH_FLOATING_TYPES(z_.scalar_type(), "sta_potential_combine", [&] {
    math::PotentialCombineArgs<scalar_t> A{
        r.P ? V.const_data_ptr<scalar_t>() : nullptr, r.P ? lap.const_data_ptr<scalar_t>() : nullptr,
        r.P ? dudt.const_data_ptr<scalar_t>() : nullptr, r.P ? up.const_data_ptr<scalar_t>() : nullptr,
        r.pair_of.const_data_ptr<int64_t>(), g.const_data_ptr<scalar_t>(), velocity.data_ptr<scalar_t>(),
        div.data_ptr<scalar_t>(), hj.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), K, D};
    parallel_rows(B, 2 * K * D + 1, [&](int64_t b) { math::potential_combine_body(b, A); });
  });
  return {velocity, div, hj, u};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> potential_bwd_cpu(
    const OptTensor& grad_velocity_, const OptTensor& grad_div_, const OptTensor& grad_hj_,
    const OptTensor& grad_u_, const Tensor& z_, const Tensor& g_, const Tensor& W_, const Tensor& c_,
    const Tensor& a_, const Tensor& de_) {
  check_inputs("sta::potential_bwd", z_, g_, W_);
  const Tensor g = g_.contiguous(), W = W_.contiguous(), c = c_.contiguous(), a = a_.contiguous(),
               de = de_.contiguous();
  const OptTensor gV = contiguous_opt(grad_velocity_), gdiv = contiguous_opt(grad_div_),
                  ghj = contiguous_opt(grad_hj_), gu = contiguous_opt(grad_u_);
  const int64_t B = z_.size(0), D = z_.size(1), K = W.size(0), H = W.size(1);
  Tensor grad_z = at::empty({B, D}, z_.options());
  Tensor grad_g = at::empty({B, K}, z_.options());
  Tensor grad_W;  // formed below from W (every field), then the pair products are added
  Tensor grad_c = at::zeros({K, H}, z_.options());
  Tensor grad_a = at::zeros({K, H}, z_.options());
  Tensor grad_de = at::zeros({K, H}, z_.options());
  Routing r = route(g);
  if (r.P == 0) {
    grad_z.zero_();
    grad_g.zero_();
    return {grad_z, grad_g, at::zeros_like(W), grad_c, grad_a, grad_de};
  }
  const Tensor X = z_.index_select(0, r.pair_sample);
  Tensor S = at::empty({r.P, H}, z_.options());
  segment_mm(S, X, W, true, r, c);
  S.tanh_();
  const Tensor wn = at::linalg_vector_norm(W, 2, {-1}).square();  // as in the forward
  Tensor G = gV ? gV->index_select(0, r.pair_sample) : at::zeros({r.P, D}, z_.options());
  Tensor gw = at::empty({r.P}, z_.options());
  // buf[0] = GQ -> GH, buf[1] = A2, buf[2] = A3, buf[3] = A4 (see flow_math.h)
  Tensor buf = at::empty({4, r.P, H}, z_.options());
  Tensor GQ = buf[0];
  const bool weighted = ghj.has_value();
  AT_DISPATCH_FLOATING_TYPES(z_.scalar_type(), "sta_potential_bwd", [&] {
    if (weighted) {  // the HJ residual needs v: G <- w gV + gh v, gw = gV . v
      Tensor Q = at::empty({r.P, H}, z_.options());
      math::HamiltonianFwdArgs<scalar_t> QA{S.const_data_ptr<scalar_t>(), Q.data_ptr<scalar_t>(), nullptr,
                                            r.pair_field.const_data_ptr<int64_t>(),
                                            a.const_data_ptr<scalar_t>(), H};
      parallel_rows(r.P, 4 * H, [&](int64_t p) { math::hamiltonian_fwd_body(p, QA); });
      Tensor V = at::empty({r.P, D}, z_.options());
      segment_mm(V, Q, W, false, r);
      math::PotentialBwdVArgs<scalar_t> VA{G.data_ptr<scalar_t>(), V.const_data_ptr<scalar_t>(),
                                           r.pair_sample.const_data_ptr<int64_t>(),
                                           r.pair_field.const_data_ptr<int64_t>(), g.const_data_ptr<scalar_t>(),
                                           ghj->const_data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(), K, D};
      parallel_rows(r.P, 4 * D, [&](int64_t p) { math::potential_bwd_v_body(p, VA); });
    }
    segment_mm(GQ, G, W, true, r);
    math::PotentialBwdArgs<scalar_t> A{S.data_ptr<scalar_t>(), GQ.data_ptr<scalar_t>(), buf[1].data_ptr<scalar_t>(),
                                       buf[2].data_ptr<scalar_t>(), buf[3].data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(),
                                       r.pair_sample.const_data_ptr<int64_t>(), r.pair_field.const_data_ptr<int64_t>(),
                                       g.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(gdiv),
                                       ptr_or_null<scalar_t>(ghj), ptr_or_null<scalar_t>(gu),
                                       a.const_data_ptr<scalar_t>(), de.const_data_ptr<scalar_t>(),
                                       wn.const_data_ptr<scalar_t>(), K, H, weighted};
    parallel_rows(r.P, 24 * H, [&](int64_t p) { math::potential_bwd_body(p, A); });
    pair_scatter<scalar_t>(gw, r, nullptr, grad_g.data_ptr<scalar_t>(), nullptr, false);
    Tensor GZ = at::empty({r.P, D}, z_.options());
    segment_mm(GZ, GQ, W, false, r);  // dL/dx = W^T dL/dh
    pair_sum<scalar_t>(grad_z, GZ, r, nullptr);
  });
  // Field parameters: per-field sums over the pair segments, then the closed-form chain rule.
  Tensor sums = at::zeros({K, 4, H}, z_.options());  // [sum GH, sum A2, sum A3, sum A4]
  segment_sum(sums, buf, r, 1);
  const Tensor sGH = sums.select(1, 0), sA2 = sums.select(1, 1), sA3 = sums.select(1, 2), sA4 = sums.select(1, 3);
  grad_c.copy_(sGH);
  grad_a.copy_(sA4 + wn * sA2 + de * sA3);
  grad_de.copy_(a * sA3);
  grad_W = W * (2 * a * sA2).unsqueeze(-1);  // lap depends on |W_kj|^2 (no zero-fill + copy)
  segment_outer_add(grad_W, S, G, r);    // v = W^T Qx  (Qx = q or w q, see flow_math.h)
  segment_outer_add(grad_W, GQ, X, r);   // h = W x + c
  return {grad_z, grad_g, grad_W, grad_c, grad_a, grad_de};
}

// =============================================================================================
// Hamiltonian rotational fields
// =============================================================================================

std::tuple<Tensor, Tensor> hamiltonian_fwd_cpu(const Tensor& z_, const Tensor& g_, const Tensor& W_,
                                               const Tensor& c_, const Tensor& a_, const Tensor& M_,
                                               const OptTensor& C_) {
  check_inputs("sta::hamiltonian_fwd", z_, g_, W_);
  const Tensor g = g_.contiguous(), W = W_.contiguous(), c = c_.contiguous(), a = a_.contiguous(),
               M = M_.contiguous();
  const OptTensor C = contiguous_opt(C_);
  const int64_t B = z_.size(0), D = z_.size(1), K = W.size(0), H = W.size(1);
  Tensor velocity = at::empty({B, D}, z_.options());
  Tensor curl = at::empty({B, K}, z_.options());
  Routing r = route(g);
  Tensor V, curl_p;
  if (r.P > 0) {
    const Tensor X = z_.index_select(0, r.pair_sample);
    Tensor S = at::empty({r.P, H}, z_.options());
    segment_mm(S, X, W, true, r, c);
    S.tanh_();
    Tensor Dm = C ? at::empty({r.P, H}, z_.options()) : Tensor();
    AT_DISPATCH_FLOATING_TYPES(z_.scalar_type(), "sta_hamiltonian_fwd", [&] {
      math::HamiltonianFwdArgs<scalar_t> A{S.const_data_ptr<scalar_t>(), S.data_ptr<scalar_t>(),
                                           C ? Dm.data_ptr<scalar_t>() : nullptr,
                                           r.pair_field.const_data_ptr<int64_t>(), a.const_data_ptr<scalar_t>(), H};
      parallel_rows(r.P, 6 * H, [&](int64_t p) { math::hamiltonian_fwd_body(p, A); });
    });
    V = at::empty({r.P, D}, z_.options());
    segment_mm(V, S, M, true, r);  // r = M q
    curl_p = at::zeros({r.P}, z_.options());
    if (C) {
      Tensor T = at::empty({r.P, H}, z_.options());
      segment_mm(T, Dm, *C, false, r);  // d^T C
      AT_DISPATCH_FLOATING_TYPES(z_.scalar_type(), "sta_hamiltonian_curl", [&] {
        math::RowDotArgs<scalar_t> A{T.const_data_ptr<scalar_t>(), Dm.const_data_ptr<scalar_t>(),
                                     curl_p.data_ptr<scalar_t>(), H, false};
        parallel_rows(r.P, 2 * H, [&](int64_t p) { math::row_dot_body(p, A); });
      });
    }
  }
  AT_DISPATCH_FLOATING_TYPES(z_.scalar_type(), "sta_hamiltonian_combine", [&] {
    pair_sum<scalar_t>(velocity, V, r, g.const_data_ptr<scalar_t>());
    pair_scatter<scalar_t>(curl_p, r, nullptr, curl.data_ptr<scalar_t>(), nullptr, false);
  });
  return {velocity, curl};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> hamiltonian_bwd_cpu(
    const OptTensor& grad_velocity_, const OptTensor& grad_curl_, const Tensor& z_, const Tensor& g_,
    const Tensor& W_, const Tensor& c_, const Tensor& a_, const Tensor& M_, const OptTensor& C_) {
  check_inputs("sta::hamiltonian_bwd", z_, g_, W_);
  const Tensor g = g_.contiguous(), W = W_.contiguous(), c = c_.contiguous(), a = a_.contiguous(),
               M = M_.contiguous();
  const OptTensor C = contiguous_opt(C_), gV = contiguous_opt(grad_velocity_),
                  gcurl = contiguous_opt(grad_curl_);
  const int64_t B = z_.size(0), D = z_.size(1), K = W.size(0), H = W.size(1);
  Tensor grad_z = at::empty({B, D}, z_.options());
  Tensor grad_g = at::empty({B, K}, z_.options());
  Tensor grad_W = at::zeros_like(W);
  Tensor grad_c = at::zeros({K, H}, z_.options());
  Tensor grad_a = at::zeros({K, H}, z_.options());
  Tensor grad_M = at::zeros_like(M);
  Tensor grad_C = C ? at::zeros_like(*C) : at::zeros({0}, z_.options());
  Routing r = route(g);
  if (r.P == 0) {
    grad_z.zero_();
    grad_g.zero_();
    return {grad_z, grad_g, grad_W, grad_c, grad_a, grad_M, grad_C};
  }
  const bool curl = C.has_value() && gcurl.has_value();
  const Tensor X = z_.index_select(0, r.pair_sample);
  Tensor S = at::empty({r.P, H}, z_.options());
  segment_mm(S, X, W, true, r, c);
  S.tanh_();
  Tensor G = gV ? gV->index_select(0, r.pair_sample) : at::zeros({r.P, D}, z_.options());
  Tensor GQ = at::empty({r.P, H}, z_.options());
  segment_mm(GQ, G, M, false, r);  // M^T gV per pair
  Tensor Q = at::empty({r.P, H}, z_.options());
  Tensor A4 = at::empty({r.P, H}, z_.options());
  Tensor gw = at::empty({r.P}, z_.options());
  Tensor Dm, T;
  AT_DISPATCH_FLOATING_TYPES(z_.scalar_type(), "sta_hamiltonian_bwd", [&] {
    if (curl) {
      Dm = at::empty({r.P, H}, z_.options());
      math::HamiltonianFwdArgs<scalar_t> DA{S.const_data_ptr<scalar_t>(), Q.data_ptr<scalar_t>(),
                                            Dm.data_ptr<scalar_t>(), r.pair_field.const_data_ptr<int64_t>(),
                                            a.const_data_ptr<scalar_t>(), H};
      parallel_rows(r.P, 6 * H, [&](int64_t p) { math::hamiltonian_fwd_body(p, DA); });
      const Tensor Csym = (*C + C->transpose(1, 2)).contiguous();
      T = at::empty({r.P, H}, z_.options());
      segment_mm(T, Dm, Csym, false, r);  // d curl / d d = (C + C^T) d
    }
    math::HamiltonianBwdArgs<scalar_t> A{S.const_data_ptr<scalar_t>(), GQ.data_ptr<scalar_t>(),
                                         Q.data_ptr<scalar_t>(), A4.data_ptr<scalar_t>(),
                                         curl ? T.data_ptr<scalar_t>() : nullptr, gw.data_ptr<scalar_t>(),
                                         r.pair_sample.const_data_ptr<int64_t>(),
                                         r.pair_field.const_data_ptr<int64_t>(), g.const_data_ptr<scalar_t>(),
                                         curl ? gcurl->const_data_ptr<scalar_t>() : nullptr,
                                         a.const_data_ptr<scalar_t>(), K, H};
    parallel_rows(r.P, 20 * H, [&](int64_t p) { math::hamiltonian_bwd_body(p, A); });
    pair_scatter<scalar_t>(gw, r, nullptr, grad_g.data_ptr<scalar_t>(), nullptr, false);
    Tensor GZ = at::empty({r.P, D}, z_.options());
    segment_mm(GZ, GQ, W, false, r);
    pair_sum<scalar_t>(grad_z, GZ, r, nullptr);
  });
  segment_outer_add(grad_W, GQ, X, r);
  segment_outer_add(grad_M, G, Q, r);  // d r / d M = gv (w q)^T
  segment_sum(grad_c, GQ, r, 0);
  segment_sum(grad_a, A4, r, 0);
  if (curl) segment_outer_add(grad_C, Dm, T, r);  // sum gc d d^T
  return {grad_z, grad_g, grad_W, grad_c, grad_a, grad_M, grad_C};
}

// =============================================================================================
// MLP rotational fields
// =============================================================================================

struct MlpForward {
  Tensor X, S, DS1, R, E;  // (P,D), (P,H), (P,H) or undefined, (P,D), (P,D) or undefined
};

MlpForward mlp_recompute(const Tensor& z, const Tensor& W1, const Tensor& c1, const Tensor& W2,
                         const Tensor& b2, const OptTensor& Pm, const Routing& r) {
  const int64_t D = z.size(1), H = W1.size(1);
  MlpForward f;
  f.X = z.index_select(0, r.pair_sample);
  f.S = at::empty({r.P, H}, z.options());
  segment_mm(f.S, f.X, W1, true, r, c1);
  f.S.tanh_();
  f.R = at::empty({r.P, D}, z.options());
  segment_mm(f.R, f.S, W2, true, r, b2);
  f.R.tanh_();
  if (Pm) {
    f.DS1 = at::empty({r.P, H}, z.options());
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sta_mlp_hidden", [&] {
      math::MlpHiddenArgs<scalar_t> A{f.S.const_data_ptr<scalar_t>(), f.DS1.data_ptr<scalar_t>(), H};
      parallel_rows(r.P, 2 * H, [&](int64_t p) { math::mlp_hidden_body(p, A); });
    });
    f.E = at::empty({r.P, D}, z.options());
    segment_mm(f.E, f.DS1, *Pm, true, r);  // E = Pm ds1
  }
  return f;
}

std::tuple<Tensor, Tensor, Tensor> mlp_fwd_cpu(const Tensor& z_, const Tensor& g_, const Tensor& W1_,
                                               const Tensor& c1_, const Tensor& W2_, const Tensor& b2_,
                                               const OptTensor& P_) {
  check_inputs("sta::mlp_fwd", z_, g_, W1_);
  const Tensor g = g_.contiguous(), W1 = W1_.contiguous(), c1 = c1_.contiguous(), W2 = W2_.contiguous(),
               b2 = b2_.contiguous();
  const OptTensor Pm = contiguous_opt(P_);
  const int64_t B = z_.size(0), D = z_.size(1), K = W1.size(0);
  Tensor velocity = at::empty({B, D}, z_.options());
  Tensor div = at::empty({B}, z_.options());
  Tensor div_rot = at::empty({B, K}, z_.options());
  Routing r = route(g);
  MlpForward f;
  Tensor divp;
  if (r.P > 0) {
    f = mlp_recompute(z_, W1, c1, W2, b2, Pm, r);
    divp = at::empty({r.P}, z_.options());
    AT_DISPATCH_FLOATING_TYPES(z_.scalar_type(), "sta_mlp_fwd", [&] {
      math::MlpFwdArgs<scalar_t> A{f.R.const_data_ptr<scalar_t>(), Pm ? f.E.const_data_ptr<scalar_t>() : nullptr,
                                   divp.data_ptr<scalar_t>(), D};
      parallel_rows(r.P, 4 * D, [&](int64_t p) { math::mlp_fwd_body(p, A); });
    });
  }
  AT_DISPATCH_FLOATING_TYPES(z_.scalar_type(), "sta_mlp_combine", [&] {
    pair_sum<scalar_t>(velocity, f.R, r, g.const_data_ptr<scalar_t>());
    pair_scatter<scalar_t>(divp, r, g.const_data_ptr<scalar_t>(), div_rot.data_ptr<scalar_t>(),
                           div.data_ptr<scalar_t>(), false);
  });
  return {velocity, div, div_rot};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_bwd_cpu(
    const OptTensor& grad_velocity_, const OptTensor& grad_div_, const OptTensor& grad_div_rot_,
    const Tensor& z_, const Tensor& g_, const Tensor& W1_, const Tensor& c1_, const Tensor& W2_,
    const Tensor& b2_, const OptTensor& P_) {
  check_inputs("sta::mlp_bwd", z_, g_, W1_);
  const Tensor g = g_.contiguous(), W1 = W1_.contiguous(), c1 = c1_.contiguous(), W2 = W2_.contiguous(),
               b2 = b2_.contiguous();
  const OptTensor Pm_in = contiguous_opt(P_), gV = contiguous_opt(grad_velocity_),
                  gdiv = contiguous_opt(grad_div_), gdr = contiguous_opt(grad_div_rot_);
  const int64_t B = z_.size(0), D = z_.size(1), K = W1.size(0), H = W1.size(1);
  Tensor grad_z = at::empty({B, D}, z_.options());
  Tensor grad_g = at::empty({B, K}, z_.options());
  Tensor grad_W1 = at::zeros_like(W1);
  Tensor grad_c1 = at::zeros({K, H}, z_.options());
  Tensor grad_W2 = at::zeros_like(W2);
  Tensor grad_b2 = at::zeros({K, D}, z_.options());
  Tensor grad_P = Pm_in ? at::zeros_like(*Pm_in) : at::zeros({0}, z_.options());
  Routing r = route(g);
  if (r.P == 0) {
    grad_z.zero_();
    grad_g.zero_();
    return {grad_z, grad_g, grad_W1, grad_c1, grad_W2, grad_b2, grad_P};
  }
  // the divergence branch is differentiated only when its output received a gradient
  const OptTensor Pm = (Pm_in && (gdiv || gdr)) ? Pm_in : std::nullopt;
  MlpForward f = mlp_recompute(z_, W1, c1, W2, b2, Pm, r);
  Tensor G = gV ? gV->index_select(0, r.pair_sample) : at::zeros({r.P, D}, z_.options());
  Tensor gw = at::empty({r.P}, z_.options());
  Tensor GS = at::empty({r.P, H}, z_.options());
  Tensor GDS;
  AT_DISPATCH_FLOATING_TYPES(z_.scalar_type(), "sta_mlp_bwd", [&] {
    math::MlpBwdOutArgs<scalar_t> A{f.R.const_data_ptr<scalar_t>(), G.data_ptr<scalar_t>(),
                                    Pm ? f.E.data_ptr<scalar_t>() : nullptr, gw.data_ptr<scalar_t>(),
                                    r.pair_sample.const_data_ptr<int64_t>(), r.pair_field.const_data_ptr<int64_t>(),
                                    g.const_data_ptr<scalar_t>(), Pm ? ptr_or_null<scalar_t>(gdiv) : nullptr,
                                    Pm ? ptr_or_null<scalar_t>(gdr) : nullptr, K, D};
    parallel_rows(r.P, 12 * D, [&](int64_t p) { math::mlp_bwd_out_body(p, A); });
    pair_scatter<scalar_t>(gw, r, nullptr, grad_g.data_ptr<scalar_t>(), nullptr, false);
    segment_mm(GS, G, W2, false, r);  // dL/ds via h2 = W2 s + b2
    if (Pm) {
      GDS = at::empty({r.P, H}, z_.options());
      segment_mm(GDS, f.E, *Pm, false, r);  // dL/d(ds1) via E = Pm ds1
    }
    math::MlpBwdHiddenArgs<scalar_t> HA{f.S.const_data_ptr<scalar_t>(), GS.data_ptr<scalar_t>(),
                                        Pm ? GDS.const_data_ptr<scalar_t>() : nullptr, H};
    parallel_rows(r.P, 6 * H, [&](int64_t p) { math::mlp_bwd_hidden_body(p, HA); });
    Tensor GZ = at::empty({r.P, D}, z_.options());
    segment_mm(GZ, GS, W1, false, r);
    pair_sum<scalar_t>(grad_z, GZ, r, nullptr);
  });
  segment_outer_add(grad_W2, G, f.S, r);
  segment_sum(grad_b2, G, r, 0);
  if (Pm) segment_outer_add(grad_P, f.E, f.DS1, r);
  segment_outer_add(grad_W1, GS, f.X, r);
  segment_sum(grad_c1, GS, r, 0);
  return {grad_z, grad_g, grad_W1, grad_c1, grad_W2, grad_b2, grad_P};
}

}  // namespace
}  // namespace sta

TORCH_LIBRARY_FRAGMENT(sta, m) {
  m.def("potential_fwd(Tensor z, Tensor g, Tensor W, Tensor c, Tensor a, Tensor de) "
        "-> (Tensor velocity, Tensor div, Tensor hj, Tensor u)");
  m.def("potential_bwd(Tensor? grad_velocity, Tensor? grad_div, Tensor? grad_hj, Tensor? grad_u, "
        "Tensor z, Tensor g, Tensor W, Tensor c, Tensor a, Tensor de) "
        "-> (Tensor grad_z, Tensor grad_g, Tensor grad_W, Tensor grad_c, Tensor grad_a, Tensor grad_de)");
  m.def("hamiltonian_fwd(Tensor z, Tensor g, Tensor W, Tensor c, Tensor a, Tensor M, Tensor? C) "
        "-> (Tensor velocity, Tensor curl)");
  m.def("hamiltonian_bwd(Tensor? grad_velocity, Tensor? grad_curl, Tensor z, Tensor g, Tensor W, "
        "Tensor c, Tensor a, Tensor M, Tensor? C) -> (Tensor grad_z, Tensor grad_g, Tensor grad_W, "
        "Tensor grad_c, Tensor grad_a, Tensor grad_M, Tensor grad_C)");
  m.def("mlp_fwd(Tensor z, Tensor g, Tensor W1, Tensor c1, Tensor W2, Tensor b2, Tensor? P) "
        "-> (Tensor velocity, Tensor div, Tensor div_rot)");
  m.def("mlp_bwd(Tensor? grad_velocity, Tensor? grad_div, Tensor? grad_div_rot, Tensor z, Tensor g, "
        "Tensor W1, Tensor c1, Tensor W2, Tensor b2, Tensor? P) -> (Tensor grad_z, Tensor grad_g, "
        "Tensor grad_W1, Tensor grad_c1, Tensor grad_W2, Tensor grad_b2, Tensor grad_P)");
}

TORCH_LIBRARY_IMPL(sta, CPU, m) {
  m.impl("potential_fwd", &sta::potential_fwd_cpu);
  m.impl("potential_bwd", &sta::potential_bwd_cpu);
  m.impl("hamiltonian_fwd", &sta::hamiltonian_fwd_cpu);
  m.impl("hamiltonian_bwd", &sta::hamiltonian_bwd_cpu);
  m.impl("mlp_fwd", &sta::mlp_fwd_cpu);
  m.impl("mlp_bwd", &sta::mlp_bwd_cpu);
}

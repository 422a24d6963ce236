// CUDA implementations of the flow-step ops sta::potential_fwd/_bwd, sta::hamiltonian_fwd/_bwd,
// sta::mlp_fwd/_bwd (schemas: csrc/cpu/flow_step.cpp and csrc/README.md), registered for the CUDA
// dispatch key. Compiled only when sta._C is built with CUDA (STA_BUILD_CUDA, sta/_build.py).
//
// The algorithm is the CPU one step for step (routing, products over the per-field pair
// segments, flow_math.h epilogues, per-sample combination); the kernels are in flow_step.cu.
// Differences, all so that a step never synchronises with the host (CUDA-graph capturable):
//   * the pair count P stays on the device: per-pair buffers have capacity B * K rows and every
//     kernel reads the segment bounds (routing offsets) itself;
//   * the products run in our grouped kernels (cuBLAS would need the segment lengths on the host).
// Small per-step parameter algebra (|W|^2, C + C^T, the closed-form parameter gradients) goes
// through ATen on the CUDA tensors, on the same (current) stream.
//
// No CUDA headers: the current stream is read through c10's device-generic interface and passed
// to the launchers as an integer, so this file builds against any torch.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../flow_math.h"
#include "flow_step_cuda.h"

namespace sta {
namespace cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#define STA_CUDA_CHECK(expr)                                                                    \
  do {                                                                                          \
    const int sta_err_ = (expr);                                                                \
    TORCH_CHECK(sta_err_ == 0, "sta CUDA kernel launch failed (", #expr, "): ", error_string(sta_err_)); \
  } while (0)

int64_t current_stream(const Tensor& t) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device());
  return reinterpret_cast<int64_t>(stream.native_handle());
}

void check_inputs(const char* op, const Tensor& z, const Tensor& g, const Tensor& W,
                  std::initializer_list<std::pair<const char*, const Tensor*>> others) {
  TORCH_CHECK(z.dim() == 2, op, ": z must be (B, D), got ", z.sizes());
  TORCH_CHECK(g.dim() == 2 && g.size(0) == z.size(0), op, ": g must be (B, K) with B = ", z.size(0), ", got ",
              g.sizes());
  TORCH_CHECK(W.dim() == 3 && W.size(0) == g.size(1) && W.size(2) == z.size(1), op,
              ": first weight must be (K, H, D) = (", g.size(1), ", H, ", z.size(1), "), got ", W.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, op,
              ": the CUDA backend computes in float32 or float64, got ", z.scalar_type());
  TORCH_CHECK(z.is_cuda(), op, ": z must be a CUDA tensor, got ", z.device());
  for (const auto& item : others) {
    const Tensor& t = *item.second;
    if (!t.defined()) continue;
    TORCH_CHECK(t.scalar_type() == z.scalar_type(), op, ": ", item.first, " must have z's dtype ", z.scalar_type(),
                ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == z.device(), op, ": ", item.first, " must be on z's device ", z.device(), ", got ",
                t.device());
  }
}

Tensor contiguous_or_undefined(const OptTensor& t) {
  if (t && t->defined()) return t->contiguous();
  return Tensor();
}

template <typename T>
const T* ptr(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* mut(Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Routing and segment helpers (device-side pair counts)
// ---------------------------------------------------------------------------------------------
struct Routing {
  Tensor pair_of;      // (B, K) int64
  Tensor pair_sample;  // (cap,) int64, first P rows valid
  Tensor pair_field;   // (cap,) int64
  Tensor offsets;      // (K + 1,) int64; offsets[K] = P
  int64_t B = 0, K = 0, cap = 0;
  int64_t stream = 0;
  const int64_t* num_pairs() const { return offsets.const_data_ptr<int64_t>() + K; }
};

Routing route_pairs(const Tensor& g, int64_t stream) {  // g: (B, K) contiguous
  Routing r;
  r.B = g.size(0);
  r.K = g.size(1);
  r.cap = r.B * r.K;
  r.stream = stream;
  const auto lopt = g.options().dtype(at::kLong);
  r.pair_of = at::empty({r.B, r.K}, lopt);
  r.pair_sample = at::empty({r.cap}, lopt);
  r.pair_field = at::empty({r.cap}, lopt);
  r.offsets = at::empty({r.K + 1}, lopt);
  if (r.cap == 0) {
    r.offsets.zero_();
    return r;
  }
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sta_cuda_route", [&] {
    STA_CUDA_CHECK(route<scalar_t>(g.const_data_ptr<scalar_t>(), r.B, r.K, r.pair_of.data_ptr<int64_t>(),
                                   r.pair_sample.data_ptr<int64_t>(), r.pair_field.data_ptr<int64_t>(),
                                   r.offsets.data_ptr<int64_t>(), stream));
  });
  return r;
}

// out[seg_k] = act(A[rows of seg_k] @ op(mats[k]) + bias[k]); A_index: A's row per pair or nullptr.
template <typename T>
void seg_mm(Tensor& out, const Tensor& A, const int64_t* a_index, const Tensor& mats, bool trans, const Routing& r,
            const Tensor& bias = Tensor(), bool act_tanh = false) {
  STA_CUDA_CHECK(segment_mm<T>(A.const_data_ptr<T>(), a_index, mats.const_data_ptr<T>(), ptr<T>(bias),
                               out.data_ptr<T>(), r.offsets.const_data_ptr<int64_t>(), r.K, r.B, out.size(1),
                               A.size(1), trans, act_tanh, r.stream));
}

// grad[k] += X[seg_k]^T Y[seg_k]
template <typename T>
void seg_outer_add(Tensor& grad, const Tensor& X, const Tensor& Y, const Routing& r) {
  STA_CUDA_CHECK(segment_outer_add<T>(X.const_data_ptr<T>(), Y.const_data_ptr<T>(), grad.data_ptr<T>(),
                                      r.offsets.const_data_ptr<int64_t>(), r.K, X.size(1), Y.size(1), r.stream));
}

// out (K, N) = per-field column sums of X (cap, N); out rows may be strided (out_stride).
template <typename T>
void seg_colsum(T* out, int64_t out_stride, const Tensor& X, const Routing& r) {
  STA_CUDA_CHECK(segment_colsum<T>(X.const_data_ptr<T>(), out, r.offsets.const_data_ptr<int64_t>(), r.K, X.size(1),
                                   out_stride, r.stream));
}

// (cap, N) rows of src (B, N) per pair; src undefined: zeros.
template <typename T>
Tensor gather(const Tensor& src, int64_t N, const Routing& r, const at::TensorOptions& opt) {
  Tensor out = at::empty({r.cap, N}, opt);
  STA_CUDA_CHECK(gather_rows<T>(ptr<T>(src), r.pair_sample.const_data_ptr<int64_t>(),
                                r.offsets.const_data_ptr<int64_t>(), r.K, r.cap, N, out.data_ptr<T>(), r.stream));
  return out;
}

template <typename T>
void pair_sum(Tensor& out, const Tensor& rows, const Routing& r, const T* weight) {
  math::PairSumArgs<T> A{ptr<T>(rows), r.pair_of.const_data_ptr<int64_t>(), weight, out.data_ptr<T>(), r.K,
                         out.size(1)};
  STA_CUDA_CHECK(pair_sum_body_rows<T>(A, nullptr, r.B, r.stream));
}

template <typename T>
void pair_scatter(const Tensor& vals, const Routing& r, const T* weight, T* pair_out, T* sum_out) {
  math::PairScatterArgs<T> A{ptr<T>(vals), r.pair_of.const_data_ptr<int64_t>(), weight, pair_out, sum_out, r.K,
                             false};
  STA_CUDA_CHECK(pair_scatter_body_rows<T>(A, nullptr, r.B, r.stream));
}

// =============================================================================================
// Potential fields
// =============================================================================================

std::tuple<Tensor, Tensor, Tensor, Tensor> potential_fwd_cuda(const Tensor& z_, const Tensor& g_, const Tensor& W_,
                                                              const Tensor& c_, const Tensor& a_, const Tensor& de_) {
  check_inputs("sta::potential_fwd", z_, g_, W_, {{"g", &g_}, {"W", &W_}, {"c", &c_}, {"a", &a_}, {"de", &de_}});
  c10::DeviceGuard guard(z_.device());
  const Tensor z = z_.contiguous(), g = g_.contiguous(), W = W_.contiguous(), c = c_.contiguous(),
               a = a_.contiguous(), de = de_.contiguous();
  const int64_t B = z.size(0), D = z.size(1), K = W.size(0), H = W.size(1);
  const auto opt = z.options();
  Tensor velocity = at::empty({B, D}, opt), div = at::empty({B}, opt);
  Tensor hj = at::empty({B, K}, opt), u = at::empty({B, K}, opt);
  if (B == 0) return {velocity, div, hj, u};
  const Routing r = route_pairs(g, current_stream(z));
  Tensor S = at::empty({r.cap, H}, opt), V = at::empty({r.cap, D}, opt);
  Tensor lap = at::empty({r.cap}, opt), dudt = at::empty({r.cap}, opt), up = at::empty({r.cap}, opt);
  const Tensor wn = W.square().sum(-1);  // (K, H): |W_kj|^2, the Laplacian weights
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sta_cuda_potential_fwd", [&] {
    using T = scalar_t;
    seg_mm<T>(S, z, r.pair_sample.const_data_ptr<int64_t>(), W, /*trans=*/true, r, c, /*tanh=*/true);
    math::PotentialFwdArgs<T> A{S.data_ptr<T>(), r.pair_field.const_data_ptr<int64_t>(), a.const_data_ptr<T>(),
                                de.const_data_ptr<T>(), wn.const_data_ptr<T>(), lap.data_ptr<T>(),
                                dudt.data_ptr<T>(), up.data_ptr<T>(), H};
    STA_CUDA_CHECK(potential_fwd_body_rows<T>(A, r.num_pairs(), r.cap, r.stream));
    seg_mm<T>(V, S, nullptr, W, /*trans=*/false, r);  // v = W^T q per pair
    math::PotentialCombineArgs<T> C{V.const_data_ptr<T>(), lap.const_data_ptr<T>(), dudt.const_data_ptr<T>(),
                                    up.const_data_ptr<T>(), r.pair_of.const_data_ptr<int64_t>(),
                                    g.const_data_ptr<T>(), velocity.data_ptr<T>(), div.data_ptr<T>(),
                                    hj.data_ptr<T>(), u.data_ptr<T>(), K, D};
    STA_CUDA_CHECK(potential_combine_body_rows<T>(C, nullptr, B, r.stream));
  });
  return {velocity, div, hj, u};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> potential_bwd_cuda(
    const OptTensor& grad_velocity_, const OptTensor& grad_div_, const OptTensor& grad_hj_, const OptTensor& grad_u_,
    const Tensor& z_, const Tensor& g_, const Tensor& W_, const Tensor& c_, const Tensor& a_, const Tensor& de_) {
  const Tensor gV = contiguous_or_undefined(grad_velocity_), gdiv = contiguous_or_undefined(grad_div_),
               ghj = contiguous_or_undefined(grad_hj_), gu = contiguous_or_undefined(grad_u_);
  check_inputs("sta::potential_bwd", z_, g_, W_,
               {{"g", &g_}, {"W", &W_}, {"c", &c_}, {"a", &a_}, {"de", &de_}, {"grad_velocity", &gV},
                {"grad_div", &gdiv}, {"grad_hj", &ghj}, {"grad_u", &gu}});
  c10::DeviceGuard guard(z_.device());
  const Tensor z = z_.contiguous(), g = g_.contiguous(), W = W_.contiguous(), c = c_.contiguous(),
               a = a_.contiguous(), de = de_.contiguous();
  const int64_t B = z.size(0), D = z.size(1), K = W.size(0), H = W.size(1);
  const auto opt = z.options();
  Tensor grad_z = at::empty({B, D}, opt), grad_g = at::empty({B, K}, opt);
  if (B == 0)
    return {grad_z, grad_g, at::zeros_like(W), at::zeros({K, H}, opt), at::zeros({K, H}, opt), at::zeros({K, H}, opt)};
  const Routing r = route_pairs(g, current_stream(z));
  const Tensor wn = W.square().sum(-1);
  Tensor S = at::empty({r.cap, H}, opt);
  Tensor gw = at::empty({r.cap}, opt);
  Tensor buf = at::empty({4, r.cap, H}, opt);  // GQ -> GH, A2, A3, A4 (flow_math.h)
  Tensor GQ = buf[0];
  Tensor sums = at::empty({K, 4, H}, opt);     // per-field sums of buf
  Tensor G, X;
  const bool weighted = ghj.defined();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sta_cuda_potential_bwd", [&] {
    using T = scalar_t;
    seg_mm<T>(S, z, r.pair_sample.const_data_ptr<int64_t>(), W, true, r, c, true);
    G = gather<T>(gV, D, r, opt);
    if (weighted) {  // the HJ residual needs v: G <- w gV + gh v, gw = gV . v
      Tensor Q = at::empty({r.cap, H}, opt), V = at::empty({r.cap, D}, opt);
      math::HamiltonianFwdArgs<T> QA{S.const_data_ptr<T>(), Q.data_ptr<T>(), nullptr,
                                     r.pair_field.const_data_ptr<int64_t>(), a.const_data_ptr<T>(), H};
      STA_CUDA_CHECK(hamiltonian_fwd_body_rows<T>(QA, r.num_pairs(), r.cap, r.stream));
      seg_mm<T>(V, Q, nullptr, W, false, r);
      math::PotentialBwdVArgs<T> VA{G.data_ptr<T>(), V.const_data_ptr<T>(), r.pair_sample.const_data_ptr<int64_t>(),
                                    r.pair_field.const_data_ptr<int64_t>(), g.const_data_ptr<T>(),
                                    ghj.const_data_ptr<T>(), gw.data_ptr<T>(), K, D};
      STA_CUDA_CHECK(potential_bwd_v_body_rows<T>(VA, r.num_pairs(), r.cap, r.stream));
    }
    seg_mm<T>(GQ, G, nullptr, W, true, r);
    math::PotentialBwdArgs<T> A{S.data_ptr<T>(), GQ.data_ptr<T>(), buf[1].data_ptr<T>(), buf[2].data_ptr<T>(),
                                buf[3].data_ptr<T>(), gw.data_ptr<T>(), r.pair_sample.const_data_ptr<int64_t>(),
                                r.pair_field.const_data_ptr<int64_t>(), g.const_data_ptr<T>(), ptr<T>(gdiv),
                                ptr<T>(ghj), ptr<T>(gu), a.const_data_ptr<T>(), de.const_data_ptr<T>(),
                                wn.const_data_ptr<T>(), K, H, weighted};
    STA_CUDA_CHECK(potential_bwd_body_rows<T>(A, r.num_pairs(), r.cap, r.stream));
    pair_scatter<T>(gw, r, nullptr, grad_g.data_ptr<T>(), nullptr);
    Tensor GZ = at::empty({r.cap, D}, opt);
    seg_mm<T>(GZ, GQ, nullptr, W, false, r);  // dL/dx = W^T dL/dh
    pair_sum<T>(grad_z, GZ, r, nullptr);
    for (int64_t i = 0; i < 4; ++i) seg_colsum<T>(sums.data_ptr<T>() + i * H, 4 * H, buf[i], r);
    X = gather<T>(z, D, r, opt);
  });
  // Field parameters: the closed-form chain rule of csrc/cpu/flow_step.cpp on the segment sums.
  const Tensor sGH = sums.select(1, 0), sA2 = sums.select(1, 1), sA3 = sums.select(1, 2), sA4 = sums.select(1, 3);
  Tensor grad_c = sGH.contiguous();
  Tensor grad_a = sA4 + wn * sA2 + de * sA3;
  Tensor grad_de = a * sA3;
  Tensor grad_W = (W * (2 * a * sA2).unsqueeze(-1)).contiguous();  // lap depends on |W_kj|^2
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sta_cuda_potential_bwd_W", [&] {
    seg_outer_add<scalar_t>(grad_W, S, G, r);  // v = W^T Qx
    seg_outer_add<scalar_t>(grad_W, GQ, X, r);  // h = W x + c
  });
  return {grad_z, grad_g, grad_W, grad_c, grad_a, grad_de};
}

// =============================================================================================
// Hamiltonian rotational fields
// =============================================================================================

std::tuple<Tensor, Tensor> hamiltonian_fwd_cuda(const Tensor& z_, const Tensor& g_, const Tensor& W_, const Tensor& c_,
                                                const Tensor& a_, const Tensor& M_, const OptTensor& C_) {
  const Tensor C = contiguous_or_undefined(C_);
  check_inputs("sta::hamiltonian_fwd", z_, g_, W_, {{"g", &g_}, {"W", &W_}, {"c", &c_}, {"a", &a_}, {"M", &M_}, {"C", &C}});
  c10::DeviceGuard guard(z_.device());
  const Tensor z = z_.contiguous(), g = g_.contiguous(), W = W_.contiguous(), c = c_.contiguous(),
               a = a_.contiguous(), M = M_.contiguous();
  const int64_t B = z.size(0), D = z.size(1), K = W.size(0), H = W.size(1);
  const auto opt = z.options();
  Tensor velocity = at::empty({B, D}, opt), curl = at::empty({B, K}, opt);
  if (B == 0) return {velocity, curl};
  const Routing r = route_pairs(g, current_stream(z));
  const bool with_curl = C.defined();
  Tensor S = at::empty({r.cap, H}, opt), V = at::empty({r.cap, D}, opt);
  Tensor Dm = with_curl ? at::empty({r.cap, H}, opt) : Tensor();
  Tensor curl_p = at::zeros({r.cap}, opt);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sta_cuda_hamiltonian_fwd", [&] {
    using T = scalar_t;
    seg_mm<T>(S, z, r.pair_sample.const_data_ptr<int64_t>(), W, true, r, c, true);
    math::HamiltonianFwdArgs<T> A{S.const_data_ptr<T>(), S.data_ptr<T>(), mut<T>(Dm),
                                  r.pair_field.const_data_ptr<int64_t>(), a.const_data_ptr<T>(), H};
    STA_CUDA_CHECK(hamiltonian_fwd_body_rows<T>(A, r.num_pairs(), r.cap, r.stream));
    seg_mm<T>(V, S, nullptr, M, true, r);  // r = M q
    if (with_curl) {
      Tensor Tm = at::empty({r.cap, H}, opt);
      seg_mm<T>(Tm, Dm, nullptr, C, false, r);  // d^T C
      math::RowDotArgs<T> RA{Tm.const_data_ptr<T>(), Dm.const_data_ptr<T>(), curl_p.data_ptr<T>(), H, false};
      STA_CUDA_CHECK(row_dot_body_rows<T>(RA, r.num_pairs(), r.cap, r.stream));
    }
    pair_sum<T>(velocity, V, r, g.const_data_ptr<T>());
    pair_scatter<T>(curl_p, r, nullptr, curl.data_ptr<T>(), nullptr);
  });
  return {velocity, curl};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> hamiltonian_bwd_cuda(
    const OptTensor& grad_velocity_, const OptTensor& grad_curl_, const Tensor& z_, const Tensor& g_, const Tensor& W_,
    const Tensor& c_, const Tensor& a_, const Tensor& M_, const OptTensor& C_) {
  const Tensor C = contiguous_or_undefined(C_), gV = contiguous_or_undefined(grad_velocity_),
               gcurl = contiguous_or_undefined(grad_curl_);
  check_inputs("sta::hamiltonian_bwd", z_, g_, W_,
               {{"g", &g_}, {"W", &W_}, {"c", &c_}, {"a", &a_}, {"M", &M_}, {"C", &C}, {"grad_velocity", &gV},
                {"grad_curl", &gcurl}});
  c10::DeviceGuard guard(z_.device());
  const Tensor z = z_.contiguous(), g = g_.contiguous(), W = W_.contiguous(), c = c_.contiguous(),
               a = a_.contiguous(), M = M_.contiguous();
  const int64_t B = z.size(0), D = z.size(1), K = W.size(0), H = W.size(1);
  const auto opt = z.options();
  Tensor grad_z = at::empty({B, D}, opt), grad_g = at::empty({B, K}, opt);
  Tensor grad_W = at::zeros_like(W), grad_M = at::zeros_like(M);
  Tensor grad_c = at::empty({K, H}, opt), grad_a = at::empty({K, H}, opt);
  Tensor grad_C = C.defined() ? at::zeros_like(C) : at::zeros({0}, opt);
  if (B == 0) return {grad_z, grad_g, grad_W, grad_c.zero_(), grad_a.zero_(), grad_M, grad_C};
  const Routing r = route_pairs(g, current_stream(z));
  const bool curl = C.defined() && gcurl.defined();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sta_cuda_hamiltonian_bwd", [&] {
    using T = scalar_t;
    Tensor S = at::empty({r.cap, H}, opt);
    seg_mm<T>(S, z, r.pair_sample.const_data_ptr<int64_t>(), W, true, r, c, true);
    const Tensor G = gather<T>(gV, D, r, opt);
    const Tensor X = gather<T>(z, D, r, opt);
    Tensor GQ = at::empty({r.cap, H}, opt), Q = at::empty({r.cap, H}, opt), A4 = at::empty({r.cap, H}, opt);
    Tensor gw = at::empty({r.cap}, opt);
    Tensor Dm, Tm;
    seg_mm<T>(GQ, G, nullptr, M, false, r);  // M^T gV per pair
    if (curl) {
      Dm = at::empty({r.cap, H}, opt);
      math::HamiltonianFwdArgs<T> DA{S.const_data_ptr<T>(), Q.data_ptr<T>(), Dm.data_ptr<T>(),
                                     r.pair_field.const_data_ptr<int64_t>(), a.const_data_ptr<T>(), H};
      STA_CUDA_CHECK(hamiltonian_fwd_body_rows<T>(DA, r.num_pairs(), r.cap, r.stream));
      const Tensor Csym = (C + C.transpose(1, 2)).contiguous();
      Tm = at::empty({r.cap, H}, opt);
      seg_mm<T>(Tm, Dm, nullptr, Csym, false, r);  // d curl / d d = (C + C^T) d
    }
    math::HamiltonianBwdArgs<T> A{S.const_data_ptr<T>(), GQ.data_ptr<T>(), Q.data_ptr<T>(), A4.data_ptr<T>(),
                                  mut<T>(Tm), gw.data_ptr<T>(), r.pair_sample.const_data_ptr<int64_t>(),
                                  r.pair_field.const_data_ptr<int64_t>(), g.const_data_ptr<T>(),
                                  curl ? gcurl.const_data_ptr<T>() : nullptr, a.const_data_ptr<T>(), K, H};
    STA_CUDA_CHECK(hamiltonian_bwd_body_rows<T>(A, r.num_pairs(), r.cap, r.stream));
    pair_scatter<T>(gw, r, nullptr, grad_g.data_ptr<T>(), nullptr);
    Tensor GZ = at::empty({r.cap, D}, opt);
    seg_mm<T>(GZ, GQ, nullptr, W, false, r);
    pair_sum<T>(grad_z, GZ, r, nullptr);
    seg_outer_add<T>(grad_W, GQ, X, r);
    seg_outer_add<T>(grad_M, G, Q, r);  // d r / d M = gv (w q)^T
    seg_colsum<T>(grad_c.data_ptr<T>(), H, GQ, r);
    seg_colsum<T>(grad_a.data_ptr<T>(), H, A4, r);
    if (curl) seg_outer_add<T>(grad_C, Dm, Tm, r);  // sum gc d d^T
  });
  return {grad_z, grad_g, grad_W, grad_c, grad_a, grad_M, grad_C};
}

// =============================================================================================
// MLP rotational fields
// =============================================================================================

struct MlpForward {
  Tensor S, DS1, R, E;  // (cap,H), (cap,H) or undefined, (cap,D), (cap,D) or undefined
};

template <typename T>
MlpForward mlp_recompute(const Tensor& z, const Tensor& W1, const Tensor& c1, const Tensor& W2, const Tensor& b2,
                         const Tensor& Pm, const Routing& r) {
  const int64_t D = z.size(1), H = W1.size(1);
  const auto opt = z.options();
  MlpForward f;
  f.S = at::empty({r.cap, H}, opt);
  seg_mm<T>(f.S, z, r.pair_sample.const_data_ptr<int64_t>(), W1, true, r, c1, true);
  f.R = at::empty({r.cap, D}, opt);
  seg_mm<T>(f.R, f.S, nullptr, W2, true, r, b2, true);
  if (Pm.defined()) {
    f.DS1 = at::empty({r.cap, H}, opt);
    math::MlpHiddenArgs<T> A{f.S.const_data_ptr<T>(), f.DS1.data_ptr<T>(), H};
    STA_CUDA_CHECK(mlp_hidden_body_rows<T>(A, r.num_pairs(), r.cap, r.stream));
    f.E = at::empty({r.cap, D}, opt);
    seg_mm<T>(f.E, f.DS1, nullptr, Pm, true, r);  // E = Pm ds1
  }
  return f;
}

std::tuple<Tensor, Tensor, Tensor> mlp_fwd_cuda(const Tensor& z_, const Tensor& g_, const Tensor& W1_,
                                                const Tensor& c1_, const Tensor& W2_, const Tensor& b2_,
                                                const OptTensor& P_) {
  const Tensor Pm = contiguous_or_undefined(P_);
  check_inputs("sta::mlp_fwd", z_, g_, W1_,
               {{"g", &g_}, {"W1", &W1_}, {"c1", &c1_}, {"W2", &W2_}, {"b2", &b2_}, {"P", &Pm}});
  c10::DeviceGuard guard(z_.device());
  const Tensor z = z_.contiguous(), g = g_.contiguous(), W1 = W1_.contiguous(), c1 = c1_.contiguous(),
               W2 = W2_.contiguous(), b2 = b2_.contiguous();
  const int64_t B = z.size(0), D = z.size(1), K = W1.size(0);
  const auto opt = z.options();
  Tensor velocity = at::empty({B, D}, opt), div = at::empty({B}, opt), div_rot = at::empty({B, K}, opt);
  if (B == 0) return {velocity, div, div_rot};
  const Routing r = route_pairs(g, current_stream(z));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sta_cuda_mlp_fwd", [&] {
    using T = scalar_t;
    const MlpForward f = mlp_recompute<T>(z, W1, c1, W2, b2, Pm, r);
    Tensor divp = at::empty({r.cap}, opt);
    math::MlpFwdArgs<T> A{f.R.const_data_ptr<T>(), ptr<T>(f.E), divp.data_ptr<T>(), D};
    STA_CUDA_CHECK(mlp_fwd_body_rows<T>(A, r.num_pairs(), r.cap, r.stream));
    pair_sum<T>(velocity, f.R, r, g.const_data_ptr<T>());
    pair_scatter<T>(divp, r, g.const_data_ptr<T>(), div_rot.data_ptr<T>(), div.data_ptr<T>());
  });
  return {velocity, div, div_rot};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_bwd_cuda(
    const OptTensor& grad_velocity_, const OptTensor& grad_div_, const OptTensor& grad_div_rot_, const Tensor& z_,
    const Tensor& g_, const Tensor& W1_, const Tensor& c1_, const Tensor& W2_, const Tensor& b2_, const OptTensor& P_) {
  const Tensor Pm_in = contiguous_or_undefined(P_), gV = contiguous_or_undefined(grad_velocity_),
               gdiv = contiguous_or_undefined(grad_div_), gdr = contiguous_or_undefined(grad_div_rot_);
  check_inputs("sta::mlp_bwd", z_, g_, W1_,
               {{"g", &g_}, {"W1", &W1_}, {"c1", &c1_}, {"W2", &W2_}, {"b2", &b2_}, {"P", &Pm_in},
                {"grad_velocity", &gV}, {"grad_div", &gdiv}, {"grad_div_rot", &gdr}});
  c10::DeviceGuard guard(z_.device());
  const Tensor z = z_.contiguous(), g = g_.contiguous(), W1 = W1_.contiguous(), c1 = c1_.contiguous(),
               W2 = W2_.contiguous(), b2 = b2_.contiguous();
  const int64_t B = z.size(0), D = z.size(1), K = W1.size(0), H = W1.size(1);
  const auto opt = z.options();
  Tensor grad_z = at::empty({B, D}, opt), grad_g = at::empty({B, K}, opt);
  Tensor grad_W1 = at::zeros_like(W1), grad_W2 = at::zeros_like(W2);
  Tensor grad_c1 = at::empty({K, H}, opt), grad_b2 = at::empty({K, D}, opt);
  Tensor grad_P = Pm_in.defined() ? at::zeros_like(Pm_in) : at::zeros({0}, opt);
  if (B == 0) return {grad_z, grad_g, grad_W1, grad_c1.zero_(), grad_W2, grad_b2.zero_(), grad_P};
  const Routing r = route_pairs(g, current_stream(z));
  // the divergence branch is differentiated only when its output received a gradient
  const Tensor Pm = (Pm_in.defined() && (gdiv.defined() || gdr.defined())) ? Pm_in : Tensor();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "sta_cuda_mlp_bwd", [&] {
    using T = scalar_t;
    MlpForward f = mlp_recompute<T>(z, W1, c1, W2, b2, Pm, r);
    Tensor G = gather<T>(gV, D, r, opt);
    const Tensor X = gather<T>(z, D, r, opt);
    Tensor gw = at::empty({r.cap}, opt);
    Tensor GS = at::empty({r.cap, H}, opt);
    Tensor GDS;
    math::MlpBwdOutArgs<T> A{f.R.const_data_ptr<T>(), G.data_ptr<T>(), mut<T>(f.E), gw.data_ptr<T>(),
                             r.pair_sample.const_data_ptr<int64_t>(), r.pair_field.const_data_ptr<int64_t>(),
                             g.const_data_ptr<T>(), Pm.defined() ? ptr<T>(gdiv) : nullptr,
                             Pm.defined() ? ptr<T>(gdr) : nullptr, K, D};
    STA_CUDA_CHECK(mlp_bwd_out_body_rows<T>(A, r.num_pairs(), r.cap, r.stream));
    pair_scatter<T>(gw, r, nullptr, grad_g.data_ptr<T>(), nullptr);
    seg_mm<T>(GS, G, nullptr, W2, false, r);  // dL/ds via h2 = W2 s + b2
    if (Pm.defined()) {
      GDS = at::empty({r.cap, H}, opt);
      seg_mm<T>(GDS, f.E, nullptr, Pm, false, r);  // dL/d(ds1) via E = Pm ds1
    }
    math::MlpBwdHiddenArgs<T> HA{f.S.const_data_ptr<T>(), GS.data_ptr<T>(), ptr<T>(GDS), H};
    STA_CUDA_CHECK(mlp_bwd_hidden_body_rows<T>(HA, r.num_pairs(), r.cap, r.stream));
    Tensor GZ = at::empty({r.cap, D}, opt);
    seg_mm<T>(GZ, GS, nullptr, W1, false, r);
    pair_sum<T>(grad_z, GZ, r, nullptr);
    seg_outer_add<T>(grad_W2, G, f.S, r);
    seg_colsum<T>(grad_b2.data_ptr<T>(), D, G, r);
    if (Pm.defined()) seg_outer_add<T>(grad_P, f.E, f.DS1, r);
    seg_outer_add<T>(grad_W1, GS, X, r);
    seg_colsum<T>(grad_c1.data_ptr<T>(), H, GS, r);
  });
  return {grad_z, grad_g, grad_W1, grad_c1, grad_W2, grad_b2, grad_P};
}

#undef STA_CUDA_CHECK

}  // namespace
}  // namespace cuda
}  // namespace sta

TORCH_LIBRARY_IMPL(sta, CUDA, m) {
  m.impl("potential_fwd", &sta::cuda::potential_fwd_cuda);
  m.impl("potential_bwd", &sta::cuda::potential_bwd_cuda);
  m.impl("hamiltonian_fwd", &sta::cuda::hamiltonian_fwd_cuda);
  m.impl("hamiltonian_bwd", &sta::cuda::hamiltonian_bwd_cuda);
  m.impl("mlp_fwd", &sta::cuda::mlp_fwd_cuda);
  m.impl("mlp_bwd", &sta::cuda::mlp_bwd_cuda);
}

// flow_math.h -- the per-pair elementwise maths of the fused sparse flow step (docs/maths.md 1-2), written
// once for the C++ CPU backend (csrc/cpu) and the CUDA backend (csrc/cuda).
//
// Plain C++ / CUDA: no torch headers. Indices are int64. Every function is STA_HOST_DEVICE.
//
// Names: one table for all of csrc (this file, the shared host pipeline flow_step_pipeline.h, the
// CPU and CUDA launchers, the op schemas in csrc/README.md). One field k; one active pair
// p = (b, k) with coefficient w = g[b, k]; P = the number of active pairs.
//
//   name          quantity                                                  shape
//   z, g          latents; field coefficients (pair (b, k) active iff g != 0)  (B, D), (B, K)
//   W, c          first layer of a field, h = W_k x + c_k (c = b + e(t))       (K, H, D), (K, H)
//   a, de         hidden-unit output weights; dc/dt (potential, hamiltonian)  (K, H)
//   W1, c1, W2, b2  the two layers of an mlp field        (K, H, D), (K, H), (K, D, H), (K, D)
//   wn            |W_kj|^2, the Laplacian weights (potential)                (K, H)
//   M             A W^T, the hamiltonian output matrix: r = M q              (K, D, H)
//   C             curl matrix G - N o N^T with G = (M^T M) o (W W^T), N = W M  (K, H, H)
//                 (sta.reference.hamiltonian_curl_matrices); Csym = C + C^T
//   Pdiv          divergence matrix W2 o W1^T of an mlp field (o: elementwise)  (K, D, H)
// Per-pair buffers (row p = pair p):
//   X             z[b]                                                      (P, D)
//   S             s = tanh(h); s1 = 1 - s^2, s2 = -2 s s1, s3 = -2 s1 (1 - 3 s^2)  (P, H)
//   Q             q = a s1                                                  (P, H)
//   V             velocity rows: W^T q (potential), M q (hamiltonian)       (P, D)
//   R             r = tanh(W2 s + b2), the mlp velocity rows                (P, D)
//   Dm            d = a s2, the curl energy is d^T C d                      (P, H)
//   T             d^T C (forward), Csym d (backward)                        (P, H)
//   E             Pdiv ds1 with ds1 = 1 - s^2 (mlp divergence)              (P, D)
//   G             gathered grad_velocity rows                               (P, D)
//   GQ, GS, GZ    gradients on q (then h), on s, on x                       (P, H), (P, H), (P, D)
//   gw            dL/dw, one per pair (-> grad_g)                           (P,)
//
// Data layout shared by the CPU and CUDA launchers (see csrc/README.md for the op schemas):
//   * the active pairs are sorted by field: pair p has sample pair_sample[p] and field
//     pair_field[p]; the pairs of field k are rows offsets[k] .. offsets[k+1]-1;
//   * pair_of[b * K + k] is the row of pair (b, k), or -1 when g[b, k] == 0 (inactive);
//   * per-pair row buffers are dense row-major (P, H) or (P, D); per-field parameter rows are
//     row-major (K, H); (B, K) per-pair outputs are dense row-major.
//   * tanh is applied by the launcher (vectorised ATen on CPU, anything on CUDA) before the bodies
//     that take ``s``; the bodies only need s and its derivatives.
//
// "Bodies" ``xxx_body(i, args)`` do the work of one row i (a pair or a sample) and are what a CPU
// ``at::parallel_for`` and a CUDA grid-stride loop call. Reductions inside a row accumulate in
// ``acc_t`` (float for float/half/bfloat16, double for double).
//
// Other ops append their own sections at the end of this file (e.g. grid transport).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define STA_HOST_DEVICE __host__ __device__
#define STA_INLINE __forceinline__
#else
#define STA_HOST_DEVICE
#define STA_INLINE inline
#endif

namespace sta {
namespace math {

// ---------------------------------------------------------------------------------------------
// Accumulation type: float for float (and half/bfloat16 on CUDA), double for double.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
struct acc_type { using type = float; };
template <>
struct acc_type<double> { using type = double; };
template <typename scalar_t>
using acc_t = typename acc_type<scalar_t>::type;

// ---------------------------------------------------------------------------------------------
// tanh and its derivatives, as functions of s = tanh(h)
// ---------------------------------------------------------------------------------------------
STA_HOST_DEVICE STA_INLINE float sta_tanh(float h) {
#if defined(__CUDA_ARCH__)
  return tanhf(h);
#else
  return std::tanh(h);
#endif
}
STA_HOST_DEVICE STA_INLINE double sta_tanh(double h) {
#if defined(__CUDA_ARCH__)
  return ::tanh(h);
#else
  return std::tanh(h);
#endif
}
/// s' = 1 - s^2
template <typename T>
STA_HOST_DEVICE STA_INLINE T tanh_d1(T s) { return T(1) - s * s; }
/// s'' = -2 s s'
template <typename T>
STA_HOST_DEVICE STA_INLINE T tanh_d2(T s) { return T(-2) * s * (T(1) - s * s); }
/// s''' = -2 s' (1 - 3 s^2)
template <typename T>
STA_HOST_DEVICE STA_INLINE T tanh_d3(T s) { return T(-2) * (T(1) - s * s) * (T(1) - T(3) * s * s); }

// =============================================================================================
// Pair <-> sample combination (shared by every field kind)
// =============================================================================================

/// out[b, :] = sum_k weight[b, k] * rows[pair_of[b, k], :]  (weight == nullptr: weight 1).
/// Row i = sample b. Deterministic (no atomics): a sample sums its own pairs in field order.
template <typename scalar_t>
struct PairSumArgs {
  const scalar_t* rows;      // (P, N) per-pair rows
  const int64_t* pair_of;    // (B, K) row of pair (b, k) or -1
  const scalar_t* weight;    // (B, K) or nullptr
  scalar_t* out;             // (B, N), fully written
  int64_t K, N;
};
template <typename scalar_t>
STA_HOST_DEVICE STA_INLINE void pair_sum_body(int64_t b, const PairSumArgs<scalar_t>& A) {
  using acc = acc_t<scalar_t>;
  const int64_t* po = A.pair_of + b * A.K;
  scalar_t* o = A.out + b * A.N;
  for (int64_t n = 0; n < A.N; ++n) o[n] = scalar_t(0);
  for (int64_t k = 0; k < A.K; ++k) {
    const int64_t p = po[k];
    if (p < 0) continue;
    const acc w = A.weight ? acc(A.weight[b * A.K + k]) : acc(1);
    const scalar_t* r = A.rows + p * A.N;
    for (int64_t n = 0; n < A.N; ++n) o[n] = scalar_t(acc(o[n]) + w * acc(r[n]));
  }
}

/// Per-pair scalars -> per-sample outputs. Row i = sample b:
///   pair_out[b, k] = vals[pair_of[b, k]] (0 where inactive)          if pair_out != nullptr
///   sum_out[b]     = sum_k weight[b, k] * vals[pair_of[b, k]]         if sum_out  != nullptr
///                    (+= when accumulate, else =)
template <typename scalar_t>
struct PairScatterArgs {
  const scalar_t* vals;      // (P,)
  const int64_t* pair_of;    // (B, K)
  const scalar_t* weight;    // (B, K) (needed for sum_out)
  scalar_t* pair_out;        // (B, K) or nullptr
  scalar_t* sum_out;         // (B,) or nullptr
  int64_t K;
  bool accumulate;
};
template <typename scalar_t>
STA_HOST_DEVICE STA_INLINE void pair_scatter_body(int64_t b, const PairScatterArgs<scalar_t>& A) {
  using acc = acc_t<scalar_t>;
  acc total = 0;
  for (int64_t k = 0; k < A.K; ++k) {
    const int64_t p = A.pair_of[b * A.K + k];
    const scalar_t v = p >= 0 ? A.vals[p] : scalar_t(0);
    if (A.pair_out) A.pair_out[b * A.K + k] = v;
    if (A.sum_out && p >= 0) total += acc(A.weight[b * A.K + k]) * acc(v);
  }
  if (A.sum_out) A.sum_out[b] = scalar_t(A.accumulate ? acc(A.sum_out[b]) + total : total);
}

/// out[p] = sum_n x[p, n] * y[p, n] (+ out[p] when accumulate). Row i = pair p.
template <typename scalar_t>
struct RowDotArgs {
  const scalar_t* x;  // (P, N)
  const scalar_t* y;  // (P, N)
  scalar_t* out;      // (P,)
  int64_t N;
  bool accumulate;
};
template <typename scalar_t>
STA_HOST_DEVICE STA_INLINE void row_dot_body(int64_t p, const RowDotArgs<scalar_t>& A) {
  using acc = acc_t<scalar_t>;
  acc t = 0;
  const scalar_t* x = A.x + p * A.N;
  const scalar_t* y = A.y + p * A.N;
  for (int64_t n = 0; n < A.N; ++n) t += acc(x[n]) * acc(y[n]);
  A.out[p] = scalar_t(A.accumulate ? acc(A.out[p]) + t : t);
}

// =============================================================================================
// Potential fields (docs/maths.md 1.1)
// =============================================================================================

/// Forward epilogue of one pair, before the velocity product V = Q W_k.
///   q = a s1 (into q, which may alias s),  lap = sum_j a_j s2_j wn_j,  dudt = sum_j a_j s1_j de_j,
///   u = sum_j a_j s_j.      wn_j = |W_kj|^2 (precomputed per step).
template <typename scalar_t>
struct PotentialFwdArgs {
  const scalar_t* s;           // (P, H) tanh(h)
  scalar_t* q;                 // (P, H) out: q = a * s1 (may alias s: s is saved for the backward when not)
  const int64_t* pair_field;   // (P,)
  const scalar_t* a;           // (K, H)
  const scalar_t* de;          // (K, H)
  const scalar_t* wn;          // (K, H)
  scalar_t* lap;               // (P,)
  scalar_t* dudt;              // (P,)
  scalar_t* u;                 // (P,)
  int64_t H;
};
template <typename scalar_t>
STA_HOST_DEVICE STA_INLINE void potential_fwd_body(int64_t p, const PotentialFwdArgs<scalar_t>& A) {
  using acc = acc_t<scalar_t>;
  const int64_t k = A.pair_field[p];
  const scalar_t* s = A.s + p * A.H;
  scalar_t* q = A.q + p * A.H;
  const scalar_t* a = A.a + k * A.H;
  const scalar_t* de = A.de + k * A.H;
  const scalar_t* wn = A.wn + k * A.H;
  acc lap = 0, dudt = 0, u = 0;
  for (int64_t j = 0; j < A.H; ++j) {
    const acc sj = s[j], aj = a[j];
    const acc s1 = tanh_d1(sj);
    lap += aj * tanh_d2(sj) * acc(wn[j]);
    dudt += aj * s1 * acc(de[j]);
    u += aj * sj;
    q[j] = scalar_t(aj * s1);
  }
  A.lap[p] = scalar_t(lap);
  A.dudt[p] = scalar_t(dudt);
  A.u[p] = scalar_t(u);
}

/// Forward combination per sample b (after V = Q W):
///   velocity[b] = sum_k g[b,k] V[p];  div[b] = sum_k g[b,k] lap[p];
///   hj[b,k] = dudt[p] + |V[p]|^2 / 2;  u_out[b,k] = u[p]   (0 where inactive).
template <typename scalar_t>
struct PotentialCombineArgs {
  const scalar_t* V;           // (P, D)
  const scalar_t* lap;         // (P,)
  const scalar_t* dudt;        // (P,)
  const scalar_t* u;           // (P,)
  const int64_t* pair_of;      // (B, K)
  const scalar_t* g;           // (B, K)
  scalar_t* velocity;          // (B, D)
  scalar_t* div;               // (B,)
  scalar_t* hj;                // (B, K)
  scalar_t* u_out;             // (B, K)
  int64_t K, D;
};
template <typename scalar_t>
STA_HOST_DEVICE STA_INLINE void potential_combine_body(int64_t b, const PotentialCombineArgs<scalar_t>& A) {
  using acc = acc_t<scalar_t>;
  PairSumArgs<scalar_t> ps{A.V, A.pair_of, A.g, A.velocity, A.K, A.D};
  pair_sum_body(b, ps);
  acc div = 0;
  for (int64_t k = 0; k < A.K; ++k) {
    const int64_t p = A.pair_of[b * A.K + k];
    if (p < 0) {
      A.hj[b * A.K + k] = scalar_t(0);
      A.u_out[b * A.K + k] = scalar_t(0);
      continue;
    }
    const scalar_t* v = A.V + p * A.D;
    acc vv = 0;
    for (int64_t d = 0; d < A.D; ++d) vv += acc(v[d]) * acc(v[d]);
    A.hj[b * A.K + k] = scalar_t(acc(A.dudt[p]) + acc(0.5) * vv);
    A.u_out[b * A.K + k] = A.u[p];
    div += acc(A.g[b * A.K + k]) * acc(A.lap[p]);
  }
  A.div[b] = scalar_t(div);
}

/// Backward, first step, only when grad_hj is given (the HJ residual depends on v = W^T q):
/// per pair, with gV = grad_velocity[b] (gathered into G):
///   gw[p] = gV . V[p];   G[p] <- w gV + gh V[p]   (the total gradient on v, weighted)
template <typename scalar_t>
struct PotentialBwdVArgs {
  scalar_t* G;                 // (P, D) in: gathered grad_velocity rows (or zeros); out: w gV + gh v
  const scalar_t* V;           // (P, D) velocity rows v = W^T q
  const int64_t* pair_sample;  // (P,)
  const int64_t* pair_field;   // (P,)
  const scalar_t* g;           // (B, K)
  const scalar_t* grad_hj;     // (B, K)
  scalar_t* gw;                // (P,) out: gV . v
  int64_t K, D;
};
template <typename scalar_t>
STA_HOST_DEVICE STA_INLINE void potential_bwd_v_body(int64_t p, const PotentialBwdVArgs<scalar_t>& A) {
  using acc = acc_t<scalar_t>;
  const int64_t bk = A.pair_sample[p] * A.K + A.pair_field[p];
  const acc w = A.g[bk], gh = A.grad_hj[bk];
  scalar_t* G = A.G + p * A.D;
  const scalar_t* V = A.V + p * A.D;
  acc dot = 0;
  for (int64_t d = 0; d < A.D; ++d) {
    const acc gv = G[d], v = V[d];
    dot += gv * v;
    G[d] = scalar_t(w * gv + gh * v);
  }
  A.gw[p] = scalar_t(dot);
}

/// Backward epilogue of one pair, after GQ = G W_k^T (the gradient on q = a s1):
///   weighted == false:  G held the unweighted grad_velocity rows; gq = w GQ, gw = GQ . q
///   weighted == true :  G held w gV + gh v (potential_bwd_v_body); gq = GQ, gw given
///   gl = w gd, gh = grad_hj[b,k], gu = grad_u[b,k] (each 0 when the grad is absent)
///   dL/ds  = a gu;  dL/ds1 = a (gq + de gh);  dL/ds2 = a wn gl
///   GH = dL/dh = a gu s1 + a (gq + de gh) s2 + a wn gl s3        (written over GQ)
///   Qx = weighted ? q : w q                                      (written over s)
///   field-parameter contributions (summed over the pairs of a field by the launcher):
///     A2 = s2 gl   (-> grad a += wn sum A2,  grad wn = a sum A2)
///     A3 = s1 gh   (-> grad a += de sum A3,  grad de = a sum A3)
///     A4 = s gu + s1 gq  (-> grad a += sum A4)
///   gw[p] (+)= gd lap   (the gradient on the coefficient w)
template <typename scalar_t>
struct PotentialBwdArgs {
  scalar_t* s;                 // (P, H) in: tanh(h); out: Qx
  scalar_t* GQ;                // (P, H) in: G W^T; out: GH = dL/dh
  scalar_t* A2;                // (P, H) out
  scalar_t* A3;                // (P, H) out
  scalar_t* A4;                // (P, H) out
  scalar_t* gw;                // (P,) in (weighted: gV . v); out: dL/dw
  const int64_t* pair_sample;  // (P,)
  const int64_t* pair_field;   // (P,)
  const scalar_t* g;           // (B, K)
  const scalar_t* grad_div;    // (B,) or nullptr
  const scalar_t* grad_hj;     // (B, K) or nullptr
  const scalar_t* grad_u;      // (B, K) or nullptr
  const scalar_t* a;           // (K, H)
  const scalar_t* de;          // (K, H)
  const scalar_t* wn;          // (K, H)
  int64_t K, H;
  bool weighted;
};
template <typename scalar_t>
STA_HOST_DEVICE STA_INLINE void potential_bwd_body(int64_t p, const PotentialBwdArgs<scalar_t>& A) {
  using acc = acc_t<scalar_t>;
  const int64_t b = A.pair_sample[p], k = A.pair_field[p], bk = b * A.K + k;
  const acc w = A.g[bk];
  const acc gd = A.grad_div ? acc(A.grad_div[b]) : acc(0);
  const acc gh = A.grad_hj ? acc(A.grad_hj[bk]) : acc(0);
  const acc gu = A.grad_u ? acc(A.grad_u[bk]) : acc(0);
  const acc gl = w * gd;
  const acc qscale = A.weighted ? acc(1) : w;
  scalar_t* s = A.s + p * A.H;
  scalar_t* GQ = A.GQ + p * A.H;
  scalar_t* A2 = A.A2 + p * A.H;
  scalar_t* A3 = A.A3 + p * A.H;
  scalar_t* A4 = A.A4 + p * A.H;
  const scalar_t* a = A.a + k * A.H;
  const scalar_t* de = A.de + k * A.H;
  const scalar_t* wn = A.wn + k * A.H;
  acc gwq = 0, lap = 0;
  for (int64_t j = 0; j < A.H; ++j) {
    const acc sj = s[j], aj = a[j];
    const acc s1 = tanh_d1(sj), s2 = tanh_d2(sj), s3 = tanh_d3(sj);
    const acc gq_raw = GQ[j];
    const acc gq = A.weighted ? gq_raw : w * gq_raw;
    gwq += gq_raw * aj * s1;
    lap += aj * s2 * acc(wn[j]);
    GQ[j] = scalar_t(aj * (gu * s1 + (gq + acc(de[j]) * gh) * s2 + acc(wn[j]) * gl * s3));
    A2[j] = scalar_t(s2 * gl);
    A3[j] = scalar_t(s1 * gh);
    A4[j] = scalar_t(sj * gu + s1 * gq);
    s[j] = scalar_t(qscale * aj * s1);
  }
  const acc gw0 = A.weighted ? acc(A.gw[p]) : gwq;
  A.gw[p] = scalar_t(gw0 + gd * lap);
}

/// Field parameters of the potential backward, one row i = (k, j) of (K, H), from the per-field
/// sums over the pairs of field k (sums[k] = [sum GH, sum A2, sum A3, sum A4], see above):
///   grad_c = sum GH,  grad_a = sum A4 + wn sum A2 + de sum A3,  grad_de = a sum A3,
///   grad_W[k, j, :] = 2 a sum A2 W[k, j, :]      (lap depends on |W_kj|^2; the pair products
///                                                  grad_W += ... are added by the launcher)
/// A field with no active pair gets exact zeros whatever its parameters hold (a NaN in W, a, de
/// of an unused field must not turn 0 * NaN into a NaN gradient).
template <typename scalar_t>
struct PotentialParamArgs {
  const scalar_t* sums;        // (K, 4, H)
  const scalar_t* W;           // (K, H, D)
  const scalar_t* a;           // (K, H)
  const scalar_t* de;          // (K, H)
  const scalar_t* wn;          // (K, H)
  const int64_t* offsets;      // (K + 1,) pair segments
  scalar_t* grad_W;            // (K, H, D) out: the |W|^2 term
  scalar_t* grad_c;            // (K, H) out
  scalar_t* grad_a;            // (K, H) out
  scalar_t* grad_de;           // (K, H) out
  int64_t H, D;
};
template <typename scalar_t>
STA_HOST_DEVICE STA_INLINE void potential_param_body(int64_t i, const PotentialParamArgs<scalar_t>& A) {
  using acc = acc_t<scalar_t>;
  const int64_t k = i / A.H, j = i - k * A.H;
  scalar_t* gW = A.grad_W + i * A.D;
  if (A.offsets[k + 1] == A.offsets[k]) {
    A.grad_c[i] = A.grad_a[i] = A.grad_de[i] = scalar_t(0);
    for (int64_t d = 0; d < A.D; ++d) gW[d] = scalar_t(0);
    return;
  }
  const scalar_t* sums = A.sums + k * 4 * A.H + j;
  const acc sGH = sums[0], sA2 = sums[A.H], sA3 = sums[2 * A.H], sA4 = sums[3 * A.H];
  const acc a = A.a[i];
  A.grad_c[i] = scalar_t(sGH);
  A.grad_a[i] = scalar_t(sA4 + acc(A.wn[i]) * sA2 + acc(A.de[i]) * sA3);
  A.grad_de[i] = scalar_t(a * sA3);
  const scalar_t scale = scalar_t(acc(2) * a * sA2);
  const scalar_t* w = A.W + i * A.D;
  for (int64_t d = 0; d < A.D; ++d) gW[d] = w[d] * scale;
}

// =============================================================================================
// Hamiltonian rotational fields (docs/maths.md 1.2, 1.3): r = M_k (a s1), M_k = A_k W_k^T: (D, H)
// =============================================================================================

/// Forward epilogue of one pair: q = a s1 (written into Q); if Dm: d = a s2 (for the curl).
template <typename scalar_t>
struct HamiltonianFwdArgs {
  const scalar_t* s;           // (P, H) tanh(h)
  scalar_t* Q;                 // (P, H) out: a s1 (may alias s)
  scalar_t* Dm;                // (P, H) out: a s2, or nullptr
  const int64_t* pair_field;   // (P,)
  const scalar_t* a;           // (K, H)
  int64_t H;
};
template <typename scalar_t>
STA_HOST_DEVICE STA_INLINE void hamiltonian_fwd_body(int64_t p, const HamiltonianFwdArgs<scalar_t>& A) {
  using acc = acc_t<scalar_t>;
  const scalar_t* a = A.a + A.pair_field[p] * A.H;
  const scalar_t* s = A.s + p * A.H;
  scalar_t* Q = A.Q + p * A.H;
  scalar_t* Dm = A.Dm ? A.Dm + p * A.H : nullptr;
  for (int64_t j = 0; j < A.H; ++j) {
    const acc sj = s[j], aj = a[j];
    if (Dm) Dm[j] = scalar_t(aj * tanh_d2(sj));
    Q[j] = scalar_t(aj * tanh_d1(sj));
  }
}

/// Backward epilogue of one pair, after GQ = G M_k (G: gathered unweighted grad_velocity rows)
/// and, with the curl, T = Dm (C_k + C_k^T) where C_k = G_k - N_k o N_k^T (so d curl/dd = T):
///   gw = GQ . q;  gq = w GQ;  gd = gc T   (gc = grad_curl[b,k])
///   GH = a gq s2 + a gd s3                       (written over GQ)
///   Qw = w q                                     (written into Q)
///   A4 = s1 gq + s2 gd        (-> grad a = sum A4)
///   T <- gc Dm                (-> grad C_k = Dm^T (gc Dm))
template <typename scalar_t>
struct HamiltonianBwdArgs {
  const scalar_t* s;           // (P, H) tanh(h)
  scalar_t* GQ;                // (P, H) in: G M; out: GH
  scalar_t* Q;                 // (P, H) out: w a s1
  scalar_t* A4;                // (P, H) out
  scalar_t* T;                 // (P, H) in: Dm (C + C^T); out: gc Dm   (nullptr without curl)
  scalar_t* gw;                // (P,) out
  const int64_t* pair_sample;  // (P,)
  const int64_t* pair_field;   // (P,)
  const scalar_t* g;           // (B, K)
  const scalar_t* grad_curl;   // (B, K) or nullptr
  const scalar_t* a;           // (K, H)
  int64_t K, H;
};
template <typename scalar_t>
STA_HOST_DEVICE STA_INLINE void hamiltonian_bwd_body(int64_t p, const HamiltonianBwdArgs<scalar_t>& A) {
  using acc = acc_t<scalar_t>;
  const int64_t b = A.pair_sample[p], k = A.pair_field[p], bk = b * A.K + k;
  const acc w = A.g[bk];
  const bool curl = A.T != nullptr;
  const acc gc = (curl && A.grad_curl) ? acc(A.grad_curl[bk]) : acc(0);
  const scalar_t* s = A.s + p * A.H;
  const scalar_t* a = A.a + k * A.H;
  scalar_t* GQ = A.GQ + p * A.H;
  scalar_t* Q = A.Q + p * A.H;
  scalar_t* A4 = A.A4 + p * A.H;
  scalar_t* T = curl ? A.T + p * A.H : nullptr;
  acc gw = 0;
  for (int64_t j = 0; j < A.H; ++j) {
    const acc sj = s[j], aj = a[j];
    const acc s1 = tanh_d1(sj), s2 = tanh_d2(sj), s3 = tanh_d3(sj);
    const acc g0 = GQ[j];
    const acc gq = w * g0;
    gw += g0 * aj * s1;
    acc gdd = 0;
    if (curl) {
      gdd = gc * acc(T[j]);
      T[j] = scalar_t(gc * aj * s2);
    }
    GQ[j] = scalar_t(aj * (gq * s2 + gdd * s3));
    Q[j] = scalar_t(w * aj * s1);
    A4[j] = scalar_t(s1 * gq + s2 * gdd);
  }
  A.gw[p] = scalar_t(gw);
}

// =============================================================================================
// MLP rotational fields (docs/maths.md 1.2): r = tanh(W2 tanh(W1 x + c1) + b2), exact divergence
// div = sum_i r1_i [Pdiv ds1]_i with Pdiv = W2 o W1^T: (D, H), r1 = 1 - r^2, ds1 = 1 - s^2
// =============================================================================================

/// Forward epilogue over H of one pair: ds1 = 1 - s^2 (only needed for the divergence).
template <typename scalar_t>
struct MlpHiddenArgs {
  const scalar_t* s;   // (P, H) tanh(h1)
  scalar_t* ds1;       // (P, H) out
  int64_t H;
};
template <typename scalar_t>
STA_HOST_DEVICE STA_INLINE void mlp_hidden_body(int64_t p, const MlpHiddenArgs<scalar_t>& A) {
  const scalar_t* s = A.s + p * A.H;
  scalar_t* o = A.ds1 + p * A.H;
  for (int64_t j = 0; j < A.H; ++j) o[j] = tanh_d1(s[j]);
}

/// Forward epilogue over D of one pair, after r = tanh(h2) and E = ds1 Pdiv^T (E == nullptr: no div):
///   div[p] = sum_i (1 - r_i^2) E_i
template <typename scalar_t>
struct MlpFwdArgs {
  const scalar_t* r;   // (P, D) tanh(h2)
  const scalar_t* E;   // (P, D) or nullptr
  scalar_t* div;       // (P,)
  int64_t D;
};
template <typename scalar_t>
STA_HOST_DEVICE STA_INLINE void mlp_fwd_body(int64_t p, const MlpFwdArgs<scalar_t>& A) {
  using acc = acc_t<scalar_t>;
  acc t = 0;
  if (A.E) {
    const scalar_t* r = A.r + p * A.D;
    const scalar_t* E = A.E + p * A.D;
    for (int64_t i = 0; i < A.D; ++i) t += tanh_d1(acc(r[i])) * acc(E[i]);
  }
  A.div[p] = scalar_t(t);
}

/// Backward epilogue over D of one pair. G: gathered unweighted grad_velocity rows; with the
/// divergence, gdp = w grad_div[b] + grad_div_rot[b,k] is the gradient on this pair's div:
///   gw = G . r + grad_div[b] div_p
///   GH2 = w G r1 + gdp E (-2 r r1)     (written over G)      -- dL/dh2
///   E  <- gdp r1                       (written over E)      -- dL/dE
template <typename scalar_t>
struct MlpBwdOutArgs {
  const scalar_t* r;           // (P, D) tanh(h2)
  scalar_t* G;                 // (P, D) in: grad_velocity rows; out: dL/dh2
  scalar_t* E;                 // (P, D) in: ds1 Pdiv^T; out: dL/dE (nullptr: no div)
  scalar_t* gw;                // (P,) out
  const int64_t* pair_sample;  // (P,)
  const int64_t* pair_field;   // (P,)
  const scalar_t* g;           // (B, K)
  const scalar_t* grad_div;    // (B,) or nullptr
  const scalar_t* grad_div_rot;// (B, K) or nullptr
  int64_t K, D;
};
template <typename scalar_t>
STA_HOST_DEVICE STA_INLINE void mlp_bwd_out_body(int64_t p, const MlpBwdOutArgs<scalar_t>& A) {
  using acc = acc_t<scalar_t>;
  const int64_t b = A.pair_sample[p], bk = b * A.K + A.pair_field[p];
  const acc w = A.g[bk];
  const acc gd = A.grad_div ? acc(A.grad_div[b]) : acc(0);
  const acc gdp = w * gd + (A.grad_div_rot ? acc(A.grad_div_rot[bk]) : acc(0));
  const scalar_t* r = A.r + p * A.D;
  scalar_t* G = A.G + p * A.D;
  scalar_t* E = A.E ? A.E + p * A.D : nullptr;
  acc gw = 0, div = 0;
  for (int64_t i = 0; i < A.D; ++i) {
    const acc ri = r[i], r1 = tanh_d1(ri), gi = G[i];
    gw += gi * ri;
    acc gh2 = w * gi * r1;
    if (E) {
      const acc e = E[i];
      div += r1 * e;
      gh2 += gdp * e * tanh_d2(ri);
      E[i] = scalar_t(gdp * r1);
    }
    G[i] = scalar_t(gh2);
  }
  A.gw[p] = scalar_t(gw + gd * div);
}

/// Backward epilogue over H of one pair, after GS = GH2 W2 and GDS = GE Pdiv:
///   GH1 = GS ds1 + GDS (-2 s ds1)      (written over GS; GDS == nullptr: no div)
template <typename scalar_t>
struct MlpBwdHiddenArgs {
  const scalar_t* s;    // (P, H) tanh(h1)
  scalar_t* GS;         // (P, H) in: dL/ds (velocity path); out: dL/dh1
  const scalar_t* GDS;  // (P, H) dL/d(ds1) (divergence path) or nullptr
  int64_t H;
};
template <typename scalar_t>
STA_HOST_DEVICE STA_INLINE void mlp_bwd_hidden_body(int64_t p, const MlpBwdHiddenArgs<scalar_t>& A) {
  using acc = acc_t<scalar_t>;
  const scalar_t* s = A.s + p * A.H;
  scalar_t* GS = A.GS + p * A.H;
  const scalar_t* GDS = A.GDS ? A.GDS + p * A.H : nullptr;
  for (int64_t j = 0; j < A.H; ++j) {
    const acc sj = s[j];
    acc t = acc(GS[j]) * tanh_d1(sj);
    if (GDS) t += acc(GDS[j]) * tanh_d2(sj);
    GS[j] = scalar_t(t);
  }
}

// =============================================================================================
// The row bodies and their argument structs, listed once: ``run_row(i, args)`` picks the body by
// the type of ``args`` (each body has its own struct), so a launcher is written once for all of
// them (csrc/flow_step_pipeline.h: CPU at::parallel_for; csrc/cuda/flow_step.cu: one kernel
// template, instantiated from this list).
// =============================================================================================
#define STA_FLOW_ROW_BODIES(X)                    \
  X(pair_sum_body, PairSumArgs)                   \
  X(pair_scatter_body, PairScatterArgs)           \
  X(row_dot_body, RowDotArgs)                     \
  X(potential_fwd_body, PotentialFwdArgs)         \
  X(potential_combine_body, PotentialCombineArgs) \
  X(potential_bwd_v_body, PotentialBwdVArgs)      \
  X(potential_bwd_body, PotentialBwdArgs)         \
  X(potential_param_body, PotentialParamArgs)     \
  X(hamiltonian_fwd_body, HamiltonianFwdArgs)     \
  X(hamiltonian_bwd_body, HamiltonianBwdArgs)     \
  X(mlp_hidden_body, MlpHiddenArgs)               \
  X(mlp_fwd_body, MlpFwdArgs)                     \
  X(mlp_bwd_out_body, MlpBwdOutArgs)              \
  X(mlp_bwd_hidden_body, MlpBwdHiddenArgs)

#define STA_DEFINE_RUN_ROW(BODY, ARGS)                                                       \
  template <typename scalar_t>                                                               \
  STA_HOST_DEVICE STA_INLINE void run_row(int64_t i, const ARGS<scalar_t>& args) { BODY(i, args); }
STA_FLOW_ROW_BODIES(STA_DEFINE_RUN_ROW)
#undef STA_DEFINE_RUN_ROW

}  // namespace math
}  // namespace sta

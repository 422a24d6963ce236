// Latent grid transport maths, shared by csrc/cpu/grid_transport.cpp and csrc/cuda/grid_transport.cu.
// (Split from flow_math.h, which holds the flow-step maths: one header per op family.)
#pragma once

#include <cmath>
#include <cstdint>

#include "flow_math.h"  // STA_HOST_DEVICE, STA_INLINE

// ==============================================================================================
// BEGIN latent grid transport (sta/grid/transport.py, docs/maths.md section 3; owner: grid transport)
// The per-face and per-cell maths of one finite-volume step, shared by csrc/cpu/grid_transport.cpp
// (line kernel: face_flux over contiguous rows) and csrc/cuda/grid_transport.cu (transport_cell).
// The truth is sta/grid/transport.py:transport_reference; the formulas are in sta/grid/transport.py's docstring:
//   slope  s_i = limiter(rho_i - rho_{i-1}, rho_{i+1} - rho_i)
//   face f (between cells f-1 and f): L = rho_{f-1} + s_{f-1}/2, R = rho_f - s_f/2,
//          F_f = max(u_f, 0) L + min(u_f, 0) R
//   rho_i <- rho_i - c_0 (F0_{i+1} - F0_i) - c_1 (...) - c_2 (...),   c_a = dt / dx_a
// Layout (contiguous): rho (n0, n1, n2); u0 (n0+1, n1, n2); u1 (n0, n1+1, n2); u2 (n0, n1, n2+1).
// A 2-D grid is n2 == 1 with ndim == 2 (u2 unused). Namespace sta::grid. The limiter and the
// boundary are template parameters, and the maths is branch-free selects, so the CPU loop over a
// row vectorises and random data costs no branch mispredictions.
// ==============================================================================================
namespace sta {
namespace grid {

// Limiter codes: the values of sta.grid.LIMITERS.
constexpr int kUpwind = 0;
constexpr int kMinmod = 1;
constexpr int kVanLeer = 2;

// Limited slope from the backward (a) and forward (b) differences of a cell (LIMITER != kUpwind).
template <typename T, int LIMITER>
STA_HOST_DEVICE STA_INLINE T limited_slope(T a, T b) {
  const T ab = a * b;
  T s;
  if (LIMITER == kMinmod) {
    s = ((a < T(0) ? -a : a) < (b < T(0) ? -b : b)) ? a : b;
  } else {
    s = T(2) * ab / (a + b);  // van Leer; the 0/0 of ab <= 0 is discarded by the select below
  }
  return ab > T(0) ? s : T(0);
}

// Upwind flux through the face between cell m1 (= f-1) and cell p0 (= f); m2, p1 their outer neighbours.
template <typename T, int LIMITER>
STA_HOST_DEVICE STA_INLINE T face_flux(T u, T m2, T m1, T p0, T p1) {
  T left = m1, right = p0;
  if (LIMITER != kUpwind) {
    left = m1 + T(0.5) * limited_slope<T, LIMITER>(m1 - m2, p0 - m1);
    right = p0 - T(0.5) * limited_slope<T, LIMITER>(p0 - m1, p1 - p0);
  }
  return (u > T(0) ? u : T(0)) * left + (u < T(0) ? u : T(0)) * right;
}

// Cell i + k (|k| <= 2) along an axis of n cells: wrapped (periodic) or clamped (zero-flux: the
// ghost cell copies the edge cell, so the edge slope is 0).
template <bool PERIODIC>
STA_HOST_DEVICE STA_INLINE int64_t neighbour(int64_t i, int k, int64_t n) {
  int64_t j = i + k;
  if (PERIODIC) {
    j %= n;
    return j < 0 ? j + n : j;
  }
  return j < 0 ? 0 : (j >= n ? n - 1 : j);
}

// F_{i+1} - F_i along one axis for cell i of n; rho[base + j * stride] is cell j of this line;
// u_lo, u_hi the velocities of faces i and i+1 (periodic: face n is face 0, the caller passes it).
template <typename T, int LIMITER, bool PERIODIC>
STA_HOST_DEVICE STA_INLINE T flux_difference(const T* rho, int64_t base, int64_t stride, int64_t i, int64_t n,
                                             T u_lo, T u_hi) {
  const T c0 = rho[base + neighbour<PERIODIC>(i, -2, n) * stride];
  const T c1 = rho[base + neighbour<PERIODIC>(i, -1, n) * stride];
  const T c2 = rho[base + i * stride];
  const T c3 = rho[base + neighbour<PERIODIC>(i, 1, n) * stride];
  const T c4 = rho[base + neighbour<PERIODIC>(i, 2, n) * stride];
  T f_lo = face_flux<T, LIMITER>(u_lo, c0, c1, c2, c3);
  T f_hi = face_flux<T, LIMITER>(u_hi, c1, c2, c3, c4);
  if (!PERIODIC) {  // no flux through the domain boundary
    f_lo = i == 0 ? T(0) : f_lo;
    f_hi = i == n - 1 ? T(0) : f_hi;
  }
  return f_hi - f_lo;
}

// rho of cell (i0, i1, i2) after one step; c_a = dt / dx_a.
template <typename T, int LIMITER, bool PERIODIC>
STA_HOST_DEVICE STA_INLINE T transport_cell(const T* rho, const T* u0, const T* u1, const T* u2, int64_t n0,
                                            int64_t n1, int64_t n2, int ndim, int64_t i0, int64_t i1, int64_t i2,
                                            T c0, T c1, T c2) {
  const int64_t plane = n1 * n2;
  T out = rho[(i0 * n1 + i1) * n2 + i2];
  {  // axis 0: u0 (n0 + 1, n1, n2)
    const int64_t lo = (i0 * n1 + i1) * n2 + i2;
    const int64_t hi = (PERIODIC && i0 == n0 - 1) ? i1 * n2 + i2 : lo + plane;
    out = out - c0 * flux_difference<T, LIMITER, PERIODIC>(rho, i1 * n2 + i2, plane, i0, n0, u0[lo], u0[hi]);
  }
  {  // axis 1: u1 (n0, n1 + 1, n2)
    const int64_t lo = (i0 * (n1 + 1) + i1) * n2 + i2;
    const int64_t hi = (PERIODIC && i1 == n1 - 1) ? i0 * (n1 + 1) * n2 + i2 : lo + n2;
    out = out - c1 * flux_difference<T, LIMITER, PERIODIC>(rho, i0 * plane + i2, n2, i1, n1, u1[lo], u1[hi]);
  }
  if (ndim == 3) {  // axis 2: u2 (n0, n1, n2 + 1)
    const int64_t lo = (i0 * n1 + i1) * (n2 + 1) + i2;
    const int64_t hi = (PERIODIC && i2 == n2 - 1) ? (i0 * n1 + i1) * (n2 + 1) : lo + 1;
    out = out - c2 * flux_difference<T, LIMITER, PERIODIC>(rho, (i0 * n1 + i1) * n2, int64_t(1), i2, n2, u2[lo],
                                                           u2[hi]);
  }
  return out;
}

}  // namespace grid
}  // namespace sta
// END latent grid transport
// ==============================================================================================

// sta::divergence_matrix and sta::divergence_matrix_bwd (CPU): the mlp fields' divergence matrix
// Pdiv = W2 o W1^T (docs/ops.md section 7; schemas in csrc/README.md) and its gradients.
//
//   forward   P[k, i, j] = W2[k, i, j] * W1[k, j, i]           W1: (K, H, D), W2, P: (K, D, H)
//   backward  gW2[k, i, j] = G[k, i, j] * W1[k, j, i]
//             gW1[k, j, i] = G[k, i, j] * W2[k, i, j]
//
// Why a kernel for an elementwise product: one of the two operands is read transposed. Written
// as `W2 * W1.transpose(1, 2)`, ATen walks the transposed operand with a stride of D floats, one
// element per cache line: 69 ms at K = 16, D = H = 1024 against 8 ms for the same product of two
// contiguous tensors (one thread, AMD EPYC, with freed memory kept by glibc so that page faults
// do not hide the difference). Here the transposed operand is copied a kTile x kTile tile at a
// time (16 KB in float32) into a local buffer that stays in L1, so every cache line loaded is used
// whole: forward 31 ms, backward 45 ms against ATen's 71 and 143 in the same setting. The outputs
// come from the ops' buffer pool (csrc/buffer_pool.h): with fresh memory each 64 MB output first
// costs ~45 ms of page faults (forward 70 ms, backward 153 ms; from the pool 47 and 53-65 ms).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../buffer_pool.h"

#include <algorithm>

namespace sta {
namespace {

using at::Tensor;

constexpr int64_t kTile = 64;

void check_weights(const char* op, const Tensor& W1, const Tensor& W2) {
  TORCH_CHECK(W1.dim() == 3, op, ": W1 must be (K, H, D), got ", W1.sizes());
  TORCH_CHECK(W2.dim() == 3 && W2.size(0) == W1.size(0) && W2.size(1) == W1.size(2) && W2.size(2) == W1.size(1),
              op, ": W2 must be (K, D, H) = (", W1.size(0), ", ", W1.size(2), ", ", W1.size(1), ") for W1 ",
              W1.sizes(), ", got ", W2.sizes());
  TORCH_CHECK(W1.scalar_type() == W2.scalar_type(), op, ": W1 and W2 must have the same dtype, got ",
              W1.scalar_type(), " and ", W2.scalar_type());
  TORCH_CHECK(W1.device() == W2.device(), op, ": W1 and W2 must be on the same device, got ", W1.device(),
              " and ", W2.device());
}

// One kTile x kTile tile in a local buffer, for the transposed operand: read (and written) along
// the rows of the (H, D) matrix, used along the rows of the (D, H) one. Reading it in place, with
// a stride of D elements, was no faster than ATen (61 against 71 ms at K = 16, D = H = 1024): with
// D a power of two every row of the tile maps to the same cache set. The row pitch kTile + 1
// keeps the buffer's columns in different sets.
template <typename T>
struct Tile {
  T buf[kTile * (kTile + 1)];
  T* row(int64_t i) { return buf + i * (kTile + 1); }
  // buf[i - i0][j - j0] = src[j, i] for the rows [j0, j1) and columns [i0, i1) of src (pitch ld)
  void load_transposed(const T* src, int64_t ld, int64_t j0, int64_t j1, int64_t i0, int64_t i1) {
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t i = i0; i < i1; ++i) buf[(i - i0) * (kTile + 1) + (j - j0)] = src[j * ld + i];
  }
  // dst[j, i] = buf[i - i0][j - j0]
  void store_transposed(T* dst, int64_t ld, int64_t j0, int64_t j1, int64_t i0, int64_t i1) const {
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t i = i0; i < i1; ++i) dst[j * ld + i] = buf[(i - i0) * (kTile + 1) + (j - j0)];
  }
};

// f(k, i0, i1, j0, j1) for every tile of rows [i0, i1) x columns [j0, j1) of the (D, H) matrices,
// tiles of one (field, row band) per task.
template <class F>
void for_tiles(int64_t K, int64_t D, int64_t H, const F& f) {
  const int64_t bands = (D + kTile - 1) / kTile;
  at::parallel_for(0, K * bands, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / bands, i0 = (task % bands) * kTile, i1 = std::min(D, i0 + kTile);
      for (int64_t j0 = 0; j0 < H; j0 += kTile) f(k, i0, i1, j0, std::min(H, j0 + kTile));
    }
  });
}

// f(base, i0, i1, j0, j1, t) for every tile, with t[i - i0][j - j0] = W1[k, j, i] loaded (base: the
// offset k * D * H of field k in W1, W2 and every (K, D, H) or (K, H, D) tensor).
template <typename T, class F>
void for_w1_tiles(const T* w1, int64_t K, int64_t D, int64_t H, const F& f) {
  for_tiles(K, D, H, [&](int64_t k, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    const int64_t base = k * D * H;
    Tile<T> t;
    t.load_transposed(w1 + base, D, j0, j1, i0, i1);
    f(base, i0, i1, j0, j1, t);
  });
}

Tensor divergence_matrix(const Tensor& W1_, const Tensor& W2_) {
  check_weights("sta::divergence_matrix", W1_, W2_);
  const Tensor W1 = W1_.contiguous(), W2 = W2_.contiguous();
  const int64_t K = W2.size(0), D = W2.size(1), H = W2.size(2);
  Tensor P = buffer_pool::empty({K, D, H}, W2.options());
  AT_DISPATCH_FLOATING_TYPES(W2.scalar_type(), "sta_divergence_matrix", [&] {
    const scalar_t* w1 = W1.const_data_ptr<scalar_t>();
    const scalar_t* w2 = W2.const_data_ptr<scalar_t>();
    scalar_t* p = P.data_ptr<scalar_t>();
    for_w1_tiles(w1, K, D, H, [&](int64_t base, int64_t i0, int64_t i1, int64_t j0, int64_t j1, Tile<scalar_t>& t) {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* row = t.row(i - i0);
        for (int64_t j = j0; j < j1; ++j) p[base + i * H + j] = w2[base + i * H + j] * row[j - j0];
      }
    });
  });
  return P;
}

std::tuple<Tensor, Tensor> divergence_matrix_bwd(const Tensor& grad_, const Tensor& W1_, const Tensor& W2_) {
  check_weights("sta::divergence_matrix_bwd", W1_, W2_);
  TORCH_CHECK(grad_.sizes() == W2_.sizes(), "sta::divergence_matrix_bwd: grad must be (K, D, H) like W2, got ",
              grad_.sizes(), " for W2 ", W2_.sizes());
  TORCH_CHECK(grad_.scalar_type() == W2_.scalar_type() && grad_.device() == W2_.device(),
              "sta::divergence_matrix_bwd: grad must have W2's dtype and device");
  const Tensor G = grad_.contiguous(), W1 = W1_.contiguous(), W2 = W2_.contiguous();
  const int64_t K = W2.size(0), D = W2.size(1), H = W2.size(2);
  Tensor gW1 = buffer_pool::empty({K, H, D}, W1.options()), gW2 = buffer_pool::empty({K, D, H}, W2.options());
  AT_DISPATCH_FLOATING_TYPES(W2.scalar_type(), "sta_divergence_matrix_bwd", [&] {
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    const scalar_t* w1 = W1.const_data_ptr<scalar_t>();
    const scalar_t* w2 = W2.const_data_ptr<scalar_t>();
    scalar_t* g1 = gW1.data_ptr<scalar_t>();
    scalar_t* g2 = gW2.data_ptr<scalar_t>();
    for_w1_tiles(w1, K, D, H, [&](int64_t base, int64_t i0, int64_t i1, int64_t j0, int64_t j1, Tile<scalar_t>& t) {
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t* row = t.row(i - i0);
        for (int64_t j = j0; j < j1; ++j) {
          const scalar_t gij = g[base + i * H + j];
          g2[base + i * H + j] = gij * row[j - j0];
          row[j - j0] = gij * w2[base + i * H + j];  // t[i][j] = (G o W2)[i, j], stored transposed below
        }
      }
      t.store_transposed(g1 + base, D, j0, j1, i0, i1);  // gW1[j, i] = t[i][j]
    });
  });
  return {gW1, gW2};
}

}  // namespace
}  // namespace sta

TORCH_LIBRARY_FRAGMENT(sta, m) {
  m.def("divergence_matrix(Tensor W1, Tensor W2) -> Tensor");
  m.def("divergence_matrix_bwd(Tensor grad, Tensor W1, Tensor W2) -> (Tensor grad_W1, Tensor grad_W2)");
}

TORCH_LIBRARY_IMPL(sta, CPU, m) {
  m.impl("divergence_matrix", &sta::divergence_matrix);
  m.impl("divergence_matrix_bwd", &sta::divergence_matrix_bwd);
}

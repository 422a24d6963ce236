// buffer_pool.h -- large CPU buffers of the sta:: ops, reused across calls.
//
// Why: glibc serves every block above its mmap threshold (32 MB at most) with fresh pages from the
// kernel and returns them at free, so each such tensor costs a page fault per 4 KB page the first
// time it is written, at every call. At D = H = 1024, K = 32 a forward + backward of one flow step
// allocates ~640 MB of outputs and per-pair buffers; on the AMD EPYC machine of this project a
// 64 MB block took ~33 ms to allocate and fill fresh against ~5 ms reused. Keeping freed memory in
// glibc's heap instead (mallopt M_MMAP_MAX = 0) fragmented it without bound (a D 1024 training
// iteration grew past 24 GB, docs/ops.md). This pool keeps only the blocks of these ops, reuses a
// block for a request of at most its size and at least 7/8 of it, and holds at most
// `limit_bytes()` of free blocks (the oldest are returned to the system first).
//
// Every tensor it hands out is an ordinary CPU tensor (its storage is not resizable); freeing it
// puts its block back into the pool. Other devices and blocks under kMinBytes use at::empty.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace sta {
namespace buffer_pool {

/// Blocks below this size are left to malloc (its heap serves them without fresh pages).
constexpr int64_t kMinBytes = int64_t(1) << 20;

/// at::empty(sizes, opt), from the pool when opt is a CPU device and the block is >= kMinBytes.
at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opt);

/// Bytes of free blocks held; bytes handed out and not yet freed.
int64_t cached_bytes();
int64_t in_use_bytes();

/// Free blocks held at most (default 1 GiB, or the STA_CPU_POOL_MB environment variable read at
/// the first allocation); setting it lower returns the excess at once. 0 disables the pool.
int64_t limit_bytes();
void set_limit_bytes(int64_t bytes);

/// Returns every free block to the system; the bytes returned.
int64_t release_cached();

}  // namespace buffer_pool
}  // namespace sta

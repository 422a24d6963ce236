// The CPU buffer pool of the sta:: ops (why and contract: csrc/buffer_pool.h) and its Python
// handles sta::cpu_pool_stats / cpu_pool_set_limit / cpu_pool_release (sta/backends/cpu.py wraps them).
#include "../buffer_pool.h"

#include <c10/core/Allocator.h>
#include <torch/library.h>

#include <cstdlib>
#include <list>
#include <mutex>
#include <string>
#include <vector>

namespace sta {
namespace buffer_pool {
namespace {

// Sizes are rounded up to this (a multiple of the 4 KB page) so that requests a few rows apart
// (per-pair buffers: P changes from call to call) land on the same blocks.
constexpr int64_t kGranule = int64_t(64) << 10;
constexpr int64_t kAlign = 64;  // a cache line, as c10's CPU allocator
struct Block {
  void* ptr;
  int64_t bytes;
};

class Pool {
 public:
  // A block of at least `bytes` (its own size may be up to 8/7 of it).
  Block take(int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // best fit among the blocks at most 8/7 of the request (bounded waste), newest first on ties
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->bytes >= bytes && it->bytes - it->bytes / 8 <= bytes && (best == free_.end() || it->bytes < best->bytes))
          best = it;
      if (best != free_.end()) {
        const Block block = *best;
        free_.erase(best);
        cached_ -= block.bytes;
        in_use_ += block.bytes;
        report_locked(block.ptr, block.bytes);
        return block;
      }
    }
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kAlign, static_cast<size_t>(bytes)) != 0 || ptr == nullptr)
      TORCH_CHECK_WITH(OutOfMemoryError, false, "sta: out of CPU memory allocating ", bytes, " bytes");
    std::lock_guard<std::mutex> lock(mutex_);
    const Block block{ptr, bytes};
    in_use_ += bytes;
    report_locked(block.ptr, bytes);
    return block;
  }

  void give_back(const Block& block) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ -= block.bytes;
      report_locked(block.ptr, -block.bytes);
      free_.push_front(block);
      cached_ += block.bytes;
      trim_locked(limit_locked(), drop);
    }
    for (void* p : drop) std::free(p);
  }

  int64_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }
  int64_t in_use() {
    std::lock_guard<std::mutex> lock(mutex_);
    return in_use_;
  }
  int64_t limit() {
    std::lock_guard<std::mutex> lock(mutex_);
    return limit_locked();
  }

  // limit >= 0: the new limit, then trim to it; limit < 0: trim to 0, keeping the limit. Returns
  // the bytes given back to the system.
  int64_t trim(int64_t limit) {
    std::vector<void*> drop;
    int64_t freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (limit >= 0) limit_ = limit;
      freed = cached_;
      trim_locked(limit >= 0 ? limit : 0, drop);
      freed -= cached_;
    }
    for (void* p : drop) std::free(p);
    return freed;
  }

 private:
  // torch.profiler(profile_memory=True) sees the pool's tensors as it sees c10's CPU allocations
  // (benchmarks/_harness.py peak_memory_mb counts them); the blocks held free are its "reserved".
  void report_locked(void* ptr, int64_t delta) {
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(ptr, delta, static_cast<size_t>(in_use_), static_cast<size_t>(in_use_ + cached_),
                                       c10::Device(c10::DeviceType::CPU));
  }

  int64_t limit_locked() {
    if (limit_ < 0) {  // first use: the environment, else 1 GiB (a bad value raises at every call)
      int64_t limit = int64_t(1) << 30;
      if (const char* env = std::getenv("STA_CPU_POOL_MB")) {
        char* end = nullptr;
        const long long mb = std::strtoll(env, &end, 10);
        TORCH_CHECK(end != env && *end == '\0' && mb >= 0,
                    "STA_CPU_POOL_MB must be a whole number of megabytes >= 0, got '", env, "'");
        limit = static_cast<int64_t>(mb) << 20;
      }
      limit_ = limit;
    }
    return limit_;
  }

  // Oldest free blocks first, until at most `limit` bytes are held.
  void trim_locked(int64_t limit, std::vector<void*>& drop) {
    while (cached_ > limit && !free_.empty()) {
      cached_ -= free_.back().bytes;
      drop.push_back(free_.back().ptr);
      free_.pop_back();
    }
  }

  std::mutex mutex_;
  std::list<Block> free_;  // front: the most recently freed
  int64_t cached_ = 0, in_use_ = 0, limit_ = -1;
};

// Never destroyed: tensors freed during interpreter shutdown still find it.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

}  // namespace

at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  const int64_t numel = c10::multiply_integers(sizes);
  const int64_t need = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(opt.dtype())));
  if (opt.device().type() != c10::DeviceType::CPU || need < kMinBytes || pool().limit() == 0)
    return at::empty(sizes, opt);
  const int64_t bytes = (need + kGranule - 1) / kGranule * kGranule;
  const Block block = pool().take(bytes);
  return at::from_blob(block.ptr, sizes, [block](void*) { pool().give_back(block); }, opt);
}

int64_t cached_bytes() { return pool().cached(); }
int64_t in_use_bytes() { return pool().in_use(); }
int64_t limit_bytes() { return pool().limit(); }
void set_limit_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "sta: the CPU pool limit must be >= 0 bytes, got ", bytes);
  pool().trim(bytes);
}
int64_t release_cached() { return pool().trim(-1); }

}  // namespace buffer_pool
}  // namespace sta

namespace {
std::vector<int64_t> cpu_pool_stats() {
  using namespace sta::buffer_pool;
  return {cached_bytes(), in_use_bytes(), limit_bytes()};
}
void cpu_pool_set_limit(int64_t bytes) { sta::buffer_pool::set_limit_bytes(bytes); }
int64_t cpu_pool_release() { return sta::buffer_pool::release_cached(); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(sta, m) {
  m.def("cpu_pool_stats() -> int[]", &cpu_pool_stats);
  m.def("cpu_pool_set_limit(int bytes) -> ()", &cpu_pool_set_limit);
  m.def("cpu_pool_release() -> int", &cpu_pool_release);
}

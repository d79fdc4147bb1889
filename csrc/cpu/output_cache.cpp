// The CPU output cache (see output_cache.h).
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace bnfast {
namespace cpu {
namespace {

constexpr size_t kMinCachedBytes = size_t(1) << 18;
constexpr size_t kPageBytes = 4096;
// Each block starts with a header holding its size; the data follows at a
// 64-byte offset, keeping c10::alloc_cpu's alignment.
constexpr size_t kHeaderBytes = 64;

size_t limit_from_env() {
  const char* text = std::getenv("BNFAST_CPU_CACHE_MB");
  if (text == nullptr || *text == '\0') return size_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(text, &end, 10);
  TORCH_CHECK(end != text && *end == '\0' && mb >= 0,
              "BNFAST_CPU_CACHE_MB must be a non-negative integer (MiB), got '", text, "'");
  return static_cast<size_t>(mb) << 20;
}

class OutputCache final : public c10::Allocator {
 public:
  static OutputCache& instance() {
    // Never destroyed: buffers may be freed during interpreter shutdown.
    static auto* cache = new OutputCache();
    return *cache;
  }

  bool enabled() const { return limit_ > 0; }

  c10::DataPtr allocate(size_t nbytes) override {
    const size_t bytes = (nbytes + kPageBytes - 1) / kPageBytes * kPageBytes;
    void* block = nullptr;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      auto it = idle_.find(bytes);
      if (it != idle_.end() && !it->second.empty()) {
        block = it->second.back();
        it->second.pop_back();
        idle_bytes_ -= bytes;
      }
    }
    if (block == nullptr) {
      block = c10::alloc_cpu(bytes + kHeaderBytes);
      *static_cast<size_t*>(block) = bytes;
    }
    return {static_cast<char*>(block) + kHeaderBytes, block, &release, c10::Device(c10::kCPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void empty() {
    std::lock_guard<std::mutex> guard(mutex_);
    for (auto& entry : idle_) {
      for (void* block : entry.second) c10::free_cpu(block);
    }
    idle_.clear();
    idle_bytes_ = 0;
  }

  int64_t idle_bytes() {
    std::lock_guard<std::mutex> guard(mutex_);
    return static_cast<int64_t>(idle_bytes_);
  }

 private:
  OutputCache() : limit_(limit_from_env()) {}

  static void release(void* block) { instance().give_back(block); }

  void give_back(void* block) {
    const size_t bytes = *static_cast<size_t*>(block);
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (idle_bytes_ + bytes <= limit_) {
        idle_[bytes].push_back(block);
        idle_bytes_ += bytes;
        return;
      }
    }
    c10::free_cpu(block);
  }

  const size_t limit_;
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> idle_;
  size_t idle_bytes_ = 0;
};

}  // namespace

at::Tensor empty_cached_like(const at::Tensor& like) {
  auto& cache = OutputCache::instance();
  const size_t nbytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (!cache.enabled() || nbytes < kMinCachedBytes) {
    return at::detail::empty_strided_cpu(like.sizes(), like.strides(), like.scalar_type());
  }
  return at::detail::empty_strided_generic(like.sizes(), like.strides(), &cache,
                                           c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           like.scalar_type());
}

void empty_output_cache() { OutputCache::instance().empty(); }

int64_t output_cache_idle_bytes() { return OutputCache::instance().idle_bytes(); }

// No tensor arguments, so no backend key: registered for every backend.
TORCH_LIBRARY_IMPL(bnfast, CompositeExplicitAutograd, m) {
  m.impl("empty_cpu_cache", &empty_output_cache);
  m.impl("cpu_cache_idle_bytes", &output_cache_idle_bytes);
}

}  // namespace cpu
}  // namespace bnfast

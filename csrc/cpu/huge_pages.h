// Large CPU outputs: 2 MB-aligned, on transparent huge pages, and reused.
//
// A fresh [N, D] output of the fused ops is about 100 MB (N = 32768, D = 720). glibc serves
// every allocation that size with a new mmap, and the kernel then faults it in and zeroes it
// one 4 KB page at a time: on a virtual machine that costs several times the op's own writes
// (`python benchmarks/cpu_time_table.py 19` here: reading 94 MB and writing it to a fresh tensor
// takes 61 ms, to an existing one 10 ms: the "pass" and "pass_into" columns). Outputs of at least
// kHugeBytes therefore come from this allocator:
// - 2 MB-aligned and marked MADV_HUGEPAGE, so a new block faults in 2 MB at a time (torch does
//   the same for all its allocations under THP_MEM_ALLOC_ENABLE=1; where transparent huge pages
//   are off the advice is ignored);
// - freed blocks are kept (at most kCacheBytes in all, like torch's CUDA caching allocator) and
//   handed out again for an output of the same rounded size, so a training loop, which frees and
//   asks for the same sizes every step, stops faulting after its first step. The cache never
//   returns memory to the system before exit.
// Smaller outputs use torch's allocator.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <cstdlib>
#include <deque>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace protoseg {
namespace cpu {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kHugeBytes = size_t{16} << 20;
constexpr size_t kCacheBytes = size_t{2} << 30;

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes == 0) return {nullptr, nullptr, &release, c10::Device(c10::DeviceType::CPU)};
    auto* block = new Block{nullptr, (nbytes + kHugePage - 1) / kHugePage * kHugePage};
    block->data = cache().take(block->size);
    if (block->data == nullptr) {
      if (posix_memalign(&block->data, kHugePage, block->size) != 0) {
        delete block;
        TORCH_CHECK(false, "protoseg: out of memory allocating ", nbytes, " bytes");
      }
#if defined(MADV_HUGEPAGE)
      madvise(block->data, block->size, MADV_HUGEPAGE);  // advice only
#endif
    }
    return {block->data, block, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }  // the context is not the data
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* data;
    size_t size;
  };

  // Freed blocks by size, at most kCacheBytes in all; the oldest go first when full.
  class Cache {
   public:
    void* take(size_t size) {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = blocks_.begin(); it != blocks_.end(); ++it) {
        if (it->size == size) {
          void* data = it->data;
          bytes_ -= size;
          blocks_.erase(it);
          return data;
        }
      }
      return nullptr;
    }
    void give(const Block& block) {
      if (block.size > kCacheBytes) {
        std::free(block.data);
        return;
      }
      std::lock_guard<std::mutex> lock(mutex_);
      while (bytes_ + block.size > kCacheBytes) {
        std::free(blocks_.front().data);
        bytes_ -= blocks_.front().size;
        blocks_.pop_front();
      }
      blocks_.push_back(block);
      bytes_ += block.size;
    }

   private:
    std::mutex mutex_;
    std::deque<Block> blocks_;
    size_t bytes_ = 0;
  };

  // Never destroyed: tensors freed during interpreter shutdown may still return blocks to it.
  static Cache& cache() {
    static Cache* c = new Cache;
    return *c;
  }

  static void release(void* ctx) {
    if (ctx == nullptr) return;
    auto* block = static_cast<Block*>(ctx);
    cache().give(*block);
    delete block;
  }
};

// at::empty(sizes, options) for a CPU output, on huge pages when it is at least kHugeBytes.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
#if defined(__linux__)
  if (options.device().is_cpu() && bytes >= kHugeBytes) {
    static HugePageAllocator allocator;
    return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     c10::typeMetaToScalarType(options.dtype()), std::nullopt);
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace cpu
}  // namespace protoseg

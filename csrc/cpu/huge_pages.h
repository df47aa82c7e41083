// Large CPU outputs on transparent huge pages.
//
// A fresh [N, D] output of the fused ops is about 100 MB (N = 32768, D = 720). glibc serves
// every allocation that size with a new mmap, and the kernel then faults it in one 4 KB page
// at a time: on a virtual machine that costs several times the op's own writes (measured here:
// 55 ms to allocate and fill 94 MB, 6 ms to fill it again). Outputs of at least kHugeBytes are
// therefore allocated 2 MB-aligned and marked MADV_HUGEPAGE, so they fault in 2 MB at a time
// (10 ms for the same 94 MB); torch does the same for all of its allocations when run with
// THP_MEM_ALLOC_ENABLE=1. Where transparent huge pages are off the advice is ignored and the
// memory behaves as any other. Smaller outputs use torch's allocator.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace protoseg {
namespace cpu {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kHugeBytes = size_t{16} << 20;

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    void* p = nullptr;
    if (nbytes > 0) {
      const size_t size = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
      TORCH_CHECK(posix_memalign(&p, kHugePage, size) == 0, "protoseg: out of memory allocating ", nbytes,
                  " bytes");
#if defined(MADV_HUGEPAGE)
      madvise(p, size, MADV_HUGEPAGE);  // advice only: ignored where transparent huge pages are off
#endif
    }
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void release(void* p) { std::free(p); }
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

// The CPU grid executor (test-only): runs the shipped CUDA kernels (csrc/cuda/*.cuh, compiled
// by the host compiler through csrc/cuda/portability.h) with CUDA's execution semantics.
//
//   - one host thread per CUDA thread of a block (std::thread, pooled across launches), so every interleaving the
//     OS scheduler produces is a legal GPU interleaving, and ThreadSanitizer sees real threads;
//   - blocks run in sequence (x fastest), the same threads looping over them, with a barrier
//     between blocks; shared memory is one arena per launch, shared by the block's threads and
//     poisoned (0xA5) between blocks, so a kernel relying on zeroed or inherited shared memory
//     computes garbage;
//   - __syncthreads is a barrier over the block's threads (mutex + condition variable, which
//     ThreadSanitizer understands); a barrier not reached by every thread within 60 s aborts
//     with a message (divergent __syncthreads is undefined behaviour on a GPU);
//   - warp shuffles and ballots go through a per-warp exchange: each lane writes its value,
//     warp barrier, reads its source lane's value, warp barrier;
//   - atomics are std::atomic_ref operations (portability.h).
//
// emu_exec.h makes it the `Exec` of the launch sequences in csrc/cuda/<op>.cuh.
#pragma once

#include <cxxabi.h>

#include <functional>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <typeinfo>
#include <vector>

#include "cuda/portability.h"

namespace ps_emu {

inline void shared_overflow(std::size_t needed, std::size_t available) {
  std::fprintf(stderr, "grid executor: a kernel declares %zu bytes of static shared memory (> %zu)\n", needed,
               available);
  std::abort();
}

class Barrier {
 public:
  explicit Barrier(unsigned count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != generation; })) {
      std::fprintf(stderr, "grid executor: barrier of %u threads not reached by all (%u arrived): divergent "
                   "__syncthreads or warp operation\n", count_, arrived_);
      std::abort();
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  unsigned count_, arrived_ = 0;
  uint64_t generation_ = 0;
};

constexpr std::size_t kStaticSharedBytes = 48 * 1024;
constexpr unsigned char kPoison = 0xA5;

class BlockContext final : public Context {
 public:
  BlockContext(unsigned threads, std::size_t dynamic_bytes)
      : block_(threads), exchange_(2 * threads), static_(kStaticSharedBytes, kPoison), dynamic_(dynamic_bytes + 16, kPoison) {
    for (unsigned w = 0; w < threads / 32; ++w) warps_.push_back(std::make_unique<Barrier>(32));
  }
  void sync_block() override { block_.wait(); }
  void sync_warp() override {
    const unsigned t = state.thread_idx.x + state.block_dim.x * (state.thread_idx.y + state.block_dim.y * state.thread_idx.z);
    warps_[t / 32]->wait();
  }
  // Double-buffered: exchange i uses buffer i % 2, so one barrier per shuffle suffices. A lane
  // writes buffer b again only after passing the barrier of the next exchange, which every
  // lane reaches only after it has read buffer b.
  uint64_t warp_exchange(uint64_t bits, unsigned src_lane) override {
    const unsigned t = state.thread_idx.x + state.block_dim.x * (state.thread_idx.y + state.block_dim.y * state.thread_idx.z);
    const unsigned warp = t / 32;
    const std::size_t base = (state.exchange_parity ^= 1u) * exchange_.size() / 2;
    exchange_[base + t] = bits;
    warps_[warp]->wait();
    return exchange_[base + warp * 32 + (src_lane % 32)];
  }
  unsigned char* static_shared() override { return static_.data(); }
  std::size_t static_shared_bytes() const override { return static_.size(); }
  void* dynamic_shared() override { return dynamic_.data(); }
  void poison() {
    std::fill(static_.begin(), static_.end(), kPoison);
    std::fill(dynamic_.begin(), dynamic_.end(), kPoison);
  }

 private:
  Barrier block_;
  std::vector<std::unique_ptr<Barrier>> warps_;
  std::vector<uint64_t> exchange_;
  std::vector<unsigned char> static_, dynamic_;
};

// Which kernels ran, keyed by their parameter struct (one per kernel), with the largest grid.
struct LaunchStat {
  int64_t launches = 0;
  int64_t max_blocks = 0;
};
inline std::mutex stats_mutex;
inline std::map<std::string, LaunchStat> stats;

inline std::string demangle(const char* name) {
  int status = 0;
  char* out = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string s = status == 0 && out != nullptr ? out : name;
  std::free(out);
  return s;
}

// Worker threads kept across launches (creating a block's worth of threads per launch
// dominated the run time): run(n, f) calls f(t) on workers t = 0..n-1 concurrently, each on its
// own thread, and returns when all are done.
class ThreadPool {
 public:
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      ++generation_;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }
  void run(unsigned n, const std::function<void(unsigned)>& f) {
    std::unique_lock<std::mutex> lock(mu_);
    while (workers_.size() < n) {
      const unsigned id = static_cast<unsigned>(workers_.size());
      workers_.emplace_back([this, id] { loop(id); });
    }
    job_ = &f;
    active_ = n;
    pending_ = n;
    ++generation_;
    cv_.notify_all();
    done_.wait(lock, [&] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop(unsigned id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(unsigned)>* job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
        if (id >= active_) continue;
        job = job_;
      }
      (*job)(id);
      std::lock_guard<std::mutex> lock(mu_);
      if (--pending_ == 0) done_.notify_all();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(unsigned)>* job_ = nullptr;
  unsigned active_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

inline ThreadPool& pool() {
  static ThreadPool instance;
  return instance;
}

template <class P>
void launch(void (*kernel)(P), Dim3 grid, Dim3 block, std::size_t dynamic_smem, const P& params) {
  const unsigned threads = block.x * block.y * block.z;
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  if (threads == 0 || blocks == 0) return;
  if (threads % 32 != 0 || threads > 1024) {
    std::fprintf(stderr, "grid executor: blocks must be whole warps of at most 1024 threads (got %u)\n", threads);
    std::abort();
  }
  {
    std::lock_guard<std::mutex> lock(stats_mutex);
    auto& s = stats[demangle(typeid(P).name())];
    ++s.launches;
    s.max_blocks = std::max(s.max_blocks, blocks);
  }
  BlockContext ctx(threads, dynamic_smem);
  Barrier between_blocks(threads);
  pool().run(threads, [&](unsigned t) {
    state.context = &ctx;
    state.block_dim = block;
    state.grid_dim = grid;
    state.exchange_parity = 0;
    state.thread_idx = Dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          state.block_idx = Dim3(bx, by, bz);
          state.shared_offset = 0;
          kernel(params);
          between_blocks.wait();  // the block is done everywhere
          if (t == 0) ctx.poison();
          between_blocks.wait();  // before the next block touches shared memory
        }
    state.context = nullptr;
  });
}

}  // namespace ps_emu

// A tiny CPU emulator of the CUDA features the mask-loss kernels use, so that their logic (indexing, barriers,
// reductions) is tested on machines without a GPU. Each CUDA thread of a block is a ucontext coroutine; blocks run
// one after another. __syncthreads() and __shfl_down_sync() yield to a round-robin scheduler, which gives barrier
// semantics when every thread of the block reaches the same sequence of them (true for these kernels).
// __shared__ variables become function-local statics (shared by the threads of the one running block).
#pragma once
#include <ucontext.h>

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {
struct State {
  dim3 block_idx, block_dim;
  unsigned tid = 0;
  ucontext_t sched;
  std::vector<ucontext_t> ctx;
  std::vector<char> done;
  std::vector<float> shfl;
  const std::function<void()>* body = nullptr;
};
inline State& st() {
  static State s;
  return s;
}
inline void yield() { swapcontext(&st().ctx[st().tid], &st().sched); }
inline void entry() {
  (*st().body)();
  st().done[st().tid] = 1;
  swapcontext(&st().ctx[st().tid], &st().sched);
}
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  State& s = st();
  const unsigned n = block.x;
  constexpr size_t kStack = 256 * 1024;
  std::vector<std::vector<char>> stacks(n, std::vector<char>(kStack));
  s.block_dim = block;
  s.body = &body;
  s.shfl.assign(n, 0.0f);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      s.block_idx = dim3(bx, by, 0);
      s.ctx.assign(n, ucontext_t{});
      s.done.assign(n, 0);
      for (unsigned t = 0; t < n; ++t) {
        getcontext(&s.ctx[t]);
        s.ctx[t].uc_stack.ss_sp = stacks[t].data();
        s.ctx[t].uc_stack.ss_size = kStack;
        s.ctx[t].uc_link = nullptr;
        makecontext(&s.ctx[t], entry, 0);
      }
      bool all_done = false;
      while (!all_done) {  // one round = every live thread runs to its next barrier (or its end)
        all_done = true;
        for (unsigned t = 0; t < n; ++t) {
          if (s.done[t]) continue;
          s.tid = t;
          swapcontext(&s.sched, &s.ctx[t]);
          if (!s.done[t]) all_done = false;
        }
        // a thread that finished while others wait at a barrier would deadlock real hardware only if the others
        // wait for it; __syncthreads after an early exit of part of a block is undefined behaviour: flag it
        unsigned finished = 0;
        for (unsigned t = 0; t < n; ++t) finished += s.done[t];
        if (finished != 0 && finished != n) throw std::runtime_error("threads of a block diverged at a barrier");
      }
    }
  }
}
}  // namespace emu

#define threadIdx (dim3(emu::st().tid, 0, 0))
#define blockIdx (emu::st().block_idx)
#define blockDim (emu::st().block_dim)

inline void __syncthreads() { emu::yield(); }
inline float __shfl_down_sync(unsigned, float v, unsigned off) {
  emu::State& s = emu::st();
  const unsigned t = s.tid;
  s.shfl[t] = v;
  emu::yield();  // everyone has published
  const unsigned lane = t % 32;
  const float out = lane + off < 32 ? s.shfl[t + off] : v;
  emu::yield();  // everyone has read before the next publish
  return out;
}

template <class A, class B>
inline auto min(A a, B b) -> decltype(a + b) { return a < b ? a : b; }
template <class A, class B>
inline auto max(A a, B b) -> decltype(a + b) { return a < b ? b : a; }

struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }

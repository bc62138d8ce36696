// Fused mask-loss CUDA kernels: the same algorithm as kernels/mask_loss_triton.py.
//  forward: one block per (loss-grid tile, mask); the resized logit is computed on the fly, the block writes its
//           kNumSums partial sums (fixed-order reduction, no atomics).
//  backward, bilinear: one block per low-res tile; it evaluates the pixel gradient g on chunks of the output region
//           that can touch the tile (shared memory), contracts the columns (each low-res column gathers the output
//           columns whose source interval covers it) and then the rows. Each gradient value is written once:
//           deterministic, no atomics, no full-resolution buffer.
//  backward, nearest/none: pointwise on the logits grid.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mask_loss.h"

namespace dualloop {
namespace {

constexpr float kTiny = 1.17549435e-38f;  // smallest normal float32 (clamp of 1 - p_t)
constexpr int kFwdThreads = 256;
constexpr int kBwdThreads = 256;
constexpr int kBwdChunkY = 16;
constexpr int kPointwiseThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(uint8_t v) { return static_cast<float>(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

struct Geometry {
  int H, W, th, tw;
  int64_t t_off;
  float sy, sx;
};

__device__ __forceinline__ Geometry geometry(const MaskLossParams& p, int64_t n) {
  Geometry g;
  if (p.meta_i != nullptr) {
    const int64_t* mi = p.meta_i + n * kMetaI;
    g.H = static_cast<int>(mi[0]);
    g.W = static_cast<int>(mi[1]);
    g.t_off = mi[2];
    g.th = static_cast<int>(mi[3]);
    g.tw = static_cast<int>(mi[4]);
    g.sy = p.meta_f[n * kMetaF + 0];
    g.sx = p.meta_f[n * kMetaF + 1];
  } else {
    g.H = p.H;
    g.W = p.W;
    g.t_off = n * static_cast<int64_t>(p.H) * p.W;
    g.th = p.th;
    g.tw = p.tw;
    g.sy = p.scale_y;
    g.sx = p.scale_x;
  }
  return g;
}

// ATen bilinear (align_corners=False) source indices and weights.
struct Lin {
  int i0, i1;
  float l0, l1;
};
__device__ __forceinline__ Lin linear_src(int dst, float scale, int n_in) {
  Lin r;
  float src = fmaxf(scale * (static_cast<float>(dst) + 0.5f) - 0.5f, 0.0f);
  r.i0 = min(static_cast<int>(src), n_in - 1);
  r.l1 = fminf(fmaxf(src - static_cast<float>(r.i0), 0.0f), 1.0f);
  r.i1 = r.i0 < n_in - 1 ? r.i0 + 1 : r.i0;
  r.l0 = 1.0f - r.l1;
  return r;
}

// ATen nearest: min(floor(dst * scale), n_in - 1).
__device__ __forceinline__ int nearest_src(int dst, float scale, int n_in) {
  return min(static_cast<int>(static_cast<float>(dst) * scale), n_in - 1);
}

// Output indices [first, last) whose bilinear sources can touch inputs [lo, lo + count): a superset with a margin
// of >= 1 index each side (same formula as the Triton kernel); exact weights are recomputed by the caller.
__device__ __forceinline__ void region(int lo, int count, int n_out, float scale, int& first, int& last) {
  float inv = 1.0f / scale;
  float a = fmaxf((static_cast<float>(lo) - 0.5f) * inv - 0.5f, -1.0f);
  first = max(static_cast<int>(a + 2.0f) - 4, 0);
  float b = (static_cast<float>(lo + count) + 0.5f) * inv - 0.5f;
  last = min(static_cast<int>(b) + 2, n_out);
}

template <typename TL>
__device__ __forceinline__ float lerp2(const TL* lg, int w, const Lin& ry, const Lin& cx) {
  float x00 = to_float(lg[ry.i0 * w + cx.i0]);
  float x01 = to_float(lg[ry.i0 * w + cx.i1]);
  float x10 = to_float(lg[ry.i1 * w + cx.i0]);
  float x11 = to_float(lg[ry.i1 * w + cx.i1]);
  return ry.l0 * (cx.l0 * x00 + cx.l1 * x01) + ry.l1 * (cx.l0 * x10 + cx.l1 * x11);
}

struct Terms {
  float p, q, ce, raw, base, mod, at, focal;
};

__device__ __forceinline__ Terms terms(float x, float t, const MaskLossParams& prm, int gamma_mode) {
  Terms r;
  float e = expf(-fabsf(x));
  float inv = 1.0f / (1.0f + e);
  r.p = x >= 0.0f ? inv : e * inv;
  r.q = x >= 0.0f ? e * inv : inv;
  r.ce = fmaxf(x, 0.0f) - x * t + logf(1.0f + e);
  r.raw = r.p * (1.0f - t) + r.q * t;
  r.base = fmaxf(r.raw, kTiny);
  if (gamma_mode == 0) r.mod = 1.0f;
  else if (gamma_mode == 1) r.mod = r.base;
  else if (gamma_mode == 2) r.mod = r.base * r.base;
  else r.mod = expf(prm.gamma * logf(r.base));
  r.at = prm.alpha >= 0.0f ? prm.alpha * t + (1.0f - prm.alpha) * (1.0f - t) : 1.0f;
  r.focal = r.ce * r.mod * r.at;
  return r;
}

struct Coefs {
  float cf, cb, ca, cbb;
};

__device__ __forceinline__ float pixel_grad(float x, float t, const Coefs& c, const MaskLossParams& prm,
                                            int gamma_mode) {
  Terms r = terms(x, t, prm, gamma_mode);
  float pq = r.p * r.q;
  float dce = r.p - t;
  float dbase = pq * (1.0f - 2.0f * t);
  float dmod;
  if (gamma_mode == 0) dmod = 0.0f;
  else if (gamma_mode == 1) dmod = dbase;
  else if (gamma_mode == 2) dmod = 2.0f * r.base * dbase;
  else dmod = prm.gamma * r.mod / r.base * dbase;
  if (!(r.raw > kTiny)) dmod = 0.0f;
  float dfocal = r.at * (dce * r.mod + r.ce * dmod);
  return c.cf * dfocal + c.cb * dce + pq * (c.ca * t + c.cbb);
}

__device__ __forceinline__ int gamma_mode_of(float gamma) {
  return gamma == 0.0f ? 0 : gamma == 1.0f ? 1 : gamma == 2.0f ? 2 : -1;
}

template <typename TL, typename TT, bool BILINEAR>
__global__ void __launch_bounds__(kFwdThreads) forward_kernel(MaskLossParams p, float* __restrict__ partial,
                                                              int n_tiles) {
  const int tile = blockIdx.x;
  const int64_t n = blockIdx.y;
  const Geometry g = geometry(p, n);
  const int gm = gamma_mode_of(p.gamma);
  const int OH = BILINEAR ? g.H : p.h;
  const int OW = BILINEAR ? g.W : p.w;
  const int n_tx = (OW + kFwdTileX - 1) / kFwdTileX;
  const int y_base = (tile / n_tx) * kFwdTileY;
  const int x_base = (tile % n_tx) * kFwdTileX;
  const TL* lg = static_cast<const TL*>(p.logits) + n * static_cast<int64_t>(p.h) * p.w;
  const TT* tg = static_cast<const TT*>(p.targets) + g.t_off;
  float acc[kNumSums];
#pragma unroll
  for (int c = 0; c < kNumSums; ++c) acc[c] = 0.0f;
  for (int k = threadIdx.x; k < kFwdTileY * kFwdTileX; k += blockDim.x) {
    const int Y = y_base + k / kFwdTileX;
    const int X = x_base + k % kFwdTileX;
    if (Y >= OH || X >= OW) continue;
    float x, t;
    if (BILINEAR) {
      x = lerp2(lg, p.w, linear_src(Y, g.sy, p.h), linear_src(X, g.sx, p.w));
      t = to_float(tg[static_cast<int64_t>(Y) * g.W + X]);
    } else {
      x = to_float(lg[Y * p.w + X]);
      t = to_float(tg[static_cast<int64_t>(nearest_src(Y, g.sy, g.H)) * g.W + nearest_src(X, g.sx, g.W)]);
    }
    const Terms r = terms(x, t, p, gm);
    const bool pred = x > 0.0f, tb = t > 0.5f;
    acc[0] += r.focal;
    acc[1] += r.ce;
    acc[2] += r.p * t;
    acc[3] += r.p;
    acc[4] += t;
    acc[5] += (pred && tb) ? 1.0f : 0.0f;
    acc[6] += (pred || tb) ? 1.0f : 0.0f;
    acc[7] += (t >= 0.0f && t <= 1.0f) ? 0.0f : 1.0f;  // NaN counts as bad
  }
  // Fixed-order block reduction: warp shuffles, then warp 0 adds the per-warp values in order.
  __shared__ float red[kNumSums][kFwdThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int c = 0; c < kNumSums; ++c) {
    float v = acc[c];
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) red[c][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < kNumSums) {
    float s = 0.0f;
    for (int k = 0; k < static_cast<int>(blockDim.x / 32); ++k) s += red[threadIdx.x][k];
    partial[(n * n_tiles + tile) * kNumSums + threadIdx.x] = s;
  }
}

__device__ __forceinline__ Coefs load_coefs(const float* coefs, int64_t n) {
  return Coefs{coefs[n * 4 + 0], coefs[n * 4 + 1], coefs[n * 4 + 2], coefs[n * 4 + 3]};
}

template <typename TL, typename TT>
__global__ void __launch_bounds__(kPointwiseThreads) backward_pointwise_kernel(MaskLossParams p,
                                                                               const float* __restrict__ coefs,
                                                                               TL* __restrict__ grad) {
  const int64_t n = blockIdx.y;
  const Geometry g = geometry(p, n);
  const int gm = gamma_mode_of(p.gamma);
  const Coefs c = load_coefs(coefs, n);
  const int64_t base = n * static_cast<int64_t>(p.h) * p.w;
  const TL* lg = static_cast<const TL*>(p.logits) + base;
  const TT* tg = static_cast<const TT*>(p.targets) + g.t_off;
  const int hw = p.h * p.w;
  for (int k = blockIdx.x * kPointwiseTile + threadIdx.x; k < min(hw, (blockIdx.x + 1) * kPointwiseTile);
       k += blockDim.x) {
    const int i = k / p.w, j = k % p.w;
    const float x = to_float(lg[k]);
    const float t = to_float(tg[static_cast<int64_t>(nearest_src(i, g.sy, g.H)) * g.W + nearest_src(j, g.sx, g.W)]);
    grad[base + k] = from_float<TL>(pixel_grad(x, t, c, p, gm));
  }
}

template <typename TL, typename TT>
__global__ void __launch_bounds__(kBwdThreads) backward_bilinear_kernel(MaskLossParams p,
                                                                        const float* __restrict__ coefs,
                                                                        TL* __restrict__ grad) {
  constexpr int L = kBwdLowTile;
  constexpr int RY = kBwdChunkY;
  constexpr int RX = kBwdRegionX;
  constexpr int kPerThread = (L * L + kBwdThreads - 1) / kBwdThreads;
  __shared__ float G[RY][RX + 1];
  __shared__ float GX[RY][L];
  __shared__ int ri0[RY], ri1[RY], cj0[RX], cj1[RX];
  __shared__ float rl0[RY], rl1[RY], cl0[RX], cl1[RX];

  const int tile = blockIdx.x;
  const int64_t n = blockIdx.y;
  const Geometry g = geometry(p, n);
  const int gm = gamma_mode_of(p.gamma);
  const int n_tx = (p.w + g.tw - 1) / g.tw;
  const int i_lo = (tile / n_tx) * g.th;
  const int j_lo = (tile % n_tx) * g.tw;
  if (i_lo >= p.h) return;  // past this mask's tiles (ragged grid): the whole block leaves together
  const int th = min(g.th, p.h - i_lo), tw = min(g.tw, p.w - j_lo);
  int y_first, y_last, x_first, x_last;
  region(i_lo, g.th, g.H, g.sy, y_first, y_last);
  region(j_lo, g.tw, g.W, g.sx, x_first, x_last);
  const Coefs c = load_coefs(coefs, n);
  const int64_t base = n * static_cast<int64_t>(p.h) * p.w;
  const TL* lg = static_cast<const TL*>(p.logits) + base;
  const TT* tg = static_cast<const TT*>(p.targets) + g.t_off;
  const int tid = threadIdx.x;

  float acc[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) acc[k] = 0.0f;

  for (int y0 = y_first; y0 < y_last; y0 += RY) {
    const int ny = min(RY, y_last - y0);
    if (tid < RY && tid < ny) {
      const Lin r = linear_src(y0 + tid, g.sy, p.h);
      ri0[tid] = r.i0; ri1[tid] = r.i1; rl0[tid] = r.l0; rl1[tid] = r.l1;
    }
    for (int q = tid; q < RY * L; q += blockDim.x) GX[q / L][q % L] = 0.0f;
    __syncthreads();
    for (int x0 = x_first; x0 < x_last; x0 += RX) {
      const int nx = min(RX, x_last - x0);
      if (tid < RX && tid < nx) {
        const Lin r = linear_src(x0 + tid, g.sx, p.w);
        cj0[tid] = r.i0; cj1[tid] = r.i1; cl0[tid] = r.l0; cl1[tid] = r.l1;
      }
      __syncthreads();
      // g on the chunk
      for (int q = tid; q < RY * RX; q += blockDim.x) {
        const int r = q / RX, cc = q % RX;
        float v = 0.0f;
        if (r < ny && cc < nx) {
          const Lin ly{ri0[r], ri1[r], rl0[r], rl1[r]};
          const Lin lx{cj0[cc], cj1[cc], cl0[cc], cl1[cc]};
          const float x = lerp2(lg, p.w, ly, lx);
          const float t = to_float(tg[static_cast<int64_t>(y0 + r) * g.W + (x0 + cc)]);
          v = pixel_grad(x, t, c, p, gm);
        }
        G[r][cc] = v;
      }
      __syncthreads();
      // columns: GX[r][jj] += sum over output cols X touching low-res col j of wx(X, j) * G[r][X]
      for (int q = tid; q < RY * L; q += blockDim.x) {
        const int r = q / L, jj = q % L;
        if (r >= ny || jj >= tw) continue;
        const int j = j_lo + jj;
        int xa, xb;
        region(j, 1, g.W, g.sx, xa, xb);
        xa = max(xa, x0);
        xb = min(xb, x0 + nx);
        float s = 0.0f;
        for (int X = xa; X < xb; ++X) {
          const int cc = X - x0;
          const float wgt = (cj0[cc] == j ? cl0[cc] : 0.0f) + (cj1[cc] == j ? cl1[cc] : 0.0f);
          s += wgt * G[r][cc];
        }
        GX[r][jj] += s;
      }
      __syncthreads();
    }
    // rows: acc[ii][jj] += sum over output rows Y touching low-res row i of wy(Y, i) * GX[Y][jj]
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int q = tid + k * kBwdThreads;
      const int ii = q / L, jj = q % L;
      if (q >= L * L || ii >= th || jj >= tw) continue;
      const int i = i_lo + ii;
      int ya, yb;
      region(i, 1, g.H, g.sy, ya, yb);
      ya = max(ya, y0);
      yb = min(yb, y0 + ny);
      float s = 0.0f;
      for (int Y = ya; Y < yb; ++Y) {
        const int r = Y - y0;
        const float wgt = (ri0[r] == i ? rl0[r] : 0.0f) + (ri1[r] == i ? rl1[r] : 0.0f);
        s += wgt * GX[r][jj];
      }
      acc[k] += s;
    }
    __syncthreads();
  }
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int q = tid + k * kBwdThreads;
    const int ii = q / L, jj = q % L;
    if (q >= L * L || ii >= th || jj >= tw) continue;
    grad[base + static_cast<int64_t>(i_lo + ii) * p.w + (j_lo + jj)] = from_float<TL>(acc[k]);
  }
}

template <typename TL, typename TT>
const char* launch_typed_forward(const MaskLossParams& p, float* partial, int n_tiles, cudaStream_t s) {
  const dim3 grid(n_tiles, static_cast<unsigned>(p.n));
  if (p.bilinear) forward_kernel<TL, TT, true><<<grid, kFwdThreads, 0, s>>>(p, partial, n_tiles);
  else forward_kernel<TL, TT, false><<<grid, kFwdThreads, 0, s>>>(p, partial, n_tiles);
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename TL, typename TT>
const char* launch_typed_backward(const MaskLossParams& p, const float* coefs, void* grad, int n_tiles,
                                  cudaStream_t s) {
  const dim3 grid(n_tiles, static_cast<unsigned>(p.n));
  if (p.bilinear) {
    backward_bilinear_kernel<TL, TT><<<grid, kBwdThreads, 0, s>>>(p, coefs, static_cast<TL*>(grad));
  } else {
    backward_pointwise_kernel<TL, TT><<<grid, kPointwiseThreads, 0, s>>>(p, coefs, static_cast<TL*>(grad));
  }
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Calls F.template operator()<TL, TT>() for the runtime dtypes.
template <typename F>
const char* dispatch(int logits_dtype, int targets_dtype, F&& f) {
  auto with_targets = [&](auto tl_tag) -> const char* {
    using TL = decltype(tl_tag);
    switch (targets_dtype) {
      case kFloat32: return f(TL{}, float{});
      case kFloat16: return f(TL{}, __half{});
      case kBFloat16: return f(TL{}, __nv_bfloat16{});
      case kUInt8: return f(TL{}, uint8_t{});
      default: return "unsupported targets dtype";
    }
  };
  switch (logits_dtype) {
    case kFloat32: return with_targets(float{});
    case kFloat16: return with_targets(__half{});
    case kBFloat16: return with_targets(__nv_bfloat16{});
    default: return "unsupported logits dtype";
  }
}

}  // namespace

const char* launch_mask_loss_forward(const MaskLossParams& p, float* partial, int n_tiles, void* stream) {
  if (p.n == 0 || n_tiles == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch(p.logits_dtype, p.targets_dtype, [&](auto tl_tag, auto tt_tag) {
    return launch_typed_forward<decltype(tl_tag), decltype(tt_tag)>(p, partial, n_tiles, s);
  });
}

const char* launch_mask_loss_backward(const MaskLossParams& p, const float* coefs, void* grad, int n_tiles,
                                      void* stream) {
  if (p.n == 0 || n_tiles == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch(p.logits_dtype, p.targets_dtype, [&](auto tl_tag, auto tt_tag) {
    return launch_typed_backward<decltype(tl_tag), decltype(tt_tag)>(p, coefs, grad, n_tiles, s);
  });
}

}  // namespace dualloop

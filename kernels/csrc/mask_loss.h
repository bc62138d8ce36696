// Launchers of the fused mask-loss CUDA kernels (mask_loss_cuda.cu). Plain C++: no torch types, so the .cu
// compiles with the CUDA toolkit alone. Semantics: see kernels/reference.py and kernels/mask_loss_triton.py.
#pragma once
#include <cstdint>

namespace dualloop {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kUInt8 = 3 };

// Tile shapes; the Python side reads them from the extension module to size grids and partial buffers.
constexpr int kFwdTileY = 16;      // forward: loss-grid pixels per program (rows x cols)
constexpr int kFwdTileX = 128;
constexpr int kBwdLowTile = 32;    // backward (bilinear): max low-res rows/cols per program
constexpr int kBwdRegionY = 128;   // output rows a backward program may touch (processed in chunks)
constexpr int kBwdRegionX = 128;   // output cols a backward program may touch (one chunk)
constexpr int kPointwiseTile = 1024;  // backward (nearest/none): low-res pixels per program
constexpr int kNumSums = 8;
constexpr int kMetaI = 5;  // H, W, target offset, backward tile rows, cols (int64 per mask; ragged only)
constexpr int kMetaF = 2;  // scale_y, scale_x (float32 per mask; ragged only)

struct MaskLossParams {
  const void* logits;     // [N, h, w] contiguous, dtype logits_dtype
  const void* targets;    // [N, H, W] contiguous, or flat concatenation when ragged
  const int64_t* meta_i;  // [N, kMetaI] (ragged) or nullptr
  const float* meta_f;    // [N, kMetaF] (ragged) or nullptr
  int64_t n;
  int h, w, H, W;         // H, W: uniform target size (ignored when ragged)
  float scale_y, scale_x; // uniform scales: ATen's float32 in/out ratio of the resize (ignored when ragged)
  int th, tw;             // uniform backward tile (ignored when ragged)
  float alpha, gamma;
  int logits_dtype, targets_dtype;
  bool bilinear;          // resize="logits"; else nearest resize of targets to (h, w)
};

// Each returns nullptr on success, else a static error string.
const char* launch_mask_loss_forward(const MaskLossParams& p, float* partial, int n_tiles, void* stream);
// coefs: [N, 4] float32 (cf, cb, A, B); grad: [N, h, w] in the logits' dtype. n_tiles: programs per mask.
const char* launch_mask_loss_backward(const MaskLossParams& p, const float* coefs, void* grad, int n_tiles,
                                      void* stream);

}  // namespace dualloop

// Torch binding of the fused mask-loss CUDA kernels. Argument checks here; the host logic (packing, value checks,
// autograd) lives in kernels/_fused.py and kernels/cuda_ext.py.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "mask_loss.h"

namespace {

int logits_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return dualloop::kFloat32;
    case at::kHalf: return dualloop::kFloat16;
    case at::kBFloat16: return dualloop::kBFloat16;
    default: TORCH_CHECK(false, "logits must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

int targets_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return dualloop::kFloat32;
    case at::kHalf: return dualloop::kFloat16;
    case at::kBFloat16: return dualloop::kBFloat16;
    case at::kByte: return dualloop::kUInt8;
    default: TORCH_CHECK(false, "targets must be float32, float16, bfloat16 or uint8, got ", t.scalar_type());
  }
  return -1;
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& logits) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == logits.device(), name, " must be on the logits' device");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

dualloop::MaskLossParams make_params(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& meta_i,
                                     const at::Tensor& meta_f, int64_t H, int64_t W, double scale_y, double scale_x,
                                     int64_t th, int64_t tw, double alpha, double gamma, bool bilinear) {
  check_cuda(logits, "logits", logits);
  check_cuda(targets, "targets", logits);
  TORCH_CHECK(logits.dim() == 3, "logits must be [N, h, w]");
  dualloop::MaskLossParams p{};
  p.logits = logits.data_ptr();
  p.targets = targets.data_ptr();
  p.n = logits.size(0);
  p.h = static_cast<int>(logits.size(1));
  p.w = static_cast<int>(logits.size(2));
  const bool ragged = meta_i.numel() > 0;
  if (ragged) {
    check_cuda(meta_i, "meta_i", logits);
    check_cuda(meta_f, "meta_f", logits);
    TORCH_CHECK(meta_i.scalar_type() == at::kLong && meta_i.dim() == 2 && meta_i.size(0) == p.n &&
                    meta_i.size(1) == dualloop::kMetaI,
                "meta_i must be int64 [N, ", dualloop::kMetaI, "]");
    TORCH_CHECK(meta_f.scalar_type() == at::kFloat && meta_f.dim() == 2 && meta_f.size(0) == p.n &&
                    meta_f.size(1) == dualloop::kMetaF,
                "meta_f must be float32 [N, ", dualloop::kMetaF, "]");
    p.meta_i = meta_i.data_ptr<int64_t>();
    p.meta_f = meta_f.data_ptr<float>();
  } else {
    TORCH_CHECK(targets.numel() == p.n * H * W, "targets must hold N * H * W values");
    TORCH_CHECK(th >= 1 && tw >= 1 && th <= dualloop::kBwdLowTile && tw <= dualloop::kBwdLowTile,
                "backward tile out of range");
  }
  p.H = static_cast<int>(H);
  p.W = static_cast<int>(W);
  p.scale_y = static_cast<float>(scale_y);
  p.scale_x = static_cast<float>(scale_x);
  p.th = static_cast<int>(th);
  p.tw = static_cast<int>(tw);
  p.alpha = static_cast<float>(alpha);
  p.gamma = static_cast<float>(gamma);
  p.logits_dtype = logits_code(logits);
  p.targets_dtype = targets_code(targets);
  p.bilinear = bilinear;
  return p;
}

void forward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& meta_i, const at::Tensor& meta_f,
             const at::Tensor& partial, int64_t H, int64_t W, double scale_y, double scale_x, double alpha, double gamma,
             bool bilinear) {
  const c10::cuda::CUDAGuard guard(logits.device());
  auto p = make_params(logits, targets, meta_i, meta_f, H, W, scale_y, scale_x, 1, 1, alpha, gamma, bilinear);
  check_cuda(partial, "partial", logits);
  TORCH_CHECK(partial.scalar_type() == at::kFloat && partial.dim() == 3 && partial.size(0) == p.n &&
                  partial.size(2) == dualloop::kNumSums,
              "partial must be float32 [N, tiles, ", dualloop::kNumSums, "]");
  const char* err = dualloop::launch_mask_loss_forward(p, partial.data_ptr<float>(),
                                                       static_cast<int>(partial.size(1)),
                                                       c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "mask-loss forward launch failed: ", err);
}

void backward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& meta_i, const at::Tensor& meta_f,
              const at::Tensor& coefs, const at::Tensor& grad, int64_t n_tiles, int64_t H, int64_t W, double scale_y,
              double scale_x, int64_t th, int64_t tw, double alpha, double gamma, bool bilinear) {
  const c10::cuda::CUDAGuard guard(logits.device());
  auto p = make_params(logits, targets, meta_i, meta_f, H, W, scale_y, scale_x, th, tw, alpha, gamma, bilinear);
  check_cuda(coefs, "coefs", logits);
  check_cuda(grad, "grad", logits);
  TORCH_CHECK(coefs.scalar_type() == at::kFloat && coefs.dim() == 2 && coefs.size(0) == p.n && coefs.size(1) == 4,
              "coefs must be float32 [N, 4]");
  TORCH_CHECK(grad.scalar_type() == logits.scalar_type() && grad.sizes() == logits.sizes(),
              "grad must match the logits");
  const char* err = dualloop::launch_mask_loss_backward(p, coefs.data_ptr<float>(), grad.data_ptr(),
                                                        static_cast<int>(n_tiles),
                                                        c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "mask-loss backward launch failed: ", err);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused mask losses (bilinear/nearest resize + focal + BCE + dice + IoU), forward and backward";
  m.def("forward", &forward, "per-(mask, tile) partial sums");
  m.def("backward", &backward, "gradient of the logits (deterministic)");
  m.attr("FWD_TILE_Y") = dualloop::kFwdTileY;
  m.attr("FWD_TILE_X") = dualloop::kFwdTileX;
  m.attr("BWD_LOW_TILE") = dualloop::kBwdLowTile;
  m.attr("BWD_REGION_Y") = dualloop::kBwdRegionY;
  m.attr("BWD_REGION_X") = dualloop::kBwdRegionX;
  m.attr("POINTWISE_TILE") = dualloop::kPointwiseTile;
  m.attr("NUM_SUMS") = dualloop::kNumSums;
}

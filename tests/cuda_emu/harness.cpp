// C entry points over the emulated launchers (see emu.h); the .cu is included after its launch syntax was rewritten.
#include "emu.h"
#include MASK_LOSS_CU

extern "C" {
const char* emu_forward(const void* logits, int logits_dtype, const void* targets, int targets_dtype,
                        const int64_t* meta_i, const float* meta_f, int64_t n, int h, int w, int H, int W,
                        float scale_y, float scale_x, float alpha, float gamma, int bilinear, float* partial,
                        int n_tiles) {
  dualloop::MaskLossParams p{logits, targets, meta_i, meta_f, n, h, w, H, W, scale_y, scale_x, 1, 1,
                             alpha, gamma, logits_dtype, targets_dtype, bilinear != 0};
  try {
    return dualloop::launch_mask_loss_forward(p, partial, n_tiles, nullptr);
  } catch (const std::exception& e) {
    static std::string msg;
    msg = e.what();
    return msg.c_str();
  }
}
const char* emu_backward(const void* logits, int logits_dtype, const void* targets, int targets_dtype,
                         const int64_t* meta_i, const float* meta_f, int64_t n, int h, int w, int H, int W,
                         float scale_y, float scale_x, int th, int tw, float alpha, float gamma, int bilinear,
                         const float* coefs, void* grad, int n_tiles) {
  dualloop::MaskLossParams p{logits, targets, meta_i, meta_f, n, h, w, H, W, scale_y, scale_x, th, tw,
                             alpha, gamma, logits_dtype, targets_dtype, bilinear != 0};
  try {
    return dualloop::launch_mask_loss_backward(p, coefs, grad, n_tiles, nullptr);
  } catch (const std::exception& e) {
    static std::string msg;
    msg = e.what();
    return msg.c_str();
  }
}
}

"""The compiled CUDA extension backend: `dualloop.kernels._mask_loss_cuda` built by setup.py, or JIT-built on first
use with torch.utils.cpp_extension.load + ninja (TORCH_CUDA_ARCH_LIST normalized first; torch picks the visible
GPU's arch when it is unset). Same algorithm and host logic as the Triton backend (see _fused.py)."""
from __future__ import annotations

import os
import threading

import torch

from . import build_env
from ._fused import FusedOps, FusedPlan, fused_mask_loss, make_plan
from ._inputs import BackendUnavailableError, MaskBatch
from .reference import NUM_SUMS

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = [os.path.join(CSRC, "mask_loss.cpp"), os.path.join(CSRC, "mask_loss_cuda.cu")]
_lock = threading.Lock()
_module = None
_load_error: str | None = None


def _jit_build():
    from torch.utils.cpp_extension import CUDA_HOME, load, verify_ninja_availability

    if not torch.cuda.is_available() or torch.version.cuda is None:
        raise BackendUnavailableError("backend='cuda' needs a CUDA build of torch and a visible GPU "
                                      f"(torch {torch.__version__}, cuda available: {torch.cuda.is_available()})")
    if CUDA_HOME is None:
        raise BackendUnavailableError("backend='cuda': the extension is not prebuilt and no CUDA toolkit was found "
                                      "to JIT-build it; set CUDA_HOME (nvcc) or reinstall with "
                                      "DUALLOOP_BUILD_CUDA=1 pip install --no-build-isolation -e .")
    try:
        verify_ninja_availability()
    except RuntimeError as e:
        raise BackendUnavailableError("backend='cuda': JIT build needs ninja: pip install ninja") from e
    build_env.normalize_cuda_arch_list()
    return load(name="dualloop_mask_loss_cuda", sources=SOURCES, extra_include_paths=[CSRC],
                extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo"], verbose=False)


def load_extension():
    """The extension module; raises BackendUnavailableError (saying what is missing) when it cannot be had."""
    global _module, _load_error
    with _lock:
        if _module is not None:
            return _module
        if _load_error is not None:
            raise BackendUnavailableError(_load_error)
        try:
            from . import _mask_loss_cuda as mod  # built by setup.py
        except ImportError:
            try:
                mod = _jit_build()
            except BackendUnavailableError as e:
                _load_error = str(e)
                raise
            except Exception as e:  # compiler/linker failure: keep the message, do not retry every call
                _load_error = f"backend='cuda': JIT build of {SOURCES} failed: {e}"
                raise BackendUnavailableError(_load_error) from e
        _module = mod
        return mod


def extension_available() -> bool:
    try:
        load_extension()
    except BackendUnavailableError:
        return False
    return True


class CudaOps(FusedOps):
    """The CUDA-extension implementation of the fused-backend interface of _fused.py."""

    def __init__(self):
        self.ext = load_extension()

    def make_plan(self, batch: MaskBatch) -> FusedPlan:
        e = self.ext
        return make_plan(batch, block_y=e.BWD_LOW_TILE, block_x=e.BWD_LOW_TILE, region_y=e.BWD_REGION_Y,
                         region_x=e.BWD_REGION_X)

    @staticmethod
    def _meta(plan: FusedPlan):
        if plan.ragged:
            return plan.meta_i, plan.meta_f
        empty = plan.logits.new_empty(0)
        return empty, empty

    def forward_sums(self, plan: FusedPlan) -> torch.Tensor:
        e = self.ext
        oh, ow = plan.max_grid
        n_tiles = -(-oh // e.FWD_TILE_Y) * -(-ow // e.FWD_TILE_X)
        partial = torch.empty(plan.n, n_tiles, NUM_SUMS, dtype=torch.float32, device=plan.logits.device)
        mi, mf = self._meta(plan)
        e.forward(plan.logits, plan.targets, mi, mf, partial, plan.H, plan.W, plan.scale_y, plan.scale_x,
                  plan.alpha, plan.gamma, plan.bilinear)
        return partial.sum(dim=1, dtype=torch.float64)

    def backward(self, plan: FusedPlan, coefs: torch.Tensor) -> torch.Tensor:
        e = self.ext
        n, h, w = plan.logits.shape
        grad = torch.empty_like(plan.logits)
        n_tiles = plan.max_bwd_tiles if plan.bilinear else -(-(h * w) // e.POINTWISE_TILE)
        mi, mf = self._meta(plan)
        e.backward(plan.logits, plan.targets, mi, mf, coefs, grad, n_tiles, plan.H, plan.W, plan.scale_y,
                   plan.scale_x, plan.th, plan.tw, plan.alpha, plan.gamma, plan.bilinear)
        return grad


def mask_loss_cuda(batch: MaskBatch):
    """(focal, bce, dice, iou) float32 [N] with the compiled CUDA kernels."""
    if batch.logits.device.type != "cuda":
        raise BackendUnavailableError(f"backend='cuda' needs CUDA tensors (got {batch.logits.device})")
    return fused_mask_loss(batch, CudaOps())

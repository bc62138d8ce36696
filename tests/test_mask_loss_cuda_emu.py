"""The CUDA extension's kernels (kernels/csrc/mask_loss_cuda.cu) run on the CPU through a small emulator
(tests/cuda_emu/emu.h: threads as coroutines, barriers and warp shuffles as scheduler yields) and are compared with
the torch reference through the same host logic (_fused.py) the real extension uses. This checks the kernels'
indexing, tiling, reductions and gradient gather without a GPU; `make gpu-check` runs them for real."""
import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from dualloop.kernels._fused import FusedOps, FusedPlan, fused_mask_loss, make_plan
from dualloop.kernels._inputs import prepare
from dualloop.kernels.reference import NUM_SUMS, mask_loss_reference

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "kernels" / "csrc"
EMU = Path(__file__).resolve().parent / "cuda_emu"
DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.uint8: 3}


def _header_consts():
    text = (CSRC / "mask_loss.h").read_text()
    return {k: int(v) for k, v in re.findall(r"constexpr int (k\w+) = (\d+);", text)}


def _emulated_source(tmp: Path) -> Path:
    """The .cu with each `kernel<...><<<grid, block, smem, stream>>>(args);` turned into an emulator launch."""
    src = (CSRC / "mask_loss_cuda.cu").read_text()
    pattern = re.compile(r"([A-Za-z_]\w*<[^<>;]*>)<<<([^;]*?)>>>\((.*?)\);")

    def launch(m):
        grid, block = [c.strip() for c in m.group(2).split(",")[:2]]
        return f"emu::launch(dim3({grid}), dim3({block}), [&]() {{ {m.group(1)}({m.group(3)}); }});"

    out, count = pattern.subn(launch, src)
    assert count == 4, f"expected 4 kernel launches in the .cu, rewrote {count}"
    path = tmp / "mask_loss_cuda_emu.cu"
    path.write_text(out)
    return path


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    tmp = tmp_path_factory.mktemp("cuda_emu")
    cu = _emulated_source(tmp)
    lib = tmp / "mask_loss_emu.so"
    cmd = [cxx, "-O1", "-std=c++20", "-shared", "-fPIC", "-w", f"-I{EMU}", f"-I{CSRC}", f'-DMASK_LOSS_CU="{cu}"',
           str(EMU / "harness.cpp"), "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    dll = ctypes.CDLL(str(lib))
    dll.emu_forward.restype = ctypes.c_char_p
    dll.emu_backward.restype = ctypes.c_char_p
    return dll


class EmuOps(FusedOps):
    """CudaOps (kernels/cuda_ext.py) with the emulated launchers in place of the extension."""

    def __init__(self, dll):
        self.dll, self.k = dll, _header_consts()

    def make_plan(self, batch) -> FusedPlan:
        k = self.k
        return make_plan(batch, block_y=k["kBwdLowTile"], block_x=k["kBwdLowTile"], region_y=k["kBwdRegionY"],
                         region_x=k["kBwdRegionX"])

    @staticmethod
    def _common(plan):
        n, h, w = plan.logits.shape
        mi = ctypes.c_void_p(plan.meta_i.data_ptr()) if plan.ragged else None
        mf = ctypes.c_void_p(plan.meta_f.data_ptr()) if plan.ragged else None
        return [ctypes.c_void_p(plan.logits.data_ptr()), DTYPE[plan.logits.dtype],
                ctypes.c_void_p(plan.targets.data_ptr()), DTYPE[plan.targets.dtype], mi, mf, ctypes.c_int64(n),
                h, w, plan.H, plan.W, ctypes.c_float(plan.scale_y), ctypes.c_float(plan.scale_x)]

    def forward_sums(self, plan):
        oh, ow = plan.max_grid
        n_tiles = -(-oh // self.k["kFwdTileY"]) * -(-ow // self.k["kFwdTileX"])
        partial = torch.full((plan.n, n_tiles, NUM_SUMS), float("nan"))
        err = self.dll.emu_forward(*self._common(plan), ctypes.c_float(plan.alpha), ctypes.c_float(plan.gamma),
                                   int(plan.bilinear), ctypes.c_void_p(partial.data_ptr()), n_tiles)
        assert err is None, err
        assert torch.isfinite(partial).all(), "a forward program left its partial sums unwritten"
        return partial.sum(dim=1, dtype=torch.float64)

    def backward(self, plan, coefs):
        n, h, w = plan.logits.shape
        grad = torch.full_like(plan.logits, float("nan"))
        n_tiles = plan.max_bwd_tiles if plan.bilinear else -(-(h * w) // self.k["kPointwiseTile"])
        err = self.dll.emu_backward(*self._common(plan), plan.th, plan.tw, ctypes.c_float(plan.alpha),
                                    ctypes.c_float(plan.gamma), int(plan.bilinear),
                                    ctypes.c_void_p(coefs.data_ptr()), ctypes.c_void_p(grad.data_ptr()), n_tiles)
        assert err is None, err
        return grad


def _compare(dll, logits, targets, grad_rtol=1e-4, only_dice=False, **kw):
    kw = {"resize": "logits", "alpha": 0.25, "gamma": 2.0, "dice_smooth": 1.0, **kw}
    g = torch.Generator().manual_seed(1)
    wf, wb, wd = torch.rand(3, logits.shape[0], generator=g) + 0.5
    if only_dice:  # focal and bce get no upstream gradient (None in the fused backward)
        wf = wb = None
    results = []
    for run in ("ref", "emu"):
        x = logits.detach().clone().requires_grad_(True)
        batch = prepare(x, targets, backend="cuda", **kw)
        out = mask_loss_reference(batch) if run == "ref" else fused_mask_loss(batch, EmuOps(dll))
        (wd * out[2] if only_dice else wf * out[0] + wb * out[1] + wd * out[2]).sum().backward()
        results.append((out, x.grad))
    (ref, gref), (emu, gemu) = results
    for name, a, b in zip(("focal", "bce", "dice", "iou"), emu, ref):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert torch.isfinite(gemu).all(), "some gradient entries were never written"
    torch.testing.assert_close(gemu.float(), gref.float(), atol=1e-7, rtol=grad_rtol)


CASES = {
    "upsample_odd": (lambda: torch.randn(3, 7, 9) * 3, lambda: torch.rand(3, 31, 17) > 0.5, {}),
    "multi_tile_4x": (lambda: torch.randn(2, 40, 50) * 3, lambda: torch.rand(2, 160, 200) > 0.5, {}),
    "big_upsample": (lambda: torch.randn(1, 5, 4), lambda: torch.rand(1, 300, 170) > 0.5, {"gamma": 0.5}),
    "targets_smaller": (lambda: torch.randn(2, 37, 45) * 2, lambda: torch.rand(2, 11, 9), {"alpha": -1.0}),
    "ragged": (lambda: torch.randn(3, 20, 24) * 2,
               lambda: [torch.rand(13, 101) > 0.5, torch.rand(90, 37), torch.rand(20, 24) > 0.5], {}),
    "resize_targets": (lambda: torch.randn(2, 33, 40), lambda: (torch.rand(2, 70, 50) > 0.5).to(torch.uint8),
                       {"resize": "targets", "gamma": 1.0}),
    "resize_none": (lambda: torch.randn(2, 40, 30), lambda: torch.rand(2, 40, 30), {"resize": "none",
                                                                                   "gamma": 0.0}),
    "extreme": (lambda: torch.where(torch.rand(2, 6, 5) > 0.5, 100.0, -90.0),
                lambda: torch.stack([torch.zeros(23, 11), torch.ones(23, 11)]), {"gamma": 0.5}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_emulated_cuda_kernels_match_reference(emu_lib, case):
    make_x, make_t, kw = CASES[case]
    torch.manual_seed(0)
    _compare(emu_lib, make_x(), make_t(), **kw)


def test_emulated_cuda_kernels_with_losses_left_out(emu_lib):
    torch.manual_seed(0)
    _compare(emu_lib, torch.randn(3, 7, 9) * 3, torch.rand(3, 31, 17) > 0.5, only_dice=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_cuda_kernels_half_dtypes(emu_lib, dtype):
    torch.manual_seed(0)
    _compare(emu_lib, (torch.randn(2, 8, 7) * 3).to(dtype), torch.rand(2, 29, 33).to(dtype), grad_rtol=1e-2)

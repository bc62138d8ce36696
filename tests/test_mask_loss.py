"""Mask losses on CPU: torch reference vs a float64 formula; Triton kernels (TRITON_INTERPRET=1) vs the reference."""
import os

import pytest
import torch
import torch.nn.functional as F
from dualloop.kernels import BackendUnavailableError, MaskLossOutput, mask_loss

TRITON = "triton" if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available() else None


def formula64(logits, targets, resize="logits", alpha=0.25, gamma=2.0, dice_smooth=1.0):
    """Plain float64 statement of the contract, mask by mask (autograd gives the reference gradient)."""
    out = {k: [] for k in ("focal", "bce", "dice", "iou")}
    for x, t in zip(logits, targets):
        x, t = x.double(), t.double()
        if resize == "logits":
            x = F.interpolate(x[None, None], size=tuple(t.shape), mode="bilinear", align_corners=False)[0, 0]
        elif resize == "targets":
            t = F.interpolate(t[None, None], size=tuple(x.shape), mode="nearest")[0, 0]
        p = torch.sigmoid(x)
        ce = F.softplus(x) - x * t
        p_t = p * t + (1 - p) * (1 - t)
        focal = ce * (1 - p_t) ** gamma
        if alpha >= 0:
            focal = focal * (alpha * t + (1 - alpha) * (1 - t))
        out["focal"].append(focal.mean())
        out["bce"].append(ce.mean())
        out["dice"].append(1 - (2 * (p * t).sum() + dice_smooth) / (p.sum() + t.sum() + dice_smooth))
        pred, tb = x > 0, t > 0.5
        out["iou"].append((pred & tb).sum() / (pred | tb).sum().clamp_min(1))
    return {k: torch.stack(v) for k, v in out.items()}


def weighted(out, wf, wb, wd):
    return (wf * out.focal + wb * out.bce + wd * out.dice).sum()


def run(backend, logits, targets, weights=None, **kw):
    x = logits.detach().clone().requires_grad_(True)
    out = mask_loss(x, targets, backend=backend, **kw)
    n = logits.shape[0]
    g = torch.Generator().manual_seed(1)
    wf, wb, wd = weights if weights is not None else torch.rand(3, n, generator=g) + 0.5
    weighted(out, wf, wb, wd).backward()
    return out, x.grad


def assert_close_out(a, b, atol=2e-6, rtol=2e-5):
    for name in ("focal", "bce", "dice", "iou"):
        torch.testing.assert_close(getattr(a, name).double(), getattr(b, name).double(), atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")


CASES = {
    "upsample_odd": (lambda: torch.randn(3, 7, 9) * 3, lambda: torch.rand(3, 31, 17) > 0.5, {}),
    "targets_smaller": (lambda: torch.randn(2, 12, 10) * 2, lambda: torch.rand(2, 5, 7) > 0.4, {}),
    "soft_targets": (lambda: torch.randn(2, 8, 8), lambda: torch.rand(2, 19, 23), {"alpha": -1.0, "gamma": 0.5}),
    "resize_targets": (lambda: torch.randn(2, 9, 11) * 2, lambda: torch.rand(2, 40, 30) > 0.5,
                       {"resize": "targets"}),
    "resize_targets_soft": (lambda: torch.randn(2, 9, 11), lambda: torch.rand(2, 5, 23), {"resize": "targets"}),
    "resize_none": (lambda: torch.randn(2, 9, 11), lambda: (torch.rand(2, 9, 11) > 0.5).to(torch.uint8),
                    {"resize": "none", "dice_smooth": 0.0, "gamma": 1.0}),
    "big_upsample": (lambda: torch.randn(1, 5, 4), lambda: torch.rand(1, 300, 170) > 0.5, {"gamma": 3.0}),
    "n1_gamma0": (lambda: torch.randn(1, 6, 5), lambda: torch.rand(1, 13, 21) > 0.5, {"gamma": 0.0, "alpha": 0.7}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_matches_float64_formula(case):
    make_x, make_t, kw = CASES[case]
    torch.manual_seed(0)
    logits, targets = make_x(), make_t()
    out, grad = run("torch", logits, targets, **kw)
    x64 = logits.double().requires_grad_(True)
    exp = formula64(x64, targets, **kw)
    g = torch.Generator().manual_seed(1)
    wf, wb, wd = torch.rand(3, logits.shape[0], generator=g) + 0.5
    (wf * exp["focal"] + wb * exp["bce"] + wd * exp["dice"]).sum().backward()
    for name in ("focal", "bce", "dice", "iou"):
        torch.testing.assert_close(getattr(out, name).double(), exp[name].double(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad.double(), x64.grad, atol=1e-7, rtol=1e-4)
    assert isinstance(out, MaskLossOutput) and out.focal.dtype == torch.float32 and out.focal.shape == (len(logits),)


def _triton_vs_reference(logits, targets, grad_atol=1e-7, grad_rtol=1e-4, **kw):
    ref, gref = run("torch", logits, targets, **kw)
    tri, gtri = run(TRITON, logits, targets, **kw)
    assert_close_out(tri, ref)
    assert gtri.dtype == logits.dtype
    torch.testing.assert_close(gtri.float(), gref.float(), atol=grad_atol, rtol=grad_rtol)
    return tri, gtri


needs_triton = pytest.mark.skipif(TRITON is None, reason="needs CUDA or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_matches_reference(case):
    make_x, make_t, kw = CASES[case]
    torch.manual_seed(0)
    _triton_vs_reference(make_x(), make_t(), **kw)


@needs_triton
def test_triton_multi_tile_and_ragged():
    """Several forward/backward tiles and region chunks per mask; a ragged list mixing up- and downsampling."""
    torch.manual_seed(0)
    logits = torch.randn(2, 40, 50) * 3
    _triton_vs_reference(logits, torch.rand(2, 160, 200) > 0.5)
    ragged = [torch.rand(13, 101) > 0.5, torch.rand(90, 37)]
    tri, _ = _triton_vs_reference(logits, ragged)
    # the ragged batch equals each mask computed alone
    for i, t in enumerate(ragged):
        alone = mask_loss(logits[i:i + 1], [t], backend="torch")
        torch.testing.assert_close(tri.dice[i:i + 1], alone.dice, atol=2e-6, rtol=2e-5)


@needs_triton
@pytest.mark.parametrize("shape,kw", [
    ((2, 8, 8, 32, 32), {}),  # 4x: SAM2's 256 -> 1024 in small
    ((2, 20, 6, 40, 48), {"gamma": 0.5, "alpha": -1.0}),  # 2x rows, 8x cols; several programs along rows
    ((1, 3, 17, 48, 34), {"gamma": 1.0}),  # 16x rows, 2x cols; programs along columns, 1-3 px edges
    ((1, 48, 40, 192, 80), {}),  # 4x rows, 2x cols: programs inside the image too (no bounds masks), see below
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_even_factor_kernels(monkeypatch, shape, kw, dtype):
    """The opt-in block kernels for exact power-of-two upsampling give the reference losses and gradient (hard and
    soft targets, extreme logits, targets out of range caught), and are only taken for such batches."""
    from dualloop.kernels import mask_loss_triton as mlt

    monkeypatch.setattr(mlt, "EVEN_PATH", True)
    n, h, w, H, W = shape
    if h >= 2 * mlt.EVEN_BA:  # this shape has programs of both kinds, in both kernels (_even_interior's test)
        ba, bb = mlt.EVEN_BA, mlt.EVEN_BB
        fwd = [a0 > 0 and a0 + ba <= h and b0 > 0 and b0 + bb <= w
               for a0 in range(0, h + 1, ba) for b0 in range(0, w + 1, bb)]
        bwd = [a0 > 0 and a0 + ba <= h and b0 > 0 and b0 + bb <= w
               for a0 in range(0, h, ba - 1) for b0 in range(0, w, bb - 1)]
        assert any(fwd) and not all(fwd) and any(bwd) and not all(bwd)
    torch.manual_seed(0)
    logits = (torch.randn(n, h, w) * 3).to(dtype)
    logits[0, 0, :2] = torch.tensor([100.0, -100.0], dtype=dtype)
    targets = torch.rand(n, H, W) > 0.5
    if dtype == torch.bfloat16:  # both accumulate in fp32; the final rounding to bf16 may differ by one step
        kw = {**kw, "grad_atol": 1e-5, "grad_rtol": 1e-2}
    calls = []
    for name in ("_fwd_even_kernel", "_bwd_even_kernel"):
        kernel = getattr(mlt, name)
        monkeypatch.setattr(mlt, name, type("Spy", (), {
            "__getitem__": lambda self, grid, name=name, kernel=kernel: (calls.append(name), kernel[grid])[1]})())
    _triton_vs_reference(logits, targets, **kw)
    _triton_vs_reference(logits, torch.rand(n, H, W), **kw)  # soft targets
    assert calls == ["_fwd_even_kernel", "_bwd_even_kernel"] * 2
    with pytest.raises(ValueError, match="targets"):
        mask_loss(logits, torch.full((n, H, W), 1.5), backend=TRITON)
    calls.clear()
    _triton_vs_reference(logits, torch.rand(n, H + 1, W) > 0.5, **kw)  # not an exact factor: the general kernels
    assert calls == []


@needs_triton
def test_triton_forward_several_programs_per_mask_and_whole_tiles(monkeypatch):
    """The GPU path's forward: P programs per mask each looping over tiles; grids that are whole tiles (no masks)."""
    from dualloop.kernels import mask_loss_triton as mlt

    monkeypatch.setattr(mlt, "_forward_programs_per_mask", lambda max_tiles, n, device: min(max_tiles, 3))
    monkeypatch.setattr(mlt, "FINALIZE_BP", 2)  # the device-side finalize adds the partials in several steps
    torch.manual_seed(0)
    big = (2 * mlt.FWD_BY, 3 * mlt.FWD_BX)  # whole tiles: EVEN path
    _triton_vs_reference(torch.randn(2, 9, 14) * 2, torch.rand(2, *big) > 0.5)
    _triton_vs_reference(torch.randn(2, 9, 14) * 2, [torch.rand(*big), torch.rand(70, 50)])


@needs_triton
def test_triton_batches_beyond_the_grid_limit_run_in_slices(monkeypatch):
    from dualloop.kernels import _fused

    monkeypatch.setattr(_fused, "MAX_MASKS_PER_LAUNCH", 2)
    torch.manual_seed(0)
    _triton_vs_reference(torch.randn(5, 6, 7), torch.rand(5, 13, 11) > 0.5)
    _triton_vs_reference(torch.randn(3, 6, 7), [torch.rand(13, 11), torch.rand(4, 5), torch.rand(6, 7) > 0.5])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_inputs(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(2, 8, 7) * 3).to(dtype)
    targets = torch.rand(2, 29, 33).to(dtype)
    ref, gref = run("torch", logits, targets)
    tri, gtri = run(TRITON, logits, targets)
    assert_close_out(tri, ref)
    assert gtri.dtype == dtype and gref.dtype == dtype
    # both accumulate in fp32; the only difference is the final rounding to the logits' dtype
    torch.testing.assert_close(gtri.float(), gref.float(), atol=1e-5, rtol=1e-2)


@pytest.mark.parametrize("backend", ["torch"] + ([TRITON] if TRITON else []))
@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_all_zero_and_all_one_targets_with_extreme_logits(backend, fill):
    # -90, not -100: ATen's CPU resize rounds differently from the kernels' (GPU ATen) formula, and an interpolated
    # value of exactly 0 would make the iou predicate x > 0 a coin toss
    logits = torch.tensor([[[100.0, -90.0, 100.0], [-90.0, 100.0, -90.0]]]).repeat(2, 1, 1)
    logits[1] = -logits[1]
    targets = torch.full((2, 9, 7), fill)
    out, grad = run(backend, logits, targets, gamma=0.5)
    for v in out:
        assert torch.isfinite(v).all()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    if fill == 0.0:
        assert out.iou.tolist() == [0.0, 0.0]  # no target pixels: iou is 0, not NaN
    if backend != "torch":
        ref, gref = run("torch", logits, targets, gamma=0.5)
        assert_close_out(out, ref, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(grad, gref, atol=1e-6, rtol=1e-4)


@needs_triton
def test_triton_backward_is_deterministic_and_single_losses_backprop():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 10, 12), torch.rand(2, 37, 41) > 0.5
    grads = []
    for _ in range(2):
        x = logits.clone().requires_grad_(True)
        mask_loss(x, targets, backend=TRITON).focal.sum().backward()  # bce/dice grads are None
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
    x = logits.clone().requires_grad_(True)
    mask_loss(x, targets, backend="torch").focal.sum().backward()
    torch.testing.assert_close(grads[0], x.grad, atol=1e-8, rtol=1e-4)


@needs_triton
def test_triton_backward_reads_upstream_gradients_of_any_strides():
    """The backward kernels read each loss's upstream gradient in place: a sum's (an expanded scalar, stride 0) next
    to per-mask weights (stride 1) and a strided view."""
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 6, 5) * 2, torch.rand(3, 17, 13) > 0.5
    w = torch.tensor([[0.5, 9.0], [2.0, 9.0], [3.5, 9.0]])[:, 0]  # stride 2
    grads = []
    for backend in ("torch", TRITON):
        x = logits.clone().requires_grad_(True)
        out = mask_loss(x, targets, backend=backend)
        (out.focal.sum() + (torch.arange(3.0) * out.bce).sum() + (w * out.dice).sum()).backward()
        grads.append(x.grad)
    assert w.stride(0) == 2
    torch.testing.assert_close(grads[1], grads[0], atol=1e-7, rtol=1e-4)


def test_auto_on_cpu_is_the_reference_and_iou_has_no_grad():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 6, 6, requires_grad=True), torch.rand(2, 12, 12) > 0.5
    a = mask_loss(logits, targets)
    b = mask_loss(logits, targets, backend="torch")
    assert_close_out(a, b, atol=0, rtol=0)
    assert not a.iou.requires_grad and a.focal.requires_grad


def test_empty_batch_tensor_gives_empty_losses():
    out = mask_loss(torch.zeros(0, 4, 4), torch.zeros(0, 8, 8), backend="torch")
    assert all(v.shape == (0,) for v in out)


BAD_INPUTS = [
    ("N mismatch", lambda: (torch.zeros(2, 4, 4), torch.zeros(3, 8, 8)), {}, "targets"),
    ("logits dims", lambda: (torch.zeros(4, 4), torch.zeros(1, 8, 8)), {}, "logits"),
    ("targets dims", lambda: (torch.zeros(1, 4, 4), torch.zeros(8, 8)), {}, "targets"),
    ("ragged dims", lambda: (torch.zeros(1, 4, 4), [torch.zeros(1, 8, 8)]), {}, "targets[0]"),
    ("empty list", lambda: (torch.zeros(1, 4, 4), []), {}, "targets"),
    ("nan logits", lambda: (torch.full((1, 4, 4), float("nan")), torch.zeros(1, 8, 8)), {}, "logits"),
    ("inf logits", lambda: (torch.full((1, 4, 4), float("inf")), torch.zeros(1, 8, 8)), {}, "logits"),
    ("one nan logit", lambda: (torch.zeros(2, 4, 4).index_put_((torch.tensor(1), torch.tensor(2), torch.tensor(3)),
                                                               torch.tensor(float("nan"))), torch.zeros(2, 8, 8)),
     {}, "logits"),
    ("-inf logit, ragged", lambda: (torch.zeros(2, 4, 4).index_put_((torch.tensor(0), torch.tensor(0), torch.tensor(0)),
                                                                   torch.tensor(float("-inf"))),
                                    [torch.zeros(8, 8), torch.zeros(5, 7)]), {}, "logits"),
    # bilinear downsampling 16x16 -> 3x3 never reads most logits: they are still checked
    ("inf logit, downsampling", lambda: (torch.zeros(1, 16, 16).index_put_(
        (torch.tensor(0), torch.tensor(7), torch.tensor(8)), torch.tensor(float("inf"))), torch.zeros(1, 3, 3)),
     {}, "logits"),
    ("nan logits (resize=targets)", lambda: (torch.full((1, 4, 4), float("nan")), torch.zeros(1, 8, 8)),
     {"resize": "targets"}, "logits"),
    ("finite logits overflowing the sums", lambda: (torch.full((1, 4, 4), 3e38), torch.zeros(1, 8, 8)), {},
     "logits"),
    ("targets > 1", lambda: (torch.zeros(1, 4, 4), torch.full((1, 8, 8), 1.5)), {}, "targets"),
    ("targets < 0", lambda: (torch.zeros(1, 4, 4), torch.full((1, 8, 8), -0.1)), {}, "targets"),
    ("uint8 target 2", lambda: (torch.zeros(1, 4, 4), torch.full((1, 8, 8), 2, dtype=torch.uint8)), {}, "targets"),
    ("nan targets", lambda: (torch.zeros(1, 4, 4), torch.full((1, 8, 8), float("nan"))), {}, "targets"),
    ("bad targets (resize=targets)", lambda: (torch.zeros(1, 4, 4), torch.full((1, 8, 8), 3.0)),
     {"resize": "targets"}, "targets"),
    ("unknown resize", lambda: (torch.zeros(1, 4, 4), torch.zeros(1, 8, 8)), {"resize": "bicubic"}, "resize"),
    ("size mismatch with none", lambda: (torch.zeros(1, 4, 4), torch.zeros(1, 8, 8)), {"resize": "none"},
     "targets"),
    ("unknown backend", lambda: (torch.zeros(1, 4, 4), torch.zeros(1, 8, 8)), {"backend": "cudnn"}, "backend"),
    ("alpha > 1", lambda: (torch.zeros(1, 4, 4), torch.zeros(1, 8, 8)), {"alpha": 1.5}, "alpha"),
    ("gamma < 0", lambda: (torch.zeros(1, 4, 4), torch.zeros(1, 8, 8)), {"gamma": -1.0}, "gamma"),
    ("dice_smooth nan", lambda: (torch.zeros(1, 4, 4), torch.zeros(1, 8, 8)), {"dice_smooth": float("nan")},
     "dice_smooth"),
    ("int64 targets", lambda: (torch.zeros(1, 4, 4), torch.zeros(1, 8, 8, dtype=torch.int64)), {}, "targets"),
    ("int logits", lambda: (torch.zeros(1, 4, 4, dtype=torch.int32), torch.zeros(1, 8, 8)), {}, "logits"),
]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter on inf logits
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # interpreter on huge logits
@pytest.mark.parametrize("backend", ["torch"] + ([TRITON] if TRITON else []))
@pytest.mark.parametrize("name,make,kw,arg", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_argument(backend, name, make, kw, arg):
    logits, targets = make()
    kw = {"backend": backend, **kw}
    with pytest.raises(ValueError) as err:
        mask_loss(logits, targets, **kw)
    assert str(err.value).startswith(arg) or f"{arg} " in str(err.value) or f"'{arg}'" in str(err.value), err.value


def test_unavailable_backends_say_what_is_missing(monkeypatch):
    logits, targets = torch.zeros(1, 4, 4), torch.zeros(1, 8, 8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        mask_loss(logits, targets, backend="triton")
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        mask_loss(logits, targets, backend="cuda")

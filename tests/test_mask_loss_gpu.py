"""Mask-loss kernels on a GPU (run by `make gpu-check`): Triton and the CUDA extension vs the torch reference at real
sizes, determinism, and the peak-memory budget of the fused backward."""
import pytest
import torch
from dualloop.kernels import BackendUnavailableError, mask_loss

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _cuda_backend_or_skip():
    from dualloop.kernels import cuda_ext

    try:
        cuda_ext.load_extension()
    except BackendUnavailableError as e:
        if "no CUDA toolkit" in str(e):
            pytest.skip(str(e))
        raise
    return "cuda"


@pytest.fixture(params=["triton", "cuda"])
def backend(request):
    return _cuda_backend_or_skip() if request.param == "cuda" else "triton"


def run(backend, logits, targets, seed=1, **kw):
    x = logits.detach().clone().requires_grad_(True)
    out = mask_loss(x, targets, backend=backend, **kw)
    g = torch.Generator(device=DEV).manual_seed(seed)
    wf, wb, wd = torch.rand(3, logits.shape[0], generator=g, device=DEV) + 0.5
    (wf * out.focal + wb * out.bce + wd * out.dice).sum().backward()
    return out, x.grad


def check(backend, logits, targets, **kw):
    ref, gref = run("torch", logits, targets, **kw)
    out, grad = run(backend, logits, targets, **kw)
    for name in ("focal", "bce", "dice"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), atol=1e-5, rtol=2e-4,
                                   msg=lambda m, name=name: f"{backend} {name}: {m}")
    # iou: the predicate x > 0 may flip where the interpolated logit is within rounding of 0
    torch.testing.assert_close(out.iou, ref.iou, atol=1e-3, rtol=0)
    assert grad.dtype == logits.dtype
    scale = gref.float().abs().max().item()
    # both accumulate in fp32; half dtypes differ by the final rounding (an ulp: 2^-8 bf16, 2^-11 fp16)
    rtol = {torch.bfloat16: 1.6e-2, torch.float16: 4e-3}.get(logits.dtype, 2e-3)
    torch.testing.assert_close(grad.float(), gref.float(), atol=2e-3 * scale + 1e-9, rtol=rtol,
                               msg=lambda m: f"{backend} grad: {m}")
    return out, grad


def _inputs(n, h, w, H, W, dtype=torch.float32, soft=False, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    logits = (torch.randn(n, h, w, generator=g, device=DEV) * 4).to(dtype)
    targets = torch.rand(n, H, W, generator=g, device=DEV)
    return logits, (targets if soft else targets > 0.5)


def test_sam2_sizes(backend):
    check(backend, *_inputs(4, 256, 256, 1024, 1024))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_soft_targets(backend, dtype):
    logits, targets = _inputs(3, 64, 48, 250, 333, dtype=dtype, soft=True)
    check(backend, logits, targets.to(dtype))


@pytest.mark.parametrize("resize,size", [("logits", (31, 17)), ("logits", (40, 20)), ("targets", (100, 90)),
                                         ("none", (96, 80))])
def test_modes_and_odd_sizes(backend, resize, size):
    logits, targets = _inputs(3, 96, 80, *size)
    check(backend, logits, targets.to(torch.uint8), resize=resize, gamma=0.5, alpha=-1.0)


def test_ragged_mixed_sizes_one_batch(backend):
    g = torch.Generator(device=DEV).manual_seed(0)
    sizes = [(1024, 1024), (720, 1280), (37, 250), (256, 256), (100, 60)]
    logits = torch.randn(len(sizes), 256, 256, generator=g, device=DEV) * 3
    targets = [torch.rand(s, generator=g, device=DEV) > 0.5 for s in sizes]
    check(backend, logits, targets)
    check(backend, logits, targets, resize="targets")


def test_extreme_logits_and_constant_targets(backend):
    logits = torch.where(torch.rand(4, 32, 32, device=DEV) > 0.5, 100.0, -100.0)
    targets = torch.stack([torch.zeros(128, 128, device=DEV), torch.ones(128, 128, device=DEV)] * 2)
    out, grad = check(backend, logits, targets, gamma=0.5)
    assert all(torch.isfinite(v).all() for v in out) and torch.isfinite(grad).all()


def test_backward_is_bitwise_deterministic(backend):
    logits, targets = _inputs(8, 256, 256, 1024, 1024)
    grads = [run(backend, logits, targets)[1] for _ in range(3)]
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize("dtype,size,kw", [(torch.float32, (256, 256, 1024, 1024), {}),
                                           (torch.bfloat16, (96, 40, 192, 320), {"gamma": 0.5, "alpha": -1.0})])
def test_even_factor_kernels_on_the_gpu(monkeypatch, dtype, size, kw):
    """The opt-in block kernels (DUALLOOP_TRITON_EVEN) compiled for the GPU: reference values, and as
    deterministic as the default."""
    from dualloop.kernels import mask_loss_triton as mlt

    monkeypatch.setattr(mlt, "EVEN_PATH", True)
    logits, targets = _inputs(4, *size, dtype=dtype)
    check("triton", logits, targets, **kw)
    grads = [run("triton", logits, targets, **kw)[1] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def test_cuda_matches_triton_closely():
    _cuda_backend_or_skip()
    logits, targets = _inputs(8, 256, 256, 720, 1280)
    a, ga = run("triton", logits, targets)
    b, gb = run("cuda", logits, targets)
    for name in ("focal", "bce", "dice"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ga, gb, atol=1e-3 * ga.abs().max().item(), rtol=1e-3)


def test_auto_uses_a_fused_backend_and_bad_values_raise():
    logits, targets = _inputs(2, 16, 16, 64, 64)
    out = mask_loss(logits, targets)  # auto
    assert out.focal.is_cuda
    with pytest.raises(ValueError, match="logits"):
        mask_loss(torch.full_like(logits, float("nan")), targets, backend="triton")
    with pytest.raises(ValueError, match="targets"):
        mask_loss(logits, targets.float() * 2, backend="triton")


def test_peak_memory_within_budget(backend):
    """fwd+bwd of 64 masks 256^2 -> 1024^2: at most 1.2 x the fp32 low-res gradient + 1 MB of extra memory."""
    logits, targets = _inputs(64, 256, 256, 1024, 1024)
    x = logits.clone().requires_grad_(True)
    for _ in range(2):  # warm up (kernel compilation, allocator)
        x.grad = None
        o = mask_loss(x, targets, backend=backend)
        (20 * o.focal + o.dice).sum().backward()
    x.grad = None
    del o
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    o = mask_loss(x, targets, backend=backend)
    (20 * o.focal + o.dice).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    budget = 1.2 * x.numel() * 4 + 2**20
    assert extra <= budget, f"{backend}: peak extra {extra / 2**20:.1f} MiB > budget {budget / 2**20:.1f} MiB"

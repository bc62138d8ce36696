"""Device placement on the GPU path: what only shows when the model's tensors live on another device than the CPU
tensors around them (data, prompt ids, a CPU torch.Generator). Without CUDA the "other device" is `meta` where an
op allows it; the tests marked gpu check the real thing in `make gpu-check`."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dualloop.eval.metrics import IoUMeter
from dualloop.model.composite import DualLoopModel
from dualloop.model.sampling import GumbelSampler, SuppressTokens


def test_buffers_follow_the_accelerator(monkeypatch):
    """ZeRO-3 builds place what zero.Init creates on the accelerator; buffers made outside it must follow."""
    import deepspeed.accelerator

    from dualloop.model.build import _buffers_to_local_device

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator",
                        lambda: SimpleNamespace(current_device_name=lambda: "meta"))
    m = nn.Module()
    m.register_buffer("mean", torch.zeros(3), persistent=False)
    m.child = nn.Module()
    m.child.register_buffer("ids", torch.arange(4))
    m.child.register_buffer("none", None)
    _buffers_to_local_device(m)
    assert m.mean.device.type == "meta" and m.child.ids.device.type == "meta" and m.child.none is None
    assert m.mean.dtype == torch.float32 and m.child.ids.dtype == torch.long  # device only, dtypes kept


def test_suppress_tokens_moves_its_ids_once():
    proc = SuppressTokens(torch.tensor([1, 3]), vocab=8)
    out = proc(None, torch.zeros(2, 10, device="meta"))
    assert out.device.type == "meta" and proc.banned.device.type == "meta"  # kept there: no copy per token
    cpu = SuppressTokens(torch.tensor([1, 3]), vocab=8)(None, torch.zeros(2, 10))
    assert torch.isinf(cpu[:, [1, 3, 8, 9]]).all() and torch.isfinite(cpu[:, [0, 2, 4, 5, 6, 7]]).all()


def test_gumbel_sampler_cpu_draws_unchanged():
    """On the generator's own device the noise is the generator's plain draw (reproducible as before)."""
    scores = torch.randn(3, 11)
    out = GumbelSampler(1.0, 0, torch.Generator().manual_seed(5))(None, scores)
    u = torch.rand(scores.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, scores - torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7))))


# ------------------------------------------------------------------------------------------------ on the GPU
class _Tokenizer:
    unk_token_id = 0

    def __len__(self):
        return 8

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.mark.gpu
def test_gumbel_sampler_cpu_generator_with_cuda_scores():
    scores = torch.randn(4, 1000, device="cuda")
    draws = []
    for _ in range(2):
        sampler = GumbelSampler(1.0, 50, torch.Generator().manual_seed(7))
        draws.append(torch.stack([sampler(None, scores) for _ in range(3)]))
    assert draws[0].device.type == "cuda" and torch.equal(draws[0], draws[1])  # reproducible from the CPU seed
    assert not torch.equal(draws[0][0], draws[0][1])  # fresh noise per token
    assert sampler._device_generator is not None and sampler._device_generator.device.type == "cuda"


@pytest.mark.gpu
def test_suppress_tokens_and_finish_captions_on_cuda():
    scores = SuppressTokens(torch.tensor([1, 3]), vocab=8)(None, torch.zeros(2, 10, device="cuda"))
    assert torch.isinf(scores[:, [1, 3, 8, 9]]).all()
    tokenizer = _Tokenizer()
    fake = SimpleNamespace(eos_token_id=2, pad_token_id=0, tokenizer=tokenizer)
    gen = torch.tensor([[5, 6, 2, 7], [4, 4, 4, 4]], device="cuda")
    out = DualLoopModel._finish_captions(fake, gen)
    assert out.lengths.tolist() == [2, 4] and out.ids.device.type == "cpu" and out.texts == ["5 6", "4 4 4 4"]


@pytest.mark.gpu
def test_iou_meter_cuda_logits_cpu_targets():
    logits = torch.full((1, 4, 4), -5.0, device="cuda")
    logits[0, :2, :2] = 5.0
    target = torch.zeros(8, 8, dtype=torch.uint8)
    target[:4, :4] = 1
    ious = IoUMeter().add_logits(logits, [target], ["a"])
    assert ious[0] > 0.5

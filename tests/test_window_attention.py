"""window_attention.batch_chunk_attention: the Qwen-VL towers' per-chunk attention (Qwen2.5-VL's windows, each
image) as one SDPA call per chunk length gives transformers' own outputs and gradients, with fewer calls, also
under activation checkpointing (whose recompute in the backward runs it again)."""
import pytest
import torch

from dualloop.config import ModelConfig
from dualloop.model import build_model
from dualloop.model.window_attention import batch_chunk_attention

# 4 to 16 merged tokens per image; the tiny Qwen2.5-VL tower's windows are 2 x 2 merged tokens (56 px)
BUDGET = dict(min_pixels=56 * 56, max_pixels=112 * 112)


def _tower_inputs(model, sizes):
    g = torch.Generator().manual_seed(3)
    imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    patches, grids = zip(*(model.vision._patches(img) for img in imgs))
    return torch.cat(patches), torch.tensor(grids)


def _transformers_own(tower):
    """The tower as transformers runs it: the batched forward the model was built with taken out."""
    for block in tower.blocks:
        if "forward" in vars(block.attn):
            del block.attn.forward
    return tower


def _run(tower, px, thw, calls):
    """Tower output, d(output)/d(input) and the first qkv weight's gradient, counting SDPA calls (forward, and the
    recompute of activation checkpointing in the backward) into `calls`."""
    tower.zero_grad()
    x = px.clone().requires_grad_(True)
    out = tower(x, grid_thw=thw)
    out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    out.pow(2).sum().backward()
    return out.detach(), x.grad, tower.blocks[0].attn.qkv.weight.grad.clone()


@pytest.fixture
def sdpa_calls(monkeypatch):
    calls = [0]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("preset, sizes, calls_per_tower", [
    # 84 x 140 px -> 3 x 5 merged tokens: 6 windows of 16, 8 and 4 patches (3 lengths) in the window layer, one
    # image in the full layer; 56 x 112 -> 2 x 4: 2 windows of 16; together 8 windows, 3 lengths, and 2 images of
    # 2 lengths: 3 + 2 batched calls instead of 8 + 2
    ("tiny-qwen2_5_vl", [(96, 160), (56, 112)], (8 + 2, 3 + 2)),
    # Qwen3-VL attends within each image: two of the same size and one other, in both layers
    ("tiny-qwen3_vl", [(96, 160), (96, 160), (64, 64)], (3 * 2, 2 * 2)),
])
def test_batched_chunks_give_the_same_outputs_and_gradients_in_fewer_calls(preset, sizes, calls_per_tower,
                                                                           checkpointed, sdpa_calls):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=preset, dtype="float32", **BUDGET))
    tower = _transformers_own(model.vision.tower).train()
    tower.requires_grad_(True)
    if checkpointed:  # non-reentrant, as the trainer enables it: the backward recomputes each block
        if hasattr(tower, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert tower.config._attn_implementation == "sdpa" and len(tower.blocks) == 2
    px, thw = _tower_inputs(model, sizes)
    theirs = _run(tower, px, thw, sdpa_calls)
    per_pass = calls_per_tower[0] * (2 if checkpointed else 1)
    assert sdpa_calls[0] == per_pass
    sdpa_calls[0] = 0
    assert batch_chunk_attention(tower) == 2 and batch_chunk_attention(tower) == 2  # idempotent
    ours = _run(tower, px, thw, sdpa_calls)
    assert sdpa_calls[0] == calls_per_tower[1] * (2 if checkpointed else 1)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_model_is_built_with_it_and_other_attention_implementations_are_left_alone():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny-qwen2_5_vl", dtype="float32", **BUDGET))
    tower = model.vision.tower
    assert all("forward" in vars(block.attn) for block in tower.blocks)
    _transformers_own(tower).config._attn_implementation = "eager"
    assert batch_chunk_attention(tower) == 0
    assert all("forward" not in vars(block.attn) for block in tower.blocks)

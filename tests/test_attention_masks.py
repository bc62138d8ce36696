"""Padded batches reach the LLM with a prepared mask in which padding queries see themselves: no attention row is
empty (torch 2.11's cuDNN attention backward returns NaN gradients for such rows, pytorch#196678), and every real
token's output, loss and gradient are those of transformers' own mask."""
import pytest
import torch

import dualloop.model.composite as composite
from dualloop.config import LoraConfig, ModelConfig
from dualloop.model import build_model
from dualloop.model.kv_decoding import allowed_keys

torch.set_num_threads(1)


def test_allowed_keys_causal_for_tokens_self_for_padding():
    keep = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    allowed = allowed_keys(keep, 5)
    assert allowed.any(-1).all()  # no empty row
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    for b in range(3):
        for q in range(5):  # tokens: the causal non-padding slots (themselves included); padding: also itself
            assert torch.equal(allowed[b, q], (causal[q] & keep[b]) | (torch.arange(5) == q)), (b, q)
    assert allowed_keys(keep, 3).shape == (3, 3, 5)  # queries may be fewer than keys (a cache being filled)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny", lora=LoraConfig(r=8, alpha=16, dropout=0.0))).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8) for _ in range(3)]
    masks = []
    for i in range(3):  # regions of 1, several and many cells: caption prompts of different lengths
        m = torch.zeros(64, 64, dtype=torch.uint8)
        m[: 4 + 24 * i, : 4 + 20 * i] = 1
        masks.append(m)
    return images, masks


def _losses_and_grads(model, images, masks):
    captions = ["a red circle", "the big blue square on the left of the image", "x"]
    model.zero_grad(set_to_none=True)
    cap = model.caption_loss(images, masks, captions)
    ids, lengths = model.encode_captions(captions)
    ground = model.ground(images, caption_ids=ids, caption_lengths=lengths)
    (cap.sum() + ground.logits.float().pow(2).mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return cap.detach(), ground.logits.detach(), grads


def _mask_dims_seen(model, monkeypatch) -> list[int]:
    """The number of dims of each attention mask the LLM is called with from now on."""
    seen = []
    forward = model.language_model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["attention_mask"].dim())
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.language_model, "forward", spy)
    return seen


def test_prepared_mask_changes_no_real_output_or_gradient(model, monkeypatch):
    images, masks = _batch()
    seen = _mask_dims_seen(model, monkeypatch)
    cap, logits, grads = _losses_and_grads(model, images, masks)
    assert seen and set(seen) == {4}  # padded batches: the prepared mask
    monkeypatch.setattr(composite, "prepared_mask_unsupported", lambda lm: "transformers' own mask, for reference")
    seen.clear()
    ref_cap, ref_logits, ref_grads = _losses_and_grads(model, images, masks)
    assert set(seen) == {2}
    torch.testing.assert_close(cap, ref_cap, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_unpadded_batch_keeps_the_plain_mask(model, monkeypatch):
    seen = _mask_dims_seen(model, monkeypatch)
    images, masks = _batch()
    ids, lengths = model.encode_captions(["a b", "c d", "e f"])  # same length: no padding anywhere
    with torch.no_grad():
        model.ground(images, caption_ids=ids, caption_lengths=lengths)
    assert seen == [2]  # transformers may then take its causal fast path


def _sdpa_on_padded_batch(kind: str) -> list[torch.Tensor]:
    """pytorch#196678's case on the GPU (bf16, 320 tokens, left padding): outputs and q/k/v gradients of SDPA with
    transformers' kind of mask (padding rows see nothing) or ours (they see themselves)."""
    import torch.nn.functional as F

    length = 320
    keep = torch.ones(2, length, dtype=torch.bool, device="cuda")
    keep[0, :40] = False  # left padding in the first row
    causal = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()
    mask = (causal[None] & keep[:, None, :])[:, None] if kind == "transformers" else allowed_keys(keep, length)[:, None]
    q, k, v = (torch.randn(2, 14, length, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    (out[1].float().sum() + out[0, :, 40:].float().sum()).backward()  # a loss on real tokens only, as in training
    return [out, q.grad, k.grad, v.grad]


@pytest.mark.gpu
def test_our_padded_attention_has_finite_outputs_and_gradients():
    build_model(ModelConfig(preset="tiny"))  # the defaults: cuDNN attention off, process-wide
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    for t in _sdpa_on_padded_batch("ours"):
        assert torch.isfinite(t).all()


@pytest.mark.gpu
def test_transformers_padded_attention_under_our_defaults():
    """Whether the default backends also survive empty padding rows (what an LLM without a prepared mask, e.g. with
    flash-attention-2 or sliding windows, still gets): NaN here would reach every weight through the pad positions."""
    build_model(ModelConfig(preset="tiny"))
    for t in _sdpa_on_padded_batch("transformers"):
        assert torch.isfinite(t).all()


@pytest.mark.gpu
def test_prepared_mask_on_cuda_matches_the_plain_one(monkeypatch):
    torch.manual_seed(0)
    m = build_model(ModelConfig(preset="tiny", lora=LoraConfig(r=8, alpha=16, dropout=0.0))).to("cuda").eval()
    images, masks = _batch()
    cap, logits, grads = _losses_and_grads(m, images, masks)
    monkeypatch.setattr(composite, "prepared_mask_unsupported", lambda lm: "reference")
    ref_cap, ref_logits, ref_grads = _losses_and_grads(m, images, masks)
    torch.testing.assert_close(cap, ref_cap, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)

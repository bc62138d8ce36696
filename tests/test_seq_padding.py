"""model.pad_to_multiple_of: LLM sequences rounded up to a multiple (fewer distinct shapes on a GPU) with masked pads,
so captions, caption losses and grounding are those of the unpadded model."""
import pytest
import torch

from dualloop.config import LoraConfig, ModelConfig
from dualloop.model import build_model
from dualloop.model.prompts import round_up

torch.set_num_threads(1)


def _model(multiple):
    torch.manual_seed(0)
    m = build_model(ModelConfig(preset="tiny", lora=LoraConfig(r=8, alpha=16, dropout=0.0),
                                pad_to_multiple_of=multiple))
    return m.eval()


def _batch():
    g = torch.Generator().manual_seed(3)
    sizes = ((64, 80), (96, 96), (70, 64))
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    masks = []
    for i, (h, w) in enumerate(sizes):  # regions of different sizes: prompts of different lengths
        m = torch.zeros(h, w, dtype=torch.uint8)
        m[: h // (1 + i), : w // (1 + 2 * i)] = 1
        masks.append(m)
    return images, masks


@pytest.fixture(scope="module")
def models():
    plain, padded = _model(1), _model(32)
    padded.load_state_dict(plain.state_dict())
    return plain, padded


def test_round_up():
    assert [round_up(n, 32) for n in (1, 31, 32, 33, 64)] == [32, 32, 32, 64, 64]
    assert round_up(7, 1) == 7


def test_auto_pads_on_cuda_only(models):
    assert _model(None).pad_multiple == 1  # CPU: no per-shape costs to save, padding would only add work
    assert models[1].pad_multiple == 32


def test_prompts_are_padded_to_the_multiple(models):
    _, padded = models
    caption = padded.prompts.caption_prompts([1, 7, 30], 32)
    ground = padded.prompts.ground_prompts([[5], [5, 6, 7, 8]], 32)
    for batch in (caption, ground):
        assert batch.ids.shape[1] % 32 == 0
        assert (batch.attention_mask.sum(1) < batch.ids.shape[1]).all()  # every row got left pads
    plain = padded.prompts.ground_prompts([[5], [5, 6, 7, 8]])
    extra = ground.ids.shape[1] - plain.ids.shape[1]
    assert extra > 0 and torch.equal(ground.seg_pos, plain.seg_pos + extra)


def test_padding_changes_no_output(models):
    plain, padded = models
    images, masks = _batch()
    with torch.no_grad():
        a = plain.caption(images, masks, max_new_tokens=6)
        b = padded.caption(images, masks, max_new_tokens=6)
        assert torch.equal(a.ids, b.ids) and a.texts == b.texts
        captions = ["a red circle", "the big blue square on the left", "x"]
        torch.testing.assert_close(padded.caption_loss(images, masks, captions),
                                   plain.caption_loss(images, masks, captions), rtol=1e-5, atol=1e-5)
        ids, lengths = plain.encode_captions(captions)
        ga = plain.ground(images, caption_ids=ids, caption_lengths=lengths)
        gb = padded.ground(images, caption_ids=ids, caption_lengths=lengths)
    torch.testing.assert_close(gb.logits, ga.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb.iou_pred, ga.iou_pred, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [0, -4, True, 2.5])
def test_bad_multiple_is_an_error_naming_the_key(bad):
    with pytest.raises(ValueError, match="model.pad_to_multiple_of"):
        build_model(ModelConfig(preset="tiny", pad_to_multiple_of=bad))

"""Dynamic tiling of the VLM input (`model.max_tiles`): InternVL's grid choice, its tiles and thumbnail, and the model
with several tiles per image (image tokens, region cells of the thumbnail, captioning and grounding)."""
import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from dualloop.config import LoraConfig, ModelConfig
from dualloop.model import build_model
from dualloop.model.composite import IMAGENET_MEAN, IMAGENET_STD
from dualloop.model.region import region_cells
from dualloop.model.tiles import tile_count, tile_grid, tile_pixels

torch.set_num_threads(1)


def _transformers_canvas():
    """transformers' InternVL ("-hf") processor's grid choice, where this version has it."""
    for module in ("transformers.models.got_ocr2.image_processing_pil_got_ocr2",
                   "transformers.models.got_ocr2.image_processing_got_ocr2",
                   "transformers.models.got_ocr2.image_processing_got_ocr2_fast"):
        try:
            return importlib.import_module(module).get_optimal_tiled_canvas
        except (ImportError, AttributeError):
            continue
    return None


def test_tile_grid_is_internvls_choice():
    # COCO's 640x480 (RefCOCO): the 4x3 grid, 12 tiles + the thumbnail = 13 x 256 image tokens in Sa2VA
    assert tile_grid(480, 640, 12, 448) == (4, 3) and tile_count(480, 640, 12, 448) == 13
    # square: the largest square grid whose area is under twice the image's
    assert tile_grid(1000, 1000, 12, 448) == (3, 3)
    assert tile_grid(400, 400, 12, 448) == (1, 1) and tile_count(400, 400, 12, 448) == 1
    assert tile_grid(100, 1000, 12, 448) == (10, 1)  # panorama
    assert tile_grid(480, 640, 1, 448) == (1, 1) and tile_count(480, 640, 1, 448) == 1
    with pytest.raises(ValueError, match="max_tiles"):
        tile_grid(480, 640, 0, 448)
    canvas = _transformers_canvas()
    if canvas is None:
        pytest.skip("this transformers has no GotOcr2 get_optimal_tiled_canvas to compare with")
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(16, 2400, size=(300, 2))]
    sizes += [(480, 640), (640, 480), (448, 448), (896, 448), (1344, 448), (427, 640), (1500, 2250)]
    for max_tiles in (2, 6, 12):
        for h, w in sizes:
            assert tile_grid(h, w, max_tiles, 448) == tuple(canvas((h, w), (448, 448), 1, max_tiles)), (h, w)


def _pil_tiles(img: torch.Tensor, cols: int, rows: int, size: int) -> torch.Tensor:
    """InternVL's dynamic_preprocess on a PIL image: BICUBIC resize to the grid, crops row-major, a thumbnail."""
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    whole = pil.resize((cols * size, rows * size), Image.BICUBIC)
    crops = [whole.crop(((i % cols) * size, (i // cols) * size, (i % cols + 1) * size, (i // cols + 1) * size))
             for i in range(cols * rows)]
    crops.append(pil.resize((size, size), Image.BICUBIC))
    return torch.stack([torch.from_numpy(np.asarray(c).copy()).permute(2, 0, 1).float() / 255.0 for c in crops])


def test_tiles_are_internvls_crops_then_the_thumbnail():
    # smooth structure that survives the downscale: a horizontal ramp, a vertical one, a bright block
    y, x = torch.meshgrid(torch.linspace(0, 1, 90), torch.linspace(0, 1, 200), indexing="ij")
    block = ((y > 0.2) & (y < 0.6) & (x > 0.1) & (x < 0.3)).float()
    img = (torch.stack([x, y, block]) * 255).round().to(torch.uint8)
    cols, rows = tile_grid(90, 200, 6, 32)
    assert (cols, rows) == (2, 1)
    tiles = tile_pixels(img.float() / 255.0, 6, 32)
    assert tiles.shape == (3, 3, 32, 32)
    ref = _pil_tiles(img, cols, rows, 32)
    # torch's antialiased bicubic vs PIL's (rounded to uint8), as for the single tile
    assert (tiles - ref).abs().mean() < 1.5 / 255
    # a wrong order (thumbnail first, or column-major) is far off
    assert (tiles.flip(0) - ref).abs().mean() > 20 / 255
    # one tile: the plain resize, no thumbnail
    assert tile_pixels(img.float() / 255.0, 1, 32).shape == (1, 3, 32, 32)


@pytest.fixture(scope="module")
def tiled():
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny", max_tiles=6, lora=LoraConfig(r=4, alpha=8, dropout=0.0))).eval()


def test_several_tiles_give_each_image_its_tokens_and_the_region_the_thumbnails_cells(tiled):
    g = torch.Generator().manual_seed(1)
    size = tiled.vision_size
    # 2x1 tiles + thumbnail, and a small square image that stays one tile
    images = [torch.randint(0, 256, (3, size, 2 * size), generator=g, dtype=torch.uint8),
              torch.randint(0, 256, (3, size // 2, size // 2), generator=g, dtype=torch.uint8)]
    masks = [torch.zeros(img.shape[1:], dtype=torch.uint8) for img in images]
    masks[0][: size // 2, : size // 2] = 1
    masks[1][size // 4:, size // 4:] = 1
    assert tiled.tiles_of(images) == [3, 1]
    n = tiled.num_image_tokens
    seen = {}
    tiled.vlm.model.vision_tower.register_forward_pre_hook(
        lambda m, args, kwargs: seen.__setitem__("tiles", kwargs["pixel_values"].shape[0]), with_kwargs=True)
    tokens = tiled.vision_tokens(images)
    assert seen["tiles"] == 4 and tokens.shape[:2] == (2, 3 * n)
    assert tokens[1, n:].abs().sum() == 0  # padding after the one-tile image's own tokens
    # the one-tile image's tokens are those of the model without tiling (same weights)
    single = build_model(ModelConfig(preset="tiny", lora=LoraConfig(r=4, alpha=8, dropout=0.0)))
    single.load_state_dict(tiled.state_dict())
    torch.testing.assert_close(tokens[1, :n], single.eval().vision_tokens(images[1:])[0])
    # the thumbnail is the plain-resized image: its tokens are the untiled model's tokens of the image
    torch.testing.assert_close(tokens[0, 2 * n:], single.vision_tokens(images[:1])[0], atol=1e-5, rtol=1e-5)

    _, batch, embeds = tiled._caption_prompt(images, masks, tokens)
    assert [p.numel() for p in batch.image_pos] == [3 * n, n]
    feats = tiled.image_features(images, tokens)
    for i, (m, t) in enumerate(zip(masks, (3, 1))):
        cells = region_cells(m, tiled.grid) + (t - 1) * n  # the thumbnail (last tile)'s cells
        torch.testing.assert_close(embeds[i, batch.region_pos[i]], feats[i, cells].to(embeds.dtype))
        torch.testing.assert_close(embeds[i, batch.image_pos[i]], feats[i, : t * n].to(embeds.dtype))
    with torch.no_grad():
        cap = tiled.caption(images, masks, max_new_tokens=3, vision_tokens=tokens)
        ids, lengths = tiled.encode_captions(["red circle", "blue square"])
        out = tiled.ground(images, caption_ids=ids, caption_lengths=lengths, vision_tokens=tokens)
        alone = tiled.ground(images[1:], caption_ids=ids[1:], caption_lengths=lengths[1:])
    assert cap.ids.shape[0] == 2 and out.logits.shape[0] == 2
    # the static-cache decoding (CUDA graphs on a GPU) reads the prompts of different lengths as the dynamic one
    with torch.no_grad():
        static = tiled.caption(images, masks, max_new_tokens=3, vision_tokens=tokens, cuda_graph=True)
    assert tiled.last_decoding in ("static", "graph") and torch.equal(static.ids, cap.ids)
    # a sample's result does not depend on its batch neighbour's tile count (left padding, zero-padded tokens)
    torch.testing.assert_close(out.logits[1], alone.logits[0], atol=1e-4, rtol=1e-4)


def test_the_tower_sees_normalised_tiles(tiled):
    seen = {}
    hook = tiled.vlm.model.vision_tower.register_forward_pre_hook(
        lambda m, args, kwargs: seen.__setitem__("px", kwargs["pixel_values"]), with_kwargs=True)
    try:
        g = torch.Generator().manual_seed(2)
        img = torch.randint(0, 256, (3, 40, 130), generator=g, dtype=torch.uint8)
        tiled.vision_tokens([img])
    finally:
        hook.remove()
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    cols, rows = tile_grid(40, 130, 6, tiled.vision_size)
    ref = _pil_tiles(img, cols, rows, tiled.vision_size)
    assert (seen["px"].float() * std + mean - ref).abs().mean() < 1.5 / 255


def test_a_tiled_model_trains_through_caption_and_grounding():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", max_tiles=4, lora=LoraConfig(r=4, alpha=8, dropout=0.0))).train()
    g = torch.Generator().manual_seed(3)
    size = model.vision_size
    images = [torch.randint(0, 256, (3, size, 2 * size), generator=g, dtype=torch.uint8),
              torch.randint(0, 256, (3, 2 * size, size), generator=g, dtype=torch.uint8)]
    masks = [torch.zeros(img.shape[1:], dtype=torch.uint8) for img in images]
    for m in masks:
        m[: size // 2, : size // 2] = 1
    ids, lengths = model.encode_captions(["red circle", "blue square"])
    loss = model.caption_loss(images, masks, ["red circle", "blue square"]).sum()
    loss = loss + model.ground(images, caption_ids=ids, caption_lengths=lengths).logits.float().square().mean()
    loss.backward()
    projector = model.vlm.model.multi_modal_projector
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters() if p.requires_grad)
    assert torch.isfinite(loss)


def test_max_tiles_below_one_is_refused():
    with pytest.raises(ValueError, match="model.max_tiles"):
        build_model(ModelConfig(preset="tiny", max_tiles=0))


@pytest.mark.gpu
def test_tiled_captions_replay_as_cuda_graphs_on_a_gpu():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", max_tiles=6, lora=LoraConfig(enabled=False)))
    model = model.to("cuda", torch.float32).eval()  # fp32: the graph's ids equal the dynamic cache's (as generate's)
    g = torch.Generator().manual_seed(4)
    size = model.vision_size
    images = [torch.randint(0, 256, (3, size, 3 * size), generator=g, dtype=torch.uint8),
              torch.randint(0, 256, (3, size // 2, size // 2), generator=g, dtype=torch.uint8)]
    masks = [torch.ones(img.shape[1:], dtype=torch.uint8) for img in images]
    with torch.no_grad():
        eager = model.caption(images, masks, max_new_tokens=8)
        graph = model.caption(images, masks, max_new_tokens=8, cuda_graph=True)
    assert model.last_decoding == "graph" and torch.equal(graph.ids, eager.ids)

"""`model.max_tiles` against Sa2VA's preprocessing as its code (bytedance/Sa2VA: modeling_sa2va_chat.py
predict_forward / dynamic_preprocess, datasets/base.py, sa2va_data_06_vp.py) does it, restated here: the grid rule
with its own candidate order (by area), PIL's resizes and crops, the thumbnail, one `<img>…</img>` run of
n_tiles x 256 `<IMG_CONTEXT>` before the Osprey region text, and the region's tokens taken from the last tile with
the mask resized to the token grid by nearest (`vp_overall_mask`)."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dualloop.config import LoraConfig, ModelConfig
from dualloop.model import build_model
from dualloop.model.composite import IMAGENET_MEAN, IMAGENET_STD
from dualloop.model.prompts import PromptBuilder
from dualloop.model.tiles import tile_count, tile_grid, tile_pixels
from dualloop.model.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, add_new_special_tokens

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------- Sa2VA's preprocessing, restated
def _sa2va_grid(width: int, height: int, max_num: int, size: int) -> tuple[int, int]:
    """(cols, rows) as Sa2VA picks them: its candidates in order of area (equal areas in Python's set order), the
    first with the smallest distance of cols/rows to width/height kept, replaced by a later one at the same distance
    while the image's area is more than half of that grid's."""
    candidates = sorted({(c, r) for c in range(1, max_num + 1) for r in range(1, max_num + 1) if c * r <= max_num},
                        key=lambda g: g[0] * g[1])
    kept, kept_diff = (1, 1), math.inf
    for c, r in candidates:
        diff = abs(width / height - c / r)
        if diff < kept_diff or (diff == kept_diff and width * height > 0.5 * size * size * c * r):
            kept, kept_diff = (c, r), min(diff, kept_diff)
    return kept


def _sa2va_tiles(pil: Image.Image, max_num: int, size: int) -> list[Image.Image]:
    """PIL tiles: the image resized (PIL's default filter) to the grid and cut row-major; when that gives several,
    the whole image resized to one tile after them."""
    cols, rows = _sa2va_grid(pil.width, pil.height, max_num, size)
    whole = pil.resize((cols * size, rows * size))
    tiles = [whole.crop((x * size, y * size, (x + 1) * size, (y + 1) * size)) for y in range(rows) for x in range(cols)]
    return tiles + [pil.resize((size, size))] if len(tiles) > 1 else tiles


def _normalised(img: Image.Image, size: int) -> torch.Tensor:
    """Its per-tile transform: a BICUBIC resize to the tile size (none at that size), to [0, 1], ImageNet norm."""
    img = img.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


# ----------------------------------------------------------------------------------- grid, tiles, thumbnail
def test_grid_is_sa2vas_dynamic_preprocess_choice_ties_included():
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 3000, size=(400, 2))]
    sizes += [(480, 640), (427, 640), (640, 480), (448, 448), (1, 5000), (5000, 1)]
    for max_tiles in (2, 6, 12):
        # exact ties: aspect ratios halfway between two grids' (the order among equal areas could matter there)
        ratios = {Fraction(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                  if c * r <= max_tiles}
        mids = sorted({(a + b) / 2 for a in ratios for b in ratios})
        ties = [(m.denominator * k, m.numerator * k) for m in mids for k in (1, 37, 150, 449)]
        for h, w in sizes + ties:
            assert tile_grid(h, w, max_tiles, 448) == _sa2va_grid(w, h, max_tiles, 448), (h, w, max_tiles)


def test_tiles_are_sa2vas_pixel_values():
    """Same tiles, order and thumbnail as Sa2VA's dynamic_preprocess + transformer: torch's antialiased bicubic is
    PIL's filter; what is left is PIL's uint8 rounding and clipping between its two passes (at most a few levels at
    saturated edges, a fraction of a level on average)."""
    size = 64
    y, x = torch.meshgrid(torch.linspace(0, 1, 150), torch.linspace(0, 1, 260), indexing="ij")
    block = ((y > 0.2) & (y < 0.6) & (x > 0.1) & (x < 0.3)).float()
    img = (torch.stack([x, y * 0.8 + 0.1, block * 0.7 + 0.15]) * 255).round().to(torch.uint8)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    ref = torch.stack([_normalised(t, size) for t in _sa2va_tiles(pil, 12, size)])
    ours = tile_pixels(img.float() / 255.0, 12, size)
    ours = (ours - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert ours.shape == ref.shape and ours.shape[0] == tile_count(150, 260, 12, size)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    diff = ((ours - ref) * std).abs() * 255  # in uint8 levels
    assert diff.mean() < 1.0 and diff.max() < 4
    # thumbnail last (not first), row-major crops
    assert ((ours.roll(1, 0) - ref) * std).abs().mean() * 255 > 10
    # a grid of one tile: the one plain-resized tile, no thumbnail (as Sa2VA's `len(processed_images) != 1`)
    square = img[:, :100, :100]
    pil = Image.fromarray(square.permute(1, 2, 0).contiguous().numpy())
    ours_one = tile_pixels(square.float() / 255, 12, 448)
    assert len(_sa2va_tiles(pil, 12, 448)) == ours_one.shape[0] == 1


# ----------------------------------------------------------------------------------- image tokens in the prompt
def _byte_level_tokenizer():
    """A small Qwen2 byte-level BPE tokenizer with the chat markers and InternVL's image tokens (InternVL3-*-hf)."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2TokenizerFast

    merges = [("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("Ġ", "i"), ("Ġi", "s"), ("Ġ", "r"), ("Ġr", "e")]
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Qwen2TokenizerFast(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                             pad_token="<|endoftext|>")
    tok.add_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT],
                   special_tokens=True)
    tok.padding_side = "left"
    add_new_special_tokens(tok)
    return tok


def _sa2va_user_turn(question: str, n_tiles: int, region_cells: int | None = None) -> str:
    """The text Sa2VA's predict_forward gives the LLM for one image and one region: "<image>" in the question
    becomes the image's token run (and the Osprey sentence holding the region's cells), in the Qwen chat turn."""
    image = IMG_START + IMG_CONTEXT * (256 * n_tiles) + IMG_END
    if region_cells is not None:
        image += f"\nThere are 1 part regions in the picture: region1<vp>{IMG_CONTEXT * region_cells}</vp>.\n"
    return f"<|im_start|>user\n{question.replace('<image>', image)}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("n_tiles", [1, 7, 13])
def test_prompts_hold_sa2vas_one_image_run_of_all_tiles(n_tiles):
    tok = _byte_level_tokenizer()
    prompts = PromptBuilder(tok, num_image_tokens=256, style="sa2va")
    batch = prompts.caption_prompts([5], [n_tiles * 256])
    ids = batch.ids[0][batch.attention_mask[0].bool()].tolist()
    want = _sa2va_user_turn("<image>Please give me a short description of region1.", n_tiles, 5)
    assert ids == tok.encode(want, add_special_tokens=False)
    # training text (sa2va_data_06_vp: '<image>\nThere are ...' with <image> replaced, then strip()) is the same text
    batch = prompts.ground_prompts([tok.encode("the cat", add_special_tokens=False)], [n_tiles * 256])
    ids = batch.ids[0][batch.attention_mask[0].bool()].tolist()
    want = _sa2va_user_turn("<image>\nPlease segment the cat in this image.", n_tiles) + "It is [SEG]."
    assert tok.decode(ids) == want
    assert batch.image_pos[0].numel() == n_tiles * 256
    assert (batch.ids[0, batch.image_pos[0]] == tok.convert_tokens_to_ids(IMG_CONTEXT)).all()
    assert batch.ids[0, batch.image_pos[0][0] - 1] == tok.convert_tokens_to_ids(IMG_START)
    assert batch.ids[0, batch.image_pos[0][-1] + 1] == tok.convert_tokens_to_ids(IMG_END)


# ----------------------------------------------------------------------------------- the region's vision tokens
@pytest.fixture(scope="module")
def tiled():
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny", max_tiles=12, lora=LoraConfig(r=4, alpha=8, dropout=0.0))).eval()


def test_region_tokens_are_sa2vas_vp_embeds(tiled):
    """Sa2VA (_llm_forward / generate): vp_overall_mask = [False] * (n - 1) + [True], the prompt mask at the image's
    size resized to the g x g token grid with nearest, its set cells of that last tile's embeddings in <vp>."""
    g = torch.Generator().manual_seed(5)
    size, grid, n_tok = tiled.vision_size, tiled.grid, tiled.num_image_tokens
    images = [torch.randint(0, 256, (3, 90, 250), generator=g, dtype=torch.uint8),
              torch.randint(0, 256, (3, 50, 50), generator=g, dtype=torch.uint8)]
    masks = []
    for img in images:
        m = torch.zeros(img.shape[1:], dtype=torch.uint8)
        h, w = m.shape
        m[h // 5: h // 2, w // 3: (4 * w) // 5] = 1
        masks.append(m)
    tiles = tiled.tiles_of(images)
    assert tiles[0] == tile_count(90, 250, 12, size) > 1 and tiles[1] == 1
    with torch.no_grad():
        tokens = tiled.vision_tokens(images)
        _, batch, embeds = tiled._caption_prompt(images, masks, tokens)
        feats = tiled.image_features(images, tokens)
    for i, (m, t) in enumerate(zip(masks, tiles)):
        vp_overall_mask = torch.tensor([False] * (t - 1) + [True])
        per_tile = feats[i, : t * n_tok].reshape(t, n_tok, -1)
        tile_embeds = per_tile[vp_overall_mask][0]
        prompt_mask = F.interpolate(m[None, None].float(), size=(grid, grid), mode="nearest")[0].bool()
        vp_embeds = tile_embeds[prompt_mask.reshape(-1)]
        assert batch.region_pos[i].numel() == int(prompt_mask.sum())
        torch.testing.assert_close(embeds[i, batch.region_pos[i]], vp_embeds.to(embeds.dtype))

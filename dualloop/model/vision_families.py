"""How each VLM family turns images into LLM tokens: the one place the composite model differs between families.

- InternVL (`internvl`: InternVL2.5/3 "-hf" checkpoints, Sa2VA-1B/4B/8B/26B and the InternVL3-based releases): each
  image is one tile (or `model.max_tiles` tiles + a thumbnail) of a fixed size; the ViT's tokens are pixel-shuffled to a
  g x g grid per tile and projected by `multi_modal_projector`; positions are 1-D.
- Qwen2.5-VL (`qwen2_5_vl`: Sa2VA-Qwen2_5-VL-3B/7B): each image is resized to multiples of 28 px (patch 14, 2 x 2
  merge) with its area within [`model.min_pixels`, `model.max_pixels`] (its processor's `smart_resize`, bicubic, CLIP
  mean/std), so its token count follows its size; the tower's `merger` is the projector; positions are Qwen's 3-D
  multimodal RoPE: an image token at merged cell (i, j) of an image starting at text position p has (p, p + i, p + j),
  and the text after it continues at p + max(rows, cols).
- Qwen3-VL (`qwen3_vl`: Sa2VA-Qwen3-VL-4B): as Qwen2.5-VL with 16 px patches and DeepStack (Qwen3VLImages).

Each family gives: the image markers of the prompt, each image's token count, the tower's tokens (before the
projector, so a frozen tower runs once per step), the projection (and what else the LLM's forward takes of it), a
mask's region tokens and the position ids.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .region import region_cells
from .tiles import tile_count, tile_pixels, with_thumbnail
from .tokenizer import IMG_CONTEXT, IMG_END, IMG_START
from .window_attention import batch_chunk_attention

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2-VL's image processor (OPENAI_CLIP_MEAN / STD)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
QWEN_MARKERS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
QWEN_VIDEO = "<|video_pad|>"


def family_of(vlm) -> str:
    model_type = getattr(vlm.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"VLM model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    return model_type


def vision_family(model):
    """The family object of a DualLoopModel's VLM."""
    return FAMILIES[family_of(model.vlm)](model)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


class _Family:
    tower_path: str  # the vision tower's module path in the DualLoopModel

    @property
    def tower(self):
        return self.model.get_submodule(self.tower_path)


class InternVLImages(_Family):
    name = "internvl"
    tower_path = "vlm.model.vision_tower"
    markers = (IMG_START, IMG_CONTEXT, IMG_END)
    eval_system = None  # the system turn of Sa2VA's evaluation prompts (`model.prompt_style: sa2va_eval`)
    # tokens a caption never holds besides the tokenizer's special ones and the config's image token (its word-level
    # tokenizer's image markers were allowed from the start: kept so, for the figures measured with it)
    never_in_captions: tuple[str, ...] = ()

    def __init__(self, model):
        self.model = model
        vcfg = model.vlm.config
        self.size = int(_pair(vcfg.vision_config.image_size)[0])
        patch = int(_pair(vcfg.vision_config.patch_size)[0])
        self.grid = int((self.size // patch) * vcfg.downsample_ratio)
        self.tokens_per_tile = self.grid * self.grid

    def describe(self) -> dict:
        return {"image_tokens_per_tile": self.tokens_per_tile,
                "image_tokens_max": with_thumbnail(self.model.max_tiles) * self.tokens_per_tile}

    def _tiles(self, image) -> int:
        return tile_count(int(image.shape[-2]), int(image.shape[-1]), self.model.max_tiles, self.size)

    def token_counts(self, images) -> list[int]:
        return [self._tiles(img) * self.tokens_per_tile for img in images]

    def tower_tokens(self, images) -> torch.Tensor:
        """[B, N, C]: each image's tile tokens in a row (tiles, then the thumbnail), zero-padded to the longest."""
        m = self.model
        vm = m.vlm.model
        if m.max_tiles == 1:
            px = m._pixels(images, self.size, "bicubic")
        else:
            px = torch.cat([tile_pixels(img.to(m.device, torch.float32) / 255.0, m.max_tiles, self.size)
                            for img in images])
            px = (px - m.pixel_mean) / m.pixel_std
        px = px.to(vm.vision_tower.embeddings.patch_embeddings.projection.weight.dtype)
        layer = m.vlm.config.vision_feature_layer
        out = vm.vision_tower(pixel_values=px, output_hidden_states=(layer != -1), return_dict=True)
        feats = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        if m.vlm.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]  # drop CLS
        b, n, c = feats.shape
        side = math.isqrt(n)
        feats = vm.pixel_shuffle(feats.reshape(b, side, side, c), scale_factor=m.vlm.config.downsample_ratio)
        feats = feats.reshape(b, -1, feats.shape[-1])
        if b != len(images):  # several tiles per image: one row of tokens per image
            feats = _pad_rows([t.flatten(0, 1) for t in feats.split([self._tiles(img) for img in images])])
        return feats

    def project(self, tokens: torch.Tensor) -> tuple[torch.Tensor, None]:
        """(the LLM's image features, what else the LLM takes of them: None here)."""
        return self.model.vlm.model.multi_modal_projector(tokens), None

    def llm_inputs(self, extra, image_pos, batch: int, length: int) -> dict:
        """Keyword arguments of the LLM's forward over a batch of prompts beyond embeddings, mask and positions."""
        return {}

    def region(self, mask: torch.Tensor, image) -> torch.Tensor:
        # the region's cells are those of the thumbnail: the last tile, whose tokens end the image's
        return region_cells(mask, self.grid) + (self._tiles(image) - 1) * self.tokens_per_tile

    def positions(self, attention_mask: torch.Tensor, image_pos, images) -> torch.Tensor:
        return positions_from_mask(attention_mask)


class QwenVLImages(_Family):
    name = "qwen2_5_vl"
    tower_path = "vlm.model.visual"  # its merger(s): the projector (trainable.component_of)
    markers = QWEN_MARKERS
    mean, std = CLIP_MEAN, CLIP_STD
    eval_system = "You are a helpful assistant."  # Qwen2.5-VL's chat template's default system turn
    # image and video markers, also those a tokenizer keeps only as added tokens (the tiny presets' word-level one
    # holds InternVL's too)
    never_in_captions = (*QWEN_MARKERS, QWEN_VIDEO, IMG_START, IMG_CONTEXT, IMG_END)

    def __init__(self, model):
        self.model = model
        vcfg = model.vlm.config.vision_config
        self.patch = int(vcfg.patch_size)
        self.merge = int(vcfg.spatial_merge_size)
        self.temporal = int(vcfg.temporal_patch_size)
        self.factor = self.patch * self.merge
        batch_chunk_attention(self.tower)  # equal-length attention chunks in one call (window_attention.py)

    def _budget(self) -> tuple[int, int]:
        cfg = self.model.model_cfg
        return int(cfg.min_pixels), int(cfg.max_pixels)

    def describe(self) -> dict:
        return {"image_tokens_max": self._budget()[1] // self.factor ** 2}

    def resized(self, image) -> tuple[int, int]:
        """(height, width) the image is resized to: Qwen2-VL's `smart_resize`."""
        h, w = int(image.shape[-2]), int(image.shape[-1])
        lo, hi = self._budget()
        return smart_resize(h, w, self.factor, lo, hi)

    def grids(self, images) -> list[tuple[int, int]]:
        """Each image's merged token grid (rows, cols)."""
        return [(h // self.factor, w // self.factor) for h, w in (self.resized(img) for img in images)]

    def token_counts(self, images) -> list[int]:
        return [r * c for r, c in self.grids(images)]

    def _patches(self, image) -> tuple[torch.Tensor, list[int]]:
        """(the [N, 3 * temporal * patch * patch] patch rows in the processor's order, [1, h, w] patch grid)."""
        m = self.model
        h, w = self.resized(image)
        x = image.to(m.device, torch.float32).unsqueeze(0) / 255.0
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        mean, std = (torch.tensor(v, device=x.device).view(3, 1, 1) for v in (self.mean, self.std))
        x = (x[0] - mean) / std
        gh, gw, p, k = h // self.patch, w // self.patch, self.patch, self.merge
        # [3, gh/k, k, p, gw/k, k, p] -> [gh/k, gw/k, k, k, 3, p, p]: each 2 x 2 merge group's patches in a row
        x = x.reshape(3, gh // k, k, p, gw // k, k, p).permute(1, 4, 2, 5, 0, 3, 6)
        x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, self.temporal, -1, -1)  # a still image: its frame repeated
        return x.reshape(gh * gw, 3 * self.temporal * p * p), [1, gh, gw]

    def tower_tokens(self, images) -> torch.Tensor:
        """[B, N, merge^2 * C]: each image's patch tokens before the merger, each merge group in a row (row-major
        over the merged grid), zero-padded to the longest image."""
        tower = self.tower
        patches, grids = zip(*(self._patches(img) for img in images))
        px = torch.cat(patches).to(tower.patch_embed.proj.weight.dtype)
        thw = torch.tensor(grids, dtype=torch.long, device=px.device)
        # the tower reorders the merger's output rows back from its attention windows: given the merge groups
        # instead, it returns them in image order
        with _passing_groups(tower.merger):
            groups = _merged_output(tower(px, grid_thw=thw))
        return _pad_rows(list(groups.split([gh * gw // self.merge ** 2 for _, gh, gw in grids])))

    def project(self, tokens: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _merged(self.tower.merger, tokens, self.merge), None

    def llm_inputs(self, extra, image_pos, batch: int, length: int) -> dict:
        return {}

    def region(self, mask: torch.Tensor, image) -> torch.Tensor:
        return region_cells(mask, self.grids([image])[0])

    def positions(self, attention_mask: torch.Tensor, image_pos, images) -> torch.Tensor:
        """[3, B, L] multimodal RoPE positions (temporal, height, width) of a left-padded batch (on the CPU, as the
        prompts are built: the per-image reads below would each wait on a GPU)."""
        mask = attention_mask.long().cpu()
        flat = positions_from_mask(mask)
        pos = flat.unsqueeze(0).repeat(3, 1, 1)
        for b, (where, (rows, cols)) in enumerate(zip(image_pos, self.grids(images))):
            where = where.cpu()
            start, n = int(where[0]), where.numel()
            p = int(flat[b, start])
            k = torch.arange(n)
            pos[0, b, where] = p
            pos[1, b, where] = p + k // cols
            pos[2, b, where] = p + k % cols
            pos[:, b, start + n:] += max(rows, cols) - n  # the text after continues at p + max(rows, cols)
        return pos


class Qwen3VLImages(QwenVLImages):
    """Qwen3-VL (`qwen3_vl`): as Qwen2.5-VL, but 16 px patches (32 px per token), mean = std = 0.5, no attention
    windows, and DeepStack: the tokens of a few tower layers, each through its own merger, are added to the image
    tokens' hidden states after the LLM's first layers (`visual_pos_masks`, `deepstack_visual_embeds`). Its tower
    tokens hold the merger's input and each DeepStack merger's, side by side."""

    name = "qwen3_vl"
    mean = std = (0.5, 0.5, 0.5)
    eval_system = None  # Qwen3-VL's chat template has no default system turn

    def tower_tokens(self, images) -> torch.Tensor:
        """[B, N, (1 + D) * merge^2 * C]: each merge group's tokens at the merger's input, then at each of the D
        DeepStack mergers' (row-major over the merged grid), zero-padded to the longest image."""
        tower = self.tower
        patches, grids = zip(*(self._patches(img) for img in images))
        px = torch.cat(patches).to(tower.patch_embed.proj.weight.dtype)
        thw = torch.tensor(grids, dtype=torch.long, device=px.device)
        with _passing_groups(tower.merger, *tower.deepstack_merger_list) as seen:
            main = _merged_output(tower(px, grid_thw=thw))
        groups = torch.cat([main, *seen[1:]], dim=-1)
        return _pad_rows(list(groups.split([gh * gw // self.merge ** 2 for _, gh, gw in grids])))

    def project(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tower = self.tower
        parts = tokens.split(tower.merger.hidden_size, dim=-1)
        main = _merged(tower.merger, parts[0], self.merge)
        return main, [_merged(m, x, self.merge) for m, x in zip(tower.deepstack_merger_list, parts[1:])]

    def llm_inputs(self, extra, image_pos, batch: int, length: int) -> dict:
        """What the LLM's forward adds at the image tokens: a [B, L] mask of their places and, per DeepStack layer,
        their features in that mask's order."""
        where = torch.zeros(batch, length, dtype=torch.bool)
        for b, pos in enumerate(image_pos):
            where[b, pos.cpu()] = True
        if not extra:  # a config without DeepStack layers
            return {}
        counts = [pos.numel() for pos in image_pos]
        embeds = [torch.cat([layer[b, :n] for b, n in enumerate(counts)]) for layer in extra]
        return {"visual_pos_masks": where.to(embeds[0].device), "deepstack_visual_embeds": embeds}


@contextlib.contextmanager
def _passing_groups(*mergers):
    """While the tower runs, each merger passes its input on as merge groups ([N / merge^2, merge^2 * C], the rows
    the merger would merge) instead of merging them: the tower then returns the main merger's groups in image order
    (Qwen2.5-VL reorders them back from its attention windows), and the others (Qwen3-VL's DeepStack mergers') are
    kept in `mergers` order; the tokens before the projector, without computing the merge `project` does."""
    seen: list = [None] * len(mergers)

    def passing(i: int, width: int):
        def forward(x):
            seen[i] = x.reshape(-1, width)
            return seen[i]
        return forward

    for i, m in enumerate(mergers):
        m.forward = passing(i, m.hidden_size)  # the instance's forward: the module's hooks (ZeRO-3's) still run
    try:
        yield seen
    finally:
        for m in mergers:
            del m.forward


def _merged_output(out) -> torch.Tensor:
    """The tower's merged tokens: its output's `pooler_output` (transformers 5), or the output itself (4.x)."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _merged(merger, tokens: torch.Tensor, merge: int) -> torch.Tensor:
    """A merger over [B, N, merge^2 * C] groups of patch tokens: [B, N, hidden]."""
    b, n, width = tokens.shape
    return merger(tokens.reshape(b * n * merge ** 2, width // merge ** 2)).reshape(b, n, -1)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's image size rule: both sides multiples of `factor`, the area within [min_pixels, max_pixels],
    the aspect ratio kept as nearly as that allows."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {height}x{width}: aspect ratio over 200 (Qwen-VL's limit)")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return max(h, factor), max(w, factor)


def _pair(x):
    return tuple(x) if isinstance(x, (list, tuple)) else (x, x)


FAMILIES = {"internvl": InternVLImages, "qwen2_5_vl": QwenVLImages, "qwen3_vl": Qwen3VLImages}

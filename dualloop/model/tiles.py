"""Dynamic tiling of the VLM input (InternVL / Sa2VA `dynamic_preprocess`): an image is resized to cols x rows tiles of
the VLM's input size and cut into them (row-major), plus a thumbnail of the whole image when there is more than one.

The grid is the one of at most `max_tiles` tiles whose aspect ratio is closest to the image's; between grids of the
same ratio the larger wins when the image has more than half of its pixels. Sa2VA's releases see 1 to 12 tiles (+ the
thumbnail) of 448 px in training and inference; `max_tiles = 1` is one plain-resized tile (what InternVL's "-hf"
processor does by default, and this project's presets). Region prompts select cells of the thumbnail (the last tile),
as Sa2VA's `vp_overall_mask` does, or of the only tile.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def tile_grid(height: int, width: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """(cols, rows) of the tiles for an image of height x width pixels."""
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
    if max_tiles == 1:
        return 1, 1
    aspect = width / height
    # every grid with at most max_tiles tiles, by tile count (then columns, for a fixed order)
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles),
                   key=lambda g: (g[0] * g[1], g[0]))
    best, best_diff = (1, 1), float("inf")
    for c, r in grids:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and height * width > 0.5 * tile_size * tile_size * c * r:
            best = (c, r)
    return best


def tile_count(height: int, width: int, max_tiles: int, tile_size: int) -> int:
    """How many tiles the VLM sees of the image: cols x rows, + 1 thumbnail when that is more than one."""
    cols, rows = tile_grid(height, width, max_tiles, tile_size)
    return with_thumbnail(cols * rows)


def with_thumbnail(tiles: int) -> int:
    """The tiles the VLM sees for a grid of `tiles`: a thumbnail is added when there is more than one."""
    return tiles + (tiles > 1)


def tile_pixels(image: torch.Tensor, max_tiles: int, tile_size: int, mode: str = "bicubic") -> torch.Tensor:
    """[n, 3, tile_size, tile_size] in [0, 1] of a float image [3, H, W] in [0, 1]: the tiles, row-major, then the
    thumbnail (when n > 1). Antialiased resizes (PIL's, which InternVL uses, always are), clamped as a uint8 image
    would be."""
    h, w = image.shape[-2:]
    cols, rows = tile_grid(h, w, max_tiles, tile_size)
    thumb = _resize(image, tile_size, tile_size, mode)
    if cols * rows == 1:
        return thumb
    whole = _resize(image, rows * tile_size, cols * tile_size, mode)[0]
    tiles = whole.unflatten(1, (rows, tile_size)).unflatten(3, (cols, tile_size))  # [3, rows, s, cols, s]
    tiles = tiles.permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile_size, tile_size)
    return torch.cat([tiles, thumb])


def _resize(image: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    x = image.unsqueeze(0)
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode=mode, align_corners=False, antialias=True).clamp(0, 1)

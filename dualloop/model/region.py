"""Region prompts (Osprey / Sa2VA style): which vision-token cells of the image a mask selects.

The image is resized plainly (no aspect-ratio padding) to the VLM tile (with `model.max_tiles` > 1: the thumbnail
tile, the whole image), so the tile's g x g token grid maps to the mask's own pixel grid. The mask is resized to
g x g with nearest sampling (torch `mode="nearest"`); the cells that are set give the region tokens. A mask too small
to hit a sampled pixel still selects one cell: the one it overlaps most (an empty mask selects the centre cell, so
K >= 1 always and the <vp> slot count matches the selected cells).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def region_cells(mask: torch.Tensor, grid: int | tuple[int, int]) -> torch.Tensor:
    """Flat indices (row-major, ascending) into the token grid (grid x grid, or rows x cols) selected by `mask`
    [H, W]; at least one."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be [H, W], got shape {tuple(mask.shape)}")
    rows, cols = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    m = mask.to(torch.float32)
    cells = F.interpolate(m[None, None], size=(rows, cols), mode="nearest")[0, 0] > 0.5
    idx = cells.flatten().nonzero().flatten()
    if idx.numel() > 0:
        return idx
    return _largest_overlap_cell(m, rows, cols).view(1)


def _largest_overlap_cell(mask: torch.Tensor, grid_rows: int, grid_cols: int) -> torch.Tensor:
    h, w = mask.shape
    rows = torch.div(torch.arange(h, device=mask.device) * grid_rows, h, rounding_mode="floor")
    cols = torch.div(torch.arange(w, device=mask.device) * grid_cols, w, rounding_mode="floor")
    cell_of_pixel = rows[:, None] * grid_cols + cols[None, :]
    overlap = torch.zeros(grid_rows * grid_cols, dtype=torch.float32, device=mask.device)
    overlap.index_add_(0, cell_of_pixel.flatten(), mask.flatten())
    if overlap.max() <= 0:  # empty mask: the centre cell
        return torch.tensor((grid_rows // 2) * grid_cols + grid_cols // 2, device=mask.device)
    return overlap.argmax()

"""Masks from their on-disk encodings → uint8 arrays [H, W] in {0, 1}.

COCO RLE (compressed or not) and polygons go through pycocotools; PNG masks through PIL. Every decoder checks the
size it is told against the size the encoding claims, because a mask that silently disagrees with its image would
train the model on shifted targets.
"""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


class BadSample(Exception):
    """A sample whose files cannot be decoded (corrupt, truncated, missing, or inconsistent sizes)."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _as_rle(rle: dict, where) -> dict:
    """A compressed RLE dict; uncompressed (list counts) RLEs are converted."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise BadSample(where, f"not a COCO RLE (needs 'size' and 'counts'): {type(rle).__name__}")
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        if sum(counts) != h * w:
            raise BadSample(where, f"uncompressed RLE counts sum to {sum(counts)}, size says {h}x{w}")
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [h, w], "counts": counts}


def rle_area(rle: dict | None, where="") -> int:
    """Foreground pixel count of an RLE; 0 for None/empty (an absent object in SA-V masklets)."""
    if not rle:
        return 0
    return int(mask_utils.area(_as_rle(rle, where)))


def decode_rle(rle: dict, height: int | None = None, width: int | None = None, where="") -> np.ndarray:
    """COCO RLE → uint8 [H, W]; raises BadSample when its size differs from (height, width)."""
    r = _as_rle(rle, where)
    h, w = r["size"]
    if height is not None and (h, w) != (height, width):
        raise BadSample(where, f"RLE size {h}x{w} differs from the image size {height}x{width}")
    try:
        m = mask_utils.decode(r)
    except Exception as e:  # pycocotools raises plain Exceptions on malformed counts
        raise BadSample(where, f"cannot decode RLE: {e}") from e
    return np.ascontiguousarray(m, dtype=np.uint8)


def decode_polygons(polygons: list, height: int, width: int, where="") -> np.ndarray:
    """COCO polygons (list of flat [x0, y0, x1, y1, ...] lists) → uint8 [H, W] (union of the parts)."""
    if polygons and isinstance(polygons[0], (int, float)):  # a single flat polygon without the outer list
        polygons = [polygons]
    parts = [[float(v) for v in p] for p in polygons if len(p) >= 6]
    if not parts:
        raise BadSample(where, "polygon segmentation with no part of 3 or more points")
    rles = mask_utils.frPyObjects(parts, height, width)
    return np.ascontiguousarray(mask_utils.decode(mask_utils.merge(rles)), dtype=np.uint8)


def decode_segmentation(seg, height: int, width: int, where="") -> np.ndarray:
    """A COCO `segmentation` field (polygon list or RLE dict) → uint8 [H, W]."""
    if isinstance(seg, list):
        return decode_polygons(seg, height, width, where)
    return decode_rle(seg, height, width, where)


def encode_rle(mask: np.ndarray) -> dict:
    """uint8/bool [H, W] → compressed COCO RLE with `counts` as str (JSON-serialisable)."""
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize with src = floor(dst · in/out) (torch's `nearest`)."""
    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def read_png_mask(path, threshold: int = 128, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask PNG → uint8 [H, W] in {0, 1}.

    1-bit PNGs: nonzero is foreground. Others: pixel value ≥ `threshold` (OpenImages uses 128; SA-V palette/index
    PNGs use threshold=1, i.e. nonzero). When `size` (H, W) is given and differs, resized with nearest neighbour.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "1":
                arr = np.asarray(im, dtype=np.uint8)
                m = (arr != 0).astype(np.uint8)
            else:
                # a palette PNG thresholded as intensity (OpenImages) is read through its palette: a two-colour mask
                # stored as indices 0/1 → black/white would be empty at 128; index masks (SA-V, threshold 1) keep
                # their indices
                if im.mode not in ("L", "P", "I", "I;16") or (im.mode == "P" and threshold > 1):
                    im = im.convert("L")
                arr = np.asarray(im)
                if arr.ndim != 2:
                    raise BadSample(path, f"mask PNG has shape {arr.shape}, expected a single channel")
                m = (arr >= threshold).astype(np.uint8)
    except BadSample:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise BadSample(path, f"unreadable mask PNG: {e}") from e
    if size is not None:
        m = resize_nearest(m, int(size[0]), int(size[1]))
    return m


def read_image(path) -> np.ndarray:
    """An image file → uint8 [H, W, 3] RGB, the stored pixel grid (EXIF orientation is NOT applied)."""
    try:
        with Image.open(path) as im:
            im.load()  # PIL raises on truncated files (LOAD_TRUNCATED_IMAGES is False)
            rgb = im.convert("RGB") if im.mode != "RGB" else im
            arr = np.asarray(rgb, dtype=np.uint8)
    except FileNotFoundError as e:
        raise BadSample(path, "image file is missing") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadSample(path, f"unreadable image: {e}") from e
    return arr

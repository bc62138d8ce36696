"""What every reader shares: the item layout, bad-sample replacement and the checks on a dataset root."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .index import Index, read_index
from .masks import BadSample

log = logging.getLogger("dualloop.data")

MAX_REPLACEMENT_ATTEMPTS = 16
DEFAULT_MAX_BAD_FRACTION = 0.01


class DataError(RuntimeError):
    """A dataset that cannot be used: missing root, no expected files, or too many bad samples."""


def check_root(kind: str, root, looked_for: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{kind}: dataset root {str(path)!r} does not exist or is not a directory "
                        f"(looked for {looked_for})")
    return path


def to_chw(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] → uint8 tensor [3, H, W] (contiguous; one copy, which also makes it writable)."""
    chw = np.ascontiguousarray(image.transpose(2, 0, 1))
    return torch.from_numpy(chw if chw.flags.writeable else chw.copy())


def _mask_tensor(mask: np.ndarray) -> torch.Tensor:
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    return torch.from_numpy(m if m.flags.writeable else m.copy())


def make_item(image1: np.ndarray, mask1: np.ndarray, *, source: str, key: str, captions=(),
              image2: np.ndarray | None = None, mask2: np.ndarray | None = None, where="") -> dict:
    """The item dict of the data contract. Single-image samples reuse image1/mask1 (same tensors, no copy)."""
    for img, m, tag in ((image1, mask1, "1"), (image2, mask2, "2")):
        if img is None:
            continue
        if img.ndim != 3 or img.shape[2] != 3:
            raise BadSample(where, f"image{tag} has shape {img.shape}, expected HxWx3")
        if m.shape != img.shape[:2]:
            raise BadSample(where, f"mask{tag} size {m.shape} differs from image{tag} size {img.shape[:2]}")
    t_image1, t_mask1 = to_chw(image1), _mask_tensor(mask1)
    paired = image2 is not None
    if paired:
        t_image2, t_mask2 = to_chw(image2), _mask_tensor(mask2)
    else:
        t_image2, t_mask2 = t_image1, t_mask1
    return {"image1": t_image1, "mask1": t_mask1, "image2": t_image2, "mask2": t_mask2, "paired": paired,
            "captions": list(captions), "source": source, "key": key}


def _mix(*values: int) -> int:
    """A small deterministic integer hash (splitmix64 steps) of several ints."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x


class Reader(Dataset):
    """Map-style dataset over a cached index. Subclasses implement `__len__`, `load(i)` and `sample_info(i)`.

    `__getitem__` replaces a sample that raises BadSample by another sample of the same dataset, chosen by a hash of
    (seed, index, attempt) so every rank and worker makes the same choice; it counts distinct bad samples in this
    process and raises DataError once they exceed `max_bad_fraction` of the dataset.
    """

    kind = "?"

    def __init__(self, root, *, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, seed: int = 0):
        if not 0.0 <= float(max_bad_fraction) <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}")
        self.root = Path(root).expanduser()
        self.max_bad_fraction = float(max_bad_fraction)
        self.seed = int(seed)
        self.bad: dict[int, str] = {}  # index → "path: reason", this process only
        self.index_problems: list[str] = []  # found while indexing (missing files, unreadable annotations)

    # -- subclass API -------------------------------------------------------------------------------------------
    def load(self, index: int) -> dict:
        raise NotImplementedError

    def sample_info(self, index: int) -> dict:
        raise NotImplementedError

    def _bind(self, index: Index) -> dict:
        """Attributes (memory-mapped columns, string tables) taken from the index."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------------------------
    def _attach(self, index: Index) -> None:
        self.index = index
        attrs = self._bind(index)
        self.__dict__.update(attrs)
        self._bound = tuple(attrs)

    def __getstate__(self):
        # Pickled for spawn/forkserver workers: send the index path, not copies of the memory-mapped columns.
        state = {k: v for k, v in self.__dict__.items() if k not in self._bound and k != "index"}
        state["_index_path"] = str(self.index.path)
        return state

    def __setstate__(self, state):
        path = state.pop("_index_path")
        self.__dict__.update(state)
        self._attach(read_index(Path(path)))

    def _check_index(self, n_rows: int, n_problem_rows: int, examples: list[str], what: str) -> None:
        """Report rows dropped at index time; raise past max_bad_fraction or when nothing is left."""
        if n_problem_rows:
            msg = f"{self.kind} at {self.root}: {n_problem_rows} of {n_rows} {what}"
            shown = "; ".join(examples[:5])
            self.index_problems.append(f"{msg} (e.g. {shown})")
            log.warning("%s, left out (e.g. %s)", msg, shown)
            if n_problem_rows > self.max_bad_fraction * max(n_rows, 1):
                raise DataError(f"{msg}: more than max_bad_fraction={self.max_bad_fraction} of the dataset "
                                f"(e.g. {shown}). Fix the files or raise max_bad_fraction.")

    def _require_samples(self, looked_for: str) -> None:
        if len(self) == 0:
            raise DataError(f"{self.kind}: no samples under {self.root} (looked for {looked_for})")

    def replacement(self, index: int, attempt: int) -> int:
        n = len(self)
        j = _mix(self.seed, index, attempt) % n
        return (j + 1) % n if j == index and n > 1 else j

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{self.kind}: index {index} out of range for {n} samples")
        current = index
        for attempt in range(MAX_REPLACEMENT_ATTEMPTS):
            try:
                return self.load(current)
            except BadSample as e:
                self._record_bad(current, e)
            current = self.replacement(index, attempt)
        raise DataError(f"{self.kind} at {self.root}: {MAX_REPLACEMENT_ATTEMPTS} bad samples in a row while "
                        f"replacing sample {index}; last: {self.bad.get(current, '?')}")

    def _record_bad(self, index: int, err: BadSample) -> None:
        if index not in self.bad:
            self.bad[index] = str(err)
            log.warning("%s: bad sample %d (%s), replaced by another sample of the dataset [pid %d]",
                        self.kind, index, err, os.getpid())
        if len(self.bad) > self.max_bad_fraction * len(self):
            shown = "\n  ".join(list(self.bad.values())[:10])
            raise DataError(f"{self.kind} at {self.root}: {len(self.bad)} bad samples of {len(self)} exceed "
                            f"max_bad_fraction={self.max_bad_fraction}:\n  {shown}")

    def problems(self) -> list[str]:
        """Index-time problems and the bad samples met so far in this process."""
        return list(self.index_problems) + [f"bad sample {i}: {r}" for i, r in sorted(self.bad.items())]


def list_dir(path) -> list[str]:
    """Names in a directory (one listing); [] when it does not exist."""
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def walk(root, suffixes: tuple[str, ...]) -> list[str]:
    """All files under root whose name ends with one of `suffixes`, as sorted absolute paths (one walk). macOS's
    AppleDouble files (`._name`, left by copies from a Mac) are not data and are passed over."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        out.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(suffixes) and not f.startswith("._"))
    out.sort()
    return out

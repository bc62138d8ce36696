"""Deterministic weights for the golden-output fixtures (tests/fixtures/*_golden_tiny.json): the same numbers from
a list of keys, with numpy's legacy RandomState (its streams are fixed across numpy versions), so a fixture stores
names and shapes, not tensors. `weights_from_keys` (InternViT golden) tells the kind of a weight by its name,
`make_weights` (SAM2 golden) reads it from the fixture."""
from __future__ import annotations

import numpy as np
import torch


def weights_from_keys(keys: list[tuple[str, list[int]]], seed: int) -> dict[str, torch.Tensor]:
    """Norm weights near 1, layer scales near 0.1, everything else small: activations stay in a sane range."""
    rs = np.random.RandomState(seed)
    out = {}
    for name, shape in sorted(keys):
        x = rs.standard_normal(shape)
        last = name.rsplit(".", 1)[-1]
        if last == "weight" and any(part in name for part in ("norm", "mlp1.0.")):
            x = 1.0 + 0.1 * x
        elif last in ("ls1", "ls2"):
            x = 0.1 * (1.0 + 0.1 * x)
        else:
            x = 0.05 * x
        out[name] = torch.from_numpy(x.astype(np.float32))
    return out


def make_weights(keys: list[list], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic weights from (name, shape, kind) in the given order, numpy's legacy RandomState (fixed streams):
    norm weights 1 + 0.1 N, biases 0.02 N, the prompt encoder's Fourier matrix N (SAM2's own init), everything else
    N / sqrt(numel / shape[0]) (a fan-in scale, so activations stay O(1) through the tiny model)."""
    rs = np.random.RandomState(seed)
    out = {}
    for name, shape, kind in keys:
        x = rs.standard_normal(shape)
        if kind == "norm":
            x = 1.0 + 0.1 * x
        elif kind == "bias":
            x = 0.02 * x
        elif kind == "weight":
            x = x / np.sqrt(max(1, int(np.prod(shape)) // shape[0]))
        elif kind != "fourier":
            raise ValueError(f"unknown weight kind {kind!r} of {name}")
        out[name] = torch.from_numpy(np.asarray(x, dtype=np.float32))
    return out

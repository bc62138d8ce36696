"""Argument checks and the packed form of a mask-loss batch shared by every backend.

Value checks that need the data (finite logits, targets in [0, 1]) are split out: the torch backend runs them
directly, the fused backends fold the target check into their forward pass (they read every target pixel anyway)
and raise after one host sync.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RESIZE_MODES = ("logits", "targets", "none")
BACKENDS = ("auto", "torch", "triton", "cuda")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_TARGET_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TARGET_DTYPES = (torch.bool, torch.uint8) + FLOAT_TARGET_DTYPES


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class LossParams:
    alpha: float
    gamma: float
    dice_smooth: float


@dataclass
class MaskBatch:
    """Validated inputs: either `stacked` [N, H, W] or `target_list` (per-mask [H_i, W_i] tensors, no copy)."""

    logits: torch.Tensor  # [N, h, w]
    stacked: torch.Tensor | None  # the original [N, H, W] tensor when targets came stacked
    target_list: list[torch.Tensor] | None  # when targets came as a list (ragged)
    resize: str
    params: LossParams

    @property
    def n(self) -> int:
        return self.logits.shape[0]

    @property
    def targets(self) -> list[torch.Tensor]:
        """Per-mask target tensors; for stacked targets made on demand (N views cost N Python calls per step)."""
        return self.target_list if self.stacked is None else list(self.stacked.unbind(0))

    @property
    def sizes(self) -> list[tuple[int, int]]:
        if self.stacked is not None:
            return [tuple(self.stacked.shape[1:])] * self.n
        return [tuple(t.shape) for t in self.target_list]

    @property
    def ragged(self) -> bool:
        return self.stacked is None

    @property
    def target_tensors(self) -> list[torch.Tensor]:
        """The tensors that hold the targets: [stacked], or the list (no per-mask views)."""
        return self.target_list if self.stacked is None else [self.stacked]

    def slice(self, start: int, end: int) -> "MaskBatch":
        return MaskBatch(logits=self.logits[start:end],
                         stacked=None if self.stacked is None else self.stacked[start:end],
                         target_list=None if self.target_list is None else self.target_list[start:end],
                         resize=self.resize, params=self.params)


def _check_number(name: str, value, *, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def _check_target(name: str, t, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in TARGET_DTYPES:
        raise ValueError(f"{name} must be bool, uint8 (0/1) or floating point in [0, 1], got dtype {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits are on {device}; move both to one device")


def prepare(logits, targets, *, resize: str, alpha, gamma, dice_smooth, backend: str) -> MaskBatch:
    """Check shapes, dtypes, devices and scalar arguments (everything that needs no look at the values)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    params = LossParams(
        alpha=_check_number("alpha", alpha, high=1.0),
        gamma=_check_number("gamma", gamma, low=0.0),
        dice_smooth=_check_number("dice_smooth", dice_smooth, low=0.0),
    )
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"logits must have 3 dims [N, h, w], got shape {tuple(logits.shape)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    n, h, w = logits.shape
    if h == 0 or w == 0:
        raise ValueError(f"logits must have non-empty spatial dims, got shape {tuple(logits.shape)}")

    if isinstance(targets, torch.Tensor):
        _check_target("targets", targets, logits.device)
        if targets.dim() != 3:
            raise ValueError(f"targets must have 3 dims [N, H, W] (or be a list of [H, W]), got shape "
                             f"{tuple(targets.shape)}")
        if targets.shape[0] != n:
            raise ValueError(f"targets has {targets.shape[0]} masks but logits has {n} (N mismatch)")
        if targets.shape[1] == 0 or targets.shape[2] == 0:
            raise ValueError(f"targets are empty (shape {tuple(targets.shape)})")
        if resize == "none" and tuple(targets.shape[1:]) != (h, w):
            raise ValueError(f"resize='none' needs targets of the logits' size {(h, w)}, but targets have "
                             f"shape {tuple(targets.shape)}; use resize='logits' or 'targets'")
        return MaskBatch(logits=logits, stacked=targets, target_list=None, resize=resize, params=params)
    if isinstance(targets, (list, tuple)):
        if len(targets) == 0:
            raise ValueError("targets is an empty list; pass one [H, W] tensor per mask")
        if len(targets) != n:
            raise ValueError(f"targets has {len(targets)} masks but logits has {n} (N mismatch)")
        for i, t in enumerate(targets):
            _check_target(f"targets[{i}]", t, logits.device)
            if t.dim() != 2:
                raise ValueError(f"targets[{i}] must have 2 dims [H, W], got shape {tuple(t.shape)}")
            if t.shape[0] == 0 or t.shape[1] == 0:
                raise ValueError(f"targets[{i}] is empty (shape {tuple(t.shape)})")
            if resize == "none" and tuple(t.shape) != (h, w):
                raise ValueError(f"resize='none' needs targets of the logits' size {(h, w)}, but targets[{i}] "
                                 f"has shape {tuple(t.shape)}; use resize='logits' or 'targets'")
        return MaskBatch(logits=logits, stacked=None, target_list=list(targets), resize=resize, params=params)
    raise ValueError(f"targets must be a tensor [N, H, W] or a list of [H, W] tensors, got {type(targets).__name__}")


def count_nonfinite(logits: torch.Tensor) -> torch.Tensor:
    return (~torch.isfinite(logits)).sum()


def count_bad_targets(t: torch.Tensor) -> torch.Tensor:
    """Pixels outside [0, 1] (NaN included); 0-dim int64 tensor. Bool targets are always valid."""
    if t.dtype == torch.bool:
        return torch.zeros((), dtype=torch.int64, device=t.device)
    if t.dtype == torch.uint8:
        return (t > 1).sum()
    return (~((t >= 0) & (t <= 1))).sum()


def raise_for_bad_values(nonfinite_logits: int, bad_targets: int) -> None:
    if nonfinite_logits:
        raise ValueError(f"logits contain {nonfinite_logits} non-finite value(s) (NaN or inf)")
    if bad_targets:
        raise ValueError(f"targets contain {bad_targets} value(s) outside [0, 1] (or NaN); masks must be "
                         "binary or soft probabilities")


def raise_for_overflow(sums, logits: torch.Tensor) -> None:
    """Finite inputs whose loss sums still overflowed float32 (|logits| near float32's limit): an error, not inf."""
    import numpy as np

    if not np.isfinite(sums).all():
        biggest = float(logits.detach().abs().max())
        raise ValueError(f"logits are finite but the mask losses overflowed float32 (largest |logit| {biggest:.3g})")

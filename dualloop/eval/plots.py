"""Figures of a run: loss components and cycle IoU over steps, and qualitative examples."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dualloop.eval.metrics import predict_mask  # noqa: E402

LOSS_COMPONENTS = ("bce", "dice", "focal")


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and np.isfinite(v):
            xs.append(r.get("step", len(xs)))
            ys.append(float(v))
    return xs, ys


def plot_training_curves(metrics_path: str | Path, out_png: str | Path, smooth: int = 5) -> None:
    """Left: the total loss and its components; right: cycle IoU (moving average over `smooth` steps)."""
    rows = read_metrics(metrics_path)
    loss_keys = sorted({k for r in rows for k, v in r.items()
                        if (k.endswith("loss") or k in LOSS_COMPONENTS) and isinstance(v, (int, float))})
    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(11, 4))
    for key in loss_keys:
        xs, ys = _series(rows, key)
        if ys:
            ax_loss.plot(xs, _moving_average(ys, smooth), label=key)
    ax_loss.set_xlabel("step")
    ax_loss.set_title("losses (moving average)")
    ax_loss.legend(fontsize=7)
    xs, ys = _series(rows, "cycle_iou")
    if ys:
        ax_iou.plot(xs, ys, alpha=0.3, color="C0")
        ax_iou.plot(xs, _moving_average(ys, smooth), color="C0", label="cycle IoU (train batches)")
    ax_iou.set_xlabel("step")
    ax_iou.set_ylim(0, 1)
    ax_iou.set_title("cycle IoU")
    ax_iou.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _moving_average(ys: list[float], k: int) -> list[float]:
    out, acc = [], []
    for y in ys:
        acc.append(y)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _overlay(image: torch.Tensor, mask: torch.Tensor | None, color, pred: torch.Tensor | None = None) -> np.ndarray:
    img = image.permute(1, 2, 0).numpy().astype(np.float32) / 255.0
    if mask is not None:
        m = mask.numpy().astype(bool)
        img[m] = 0.5 * img[m] + 0.5 * np.array(color)
    if pred is not None:  # predicted mask as a contour-like tint
        p = pred.numpy().astype(bool)
        img[p] = 0.6 * img[p] + 0.4 * np.array((1.0, 0.0, 1.0))
    return img


def plot_examples(examples: list[dict], out_png: str | Path) -> None:
    """Per example: image1 with mask1 and the generated caption; image2 with true mask2 (green) and mask2′ (magenta)."""
    n = max(len(examples), 1)
    fig, axes = plt.subplots(n, 2, figsize=(6, 3 * n), squeeze=False)
    for row, ex in zip(axes, examples):
        row[0].imshow(_overlay(ex["image1"], ex["mask1"], (0.0, 0.6, 1.0)))
        row[0].set_title(f"{ex['dataset']}: \"{ex['caption']}\"", fontsize=8)
        pred = predict_mask(ex["logits2"], tuple(ex["mask2"].shape))
        row[1].imshow(_overlay(ex["image2"], ex["mask2"], (0.0, 1.0, 0.0), pred))
        row[1].set_title(f"mask2 (green) vs mask2' (magenta), IoU {ex['iou']:.2f}", fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)

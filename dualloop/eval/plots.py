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


def metric_series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
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
        xs, ys = metric_series(rows, key)
        if ys:
            ax_loss.plot(xs, moving_average(ys, smooth), label=key)
    ax_loss.set_xlabel("step")
    ax_loss.set_title("losses (moving average)")
    ax_loss.legend(fontsize=7)
    xs, ys = metric_series(rows, "cycle_iou")
    if ys:
        ax_iou.plot(xs, ys, alpha=0.3, color="C0")
        ax_iou.plot(xs, moving_average(ys, smooth), color="C0", label="cycle IoU (train batches)")
    ax_iou.set_xlabel("step")
    ax_iou.set_ylim(0, 1)
    ax_iou.set_title("cycle IoU")
    ax_iou.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def moving_average(ys: list[float], k: int) -> list[float]:
    out, acc = [], []
    for y in ys:
        acc.append(y)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _show(ax, image: torch.Tensor, outlines: list[tuple[torch.Tensor, str, str]]) -> None:
    """The image with mask outlines (colour, line style): outlines stay readable over coloured objects."""
    ax.imshow(image.permute(1, 2, 0).numpy())
    for mask, color, style in outlines:
        m = mask.float().numpy()
        if m.any():
            ax.contour(m, levels=[0.5], colors=[color], linestyles=[style], linewidths=1.5)
    ax.axis("off")


def plot_examples(examples: list[dict], out_png: str | Path) -> None:
    """Per example: image1 with mask1 (cyan) and the generated caption; image2 with the true mask2 (lime) and the
    predicted mask2′ (magenta, dashed)."""
    n = max(len(examples), 1)
    fig, axes = plt.subplots(n, 2, figsize=(6, 3 * n), squeeze=False)
    for row, ex in zip(axes, examples):
        _show(row[0], ex["image1"], [(ex["mask1"], "cyan", "solid")])
        row[0].set_title(f"{ex['dataset']}: \"{ex['caption']}\"", fontsize=8)
        pred = predict_mask(ex["logits2"], tuple(ex["mask2"].shape))
        _show(row[1], ex["image2"], [(ex["mask2"], "lime", "solid"), (pred, "magenta", "dashed")])
        row[1].set_title(f"mask2 (lime) vs mask2' (magenta), IoU {ex['iou']:.2f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)

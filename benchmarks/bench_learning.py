"""Does the cycle teach the model? Same seed, steps and data for caption_grad = none, gumbel, reinforce.

Runs the demo pipeline (synthetic corpus, tiny model, ZeRO-3, one process) once per mode and reports held-out cycle
IoU and grounding IoU before/after training, writing `learning.csv` and `learning.png` (`--name`) under --out.
CPU, minutes: `python benchmarks/bench_learning.py --steps 150 --out benchmarks/results [--set model.lora.dropout=0]`.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

MODES = ("none", "gumbel", "reinforce")
FIELDS = ["mode", "steps", "seed", "overrides", "device", "train_seconds", "loss_first", "loss_last",
          "cycle_iou_before", "cycle_iou_after", "grounding_iou_before", "grounding_iou_after"]


def plot(runs: dict[str, Path], rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dualloop.eval.plots import metric_series, moving_average, read_metrics

    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, run in runs.items():
        xs, ys = metric_series(read_metrics(run / "metrics.jsonl"), "cycle_iou")
        ax_curve.plot(xs, moving_average(ys, 10), label=mode)
    ax_curve.set_xlabel("step")
    ax_curve.set_ylabel("cycle IoU on training batches (moving avg 10)")
    ax_curve.legend()
    width = 0.2
    for k, key in enumerate(("cycle_iou_before", "cycle_iou_after", "grounding_iou_before", "grounding_iou_after")):
        ax_bar.bar([i + k * width for i in range(len(rows))], [r[key] for r in rows], width, label=key)
    ax_bar.set_xticks([i + 1.5 * width for i in range(len(rows))], [r["mode"] for r in rows])
    ax_bar.set_ylabel("held-out IoU")
    ax_bar.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--work", default="runs/bench_learning", help="where the per-mode runs go")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every mode, e.g. model.lora.dropout=0")
    p.add_argument("--name", default="learning", help="results are NAME.csv and NAME.png")
    args = p.parse_args(argv)
    from dualloop.demo import run_demo

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    rows, runs = [], {}
    for mode in args.modes:
        runs[mode] = work / mode
        s = run_demo(runs[mode], steps=args.steps, mode=mode, seed=args.seed, extra=args.set, examples=0)
        rows.append({"mode": mode, "seed": args.seed, "overrides": " ".join(args.set),
                     **{k: s[k] for k in FIELDS if k in s}})
        print(json.dumps(rows[-1]), flush=True)
    with open(out / f"{args.name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    plot(runs, rows, out / f"{args.name}.png")
    print(f"\n{'mode':<10} {'cycle IoU before→after':>24} {'grounding IoU before→after':>28}")
    for r in rows:
        print(f"{r['mode']:<10} {r['cycle_iou_before']:>11.3f} → {r['cycle_iou_after']:<10.3f}"
              f" {r['grounding_iou_before']:>13.3f} → {r['grounding_iou_after']:<10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

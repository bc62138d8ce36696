"""`dualloop verify-data --config CFG.yaml [--json FILE] [--samples K]`: counts, decoding and pairing checks.

Reads the `data:` section of the YAML itself (the data package does not depend on dualloop.config). Prints the
table (dataset, kind, path, samples, repeats, effective, total), decodes K samples per dataset WITHOUT replacing bad
ones, and exits 1 listing the problems (0 when there are none, 2 when the config cannot be read).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import yaml

from .base import DataError
from .masks import BadSample
from .mixture import open_dataset, parse_spec


def check_item(item: dict, kind: str, where: str) -> list[str]:
    """Contract checks of one decoded item; returns the problems found."""
    problems = []
    for tag in ("1", "2"):
        img, m = item[f"image{tag}"], item[f"mask{tag}"]
        if not (isinstance(img, torch.Tensor) and img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3):
            problems.append(f"{where}: image{tag} is not a uint8 tensor [3, H, W] ({getattr(img, 'shape', img)})")
            continue
        if not (isinstance(m, torch.Tensor) and m.dtype == torch.uint8 and tuple(m.shape) == tuple(img.shape[1:])):
            problems.append(f"{where}: mask{tag} is not uint8 [H, W] matching image{tag} "
                            f"({getattr(m, 'shape', m)} vs {tuple(img.shape)})")
            continue
        if int(m.max()) > 1:
            problems.append(f"{where}: mask{tag} has values other than 0/1")
        if int(m.sum()) == 0:
            problems.append(f"{where}: mask{tag} is empty")
    if kind == "sav":
        if not item["paired"]:
            problems.append(f"{where}: SA-V sample is not paired")
        elif torch.equal(item["image1"], item["image2"]):
            problems.append(f"{where}: SA-V pair shows the same frame twice (pixel-identical: a frame-seeking "
                            "problem, or a video that does not move)")
    elif item["paired"] or item["image2"] is not item["image1"]:
        problems.append(f"{where}: single-image sample must have image2 is image1 and paired=False")
    if not isinstance(item["captions"], list) or not all(isinstance(c, str) and c for c in item["captions"]):
        problems.append(f"{where}: captions must be a list of non-empty strings ({item['captions']!r})")
    return problems


def verify_specs(specs: list, samples: int, seed: int, max_bad_fraction: float) -> tuple[list[dict], list[str]]:
    rows, problems = [], []
    for k, spec in enumerate(specs or []):
        try:
            name, kind, root, repeats, options = parse_spec(spec, k)
        except ValueError as e:
            problems.append(str(e))
            continue
        row = {"name": name, "kind": kind, "root": str(root), "samples": 0, "repeats": repeats, "effective": 0}
        rows.append(row)
        options.setdefault("seed", seed)
        options.setdefault("max_bad_fraction", max_bad_fraction)
        try:
            ds = open_dataset(kind, root, **options)
        except (DataError, ValueError, TypeError, OSError) as e:
            # a reader's errors begin with its kind ("sav: ..."): the dataset's name only where it says more
            problems.append(str(e) if str(e).startswith(f"{name}:") else f"{name}: {e}")
            continue
        row["samples"] = len(ds)
        row["effective"] = int(round(len(ds) * repeats))
        problems.extend(f"{name}: {p}" for p in ds.index_problems)
        for i in dict.fromkeys(np.round(np.linspace(0, len(ds) - 1, max(samples, 0))).astype(int).tolist()):
            where = f"{name} sample {i}"
            try:
                item = ds.load(i)
            except BadSample as e:
                problems.append(f"{where}: {e}")
                continue
            where = f"{name} sample {i} ({item['key']})"
            problems.extend(check_item(item, kind, where))
            if kind == "sav":
                info = ds.sample_info(i)
                if info["frame1"] == info["frame2"]:
                    problems.append(f"{where}: pair uses frame {info['frame1']} twice")
    return rows, problems


def format_table(rows: list[dict], total: int, title: str) -> str:
    head = ("dataset", "kind", "path", "samples", "repeats", "effective")
    body = [(r["name"], r["kind"], r["root"], str(r["samples"]), f"{r['repeats']:g}", str(r["effective"]))
            for r in rows]
    body.append(("total", "", "", "", "", str(total)))
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.rjust(w) if j >= 3 else c.ljust(w)  # noqa: E731
                                   for j, (c, w) in enumerate(zip(cells, widths)))
    out = [title, line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dualloop verify-data", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML with a `data:` section (datasets, eval_datasets)")
    ap.add_argument("--json", help="write {datasets, total, problems} (and eval_datasets) here")
    ap.add_argument("--samples", type=int, default=4, help="samples decoded per dataset (default 4)")
    args = ap.parse_args(argv)
    try:
        with open(args.config) as f:
            cfg = yaml.safe_load(f) or {}
        data = cfg.get("data", cfg) if isinstance(cfg, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("datasets"), list):
            raise ValueError("expected a `data:` mapping with a `datasets:` list")
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"verify-data: cannot read {args.config}: {e}", file=sys.stderr)
        return 2
    seed = int(data.get("seed", 0))
    max_bad = float(data.get("max_bad_fraction", 0.01))
    rows, problems = verify_specs(data["datasets"], args.samples, seed, max_bad)
    total = sum(r["effective"] for r in rows)
    if not rows and not problems:
        problems.append("no datasets listed under data.datasets")
    report = {"datasets": rows, "total": total, "problems": problems}
    print(format_table(rows, total, f"datasets ({args.config})"))
    if data.get("eval_datasets"):
        eval_rows, eval_problems = verify_specs(data["eval_datasets"], args.samples, seed, max_bad)
        report["eval_datasets"] = eval_rows
        problems.extend(f"eval {p}" for p in eval_problems)
        print()
        print(format_table(eval_rows, sum(r["effective"] for r in eval_rows), "eval_datasets"))
    print()
    if problems:
        print(f"{len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
    else:
        print(f"no problems ({args.samples} samples decoded per dataset)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

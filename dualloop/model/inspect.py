"""`dualloop inspect --config CFG.yaml [--json FILE] [key=value ...]`: the model's parameter groups and totals.

Like PEFT's trainable-parameter summary, per component. Random-weight presets are built on the meta device (only
shapes are needed, so even `sa2va-1b-shape` costs no memory); `pretrained` loads its local checkpoints.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ..config import ConfigError, load_config


def summarize(model) -> dict:
    full = model.parameter_groups()
    groups = [{"name": g["name"], "params": g["params"], "trainable": g["trainable"]} for g in full]
    trainable = sum(g["trainable_params"] for g in full)
    total = sum(g["params"] for g in groups)
    from ..config import MODEL_CONVENTIONS

    return {"groups": groups, "trainable": trainable, "frozen": total - trainable, "vlm_family": model.vision.name,
            "conventions": {k: getattr(model.model_cfg, k) for k in MODEL_CONVENTIONS},
            # what a prompt's image costs: the LLM sees up to image_tokens_max tokens per image
            **model.vision.describe()}


def format_table(summary: dict, preset: str) -> str:
    width = max(len(g["name"]) for g in summary["groups"])
    lines = [f"model preset: {preset}", f"{'component'.ljust(width)}  {'params':>14}  state"]
    for g in summary["groups"]:
        state = "trainable" if g["trainable"] else "frozen"
        lines.append(f"{g['name'].ljust(width)}  {g['params']:>14,}  {state}")
    total = summary["trainable"] + summary["frozen"]
    pct = 100.0 * summary["trainable"] / max(total, 1)
    lines.append(f"trainable params: {summary['trainable']:,} || all params: {total:,} || trainable%: {pct:.4f}")
    if "conventions" in summary:
        per = (f"{summary['image_tokens_per_tile']} per tile, " if "image_tokens_per_tile" in summary
               else "by the image's area, ")
        lines.append(f"VLM: {summary['vlm_family']} || conventions: "
                     + " ".join(f"{k}={v}" for k, v in summary["conventions"].items())
                     + f" || image tokens: {per}up to {summary['image_tokens_max']} per image")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dualloop inspect", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="training config YAML (its `model:` section is used)")
    parser.add_argument("--json", dest="json_file", default=None, help="also write the summary as JSON here")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. model.preset=small")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"dualloop inspect: {e}", file=sys.stderr)
        return 2
    from .build import build_model

    try:
        if cfg.model.preset == "pretrained":
            model = build_model(cfg.model)
        else:
            with torch.device("meta"):
                model = build_model(cfg.model)
    except ValueError as e:
        print(f"dualloop inspect: {e}", file=sys.stderr)
        return 2
    summary = summarize(model)
    print(format_table(summary, cfg.model.preset))
    if args.json_file:
        with open(args.json_file, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

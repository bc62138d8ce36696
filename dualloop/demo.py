"""`dualloop demo`: the whole system on a laptop-sized problem.

synthetic corpus (the four real layouts) → `tiny` model → dual loop under DeepSpeed ZeRO-3 in one process (CPU, or
the GPU when there is one) → held-out cycle IoU and grounding IoU before and after → summary.json, metrics.jsonl,
TensorBoard events, a checkpoint, loss.png and examples.png under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

# Demo defaults: sized so the default run finishes within ~5 minutes on 2 CPU cores (see README).
DEMO_STEPS = 450
DEMO_OVERRIDES = {
    # LoRA r=16 (the default 128 exceeds the tiny LLM's width of 64); the random-weight vision encoder is trained too,
    # since region captions and grounding both hinge on its features (frozen in the Sa2VA recipe for real weights).
    "model": {"preset": "tiny", "lora": {"r": 16, "alpha": 32}, "train": {"vision_encoder": True}},
    "train": {
        "micro_batch_size": 4, "grad_accum": 1, "lr": 2e-3, "weight_decay": 0.0, "warmup_ratio": 0.05,
        "min_lr_ratio": 0.1, "ds_config": "zero3_bf16", "precision": "auto", "save_every": 10_000, "keep_last": 1,
        "activation_checkpointing": False, "log_every": 1,
    },
    "loop": {"caption": {"max_new_tokens": 8}},
    "eval": {"samples": 16, "batch_size": 8},
}


def demo_config(out: Path, steps: int, mode: str, data_yaml: Path, extra: list[str] | None = None):
    from dualloop.config import load_config

    base = yaml.safe_load(data_yaml.read_text())
    base.update({k: dict(v) for k, v in DEMO_OVERRIDES.items()})
    base["train"].update({"steps": steps, "output_dir": str(out), "resume": "none"})
    base["data"]["num_workers"] = 1  # two cores: one for the step, one for decoding
    base["loop"] = {**base["loop"], "caption_grad": mode}
    return load_config(None, extra or [], base=base)


def run_demo(out: Path, steps: int = DEMO_STEPS, mode: str = "none", seed: int = 0,
             extra: list[str] | None = None, examples: int = 4) -> dict:
    """Run the demo; returns the summary dict (also written to out/summary.json)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from dualloop.data import write_synthetic_corpus
    from dualloop.eval.evaluate import eval_specs, evaluate_model, open_eval_datasets
    from dualloop.eval.plots import plot_examples, plot_training_curves
    from dualloop.train.trainer import Trainer

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = write_synthetic_corpus(out / "data", seed=seed)
    cfg = demo_config(out, steps, mode, Path(paths["config"]), [f"train.seed={seed}", *(extra or [])])
    heldout = open_eval_datasets(*eval_specs(cfg))
    trainer = Trainer(cfg)
    kw = dict(samples=cfg.eval.samples, batch_size=cfg.eval.batch_size, max_new_tokens=cfg.loop.caption.max_new_tokens,
              answer=cfg.eval.answer)
    before = evaluate_model(trainer.model, heldout, **kw)
    train_summary = trainer.fit()
    after = evaluate_model(trainer.model, heldout, keep_examples=examples, **kw)
    plot_training_curves(out / "metrics.jsonl", out / "loss.png")
    plot_examples(after["examples"], out / "examples.png")
    summary = {
        "steps": steps, "mode": mode, "device": train_summary["device"],
        "seconds": time.perf_counter() - t0, "train_seconds": train_summary["seconds"],
        "samples_per_s": train_summary["samples_per_s"],
        "loss_first": train_summary["loss_first"], "loss_last": train_summary["loss_last"],
        "cycle_iou_before": before["cycle"]["giou"], "cycle_iou_after": after["cycle"]["giou"],
        "grounding_iou_before": before["grounding"]["giou"], "grounding_iou_after": after["grounding"]["giou"],
        "per_dataset_after": {"cycle": after["cycle"]["per_dataset"], "grounding": after["grounding"]["per_dataset"]},
        "checkpoint": train_summary["checkpoint"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dualloop demo", description=__doc__)
    p.add_argument("--steps", type=int, default=DEMO_STEPS)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--mode", choices=["none", "gumbel", "reinforce"], default="none", help="loop.caption_grad")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    from dualloop.train.stop import TrainingStopped

    try:
        s = run_demo(Path(args.out), args.steps, args.mode, args.seed, args.overrides)
    except TrainingStopped as e:  # Ctrl-C / SIGTERM: training saved its checkpoint, no evaluation
        print(f"dualloop demo: {e}", file=sys.stderr)
        return e.exit_code
    print(f"\ndemo done in {s['seconds']:.0f} s on {s['device']} ({s['samples_per_s']:.1f} samples/s)")
    print(f"  loss            {s['loss_first']:.4f} → {s['loss_last']:.4f}")
    print(f"  cycle IoU       {s['cycle_iou_before']:.3f} → {s['cycle_iou_after']:.3f}  (held-out, caption → segment)")
    print(f"  grounding IoU   {s['grounding_iou_before']:.3f} → {s['grounding_iou_after']:.3f}  (from GT captions)")
    print(f"  outputs in {args.out}: summary.json metrics.jsonl loss.png examples.png checkpoints/ tensorboard/ "
          "config.yaml data/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`dualloop <command> [args]`: a thin dispatcher; each command's module owns its own argument parser.

Commands are imported lazily so `dualloop synth-data` does not pay for importing DeepSpeed and transformers.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("dualloop.demo", "synthetic corpus → tiny model → dual loop under ZeRO-3 → before/after cycle IoU"),
    "train": ("dualloop.train.trainer", "train with a YAML config (same code as `deepspeed --module dualloop.train`)"),
    "eval": ("dualloop.eval.evaluate", "cycle IoU and referring-segmentation cIoU/gIoU of a checkpoint"),
    "predict": ("dualloop.eval.predict", "one image: caption a mask's region and segment it back, or segment a text"),
    "export": ("dualloop.train.export", "a checkpoint → one model, LoRA merged (vlm/ + sam2/, each weight once)"),
    "convert-sa2va": ("dualloop.model.convert_sa2va", "a Sa2VA release → vlm/ + sam2/ for preset pretrained"),
    "inspect": ("dualloop.model.inspect", "print the model's parameter groups, trainable or frozen"),
    "synth-data": ("dualloop.data.synthetic", "write a small corpus in the four real dataset layouts"),
    "verify-data": ("dualloop.data.verify", "check the datasets of a config: counts, decoding, pairing"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: dualloop <command> [args]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dualloop: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    code = module.main(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())

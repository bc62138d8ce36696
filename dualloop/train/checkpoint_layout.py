"""Where a run's checkpoints and their parts lie, and what their files are named (checkpoint.py writes and reads
them, reshard.py converts them for another number of ranks or ZeRO stage family).

<output_dir>/checkpoints/step_00000100/{DeepSpeed files, rng_state_rank{R}.pt, trainer_state.json, config.yaml,
COMPLETE, universal/ (its conversion, when made)}, <output_dir>/checkpoints/latest (a text file holding the tag) and
<output_dir>/checkpoints/.conversion-of-step_00000100-<id>/universal/ (this run's conversion of another run's).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch.distributed as dist

LATEST = "latest"
COMPLETE = "COMPLETE"
TAG_PREFIX = "step_"
UNIVERSAL = "universal"  # a checkpoint's conversion for another number of ranks or stage (reshard.py)
UNIVERSAL_SOURCE = "source.json"  # in it: the shards it was made from (a step saved again is not reused)
FOREIGN_CONVERSION = ".conversion-of-"  # this run's conversion of another run's checkpoint (reshard.py)
# DeepSpeed's ZeRO shard of one rank: (rank, "model" | "optim")
SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_(model|optim)_states\.pt$")
# ZeRO-1/2's one model-state file (whole weights; ZeRO-3 writes one SHARD of them per rank)
WHOLE_MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_RANK0_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # the one a universal load reads under ZeRO-3
# files a save writes per rank: those shards, our RNG and extra state
PER_RANK_FILE = re.compile(rf"{SHARD.pattern}|(rng|rank)_state_rank\d+\.pt$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def this_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_own(ckpt: Path, output_dir: str | Path) -> bool:
    """`ckpt` is one of the checkpoints of the run writing to `output_dir`."""
    return Path(ckpt).resolve().parent == checkpoint_root(output_dir).resolve()


def shard_ranks(ckpt: Path) -> dict[str, set[int]]:
    """The ranks whose model-state and optimizer shards `ckpt` holds."""
    ranks_of = {"model": set(), "optim": set()}
    for f in ckpt.iterdir():
        if m := SHARD.search(f.name):
            ranks_of[m.group(2)].add(int(m.group(1)))
    return ranks_of


def conversions(home: Path) -> list[Path]:
    """The conversion in `home` (a checkpoint, or this run's directory for another run's) and the remains of
    conversions killed half-way."""
    if not home.is_dir():
        return []
    return [p for p in home.iterdir() if p.name == UNIVERSAL or p.name.startswith(f".{UNIVERSAL}.partial-")]

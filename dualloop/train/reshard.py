"""Resuming on another number of ranks, or under the other ZeRO stage family (3 against 1-2): a checkpoint's shards
are converted once into DeepSpeed's universal format, in step_00000100/universal/ (whole weights and Adam moments
per parameter, written into a hidden directory and renamed when complete), which an engine built with
"checkpoint": {"load_universal": true} partitions for its own ranks and stage. The conversion of another run's
checkpoint (which may be read-only, and is not this run's to write into) goes into this run's
<output_dir>/checkpoints/.conversion-of-step_00000100-<id>/universal/ instead, removed once this run has saved a
checkpoint of its own (checkpoint.save).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dualloop.config import ConfigError
from dualloop.distributed import every_rank
from dualloop.files import fsync_dir, fsync_tree, write_atomic
from dualloop.train.checkpoint_layout import (
    FOREIGN_CONVERSION,
    UNIVERSAL,
    UNIVERSAL_SOURCE,
    WHOLE_MODEL_STATES,
    ZERO3_RANK0_MODEL_STATES,
    checkpoint_root,
    conversions,
    is_own,
    shard_ranks,
    this_rank,
)


def saved_world_size(ckpt: Path, default: int) -> int:
    """The number of ranks that wrote checkpoint `ckpt` (`default` for one that did not record it)."""
    return int(json.loads((ckpt / "trainer_state.json").read_text()).get("world_size", default))


def conversion_home(ckpt: Path, output_dir: str | Path | None) -> Path:
    """The directory that holds the conversion of `ckpt` (its `universal/`, and the hidden remains of one made
    half-way) for the run writing to `output_dir`: the checkpoint itself when it is one of this run's (or no run is
    named), else a hidden directory named after it in this run's checkpoint directory."""
    ckpt = Path(ckpt)
    if output_dir is None or is_own(ckpt, output_dir):
        return ckpt
    digest = hashlib.sha256(str(ckpt.resolve()).encode()).hexdigest()[:12]
    return checkpoint_root(output_dir) / f"{FOREIGN_CONVERSION}{ckpt.name}-{digest}"


def prepare_resume(ckpt: Path, world_size: int, stage: int, log=None, output_dir: str | Path | None = None
                   ) -> int | None:
    """Collective, before the engine is built: None when `ckpt` was written by `world_size` ranks under this run's
    ZeRO stage family; else the number of ranks that wrote it, once its conversion exists (in
    `conversion_home(ckpt, output_dir)`: rank 0 makes it, or reuses a complete one made from these shards; the
    others wait), and the engine must be built with `universal_load_config` (DeepSpeed's own load fails on a
    checkpoint of the other stage family with a bare assertion). A checkpoint that cannot be converted is a
    ConfigError on every rank naming it and why."""
    change = stage_change(ckpt, stage)
    saved = saved_world_size(ckpt, world_size)
    if saved == world_size and change is None:
        return None
    home = conversion_home(ckpt, output_dir)
    error = note = None
    if this_rank() == 0:
        note, error = _while_the_others_wait(lambda: _convert_once(ckpt, saved, stage, home, change))
        if isinstance(error, ConfigError):
            error = str(error)
        elif error is not None:
            under = f" under ZeRO stage {stage}" if change else ""
            error = (f"converting checkpoint {ckpt} for {ranks(world_size)}{under} failed: {type(error).__name__}: "
                     f"{error}")
    else:
        _while_the_others_wait(None)
    error = every_rank(error)[0]
    if error is not None:
        raise ConfigError(error)
    blind = [r for r, seen in enumerate(every_rank(conversion_matches(ckpt, home))) if not seen]
    if blind:
        raise ConfigError(f"the conversion {home / UNIVERSAL} that rank 0 made is not visible to rank(s) "
                          f"{', '.join(map(str, blind))}: it must be on a filesystem every node sees")
    if log is not None:
        why = "; it ".join(([f"was written by {ranks(saved)}, this run has {world_size}"] if saved != world_size
                            else []) + ([change] if change else []))
        log(f"checkpoint {ckpt} {why}: {note}; loading it from there (DeepSpeed universal checkpoint: weights and "
            f"Adam moments repartitioned for {ranks(world_size)} under ZeRO stage {stage})")
    return saved


# While rank 0 converts, every rank meets it in a small collective this often: the whole fp32 weights and Adam
# moments are read and written (all-trained 8B: ~100 GB), which can outlast the process group's timeout (30 min), and
# one long wait in a collective would make the waiting ranks abort; a rank that dies still ends the others' wait.
CONVERSION_POLL_S = 30.0


def _while_the_others_wait(work):
    """Rank 0: (work()'s result, None) or (None, the exception it raised), run in a thread while this thread meets
    the other ranks every CONVERSION_POLL_S; the other ranks (work None): wait until it is done."""
    import threading

    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    box = {"result": None, "error": None}

    def run():
        try:
            box["result"] = work()
        except Exception as e:  # noqa: BLE001 - handed to the caller, which tells every rank
            box["error"] = e

    if not multi:
        if work is not None:
            run()
        return box["result"], box["error"]
    thread = None
    if work is not None:
        thread = threading.Thread(target=run, name="checkpoint-conversion", daemon=True)
        thread.start()
    while True:
        if thread is not None:
            thread.join(CONVERSION_POLL_S)
        if every_rank(thread is not None and not thread.is_alive())[0]:  # rank 0's answer
            return box["result"], box["error"]


def ranks(n: int) -> str:
    return f"{n} rank{'s' if n != 1 else ''}"


def universal_load_config(ds_config: dict) -> dict:
    """A copy of `ds_config` whose engine loads DeepSpeed's universal format (the flag is read only when loading)."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def _convert_once(ckpt: Path, saved_world: int, stage: int, home: Path, change: str | None = None) -> str:
    """Rank 0: a complete conversion of `ckpt` in home/universal, made now or before; says which."""
    problem = _why_not_convertible(ckpt, saved_world, stage)
    if problem is None and conversion_matches(ckpt, home):
        if change:
            _for_either_stage(home / UNIVERSAL / ckpt.name)
        return f"reusing its conversion {home / UNIVERSAL}"
    problem = problem or _no_room(ckpt, home)
    if problem is not None:
        same = f"with {ranks(saved_world)}" + (" under the ZeRO stage it was written with" if change else "")
        raise ConfigError(f"checkpoint {ckpt} was written by {ranks(saved_world)}{f'; it {change}' if change else ''}"
                          f"; it cannot be converted for this run: {problem}. Resume {same} (or export and start a "
                          "new run)")
    started = time.perf_counter()
    note = _convert(ckpt, home)
    if change:
        _for_either_stage(home / UNIVERSAL / ckpt.name)
    return f"{note} ({time.perf_counter() - started:.1f} s)"


def _shard_files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.iterdir() if p.name.endswith(("_optim_states.pt", "_model_states.pt")))


def _why_not_convertible(ckpt: Path, saved_world: int, stage: int) -> str | None:
    """What keeps DeepSpeed's converter from making `ckpt` loadable on another number of ranks by a run of ZeRO
    stage `stage` (None: nothing). Checked for our models (frozen weights, LoRA, new-token rows, several parameter
    groups, bf16 and fp32) under ZeRO-3, and ZeRO-2 with bf16, and from either stage family to the other."""
    if stage not in (1, 2, 3):
        return f"this run's ds_config has ZeRO stage {stage} (the conversion is made for ZeRO stages 1-3)"
    whole_weights = (ckpt / WHOLE_MODEL_STATES).is_file()
    held = shard_ranks(ckpt)
    kinds = ("optim",) if whole_weights else ("model", "optim")
    missing = [f"rank {r}'s {kind} shard" for r in range(saved_world) for kind in kinds if r not in held[kind]]
    if missing:
        return f"it lacks {', '.join(missing)}"
    beyond = sorted({r for kind in held.values() for r in kind if r >= saved_world})
    if beyond:
        return (f"it holds shards of rank(s) {', '.join(map(str, beyond))}, beyond the {ranks(saved_world)} that "
                "wrote it")
    if any(p.name != WHOLE_MODEL_STATES and "_mp_rank_00_" not in p.name for p in _shard_files(ckpt)):
        return "it holds tensor-parallel shards (mp_rank > 0)"
    return None


def stage_change(ckpt: Path, stage: int) -> str | None:
    """How `ckpt`'s ZeRO stage family differs from this run's `stage` (None: the same). ZeRO-3 partitions the weights
    (a model-state shard per rank); below stage 3 they are whole (one model-state file)."""
    whole_weights = (ckpt / WHOLE_MODEL_STATES).is_file()
    if whole_weights == (stage < 3):
        return None
    written = "stage 1 or 2 (mp_rank_00_model_states.pt)" if whole_weights else "stage 3"
    return f"was written under ZeRO {written} and this run's ds_config has stage {stage}"


def _for_either_stage(converted: Path) -> None:
    """Makes the conversion `converted` (<home>/universal/<tag>) loadable by an engine of either ZeRO stage family.
    DeepSpeed's converter writes what the source's own family reads back:
    - the model-state file, whose bookkeeping (step, schedule, client state) a universal load reads, by the name its
      stage writes (ZeRO-1/2: mp_rank_00_model_states.pt; ZeRO-3: rank 0's shard): it gets the other name too (a
      hard link where the filesystem allows);
    - from ZeRO-3, each weight's fp32 value and Adam moments as bare flat tensors and Adam's step only in the global
      zero/optimizer_state.pt, which has no DeepSpeed version; ZeRO-1/2's load wants {"param": tensor}, a step.pt
      per weight and the version;
    - from ZeRO-1/2, a global state without ZeRO-3's "optimizer_state_dict" (Adam's step and the groups' settings).
    Each file is replaced whole, and what is already there is kept, so an interrupted run of this is finished by the
    next. Both families read both forms."""
    import deepspeed
    from deepspeed.checkpoint.constants import DS_VERSION, OPTIMIZER_STATE_DICT, PARAM, PARAM_GROUPS

    names = (WHOLE_MODEL_STATES, ZERO3_RANK0_MODEL_STATES)
    present = [n for n in names if (converted / n).is_file()]
    wrote = len(present) == 1
    if wrote:
        target = converted / next(n for n in names if n not in present)
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")  # two jobs resuming from it at once
        partial.unlink(missing_ok=True)
        try:
            os.link(converted / present[0], partial)
        except OSError:
            shutil.copy2(converted / present[0], partial)
        os.replace(partial, target)
    zero = converted / "zero"
    global_file = zero / "optimizer_state.pt"
    state = _load(global_file)
    weights = sorted(d for d in zero.iterdir() if d.is_dir())
    changed = DS_VERSION not in state
    state.setdefault(DS_VERSION, deepspeed.__version__)
    if OPTIMIZER_STATE_DICT in state:  # from ZeRO-3
        step = state[OPTIMIZER_STATE_DICT]["state"][0]["step"]
        for weight in weights:
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                if (weight / f"{key}.pt").is_file() and torch.is_tensor(value := _load(weight / f"{key}.pt")):
                    _save_replacing(weight / f"{key}.pt", {PARAM: value}, zero)
                    wrote = True
            if not (weight / "step.pt").is_file():
                _save_replacing(weight / "step.pt", step, zero)
                wrote = True
    else:  # from ZeRO-1/2: every trained weight has the same step
        step = next(_load(w / "step.pt") for w in weights if (w / "step.pt").is_file())
        state[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, PARAM_GROUPS: state[PARAM_GROUPS]}
        changed = True
    if changed:
        _save_replacing(global_file, state, zero)
    if wrote or changed:  # a conversion fixed up before was synced then
        fsync_tree(converted)


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _save_replacing(path: Path, value, scratch: Path) -> None:
    """`value` into `path` whole. The partial file is written in `scratch` (the conversion's zero/, whose files
    DeepSpeed does not list: in a weight's own directory its loader would take a leftover for a state), under a name
    of this process's (jobs resuming from one checkpoint at once)."""
    partial = scratch / f".{path.parent.name}.{path.name}.partial-{os.getpid()}"
    torch.save(value, partial)
    os.replace(partial, path)


def _no_room(ckpt: Path, home: Path) -> str | None:
    """Why the conversion of `ckpt` does not fit in `home`'s filesystem (None: it fits)."""
    there = next(p for p in (home, *home.parents) if p.exists())
    free, need = shutil.disk_usage(there).free, _conversion_bytes(ckpt)
    if free < need:
        return (f"the conversion needs about {need / (1 << 30):.2f} GB in {home} (the fp32 weights and Adam moments "
                f"twice while it runs), {free / (1 << 30):.2f} GB are free")
    return None


def _conversion_bytes(ckpt: Path) -> int:
    """Peak disk use of the conversion: the optimizer shards cut into per-parameter pieces, then merged (the pieces
    are removed at the end), and a copy of the model-state files; from ZeRO-1/2 also every weight in fp32 (frozen
    ones too: DeepSpeed writes a value for each weight the optimizer holds none of), twice a bf16 file."""
    def factor(name: str) -> int:
        return 2 if name.endswith("_optim_states.pt") else 3 if name == WHOLE_MODEL_STATES else 1

    return sum(factor(p.name) * p.stat().st_size for p in _shard_files(ckpt))


def _source(ckpt: Path) -> dict:
    """What a conversion was made from: the shard files' names, sizes and modification times."""
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in _shard_files(ckpt)}
    return {"tag": ckpt.name, "files": files}


def conversion_matches(ckpt: Path, home: Path | None = None) -> bool:
    """home/universal (home: ckpt unless named) is complete (it exists only once renamed into place) and was made
    from ckpt's shards as they are: a step saved again since (a rollback) would otherwise load the old
    conversion."""
    record = (home or ckpt) / UNIVERSAL / UNIVERSAL_SOURCE
    try:
        return json.loads(record.read_text()) == _source(ckpt)
    except (OSError, ValueError):
        return False


def remove_conversions(ckpt: Path) -> None:
    for path in conversions(ckpt):
        shutil.rmtree(path)


def _partial_name() -> str:
    import socket

    return f".{UNIVERSAL}.partial-{socket.gethostname()}-{os.getpid()}"


def _is_stale(partial: Path) -> bool:
    """A conversion's remains whose process is gone (this host's only: another host's may still be converting)."""
    import socket

    host_pid = partial.name.removeprefix(f".{UNIVERSAL}.partial-")
    host, _, pid = host_pid.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _convert(ckpt: Path, home: Path) -> str:
    """DeepSpeed's ds_to_universal of `ckpt` into a hidden directory in `home`, renamed to home/universal once whole
    and on disk: a kill or a full disk leaves no conversion that looks complete (a later one removes the remains).
    Another job converting the same checkpoint at once (runs resumed from one of theirs) keeps its own hidden
    directory; the first to finish puts its conversion in place and the other uses it. One process (its parallel
    mode forks workers from a process that holds a process group and maybe CUDA); its progress output is kept out
    of the training log, and shown when it fails."""
    from deepspeed.checkpoint import ds_to_universal

    for path in conversions(home):  # one made from shards saved again since, or the remains of a killed one
        if path.name == UNIVERSAL or _is_stale(path):
            shutil.rmtree(path)
    home.mkdir(parents=True, exist_ok=True)
    partial = home / _partial_name()
    args = argparse.Namespace(input_folder=str(ckpt), output_folder=str(partial / ckpt.name), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # ZeRO-1/2: DeepSpeed writes the (version) record only for Megatron-style models
                              inject_missing_state=True)
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            ds_to_universal.main(args)
        write_atomic(partial / UNIVERSAL_SOURCE, json.dumps(_source(ckpt)))
        fsync_tree(partial)
        try:
            os.rename(partial, home / UNIVERSAL)
        except OSError:
            if not conversion_matches(ckpt, home):
                raise
            shutil.rmtree(partial, ignore_errors=True)
            return f"reusing its conversion {home / UNIVERSAL}, which another job finished first"
        fsync_dir(home)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, Exception):
            said = output.getvalue().strip().splitlines()[-5:]
            raise RuntimeError(f"{e}{' (DeepSpeed said: ' + ' | '.join(said) + ')' if said else ''}") from e
        raise
    return f"converted it once into {home / UNIVERSAL}"

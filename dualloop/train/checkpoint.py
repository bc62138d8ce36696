"""Checkpoints: DeepSpeed's sharded model/optimizer/scheduler states plus what DeepSpeed does not keep for us -
the RNG states of every rank and the trainer state (step, data position, skip counters) - and the `latest`
pointer, which moves (atomic rename) only after every rank has finished writing and flushed its files (fsync), so a
crash or power loss leaves either the previous checkpoint or the new one, complete. A write failing on some ranks
only (a disk filled half-way through) is raised on every rank, none waiting in a collective for the ones that failed.

Layout: checkpoint_layout.py. A checkpoint of another number of ranks loads from its conversion (reshard.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dualloop.config import Config, ConfigError, save_config
from dualloop.distributed import every_rank
from dualloop.files import fsync_dir, fsync_tree, write_atomic
from dualloop.train.checkpoint_layout import (
    COMPLETE,
    FOREIGN_CONVERSION,
    LATEST,
    PER_RANK_FILE,
    TAG_PREFIX,
    UNIVERSAL,
    checkpoint_root,
    conversions,
    is_own,
    tag_for,
    this_rank,
)
from dualloop.train.reshard import conversion_home, conversion_matches, ranks, remove_conversions, stage_change


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def check_output_dir(output_dir: str | Path) -> None:
    """Collective: fail at start-up, on every rank, with a ConfigError naming train.output_dir, when it cannot be
    created, when rank 0 cannot write there (read-only, no permission, full), or when some rank does not see what
    rank 0 writes. Found only at the first checkpoint, that would be after hours of training (and one rank failing
    alone leaves the others waiting in a collective). Rank 0 alone writes the trainer state, COMPLETE and `latest`:
    on node-local disks the other nodes would find no checkpoint and start over while rank 0 resumes, and the ranks
    would wait on each other's collectives."""
    import socket
    import uuid

    out = Path(output_dir)
    where = f"train.output_dir={str(output_dir)!r}"
    error = None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        error = f"{where} cannot be created: {e}"
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    name = f".shared_probe_{uuid.uuid4().hex}" if this_rank() == 0 else None
    probe = out / (every_rank(name)[0] if multi else name)
    if this_rank() == 0 and error is None:
        try:
            write_atomic(probe, "dualloop: checking that every rank sees this directory\n")
        except OSError as e:
            error = f"{where} is not writable: {e}"
    _barrier()
    seen = every_rank((socket.gethostname(), probe.is_file(), error))
    if this_rank() == 0 and error is None:
        probe.unlink(missing_ok=True)
    errors = [e if len(seen) == 1 else f"rank {r}: {e}" for r, (_, _, e) in enumerate(seen) if e is not None]
    if errors:
        raise ConfigError("; ".join(errors))
    blind = [f"rank {r} on {host}" for r, (host, ok, _) in enumerate(seen) if not ok]
    if blind:
        raise ConfigError(f"{where} is not shared by all ranks: a file rank 0 wrote "
                          f"there is not visible to {', '.join(blind)}. Checkpoints need a directory every node "
                          "sees (a shared filesystem).")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class NoRoomForCheckpoint(RuntimeError):
    """Too little free space for the next checkpoint, found before anything was written, on every rank."""


def _dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:  # removed meanwhile
                pass
    return total


def _model_state_bytes(engine) -> int:
    """A first checkpoint's size from the parameters: fp32 master weights and Adam's two moments of the trainable
    ones; below ZeRO-3 the 16-bit module weights too. Frozen weights are not in a ZeRO-3 checkpoint."""
    module = getattr(engine, "module", None)
    if module is None:
        return 0
    from dualloop.model.trainable import numel  # a ZeRO-3 partition holds no elements here

    trainable = every = 0
    for p in module.parameters():
        n = numel(p)
        every += n
        trainable += n if p.requires_grad else 0
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 3
    return 12 * trainable + (2 * every if stage < 3 else 0)


def _bytes_needed(root: Path, tag: str, engine) -> int:
    """What writing checkpoint `tag` takes on the disk: the size of the newest complete checkpoint (estimated from
    the parameters for the first one), less what `tag` already holds (a step saved again is overwritten)."""
    previous = max((p for p in root.iterdir() if p.name.startswith(TAG_PREFIX) and p.name != tag
                    and (p / COMPLETE).is_file()), key=lambda p: p.name, default=None)
    need = _checkpoint_bytes(previous) if previous is not None else _model_state_bytes(engine)
    return max(need - _dir_bytes(root / tag), 0)


def _checkpoint_bytes(ckpt: Path) -> int:
    """What a checkpoint's own files take, not a conversion of it for another number of ranks."""
    return _dir_bytes(ckpt) - sum(_dir_bytes(p) for p in conversions(ckpt))


def make_room(root: Path, tag: str, engine, keep_last: int) -> tuple[str | None, list[str]]:
    """Rank 0, before a save: (an error message when the checkpoint will not fit, the checkpoints removed early).
    A disk that fills half-way through DeepSpeed's save fails the ranks that hit it while the others wait in its
    barriers until the process-group timeout; checked here, every rank stops at once with the reason. When the
    checkpoints that the pruning after this save removes anyway (dead saves; with keep_last >= 2 the complete ones
    beyond keep_last - 1) would make room, they go first: the newest complete one always stays."""
    need = int(_bytes_needed(root, tag, engine) * 1.05) + (16 << 20)  # margin: RNG/trainer state, size changes
    free = shutil.disk_usage(root).free
    if free >= need:
        return None, []
    doomed, complete = _superseded(root, tag, max(keep_last - 1, 1) if keep_last > 0 else None)
    freed = sum(_dir_bytes(p) for p in doomed)
    gb = 1 << 30
    if free + freed < need:
        newest = complete[-1].name if complete else None
        fewer = f" or lower train.keep_last (now {keep_last})" if keep_last != 1 else ""
        taken = f" ({newest} takes {_checkpoint_bytes(complete[-1]) / gb:.2f} GB)" if newest else ""
        return (f"no room for the checkpoint {tag} in {root}: {free / gb:.2f} GB free, it needs about "
                f"{need / gb:.2f} GB{taken}"
                ". Nothing was written"
                f"{f'; {newest} is intact and the run resumes from it' if newest else ''}. Free space there"
                f"{fewer} and start again with train.resume=auto."), []
    _remove(doomed)
    return None, [p.name for p in doomed]


def save(engine, output_dir: str | Path, step: int, trainer_state: dict, cfg: Config, keep_last: int = 2,
         rank_state: dict | None = None, log=None) -> Path:
    """Collective: every rank must call it. `rank_state`: extra per-rank state (e.g. the caption EMA partition).
    Returns the checkpoint directory. Raises NoRoomForCheckpoint on every rank, before writing, when the disk
    lacks the room, and CheckpointWriteFailed (one too) on every rank when a write fails on any rank half-way;
    `log(msg)` hears of checkpoints removed early to make room."""
    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    rank = this_rank()
    ckpt = root / tag
    problem, removed = None, []
    writes = _Writes()
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            problem, removed = make_room(root, tag, engine, keep_last)
        except OSError as e:  # told to every rank below: raised here alone, it would leave them waiting
            problem = f"cannot check the room for the checkpoint {tag} in {root}: {e}"
        if problem is None and ckpt.is_dir():
            # this step was saved before (a resumed run redoing steps, a rollback, a save killed half-way): it is
            # written again in place, and a crash half-way must not leave the old marker vouching for a mix of old
            # and new shards; nor may the old run's files stay beside the new ones (a run on fewer ranks would leave
            # the others' shards, which export and a conversion would take as part of it), nor its conversion
            writes.run(f"withdrawing the {COMPLETE} marker of {ckpt} and clearing its old files (the step is saved "
                       "again)", _clear_for_saving_again, ckpt)
    problem = every_rank(problem)[0]
    if problem is not None:
        raise NoRoomForCheckpoint(problem)
    if removed and log is not None:
        log(f"made room for {tag}: removed {', '.join(removed)} before the save (the pruning after it would have)")
    _agree(writes, ckpt, written=False)  # also the barrier: no rank overwrites a shard before the marker is gone
    with _writes_through(engine, writes):
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    for name, state in ((f"rng_state_rank{rank}.pt", rng_state()), (f"rank_state_rank{rank}.pt", rank_state)):
        if state is not None:
            writes.run(f"writing {ckpt / name}", torch.save, state, ckpt / name)
    if rank == 0:
        writes.run(f"writing {ckpt / 'trainer_state.json'}", (ckpt / "trainer_state.json").write_text,
                   json.dumps(trainer_state, indent=1))
        writes.run(f"writing {ckpt / 'config.yaml'}", save_config, cfg, ckpt / "config.yaml")
    # each rank flushes what it sees (its own shards at least; fsync of clean files is cheap)
    writes.run(f"flushing {ckpt} to disk", fsync_tree, ckpt)
    _agree(writes, ckpt)  # every rank's shards and RNG state are on disk
    if rank == 0:
        writes.run(f"writing {ckpt / COMPLETE}", write_atomic, ckpt / COMPLETE, str(step))
        writes.run(f"writing {root / LATEST}", write_atomic, root / LATEST, tag)  # on failure _agree withdraws COMPLETE
        if writes.error is None:
            try:
                _prune(root, keep_last, keep=tag)
                _remove(sorted(root.glob(f"{FOREIGN_CONVERSION}*")))  # resumed from another run's: no longer needed
            except OSError as e:  # the checkpoint is complete: a leftover old one is no reason to stop the run
                (log or print)(f"checkpoint {tag} saved, but removing older checkpoints failed: {e}")
    _agree(writes, ckpt)
    return ckpt


class CheckpointWriteFailed(NoRoomForCheckpoint):
    """A write of the checkpoint failed on some rank(s) half-way (the disk filled meanwhile, a quota, an I/O error),
    raised on every rank; nothing was marked complete. A NoRoomForCheckpoint, so that what stops on that (the
    trainer: exit 3 with the message) stops on this too."""


class _Writes:
    """One rank's writes of one save. The first failure is kept, not raised, and the writes after it are skipped:
    the rank goes on along the same path as the others, meets every collective they are in, and `_agree` tells
    every rank. Raised on the failing rank alone, it left the others in DeepSpeed's barriers or ours until the
    process-group timeout (30+ minutes, a hang to the user)."""

    def __init__(self):
        self.error: str | None = None

    def run(self, what: str, fn, *args, **kwargs):
        if self.error is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # not only OSError: torch.save reports a full disk as a RuntimeError
            self.error = f"{what}: {type(e).__name__}: {e}"
            return None


@contextlib.contextmanager
def _writes_through(engine, writes: _Writes):
    """DeepSpeed's own writes in `engine.save_checkpoint` go through `writes`. Covered, checked against DeepSpeed
    0.19.8 (ZeRO-3 with its default TorchCheckpointEngine), whichever rank fails: the makedirs of rank 0 before
    its first barrier; the makedirs of the shard directories (which DeepSpeed itself ignores); the torch.save of
    the model states and of the optimizer shard; rank 0's copy of the recovery scripts. The failing rank still
    runs the tag check's all-reduces, the optimizer's state_dict, the epilogue's all-gather of persistent
    parameters and the final barrier. Not covered (raised by that rank alone, the others wait as before): the copy
    of NVMe-offloaded optimizer files, decoupled checkpoint engines that write after save_checkpoint returns, and
    failures other than of these calls (e.g. out of memory while DeepSpeed builds a state dict)."""
    patched = []

    def through(obj, name: str, verb: str, index: int, keyword: str):
        inner = getattr(obj, name, None) if obj is not None else None
        if not callable(inner):  # an engine without it (test doubles, other DeepSpeed versions)
            return

        def guarded(*a, **k):
            where = k.get(keyword, a[index] if len(a) > index else "?")
            return writes.run(f"{verb} {where}", inner, *a, **k)

        patched.append((obj, name, name in vars(obj), inner))
        setattr(obj, name, guarded)

    store = getattr(engine, "checkpoint_engine", None)
    through(store, "save", "writing", 1, "path")
    through(store, "makedirs", "creating", 0, "path")
    through(engine, "_copy_recovery_script", "copying DeepSpeed's recovery scripts to", 0, "save_path")
    try:
        yield
    finally:
        for obj, name, own, inner in reversed(patched):
            if own:
                setattr(obj, name, inner)
            else:
                delattr(obj, name)


def _withdraw(ckpt: Path) -> None:
    (ckpt / COMPLETE).unlink(missing_ok=True)
    fsync_dir(ckpt)


def _clear_for_saving_again(ckpt: Path) -> None:
    """Before `ckpt` is saved again: its COMPLETE marker first, then its conversion and every per-rank file."""
    _withdraw(ckpt)
    remove_conversions(ckpt)
    for path in ckpt.iterdir():
        if PER_RANK_FILE.search(path.name):
            path.unlink()
    fsync_dir(ckpt)


def _agree(writes: _Writes, ckpt: Path, written: bool = True) -> None:
    """Collective, a barrier too: raises CheckpointWriteFailed on every rank when a write failed on any. Once every
    rank has stopped writing, rank 0 removes what was `written` of `ckpt` (a COMPLETE that rank 0 wrote before
    `latest` failed first): it frees the space, and no marker vouches for it."""
    errors = every_rank(writes.error)
    failed = [f"rank {r} failed {e}" for r, e in enumerate(errors) if e is not None]
    if not failed:
        return
    if len(failed) > 3:  # e.g. every rank of a full disk: the first ones tell why
        more = [str(r) for r, e in enumerate(errors) if e is not None][3:]
        failed = failed[:3] + [f"ranks {', '.join(more)} failed too"]
    root, left = ckpt.parent, ""
    if written and this_rank() == 0:
        with contextlib.suppress(OSError):
            _remove([ckpt])
        if (ckpt / COMPLETE).exists():
            left = f" (but its {COMPLETE} marker could not be removed: delete {ckpt} by hand)"
    what = f"It is not marked complete and rank 0 removes its partial files{left}" if written else \
        "Nothing was written"
    raise CheckpointWriteFailed(f"checkpoint {ckpt} was not saved: {'; '.join(failed)}. {what}; "
                                f"{_resume_advice(root, ckpt.name if written else None)}")


def _resume_advice(root: Path, failed: str | None) -> str:
    """Which checkpoint a restart resumes from, after the save of `failed` (None: nothing written) failed."""
    try:  # an error here would replace the one being told, and on some ranks only
        done = [p for p in root.iterdir() if p.name.startswith(TAG_PREFIX) and p.name != failed
                and (p / COMPLETE).is_file()]
        pointer = root / LATEST
        named = pointer.read_text().strip() if pointer.is_file() else None
    except OSError as e:
        return f"the earlier complete checkpoints in {root} are untouched (listing them failed: {e})"
    newest = max(done, key=lambda p: p.name, default=None)
    if newest is None:
        return "there is no earlier complete checkpoint: a restart starts over"
    how = "train.resume=auto" if named in (None, newest.name) else f"train.resume={newest}"
    return (f"the previous complete checkpoint {newest.name} is intact. Fix the cause (a full disk or quota: free "
            f"space in {root}) and start again with {how}")


def _prune(root: Path, keep_last: int, keep: str) -> None:
    """Keep the `keep_last` newest complete checkpoints, `keep` (the one just written) among them; remove the others
    and the remains of saves killed half-way (every rank has finished writing when this runs)."""
    if keep_last > 0:
        _remove(_superseded(root, keep, keep_last - 1)[0])


def _superseded(root: Path, keep: str, keep_newest: int | None) -> tuple[list[Path], list[Path]]:
    """(the step directories the pruning removes, the complete ones) beside checkpoint `keep`: every incomplete one
    and the complete ones beyond the `keep_newest` newest (None: keep them all); never `keep`. Incomplete
    directories do not count: a crashed save of a later step would otherwise push a complete one out. Complete
    checkpoints after `keep` belong to a run resumed from an earlier one: neither counted nor removed (this run
    replaces each as it reaches its step), else they would push this run's own ones out."""
    later = set(later_complete(root / keep))
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)
                  and p.name != keep and p.name not in later)
    complete = [p for p in dirs if (p / COMPLETE).is_file()]
    kept = set(complete if keep_newest is None else complete[max(len(complete) - keep_newest, 0):])
    return [p for p in dirs if p not in kept], complete


def _remove(dirs: list[Path]) -> None:
    for old in dirs:
        # the marker first: a removal cut short (a kill, files held open on NFS) leaves no checkpoint that claims to
        # be complete without its shards
        (old / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)


def later_complete(ckpt: Path) -> list[str]:
    """Complete checkpoints next to `ckpt` of later steps: a run resumed from `ckpt` goes another way from them."""
    return sorted(p.name for p in ckpt.parent.iterdir()
                  if p.name.startswith(TAG_PREFIX) and p.name > ckpt.name and (p / COMPLETE).is_file())


def newest_complete(root: Path) -> Path | None:
    """The complete step_* directory with the highest step under a checkpoints directory, if any."""
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.name.startswith(TAG_PREFIX) and (p / COMPLETE).is_file()]
    return max(done, key=lambda p: p.name, default=None)


def _set(option: str, value) -> str:
    """How the user names a checkpoint: `train.resume=X` (a config key) or `--checkpoint X` (a CLI flag)."""
    return f"{option} {value}" if option.startswith("--") else f"{option}={value}"


def latest_checkpoint(output_dir: str | Path, option: str = "train.resume") -> Path | None:
    root = checkpoint_root(output_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        # COMPLETE markers are authoritative, the pointer only names the newest: without it (deleted, or step dirs
        # copied without it) resume from the newest complete one rather than silently start over (which would
        # also delete the run's metrics.jsonl)
        return newest_complete(root)
    tag = pointer.read_text().strip()
    ckpt = root / tag
    if not tag.startswith(TAG_PREFIX) or "/" in tag or not (ckpt / COMPLETE).is_file():
        found = newest_complete(root)
        hint = f"; the newest complete checkpoint there is {found} ({_set(option, found)} to use it)" \
            if found is not None else "; there is no complete checkpoint there"
        what = f"names {tag!r}, not a checkpoint" if not tag.startswith(TAG_PREFIX) or "/" in tag \
            else f"points to {ckpt}, which is missing or incomplete"
        raise ConfigError(f"{pointer} {what}{hint}")
    return ckpt


def resolve_resume(resume: str, output_dir: str | Path, option: str = "train.resume") -> Path | None:
    """`train.resume`: auto (the latest complete checkpoint under output_dir, if any) | none | a checkpoint dir
    (a step_* directory, or a run or its checkpoints directory). `option` names the setting in errors (export and
    eval take the directory as `--checkpoint`)."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir, option)
    path = Path(resume)
    if (path / COMPLETE).is_file():
        return path
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file() or newest_complete(root) is not None:
            return latest_checkpoint(root.parent if root.name == "checkpoints" else path, option)
    raise ConfigError(f"{_set(option, repr(resume))}: not a complete checkpoint directory (no {COMPLETE} file), "
                      f"and no complete checkpoint under it")


def started_from(ckpt: Path) -> str | None:
    """The other run's checkpoint that the run which wrote `ckpt` started from (None: it started afresh)."""
    try:
        return json.loads((ckpt / "trainer_state.json").read_text()).get("started_from")
    except (OSError, ValueError):
        return None


def continued(ckpt: Path | None, output_dir: str | Path) -> Path | None:
    """`ckpt`, or this run's own latest checkpoint when this run started from `ckpt` (another run's) and has saved
    since: a job requeued with the same `train.resume=PATH` goes on instead of starting over from PATH each time."""
    if ckpt is None or is_own(ckpt, output_dir):
        return ckpt  # one of this run's own (a rollback to an earlier step stays one)
    try:
        own = latest_checkpoint(output_dir)
    except ConfigError:
        return ckpt
    return own if own is not None and started_from(own) == str(ckpt.resolve()) else ckpt


def resolve_resume_everywhere(resume: str, output_dir: str | Path) -> Path | None:
    """Collective `resolve_resume`: every rank gets the same checkpoint or the same ConfigError. A rank that alone
    resumed (or alone failed) would leave the others waiting in collectives that never come."""
    try:
        mine, error = continued(resolve_resume(resume, output_dir), output_dir), None
    except ConfigError as e:
        mine, error = None, str(e)
    views = every_rank((str(mine) if mine is not None else None, error))
    for r, (_, err) in enumerate(views):
        if err is not None:
            raise ConfigError(err if len(views) == 1 else f"rank {r}: {err}")
    if len({v for v, _ in views}) > 1:
        listed = "; ".join(f"rank {r}: {v or 'no checkpoint'}" for r, (v, _) in enumerate(views))
        raise ConfigError(f"the ranks found different checkpoints to resume from ({listed}); train.output_dir must "
                          "be one directory shared by every node")
    return mine


def load(engine, ckpt: Path, world_size: int, seed: int = 0, output_dir: str | Path | None = None) -> dict:
    """Collective. Restores engine (model, optimizer, scheduler) and this rank's RNG; returns the trainer state
    (with this rank's extra state under "rank_state" when one was saved). A checkpoint of another number of ranks or
    ZeRO stage family loads from its conversion (`prepare_resume` first, with the same output_dir; the engine built
    with `universal_load_config`), and "rank_states" holds every saved rank's extra state (memory-mapped, in rank
    order) for the caller to repartition; on another number of ranks each rank's RNG is seeded from (seed, rank,
    step)."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    saved_world = int(state.get("world_size", world_size))
    other_world = saved_world != world_size
    stage = engine.zero_optimization_stage()
    converted = other_world or stage_change(ckpt, stage) is not None
    home = conversion_home(ckpt, output_dir)
    if converted and not (conversion_matches(ckpt, home) and engine.load_universal_checkpoint()):
        raise ConfigError(f"checkpoint {ckpt} was written by {ranks(saved_world)} (this run has {world_size}, ZeRO "
                          f"stage {stage}): load it after prepare_resume, with an engine built from "
                          "universal_load_config")
    mine = _hyperparameters(engine)
    where = home / UNIVERSAL if converted else ckpt.parent
    path, _ = engine.load_checkpoint(str(where), tag=ckpt.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise ConfigError(f"DeepSpeed could not load checkpoint {ckpt}")
    _restore_hyperparameters(engine, mine)
    rng_file = ckpt / f"rng_state_rank{this_rank()}.pt"
    if other_world:
        reseed_rng(seed, this_rank(), int(state["step"]))
    elif rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    if converted:  # per-rank extra state (the caption EMA) is laid out per stage and number of ranks
        extras = [ckpt / f"rank_state_rank{r}.pt" for r in range(saved_world)]
        if all(f.is_file() for f in extras):
            state["rank_states"] = [torch.load(f, mmap=True, weights_only=False) for f in extras]
        return state
    extra = ckpt / f"rank_state_rank{this_rank()}.pt"
    if extra.is_file():
        state["rank_state"] = torch.load(extra, weights_only=False)
    return state


def reseed_rng(seed: int, rank: int, step: int) -> None:
    """Python, numpy and torch RNG of a rank whose saved stream does not exist (a run resumed on more ranks) or
    belongs to another rank's data (on fewer): a seed from (seed, rank, step), so a resume repeats itself."""
    digest = hashlib.sha256(f"{seed}/resumed/{rank}/{step}".encode()).digest()
    value = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    random.seed(value)
    np.random.seed(value % (1 << 32))
    torch.manual_seed(value)


HYPERPARAMETERS = ("weight_decay", "betas", "eps")  # not "step": DeepSpeed's FusedAdam counts steps in its groups


def _hyperparameters(engine) -> tuple[list[float], list[dict]] | None:
    """The schedule's base lrs and the optimizer groups' hyper-parameters as this run's config built them."""
    sched = getattr(engine, "lr_scheduler", None)
    if sched is None:
        return None
    groups = [{k: g[k] for k in HYPERPARAMETERS if k in g} for g in sched.optimizer.param_groups]
    return list(sched.base_lrs), groups


def _restore_hyperparameters(engine, mine) -> None:
    """After a load: the checkpoint brings the optimizer moments and the schedule's position, this run's config its
    lr, weight decay, betas and eps. The optimizer and scheduler states carry the saving run's values, so a run
    resumed with another train.lr would otherwise silently keep the old one, and its first step would use the lr of
    the old schedule (train.steps changed: another cosine)."""
    if mine is None:
        return
    base_lrs, groups = mine
    sched = engine.lr_scheduler
    sched.base_lrs = list(base_lrs)
    for g, want, base, factor in zip(sched.optimizer.param_groups, groups, base_lrs, sched.lr_lambdas):
        g.update(want)
        g["initial_lr"] = base
        g["lr"] = base * factor(sched.last_epoch)  # the config's schedule at the checkpoint's step
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


def config_changes(ckpt: Path, cfg: Config) -> list[str]:
    """The settings of `cfg` that differ from those checkpoint `ckpt` was saved with, as "key old -> new" (read
    without validation: a checkpoint of an older version may hold keys this one no longer has)."""
    import yaml

    from dualloop.config import to_dict

    path = ckpt / "config.yaml"
    if not path.is_file():
        return []
    old, new = _flat(yaml.safe_load(path.read_text()) or {}), _flat(to_dict(cfg))
    missing = object()
    return [f"{k} {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in sorted(old.keys() | new.keys())
            if k != "train.resume" and old.get(k, missing) != new.get(k, missing)]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out

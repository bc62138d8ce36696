"""The repeat mixture of several datasets and the distributed sampler that walks it in lockstep on every rank."""
from __future__ import annotations

import inspect
import math

import numpy as np
from torch.utils.data import Dataset, Sampler

from .base import DataError

SPEC_KEYS = ("name", "kind", "root", "repeats")


def readers() -> dict:
    from .openimages import OpenImagesDataset
    from .refcoco import RefCOCODataset
    from .sa1b import SA1BDataset
    from .sav import SAVDataset

    return {"sav": SAVDataset, "sa1b": SA1BDataset, "openimages": OpenImagesDataset, "refcoco": RefCOCODataset}


def open_dataset(kind: str, root, **options):
    """The map-style dataset of `kind` ("sav" | "sa1b" | "openimages" | "refcoco") at `root`."""
    table = readers()
    if kind not in table:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(table)}")
    cls = table[kind]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "root")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{kind}: unknown option(s) {unknown}; valid options: {valid}")
    return cls(root, **options)


class MixtureDataset(Dataset):
    """Datasets laid end to end, dataset i taking len_i × repeats_i consecutive positions.

    Position p of dataset i's block maps to sample p mod len_i when repeats_i ≥ 1; fractional repeats < 1 take an
    evenly spread subset (floor(p · len_i / effective_i)).
    """

    def __init__(self, datasets: list, names: list[str], specs: list[dict], repeats: list[float]):
        self.datasets = datasets
        self.names = names
        self.specs = specs
        self.repeats = repeats
        self.sizes = [len(d) for d in datasets]
        self.effective = [int(round(n * r)) for n, r in zip(self.sizes, repeats)]
        self.offsets = np.concatenate([[0], np.cumsum(self.effective)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset number, sample index within it) of a mixture position."""
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"mixture index {index} out of range for {n} samples")
        d = int(np.searchsorted(self.offsets, index, side="right")) - 1
        p = index - int(self.offsets[d])
        size, eff = self.sizes[d], self.effective[d]
        return d, (p % size if eff >= size else p * size // eff)

    def __getitem__(self, index: int) -> dict:
        d, i = self.locate(index)
        return self.datasets[d][i]

    def fingerprint(self, seed: int) -> dict:
        """What a sampler's order over this mixture depends on: the seed and each dataset's size and repeated size,
        in order (not the roots: data moved elsewhere keeps its order). Checkpoints record it."""
        return {"seed": seed, "datasets": [[name, spec["kind"], size, eff] for name, spec, size, eff
                                           in zip(self.names, self.specs, self.sizes, self.effective)]}

    def summary(self) -> dict:
        rows = [{"name": name, "kind": spec["kind"], "root": str(spec["root"]), "samples": size, "repeats": rep,
                 "effective": eff}
                for name, spec, size, rep, eff in zip(self.names, self.specs, self.sizes, self.repeats, self.effective)]
        return {"datasets": rows, "total": len(self)}


def mixture_changes(saved: dict | None, now: dict) -> list[str]:
    """What differs between a checkpoint's mixture fingerprint and this run's, in words (empty: the same, or a
    checkpoint that recorded none)."""
    if saved is None or saved == now:
        return []
    changes = [f"data.seed {saved['seed']} -> {now['seed']}"] if saved["seed"] != now["seed"] else []
    old = {d[0]: d for d in saved["datasets"]}
    new = {d[0]: d for d in now["datasets"]}
    changes += [f"{n} removed" for n in old if n not in new] + [f"{n} added" for n in new if n not in old]
    for n in new:
        if n in old and old[n] != new[n]:
            changes.append(f"{n}: {old[n][3]} -> {new[n][3]} samples per epoch ({old[n][2]} -> {new[n][2]} "
                           "before repeats)")
    if not changes:
        changes.append("datasets reordered")
    return changes


def parse_spec(spec: dict, position: int) -> tuple[str, str, str, float, dict]:
    if not isinstance(spec, dict):
        raise ValueError(f"dataset spec #{position} must be a mapping, got {spec!r}")
    missing = [k for k in ("kind", "root") if k not in spec]
    if missing:
        raise ValueError(f"dataset spec #{position} ({spec.get('name', '?')}) lacks {missing}")
    kind, root = spec["kind"], spec["root"]
    name = str(spec.get("name") or kind)
    repeats = spec.get("repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, (int, float)) or repeats < 0 or math.isnan(repeats):
        raise ValueError(f"dataset {name!r}: repeats must be a number ≥ 0, got {repeats!r}")
    options = {k: v for k, v in spec.items() if k not in SPEC_KEYS}
    return name, kind, root, repeats, options


def build_mixture(specs: list[dict], seed: int = 0, max_bad_fraction: float | None = None) -> MixtureDataset:
    """Open each `{name, kind, root, repeats=1, **options}` and lay them end to end (see MixtureDataset).

    `seed` drives the deterministic choice of replacements for bad samples; `max_bad_fraction` is the default for
    specs that do not set their own.
    """
    if not specs:
        raise ValueError("build_mixture: no datasets given")
    datasets, names, clean, repeats = [], [], [], []
    for k, spec in enumerate(specs):
        name, kind, root, rep, options = parse_spec(spec, k)
        if name in names:
            raise ValueError(f"dataset name {name!r} appears twice; give each spec a distinct name")
        options.setdefault("seed", seed)
        if max_bad_fraction is not None:
            options.setdefault("max_bad_fraction", max_bad_fraction)
        ds = open_dataset(kind, root, **options)
        if len(ds) == 0:
            raise DataError(f"dataset {name!r} ({kind} at {root}) has no samples")
        datasets.append(ds)
        names.append(name)
        clean.append({"name": name, "kind": kind, "root": root, "repeats": rep, **options})
        repeats.append(rep)
    mix = MixtureDataset(datasets, names, clean, repeats)
    if len(mix) == 0:
        raise DataError("build_mixture: every dataset has repeats 0; the mixture is empty")
    return mix


class MixtureSampler(Sampler):
    """Indices of THIS rank: a permutation of range(length) per (seed, epoch), padded by wrapping to a multiple of
    num_replicas and dealt round-robin, so every rank gets exactly ceil(length / num_replicas) indices.

    Resuming: `state_dict()` → {"epoch", "position", "offset", "replicas"} where position counts the indices of this
    rank already consumed in the epoch; `load_state_dict` makes the next iteration start there. The sampler counts the
    indices it has yielded; a DataLoader with workers prefetches ahead of the model, so a trainer passes the number it
    has actually consumed: `state_dict(consumed=n)`. position == len(sampler) means the epoch is complete (call
    set_epoch(epoch + 1) to go on). Typical loop: `for epoch in ...: sampler.set_epoch(epoch); for batch in loader`.

    Another number of ranks (a state saved with other `replicas`): the ranks had consumed, together, the first
    offset + position × replicas places of the epoch's dealing order (round-robin dealing hands out the order's
    places in turn). The rest of that order is dealt anew over this run's ranks: `offset` (a place in the epoch's
    permutation) marks where this epoch's dealing starts, 0 except in an epoch resumed on another number of ranks;
    set_epoch to a new epoch deals the whole permutation again.
    """

    def __init__(self, length: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        if int(length) < 1:
            raise ValueError(f"MixtureSampler: length must be ≥ 1, got {length}")
        if int(num_replicas) < 1 or not 0 <= int(rank) < int(num_replicas):
            raise ValueError(f"MixtureSampler: rank {rank} is not in [0, num_replicas={num_replicas})")
        self.length = int(length)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.offset = 0  # the place in this epoch's permutation where its dealing over these ranks starts
        self.position = 0  # indices of this rank yielded (or, after load_state_dict, consumed) in this epoch
        self._restored = False  # position came from load_state_dict and has not been iterated from yet

    @property
    def num_samples(self) -> int:
        """This rank's indices in the current epoch (all epochs but one resumed on another number of ranks:
        ceil(length / num_replicas))."""
        return _per_rank(self.length - self.offset, self.num_replicas)

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """All indices of this rank for an epoch (int64, length num_samples for the current epoch)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self.shuffle:
            # numpy seeds must be ≥ 0; a negative data.seed (accepted by the config, and by the readers' hash) is
            # taken modulo 2**64 rather than failing at the first batch
            order = np.random.default_rng([self.seed % 2**64, epoch]).permutation(self.length)
        else:
            order = np.arange(self.length)
        if epoch == self.epoch and self.offset:
            order = order[self.offset:]
        total = _per_rank(len(order), self.num_replicas) * self.num_replicas
        if total > len(order):
            order = np.resize(order, total)  # np.resize repeats the array: padding wraps to the start
        return order[self.rank:total:self.num_replicas]

    def __iter__(self):
        mine = self.indices()
        # A complete epoch iterated again (no set_epoch) starts over, as DistributedSampler repeats its order. But a
        # complete epoch restored by load_state_dict (a checkpoint taken right after its last batch) yields nothing,
        # as the uninterrupted run would: starting over would replay the whole epoch after a resume.
        restored, self._restored = self._restored, False
        start = self.position if self.position < self.num_samples or restored else 0
        for k in range(start, self.num_samples):
            self.position = k + 1
            yield int(mine[k])

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation; a new epoch starts at position 0, the current one keeps a resumed position."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.offset = 0
            self.position = 0
            self._restored = False

    def state_dict(self, consumed: int | None = None) -> dict:
        position = self.position if consumed is None else int(consumed)
        return {"epoch": self.epoch, "position": position, "offset": self.offset, "replicas": self.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        """A state of this sampler, or of one on another number of ranks ("replicas"; absent: these): then this
        rank continues from the places the old ranks had consumed together (see the class)."""
        epoch, offset = int(state.get("epoch", 0)), int(state.get("offset", 0))
        position, replicas = int(state.get("position", 0)), int(state.get("replicas", self.num_replicas))
        if replicas < 1 or not 0 <= offset < self.length:
            raise ValueError(f"MixtureSampler: a state of {replicas} replicas at offset {offset} does not fit "
                             f"{self.length} samples")
        if not 0 <= position <= _per_rank(self.length - offset, replicas):
            raise ValueError(f"MixtureSampler: position {position} outside [0, "
                             f"{_per_rank(self.length - offset, replicas)}]")
        if replicas != self.num_replicas:
            offset, position = offset + position * replicas, 0  # the places consumed by all the old ranks
            if offset >= self.length:  # the epoch was complete (its wrapped padding included)
                epoch, offset = epoch + 1, 0
        self.epoch, self.offset = epoch, offset
        self.position = position  # == num_samples: the epoch is complete, its iteration yields nothing more
        self._restored = True


def _per_rank(places: int, replicas: int) -> int:
    return math.ceil(places / replicas)

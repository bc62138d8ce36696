"""Compact on-disk index of a dataset: numpy arrays in `$DUALLOOP_CACHE` (default ~/.cache/dualloop), memory-mapped.

A reader describes its samples as columns of fixed-width numbers plus string columns (a byte blob + offsets), never
as one Python object per sample, so a DataLoader worker forked from the main process adds only the pages it touches.
Number columns are memory-mapped; string blobs are read with pread (see BlobFile).
The cache key covers the kind, the root, the index-affecting options, and the size + mtime of every annotation file
(and the mtime of every directory listed for existence checks), so an edited annotation file rebuilds the index.
Concurrent ranks serialise on a lock file: one builds, the others wait and then map the result.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

log = logging.getLogger("dualloop.data")
_BLOB = ".blob"
_OFFSETS = ".offsets"


def cache_dir() -> Path:
    return Path(os.environ.get("DUALLOOP_CACHE") or Path.home() / ".cache" / "dualloop")


class BlobFile:
    """The bytes of a 1-D uint8 .npy file, read with pread instead of mapped.

    Random lookups into a mapped blob fault in (and keep resident) whole runs of pages around every string, so a
    worker's RSS climbs towards the blob's size; pread copies only the bytes asked for. The descriptor is opened
    lazily in each process (and not pickled).
    """

    def __init__(self, path):
        self.path = str(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            self.base = f.tell()
        if dtype != np.uint8 or len(shape) != 1:
            raise ValueError(f"{self.path}: expected a 1-D uint8 array, got {dtype} {shape}")
        self.size = int(shape[0])
        self._fd, self._pid = None, None

    def __len__(self) -> int:
        return self.size

    def read(self, start: int, stop: int) -> bytes:
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return os.pread(self._fd, stop - start, self.base + start)

    def __getstate__(self):
        return {"path": self.path, "base": self.base, "size": self.size, "_fd": None, "_pid": None}

    def __del__(self):
        try:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
        except (OSError, TypeError, AttributeError):  # interpreter shutdown
            pass


class StringTable:
    """Read-only sequence of strings: a uint8 blob (array or BlobFile) + offsets (len n+1, uint32 or int64, mapped)."""

    def __init__(self, blob, offsets: np.ndarray):
        self.blob = blob
        self.offsets = offsets

    @staticmethod
    def encode(strings: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = [s.encode("utf-8") for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        if encoded:
            np.cumsum(np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
        if offsets[-1] < 2 ** 32:  # half the pages a worker maps for lookups
            offsets = offsets.astype(np.uint32)
        return blob, offsets

    @classmethod
    def from_list(cls, strings: Iterable[str]) -> "StringTable":
        return cls(*cls.encode(strings))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        i = int(i)
        if i < 0:
            i += len(self)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        raw = self.blob.read(a, b) if isinstance(self.blob, BlobFile) else bytes(self.blob[a:b])
        return raw.decode("utf-8")

    def tolist(self) -> list[str]:
        return [self[i] for i in range(len(self))]


def file_signature(paths: Iterable[str | os.PathLike]) -> list[list]:
    """[(path, size, mtime_ns)] of files, or of directories (their mtime changes when entries come or go)."""
    sig = []
    for p in paths:
        try:
            st = os.stat(p)
            sig.append([str(p), int(st.st_size) if not os.path.isdir(p) else 0, int(st.st_mtime_ns)])
        except FileNotFoundError:
            sig.append([str(p), -1, -1])
    return sig


def index_key(kind: str, root, options: dict, signature: list, version: int) -> str:
    payload = json.dumps({"kind": kind, "root": str(Path(root).resolve()), "options": options,
                          "files": signature, "version": version}, sort_keys=True, default=str)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:20]


class Index:
    """The loaded arrays (memory-mapped), string tables and the JSON metadata of one dataset index."""

    def __init__(self, path: Path, arrays: dict[str, np.ndarray], strings: dict[str, StringTable], meta: dict):
        self.path = path
        self.arrays = arrays
        self.strings = strings
        self.meta = meta

    def __getitem__(self, name: str):
        if name in self.arrays:
            return self.arrays[name]
        return self.strings[name]


def _write(tmp: Path, columns: dict, meta: dict) -> None:
    string_names = []
    for name, value in columns.items():
        if isinstance(value, np.ndarray):
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(value), allow_pickle=False)
        else:
            blob, offsets = StringTable.encode(value)
            np.save(tmp / f"{name}{_BLOB}.npy", blob, allow_pickle=False)
            np.save(tmp / f"{name}{_OFFSETS}.npy", offsets, allow_pickle=False)
            string_names.append(name)
    meta = dict(meta)
    meta["_columns"] = sorted(n for n, v in columns.items() if isinstance(v, np.ndarray))
    meta["_strings"] = sorted(string_names)
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f)


def read_index(path: Path) -> Index:
    with open(path / "meta.json") as f:
        meta = json.load(f)
    arrays = {n: np.load(path / f"{n}.npy", mmap_mode="r", allow_pickle=False) for n in meta["_columns"]}
    strings = {n: StringTable(BlobFile(path / f"{n}{_BLOB}.npy"),
                              np.load(path / f"{n}{_OFFSETS}.npy", mmap_mode="r", allow_pickle=False))
               for n in meta["_strings"]}
    return Index(path, arrays, strings, meta)


def cached_index(kind: str, root, options: dict, signature: list, build: Callable[[], tuple[dict, dict]],
                 version: int = 1) -> Index:
    """Load the index for this key from the cache, or call `build()` → (columns, meta) and store it first.

    columns: name → np.ndarray (fixed-width per sample) or list[str] (stored as a StringTable).
    meta: JSON-serialisable facts found while building (missing files, bad files, ...).
    """
    key = index_key(kind, root, options, signature, version)
    base = cache_dir() / "index"
    base.mkdir(parents=True, exist_ok=True)
    final = base / f"{kind}-{key}"
    if (final / "meta.json").exists():
        return read_index(final)
    with open(base / f"{kind}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be building the same index: wait for it
        try:
            if (final / "meta.json").exists():
                return read_index(final)
            t0 = time.time()
            log.info("%s: building the index of %s (once; cached in %s)", kind, root, final)
            columns, meta = build()
            meta = dict(meta, kind=kind, root=str(Path(root).resolve()), options=options)
            tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-{key}-", dir=base))
            try:
                _write(tmp, columns, meta)
                if final.exists():  # a half-written entry from a killed process
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("%s: index of %s built in %.1f s", kind, root, time.time() - t0)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return read_index(final)

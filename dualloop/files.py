"""Durable writes: fsync of files and directories, small files replaced atomically, and output directories written
whole or not at all (staged in a hidden sibling, renamed into place), so that a full disk or a kill never leaves
something that looks complete."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from dualloop.config import ConfigError


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files, renames) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under `root` (and the directories) to stable storage, before a marker or a rename declares
    them complete: after a power loss or node crash nothing may vouch for data still in the page cache."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave half-written pointers behind
        raise
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half of one
    fsync_dir(path.parent)


def check_new_output(out: Path, overwrite: bool, marker: str, what: str, flag: str = "--out") -> None:
    """`out` must be new or empty; one holding an earlier output (`what`, told by its `marker` file) is replaced
    only with `overwrite`. Leftovers of a run killed half-way (hidden siblings) are removed."""
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"{flag} {out} is a file")
        if any(out.iterdir()):
            if not (out / marker).is_file():
                raise ConfigError(f"{flag} {out} exists and holds something other than {what}: give a new or "
                                  "empty directory")
            if not overwrite:
                raise ConfigError(f"{flag} {out} holds an earlier {what.split(' ', 1)[-1]}: --overwrite replaces it")
    out.parent.mkdir(parents=True, exist_ok=True)
    for dead in out.parent.glob(f".{out.name}.partial-*"):
        shutil.rmtree(dead, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(out: Path, what: str, flag: str = "--out"):
    """Yields a hidden sibling of `out` to write into; on success its files get the umask's permissions (safetensors
    writes 0600: colleagues could not read a shared model), are flushed, and the directory replaces `out` (an
    earlier one stays as it was until then). A failure removes the stage; an OSError (a full disk, a quota) becomes
    a ConfigError naming `flag`."""
    stage = out.with_name(f".{out.name}.partial-{os.getpid()}")
    earlier = out.exists() and any(out.iterdir())
    try:
        stage.mkdir()
        yield stage
        _settle(stage)
        _put_in_place(stage, out)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        kept = f"; the earlier {what.split(' ', 1)[-1]} there is untouched" if earlier else ""
        raise ConfigError(f"{flag} {out}: writing failed ({e}); nothing was left there{kept}") from e
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _settle(root: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~umask)
    fsync_tree(root)


def _put_in_place(stage: Path, out: Path) -> None:
    old = None
    if out.exists():  # empty, or an earlier output (checked): set aside until the new one is in place
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        stage.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

"""Killing a launched run whole: torchrun starts its workers in sessions of their own, so killing the launcher's
process group leaves them running, holding the output pipe open, and a test that then reads the pipe to its end
waits forever (on CI: until the job's limit)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first found, then theirs), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`, its process group and every process below it, whatever session they are in."""
    below = descendants(proc.pid)  # before the kill: orphans are re-parented and no longer found
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in below:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def output_after_kill(proc: subprocess.Popen) -> str:
    """What the killed run wrote; bounded, in case something still holds the pipe."""
    try:
        return proc.communicate(timeout=30)[0] or ""
    except subprocess.TimeoutExpired:
        proc.kill()
        return "(output not read: the pipe stayed open after the kill)"

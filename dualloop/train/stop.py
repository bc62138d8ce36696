"""Stop on a signal at the next step boundary, with a checkpoint, instead of dying mid-step.

Launchers and schedulers end a job with a signal and a grace period before SIGKILL: the deepspeed launcher sends
SIGTERM to every process of the tree and kills what is left after 30 s; SLURM sends SIGTERM and waits KillWait
(30 s by default), and `--signal=USR1@90` warns 90 s before the time limit; Ctrl-C sends SIGINT.

The handler only records the signal. The step in flight finishes (its collectives must complete on every rank),
then every rank learns at the step boundary whether any rank was signalled (they may get the signal at different
moments, or only one may get it), and they save a checkpoint together: rerunning the same command resumes there.
A second Ctrl-C stops at once. DataLoader workers ignore these signals (the launcher signals the whole process
tree): they keep serving the step in flight and exit with their parent.
"""
from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class TrainingStopped(RuntimeError):
    """The run stopped on a signal after saving a checkpoint (`exit_code`: 128 + the signal number)."""

    def __init__(self, signum: int, step: int, checkpoint, resume_auto: bool = True):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        # rerunning resumes only under train.resume=auto (the demo runs with none, a run may name an older checkpoint)
        how = "rerun the same command" if resume_auto else f"rerun the same command with train.resume={checkpoint}"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint}; "
                         f"{how} to resume")


class StopOnSignal:
    """Context manager: records the first stop signal in `signum` (None until then); restores the previous
    handlers on exit. Outside the main thread (where Python cannot install handlers) it records nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        if self.signum is None:
            self.signum = signum
            # os.write, not print: a handler may run in the middle of another write to stderr
            os.write(2, f"\n[dualloop] {signal.Signals(signum).name} received: stopping after this step with a "
                        "checkpoint (Ctrl-C again to stop at once)\n".encode())


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader `worker_init_fn`: the parent decides when to stop; a worker killed by the launcher's SIGTERM
    would fail the step in flight."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)

"""Stop signals: a kill, Ctrl-C or a cluster's preemption notice becomes a request that the running task honours at
its next safe point, in every phase (data loading, training steps, evaluation, saving).

``run.py`` holds a ``StopFlag`` for the whole task. SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 only set the flag, so a
signal never interrupts a file being written. The training loop checks it after every step (then writes
``last.pt``); the evaluation checks it between chunks of work through ``check``. Either raises ``StopRequested``,
which the task turns into ``summary.json`` status ``stopped`` and run.py into exit status ``128 + signal``.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2") if hasattr(signal, n))


class StopRequested(RuntimeError):
    """The run was asked to stop and saved what it had. ``checkpoint`` and ``step`` are set when training stopped."""

    def __init__(self, signum: int, saved: str, checkpoint: Path | None = None, step: int | None = None):
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        super().__init__(f"{signal.Signals(signum).name} received: {saved}")


class StopFlag:
    """Turns stop signals into a flag (``signum``); restores the previous handlers on exit.

    Entered while another StopFlag is active, it returns that one, so a task run inside run.py's flag shares it.
    The handlers that were installed before (submitit's, which requeues a preempted SLURM job) are kept in
    ``previous`` so that the caller can hand the signal on once everything is saved.
    """

    _active: StopFlag | None = None

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        self._outer: StopFlag | None = None

    def __enter__(self) -> StopFlag:
        if StopFlag._active is not None:
            self._outer = StopFlag._active
            return self._outer
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        StopFlag._active = self
        return self

    def _handle(self, signum: int, _frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        if self._outer is not None:
            self._outer = None
            return
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        StopFlag._active = None


def requested() -> int | None:
    """The stop signal received by the active StopFlag, or None."""
    flag = StopFlag._active
    return flag.signum if flag is not None else None


def check(saved: str) -> None:
    """Raise StopRequested (its message ends with ``saved``: what is kept) if a stop signal has arrived."""
    signum = requested()
    if signum is not None:
        raise StopRequested(signum, saved)

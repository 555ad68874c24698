"""Stop requests by signal, honoured at the next step boundary.

SIGTERM (what SLURM and ``kill`` send) and SIGINT (Ctrl-C) no longer kill the trainer mid-step: the
handler only records the request; the loop finishes the step it is in, writes a checkpoint and
stops with :class:`TrainingInterrupted` (the CLI exits 128 + signal number, no traceback). A second
Ctrl-C interrupts at once. Where a launcher installed its own Python handler for a signal (submitit
uses SIGUSR2 to checkpoint and requeue a job before its time limit), that signal is handled the same
way and the launcher's handler runs after the checkpoint is written, so requeueing keeps working
and loses no step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGINT)
CHAINED = (signal.SIGUSR2,)  # only when someone (submitit) installed a Python handler for it


class TrainingInterrupted(Exception):
    """The run stopped on a signal after writing a checkpoint."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal:
    """``with StopOnSignal() as stop: ... if stop.requested: ...`` (main thread only; elsewhere inert)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum

    def chained_handler(self):
        """The launcher's own handler of the received signal, to run once the checkpoint exists."""
        previous = self._previous.get(self.signum)
        return previous if callable(previous) and self.signum in CHAINED else None

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in HANDLED + CHAINED:
            previous = signal.getsignal(signum)
            if signum in CHAINED and not callable(previous):
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

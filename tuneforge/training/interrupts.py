"""SIGINT (Ctrl-C) and SIGTERM (what schedulers and ``docker stop`` send) during training: the run
stops at a point from which ``--resume`` reaches exactly the weights of an uninterrupted run.

While the loop computes (the forward and backward passes of a step, or an evaluation), a signal
stops that work at once: the step's partial gradients and random draws are thrown away, and the
checkpoint records the state before the step. While it updates the weights, logs or writes a
checkpoint, a signal waits until that is done. Either way the run then saves a checkpoint and
raises ``Interrupted``.

Under torch.distributed (``immediate=False``) no work is cut short: every rank must stop at the same
step, so a signal waits for the end of the step, where the ranks agree to stop together.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal after saving a checkpoint; ``exit_code`` is the shell's 128 + signal."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum
        self.reported = False  # the loop has said where it saved


class Guard:
    """Installs the handlers for its ``with`` block (in the main thread; elsewhere signals stay as they were)."""

    def __init__(self, immediate: bool = True):
        self.requested: int | None = None  # the first signal received
        self.immediate = immediate
        self._abortable = False
        self._previous = {}

    def __enter__(self) -> Guard:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, _frame) -> None:
        self.requested = self.requested or signum
        if self._abortable:
            self._abortable = False
            raise Interrupted(signum)

    @contextlib.contextmanager
    def abortable(self) -> Iterator[None]:
        """Work that a signal may cut short: its caller catches Interrupted and discards it."""
        if not self.immediate:
            yield
            return
        self.check()
        self._abortable = True
        try:
            yield
        finally:
            self._abortable = False

    def check(self) -> None:
        """At a safe point: raise Interrupted if a signal came while the loop could not stop."""
        if self.requested:
            raise Interrupted(self.requested)

"""Stopping a training run cleanly on SIGINT/SIGTERM: the loop finishes its step, checkpoints and raises
:class:`dpokit.errors.Interrupted`, so a killed job (a scheduler's SIGTERM, a Ctrl-C) can be resumed."""

from __future__ import annotations

import signal
import threading


class StopRequests:
    """SIGINT/SIGTERM during training: the first asks the loop to finish its step, checkpoint and stop; a
    second SIGINT stops at once. Handlers are installed only while the loop runs, in the main thread."""

    def __init__(self, say=print) -> None:
        self.signal: str | None = None
        self.say = say
        self._saved: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        self.say(f"{self.signal}: finishing this step, then writing a checkpoint and stopping "
                 "(Ctrl-C again to stop at once, losing the step)")

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for kind in (signal.SIGINT, signal.SIGTERM):
                self._saved[kind] = signal.signal(kind, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for kind, handler in self._saved.items():
            signal.signal(kind, handler)

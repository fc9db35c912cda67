"""SIGTERM (preemption) and SIGINT (Ctrl-C) become a request to stop at the next step boundary,
where the train loop saves a checkpoint and raises `Stopped`.

A second signal while the checkpoint is being written is ignored, so the save completes.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class Stopped(Exception):  # noqa: N818 (a request, not an error)
    """Training stopped on a signal after saving a checkpoint at `step`."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.step, self.signum = step, signum


class StopRequest:
    def __init__(self):
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGTERM, signal.SIGINT)):
    """Yields a StopRequest; handlers are installed only in the main thread and restored after."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._handle) for s in signals}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

"""SIGTERM (preemption) and SIGINT (Ctrl-C) become a request to stop at a step boundary, where
the train loop saves a checkpoint and raises `Stopped`.

A signal reaches one process, but on a pod every process must save the same step: the
checkpoint is written by all hosts together, so a host that enters the save while another runs
the next step deadlocks or writes a mixed state. `StopRequest.agreed(step)` is that decision.
On one process it is the local flag at every step, with no collective. On several it is the
maximum of every process's flag, gathered every `every` steps (`distributed.stop_check_every`):
all processes evaluate it at the same step numbers, so all see the same answer and stop
together, at the first such step after any one of them was signalled. The gather is one int32
per process, and makes each host wait for its step in flight, which is why it is not every step.

A second signal while the checkpoint is being written is ignored, so the save completes.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class Stopped(Exception):  # noqa: N818 (a request, not an error)
    """Training stopped on a signal after saving a checkpoint at `step`."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.step, self.signum = step, signum


class StopRequest:
    def __init__(self, every: int = 1):
        self.signum: int | None = None
        self.every = every

    @property
    def requested(self) -> bool:
        """This process received a signal (the local flag; see `agreed` for the decision)."""
        return self.signum is not None

    def agreed(self, step: int) -> bool:
        """Whether every process stops after `step`. Must be called at every step by every
        process (it is a collective at every `every`-th step when there are several); where it
        is True on a process that got no signal itself, `signum` becomes the one received
        elsewhere, so all processes report the same stop."""
        if jax.process_count() == 1:
            return self.requested
        if step % self.every:
            return False
        local = np.int32(self.signum or 0)
        signums = np.asarray(multihost_utils.process_allgather(local))
        received = int(signums.max())
        if received and self.signum is None:
            self.signum = received
        return bool(received)

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGTERM, signal.SIGINT), every: int = 1):
    """Yields a StopRequest (agreed on every `every` steps across processes); handlers are
    installed only in the main thread and restored after."""
    request = StopRequest(every)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._handle) for s in signals}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

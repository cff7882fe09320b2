"""Stopping a run cleanly: SIGTERM (a preempted job) and Ctrl-C become a flag that the
training loop checks between steps, so that it checkpoints before it exits."""

from __future__ import annotations

import contextlib
import os
import signal

import jax
import numpy as np


class Preemption:
  """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag that the loop checks between
  calls of the step; a second Ctrl-C interrupts at once, as without it. A SIGINT that
  the process ignores (a background job's) stays ignored."""

  def __init__(self):
    self.received: str | None = None  # The name of the first signal, e.g. 'SIGTERM'.
    signals = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
      signals.append(signal.SIGINT)
    self._previous = {signum: signal.signal(signum, self._handle) for signum in signals}

  @property
  def requested(self) -> bool:
    return self.received is not None

  def _handle(self, signum, frame):
    del frame
    self.received = self.received or signal.Signals(signum).name
    if signum == signal.SIGINT:
      previous = self._previous[signal.SIGINT]
      signal.signal(signal.SIGINT, previous if callable(previous) else signal.default_int_handler)
      # To the file descriptor: the handler may run inside a write to sys.stderr (the
      # progress bar's), which a second write there would break.
      with contextlib.suppress(OSError):
        os.write(
          2,
          b'\nCtrl-C: the run saves a checkpoint at its next stop and exits (Ctrl-C again '
          b'stops at once, losing the steps since the last checkpoint).\n',
        )

  def agreed(self) -> bool:
    """Whether any process was asked to stop (all processes must stop together); a
    process that received no signal takes that of the lowest-numbered one that did."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils

    names = [signal.Signals.SIGTERM, signal.Signals.SIGINT]
    mine = 0 if self.received is None else 1 + names.index(signal.Signals[self.received])
    codes = np.asarray(multihost_utils.process_allgather(np.array(mine))).ravel()
    if self.received is None and codes.any():
      self.received = names[int(codes[np.flatnonzero(codes)[0]]) - 1].name
    return bool(codes.any())

  def restore(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)

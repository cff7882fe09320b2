"""One run per workdir: an advisory lock file naming the run that holds it.

Two runs in one workdir would resume from each other's checkpoints and
interleave their logs. The lock is ``fcntl.flock`` on ``workdir/lock``, which
the kernel releases when its process ends however it ends, so a lock left by a
dead run is simply taken over; the file says which host and process hold it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import socket

LOCK_FILE = 'lock'


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path):
  """Holds ``workdir``'s lock for the ``with`` block.

  Raises:
    WorkdirBusyError: another process holds it; the message names its host and PID.
  """
  path = pathlib.Path(workdir) / LOCK_FILE
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 256, 0).decode(errors='replace').strip() or 'another process'
      raise WorkdirBusyError(
        f'{workdir} is in use by {holder}: wait for that run to end or stop it, or use '
        'another --workdir.'
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'host {socket.gethostname()} pid {os.getpid()}\n'.encode(), 0)
    yield
  finally:
    os.close(fd)  # Releases the lock.

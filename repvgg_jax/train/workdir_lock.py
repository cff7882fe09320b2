"""One run per workdir: an advisory lock file naming the run that holds it.

Two runs in one workdir would resume from each other's checkpoints and
interleave their logs. The lock is ``fcntl.flock`` on ``workdir/lock``, which
the kernel releases when its process ends however it ends, so a lock left by a
dead run is simply taken over; the file says which host and process hold it.
With several processes the first holds it for all; a run refused before its
first step removes the workdir it made.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib
import socket

import jax
import numpy as np

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


def make_workdir(workdir: pathlib.Path) -> list[pathlib.Path]:
  """Makes ``workdir`` and every folder missing above it, one by one; returns the ones
  this call made (a refused run removes them again: `remove_if_unused`). A path with
  ``..`` names folders that exist already: those are not counted.

  Raises:
    FileExistsError: a file stands where a folder should.
  """
  if workdir.exists() and not workdir.is_dir():
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(workdir))
  made = []
  for folder in reversed([path for path in (workdir, *workdir.parents) if not path.exists()]):
    try:
      folder.mkdir()
    except FileExistsError:
      if not folder.is_dir():
        raise
      continue  # Made meanwhile by another process, or reached through '..'.
    made.append(folder)
  return made


def remove_if_unused(workdir: pathlib.Path, made: list[pathlib.Path]) -> None:
  """Removes a workdir this run made, under its lock, where it holds only the lock file
  and an empty checkpoint directory, and the empty folders above it in ``made``
  (`make_workdir`'s list): a run refused before its first step leaves nothing behind.
  Each removal fails, harmlessly, on anything else there."""
  checkpoints = workdir / 'checkpoints'
  try:
    if not {path.name for path in workdir.iterdir()} <= {LOCK_FILE, checkpoints.name}:
      return
    if checkpoints.is_dir():
      checkpoints.rmdir()
    (workdir / LOCK_FILE).unlink()
    workdir.rmdir()
    for folder in reversed(made):  # Outwards.
      if folder != workdir:
        folder.rmdir()
  except OSError:
    pass  # Something was written meanwhile: it stays.


@contextlib.contextmanager
def locked_for_all_processes(workdir: pathlib.Path):
  """Holds ``workdir``'s lock in the first process for all of them. Every process
  learns whether it got it before any work: a busy workdir stops them all at once
  (the others would otherwise wait on the first in a collective until it timed out).

  Raises:
    WorkdirBusyError: in every process, where another run holds the lock.
  """
  if jax.process_count() == 1:
    with workdir_lock(workdir):
      yield
    return
  from jax.experimental import multihost_utils

  with contextlib.ExitStack() as stack:
    failed = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(workdir_lock(workdir))
      except Exception as error:  # noqa: BLE001 (busy, or no lock to take: the others must know)
        failed = error
    if not multihost_utils.broadcast_one_to_all(np.array(failed is None)):
      raise failed or WorkdirBusyError(
        f'The first process could not take the lock of {workdir} (its error says why): wait '
        'for the run that holds it, or use another --workdir.'
      )
    yield

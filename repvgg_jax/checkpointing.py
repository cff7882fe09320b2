"""Orbax checkpoints of a training run and of its fused deploy model.

Each checkpoint is a step directory holding the arrays (``state``: step,
params, batch_stats, optimizer state) and a JSON ``meta`` item (the config,
the model name, the data position). Orbax writes into a temporary directory
and renames it when complete, so a crash mid-save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

STATE, META = 'state', 'meta'
# A step that cannot be read is renamed `<step>.corrupt` (never deleted).
CORRUPT = '.corrupt'
# Orbax names a save in progress `<step>.orbax-checkpoint-tmp-<timestamp>`.
_UNFINISHED = '.orbax-checkpoint-tmp'


# The saves that failed in this process (`Checkpoints._write_errors`), step by step.
_failed_saves: list[int | None] = []


def _is_failed_save_noise(error: BaseException | None) -> bool:
  """Whether ``error`` is what the threads of a failed background save raise as they
  wind down: writes into the unfinished step, and callbacks on their closed event loops."""
  text = str(error)
  return (isinstance(error, RuntimeError) and 'Event loop is closed' in text) or (
    isinstance(error, Exception) and _UNFINISHED in text
  )


def _not_a_failed_save(record: logging.LogRecord) -> bool:
  """False for what a failed background save makes orbax log: its own error reports,
  and what its threads and tasks raise as they wind down. `Checkpoints` reports every
  failed save itself, in one line (`CheckpointWriteError`)."""
  if record.levelno >= logging.ERROR and f'{os.sep}orbax{os.sep}' in record.pathname:
    return False
  error = record.exc_info[1] if record.exc_info else None
  # After a failed save, a write of it that failed too (a full disk) in a task nobody
  # awaits any more: asyncio's "Future exception was never retrieved".
  if _failed_saves and record.name == 'asyncio' and isinstance(error, OSError):
    return False
  return not _is_failed_save_noise(error)


def _not_a_read_only_notice(record: logging.LogRecord) -> bool:
  """False for the warning orbax logs for each reader: `Checkpoints` opens a
  checkpoint read-only (to fuse, export or evaluate it) when it is asked to."""
  return not str(record.msg).startswith('Given directory is read only')


def _quiet_orbax_noise() -> None:
  """Filters orbax's read-only notices and the noise of failed saves out of the logs."""
  absl_logger = logging.getLogger('absl')
  if _not_a_read_only_notice not in absl_logger.filters:
    absl_logger.addFilter(_not_a_read_only_notice)
  for name in ('absl', 'concurrent.futures', 'asyncio'):
    logger = logging.getLogger(name)
    if _not_a_failed_save not in logger.filters:
      logger.addFilter(_not_a_failed_save)
  # The writes a failed save abandons, at exit.
  warnings.filterwarnings(
    'ignore', message=r"coroutine '.*write_fragment' was never awaited", category=RuntimeWarning
  )
  # tensorstore's writer threads report what their callbacks raise through these hooks.
  if not getattr(sys.excepthook, 'quiet_failed_saves', False):
    previous = sys.excepthook

    def hook(kind, error, traceback):
      if not _is_failed_save_noise(error):
        previous(kind, error, traceback)

    hook.quiet_failed_saves = True
    sys.excepthook = hook
  if not getattr(sys.unraisablehook, 'quiet_failed_saves', False):
    previous_unraisable = sys.unraisablehook

    def unraisable(info):
      if not _is_failed_save_noise(info.exc_value):
        previous_unraisable(info)

    unraisable.quiet_failed_saves = True
    sys.unraisablehook = unraisable


class CheckpointMismatch(ValueError):
  """A readable checkpoint of another model or configuration."""


class CorruptCheckpointsError(RuntimeError):
  """Checkpoints exist but none can be read."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (a full disk, a lost mount, no permission)."""


def root_cause(error: BaseException) -> str:
  """The innermost reason in an exception's chain, one line: an ``OSError``'s
  ``[Errno N] text`` where there is one (``No space left on device``)."""
  seen, chain = set(), [error]
  while chain[-1] is not None and id(chain[-1]) not in seen:
    seen.add(id(chain[-1]))
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  for link in chain[:-1]:
    if isinstance(link, OSError) and link.strerror:
      return f'[Errno {link.errno}] {link.strerror}'
  text = ' '.join(str(error).split())
  code = re.search(r"\[Errno (\d+)\]|os_error_code='(\d+)'", text)  # tensorstore's form too.
  if code:
    number = int(code.group(1) or code.group(2))
    return f'[Errno {number}] {os.strerror(number)}'
  return text[:200] or type(error).__name__


_STEP_NAME = re.compile(r'0|[1-9][0-9]*')


def saved_steps(directory: pathlib.Path) -> list[int]:
  """The steps a checkpoint directory holds (its folders named by numbers, as orbax
  names them: ``0``, ``120``, not ``007``), sorted, read without orbax: a run in a
  workdir with any resumes rather than starts."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return []
  named = (p for p in directory.iterdir() if _STEP_NAME.fullmatch(p.name) and p.is_dir())
  return sorted(int(p.name) for p in named)


class Checkpoints:
  """A `CheckpointManager` over one directory, keeping the last ``keep`` steps."""

  def __init__(self, directory: str | pathlib.Path, keep: int | None = None, read_only=False):
    self.directory = pathlib.Path(directory).absolute()
    _quiet_orbax_noise()
    if not read_only:
      self._remove_unfinished_saves()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep,
      # Orbax sets these itself for a reader, with a logged warning each time.
      save_interval_steps=0 if read_only else 1,
      create=not read_only,
      read_only=read_only,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, META))

  def _remove_unfinished_saves(self) -> None:
    """Deletes what a save interrupted by a crash left behind (never a finished step).

    Done here, before any save, rather than by orbax's background cleanup thread, so
    that nothing else touches the directory while it runs.
    """
    if jax.process_index() != 0 or not self.directory.is_dir():
      return
    for path in self.directory.iterdir():
      if _UNFINISHED in path.name:
        shutil.rmtree(path, ignore_errors=True)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_newest_readable(self, read: Callable[[int], Any], report: Callable[[str], None]):
    """``read(step)`` of the newest step it succeeds on; the steps it fails on are moved
    aside as ``<step>.corrupt`` (one line each to ``report``), newest first.

    ``read`` raises `CheckpointMismatch` for a readable checkpoint that does not fit,
    which propagates; any other exception marks the step unreadable.

    Returns:
      ``read``'s result, or None when there is no checkpoint.

    Raises:
      CorruptCheckpointsError: there were checkpoints and none could be read, now or
        when an earlier run moved them aside.
    """
    moved = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return read(step)
      except CheckpointMismatch:
        raise
      except Exception as error:  # noqa: BLE001 (orbax and tensorstore raise many kinds)
        moved.append(self._move_aside(step))
        reason = ' '.join(str(error).split())[:200] or type(error).__name__
        report(
          f'Checkpoint {step} in {self.directory} cannot be read ({reason}); '
          f'moved to {moved[-1].name}.'
        )
    # Moved aside now, or by an earlier run: starting afresh here would overwrite the
    # run's logs and deploy model, and leave the moved steps nowhere to go back to.
    moved = moved or sorted(self.directory.glob(f'*{CORRUPT}*'))
    if moved:
      raise CorruptCheckpointsError(
        f'No checkpoint in {self.directory} can be read (moved aside: '
        f'{", ".join(p.name for p in moved)}): start again in another --workdir, or move '
        'them back after repairing the disk.'
      )
    return None

  def _move_aside(self, step: int) -> pathlib.Path:
    """Renames ``step``'s directory to ``<step>.corrupt`` (``.corrupt.1``, ... if taken)."""
    source = self.directory / str(step)
    target = source.with_name(source.name + CORRUPT)
    count = 0
    while target.exists():
      count += 1
      target = source.with_name(f'{source.name}{CORRUPT}.{count}')
    if jax.process_index() == 0:
      source.rename(target)
    self.manager.reload()
    return target

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON) as ``step``, in the
    background.

    Raises:
      CheckpointWriteError: this save, or an earlier one still in the background, failed.
    """
    self.wait()  # The save before: orbax would wait for it here anyway.
    args = ocp.args.Composite(
      **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
    )
    self._saving = step
    with self._write_errors():
      self.manager.save(step, args=args, force=True)

  def check(self) -> None:
    """Raises `CheckpointWriteError` if a background save has failed (without waiting
    for one in progress)."""
    with self._write_errors():
      self.manager.check_for_errors()
      if not self.manager.is_saving_in_progress():
        self.manager.wait_until_finished()  # Returns at once; raises what the save raised.

  def finished_steps(self) -> list[int]:
    """The steps whose directories are complete on disk, oldest first."""
    if not self.directory.is_dir():
      return []
    return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

  @contextlib.contextmanager
  def _write_errors(self):
    """Turns any failure of a save into one `CheckpointWriteError` naming its cause and
    the last good checkpoint."""
    try:
      yield
    except Exception as error:  # noqa: BLE001 (orbax, tensorstore and the OS raise many kinds)
      failed = getattr(self, '_saving', None)
      _failed_saves.append(failed)
      good = [s for s in self.finished_steps() if s != failed]
      last = f'step {good[-1]}' if good else 'none'
      raise CheckpointWriteError(
        f'Saving checkpoint {failed} to {self.directory} failed: {root_cause(error)}. '
        f'The last good checkpoint is {last}; fix the cause and run the same command to '
        'resume from it.'
      ) from error

  def restore(self, abstract_state: Any = None, step: int | None = None) -> tuple[Any, dict]:
    """Restores ``step`` (default: latest) into the shapes and shardings of ``abstract_state``.

    Without ``abstract_state`` the arrays come back as saved, on the default device.
    """
    step = self.latest_step() if step is None else step
    if abstract_state is None:
      abstract_state = self.abstract_state(step)
    args = ocp.args.Composite(
      **{STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
    )
    restored = self.manager.restore(step, args=args)
    return restored[STATE], restored[META]

  def abstract_state(self, step: int, sharding: jax.sharding.Sharding | None = None) -> Any:
    """The saved arrays' shapes and dtypes, placed on ``sharding`` (default: one device).

    Lets a checkpoint written on any number of devices load anywhere.
    """
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    metadata = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / STATE)
    tree = getattr(metadata, 'tree', metadata)
    return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
      tree,
      is_leaf=lambda x: hasattr(x, 'shape') and hasattr(x, 'dtype'),
    )

  def restore_meta(self, step: int | None = None) -> dict:
    """Only the JSON metadata of ``step`` (default: latest)."""
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[
      META
    ]

  def wait(self) -> None:
    """Blocks until background saves are on disk.

    Raises:
      CheckpointWriteError: one of them failed.
    """
    with self._write_errors():
      self.manager.wait_until_finished()
      self.manager.check_for_errors()

  def close(self) -> None:
    self.manager.close()

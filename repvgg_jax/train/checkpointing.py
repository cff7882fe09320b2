"""Orbax checkpoints of a training run and of its fused deploy model.

Each checkpoint is a step directory holding the arrays (``state``: step,
params, batch_stats, optimizer state) and a JSON ``meta`` item (the config,
the model name, the data position). Orbax writes into a temporary directory
and renames it when complete, so a crash mid-save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import pathlib
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

STATE, META = 'state', 'meta'
# Orbax names a save in progress `<step>.orbax-checkpoint-tmp-<timestamp>`.
_UNFINISHED = '.orbax-checkpoint-tmp'


class Checkpoints:
  """A `CheckpointManager` over one directory, keeping the last ``keep`` steps."""

  def __init__(self, directory: str | pathlib.Path, keep: int | None = None, read_only=False):
    self.directory = pathlib.Path(directory).absolute()
    if not read_only:
      self._remove_unfinished_saves()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only
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

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON) as ``step``."""
    args = ocp.args.Composite(
      **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
    )
    self.manager.save(step, args=args, force=True)

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
    """Blocks until background saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

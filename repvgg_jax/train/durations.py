"""A run's durations in steps, and the one test of "is it time to log, evaluate or
checkpoint?"."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Every duration of a run in steps, and the one test of 'is it time?'."""

  total_steps: int
  steps_per_epoch: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  steps_per_call: int = 1

  @classmethod
  def from_config(cls, config, steps_per_epoch: int) -> Schedule:
    total = config.num_train_steps if config.num_train_steps > 0 else None
    total = total or int(round(config.num_epochs * steps_per_epoch))
    eval_every = int(round(config.eval_every_epochs * steps_per_epoch)) or total
    return cls(
      total,
      steps_per_epoch,
      config.log_every_steps,
      eval_every,
      config.checkpoint_every_steps,
      config.steps_per_call,
    )

  def due(self, step: int, every: int) -> bool:
    """True every ``every`` steps and at the last step (``every`` <= 0: only at the end)."""
    return step == self.total_steps or (every > 0 and step % every == 0)

  def steps_in_call(self, step: int) -> int:
    """Steps the next call runs after ``step``: ``steps_per_call``, or 1 where a log,
    evaluation or checkpoint falls due before the last of them (they run between calls)."""
    count = self.steps_per_call
    if count == 1 or step + count > self.total_steps:
      return 1
    everies = (self.log_every, self.eval_every, self.checkpoint_every)
    inside = range(step + 1, step + count)
    return 1 if any(self.due(s, every) for s in inside for every in everies) else count

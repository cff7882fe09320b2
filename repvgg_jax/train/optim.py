"""The paper's optimizer: SGD with momentum, cosine learning rate, selective weight decay."""

from __future__ import annotations

from typing import Any

import optax
from flax import traverse_util

from repvgg_jax.model import trees

CLASSIFIER = 'linear'  # The parameters outside the backbone.
# The paper's learning rate is 0.1 for a batch of 256; it scales linearly.
REFERENCE_BATCH_SIZE = 256


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Per-step cosine decay to 0, after an optional linear warm-up.

  Args:
    config: the run's config (``optimizer.learning_rate`` per 256 images,
      ``optimizer.warmup_epochs``, ``batch_size``).
    steps_per_epoch: optimizer steps in one epoch.
    total_steps: steps of the whole run; the cosine ends there.
  """
  peak = config.optimizer.learning_rate * config.batch_size / REFERENCE_BATCH_SIZE
  warmup_steps = int(config.optimizer.warmup_epochs * steps_per_epoch)
  cosine = optax.cosine_decay_schedule(peak, decay_steps=max(1, total_steps - warmup_steps))
  if warmup_steps == 0:
    return cosine
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, cosine], [warmup_steps])


def weight_decay_mask(params: Any) -> Any:
  """True where the reference applies weight decay.

  The reference trainer decays every parameter whose name contains neither
  'bias' nor 'bn': conv and classifier kernels, and the scale of the identity
  BatchNorm (a bare ``rbr_identity`` BatchNorm in PyTorch); it skips all
  biases, the BatchNorms inside the conv branches and QARepVGG's BatchNorm of
  the sum (``post_bn``, ``bn`` in PyTorch).
  """
  flat = traverse_util.flatten_dict(params)
  mask = {
    path: path[-1] == 'kernel' or (path[-1] == 'scale' and not any('bn' in key for key in path))
    for path in flat
  }
  return traverse_util.unflatten_dict(mask)


def _by_top_key(params: Any, predicate) -> Any:
  """A mask of ``params``: ``predicate(key)`` for every leaf under the top-level ``key``."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({path: predicate(path[0]) for path in flat})


def backbone_mask(params: Any) -> Any:
  """True for every parameter but the classifier's."""
  return _by_top_key(params, lambda key: key != CLASSIFIER)


def frozen_mask(params: Any, frozen_stages: int) -> Any:
  """True for the parameters of the blocks of the first ``frozen_stages`` stages."""

  def frozen(key: str) -> bool:
    position = trees.block_position(key)
    return position is not None and position[0] < frozen_stages

  return _by_top_key(params, frozen)


def make_optimizer(config, steps_per_epoch: int, total_steps: int) -> optax.GradientTransformation:
  """SGD with momentum and coupled L2 weight decay, as PyTorch's ``SGD(weight_decay=...)``.

  The decay is added to the gradient before momentum, like PyTorch, not
  decoupled as in AdamW. For fine-tuning, the backbone's updates are scaled by
  ``optimizer.backbone_lr_multiplier`` (the same as a smaller learning rate:
  momentum is linear) and those of the first ``freeze_stages`` stages are zero.
  """
  schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
  parts = [
    optax.add_decayed_weights(config.optimizer.weight_decay, mask=weight_decay_mask),
    optax.sgd(schedule, momentum=config.optimizer.momentum, nesterov=config.optimizer.nesterov),
  ]
  multiplier = config.optimizer.get('backbone_lr_multiplier', 1.0)
  if multiplier != 1.0:
    parts.append(optax.masked(optax.scale(multiplier), backbone_mask))
  frozen_stages = config.get('freeze_stages', 0)
  if frozen_stages:
    parts.append(optax.masked(optax.set_to_zero(), lambda p: frozen_mask(p, frozen_stages)))
  return optax.chain(*parts)

"""The paper's optimizer: SGD with momentum, cosine learning rate, selective weight decay."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from repvgg_jax.model import trees
from repvgg_jax.model.branches import BN_EPSILON

CLASSIFIER = 'linear'  # The parameters outside the backbone.
# The paper's learning rate is 0.1 for a batch of 256; it scales linearly.
REFERENCE_BATCH_SIZE = 256


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Per-step cosine decay to 0, after an optional linear warm-up from 0.

  With ``optimizer.warmup_prefix`` (the default) the cosine runs over the steps
  after the warm-up. Without it the cosine runs over the whole run and the
  warm-up takes the place of its first steps, as timm's ``CosineLRScheduler``
  (``warmup_prefix=False``), which the reference's 200-epoch trainer uses (it
  updates the rate after each step, so its rates trail these by one step).

  Args:
    config: the run's config (``optimizer.learning_rate`` per 256 images,
      ``optimizer.warmup_epochs``, ``optimizer.warmup_prefix``, ``batch_size``).
    steps_per_epoch: optimizer steps in one epoch.
    total_steps: steps of the whole run; the cosine ends there.
  """
  peak = config.optimizer.learning_rate * config.batch_size / REFERENCE_BATCH_SIZE
  warmup_steps = int(config.optimizer.warmup_epochs * steps_per_epoch)
  if warmup_steps == 0:
    return optax.cosine_decay_schedule(peak, decay_steps=max(1, total_steps))
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  if config.optimizer.get('warmup_prefix', True):
    cosine = optax.cosine_decay_schedule(peak, decay_steps=max(1, total_steps - warmup_steps))
  else:
    whole_run = optax.cosine_decay_schedule(peak, decay_steps=max(1, total_steps))

    def cosine(count):  # `join_schedules` counts from the warm-up's end.
      return whole_run(count + warmup_steps)

  return optax.join_schedules([warmup, cosine], [warmup_steps])


def _kernel_pairs(params: Any):
  """``(block key, conv3x3 subtree, conv1x1 subtree)`` of every block whose 3x3 and 1x1
  branches are conv-BN pairs: those the reference's custom L2 regularises."""
  for key in trees.block_keys(params):
    block = params[key]
    branches = [block.get(name) for name in ('conv3x3', 'conv1x1')]
    if all(isinstance(b, dict) and 'bn' in b and 'conv' in b for b in branches):
      yield key, *branches


def equivalent_kernel_l2(params: Any, batch_stats: Any) -> jax.Array:
  """The reference's ``get_custom_L2``, summed over the blocks (`_kernel_pairs`).

  Plain L2 on the 3x3 kernel's ring (all but its centre), and on the centre of
  the equivalent kernel, ``K3[1, 1] * t3 + K1 * t1`` with ``t = gamma / sqrt(var +
  eps)`` held constant, divided by ``t3^2 + t1^2`` so that the coefficient
  compares with plain weight decay. The training loss adds ``weight_decay / 2``
  times this (`repvgg_jax.train.steps`), and the optimizer then leaves these
  kernels out of its own decay (`weight_decay_mask`).
  """
  total = jnp.zeros((), jnp.float32)
  for key, dense, pointwise in _kernel_pairs(params):
    stats = batch_stats[key]
    k3, k1 = dense['conv']['kernel'], pointwise['conv']['kernel'][0, 0]
    t3, t1 = (
      jax.lax.stop_gradient(branch['bn']['scale'] / jnp.sqrt(stats[name]['bn']['var'] + BN_EPSILON))
      for name, branch in (('conv3x3', dense), ('conv1x1', pointwise))
    )
    centre = k3[1, 1]
    ring = jnp.sum(k3**2) - jnp.sum(centre**2)
    equivalent = centre * t3 + k1 * t1  # (in per group, out): t scales the output channels.
    total = total + ring + jnp.sum(equivalent**2 / (t3**2 + t1**2))
  return total


def weight_decay_mask(params: Any, custom_l2: bool = False) -> Any:
  """True where the reference applies weight decay.

  The reference trainer decays every parameter whose name contains neither
  'bias' nor 'bn': conv and classifier kernels, and the scale of the identity
  BatchNorm (a bare ``rbr_identity`` BatchNorm in PyTorch); it skips all
  biases, the BatchNorms inside the conv branches and QARepVGG's BatchNorm of
  the sum (``post_bn``, ``bn`` in PyTorch). With ``custom_l2`` it also skips
  the 3x3 and 1x1 kernels that `equivalent_kernel_l2` regularises instead.
  """
  flat = traverse_util.flatten_dict(params)
  mask = {
    path: path[-1] == 'kernel' or (path[-1] == 'scale' and not any('bn' in key for key in path))
    for path in flat
  }
  if custom_l2:  # Their decay is `equivalent_kernel_l2`'s, in the loss.
    for key, _, _ in _kernel_pairs(params):
      mask[(key, 'conv3x3', 'conv', 'kernel')] = mask[(key, 'conv1x1', 'conv', 'kernel')] = False
  return traverse_util.unflatten_dict(mask)


def _mask(params: Any, predicate) -> Any:
  """A mask of ``params``: ``predicate(path)`` for every leaf, ``path`` its keys."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({path: predicate(path) for path in flat})


def bias_mask(params: Any) -> Any:
  """True for every bias (the reference's names with 'bias': BatchNorm shifts and the
  classifier's bias), which its first trainer gives twice the learning rate."""
  return _mask(params, lambda path: path[-1] == 'bias')


def backbone_mask(params: Any) -> Any:
  """True for every parameter but the classifier's."""
  return _mask(params, lambda path: path[0] != CLASSIFIER)


def frozen_mask(params: Any, frozen_stages: int) -> Any:
  """True for the parameters of the blocks of the first ``frozen_stages`` stages."""

  def frozen(key: str) -> bool:
    position = trees.block_position(key)
    return position is not None and position[0] < frozen_stages

  return _mask(params, lambda path: frozen(path[0]))


def sgd(
  learning_rate: float | optax.Schedule,
  *,
  momentum: float,
  weight_decay: float,
  nesterov: bool = False,
  custom_l2: bool = False,
  bias_lr_multiplier: float = 1.0,
  backbone_lr_multiplier: float = 1.0,
  frozen_stages: int = 0,
) -> optax.GradientTransformation:
  """SGD with momentum and coupled L2 weight decay, as PyTorch's ``SGD(weight_decay=...)``.

  The decay (`weight_decay_mask`) is added to the gradient before momentum, like
  PyTorch, not decoupled as in AdamW. The biases' updates are scaled by
  ``bias_lr_multiplier`` (the same as a per-parameter learning rate in PyTorch:
  momentum is linear). For fine-tuning, the backbone's updates are scaled by
  ``backbone_lr_multiplier`` and those of the first ``frozen_stages`` stages are zero.
  """
  parts = [
    optax.add_decayed_weights(weight_decay, mask=lambda p: weight_decay_mask(p, custom_l2)),
    optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  ]
  for multiplier, mask in (
    (bias_lr_multiplier, bias_mask),
    (backbone_lr_multiplier, backbone_mask),
  ):
    if multiplier != 1.0:
      parts.append(optax.masked(optax.scale(multiplier), mask))
  if frozen_stages:
    parts.append(optax.masked(optax.set_to_zero(), lambda p: frozen_mask(p, frozen_stages)))
  return optax.chain(*parts)


def make_optimizer(config, steps_per_epoch: int, total_steps: int) -> optax.GradientTransformation:
  """The run's optimizer: `sgd` with ``config.optimizer``'s settings on the
  `learning_rate_schedule`, the first ``config.freeze_stages`` stages frozen."""
  optimizer = config.optimizer
  return sgd(
    learning_rate_schedule(config, steps_per_epoch, total_steps),
    momentum=optimizer.momentum,
    weight_decay=optimizer.weight_decay,
    nesterov=optimizer.nesterov,
    custom_l2=optimizer.get('custom_l2', False),
    bias_lr_multiplier=optimizer.get('bias_lr_multiplier', 1.0),
    backbone_lr_multiplier=optimizer.get('backbone_lr_multiplier', 1.0),
    frozen_stages=config.get('freeze_stages', 0),
  )

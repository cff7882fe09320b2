"""Train and eval steps: pure functions of a `TrainState` and a batch.

They are jitted by the trainer over a device mesh; here they only see global
arrays. BatchNorm statistics are computed over the whole (global) batch, or,
with ``bn_group_size``, over fixed groups of examples as the reference's
per-GPU BatchNorm did, which keeps results independent of the device count.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from repvgg_jax.perf import compile_options
from repvgg_jax.train import optim

# With both mixup and cutmix on, the share of batches that get cutmix (timm's switch_prob).
CUTMIX_SHARE = 0.5


class TrainState(train_state.TrainState):
  """Optimizer state plus the BatchNorm running statistics, and, when the run keeps
  one, the exponential moving average of both: ``ema = {'params', 'batch_stats'}``."""

  batch_stats: Any
  ema: Any = None


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  """Mean softmax cross-entropy against (possibly soft) labels."""
  targets = labels if labels.ndim == 2 else jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def mixup(rng, images, labels, num_classes: int, alpha: float):
  """Mixes each example with the batch reversed, weight ~ Beta(alpha, alpha); the
  images keep their dtype, as in `cutmix`."""
  weight = jax.random.beta(rng, alpha, alpha)
  targets = jax.nn.one_hot(labels, num_classes)
  mixed = (weight * images + (1 - weight) * images[::-1]).astype(images.dtype)
  return mixed, weight * targets + (1 - weight) * targets[::-1]


def cutmix(rng, images, labels, num_classes: int, alpha: float):
  """Pastes a box of the batch reversed into each image (CutMix, Yun et al. 2019).

  The box covers ``1 - lam`` of the image, ``lam ~ Beta(alpha, alpha)``, centred
  at a uniform pixel and clipped at the borders; the targets mix by the area
  actually kept, as timm's ``Mixup`` with ``correct_lam`` does.
  """
  weight_rng, row_rng, col_rng = jax.random.split(rng, 3)
  weight = jax.random.beta(weight_rng, alpha, alpha)
  _, height, width, _ = images.shape
  cut = jnp.sqrt(1.0 - weight)
  half_h, half_w = (height * cut).astype(jnp.int32) // 2, (width * cut).astype(jnp.int32) // 2
  row, col = jax.random.randint(row_rng, (), 0, height), jax.random.randint(col_rng, (), 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  box = (
    (rows >= row - half_h) & (rows < row + half_h) & (cols >= col - half_w) & (cols < col + half_w)
  )
  mixed = jnp.where(box[None, :, :, None], images[::-1], images)
  kept = 1.0 - box.sum() / (height * width)
  targets = jax.nn.one_hot(labels, num_classes)
  return mixed, kept * targets + (1 - kept) * targets[::-1]


def mix_batch(rng, images, labels, num_classes: int, mixup_alpha: float, cutmix_alpha: float):
  """Mixup, cutmix, or one of the two per batch (cutmix in `CUTMIX_SHARE` of them) when
  both alphas are positive; returns images and soft targets."""
  choice_rng, mix_rng = jax.random.split(rng)
  if cutmix_alpha <= 0:
    return mixup(mix_rng, images, labels, num_classes, mixup_alpha)
  if mixup_alpha <= 0:
    return cutmix(mix_rng, images, labels, num_classes, cutmix_alpha)
  return jax.lax.cond(  # Only the chosen one is computed.
    jax.random.bernoulli(choice_rng, CUTMIX_SHARE),
    lambda: cutmix(mix_rng, images, labels, num_classes, cutmix_alpha),
    lambda: mixup(mix_rng, images, labels, num_classes, mixup_alpha),
  )


def update_ema(ema, state, decay: float):
  """``decay * ema + (1 - decay) * (params, batch_stats)`` of ``state``."""
  current = {'params': state.params, 'batch_stats': state.batch_stats}
  return jax.tree.map(lambda e, v: decay * e + (1 - decay) * v, ema, current)


def apply_in_groups(model: nn.Module, variables, images, group_size: int):
  """Train-mode forward with BatchNorm statistics per group of ``group_size`` examples.

  Returns the logits and the running statistics averaged over the groups
  (each group's update is linear in its batch statistics, so the average is
  the update of the mean statistics).
  """
  batch = images.shape[0]
  if group_size <= 0 or group_size >= batch:
    return model.apply(variables, images, train=True, mutable=['batch_stats'])
  if batch % group_size:
    raise ValueError(f'The batch of {batch} does not split into BatchNorm groups of {group_size}.')
  grouped = images.reshape(batch // group_size, group_size, *images.shape[1:])
  forward = lambda x: model.apply(variables, x, train=True, mutable=['batch_stats'])
  logits, updates = jax.vmap(forward)(grouped)
  updates = jax.tree.map(lambda s: s.mean(axis=0), updates)
  return logits.reshape(batch, -1), updates


def train_step(
  state: TrainState,
  batch,
  rng,
  *,
  model,
  num_classes: int,
  bn_group_size: int = 0,
  mixup_alpha: float = 0.0,
  cutmix_alpha: float = 0.0,
  label_smoothing: float = 0.0,
  ema_decay: float = 0.0,
  custom_l2: float = 0.0,
):
  """One SGD step. Returns the new state and metrics (loss, top-1).

  Args:
    state: parameters, BatchNorm statistics and optimizer state.
    batch: ``{'image': NHWC float, 'label': int}``.
    rng: the run's mixup and cutmix key; each step folds in its step number
      here, on the device, so the loop passes the same key every step.
    model: the training-time `RepVGG`.
    num_classes: classifier outputs.
    bn_group_size: images per BatchNorm statistics group (`apply_in_groups`).
    mixup_alpha: mixup's Beta parameter; 0 for no mixup.
    cutmix_alpha: cutmix's Beta parameter; 0 for no cutmix (`mix_batch`).
    label_smoothing: of the cross-entropy's targets.
    ema_decay: of the moving average ``state.ema`` (updated after the step
      when it is not None).
    custom_l2: the coefficient of `optim.equivalent_kernel_l2` in the loss (the
      reference's custom L2: half the weight decay); 0 for none.
  """
  images, labels = batch['image'], batch['label']
  targets = labels
  if mixup_alpha > 0 or cutmix_alpha > 0:
    step_rng = jax.random.fold_in(rng, state.step)
    images, targets = mix_batch(step_rng, images, labels, num_classes, mixup_alpha, cutmix_alpha)

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    logits, updates = apply_in_groups(model, variables, images, bn_group_size)
    loss = cross_entropy(logits, targets, num_classes, label_smoothing)
    if custom_l2:  # After the forward pass, on its running statistics, as the reference.
      loss = loss + custom_l2 * optim.equivalent_kernel_l2(params, updates['batch_stats'])
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if state.ema is not None:
    state = state.replace(ema=update_ema(state.ema, state, ema_decay))
  top1 = jnp.mean(jnp.argmax(logits, -1) == labels)
  return state, {'loss': loss, 'top1': top1}


def train_steps(state: TrainState, batches, rng, **options):
  """`train_step` over the leading axis of ``batches``: several steps in one call.

  A `jax.lax.scan`, so the steps are one program: the host dispatches and
  synchronises once per call, and on CPUs the call's temporary memory is
  allocated (and page-faulted in) once rather than once per step. The results
  are those of calling `train_step` on each batch in turn, with ``options``
  (its keyword arguments). Returns the final state and each step's metrics, stacked.
  """
  step = lambda s, batch: train_step(s, batch, rng, **options)
  return jax.lax.scan(step, state, batches)


def jit_training(mesh, *, stacked: bool = False, **options):
  """The jitted training program and its batch's sharding: ``(program, sharding)``.

  `train_step` with ``options`` (its keyword arguments: the model, the
  number of classes, ...), or with ``stacked`` `train_steps` over batches stacked
  on a leading steps axis; called as ``program(state, batch, rng)``. The state and
  rng are replicated over ``mesh``, the batch sharded over its ``data`` axis,
  the state donated off CPUs (`compile_options.state_donation`), and the
  program compiled with ``light_codegen`` (its time is in library kernels).
  """
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(None, 'data') if stacked else P('data'))
  program = compile_options.jit(
    functools.partial(train_steps if stacked else train_step, **options),
    in_shardings=(replicated, batch_sharding, replicated),
    out_shardings=(replicated, replicated),
    donate_argnums=compile_options.state_donation(),
    light_codegen=True,
  )
  return program, batch_sharding


def _correct_counts(logits, labels, mask):
  """Masked counts of top-1 and top-5 hits, and the masked loss sum."""
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  hit1 = (top5[:, 0] == labels) & mask
  hit5 = jnp.any(top5 == labels[:, None], axis=-1) & mask
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return hit1.sum(), hit5.sum(), jnp.where(mask, losses, 0).sum()


def eval_step(variables, deploy_variables, batch, *, model, deploy_model):
  """Hit counts of the training-time model and of its fused deploy model on one batch."""
  images, labels, mask = batch['image'], batch['label'], batch['mask']
  logits = model.apply(variables, images, train=False)
  fused_logits = deploy_model.apply(deploy_variables, images)
  top1, top5, loss = _correct_counts(logits, labels, mask)
  fused_top1, fused_top5, _ = _correct_counts(fused_logits, labels, mask)
  return {
    'count': mask.sum(),
    'top1': top1,
    'top5': top5,
    'loss': loss,
    'top1_fused': fused_top1,
    'top5_fused': fused_top5,
  }

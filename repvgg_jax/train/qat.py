"""Quantization-aware fine-tuning (QAT) of a fused RepVGG with Qwix's fake int8.

With ``config.qat.enabled`` the trainer fine-tunes the deploy model (plain 3x3
convolutions with bias) from ``config.qat.init_from`` with every convolution and
the classifier computed through int8 in the forward pass (static activation
ranges learned as a running average, per-channel weight scales) and straight-
through gradients. Checkpoints, resume and SIGTERM are the trainer's; the
saved ``deploy/`` checkpoint holds the fine-tuned float weights, which
``python -m repvgg_jax.convert quantize`` turns into the int8 model.

`QuantizationAwareModel` gives the Qwix model the trainer's interface: its
variables are ``{'params', 'batch_stats'}`` with Qwix's ``quant_stats`` in the
``batch_stats`` slot, the one collection a train step updates.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import qwix

from repvgg_jax.interop import checkpoint_io, quantize
from repvgg_jax.model import trees


class QuantizationAwareModel:
  """The deploy model with Qwix's fake int8 (static ranges), applied as a Linen module is.

  ``apply(variables, images, train=..., mutable=['batch_stats'])`` returns the
  logits and ``{'batch_stats': updated quant_stats}``; without ``mutable``, the
  logits with the ranges frozen.
  """

  def __init__(self, deploy_model, image_size: int):
    self.deploy_model = deploy_model
    self.in_channels = deploy_model.in_channels
    self.qat = qwix.quantize_model(deploy_model, qwix.QtProvider(quantize.rules('static')))
    # Op by op: Qwix's calibrating convolution leaks a tracer when traced without
    # a gradient (qwix 0.1.8). The statistics start at zero; only their tree matters.
    images = jnp.zeros((1, image_size, image_size, self.in_channels), jnp.float32)
    self.initial_stats = self.qat.init(jax.random.key(0), images)['quant_stats']

  def init(self, rng, images):
    return {
      'params': self.deploy_model.init(rng, images)['params'],
      'batch_stats': self.initial_stats,
    }

  def apply(self, variables, images, train: bool = False, mutable=False):
    del train  # The deploy model has no BatchNorm: train and eval differ only in `mutable`.
    inner = {'params': variables['params'], 'quant_stats': variables['batch_stats']}
    if not mutable:
      return self.qat.apply(inner, images)
    logits, updates = self.qat.apply(inner, images, mutable=['quant_stats'])
    return logits, {'batch_stats': updates['quant_stats']}

  def clone(self, **updates):
    del updates  # Its convolutions are `nn.Conv` already: Qwix intercepts lax's.
    return self


def check_config(config, variant, resuming: bool = False) -> str | None:
  """What makes a QAT config unusable, as one line, or None (``resuming``: from a
  checkpoint, which holds what ``qat.init_from`` would give)."""
  if not config.qat.init_from and not resuming:
    return (
      'qat.enabled needs qat.init_from: a trained workdir or a deploy (or training) checkpoint '
      'to fine-tune, e.g. --config.qat.init_from=workdirs/digits.'
    )
  if config.model.bn_group_size:
    return 'QAT trains the deploy model, which has no BatchNorm: set model.bn_group_size=0.'
  if config.get('freeze_stages', 0):
    return 'QAT fine-tunes the whole fused model, no stage frozen: set freeze_stages=0.'
  if config.get('ema_decay', 0.0):
    return (
      'QAT keeps no moving average of the weights (its activation ranges are counts and '
      'sums, not weights to average): set ema_decay=0.'
    )
  if variant.groups > 1:
    return (
      f'QAT of grouped variants ({variant.name}) is not supported: the quantized convolution '
      'of qwix 0.1.8 fails to differentiate for feature_group_count > 1; use PTQ '
      '(python -m repvgg_jax.convert quantize).'
    )
  return None


def initial_params(config, abstract_params):
  """The deploy parameters of ``config.qat.init_from``, checked against the model's shapes.

  ``init_from`` is a workdir (its ``deploy/`` checkpoint, else its training one,
  fused here), a checkpoint directory or one step of it.

  Raises:
    ValueError: nothing readable there, or another architecture (one line each).
  """
  path = pathlib.Path(config.qat.init_from)
  try:
    variables, _, saved = checkpoint_io.fused_variables(path)  # A training one is fused.
  except (FileNotFoundError, ValueError) as error:
    raise ValueError(f'qat.init_from: {error}') from None
  if not trees.same_shapes(variables['params'], abstract_params):
    found = checkpoint_io.variant_held(variables['params'], saved) or 'another architecture'
    raise ValueError(
      f'qat.init_from: {path} holds {found}, not the deploy form of {config.model.name} with '
      f'{config.dataset.num_classes} classes that the config fine-tunes.'
    )
  return variables['params']

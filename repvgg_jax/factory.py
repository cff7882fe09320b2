"""`create_model` as the package exports it: the model package's, plus ``pretrained=``."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from repvgg_jax.model import network


def create_model(
  variant, /, *, pretrained: str | os.PathLike | None = None, seed: int = 0, **options
):
  """`repvgg_jax.model.create_model` (the same arguments), and its weights in one call.

  Args:
    variant: a variant name or `Variant`, as for `repvgg_jax.model.create_model`.
    pretrained: weights to load: a weight file or checkpoint
      (`repvgg_jax.interop.pretrained`) or a hub reference such as
      ``'hf-hub:timm/repvgg_a0.rvgg_in1k'`` (`repvgg_jax.interop.hub`).
    seed: initialises what the weights do not hold (a classifier of another
      number of classes, with a warning naming it).
    **options: ``num_classes``, ``deploy``, ``branches``, ``dtype`` ... as for
      `repvgg_jax.model.create_model`.

  Returns:
    The model; with ``pretrained``, ``(model, variables)``. Training-time
    weights are fused for ``deploy=True``; a backbone (``num_classes=0``)
    drops the classifier.
  """
  model = network.create_model(variant, **options)
  if pretrained is None:
    return model
  # Imported on first use: loading weights brings in orbax and the converters.
  from repvgg_jax.interop.pretrained import load_pretrained

  images = jnp.zeros((1, 32, 32, model.in_channels))
  init = lambda: model.init(jax.random.key(seed), images)
  # The weights replace every leaf but a classifier of another number of classes:
  # the model is initialised (compiled and run) only when one is left.
  variables = load_pretrained(jax.eval_shape(init), pretrained)
  if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(variables)):
    variables = jax.tree.map(_unless_abstract, variables, jax.jit(init)())
  return model, variables


def _unless_abstract(leaf, initial):
  return initial if isinstance(leaf, jax.ShapeDtypeStruct) else leaf

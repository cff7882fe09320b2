"""Shared test utilities: random non-trivial variables and error measures."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def random_variables(model, input_shape, seed=0):
  """Variables of ``model`` with random kernels and non-trivial BatchNorm state.

  Freshly initialised BatchNorm (scale 1, bias 0, mean 0, var 1) hides fusion
  errors, so every scale, bias, running mean and running variance is random.
  Kernels are drawn with variance 1/fan_in to keep activations in range
  through the deep networks. Built with numpy from `jax.eval_shape`: no
  compiled init, so even B3 is cheap.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))
  flat = traverse_util.flatten_dict(jax.tree.map(lambda s: s, dict(shapes)))
  out = {}
  for path, leaf in flat.items():
    shape, name = leaf.shape, path[-1]
    if name == 'kernel':
      fan_in = int(np.prod(shape[:-1]))
      value = rng.normal(0, np.sqrt(1.0 / fan_in), shape)
    elif name == 'scale':
      value = rng.uniform(0.4, 1.2, shape)
    elif name == 'bias':
      value = rng.normal(0, 0.2, shape)
    elif name == 'mean':
      value = rng.normal(0, 0.2, shape)
    elif name == 'var':
      value = rng.uniform(0.5, 2.0, shape)
    else:
      raise AssertionError(f'unexpected leaf {path}')
    out[path] = jnp.asarray(value, jnp.float32)
  return traverse_util.unflatten_dict(out)


def relative_error(actual, expected):
  """``||actual - expected|| / ||expected||`` in float64."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))

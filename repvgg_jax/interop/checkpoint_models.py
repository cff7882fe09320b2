"""The Flax models that a checkpoint's parameter trees, or its training run's config, describe,
and the comparison of two models' outputs that every conversion reports."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from repvgg_jax import perf
from repvgg_jax.model import PAPER_BRANCHES, create_model, model_from_config, shapes, trees
from repvgg_jax.model.branches import POST_NORM_KEY, get_branch
from repvgg_jax.model.network import NUM_STAGES
from repvgg_jax.perf import compile_options


def outputs(model, variables, images) -> np.ndarray:
  """The model's logits (or a backbone's stage outputs) as one float64 row per image."""
  return flat(compile_options.jit(model.apply)(variables, images))


def max_relative_difference(a: np.ndarray, b: np.ndarray) -> float:
  """Largest per-example ``||a - b|| / ||b||``."""
  diff = np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-12)
  return float(diff.max())


def random_images(size: int = 64, batch: int = 4, channels: int = 3) -> jax.Array:
  """A fixed batch of standard-normal NHWC images, the input that conversions compare on."""
  return jax.random.normal(jax.random.key(0), (batch, size, size, channels))


def flat(tree) -> np.ndarray:
  """Outputs (logits, or the stage outputs of a backbone) as one float64 row per example."""
  leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]
  return np.concatenate([leaf.reshape(len(leaf), -1) for leaf in leaves], axis=1)


def config_models(config: dict, conv_impl: str):
  """``(training-time model, deploy model)`` of a run's ``config``, in float32 as
  exported whatever the run computed in; the deploy one with ``conv_impl``."""
  config = ml_collections.ConfigDict(config)
  conv = perf.conv_layer(conv_impl, train=False)
  return (
    model_from_config(config, dtype='float32'),
    model_from_config(config, deploy=True, conv=conv, dtype='float32'),
  )


def tree_models(name: str, fused_params, training_params, conv_impl: str):
  """``(training-time model, deploy model)`` of the variant ``name`` with the classes,
  input channels and stages of ``fused_params``; the training-time one has the branches
  of ``training_params`` (None: no training-time model)."""
  options = _model_options(fused_params, conv_impl)
  training_model = None
  if training_params is not None:
    branches = _branches_per_stage(training_params)
    training_model = create_model(name, branches=branches, **options)
  return training_model, create_model(name, deploy=True, **options)


def _branches_per_stage(params) -> list[tuple[str, ...]]:
  """The branch kinds of each stage's blocks (the paper's for stages a backbone left out).

  A kind that stands in for another where that one does not apply (QARepVGG's
  plain 1x1 for its 1x1-plus-identity) is left to the kind it stands in for.
  """
  stages: dict[int, set[str]] = {}
  for key in trees.block_keys(params):
    stage, _ = trees.block_position(key)
    stages.setdefault(stage, set()).update(k for k in params[key] if k != POST_NORM_KEY)
  for kinds in stages.values():
    kinds -= {get_branch(kind).fallback for kind in kinds}
  return [tuple(sorted(stages.get(s, PAPER_BRANCHES))) for s in range(NUM_STAGES)]


def _model_options(params, conv_impl: str) -> dict:
  """`create_model` arguments that fit a (fused) parameter tree: its classes, input
  channels and, for a backbone, every stage it holds (out_indices may have cut it short)."""
  num_classes = int(params['linear']['kernel'].shape[1]) if 'linear' in params else 0
  last_stage = shapes.architecture(params)[-1].stage if num_classes == 0 else NUM_STAGES - 1
  return {
    'num_classes': num_classes,
    'in_channels': int(params['stage0_block0']['reparam']['kernel'].shape[2]),
    'conv': perf.conv_layer(conv_impl, train=False),
    'out_indices': tuple(range(last_stage + 1)),
  }

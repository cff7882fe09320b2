"""Pretrained weights into a RepVGG, alone or inside a larger network.

    variables = model.init(key, images)  # A network holding create_model(..., name='backbone').
    variables = load_pretrained(variables, 'RepVGG-A0-train.pth', at='backbone')

The weights are those `python -m repvgg_jax.convert import` reads (PyTorch
.pth/.pt, .safetensors or .npz, reference or timm keys; a Hugging Face Hub
reference such as ``hf-hub:timm/repvgg_a0.rvgg_in1k``) or a checkpoint this
package wrote (the output of ``convert import`` or ``convert fuse``, a training
workdir, its checkpoints or one step).
"""

from __future__ import annotations

import pathlib
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp

from repvgg_jax.interop import checkpoint_io, hub, torch_layout, weight_files
from repvgg_jax.interop.torch_layout import ConversionError
from repvgg_jax.model import fusion, shapes, trees

CLASSIFIER = 'linear'


def read_weights(source: str | pathlib.Path) -> dict:
  """``{'params'[, 'batch_stats']}`` of the RepVGG stored at ``source``.

  Raises:
    FileNotFoundError: nothing at ``source``.
    ConversionError: the file or checkpoint is not RepVGG weights.
  """
  path = hub.resolve(source)
  if path.is_file():
    # Checked against the model they are loaded into, which may take a backbone cut short.
    variables, _ = torch_layout.from_torch(weight_files.load_state_dict(path), named=False)
    return variables
  if not path.is_dir():
    hint = (  # timm's own way to name its hub weights.
      f' (a timm hub name? write hf-hub:{source})'
      if str(source).count('/') == 1 and str(source).startswith('timm/')
      else ''
    )
    raise FileNotFoundError(
      f'No weights at {path}{hint}: give a weight file, a checkpoint directory or an '
      'hf-hub: reference.'
    )
  ckpt, step, _ = checkpoint_io.training_checkpoint(path)
  try:
    if ckpt.latest_step() is None:
      raise checkpoint_io.no_checkpoint(path)
    state, _ = ckpt.restore(step=step)
  finally:
    ckpt.close()
  return {key: state[key] for key in ('params', 'batch_stats') if key in state}


def load_pretrained(
  variables: Mapping[str, Any], source: str | pathlib.Path, *, at: str | Sequence[str] = ''
) -> dict:
  """``variables`` with the weights of ``source`` in the RepVGG at ``at``
  (`load_weights` of `read_weights`; the arguments, result and errors are theirs)."""
  return load_weights(variables, read_weights(source), at=at, source=source)


def load_weights(
  variables: Mapping[str, Any],
  weights: Mapping[str, Any],
  *,
  at: str | Sequence[str] = '',
  source: str | pathlib.Path = 'the weights',
) -> dict:
  """``variables`` with the weights of ``source`` in the RepVGG at ``at``.

  Args:
    variables: of a RepVGG (a classifier, or a backbone: ``num_classes=0``,
      any ``out_indices``), training-time or deploy, or of a network holding
      one at ``at``; e.g. from ``init``, or only their shapes (from
      `jax.eval_shape`), which saves initialising the network: the leaves the
      weights do not replace then stay abstract.
    weights: ``{'params'[, 'batch_stats']}`` of a RepVGG, e.g. from `read_weights`.
    source: where the weights come from (a weight file or checkpoint, see the
      module docstring), for the errors.
    at: where the RepVGG sits, as a '/'-separated path (``'backbone'``,
      ``'encoder/backbone'``) or a sequence of keys; ``''`` for the top.

  Returns:
    New variables; everything outside ``at`` is untouched. The classifier of
    the weights is dropped when the model has none, and kept out (the model's
    own, with a warning) when its number of classes differs; the blocks of
    stages after a backbone's last are dropped; training-time weights are
    fused for a deploy model. Every other key must match in name and shape.

  Raises:
    ConversionError: no RepVGG at ``at``, deploy weights for a training-time
      model, or weights of another architecture (what is missing, unexpected
      or of the wrong shape, in one line), naming ``source``.
  """
  variables = flax.core.unfreeze(variables)  # Plain dicts in, plain dicts out.
  path = tuple(key for key in at.split('/') if key) if isinstance(at, str) else tuple(at)
  where = '/'.join(path) or 'the top of the tree'
  target = trees.subtree(variables.get('params', {}), path)
  if not isinstance(target, Mapping) or not trees.block_keys(target):
    keys = sorted(target) if isinstance(target, Mapping) else []
    raise ConversionError(
      f'No RepVGG (stage<s>_block<i> blocks) at {where} in the variables (keys there: {keys}): '
      "give at= the path of the model, e.g. at='backbone'."
    )
  held = shapes.identify_variant(weights['params'])  # Before a backbone's stages are cut.
  weights = _fitted(weights, target, where)
  expected = torch_layout.leaf_shapes(_at(variables, path))
  problems = torch_layout.differences(expected, torch_layout.leaf_shapes(weights))
  if problems:
    wanted = shapes.identify_variant(target)
    raise ConversionError(
      f'The weights of {source}{f" ({held})" if held else ""} do not fit the '
      f'{wanted or "RepVGG"} at {where}: {problems}'
    )
  result = dict(variables)
  for collection, tree in weights.items():
    tree = jax.tree.map(_array_unless_abstract, tree)
    result[collection] = (
      trees.replace_subtrees(variables[collection], {path: tree}) if path else tree
    )
  return result


def _array_unless_abstract(leaf):
  return leaf if isinstance(leaf, jax.ShapeDtypeStruct) else jnp.asarray(leaf)


def _at(variables: Mapping[str, Any], path: tuple[str, ...]) -> dict:
  """The collections of ``variables`` at ``path`` (those that have it)."""
  found = {name: trees.subtree(tree, path) for name, tree in variables.items()}
  return {name: tree for name, tree in found.items() if tree}


def _fitted(weights: dict, target: Mapping[str, Any], where: str) -> dict:
  """The weights made to fit the model at ``target`` as far as that is safe:
  fused for a deploy model, without a classifier it lacks or cannot take, and
  without the stages after a backbone's last."""
  params = weights['params']
  deploy = shapes.has_fused_blocks
  if deploy(target) and not deploy(params):
    weights = fusion.fuse_params(weights)
  elif deploy(params) and not deploy(target):
    raise ConversionError(
      f'The weights are fused (deploy) but the RepVGG at {where} is training-time: build it '
      'with deploy=True, or load training-time weights.'
    )
  params = dict(weights['params'])
  classifier = params.pop(CLASSIFIER, None)
  if classifier is not None and CLASSIFIER in target:
    classes = (classifier['kernel'].shape[-1], target[CLASSIFIER]['kernel'].shape[-1])
    params[CLASSIFIER] = classifier if classes[0] == classes[1] else target[CLASSIFIER]
    if classes[0] != classes[1]:
      warnings.warn(
        f'The weights have {classes[0]} classes, the model at {where} {classes[1]}: its '
        f'classifier {CLASSIFIER!r} keeps its own initialisation.',
        stacklevel=_outside_stacklevel(),
      )
  last_stage = max(trees.block_position(key)[0] for key in trees.block_keys(target))
  kept = {
    key: value
    for key, value in params.items()
    if trees.block_position(key) is None or trees.block_position(key)[0] <= last_stage
  }
  result = {'params': kept}
  if 'batch_stats' in weights:
    result['batch_stats'] = {k: v for k, v in weights['batch_stats'].items() if k in kept}
  return result


def _outside_stacklevel() -> int:
  """The `warnings.warn` stacklevel that names its caller's first caller outside this
  package: the user's line, whether it called `load_pretrained`, `load_weights` or
  `create_model(pretrained=...)`."""
  package = pathlib.Path(__file__).resolve().parents[1]

  def ours(filename: str) -> bool:  # '<string>', '<stdin>': the user's code, not a path.
    return not filename.startswith('<') and pathlib.Path(filename).resolve().is_relative_to(package)

  frame, level = sys._getframe(1), 1
  while frame is not None and ours(frame.f_code.co_filename):
    frame, level = frame.f_back, level + 1
  return level if frame is not None else 1

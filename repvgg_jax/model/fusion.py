"""Structural re-parameterization: training-time variables -> deploy variables.

`fuse_params` is a pure function on pytrees. It finds the blocks by their
layout wherever they sit (`repvgg_jax.model.trees`), reads each one's shape off
its parameters (`repvgg_jax.model.shapes`), fuses every block in float64 with
the rule of each of its branch kinds (`repvgg_jax.model.branches`), and casts
once to the parameters' dtype, so the fused model agrees with the training-time
model in inference mode up to float32 rounding. It is jittable: all checks are
on static shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp

from repvgg_jax.model import branches as branches_lib
from repvgg_jax.model import shapes, trees, variants
from repvgg_jax.model.shapes import FusionError

Tree = Mapping[str, Any]
FUSED_KEY = branches_lib.FUSED_KEY
POST_NORM_KEY = branches_lib.POST_NORM_KEY


def fuse_block(block_params: Tree, block_stats: Tree | None, *, name: str = 'block') -> dict:
  """Fuses one training-time block into its deploy parameters.

  Args:
    block_params: the block's params subtree, one entry per branch kind.
    block_stats: the block's batch_stats subtree (None or ``{}`` for a block
      without BatchNorm, as one of ``conv1x1_nobn`` and ``conv1x1_identity``).
    name: the block's name, for error messages.

  Returns:
    ``{'reparam': {'kernel': (3, 3, in/groups, out), 'bias': (out,)}}`` in the
    dtype of the block's parameters.

  Raises:
    FusionError: the block is already fused, has an unknown branch, lacks
      statistics, or its branches disagree in shape.
  """
  block_stats = {} if block_stats is None else block_stats
  _check_block(block_params, block_stats, name)
  return {FUSED_KEY: _fuse_branches(block_params, block_stats)}


@jax.jit
def _fuse_branches(block_params: Tree, block_stats: Tree) -> dict:
  """Sums the fused kernels and biases of all branches, in float64.

  Compiled once per block shape: float64 arithmetic op by op is slow.
  """
  in_per_group, out_channels = shapes.block_channels(block_params)
  dtype = next(branches_lib.layer_leaves(block_params, 'kernel', 4)).dtype
  expected = (3, 3, in_per_group, out_channels), (out_channels,)
  with jax.enable_x64(True):
    as64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
    fused = []
    for branch, params in shapes.training_branches(block_params).items():
      kernel, bias = branches_lib.get_branch(branch).fuse(
        as64(params), as64(block_stats.get(branch, {})), in_per_group
      )
      if (jnp.shape(kernel), jnp.shape(bias)) != expected:  # Else summed by broadcasting.
        raise FusionError(
          f'Branch kind {branch!r} fused into a kernel of shape {jnp.shape(kernel)} and a bias '
          f'of shape {jnp.shape(bias)}, where its block needs {expected[0]} and {expected[1]}: its '
          'fuse must return a 3x3 kernel (branches.pad_to_3x3 pads a smaller one).'
        )
      fused.append((kernel, bias))
    kernel = sum(k for k, _ in fused)
    bias = sum(b for _, b in fused)
    if POST_NORM_KEY in block_params:  # BN(K x + b) = (K s) x + (b s + shift).
      scale, shift = branches_lib.bn_scale_shift(
        as64(block_params[POST_NORM_KEY]), as64(block_stats[POST_NORM_KEY])
      )
      kernel, bias = kernel * scale, bias * scale + shift
    return {'kernel': kernel.astype(dtype), 'bias': bias.astype(dtype)}


def _check_block(block_params: Tree, block_stats: Tree, name: str) -> None:
  """Raises a FusionError unless the block can be fused as it is."""
  if FUSED_KEY in block_params:
    raise FusionError(
      f'{name} is already fused (it holds {FUSED_KEY!r}): pass the variables of a '
      'training-time model (deploy=False), with their batch_stats.'
    )
  for branch, params in block_params.items():
    where = f'{name}/{branch}'
    if branch == POST_NORM_KEY:
      layout = trees.POST_NORM_LAYOUT
    else:
      shapes.branch_kind(branch, where)
      layout = trees.branch_layout(branch)
    found = sorted(map('/'.join, trees.leaf_paths(params)))
    layout = sorted(map('/'.join, layout))
    if found != layout:
      raise FusionError(f'{where} holds {found}, not the layers of a {branch} branch: {layout}.')
    if _norms(branch) and branch not in block_stats:
      raise FusionError(
        f'{where} has no batch_stats: fuse_params needs the BatchNorm statistics of the '
        "trained model (variables['batch_stats'])."
      )
    _check_stats_shapes(params, block_stats.get(branch, {}), _norms(branch), where)
  shapes.block_channels(block_params, name)


def _norms(branch: str) -> frozenset[trees.Path]:
  """The paths of the BatchNorms in a block's entry ``branch`` (none for an unknown
  kind, which `_check_block` names)."""
  if branch == POST_NORM_KEY:
    return frozenset({()})
  try:
    branches_lib.get_branch(branch)
  except ValueError:
    return frozenset()
  return trees.branch_norms(branch)


def _has_norm(block_params: Tree) -> bool:
  """Whether a block holds a BatchNorm, whose statistics its fusion needs."""
  return any(_norms(branch) for branch in block_params)


def _check_stats_shapes(params: Tree, stats: Tree, norms, where: str) -> None:
  """Every BatchNorm (at the paths ``norms`` in the branch) must have statistics of its
  scale's shape.

  Whether the scale fits the conv before it is the branch kind's check
  (`BranchKind.channels`, in `shapes.block_channels`).
  """
  for path in sorted(norms):
    here = '/'.join((where, *path))
    norm_stats, scale = trees.subtree(stats, path), trees.subtree(params, (*path, 'scale'))
    if norm_stats is None:
      raise FusionError(f'{here}: batch_stats lacks this BatchNorm.')
    for stat in ('mean', 'var'):
      if stat not in norm_stats:
        raise FusionError(f'{here}: batch_stats lacks {stat!r}.')
      if scale is not None and norm_stats[stat].shape != scale.shape:
        raise FusionError(
          f'{here}: batch_stats {stat!r} has shape {norm_stats[stat].shape} but the BatchNorm '
          f'scale has {scale.shape}: params and batch_stats come from different models.'
        )


def _where(path: trees.Path) -> str:
  return '/'.join(path) or 'params'


def fuse_params(variables: Tree, *, model: str | None = None) -> dict:
  """Fuses every re-parameterizable block of a network's variables.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of a training-time
      RepVGG (any variant, branch set, stride and group count), or of any
      Linen network holding RepVGGs or `RepVGGBlock`s at any depth.
    model: optional variant name; when given, each RepVGG in the tree must
      have its shapes.

  Returns:
    The variables of the same network built with ``deploy=True``: every block
    becomes ``{'reparam': {'kernel', 'bias'}}``, its statistics leave
    ``batch_stats`` (which is dropped when nothing else is left in it), and
    everything else (a classifier, heads, other layers) is copied.

  Raises:
    FusionError: the tree holds no block or is already fused, lacks
      batch_stats, mixes shapes of different models, or (with ``model``)
      holds another variant.
  """
  if isinstance(variables, Mapping) and not isinstance(variables.get('params', {}), Mapping):
    got = type(variables['params']).__name__
    raise FusionError(f"variables['params'] must be a mapping of parameters, got a {got}.")
  if not isinstance(variables, Mapping) or 'params' not in variables:
    got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
    raise FusionError(f"fuse_params takes {{'params', 'batch_stats'}} variables, got {got}.")
  variables = flax.core.unfreeze(variables)  # Plain dicts in, plain dicts out.
  params = variables['params']
  blocks, fused_blocks = trees.find_blocks(params)  # Fused blocks are copied as they are.
  if fused_blocks and not blocks:
    raise FusionError(
      f'These variables are already fused ({_where(fused_blocks[0])} holds a single reparam '
      'conv): use them with the deploy model as they are.'
    )
  if not blocks and trees.has_block_layout(params):
    raise FusionError(
      f'params is one block itself (branches {sorted(params)}): fuse it with '
      "fuse_block(variables['params'], variables['batch_stats']), or wrap it in a module."
    )
  if not blocks:
    raise FusionError(
      'No RepVGG block in params (a block is a mapping of branch kinds such as conv3x3, '
      f'conv1x1, identity); top-level keys: {sorted(params)}.'
    )
  normed = [path for path in blocks if _has_norm(trees.subtree(params, path))]
  if normed and 'batch_stats' not in variables:
    raise FusionError(
      "fuse_params needs variables['batch_stats'] (the BatchNorm running statistics) "
      "besides variables['params']."
    )
  _check_networks(params, model)
  stats = variables.get('batch_stats', {})
  fused = {}
  for path in blocks:
    block_stats = trees.subtree(stats, path)
    if block_stats is None and path in normed:
      raise FusionError(
        f'batch_stats has no entry for {_where(path)}: it comes from another model.'
      )
    fused[path] = fuse_block(trees.subtree(params, path), block_stats, name=_where(path))
  result = {key: value for key, value in variables.items() if key != 'batch_stats'}
  result['params'] = trees.replace_subtrees(params, fused)
  remaining = trees.replace_subtrees(stats, dict.fromkeys(blocks))
  if remaining:
    result['batch_stats'] = remaining
  return result


def _check_networks(params: Tree, model: str | None) -> None:
  """Each RepVGG in the tree must chain (and, with ``model``, be that variant)."""
  networks = trees.find_networks(params)
  if model is not None and not networks:
    raise FusionError(
      f'model={model!r} names a RepVGG variant, but the tree holds no RepVGG '
      '(stage<s>_block<i> blocks); leave model out to fuse standalone blocks.'
    )
  for path in networks:
    network = trees.subtree(params, path)
    shapes.architecture(network)  # Raises when blocks are missing or do not chain.
    if model is not None and not shapes.has_shapes_of(network, model):
      name = shapes.identify_variant(network) or shapes.variants_it_starts(network)
      where = f' at {_where(path)}' if path else ''
      raise FusionError(
        f'The variables{where} have the shapes of {name}, not of '
        f'{variants.get_variant(model).name}.'
      )

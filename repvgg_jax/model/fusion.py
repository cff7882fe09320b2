"""Structural re-parameterization: training-time variables -> deploy variables.

`fuse_params` is a pure function on pytrees. It finds the blocks by their
layout wherever they sit (`repvgg_jax.model.trees`), reads each one's shape off
its parameters, fuses every block in float64 with the rule of each of its
branch kinds (`repvgg_jax.model.branches`), and casts once to the parameters'
dtype, so the fused model agrees with the training-time model in inference mode
up to float32 rounding. It is jittable: all checks are on static shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp

from repvgg_jax.model import branches as branches_lib
from repvgg_jax.model import trees, variants
from repvgg_jax.model.trees import block_keys, block_position

Tree = Mapping[str, Any]
FUSED_KEY = branches_lib.FUSED_KEY
POST_NORM_KEY = branches_lib.POST_NORM_KEY


class FusionError(ValueError):
  """The variables cannot be fused (already fused, incomplete or inconsistent)."""


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
  in_per_group, out_channels = block_channels(block_params)
  dtype = next(branches_lib.layer_leaves(block_params, 'kernel', 4)).dtype
  shapes = (3, 3, in_per_group, out_channels), (out_channels,)
  with jax.enable_x64(True):
    as64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
    fused = []
    for branch, params in _branches(block_params).items():
      kernel, bias = branches_lib.get_branch(branch).fuse(
        as64(params), as64(block_stats.get(branch, {})), in_per_group
      )
      if (jnp.shape(kernel), jnp.shape(bias)) != shapes:  # Else summed by broadcasting.
        raise FusionError(
          f'Branch kind {branch!r} fused into a kernel of shape {jnp.shape(kernel)} and a bias '
          f'of shape {jnp.shape(bias)}, where its block needs {shapes[0]} and {shapes[1]}: its '
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


def _branches(block_params: Tree) -> Tree:
  """A training-time block's branches: its entries but the BatchNorm of their sum."""
  return {key: value for key, value in block_params.items() if key != POST_NORM_KEY}


def _branch_kind(branch: str, where: str) -> branches_lib.BranchKind:
  try:
    return branches_lib.get_branch(branch)
  except ValueError:
    known = branches_lib.known_branches()
    raise FusionError(f'{where} is an unknown branch; known branch kinds: {known}.') from None


def block_channels(block_params: Tree, name: str = 'block') -> tuple[int, int]:
  """``(in_per_group, out_channels)`` of a training-time or fused block, from shapes.

  Each branch kind reads them off its own parameters (`BranchKind.channels`:
  a branch's inner layers may have other widths, as DBB's 1x1 -> 3x3); all
  branches must agree.

  Raises:
    FusionError: an unknown branch, branches that disagree, or no branch that
      tells the channels per group (no convolution).
  """
  if FUSED_KEY in block_params:
    return tuple(block_params[FUSED_KEY]['kernel'].shape[2:])
  found = None  # (where, in_per_group, out_channels) of the first branch with a kernel.
  out_channels = None
  for branch, params in _branches(block_params).items():
    where = f'{name}/{branch}'
    kind = _branch_kind(branch, where)
    try:
      in_per_group, out = kind.channels(params)
    except (ValueError, KeyError, AttributeError) as error:
      problem = f'lacks {error}' if isinstance(error, KeyError) else str(error)
      raise FusionError(f'{where} {problem}: the tree mixes layers of different models.') from None
    if out_channels is not None and out != out_channels:
      raise FusionError(
        f'{where} has {out} output channels, but the block has {out_channels}: the tree '
        'mixes layers of different models.'
      )
    out_channels = out
    if in_per_group is None:
      continue
    if found is not None and in_per_group != found[1]:
      raise FusionError(
        f'{where} reads {in_per_group} channels per group, but {found[0]} reads '
        f'{found[1]}: the tree mixes layers of different models.'
      )
    found = found or (where, in_per_group, out)
  if found is None:
    raise FusionError(f'{name} has no convolution kernel to fuse into: {sorted(block_params)}.')
  post_norm = block_params.get(POST_NORM_KEY)
  if post_norm is not None and post_norm['scale'].shape != (out_channels,):
    raise FusionError(
      f'{name}/{POST_NORM_KEY} has a scale of shape {post_norm["scale"].shape}, but the block '
      f'has {out_channels} output channels: the tree mixes layers of different models.'
    )
  return found[1], out_channels


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
      _branch_kind(branch, where)
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
  block_channels(block_params, name)


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
  (`BranchKind.channels`, in `block_channels`).
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


def missing_blocks(params: Tree) -> list[str]:
  """The block keys a tree lacks: every stage from 0 to the last must be there, each
  numbered from 0 without gaps (a stage's trailing blocks cannot be told missing)."""
  depths = {}
  for key in block_keys(params):
    stage, index = block_position(key)
    depths.setdefault(stage, set()).add(index)
  if not depths:
    return []
  missing = []
  for stage in range(max(depths) + 1):
    indices = depths.get(stage, set())
    top = max(indices) if indices else 0
    missing += [f'stage{stage}_block{i}' for i in range(top + 1) if i not in indices]
  return missing


def architecture(params: Tree) -> list[variants.Block]:
  """Each block of a parameter tree (`variants.Block`), from its shapes.

  Works for training-time trees of any branch set and for deploy trees alike.
  ``groups`` follows from the previous block's width (the input channels are
  not stored in grouped kernels); each stage opens with stride 2.

  Raises:
    FusionError: blocks are missing between the first and the last of a stage
      or whole stages are (`missing_blocks`), consecutive blocks do not chain, or
      a block's branches disagree (`block_channels`).
  """
  missing = missing_blocks(params)
  if missing:
    raise FusionError(
      f'The tree lacks blocks {", ".join(missing[:8])}{" ..." if len(missing) > 8 else ""}: '
      'it is incomplete, or mixes the keys of different models.'
    )
  result = []
  in_channels = None
  for key in block_keys(params):
    stage, index = block_position(key)
    in_per_group, out_channels = block_channels(params[key], key)
    if in_channels is None:
      in_channels = in_per_group
    if in_channels % in_per_group:
      raise FusionError(
        f'{key} reads {in_per_group} channels per group, which does not divide the '
        f'{in_channels} channels of the previous block: the tree mixes different models.'
      )
    stride = 2 if index == 0 else 1
    groups = in_channels // in_per_group
    result.append(variants.Block(stage, index, in_channels, out_channels, stride, groups))
    in_channels = out_channels
  return result


def block_layers(params: Tree, image_size: int) -> list[tuple[int, variants.Block]]:
  """``(side, block)`` of each block on square inputs of ``image_size`` pixels
  (``side``: its input map's)."""
  layers, side = [], image_size
  for block in architecture(params):
    layers.append((side, block))
    side = (side - 1) // block.stride + 1  # 3x3, padding 1.
  return layers


def has_fused_blocks(params: Tree) -> bool:
  """Whether ``params`` holds fused (deploy) blocks."""
  return any(FUSED_KEY in params[key] for key in block_keys(params))


def identify_variant(params: Tree) -> str | None:
  """The name of the variant whose shapes ``params`` has, or None.

  Reads the blocks of a training-time or deploy tree; the classifier size does
  not matter. A deploy tree, which has no block kind left, is named as RepVGG's.
  """
  try:
    signature = architecture(params)
  except FusionError:
    return None
  kind = block_kind(params) or 'repvgg'
  in_channels = signature[0].in_channels if signature else 3  # Of the images: any number.
  for name, variant in variants.VARIANTS.items():
    if variant.block == kind and list(variant.blocks(in_channels)) == signature:
      return name
  return None


def has_shapes_of(network: Tree, model: str) -> bool:
  """Whether one RepVGG's parameter tree (training-time or deploy) has the blocks of
  the variant ``model``: all of them, or for a backbone (no classifier) those up to
  the last stage it holds (``out_indices`` may cut it short); any input channels.
  A deploy tree fits both kinds of block, which fuse into the same model."""
  expected = variants.get_variant(model)
  try:
    found = architecture(network)
  except FusionError:
    return False
  if not found:
    return False
  last = found[-1].stage if 'linear' not in network else len(expected.stage_depths) - 1
  kind = block_kind(network)
  blocks = expected.blocks(found[0].in_channels)
  return kind in (None, expected.block) and [b for b in blocks if b.stage <= last] == found


def _variants_it_starts(network: Tree) -> str:
  """The variants whose first stages a backbone cut short has, for a message: several
  share their first stages (a deploy tree fits RepVGG's and QARepVGG's alike)."""
  kind = block_kind(network) or 'repvgg'
  names = [
    name
    for name, variant in variants.VARIANTS.items()
    if variant.block == kind and has_shapes_of(network, name)
  ]
  if len(names) > 3:
    return f'{", ".join(names[:3])} and {len(names) - 3} other variants'
  return ' or '.join(names) or 'no known variant'


def block_kind(params: Tree) -> str | None:
  """The kind (a key of `variants.BLOCK_KINDS`) of a RepVGG's training-time
  blocks: QARepVGG's where they normalise their sum; None for a deploy tree."""
  blocks = [params[key] for key in block_keys(params) if FUSED_KEY not in params[key]]
  if not blocks:
    return None
  post_norm = any(POST_NORM_KEY in block for block in blocks)
  return next(name for name, kind in variants.BLOCK_KINDS.items() if kind.post_norm == post_norm)


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
    architecture(network)  # Raises when blocks are missing or do not chain.
    if model is not None and not has_shapes_of(network, model):
      name = identify_variant(network) or _variants_it_starts(network)
      where = f' at {_where(path)}' if path else ''
      raise FusionError(
        f'The variables{where} have the shapes of {name}, not of '
        f'{variants.get_variant(model).name}.'
      )

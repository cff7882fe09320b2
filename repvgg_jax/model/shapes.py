"""What a RepVGG's parameter tree says by its shapes alone: each block's channels
and groups, the architecture, the variant it is, whether it is fused and which
kind of block it trains. Fusion (`repvgg_jax.model.fusion`), conversion and export
read trees with it; it works for training-time and deploy trees alike."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from repvgg_jax.model import branches as branches_lib
from repvgg_jax.model import variants
from repvgg_jax.model.trees import block_keys, block_position

Tree = Mapping[str, Any]
FUSED_KEY = branches_lib.FUSED_KEY
POST_NORM_KEY = branches_lib.POST_NORM_KEY


class FusionError(ValueError):
  """The variables cannot be fused or their architecture read: already fused,
  incomplete, or mixing the layers of different models."""


def training_branches(block_params: Tree) -> Tree:
  """A training-time block's branches: its entries but the BatchNorm of their sum."""
  return {key: value for key, value in block_params.items() if key != POST_NORM_KEY}


def branch_kind(branch: str, where: str) -> branches_lib.BranchKind:
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
  for branch, params in training_branches(block_params).items():
    where = f'{name}/{branch}'
    kind = branch_kind(branch, where)
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


def variants_it_starts(network: Tree) -> str:
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

"""Finding re-parameterizable blocks in parameter trees, and editing trees by path.

A training-time block is known by its layout: a mapping whose keys are all
registered branch kinds, each holding exactly the layers its kind builds
(`branch_layout`), and at most one BatchNorm of their sum (``post_bn``). A
fused block is ``{'reparam': {'kernel', 'bias'}}``. A RepVGG is a mapping with
``stage{s}_block{i}`` entries laid out as blocks.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from repvgg_jax.model import branches as branches_lib
from repvgg_jax.model.blocks import layer_partials

Tree = Mapping[str, Any]
Path = tuple[str, ...]  # Keys from a tree's root down to a subtree.
_BLOCK_KEY = re.compile(r'^stage(\d+)_block(\d+)$')
FUSED_KEY = branches_lib.FUSED_KEY
POST_NORM_KEY = branches_lib.POST_NORM_KEY
POST_NORM_LAYOUT = frozenset({('scale',), ('bias',)})


def block_position(key: str) -> tuple[int, int] | None:
  """``(stage, index)`` of a block key ``stage{s}_block{i}``, or None for other keys.

  The inverse of `repvgg_jax.model.network.block_name`.
  """
  match = _BLOCK_KEY.match(key)
  return None if match is None else (int(match.group(1)), int(match.group(2)))


def block_keys(params: Tree) -> list[str]:
  """Block names of a parameter tree in network order."""
  return sorted((k for k in params if block_position(k)), key=block_position)


class _BranchProbe(nn.Module):
  """A lone branch of kind ``kind``, to read its parameter layout off `jax.eval_shape`."""

  kind: str

  @nn.compact
  def __call__(self, x):
    conv, norm = layer_partials(train=False)
    kind = branches_lib.get_branch(self.kind)
    return kind.build(_PROBE_CHANNELS, 1, 1, conv, norm, name='branch')(x)


_PROBE_CHANNELS = 64  # Wide enough for a branch with a narrower inner layer.


@functools.cache
def _branch_variables(name: str) -> dict[str, frozenset[Path]]:
  """``{collection: leaf paths}`` of a lone branch of kind ``name``, read at 64 -> 64
  channels, stride 1 (a kind's layout must not depend on the block's shape).

  Raises:
    ValueError: the kind cannot be built at that shape.
  """
  probe = _BranchProbe(name, parent=None)  # Unbound, even when called inside a module.
  images = jax.ShapeDtypeStruct((1, 5, 5, _PROBE_CHANNELS), jnp.float32)
  try:
    shapes = jax.eval_shape(lambda x: probe.init(jax.random.key(0), x), images)
  except Exception as error:  # noqa: BLE001 (a user's kind may fail any way)
    raise ValueError(
      f'Branch kind {name!r} cannot be built from {_PROBE_CHANNELS} to {_PROBE_CHANNELS} '
      f'channels at stride 1, where its parameter layout is read: {type(error).__name__}: '
      f'{" ".join(str(error).split())[:200]}.'
    ) from error
  return {
    collection: frozenset(leaf_paths(tree.get('branch', {}))) for collection, tree in shapes.items()
  }


def branch_layout(name: str) -> frozenset[Path]:
  """The leaf paths of the parameters of branch kind ``name``, as its module
  builds them (``{('conv', 'kernel'), ('bn', 'scale'), ('bn', 'bias')}`` for
  ``conv3x3``)."""
  return _branch_variables(name).get('params', frozenset())


def branch_norms(name: str) -> frozenset[Path]:
  """The paths of the BatchNorms in a branch of kind ``name``, the layers that keep
  running statistics: ``{('bn',)}`` for ``conv3x3``, ``{()}`` for ``identity``
  (the branch is one), none for ``conv1x1_nobn``. A parameter called ``scale``
  in another layer is no BatchNorm."""
  stats = _branch_variables(name).get('batch_stats', frozenset())
  return frozenset(path[:-1] for path in stats)


def same_shapes(a: Tree, b: Tree) -> bool:
  """Whether two trees (plain or frozen dicts, arrays or `jax.ShapeDtypeStruct` leaves)
  have the same keys and leaf shapes."""
  shapes = lambda tree: jax.tree.map(lambda leaf: tuple(leaf.shape), flax.core.unfreeze(tree))
  return shapes(a) == shapes(b)


def leaf_paths(tree: Tree, path: Path = ()) -> list[Path]:
  paths = []
  for key, value in tree.items():
    paths += leaf_paths(value, (*path, key)) if isinstance(value, Mapping) else [(*path, key)]
  return paths


def has_block_layout(tree) -> bool:
  """Whether ``tree`` is laid out as a training-time block: a mapping of branch
  kinds, each holding exactly the layers its kind builds, and optionally the
  BatchNorm of their sum (``post_bn``, QARepVGG's)."""
  if not isinstance(tree, Mapping):
    return False
  post_norm = tree.get(POST_NORM_KEY)
  if post_norm is not None and not (
    isinstance(post_norm, Mapping) and set(leaf_paths(post_norm)) == POST_NORM_LAYOUT
  ):
    return False
  branches = {key: value for key, value in tree.items() if key != POST_NORM_KEY}
  if not branches:
    return False
  for branch, params in branches.items():
    try:
      branches_lib.get_branch(branch)
    except ValueError:
      return False
    if not isinstance(params, Mapping) or set(leaf_paths(params)) != branch_layout(branch):
      return False
  return True


def is_fused_block(tree) -> bool:
  """Whether ``tree`` is a deploy block's parameters: ``{'reparam': {'kernel', 'bias'}}``."""
  return (
    isinstance(tree, Mapping)
    and list(tree) == [FUSED_KEY]
    and isinstance(tree[FUSED_KEY], Mapping)
    and sorted(tree[FUSED_KEY]) == ['bias', 'kernel']
  )


def _is_network(params: Tree) -> bool:
  """Whether ``params`` is a RepVGG's: it has ``stage{s}_block{i}`` entries, one
  of them laid out as a block (fused or not)."""
  return any(
    block_position(key) is not None and (has_block_layout(value) or is_fused_block(value))
    for key, value in params.items()
  )


def find_blocks(params: Tree, path: Path = ()) -> tuple[list[Path], list[Path]]:
  """The paths of the training-time blocks and of the fused blocks in a tree, at
  any depth (a block's own subtrees are not searched).

  A block is recognised by its layout (`has_block_layout`). In a RepVGG every
  ``stage{s}_block{i}`` entry counts as a block, so that a wrong branch in one
  is reported rather than passed over.
  """
  training, fused = [], []
  network = _is_network(params)
  for key, value in params.items():
    if not isinstance(value, Mapping):
      continue
    if is_fused_block(value):
      fused.append((*path, key))
    elif has_block_layout(value) or (network and block_position(key) is not None):
      training.append((*path, key))
    else:
      inner = find_blocks(value, (*path, key))
      training += inner[0]
      fused += inner[1]
  return training, fused


def find_networks(params: Tree, path: Path = ()) -> list[Path]:
  """The paths of the RepVGGs in a tree (see `_is_network`)."""
  if _is_network(params):
    return [path]
  return [
    found
    for key, value in params.items()
    if isinstance(value, Mapping)
    for found in find_networks(value, (*path, key))
  ]


def subtree(tree: Tree, path: Path):
  """``tree[path[0]][path[1]]...``, or None where a key is missing."""
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def replace_subtrees(tree: Tree, replacements: Mapping[Path, Any], path: Path = ()) -> dict:
  """A copy of ``tree`` with the subtrees at the given paths replaced (None drops
  them); mappings left empty are dropped too."""
  out = {}
  for key, value in tree.items():
    here = (*path, key)
    if here in replacements:
      value = replacements[here]
    elif isinstance(value, Mapping) and any(p[: len(here)] == here for p in replacements):
      value = replace_subtrees(value, replacements, here)
      value = value or None
    if value is not None:
      out[key] = value
  return out

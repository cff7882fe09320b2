"""The RepVGG variants (A0 ... B3g4) as data, and lookup by name.

Paper Table 2 and 3: five stages, stage widths
``min(64, int(64a)), int(64a), int(128a), int(256a), int(512b)``; the grouped
variants use ``groups`` in the blocks whose running index (counting the blocks
after stage 0 from 1) is even.

Each shape comes with each block kind (`BLOCK_KINDS`): RepVGG's block
('RepVGG-A0') and QARepVGG's ('QARepVGG-A0', Chu et al., AAAI 2024), which
fuse into the same deploy network.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Collection
from typing import NamedTuple

import numpy as np

from repvgg_jax.model import branches as branches_lib

# Blocks per stage for stages 1-4; stage 0 always has one block.
A_BLOCKS = (2, 4, 14, 1)
B_BLOCKS = (4, 6, 16, 1)


class Block(NamedTuple):
  """One block of a variant: where it sits and the shape of its convolutions."""

  stage: int
  index: int  # Within its stage, from 0.
  in_channels: int
  out_channels: int
  stride: int  # 2 for the first block of each stage, else 1.
  groups: int


class FeatureInfo(NamedTuple):
  """One stage output of a backbone, as timm's ``feature_info`` describes it."""

  stage: int
  channels: int
  reduction: int  # Input pixels per output pixel along each side (the stride so far).


class BlockKind(NamedTuple):
  """A kind of training-time block: its branches and whether a BatchNorm follows their sum."""

  prefix: str  # Of the model names: 'RepVGG' in 'RepVGG-A0'.
  branches: tuple[str, ...]
  post_norm: bool


BLOCK_KINDS = {
  'repvgg': BlockKind('RepVGG', branches_lib.PAPER_BRANCHES, post_norm=False),
  # 3x3 conv-BN + 1x1 conv + identity (no BN on either), a BatchNorm of the sum, ReLU.
  'qarepvgg': BlockKind('QARepVGG', branches_lib.QA_BRANCHES, post_norm=True),
}


def is_count(value) -> bool:
  """Whether ``value`` is an integer (Python's or numpy's), not a bool."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One RepVGG architecture.

  Attributes:
    name: canonical name, e.g. ``'RepVGG-B1g4'``.
    num_blocks: blocks in stages 1-4 (stage 0 has a single block).
    width_multipliers: ``(a, b)`` of the paper: ``a`` scales stages 1-3 (and
      stage 0, capped at 64 channels), ``b`` scales stage 4.
    groups: group count of the grouped blocks (1: no grouped block).
    block: the kind of its blocks, a key of `BLOCK_KINDS`.
  """

  name: str
  num_blocks: tuple[int, int, int, int]
  width_multipliers: tuple[float, float]
  groups: int = 1
  block: str = 'repvgg'

  def __post_init__(self):
    listed = lambda value: tuple(value) if isinstance(value, Collection) else (value,)
    counts, widths = listed(self.num_blocks), listed(self.width_multipliers)
    problem = None
    if len(counts) != 4 or not all(is_count(n) and n >= 1 for n in counts):
      problem = f'num_blocks must be 4 positive ints (stages 1-4), got {self.num_blocks!r}'
    elif len(widths) != 2 or not all(
      isinstance(w, numbers.Real) and not isinstance(w, bool) and w > 0 for w in widths
    ):
      problem = f'width_multipliers must be 2 positive numbers (a, b), got {widths!r}'
    elif min(self.stage_widths) < 1:
      problem = f'width_multipliers {widths!r} leave a stage without channels'
    elif not is_count(self.groups) or self.groups < 1:
      problem = f'groups must be a positive int, got {self.groups!r}'
    elif self.block not in BLOCK_KINDS:
      problem = f'block must be one of {sorted(BLOCK_KINDS)}, got {self.block!r}'
    if problem:
      raise ValueError(f'{self.name}: {problem}.')
    # Tuples whatever sequence was given (a list from JSON): a variant is hashable.
    object.__setattr__(self, 'num_blocks', tuple(int(n) for n in counts))
    object.__setattr__(self, 'width_multipliers', widths)

  @property
  def block_kind(self) -> BlockKind:
    return BLOCK_KINDS[self.block]

  @property
  def stage_widths(self) -> tuple[int, int, int, int, int]:
    """Output channels of stages 0-4."""
    a, b = self.width_multipliers
    return (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))

  @property
  def stage_depths(self) -> tuple[int, int, int, int, int]:
    """Blocks in stages 0-4."""
    return (1, *self.num_blocks)

  def feature_info(self) -> tuple[FeatureInfo, ...]:
    """Channels and reduction of stages 0-4 (each stage halves the resolution)."""
    return tuple(
      FeatureInfo(stage, width, 2 ** (stage + 1)) for stage, width in enumerate(self.stage_widths)
    )

  def block_groups(self, stage: int, index: int) -> int:
    """Group count of block ``index`` (0-based) of ``stage``.

    The reference counts the blocks after stage 0 from 1 and groups those whose
    running number is even (2, 4, ..., 26).
    """
    if stage == 0 or self.groups == 1:
      return 1
    running = sum(self.num_blocks[: stage - 1]) + index + 1
    return self.groups if running % 2 == 0 else 1

  def blocks(self, in_channels: int = 3):
    """Yields each `Block`, stage by stage, the first reading ``in_channels``."""
    for stage, (depth, width) in enumerate(zip(self.stage_depths, self.stage_widths, strict=True)):
      for index in range(depth):
        stride = 2 if index == 0 else 1
        yield Block(stage, index, in_channels, width, stride, self.block_groups(stage, index))
        in_channels = width


def _family(shape, num_blocks, multipliers, groups=(1,)):
  return [
    Variant(
      f'{kind.prefix}-{shape}' + (f'g{g}' if g > 1 else ''), num_blocks, multipliers, g, block
    )
    for block, kind in BLOCK_KINDS.items()
    for g in groups
  ]


VARIANTS: dict[str, Variant] = {
  v.name: v
  for v in [
    *_family('A0', A_BLOCKS, (0.75, 2.5)),
    *_family('A1', A_BLOCKS, (1.0, 2.5)),
    *_family('A2', A_BLOCKS, (1.5, 2.75)),
    *_family('B0', B_BLOCKS, (1.0, 2.5)),
    *_family('B1', B_BLOCKS, (2.0, 4.0), groups=(1, 2, 4)),
    *_family('B2', B_BLOCKS, (2.5, 5.0), groups=(1, 2, 4)),
    *_family('B3', B_BLOCKS, (3.0, 5.0), groups=(1, 2, 4)),
  ]
}


def _normalize(name: str) -> str:
  """'RepVGG-B1g4', 'repvgg_b1g4', 'b1g4' and 'B1G4' all map to 'b1g4';
  'QARepVGG-B1g4' and 'qarepvgg_b1g4' to 'qa:b1g4'."""
  key = name.strip().lower()
  if re.match(r'qarepvgg[-_ ]?', key):
    return 'qa:' + re.sub(r'^qarepvgg[-_ ]?', '', key)
  return re.sub(r'^repvgg[-_ ]?', '', key)


_BY_KEY = {_normalize(name): variant for name, variant in VARIANTS.items()}


def with_block(name: str, block: str) -> str:
  """The name of the variant of ``name``'s shape with blocks of kind ``block``:
  ``with_block('RepVGG-A0', 'qarepvgg') == 'QARepVGG-A0'``."""
  if block not in BLOCK_KINDS:
    raise ValueError(f'Unknown block kind {block!r}; known: {", ".join(BLOCK_KINDS)}.')
  variant = get_variant(name)
  shape = variant.name.split('-', 1)[1]
  return f'{BLOCK_KINDS[block].prefix}-{shape}'


def list_models(block: str | None = None) -> list[str]:
  """Canonical names of all variants in the paper's order, RepVGG's first; only
  those of one block kind (``'repvgg'``, ``'qarepvgg'``) when ``block`` is given."""
  if block is not None and block not in BLOCK_KINDS:
    raise ValueError(f'Unknown block kind {block!r}; known: {", ".join(BLOCK_KINDS)}.')
  ordered = sorted(VARIANTS.values(), key=lambda v: list(BLOCK_KINDS).index(v.block))
  return [v.name for v in ordered if block in (None, v.block)]


def get_variant(name: str | Variant) -> Variant:
  """Looks a variant up by name (case and the 'RepVGG-' prefix optional).

  Raises:
    ValueError: the name is unknown; the message lists the known names.
  """
  if isinstance(name, Variant):
    return name
  if not isinstance(name, str):
    shown = repr(name)  # A module's repr is its whole configuration: named by its type only.
    shown = f': {shown}' if len(shown) <= 80 and '\n' not in shown else ''
    raise TypeError(
      f"A model is named by a string such as 'RepVGG-B0' (or a Variant), got "
      f'{type(name).__name__}{shown}.'
    )
  variant = _BY_KEY.get(_normalize(name))
  if variant is None:
    known = ', '.join(list_models())
    raise ValueError(f'Unknown model name {name!r}. Known models: {known}.')
  return variant

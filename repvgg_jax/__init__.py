"""RepVGG and structural re-parameterization in JAX/Flax."""

from repvgg_jax.branches import (
  BRANCH_FAMILIES,
  BRANCH_KINDS,
  PAPER_BRANCHES,
  BranchFamily,
  BranchKind,
  get_branch,
  register_branch,
  register_branch_family,
)
from repvgg_jax.fusion import FusionError, fuse_block, fuse_params, identify_variant
from repvgg_jax.model import RepVGG, create_model
from repvgg_jax.variants import Variant, get_variant, list_models

__all__ = [
  'BRANCH_FAMILIES',
  'BRANCH_KINDS',
  'PAPER_BRANCHES',
  'BranchFamily',
  'BranchKind',
  'FusionError',
  'RepVGG',
  'Variant',
  'create_model',
  'fuse_block',
  'fuse_params',
  'get_branch',
  'get_variant',
  'identify_variant',
  'list_models',
  'register_branch',
  'register_branch_family',
]

"""RepVGG and structural re-parameterization in JAX/Flax."""

from repvgg_jax.branches import BRANCH_KINDS, PAPER_BRANCHES, BranchKind, register_branch
from repvgg_jax.fusion import FusionError, fuse_block, fuse_params, identify_variant
from repvgg_jax.model import RepVGG, create_model
from repvgg_jax.variants import Variant, get_variant, list_models

__all__ = [
  'BRANCH_KINDS',
  'PAPER_BRANCHES',
  'BranchKind',
  'FusionError',
  'RepVGG',
  'Variant',
  'create_model',
  'fuse_block',
  'fuse_params',
  'get_variant',
  'identify_variant',
  'list_models',
  'register_branch',
]

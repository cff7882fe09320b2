"""The model, as the paper describes it: the variants table, branch kinds, blocks,
the network and its fusion. It imports nothing of the rest of the package."""

# Registers ACNet's, the Diverse Branch Block's and MobileOne's branch kinds.
from repvgg_jax.model import reparam_family  # noqa: F401
from repvgg_jax.model.blocks import RepVGGBlock, layer_partials
from repvgg_jax.model.branches import (
  BRANCH_FAMILIES,
  BRANCH_KINDS,
  PAPER_BRANCHES,
  QA_BRANCHES,
  BranchFamily,
  BranchKind,
  get_branch,
  register_branch,
  register_branch_family,
)
from repvgg_jax.model.fusion import FusionError, fuse_block, fuse_params
from repvgg_jax.model.network import (
  RepVGG,
  create_model,
  model_from_config,
  normalize_branches,
  variant_from_config,
)
from repvgg_jax.model.shapes import identify_variant
from repvgg_jax.model.variants import Block, FeatureInfo, Variant, get_variant, list_models

__all__ = [
  'BRANCH_FAMILIES',
  'BRANCH_KINDS',
  'PAPER_BRANCHES',
  'QA_BRANCHES',
  'Block',
  'BranchFamily',
  'BranchKind',
  'FeatureInfo',
  'FusionError',
  'RepVGG',
  'RepVGGBlock',
  'Variant',
  'create_model',
  'fuse_block',
  'fuse_params',
  'get_branch',
  'get_variant',
  'identify_variant',
  'layer_partials',
  'list_models',
  'model_from_config',
  'normalize_branches',
  'register_branch',
  'register_branch_family',
  'variant_from_config',
]

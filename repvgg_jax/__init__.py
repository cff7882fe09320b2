"""RepVGG and structural re-parameterization in JAX/Flax.

The model (`repvgg_jax.model`) is re-exported here; the CPU speed-ups are
`repvgg_jax.perf`, training `repvgg_jax.train`, conversion and export
`repvgg_jax.interop`.
"""

from repvgg_jax import startup  # First: it notes the environment before JAX changes it.

# isort: split
from repvgg_jax import perf
from repvgg_jax.factory import create_model
from repvgg_jax.model import (
  BRANCH_FAMILIES,
  BRANCH_KINDS,
  PAPER_BRANCHES,
  QA_BRANCHES,
  BranchFamily,
  BranchKind,
  FeatureInfo,
  FusionError,
  RepVGG,
  RepVGGBlock,
  Variant,
  fuse_block,
  fuse_params,
  get_branch,
  get_variant,
  identify_variant,
  list_models,
  register_branch,
  register_branch_family,
)

startup.hide_cuda_probe()  # Before JAX starts its backend, on first use.


def __getattr__(name: str):
  # Imported on first use: loading weights brings in orbax and the converters.
  if name == 'load_pretrained':
    from repvgg_jax.interop.pretrained import load_pretrained

    return load_pretrained
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
  'BRANCH_FAMILIES',
  'BRANCH_KINDS',
  'PAPER_BRANCHES',
  'QA_BRANCHES',
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
  'list_models',
  'load_pretrained',
  'perf',
  'register_branch',
  'register_branch_family',
]

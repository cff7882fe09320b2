"""PyTorch checkpoints <-> Flax variables: key names and array layouts.

Two key styles are read and written:

- ``'reference'`` (github.com/DingXiaoH/RepVGG): blocks ``stage0`` and
  ``stage{s}.{i}``, branches ``rbr_dense`` (3x3 conv-BN), ``rbr_1x1`` (1x1
  conv-BN), ``rbr_identity`` (a BatchNorm) or, once fused, ``rbr_reparam``, and
  the classifier ``linear``.
- ``'timm'`` (timm's ``byobnet.py``): the first block is ``stem``, the others
  ``stages.{s-1}.{i}``, branches ``conv_kxk``, ``conv_1x1``, ``identity`` or
  ``reparam_conv``, the classifier ``head.fc``. timm groups the odd blocks of
  each stage, which are the reference's even running indices.

PyTorch stores convolution kernels OIHW (grouped: ``(out, in / groups, kh,
kw)``) and dense kernels ``(out, in)``; Flax stores HWIO and ``(in, out)``.
Every layout conversion of the project happens here.

Conversion is strict: every key of the file is consumed and every parameter of
the model is filled, or a `ConversionError` lists what is missing, unexpected
or of the wrong shape, and which variant the file looks like.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from repvgg_jax.model import create_model, shapes, trees, variants

BRANCH_NAMES = {  # Reference branch -> this project's branch.
  'rbr_dense': 'conv3x3',
  'rbr_1x1': 'conv1x1',
  'rbr_identity': 'identity',
  'rbr_reparam': 'reparam',
}
BN_NAMES = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}
_BLOCK = re.compile(r'^stage(\d+)(?:\.(\d+))?\.(\w+)\.(.+)$')

KEY_STYLES = ('reference', 'timm')
TIMM_BRANCHES = {  # timm branch -> reference branch.
  'conv_kxk': 'rbr_dense',
  'conv_1x1': 'rbr_1x1',
  'identity': 'rbr_identity',
  'reparam_conv': 'rbr_reparam',
}
_TIMM_BLOCK = re.compile(r'^(?:stem|stages\.(\d+)\.(\d+))\.(\w+)\.(.+)$')


class ConversionError(ValueError):
  """A checkpoint that does not convert exactly into the expected model."""


def conv_kernel_to_flax(weight: np.ndarray) -> np.ndarray:
  """OIHW (grouped: ``(out, in/groups, kh, kw)``) -> HWIO (``(kh, kw, in/groups, out)``)."""
  return np.transpose(weight, (2, 3, 1, 0))


def conv_kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
  """HWIO -> OIHW, the inverse of `conv_kernel_to_flax`."""
  return np.transpose(kernel, (3, 2, 0, 1))


def key_style(keys) -> str:
  """``'timm'`` for timm's keys (``stem.``, ``stages.``, ``head.fc.``), else ``'reference'``.

  Raises:
    ConversionError: a file mixing both styles.
  """
  keys = list(keys)
  timm = [k for k in keys if k.startswith(('stem.', 'stages.', 'head.fc.'))]
  reference = [k for k in keys if k.startswith(('stage0.', 'linear.')) or _BLOCK.match(k)]
  if timm and reference:
    raise ConversionError(
      f'The checkpoint mixes timm keys (e.g. {timm[0]}) and reference keys (e.g. '
      f'{reference[0]}): it was edited by hand or merged from two files.'
    )
  return 'timm' if timm else 'reference'


def timm_to_reference_key(key: str) -> str | None:
  """The reference name of a timm key, or None when it has no counterpart."""
  if key in ('head.fc.weight', 'head.fc.bias'):
    return 'linear.' + key.rsplit('.', 1)[1]
  match = _TIMM_BLOCK.match(key)
  if not match or match.group(3) not in TIMM_BRANCHES:
    return None
  stage, index, branch, rest = match.groups()
  block = 'stage0' if stage is None else f'stage{int(stage) + 1}.{index}'
  return f'{block}.{TIMM_BRANCHES[branch]}.{rest}'


def reference_to_timm_key(key: str) -> str:
  """The timm name of a reference key (the inverse of `timm_to_reference_key`)."""
  if key.startswith('linear.'):
    return 'head.fc.' + key.split('.', 1)[1]
  stage, index, branch, rest = _BLOCK.match(key).groups()
  block = 'stem' if stage == '0' else f'stages.{int(stage) - 1}.{index}'
  timm_branch = {ref: timm for timm, ref in TIMM_BRANCHES.items()}[branch]
  return f'{block}.{timm_branch}.{rest}'


def _flax_path(key: str) -> tuple[str, tuple[str, ...]] | None:
  """(collection, path) of a reference key, or None when it has no counterpart."""
  if key in ('linear.weight', 'linear.bias'):
    return 'params', ('linear', 'kernel' if key.endswith('weight') else 'bias')
  match = _BLOCK.match(key)
  if not match or match.group(3) not in BRANCH_NAMES:
    return None
  stage, index, branch, rest = match.groups()
  block = f'stage{stage}_block{index or 0}'
  branch = BRANCH_NAMES[branch]
  parts = rest.split('.')
  if branch == 'reparam' and rest in ('weight', 'bias'):
    return 'params', (block, branch, 'kernel' if rest == 'weight' else 'bias')
  if parts == ['conv', 'weight'] and branch in ('conv3x3', 'conv1x1'):
    return 'params', (block, branch, 'conv', 'kernel')
  prefix = (block, branch, 'bn') if branch != 'identity' else (block, branch)
  if parts[0] == 'bn' and branch != 'identity':
    parts = parts[1:]
  if len(parts) == 1 and parts[0] in BN_NAMES:
    name = BN_NAMES[parts[0]]
    return ('batch_stats' if name in ('mean', 'var') else 'params'), (*prefix, name)
  return None


def _to_flax_array(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] == 'kernel' and value.ndim == 4:
    return conv_kernel_to_flax(value)
  if path[-1] == 'kernel' and value.ndim == 2:
    return value.T
  return value


def _ignored(key: str) -> bool:
  """Keys the reference saves that hold no parameter (BatchNorm's update counter)."""
  return key.endswith('num_batches_tracked')


def from_torch(
  state_dict: Mapping[str, Any], model: str | None = None, *, named: bool = True
) -> tuple[dict, dict]:
  """Converts a PyTorch state dict (training-time or deploy, either key style) to Flax variables.

  Args:
    state_dict: key -> array (numpy, or anything ``np.asarray`` takes), in the
      reference's or timm's key style (told apart by the keys).
    model: the variant; when None it is recognised from the shapes.
    named: whether the weights must be of a known variant (``model``, or the one
      recognised). Else, weights of none (a backbone cut short) come back with
      ``info['model']`` None and unchecked: the model they are loaded into checks.

  Returns:
    ``(variables, info)``: ``{'params'[, 'batch_stats']}`` for
    ``create_model(info['model'], num_classes=info['num_classes'],
    deploy=info['deploy'])``, and that info (also ``key_style``).

  Raises:
    ConversionError: unknown, missing or mis-shaped keys; the message lists
      them and names the variant the file looks like.
  """
  flat: dict[str, dict[tuple[str, ...], np.ndarray]] = {'params': {}, 'batch_stats': {}}
  unexpected = []
  style = key_style(state_dict)
  for key, value in state_dict.items():
    reference_key = timm_to_reference_key(key) if style == 'timm' else key
    target = None if reference_key is None else _flax_path(reference_key)
    if target is None:
      if not _ignored(key):
        unexpected.append(key)
      continue
    collection, path = target
    flat[collection][path] = _to_flax_array(path, np.asarray(value, np.float32))
  variables = {name: traverse_util.unflatten_dict(tree) for name, tree in flat.items() if tree}
  if 'params' not in variables:
    raise ConversionError(
      f'No RepVGG parameters found among {len(state_dict)} keys (e.g. '
      f'{sorted(state_dict)[:5]}): this is not a RepVGG checkpoint of the reference '
      'implementation or of timm.'
    )
  looks_like = shapes.identify_variant(variables['params'])
  name = variants.get_variant(model).name if model else looks_like
  if name is None and named:
    missing = shapes.missing_blocks(variables['params'])
    raise ConversionError(
      'The checkpoint matches no known variant (blocks per stage, widths and groups)'
      + (f'; it lacks blocks {", ".join(missing[:8])}' if missing else '')
      + (f'; unexpected keys: {unexpected[:10]}' if unexpected else '')
      + ': give the variant with --model to see every difference.'
    )
  deploy = any('reparam' in block for block in variables['params'].values())
  linear = variables['params'].get('linear', {}).get('kernel')
  num_classes = 0 if linear is None else int(linear.shape[1])
  info = {
    'model': name,
    'deploy': deploy,
    'num_classes': num_classes,
    'looks_like': looks_like,
    'key_style': style,
  }
  if name is not None:
    _check_against_model(variables, info, unexpected)
  elif unexpected:  # Unnamed weights are checked by their model, which never sees these.
    raise ConversionError(
      f'The checkpoint has keys of no RepVGG layer: {unexpected[:10]}; save the RepVGG '
      'alone, or give its variant.'
    )
  return variables, info


def _expected_shapes(info: dict) -> dict:
  model = create_model(info['model'], num_classes=info['num_classes'], deploy=info['deploy'])
  return leaf_shapes(model.abstract_variables())


def _check_against_model(variables: dict, info: dict, unexpected: list[str]) -> None:
  problems = differences(_expected_shapes(info), leaf_shapes(variables), unexpected)
  if problems:
    kind = 'deploy' if info['deploy'] else 'training-time'
    looks_like = info['looks_like']
    other = looks_like and not shapes.has_shapes_of(variables['params'], info['model'])
    advice = (  # A fused QARepVGG has RepVGG's shapes: it is not another variant.
      f'it holds {looks_like}: give that variant, or none to have it recognised'
      if other
      else f'it looks like {looks_like or "no known variant"}'
    )
    raise ConversionError(
      f'The checkpoint does not fit the {kind} {info["model"]} with {info["num_classes"]} '
      f'classes; {advice}. {problems}'
    )


def leaf_shapes(variables: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
  """``(collection, *path) -> shape`` of every leaf of a variables tree."""
  return {
    (collection, *path): tuple(np.shape(value))
    for collection, tree in variables.items()
    for path, value in traverse_util.flatten_dict(dict(tree)).items()
  }


def differences(expected: Mapping, found: Mapping, unexpected: list[str] = ()) -> str:
  """What is missing, unexpected or of the wrong shape in ``found`` (leaf path ->
  shape) against ``expected``, in one line; empty when they agree."""
  missing = sorted('/'.join(k) for k in expected.keys() - found.keys())
  extra = sorted('/'.join(k) for k in found.keys() - expected.keys()) + list(unexpected)
  wrong = sorted(
    f'{"/".join(k)}: {found[k]} instead of {expected[k]}'
    for k in expected.keys() & found.keys()
    if found[k] != expected[k]
  )
  return '; '.join(
    f'{label} ({len(items)}): {", ".join(items[:8])}{" ..." if len(items) > 8 else ""}'
    for label, items in (('missing', missing), ('unexpected', extra), ('wrong shape', wrong))
    if items
  )


def to_torch(variables: Mapping[str, Any], style: str = 'reference') -> dict[str, np.ndarray]:
  """Flax variables (training-time or deploy) -> a PyTorch state dict of numpy arrays.

  ``style`` is ``'reference'`` or ``'timm'`` (see the module docstring).
  """
  if style not in KEY_STYLES:
    raise ValueError(f'Unknown key style {style!r}; known: {", ".join(KEY_STYLES)}.')
  reverse = {flax: torch for torch, flax in BRANCH_NAMES.items()}
  bn_reverse = {flax: torch for torch, flax in BN_NAMES.items()}
  for key in traverse_util.flatten_dict(dict(variables['params'])):
    if key[0] != 'linear' and key[1] not in reverse:
      raise ConversionError(
        f"{'/'.join(key[:2])}: PyTorch's RepVGG has the branches {', '.join(BRANCH_NAMES)} "
        'only; fuse the model first (the deploy model converts).'
      )
  out = {}
  for tree in variables.values():
    for path, value in traverse_util.flatten_dict(dict(tree)).items():
      value = np.asarray(value)
      if path[0] == 'linear':
        out[f'linear.{"weight" if path[1] == "kernel" else "bias"}'] = (
          value.T if path[1] == 'kernel' else value
        )
        continue
      stage, index = trees.block_position(path[0])
      block = 'stage0' if stage == 0 else f'stage{stage}.{index}'
      branch, rest = reverse[path[1]], list(path[2:])
      if rest[-1] == 'kernel':
        value = conv_kernel_to_torch(value)
        rest[-1] = 'weight'
      elif rest[-1] in bn_reverse:
        rest[-1] = bn_reverse[rest[-1]]
      out['.'.join([block, branch, *rest])] = value
  if style == 'timm':
    out = {reference_to_timm_key(key): value for key, value in out.items()}
  return out


def to_reference_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The state dict in the reference's key style (timm keys without a counterpart dropped)."""
  if key_style(state_dict) == 'reference':
    return dict(state_dict)
  renamed = {timm_to_reference_key(key): value for key, value in state_dict.items()}
  return {key: value for key, value in renamed.items() if key is not None}


def reference_forward(state_dict: Mapping[str, np.ndarray], images_nchw) -> np.ndarray:
  """The reference model's inference forward, run on its own state dict.

  Written from the reference's PyTorch code in PyTorch's layouts (NCHW images,
  OIHW kernels, ``(out, in)`` classifier) with ``lax`` convolutions: a path
  independent of the Flax model and of this module's conversions, to verify
  them. Training-time (BatchNorm with running statistics) and deploy keys.
  """

  def conv(x, weight, bias=None):
    pad = weight.shape[-1] // 2
    groups = x.shape[1] // weight.shape[1]
    y = jax.lax.conv_general_dilated(
      x,
      weight,
      (stride, stride),
      ((pad, pad), (pad, pad)),
      dimension_numbers=('NCHW', 'OIHW', 'NCHW'),
      feature_group_count=groups,
      precision='highest',
    )
    return y if bias is None else y + bias[None, :, None, None]

  def bn(x, prefix):
    p = {
      k: state_dict[f'{prefix}.{k}'][None, :, None, None]
      for k in ('weight', 'bias', 'running_mean', 'running_var')
    }
    return (x - p['running_mean']) / np.sqrt(p['running_var'] + 1e-5) * p['weight'] + p['bias']

  blocks = sorted(
    {k.rsplit('.rbr_', 1)[0] for k in state_dict if '.rbr_' in k},
    key=lambda b: tuple(int(n) for n in b.replace('stage', '').split('.')),
  )
  x = images_nchw
  for block in blocks:
    stride = 2 if block.endswith(('stage0', '.0')) else 1
    if f'{block}.rbr_reparam.weight' in state_dict:
      y = conv(
        x, state_dict[f'{block}.rbr_reparam.weight'], state_dict[f'{block}.rbr_reparam.bias']
      )
    else:
      y = bn(conv(x, state_dict[f'{block}.rbr_dense.conv.weight']), f'{block}.rbr_dense.bn')
      y += bn(conv(x, state_dict[f'{block}.rbr_1x1.conv.weight']), f'{block}.rbr_1x1.bn')
      if f'{block}.rbr_identity.weight' in state_dict:
        y += bn(x, f'{block}.rbr_identity')
    x = np.maximum(y, 0)
  pooled = x.mean(axis=(2, 3))
  return pooled @ state_dict['linear.weight'].T + state_dict['linear.bias']

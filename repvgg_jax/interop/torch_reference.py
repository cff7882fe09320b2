"""RepVGG in PyTorch, with the reference's or timm's module names.

An implementation independent of the Flax model: torch's own convolutions and
BatchNorm, NCHW, the grouped blocks placed by each source's own rule. It loads
a state dict strictly (`load_state_dict(strict=True)`), so it checks an import
from the PyTorch side (`python -m repvgg_jax.convert import --verify`), the
cross-framework tests, and the PyTorch column of the benchmark.

PyTorch is an optional dependency: this module imports it, nothing else in the
package does at import time.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from repvgg_jax.model import variants

NAMES = {  # Branch names of a block: dense 3x3, 1x1, identity, fused 3x3.
  'reference': ('rbr_dense', 'rbr_1x1', 'rbr_identity', 'rbr_reparam'),
  'timm': ('conv_kxk', 'conv_1x1', 'identity', 'reparam_conv'),
}


def _conv_bn(in_channels, out_channels, kernel_size, stride, groups) -> nn.Sequential:
  seq = nn.Sequential()
  seq.add_module(
    'conv',
    nn.Conv2d(
      in_channels,
      out_channels,
      kernel_size,
      stride,
      padding=kernel_size // 2,
      groups=groups,
      bias=False,
    ),
  )
  seq.add_module('bn', nn.BatchNorm2d(out_channels))
  return seq


class Block(nn.Module):
  """ReLU(3x3 conv-BN + 1x1 conv-BN [+ BN]) or, deployed, ReLU(3x3 conv with bias)."""

  def __init__(self, in_channels, out_channels, stride, groups, deploy, style):
    super().__init__()
    self.names = NAMES[style]
    dense, one, identity, reparam = self.names
    if deploy:
      conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1, groups=groups, bias=True)
      self.add_module(reparam, conv)
      return
    self.add_module(dense, _conv_bn(in_channels, out_channels, 3, stride, groups))
    self.add_module(one, _conv_bn(in_channels, out_channels, 1, stride, groups))
    if in_channels == out_channels and stride == 1:
      self.add_module(identity, nn.BatchNorm2d(in_channels))

  def forward(self, x):
    dense, one, identity, reparam = self.names
    if hasattr(self, reparam):
      return torch.relu(getattr(self, reparam)(x))
    y = getattr(self, dense)(x) + getattr(self, one)(x)
    if hasattr(self, identity):
      y = y + getattr(self, identity)(x)
    return torch.relu(y)


def _reference_groups(variant: variants.Variant) -> list[list[int]]:
  """Groups per block of stages 1-4: the reference numbers blocks from 1 after stage 0
  and groups those in ``optional_groupwise_layers = [2, 4, ..., 26]``."""
  grouped, running, out = set(range(2, 28, 2)), 1, []
  for depth in variant.num_blocks:
    out.append([variant.groups if running + i in grouped else 1 for i in range(depth)])
    running += depth
  return out


def _timm_groups(variant: variants.Variant) -> list[list[int]]:
  """timm groups the blocks whose index in their stage is odd."""
  return [
    [variant.groups if (i + 1) % 2 == 0 else 1 for i in range(depth)]
    for depth in variant.num_blocks
  ]


class _Head(nn.Module):
  def __init__(self, features, num_classes):
    super().__init__()
    self.fc = nn.Linear(features, num_classes)

  def forward(self, x):
    return self.fc(x)


class RepVGG(nn.Module):
  """The whole network; ``style`` picks the module names (and so the state dict keys).

  ``num_classes=0`` drops the classifier: the forward returns the last stage's
  NCHW feature map.
  """

  def __init__(self, name, num_classes=1000, deploy=False, style='reference'):
    super().__init__()
    if style not in NAMES:
      raise ValueError(f'Unknown style {style!r}; known: {", ".join(NAMES)}.')
    variant = variants.get_variant(name)
    a, b = variant.width_multipliers
    widths = (int(64 * a), int(128 * a), int(256 * a), int(512 * b))
    groups = _reference_groups(variant) if style == 'reference' else _timm_groups(variant)
    in_channels = min(64, int(64 * a))
    first = Block(3, in_channels, 2, 1, deploy, style)
    stages = []
    for width, stage_groups in zip(widths, groups, strict=True):
      blocks = []
      for index, g in enumerate(stage_groups):
        blocks.append(Block(in_channels, width, 2 if index == 0 else 1, g, deploy, style))
        in_channels = width
      stages.append(nn.Sequential(*blocks))
    self.style, self.num_classes = style, num_classes
    if style == 'reference':
      self.stage0 = first
      for s, stage in enumerate(stages, start=1):
        self.add_module(f'stage{s}', stage)
      if num_classes:
        self.linear = nn.Linear(in_channels, num_classes)
    else:
      self.stem, self.stages = first, nn.Sequential(*stages)
      if num_classes:
        self.head = _Head(in_channels, num_classes)

  def forward(self, x):
    if self.style == 'reference':
      for s in range(5):
        x = getattr(self, f'stage{s}')(x)
    else:
      x = self.stages(self.stem(x))
    if not self.num_classes:
      return x
    x = x.mean(dim=(2, 3))
    return self.linear(x) if self.style == 'reference' else self.head(x)


def load(state_dict, name, num_classes, deploy, style) -> RepVGG:
  """A `RepVGG` in eval mode holding ``state_dict`` (numpy or torch values).

  Strict: every key must be used and every parameter and statistic filled;
  only BatchNorm's ``num_batches_tracked`` counters may be absent.

  Raises:
    ValueError: keys missing from, unexpected in or mis-shaped in ``state_dict``.
  """
  model = RepVGG(name, num_classes=num_classes, deploy=deploy, style=style)
  tensors = {  # Tensors as they are (load_state_dict copies); arrays copied, so writable.
    k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v))
    for k, v in state_dict.items()
  }
  try:
    result = model.load_state_dict(tensors, strict=False)
  except RuntimeError as error:  # torch raises on mis-shaped tensors even when not strict.
    raise ValueError(f'The state dict does not fit the PyTorch {name}: {error}') from None
  missing = [k for k in result.missing_keys if not k.endswith('num_batches_tracked')]
  if missing or result.unexpected_keys:
    raise ValueError(
      f'The state dict does not fit the PyTorch {name}: missing {missing[:8]}, '
      f'unexpected {result.unexpected_keys[:8]}.'
    )
  return model.eval()


def nchw(images_nhwc) -> torch.Tensor:
  """NHWC images (numpy or JAX) as a contiguous float32 NCHW tensor on the CPU."""
  return torch.from_numpy(np.array(images_nhwc, np.float32)).permute(0, 3, 1, 2).contiguous()


def forward(model: RepVGG, images_nhwc) -> np.ndarray:
  """Runs ``model`` on NHWC images (numpy or JAX), in float32 on the model's device;
  returns numpy."""
  with torch.inference_mode():
    return model(nchw(images_nhwc).to(next(model.parameters()).device)).cpu().numpy()

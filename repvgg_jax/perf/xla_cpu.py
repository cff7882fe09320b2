"""Where XLA:CPU's convolution must not go: the loop of a multi-step training call.

XLA:CPU leaves the backward convolutions inside a loop's body in layouts that
its fast convolution does not take (jax-ml/jax#12868), so a training step that
runs XLA's convolution is many times slower inside a scan of several steps
than alone (docs/performance.md); with the CPU kernels' matrix multiplies the
scan runs as fast as single steps. The trainer and the bench refuse that case
with the same rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from repvgg_jax.perf.conv_kernels import choose_conv_impl


def xla_convolutions_in_training(conv_impl: str, layers: Sequence[tuple]) -> list[str]:
  """The blocks whose training-time convolutions ``conv_impl`` gives to XLA's
  convolution on a CPU (`choose_conv_impl`, for their 3x3 and 1x1 kernels).

  Args:
    conv_impl: as `repvgg_jax.perf.conv_layer` takes it.
    layers: ``(side, block)`` of each block, ``side`` its input map's
      (`repvgg_jax.model.shapes.block_layers`).
  """
  found = []
  for index, (side, block) in enumerate(layers):
    stride, in_channels = block.stride, block.in_channels
    out_side = (side - 1) // stride + 1
    impls = {
      choose_conv_impl(
        conv_impl,
        in_pixels=side * side,
        out_pixels=out_side * out_side,
        strides=(stride, stride),
        in_channels=in_channels,
        train=True,
        kernel_size=kernel_size,
        groups=block.groups,
        backend='cpu',
      )
      for kernel_size in ((3, 3), (1, 1))
    }
    if 'xla' in impls:
      found.append(f'block {index} ({side}x{side}, {in_channels}->{block.out_channels})')
  return found


def check_steps_per_call(
  conv_impl: str, layers: Sequence[tuple], steps_per_call: int, fix: str, backend=None
) -> None:
  """Refuses several training steps per call on a CPU where XLA's convolution would run.

  Raises:
    ValueError: naming the first such block and ``fix``.
  """
  if steps_per_call == 1 or (backend or jax.default_backend()) != 'cpu':
    return
  slow = xla_convolutions_in_training(conv_impl, layers)
  if slow:
    raise ValueError(
      f'{steps_per_call} steps per call on a CPU, but conv_impl {conv_impl!r} computes '
      f"{len(slow)} blocks with XLA's convolution ({slow[0]}, ...), which XLA:CPU runs up "
      f'to 35x slower inside the loop of a multi-step call: {fix}.'
    )

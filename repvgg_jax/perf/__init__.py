"""Opt-in speed-ups for CPUs, chosen at the top and injected into the model.

The model computes every convolution with `nn.Conv` (``lax.conv_general_dilated``)
on every backend. The trainer, the bench and the ablations pick a convolution
module here (`conv_layer`) and pass it to `repvgg_jax.create_model(conv=...)`,
and may run inference on chunks of images (`chunked`); the parameter tree
and the outputs are the same either way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax

from repvgg_jax.perf.chunking import (
  CHUNK_IMAGES,
  ChunkedRepVGG,
  check_chunk_images,
  chunked,
  chunking,
  images_per_chunk,
)
from repvgg_jax.perf.conv_kernels import (
  CONV_IMPLS,
  KernelConv,
  check_conv_impl,
  choose_conv_impl,
)


def conv_layer(
  conv_impl: str = 'auto', *, train: bool, backend: str | None = None
) -> Callable[..., nn.Module]:
  """The convolution module to build a model with, for training or for inference.

  Args:
    conv_impl: 'xla' (`nn.Conv`), 'auto' (`nn.Conv` off CPUs; on CPUs each layer
      computed the way `choose_conv_impl` measured fastest), 'im2col',
      'winograd' or 'dense' (`KernelConv` with that kernel where it applies).
    train: whether the model is trained with it (the backward pass enters the
      choice).
    backend: default, JAX's.

  Returns:
    `nn.Conv`, or a partial of `KernelConv` taking `nn.Conv`'s arguments.
  """
  check_conv_impl(conv_impl)
  on_cpu = (backend or jax.default_backend()) == 'cpu'
  if conv_impl == 'xla' or (conv_impl == 'auto' and not on_cpu):
    return nn.Conv
  return functools.partial(KernelConv, conv_impl=conv_impl, train=train)


__all__ = [
  'CHUNK_IMAGES',
  'CONV_IMPLS',
  'ChunkedRepVGG',
  'KernelConv',
  'check_chunk_images',
  'check_conv_impl',
  'choose_conv_impl',
  'chunked',
  'chunking',
  'conv_layer',
  'images_per_chunk',
]

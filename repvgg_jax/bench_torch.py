"""The PyTorch side of `repvgg_jax.bench`: the same network, the same weights, eager.

The network is `repvgg_jax.torch_reference` (torch's own Conv2d and
BatchNorm2d), loaded with the Flax weights converted by `torch_layout` and
checked to give the Flax model's logits before anything is timed. Inference is
timed in both memory layouts (NCHW and channels-last, which oneDNN often runs
faster) under ``torch.inference_mode``; the JAX/PyTorch ratios are taken
against the faster one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from repvgg_jax import torch_layout, torch_reference
from repvgg_jax.bench_timing import interleaved_medians

LAYOUTS = {'nchw': torch.contiguous_format, 'channels_last': torch.channels_last}
LOGIT_TOLERANCE = 1e-4  # Relative; float32 sums in another order differ by ~1e-6.


class LogitMismatchError(RuntimeError):
  """PyTorch and JAX disagree on the same weights: the timings would compare different nets."""


def matmul_gflops(sizes, runs: int) -> dict[int, float]:
  """PyTorch's float32 square matmul in GFLOP/s, per side (MKL on CPUs).

  The machine's peak as a tuned BLAS reaches it, beside XLA's own in
  `bench_timing.roofline`.
  """
  gflops = {}
  for n in sizes:
    a = torch.randn(n, n)
    seconds, _ = interleaved_medians({n: lambda a=a: torch.mm(a, a)}, runs, 2)[n]
    gflops[n] = 2 * n**3 / seconds / 1e9
  return gflops


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
  return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def torch_model(name, variables, num_classes: int, deploy: bool) -> torch.nn.Module:
  """`torch_reference.RepVGG` holding the Flax ``variables`` (training-time or fused)."""
  state = torch_layout.to_torch(variables)
  return torch_reference.load(
    state, name, num_classes=num_classes, deploy=deploy, style='reference'
  )


def check_logits(model: torch.nn.Module, images_nhwc, expected: np.ndarray) -> float:
  """PyTorch's logits against JAX's; raises `LogitMismatchError` past the tolerance."""
  error = _relative_error(torch_reference.forward(model, images_nhwc), np.asarray(expected))
  if not error <= LOGIT_TOLERANCE:
    raise LogitMismatchError(
      f'PyTorch logits differ from JAX by {error:.2e} (relative), above {LOGIT_TOLERANCE}: '
      'the two networks are not the same, so their speeds cannot be compared.'
    )
  return error


def _nchw(images_nhwc, layout: str) -> torch.Tensor:
  x = torch.from_numpy(np.array(images_nhwc, np.float32)).permute(0, 3, 1, 2).contiguous()
  return x.contiguous(memory_format=LAYOUTS[layout])


def inference_fns(name, variables, fused, images) -> dict[str, tuple[Callable, dict]]:
  """Timed inference of the training-time and fused PyTorch models in both layouts.

  Both models are checked against the JAX models' logits on ``images`` first.

  Returns:
    ``{'torch_train_nchw': (fn, info), ...}`` as `bench_models.benchmark_models` takes
    as ``extra``; ``info`` names the model, the layout and the logit error.
  """
  from repvgg_jax.model import create_model

  num_classes = variables['params']['linear']['kernel'].shape[-1]
  out = {}
  for key, tree, deploy in (('train', variables, False), ('deploy', fused, True)):
    flax_model = create_model(name, num_classes=num_classes, deploy=deploy, conv_impl='xla')
    expected = flax_model.apply(tree, images, train=False)
    for layout, memory_format in LAYOUTS.items():
      # `Module.to` converts in place: one model per layout.
      model = torch_model(name, tree, num_classes, deploy).to(memory_format=memory_format)
      error = check_logits(model, images, expected)
      x = _nchw(images, layout)

      def run(m=model, x=x):
        with torch.inference_mode():
          m(x)

      info = {'model': key, 'layout': layout, 'logit_rel_error': error}
      out[f'torch_{key}_{layout}'] = (run, info)
  return out


def train_step_fns(
  name: str, variables, batch, num_classes: int, layouts=tuple(LAYOUTS)
) -> dict[str, tuple[Callable, dict]]:
  """PyTorch eager SGD steps of the training-time model, both layouts, same start.

  The model starts from the JAX state's weights (checked on the batch in
  eval mode), and trains as the JAX step does: cross-entropy, SGD with
  momentum 0.9 and weight decay 1e-4 on every parameter (the reference's
  custom exclusions change no speed), BatchNorm over the whole batch.
  ``layouts``: a subset of `LAYOUTS`. (torch 2.13's CPU build aborts with heap
  corruption training A0 channels-last at batch 32, 224x224, on the 2-core
  development machine, even alone in its process.)
  """
  images, labels = np.asarray(batch['image']), np.asarray(batch['label'])
  from repvgg_jax.model import create_model

  flax_model = create_model(name, num_classes=num_classes, conv_impl='xla')
  expected = flax_model.apply(variables, images[:8], train=False)
  out = {}
  for layout in layouts:
    model = torch_model(name, variables, num_classes, deploy=False)
    error = check_logits(model, images[:8], expected)
    model = model.to(memory_format=LAYOUTS[layout]).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = _nchw(images, layout), torch.from_numpy(labels.astype(np.int64))

    def step(model=model, optimizer=optimizer, x=x, y=y):
      optimizer.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(model(x), y)
      loss.backward()
      optimizer.step()

    out[f'torch_{layout}'] = (step, {'layout': layout, 'logit_rel_error': error})
  return out

"""The PyTorch side of `repvgg_jax.bench`: the same network, the same weights, eager.

The network is `repvgg_jax.interop.torch_reference` (torch's own Conv2d and
BatchNorm2d), loaded with the Flax weights converted by `torch_layout` and
checked to give the Flax model's logits before anything is timed. Inference is
timed in both memory layouts (NCHW and channels-last, which oneDNN often runs
faster) under ``torch.inference_mode``; the JAX/PyTorch ratios are taken
against the faster one.

When JAX runs on a GPU and torch sees CUDA, PyTorch runs on the GPU too, with
cuDNN's autotuner on (``cudnn.benchmark``) as a tuned PyTorch job would have it,
and each timed call waits for the GPU. Both frameworks then convolve float32 in
TF32 by default (JAX's default precision, PyTorch's ``cudnn.allow_tf32``), so
the logits are checked with both in true float32 and timed in their defaults.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import jax
import numpy as np
import torch

from repvgg_jax.bench.timing import interleaved_medians
from repvgg_jax.interop import torch_layout, torch_reference

LAYOUTS = {'nchw': torch.contiguous_format, 'channels_last': torch.channels_last}
LOGIT_TOLERANCE = 1e-4  # Relative; float32 sums in another order differ by ~1e-6.


class LogitMismatchError(RuntimeError):
  """PyTorch and JAX disagree on the same weights: the timings would compare different nets."""


def torch_device() -> torch.device:
  """Where PyTorch runs: on the GPU when JAX does and torch sees CUDA, else the CPU."""
  if jax.default_backend() == 'gpu' and torch.cuda.is_available():
    torch.backends.cudnn.benchmark = True
    return torch.device('cuda')
  return torch.device('cpu')


def _synchronize(device: torch.device) -> None:
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


@contextlib.contextmanager
def exact_float32():
  """True float32 convolutions and matmuls in both frameworks (no TF32), for logit checks."""
  saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
  torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
  try:
    with jax.default_matmul_precision('highest'):
      yield
  finally:
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


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
  with exact_float32():
    actual = torch_reference.forward(model, images_nhwc)
  error = _relative_error(actual, np.asarray(expected))
  if not error <= LOGIT_TOLERANCE:
    raise LogitMismatchError(
      f'PyTorch logits differ from JAX by {error:.2e} (relative), above {LOGIT_TOLERANCE}: '
      'the two networks are not the same, so their speeds cannot be compared.'
    )
  return error


def _expected_logits(name, tree, images, num_classes: int, deploy: bool) -> np.ndarray:
  """The Flax model's logits in true float32, what PyTorch's are checked against."""
  from repvgg_jax.model import create_model

  model = create_model(name, num_classes=num_classes, deploy=deploy)
  with exact_float32():
    return np.asarray(model.apply(tree, images, train=False))


def _nchw(images_nhwc, layout: str, device: torch.device) -> torch.Tensor:
  return torch_reference.nchw(images_nhwc).to(device).contiguous(memory_format=LAYOUTS[layout])


def inference_fns(name, variables, fused, images) -> dict[str, tuple[Callable, dict]]:
  """Timed inference of the training-time and fused PyTorch models in both layouts.

  Both models are checked against the JAX models' logits on ``images`` first.

  Returns:
    ``{'torch_train_nchw': (fn, info), ...}`` as `bench_models.benchmark_models` takes
    as ``extra``; ``info`` names the model, the layout and the logit error.
  """
  num_classes = variables['params']['linear']['kernel'].shape[-1]
  device, out = torch_device(), {}
  for key, tree, deploy in (('train', variables, False), ('deploy', fused, True)):
    expected = _expected_logits(name, tree, images, num_classes, deploy)
    for layout, memory_format in LAYOUTS.items():
      # `Module.to` converts in place: one model per layout.
      model = torch_model(name, tree, num_classes, deploy).to(device, memory_format=memory_format)
      error = check_logits(model, images, expected)
      x = _nchw(images, layout, device)

      def run(m=model, x=x):
        with torch.inference_mode():
          m(x)
        _synchronize(device)

      info = {'model': key, 'layout': layout, 'device': device.type, 'logit_rel_error': error}
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
  expected = _expected_logits(name, variables, images[:8], num_classes, deploy=False)
  device, out = torch_device(), {}
  for layout in layouts:
    model = torch_model(name, variables, num_classes, deploy=False).to(device)
    error = check_logits(model, images[:8], expected)
    model = model.to(memory_format=LAYOUTS[layout]).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = _nchw(images, layout, device)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)

    def step(model=model, optimizer=optimizer, x=x, y=y):
      optimizer.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(model(x), y)
      loss.backward()
      optimizer.step()
      _synchronize(device)

    info = {'layout': layout, 'device': device.type, 'logit_rel_error': error}
    out[f'torch_{layout}'] = (step, info)
  return out

"""A config's training run in PyTorch eager, to time beside ``train.py``.

    python -m repvgg_jax.bench.torch_train --config configs/digits.py

The same network (`repvgg_jax.interop.torch_reference`, PyTorch's own initialisation), the
same batches (`repvgg_jax.data.datasets.train_batches`: with ``dataset.in_memory`` the NumPy
crops that ``train.py`` trains on), the same optimizer (SGD with momentum, the
reference's weight-decay rule, the per-step cosine learning rate) and the same
cadence of evaluations and checkpoints (``torch.save``). It prints the time of the
loop and the time since this module was imported (the package's imports of JAX and
Flax come before it); the README's performance section sets them beside
``train.py``'s. Needs torch (``pip install -r requirements-test.txt``).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import tempfile
import time

START = time.perf_counter()

from repvgg_jax.perf import host_memory  # noqa: E402
from repvgg_jax.startup import quiet_startup  # noqa: E402

LAYOUTS = ('channels_last', 'nchw')


def load_config(path: str):
  """``get_config()`` of the config file at ``path`` (as ``train.py --config`` loads it)."""
  spec = importlib.util.spec_from_file_location('torch_train_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def check_supported(config) -> None:
  """Raises ValueError for what this PyTorch loop does not do."""
  from repvgg_jax.model import get_variant
  from repvgg_jax.model.branches import PAPER_BRANCHES

  branches = config.model.branches
  unsupported = {
    "model.branches (only the paper's)": branches is not None
    and tuple(branches) != tuple(PAPER_BRANCHES),
    'QARepVGG blocks': get_variant(config.model.name).block != 'repvgg',
    'model.bn_group_size > 0': config.model.bn_group_size > 0,
    'optimizer.mixup_alpha > 0': config.optimizer.mixup_alpha > 0,
    'optimizer.cutmix_alpha > 0': config.optimizer.cutmix_alpha > 0,
    'optimizer.custom_l2': config.optimizer.custom_l2,
    'optimizer.backbone_lr_multiplier other than 1': config.optimizer.backbone_lr_multiplier != 1,
    'freeze_stages > 0': config.freeze_stages > 0,
    'init_from': config.init_from is not None,
    'ema_decay > 0': config.ema_decay > 0,
    'qat.enabled': config.qat.enabled,
    'model.dtype other than float32': config.model.dtype != 'float32',
    'model.num_blocks or width_multipliers overrides': bool(
      config.model.get('num_blocks') or config.model.get('width_multipliers')
    ),
  }
  named = [name for name, found in unsupported.items() if found]
  if named:
    raise ValueError(f'The PyTorch loop does not support {", ".join(named)}.')


def _optimizer(model, config, torch):
  """SGD with the reference's rules: weight decay on every name without 'bias' or 'bn',
  and ``optimizer.bias_lr_multiplier`` times the learning rate (``lr_scale``) on biases."""
  decay, no_decay, biases = [], [], []
  for name, parameter in model.named_parameters():
    group = biases if 'bias' in name else no_decay if 'bn' in name else decay
    group.append(parameter)
  groups = [
    {'params': decay, 'weight_decay': config.optimizer.weight_decay, 'lr_scale': 1.0},
    {'params': no_decay, 'weight_decay': 0.0, 'lr_scale': 1.0},
    {'params': biases, 'weight_decay': 0.0, 'lr_scale': config.optimizer.bias_lr_multiplier},
  ]
  return torch.optim.SGD(
    groups, lr=0.0, momentum=config.optimizer.momentum, nesterov=config.optimizer.nesterov
  )


def _evaluate(model, config, torch, layout) -> float:
  from repvgg_jax.data import datasets as data

  model.eval()
  correct = count = 0
  with torch.inference_mode():
    for batch in data.eval_batches(config.dataset, global_batch_size=config.eval_batch_size):
      logits = model(_tensor(batch['image'], torch, layout))
      mask = torch.from_numpy(batch['mask'])
      hits = logits.argmax(dim=1) == torch.from_numpy(batch['label'].astype('int64'))
      correct += int((hits & mask).sum())
      count += int(mask.sum())
  model.train()
  return correct / max(count, 1)


def _tensor(images_nhwc, torch, layout: str):
  x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
  memory_format = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
  return x.contiguous(memory_format=memory_format)


def train(config, workdir, layout: str = 'channels_last', log=print) -> dict:
  """Runs ``config``'s steps in PyTorch eager; returns the timings and the final top-1."""
  import torch
  import torch.nn.functional as F

  from repvgg_jax.data import datasets as data
  from repvgg_jax.interop import torch_reference
  from repvgg_jax.train import durations, optim

  check_supported(config)
  torch.manual_seed(config.seed)
  steps_per_epoch = data.steps_per_epoch(config.dataset, config.batch_size)
  schedule = durations.Schedule.from_config(config, steps_per_epoch)
  lr_fn = optim.learning_rate_schedule(config, steps_per_epoch, schedule.total_steps)
  model = torch_reference.RepVGG(config.model.name, num_classes=config.dataset.num_classes)
  if layout == 'channels_last':
    model = model.to(memory_format=torch.channels_last)
  model.train()
  optimizer = _optimizer(model, config, torch)
  batches = data.train_batches(
    config.dataset, global_batch_size=config.batch_size, seed=config.seed
  )
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  loop_start = time.perf_counter()
  top1 = None
  for step in range(1, schedule.total_steps + 1):
    batch = next(batches)
    for group in optimizer.param_groups:
      group['lr'] = float(lr_fn(step - 1)) * group['lr_scale']
    x, y = _tensor(batch['image'], torch, layout), torch.from_numpy(batch['label'].astype('int64'))
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, y, label_smoothing=config.optimizer.label_smoothing)
    loss.backward()
    optimizer.step()
    if schedule.due(step, schedule.eval_every):
      top1 = _evaluate(model, config, torch, layout)
      log(f'step {step}: eval top-1 {top1:.2%}, loss {loss.item():.4f}')
    if schedule.due(step, schedule.checkpoint_every):
      tmp = workdir / f'{step}.pt.tmp'
      torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict()}, tmp)
      tmp.replace(workdir / f'{step}.pt')
  loop = time.perf_counter() - loop_start
  images = schedule.total_steps * config.batch_size
  return {
    'steps': schedule.total_steps,
    'loop_seconds': loop,
    'images_per_sec': images / loop,
    'eval_top1': top1,
    'layout': layout,
  }


def main(argv=None) -> int:
  quiet_startup()
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='a config file, e.g. configs/digits.py')
  parser.add_argument('--layout', default='channels_last', choices=LAYOUTS)
  parser.add_argument('--workdir', help='where the checkpoints go (default: a temporary dir)')
  parser.add_argument(
    '--reuse-host-memory',
    action='store_true',
    help='keep freed host memory for reuse on CPU-only runs, as train.py --reuse_host_memory',
  )
  args = parser.parse_args(argv)
  if args.reuse_host_memory:
    host_memory.reuse_freed_memory()  # Before torch and TensorFlow start threads.
  try:
    import torch  # noqa: F401
  except ImportError:
    parser.error('needs PyTorch: pip install -r requirements-test.txt')
  config = load_config(args.config)
  try:
    check_supported(config)
  except ValueError as error:
    parser.error(str(error))
  with tempfile.TemporaryDirectory() as tmp:
    result = train(config, args.workdir or tmp, args.layout)
  print(
    f'PyTorch eager {config.model.name} ({result["layout"]}) on {config.dataset.name}: '
    f'{result["steps"]} steps in {result["loop_seconds"]:.1f} s '
    f'({result["images_per_sec"]:,.0f} images/s, evaluations and checkpoints included), '
    f'{time.perf_counter() - START:.1f} s since this module was imported; '
    f'eval top-1 {result["eval_top1"]:.2%}'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""Across frameworks: weights of a PyTorch RepVGG (torch's own convolutions and
BatchNorm, reference or timm module names) import and compute the same logits in
Flax, training-time and fused. Skipped when torch is not installed."""

import math

import jax
import numpy as np
import pytest
from helpers import relative_error

torch = pytest.importorskip('torch')

import repvgg_jax  # noqa: E402
from repvgg_jax import checkpointing  # noqa: E402
from repvgg_jax.interop import convert, torch_reference  # noqa: E402


def randomized_torch_model(name, style, deploy, num_classes=10, seed=0):
  """A PyTorch RepVGG with random kernels and random, non-trivial BatchNorm state.

  Set in torch, independently of this project's converters. Kernel variances
  keep the logits input-dependent after 20+ layers: 1/fan_in in the multi-branch
  blocks (three branches add up), 2/fan_in (He) with small biases in the plain
  deploy stack, where ReLU halves the signal at every layer.
  """
  model = torch_reference.RepVGG(name, num_classes=num_classes, deploy=deploy, style=style)
  generator = torch.Generator().manual_seed(seed)
  gain, bias_std = (2.0, 0.01) if deploy else (1.0, 0.2)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
        fan_in = math.prod(module.weight.shape[1:])
        module.weight.normal_(0, (gain / fan_in) ** 0.5, generator=generator)
        if module.bias is not None:
          module.bias.normal_(0, bias_std, generator=generator)
      elif isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.4, 1.2, generator=generator)
        module.bias.normal_(0, 0.2, generator=generator)
        module.running_mean.normal_(0, 0.2, generator=generator)
        module.running_var.uniform_(0.5, 2.0, generator=generator)
  return model.eval()


def save(model, path):
  """Saves the state dict as a user would: .pth in a training-script container, or flat."""
  state_dict = model.state_dict()
  if path.suffix == '.pth':
    torch.save(
      {'epoch': 120, 'state_dict': {f'module.{k}': v for k, v in state_dict.items()}}, path
    )
  elif path.suffix == '.safetensors':
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
  else:
    np.savez(path, **{k: v.numpy() for k, v in state_dict.items()})


def flax_logits(name, variables, deploy, images):
  model = repvgg_jax.create_model(name, num_classes=10, deploy=deploy, precision='highest')
  return jax.jit(model.apply)(variables, images)


def check_import(tmp_path, name, style, deploy, suffix, verify=False):
  torch_model = randomized_torch_model(name, style, deploy)
  path = tmp_path / f'weights{suffix}'
  save(torch_model, path)
  meta = convert.import_weights(path, tmp_path / 'out', verify=verify)
  assert meta['key_style'] == style and meta['deploy'] == deploy
  if verify:  # The converter's own check runs the file in torch.
    assert meta['verify']['source'] == 'torch'
    assert meta['verify']['max_relative_logit_difference'] <= 1e-5
  variables, _ = checkpointing.Checkpoints(tmp_path / 'out', read_only=True).restore()

  images = np.asarray(jax.random.normal(jax.random.key(1), (3, 32, 32, 3)))
  expected = torch_reference.forward(torch_model, images)
  # Deep random ReLU stacks map all inputs to nearly parallel outputs; the part of the
  # logits that depends on the input must still stand far above float32 rounding.
  assert np.std(expected, axis=0).mean() > 1e-3 * np.abs(expected).mean()
  assert relative_error(flax_logits(name, variables, deploy, images), expected) <= 1e-5
  if not deploy:
    fused = repvgg_jax.fuse_params(variables)
    assert relative_error(flax_logits(name, fused, True, images), expected) <= 1e-5


@pytest.mark.parametrize(
  'name, style, deploy, suffix, verify',
  [
    ('RepVGG-A0', 'reference', False, '.pth', True),
    ('RepVGG-B1g4', 'timm', False, '.safetensors', False),
    ('RepVGG-A0', 'timm', True, '.pth', False),
    ('RepVGG-B1g2', 'reference', True, '.npz', False),
  ],
)
def test_pytorch_weights_import_with_the_same_logits(tmp_path, name, style, deploy, suffix, verify):
  check_import(tmp_path, name, style, deploy, suffix, verify)


@pytest.mark.slow
@pytest.mark.parametrize('style', ['reference', 'timm'])
@pytest.mark.parametrize('name', repvgg_jax.list_models('repvgg'))
def test_every_variant_imports_from_pytorch(tmp_path, name, style):
  check_import(tmp_path, name, style, False, '.safetensors')


def test_torch_model_refuses_a_state_dict_of_another_variant():
  state_dict = randomized_torch_model('RepVGG-A0', 'reference', False).state_dict()
  with pytest.raises(ValueError, match='does not fit the PyTorch RepVGG-A1'):
    torch_reference.load(state_dict, 'RepVGG-A1', 10, False, 'reference')

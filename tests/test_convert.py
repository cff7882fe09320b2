"""python -m repvgg_jax.convert: import reference weights, fuse trained checkpoints."""

import importlib.util
import pickle
import warnings

import jax
import numpy as np
import pytest
from helpers import random_variables, run_in_repo, tiny_config

import repvgg_jax
from repvgg_jax import checkpointing
from repvgg_jax.interop import convert, torch_layout, weight_files
from repvgg_jax.train import trainer


@pytest.fixture(scope='module')
def a0_state_dict():
  model = repvgg_jax.create_model('A0', num_classes=10)
  return torch_layout.to_torch(random_variables(model, (1, 32, 32, 3), seed=2))


def restore(directory):
  return checkpointing.Checkpoints(directory, read_only=True).restore()


def assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('suffix', ['.npz', '.safetensors'])
def test_import_writes_a_verified_checkpoint(tmp_path, a0_state_dict, suffix, capsys):
  path = tmp_path / f'weights{suffix}'
  if suffix == '.npz':
    np.savez(path, **a0_state_dict)
  else:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in a0_state_dict.items()}, str(path))
  assert convert.main(['import', str(path), str(tmp_path / 'out')]) == 0
  assert 'Wrote the training-time RepVGG-A0 (10 classes)' in capsys.readouterr().out
  variables, meta = restore(tmp_path / 'out')
  assert meta['model'] == 'RepVGG-A0' and not meta['deploy'] and meta['num_classes'] == 10
  assert meta['verify']['max_relative_logit_difference'] <= 1e-5
  assert_same_tree(variables, torch_layout.from_torch(a0_state_dict)[0])


def test_containers_and_module_prefixes_are_unwrapped(a0_state_dict, tmp_path):
  prefixed = {f'module.{k}': v for k, v in a0_state_dict.items()}
  for wrapped in ({'epoch': 3, 'state_dict': prefixed}, {'model': {'state_dict': prefixed}}):
    assert weight_files._unwrap(wrapped, tmp_path / 'w.pth').keys() == a0_state_dict.keys()
  with pytest.raises(torch_layout.ConversionError, match=r"no arrays .* keys: \['epoch', 'sta"):
    weight_files._unwrap({'state_dict_ema': prefixed, 'epoch': 3}, tmp_path / 'w.pth')
  with pytest.raises(torch_layout.ConversionError, match='holds a list, not a state dict'):
    weight_files._unwrap([prefixed], tmp_path / 'w.pth')


def test_bfloat16_safetensors_import_and_verify(tmp_path, a0_state_dict, capsys):
  import ml_dtypes
  from safetensors.numpy import save_file

  path = tmp_path / 'bf16.safetensors'
  save_file({k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in a0_state_dict.items()}, path)
  assert convert.main(['import', str(path), str(tmp_path / 'out'), '--model', 'a0']) == 0
  _, meta = restore(tmp_path / 'out')
  assert meta['model'] == 'RepVGG-A0'  # As the library names it, however it was typed.
  assert meta['verify']['max_relative_logit_difference'] <= 1e-5  # Both in bf16's values.


def test_truncated_file(tmp_path, a0_state_dict):
  path = tmp_path / 'weights.npz'
  np.savez(path, **a0_state_dict)
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with pytest.raises(torch_layout.ConversionError, match='Cannot read .* complete'):
    weight_files.load_state_dict(path)
  assert convert.main(['import', str(path), str(tmp_path / 'out')]) == 1
  assert not (tmp_path / 'out').exists()


def test_bad_paths(tmp_path, a0_state_dict):
  with pytest.raises(FileNotFoundError, match='No weight file'):
    weight_files.load_state_dict(tmp_path / 'missing.pth')
  (tmp_path / 'weights.txt').write_text('hello')
  with pytest.raises(torch_layout.ConversionError, match='Unknown weight file type'):
    weight_files.load_state_dict(tmp_path / 'weights.txt')
  np.savez(tmp_path / 'w.npz', **a0_state_dict)
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'keep.txt').write_text('mine')
  with pytest.raises(torch_layout.ConversionError, match='not empty'):
    convert.import_weights(tmp_path / 'w.npz', tmp_path / 'full')
  assert (tmp_path / 'full' / 'keep.txt').read_text() == 'mine'
  (tmp_path / 'a_file').write_text('mine')
  for output in (tmp_path / 'a_file', tmp_path / 'a_file' / 'out'):
    with pytest.raises(torch_layout.ConversionError, match='a_file is a file, so .* cannot be'):
      convert.import_weights(tmp_path / 'w.npz', output)
  assert (tmp_path / 'a_file').read_text() == 'mine'


@pytest.mark.skipif(importlib.util.find_spec('torch') is not None, reason='torch is installed')
def test_pth_without_torch_says_what_to_do(tmp_path):
  (tmp_path / 'w.pth').write_bytes(b'not read')
  with pytest.raises(torch_layout.ConversionError, match='needs PyTorch'):
    weight_files.load_state_dict(tmp_path / 'w.pth')


@pytest.mark.skipif(importlib.util.find_spec('torch') is None, reason='torch is not installed')
def test_a_pth_that_is_no_state_dict_or_no_torch_file_is_named(tmp_path):
  import torch

  torch.save(torch.zeros(3), tmp_path / 'tensor.pth')
  with pytest.raises(torch_layout.ConversionError, match='tensor.pth holds a Tensor, not a state'):
    weight_files.load_state_dict(tmp_path / 'tensor.pth')
  (tmp_path / 'page.pth').write_text('<html>Not Found</html>')
  with pytest.raises(
    torch_layout.ConversionError, match=r"not a PyTorch file \(it starts with b'<h'"
  ):
    weight_files.load_state_dict(tmp_path / 'page.pth')


@pytest.mark.skipif(importlib.util.find_spec('torch') is None, reason='torch is not installed')
def test_a_plain_pickle_is_refused_without_torchs_warning(tmp_path, a0_state_dict):
  with open(tmp_path / 'w.pth', 'wb') as file:
    pickle.dump(dict(a0_state_dict), file, protocol=4)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    with pytest.raises(torch_layout.ConversionError, match='Cannot read .*w.pth') as info:
      weight_files.load_state_dict(tmp_path / 'w.pth')
  assert not caught and 'weights_only' not in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec('torch') is None, reason='torch is not installed')
@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
def test_damaged_pth_is_reported(tmp_path, a0_state_dict, damage):
  import torch

  path = tmp_path / 'w.pth'
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in a0_state_dict.items()}, path)
  if damage == 'truncated':
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  else:
    path.write_bytes(b'\x80\x02not a pickle at all' * 10)
  with pytest.raises(torch_layout.ConversionError, match='Cannot read .*w.pth') as info:
    weight_files.load_state_dict(path)
  assert 'weights_only' not in str(info.value)  # Never the advice to run the file's code.


@pytest.mark.parametrize('suffix', ['.safetensors', '.npz'])
@pytest.mark.parametrize('content', [b'\xff' * 64, b'\0' * 100])
def test_garbage_weights_files_are_named(tmp_path, suffix, content):
  path = tmp_path / f'w{suffix}'
  path.write_bytes(content)
  with pytest.raises(
    torch_layout.ConversionError, match=f'Cannot read {path}: it is not a valid {suffix} weights'
  ) as error:
    weight_files.load_state_dict(path)
  assert 'allow_pickle' not in str(error.value)  # Never the advice to run a file's code.


def test_fuse_a_trained_checkpoint(tmp_path, capsys):
  config = tiny_config(str(tmp_path / 'tfds'), num_train_steps=2)
  trainer.train_and_evaluate(config, tmp_path / 'work')
  assert convert.main(['fuse', str(tmp_path / 'work'), str(tmp_path / 'fused')]) == 0
  fused, meta = restore(tmp_path / 'fused')
  assert meta['deploy'] and meta['step'] == 2 and meta['num_classes'] == 10
  # What its run feeds it and calls its classes, as the run's own deploy/ keeps.
  own_meta = restore(tmp_path / 'work' / 'deploy')[1]
  for key in ('image_size', 'eval_preprocess', 'classes'):
    assert meta[key] == own_meta[key], key
  assert meta['verify']['max_relative_logit_difference'] <= 1e-5
  own, _ = restore(tmp_path / 'work' / 'deploy')  # What the trainer exported itself.
  assert_same_tree(fused, own)
  # A step directory works too, and fusing a deploy checkpoint is refused.
  step_dir = tmp_path / 'work' / 'checkpoints' / '2'
  assert convert.main(['fuse', str(step_dir), str(tmp_path / 'fused2')]) == 0
  capsys.readouterr()
  assert convert.main(['fuse', str(tmp_path / 'fused'), str(tmp_path / 'fused3')]) == 1
  assert capsys.readouterr().err.startswith('error: These variables are already fused')


def test_import_names_the_missing_blocks(a0_state_dict):
  partial = {k: v for k, v in a0_state_dict.items() if not k.startswith('stage3.5.')}
  assert len(partial) < len(a0_state_dict)
  with pytest.raises(torch_layout.ConversionError, match='lacks blocks stage3_block5'):
    torch_layout.from_torch(partial)


def test_the_command_prints_its_error_alone(tmp_path):
  """No TensorFlow start-up lines around it: the command quiets them as the others do.
  Run as a user runs it, without the tests' TF_CPP_MIN_LOG_LEVEL."""
  command = ('-m', 'repvgg_jax.convert', 'fuse', str(tmp_path / 'none'), str(tmp_path / 'out'))
  proc = run_in_repo(*command, unset=('TF_CPP_MIN_LOG_LEVEL',))
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [f'error: No checkpoint at {tmp_path / "none"}.']


def test_import_into_an_empty_directory_leaves_no_staging_behind(tmp_path, a0_state_dict):
  np.savez(tmp_path / 'w.npz', **a0_state_dict)
  (tmp_path / 'out').mkdir()  # An empty directory takes the result, as a missing one.
  argv = ['import', str(tmp_path / 'w.npz'), str(tmp_path / 'out'), '--no-verify']
  assert convert.main(argv) == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == ['out', 'w.npz']
  assert restore(tmp_path / 'out')[1]['model'] == 'RepVGG-A0'


def test_a_sigterm_while_writing_leaves_no_half_written_output(tmp_path):
  """The command's SIGTERM unwinds it: the staging directory goes, nothing is renamed."""
  script = (
    'import os, signal, sys, time\n'
    'from repvgg_jax import convert\n'
    'from repvgg_jax.interop import export\n'
    'convert._unwind_on_sigterm()\n'
    f'with export.staged_directory({str(tmp_path / "out")!r}) as staging:\n'
    "  (staging / 'half').write_text('written')\n"
    '  os.kill(os.getpid(), signal.SIGTERM)\n'
    '  time.sleep(60)\n'
  )
  proc = run_in_repo('-c', script, timeout=120)
  assert proc.returncode == 143, proc.stderr[-2000:]
  assert list(tmp_path.iterdir()) == []

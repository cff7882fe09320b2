"""scripts/gpu_check.py, the GPU checks' one script, runs end to end on a CPU with --smoke
(slow: about five minutes on 2 cores; run with -m slow before handing it to a GPU)."""

import importlib.util
import json
import pathlib

import pytest
from helpers import run_in_repo


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_in_smoke_mode(tmp_path):
  result = run_in_repo('scripts/gpu_check.py', '--out', str(tmp_path), '--smoke', timeout=900)
  assert result.returncode == 0, result.stderr[-2000:]
  summary = (tmp_path / 'summary.md').read_text()
  for heading in ('## 1. Fused against unfused', '## 2. The levers', '## 3. The raised', '## 4.'):
    assert heading in summary
  assert 'skipped' not in summary and 'failed' not in summary
  # The levers: four models in the table, and B2 again under each child's XLA_FLAGS.
  assert '| B3g4 | float32 |' in summary and '| B2 | bfloat16 |' in summary
  assert '--xla_gpu_autotune_level=0 |' in summary and 'autotune_b2.txt |' in summary
  assert '| fused, bias apart | fused, NCHW | XLA_FLAGS |' in summary
  assert '| all blocks (sum of x times ms) |' in summary
  rows = [json.loads(line) for line in (tmp_path / 'results.jsonl').read_text().splitlines()]
  kinds = {row.get('kind') for row in rows}
  assert {'machine', 'infer', 'lever', 'block', 'roofline', 'train', 'end_to_end'} <= kinds
  for form in ('fused, no cuDNN conv fusion', 'fused, NCHW'):
    lever = next(r for r in rows if r.get('form') == form)
    assert lever['images_per_sec'] > 0 and lever['over_unfused'] > 0
  blocks = [r for r in rows if r.get('kind') == 'block']
  # B2's 28 blocks, one row per distinct shape (8), each with its three forms.
  assert sum(r['count'] for r in blocks) == 28 and len(blocks) == 8
  assert all(min(r['ms'].values()) > 0 and len(r['ms']) == 3 for r in blocks)
  end_to_end = next(r for r in rows if r.get('kind') == 'end_to_end')
  assert end_to_end['returncode'] == 0 and end_to_end['train_images_per_sec'] > 0
  assert (tmp_path / 'hlo_b2_fused.txt').stat().st_size > 0


def _gpu_check_module():
  path = pathlib.Path(__file__).resolve().parents[1] / 'scripts' / 'gpu_check.py'
  spec = importlib.util.spec_from_file_location('gpu_check', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_a_failing_step_is_reported_and_the_later_steps_still_run(tmp_path, monkeypatch):
  gpu_check = _gpu_check_module()
  ran = []

  def fails(run, *args):
    raise RuntimeError('Unknown flag xla_disable_hlo_passes\nsecond line')

  monkeypatch.setattr(gpu_check, 'versions', lambda run: 'gpu')
  monkeypatch.setattr(gpu_check, 'fused_against_unfused', lambda run, names: ran.append(1))
  monkeypatch.setattr(gpu_check, 'all_levers', fails)
  monkeypatch.setattr(gpu_check, 'raised_bars', lambda run: ran.append(3))
  monkeypatch.setattr(gpu_check, 'end_to_end', lambda run: ran.append(4))
  assert gpu_check.main(['--out', str(tmp_path), '--budget', '600']) == 0
  assert ran == [1, 3, 4]
  summary = (tmp_path / 'summary.md').read_text()
  assert 'fails failed: RuntimeError: Unknown flag xla_disable_hlo_passes (errors.txt)' in summary
  assert 'second line' in (tmp_path / 'errors.txt').read_text()


def test_without_a_gpu_it_stops_before_timing_anything(tmp_path, monkeypatch):
  gpu_check = _gpu_check_module()
  monkeypatch.setattr(gpu_check, 'versions', lambda run: 'cpu')
  monkeypatch.setattr(gpu_check, 'fused_against_unfused', lambda *args: pytest.fail('timed'))
  assert gpu_check.main(['--out', str(tmp_path)]) == 1
  assert 'No GPU: JAX runs on the CPU here' in (tmp_path / 'summary.md').read_text()


def test_each_step_gets_its_share_of_the_budget(tmp_path):
  """A step that overruns its share leaves the later ones theirs."""
  gpu_check = _gpu_check_module()
  run = gpu_check.Run(tmp_path, budget=100, smoke=True)
  run.until(0.35)
  assert 34 < run.step_left() <= 35
  run.start, run.deadline = run.start - 50, run.deadline - 50  # The first step took 50 s.
  run.until(0.55)
  assert 4 < run.step_left() <= 5  # The second keeps what is left of its own share...
  run.until(1.0)
  assert 49 < run.step_left() <= 50 and run.left() <= 50  # ...and the last all the rest.

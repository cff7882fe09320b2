"""The benchmark suite measures what it says: FLOP counts, PyTorch parity, tables and plot.

Timings are never asserted (this machine is shared and noisy); what is checked
is that the figures are computed from the right quantities.
"""

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import repvgg_jax
from repvgg_jax import jsonfiles, perf
from repvgg_jax.bench import cli as bench
from repvgg_jax.bench import deploy as bench_deploy
from repvgg_jax.bench import input as bench_input
from repvgg_jax.bench import models as bench_models
from repvgg_jax.bench import report as bench_report
from repvgg_jax.bench import suite as bench_suite
from repvgg_jax.bench import timing as bench_timing

# A0 with one block per stage at quarter width: compiles in seconds.
TINY = dataclasses.replace(
  repvgg_jax.get_variant('A0'), num_blocks=(1, 1, 2, 1), width_multipliers=(0.25, 0.25)
)


@pytest.mark.parametrize('name, deploy_macs', [('A0', 1_361_451_008), ('B0', 3_057_600_512)])
def test_macs_match_the_paper(name, deploy_macs):
  """SPEC: A0 1.36 G and B0 3.06 G multiply-adds at 224; training-time about 11% more."""
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  macs = {}
  for deploy in (False, True):
    for impl in ('xla', 'im2col'):
      model = repvgg_jax.create_model(name, deploy=deploy, conv=perf.conv_layer(impl, train=False))
      variables = jax.eval_shape(model.init, jax.random.key(0), images)
      macs[deploy, impl] = bench_timing.count_macs(
        lambda v, x, m=model: m.apply(v, x, train=False), variables, images
      )
  assert macs[True, 'xla'] == macs[True, 'im2col'] == deploy_macs
  assert macs[False, 'xla'] == macs[False, 'im2col']
  assert 1.10 < macs[False, 'xla'] / deploy_macs < 1.12


def test_interleaved_medians_alternate_the_functions():
  calls = []
  medians = bench_timing.interleaved_medians(
    {'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')}, runs=3, warmup=1
  )
  assert calls == ['a', 'b'] * 4
  assert set(medians) == {'a', 'b'} and all(len(times) == 3 for _, times in medians.values())


def test_randomized_statistics_are_not_fresh():
  model = repvgg_jax.create_model(TINY, num_classes=10)
  variables = bench_models.randomized_variables(model, jnp.zeros((1, 16, 16, 3)))
  stats = jax.tree_util.tree_flatten_with_path(variables['batch_stats'])[0]
  for path, leaf in stats:
    if path[-1].key == 'var':
      assert 0.5 <= float(leaf.min()) and float(leaf.max()) <= 2.0 and float(leaf.std()) > 0.1
    else:
      assert float(jnp.abs(leaf).max()) > 0.01


def test_inference_bench_checks_pytorch_then_times_both(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'rows.jsonl'
  row = bench_models.benchmark(TINY, batch=2, size=16, runs=1, warmup=0, with_torch=True)
  assert row['kind'] == 'infer' and row['conv_impl'] == 'auto'
  for key, deploy in (('train', False), ('deploy', True)):
    model = repvgg_jax.create_model(TINY, deploy=deploy)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    assert row[key]['params'] == sum(leaf.size for leaf in jax.tree.leaves(shapes['params']))
  layouts = {(r['model'], r['layout']) for r in row['torch'].values()}
  assert layouts == {(m, lay) for m in ('train', 'deploy') for lay in ('nchw', 'channels_last')}
  assert all(r['logit_rel_error'] <= 1e-5 for r in row['torch'].values())
  assert row['jax_over_torch']['deploy'] == pytest.approx(
    row['deploy']['images_per_sec']
    / max(r['images_per_sec'] for r in row['torch'].values() if r['model'] == 'deploy')
  )
  seconds = row['deploy']['seconds_per_batch']
  macs = row['deploy']['macs_per_image']
  assert row['deploy']['gflops_per_sec'] == pytest.approx(2 * macs * 2 / seconds / 1e9)
  assert 'JAX / PyTorch, fused' in bench_report.format_infer(row)
  jsonfiles.append_jsonl(out, row)
  assert jsonfiles.read_jsonl(out) == [json.loads(json.dumps(row))]


def test_pytorch_that_disagrees_is_refused():
  pytest.importorskip('torch')
  from repvgg_jax.bench import torch_side as bench_torch

  model = repvgg_jax.create_model('A0', num_classes=10, deploy=True)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init(jax.random.key(1), images)
  torch_model = bench_torch.torch_model('A0', variables, 10, deploy=True)
  logits = np.asarray(model.apply(variables, images))
  assert bench_torch.check_logits(torch_model, images, logits) <= 1e-5
  with pytest.raises(bench_torch.LogitMismatchError, match='not the same'):
    bench_torch.check_logits(torch_model, images, logits * 1.01)


def test_pytorch_runs_where_jax_does_and_is_checked_in_true_float32():
  torch = pytest.importorskip('torch')
  from repvgg_jax.bench import torch_side as bench_torch

  assert bench_torch.torch_device().type == ('cuda' if jax.default_backend() == 'gpu' else 'cpu')
  before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
  torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
  try:
    with bench_torch.exact_float32():
      assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
      assert jax.config.jax_default_matmul_precision == 'highest'
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert jax.config.jax_default_matmul_precision is None
  finally:
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
  row = {'torch': {'t': {'model': 'deploy', 'layout': 'nchw', 'images_per_sec': 1.0}}}
  row.update(_infer_row('RepVGG-A0', 8.3e6, 100.0, 50.0))
  assert 'PyTorch fused nchw    ' in bench_report.format_infer(row)
  row['torch']['t']['device'] = 'cuda'
  assert 'PyTorch fused nchw (cuda)' in bench_report.format_infer(row)


def test_train_step_bench_over_devices_and_pytorch():
  pytest.importorskip('torch')
  row = bench_models.benchmark_train_step(
    TINY, batch=4, size=16, runs=1, warmup=0, num_classes=10, with_torch=True, peak_gflops=100.0
  )
  assert row['kind'] == 'train' and row['num_devices'] == jax.device_count()
  assert row['jax']['images_per_sec'] > 0 and row['jax']['roofline_share'] > 0
  assert set(row['torch']) == {'torch_nchw', 'torch_channels_last'}
  assert all(r['logit_rel_error'] <= 1e-5 for r in row['torch'].values())
  best = max(r['images_per_sec'] for r in row['torch'].values())
  assert row['jax_over_torch']['train_step'] == row['jax']['images_per_sec'] / best
  assert 'training step' in bench_report.format_train(row)


def test_train_step_bench_with_several_steps_per_call():
  row = bench_models.benchmark_train_step(
    TINY, batch=4, size=16, runs=1, warmup=0, num_classes=10, steps_per_call=3
  )
  assert row['steps_per_call'] == 3 and len(row['jax']['all_seconds']) == 1
  assert row['jax']['images_per_sec'] > 0 and row['jax_single']['images_per_sec'] > 0
  table = bench_report.format_train(row)
  assert 'JAX, 3 steps per call' in table and 'JAX, 1 step per call' in table
  with pytest.raises(ValueError, match='--steps-per-call 1 or --conv-impl im2col'):
    bench_models.benchmark_train_step(TINY, batch=4, size=16, conv_impl='xla', steps_per_call=2)


def test_train_step_bench_with_frozen_stages(capsys):
  row = bench_models.benchmark_train_step(
    TINY, batch=4, size=16, runs=1, warmup=0, num_classes=10, freeze_stages=2
  )
  assert row['freeze_stages'] == 2 and row['jax']['images_per_sec'] > 0
  assert 'training step, stages 0-1 frozen' in bench_report.format_train(row)
  refused = [(['--freeze-stages', '6'], '--freeze-stages must be from 0 to 5')]
  if importlib.util.find_spec('torch'):
    refused.append((['--freeze-stages', '1', '--torch'], 'leave out --freeze-stages'))
  for args, message in refused:
    with pytest.raises(SystemExit):
      bench.main(['train', '--model', 'A0', *args])
    assert message in capsys.readouterr().err


def test_roofline_and_layers_report_positive_figures(tmp_path):
  assert bench.main(['roofline', '--json', str(tmp_path / 'roof.jsonl')]) == 0
  (roof,) = jsonfiles.read_jsonl(tmp_path / 'roof.jsonl')
  assert roof['matmul_gflops_per_sec'] > 0 and roof['conv_gflops_per_sec'] > 0
  assert bench_timing.peak_of(roof) == roof['matmul_gflops_per_sec']  # On CPU.
  if importlib.util.find_spec('torch'):
    assert roof['torch_matmul_gflops_per_sec'] > 0
    assert "PyTorch's matmul" in bench_report.format_roofline(roof)
  rows = bench_timing.benchmark_layers(TINY, batch=1, size=16, train=True, runs=1, warmup=0)
  # Stride-2 blocks 16->8->4->2->1->1 and stage 3's second block at 1x1.
  assert [(r['side'], r['stride']) for r in rows] == [
    (16, 2),
    (8, 2),
    (4, 2),
    (2, 2),
    (1, 1),
    (1, 2),
  ]
  # Every map is 8x8 or smaller; in training, dense takes the 2x2 and 1x1 inputs.
  assert [r['auto'] for r in rows] == ['im2col'] * 3 + ['dense'] * 3
  # Winograd computes, and is timed on, the stride-1 layer only; dense the small inputs.
  assert [r['winograd_ms'] is not None for r in rows] == [r['stride'] == 1 for r in rows]
  assert [r['dense_ms'] is not None for r in rows] == [r['side'] <= 2 for r in rows]
  assert all(r['faster'] in ('xla', 'im2col', 'winograd', 'dense') for r in rows)
  assert 'dense ms' in bench_report.format_layers(rows)


def _infer_row(name, params, fused, unfused):
  timing = lambda ips: {
    'images_per_sec': ips,
    'seconds_per_batch': 8 / ips,
    'gflops_per_sec': 1.0,
    'roofline_share': 0.5,
    'temp_bytes': 2**20,
    'params': params,
  }
  return {
    'kind': 'infer',
    'model': name,
    'batch': 8,
    'size': 224,
    'dtype': 'float32',
    'conv_impl': 'auto',
    'backend': 'cpu',
    'device': 'cpu',
    'num_devices': 1,
    'runs': 3,
    'train': timing(unfused),
    'deploy': timing(fused),
    'speedup': fused / unfused,
  }


def test_markdown_and_figure1(tmp_path):
  rows = [_infer_row('RepVGG-A0', 8.3e6, 100.0, 50.0), _infer_row('RepVGG-B0', 14.3e6, 40.0, 20.0)]
  table = bench_report.markdown(rows)
  assert '| RepVGG-A0 | 8 | 224 | float32 | 50.0 | 100.0 | 2.00x |' in table
  path = bench_report.plot_figure1(rows, tmp_path / 'figure1.png')
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(ValueError, match='No inference rows'):
    bench_report.plot_figure1([], tmp_path / 'empty.png')
  jsonl = tmp_path / 'rows.jsonl'
  for row in rows:
    jsonfiles.append_jsonl(jsonl, row)
  assert jsonfiles.read_jsonl(jsonl) == json.loads(json.dumps(rows))


def test_the_roofline_times_pytorch_only_where_asked(monkeypatch):
  cpu_row = {'backend': 'cpu', 'dtype': 'float32', 'matmul_by_size': {'8': 1.0}}
  monkeypatch.setattr(bench_timing, 'roofline', lambda dtype, runs: dict(cpu_row))
  assert 'torch_matmul_gflops_per_sec' not in bench_suite.roofline(with_torch=False)
  if importlib.util.find_spec('torch') is not None:
    assert bench_suite.roofline(with_torch=True, runs=1)['torch_matmul_gflops_per_sec'] > 0


def test_suite_plans_and_writes_its_tables(tmp_path, monkeypatch):
  infers, trains = bench_suite.suite_plan(on_cpu=False)  # The GPU plan: the figures.
  assert ('A0', 256, 224, 'float32') in infers and ('B0', 256, 224, 'bfloat16') in infers
  assert ('B0', 256, 224, 1000, 'bfloat16', ()) in trains
  fake_roofline = {
    'kind': 'roofline',
    'dtype': 'float32',
    'backend': 'cpu',
    'device': 'cpu',
    'matmul_gflops_per_sec': 100.0,
    'matmul_by_size': {'8': 100.0},
    'conv_gflops_per_sec': 50.0,
    'conv_shape': [1, 8, 8, 8],
  }
  asked = []
  monkeypatch.setattr(
    bench_suite, 'roofline', lambda dtype, with_torch: asked.append(with_torch) or fake_roofline
  )
  plan = [(TINY, 2, 16, 'float32')], [(TINY, 4, 16, 10, 'float32', ('nchw',))]
  monkeypatch.setattr(bench_suite, 'suite_plan', lambda on_cpu: plan)
  with_torch = importlib.util.find_spec('torch') is not None
  # An earlier run's files stay whole and untouched while a run that fails midway
  # leaves its rows so far aside.
  earlier = {name: f'earlier {name}\n' for name in bench_suite.SUITE_FILES}
  for name, text in earlier.items():
    (tmp_path / name).write_text(text)

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  with monkeypatch.context() as patch:
    patch.setattr(bench_suite, 'benchmark_train_step', interrupted)
    with pytest.raises(KeyboardInterrupt):
      bench_suite.run_suite(tmp_path, 1, 0, 2, 16, [TINY], with_torch)
  assert {name: (tmp_path / name).read_text() for name in earlier} == earlier
  partial = jsonfiles.read_jsonl(tmp_path / bench_suite.SUITE_STAGING / 'results.jsonl')
  assert [r['kind'] for r in partial] == ['roofline', 'infer']
  bench_suite.run_suite(tmp_path, 1, 0, 2, 16, [TINY], with_torch)
  assert not (tmp_path / bench_suite.SUITE_STAGING).exists()
  assert asked == [with_torch, with_torch]
  rows = jsonfiles.read_jsonl(tmp_path / 'results.jsonl')
  assert [r['kind'] for r in rows] == ['roofline', 'infer', 'train']
  infer, train = rows[1], rows[2]
  assert infer['deploy']['roofline_share'] == pytest.approx(infer['deploy']['gflops_per_sec'] / 100)
  assert train['jax']['roofline_share'] == pytest.approx(train['jax']['gflops_per_sec'] / 100)
  assert ('torch' in infer) == with_torch and ('torch' in train) == with_torch
  [figure_row] = jsonfiles.read_jsonl(tmp_path / 'figure1.jsonl')
  assert figure_row['batch'] == 2 and figure_row['size'] == 16
  table = (tmp_path / 'results.md').read_text()
  assert (
    '| RepVGG-A0 | 2 | 16 | float32 |' in table
    and f'| RepVGG-A0 | 4 | 16 | float32 | {jax.device_count()} |' in table
  )
  assert (tmp_path / 'figure1.png').read_bytes()[:4] == b'\x89PNG'


def test_deploy_bench_checks_every_runtime_then_times_it():
  with_torch = importlib.util.find_spec('torch') is not None
  rows = bench_deploy.benchmark_deploy(
    TINY, batches=(1, 3), size=32, runs=1, warmup=0, with_torch=with_torch
  )
  runtimes = {'jax', 'jax_cpu_kernels', 'onnxruntime', 'tf_saved_model'}
  runtimes |= {'torch_nchw', 'torch_channels_last'} if with_torch else set()
  assert {(r['runtime'], r['batch']) for r in rows} == {(k, b) for k in runtimes for b in (1, 3)}
  assert all(row['images_per_sec'] > 0 for row in rows)
  table = bench_deploy.format_deploy(rows)
  assert '| runtime | batch 1 | batch 3 | logit error vs JAX |' in table
  assert all(f'| {runtime} |' in table for runtime in runtimes)


def test_deploy_bench_times_int8_and_reports_its_error():
  rows = bench_deploy.benchmark_deploy(
    TINY, batches=(2,), size=32, runs=1, warmup=0, with_torch=False, int8=True
  )
  errors = {row['runtime']: row['relative_logit_error'] for row in rows}
  assert {'jax_int8_static', 'jax_int8_dynamic'} <= set(errors)
  # Quantized, so not equal to JAX's float32 logits, yet close.
  assert 0 < errors['jax_int8_static'] < 0.5 and 0 < errors['jax_int8_dynamic'] < 0.5
  assert errors['onnxruntime'] <= bench_deploy.TOLERANCE


def test_deploy_bench_refuses_a_runtime_that_computes_something_else(monkeypatch):
  build = bench_deploy._runtimes

  def with_a_wrong_runtime(*args):
    runtimes = build(*args)
    prepare, run = runtimes['onnxruntime']
    runtimes['onnxruntime'] = (prepare, lambda x: 1.01 * run(x))
    return runtimes

  monkeypatch.setattr(bench_deploy, '_runtimes', with_a_wrong_runtime)
  with pytest.raises(bench_deploy.RuntimeMismatchError, match="'onnxruntime': 0.01"):
    bench_deploy.benchmark_deploy(TINY, batches=(2,), size=32, runs=1, warmup=0, with_torch=False)


def test_input_bench_times_each_form_on_one_and_all_cores():
  jpegs = bench_input.make_jpegs(3)
  shapes = [tuple(tf.image.extract_jpeg_shape(j).numpy()) for j in jpegs]
  assert all(300 <= h <= 480 and 400 <= w <= 640 and c == 3 for h, w, c in shapes)
  # The fused decoder reads the same window: the same crop up to JPEG's rounding.
  seed = tf.constant([7, 0], tf.int64)
  for jpeg in jpegs:
    whole = bench_input._preprocess('decode_then_crop', 32)(jpeg, seed).numpy()
    window = bench_input._preprocess('decode_and_crop', 32)(jpeg, seed).numpy()
    assert whole.shape == window.shape == (32, 32, 3)
    assert np.mean(np.abs(whole - window)) < 0.05  # Normalized units: about 3 of 255 levels.
  rows = bench_input.benchmark_input(count=8, image_size=32, repeats=1, gpu_rate=1000)
  threads = sorted({1, os.cpu_count()})
  assert [(r['form'], r['threads']) for r in rows] == [
    (form, t) for form in bench_input.FORMS for t in threads
  ]
  for row in rows:
    assert row['images_per_sec_per_core'] == pytest.approx(row['images_per_sec'] / row['threads'])
    assert row['cores_per_gpu'] == pytest.approx(1000 / row['images_per_sec_per_core'])
  assert '| decode_and_crop_no_antialias | 1 |' in bench_input.format_input(rows)


def test_unknown_model_and_bad_sizes_are_refused(capsys):
  with pytest.raises(SystemExit):
    bench.main(['train', '--model', 'C9'])
  assert 'C9' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    bench.main(['--batch', '0'])
  assert 'must be positive' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    bench.main(['deploy', '--batches', '1,0'])
  assert "'1,0': give positive batch sizes" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    bench.main(['train', '--torch-layouts', 'nhwc'])
  assert "unknown layout(s) ['nhwc']" in capsys.readouterr().err


@pytest.mark.parametrize(
  ('args', 'message'),
  [
    (['layers', '--dtype', 'bfloat16'], 'unrecognized arguments: --dtype bfloat16'),
    (['train', '--num-classes', '0'], '--num-classes and --steps-per-call must be positive'),
    (['train', '--steps-per-call', '0'], '--num-classes and --steps-per-call must be positive'),
    (['train', '--bn-group-size', '-5'], '--bn-group-size >= 0'),
    (['train', '--batch', '4', '--bn-group-size', '3'], 'does not split into BatchNorm groups'),
    (['suite', '--runs', '0', '--models', 'A0'], '--figure-size and --figure-batch must be'),
    (['suite', '--figure-batch', '0', '--models', 'A0'], '--figure-size and --figure-batch'),
    (['--json', '/nonexistent/dir/rows.jsonl'], '--json /nonexistent/dir/rows.jsonl: no dir'),
    (['roofline', '--json', '/'], '--json / is a directory: give a file in it'),
    (['suite', '--out', __file__, '--models', 'A0'], 'is a file: give a directory'),
    (['infer', '--warmup', '-1'], '--warmup must be 0 or more'),
    (['deploy', '--warmup', '-1'], '--warmup must be 0 or more'),
    (  # XLA's convolutions in a multi-step call on a CPU, refused as the trainer does.
      ['train', '--batch', '1', '--size', '224', '--steps-per-call', '2', '--no-torch'],
      'use --steps-per-call 1 or --conv-impl im2col',
    ),
  ],
)
def test_settings_that_cannot_run_are_refused_in_one_line(args, message, capsys):
  with pytest.raises(SystemExit) as exit_:
    bench.main(args)
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert message in err and err.startswith('usage: python -m repvgg_jax.bench'), err


@pytest.mark.skipif(importlib.util.find_spec('torch') is None, reason='needs torch')
def test_pytorch_is_compared_in_float32_only(capsys):
  with pytest.raises(SystemExit):
    bench.main(['--dtype', 'bfloat16', '--torch'])
  assert 'the PyTorch reference runs float32 only, not bfloat16' in capsys.readouterr().err
  with pytest.raises(SystemExit):  # It crashes the process on CPUs at 224.
    bench.main(['train', '--size', '224', '--torch', '--torch-layouts', 'channels_last'])
  assert 'use --torch-layouts nchw at 224' in capsys.readouterr().err


def test_help_lists_the_subcommands(capsys):
  with pytest.raises(SystemExit) as exit_:
    bench.main(['--help'])
  assert exit_.value.code == 0
  help_text = capsys.readouterr().out
  for command in ('infer', 'train', 'roofline', 'layers', 'deploy', 'input', 'suite'):
    assert command in help_text

"""The branch-set ablation runner: reports, resumption, refusals and clear errors."""

import csv
import dataclasses
import importlib
import json
import math
import pathlib
import re
import shutil

import ml_collections
import pytest
from helpers import CLASSES, apply_overrides, make_folder, run_in_repo, tiny_config

from repvgg_jax import checkpointing
from repvgg_jax.ablate import measure, stats
from repvgg_jax.ablate import report as ablation_report
from repvgg_jax.ablate import rows as ablation_rows
from repvgg_jax.ablate import runner as ablate
from repvgg_jax.interop import quantize_checkpoint
from repvgg_jax.model import branches
from repvgg_jax.train import trainer

REPO = pathlib.Path(__file__).resolve().parent.parent
SETS = {
  'none': ('conv3x3',),
  'identity': ('conv3x3', 'identity'),
  'paper': branches.PAPER_BRANCHES,
}
NUM_EVAL = 360  # Digits test split.
INT8 = {'ablation.int8_calibration_batches': 1}
# The tests of the `finished` ablation share one xdist worker (--dist loadgroup in
# pyproject.toml), and with it one ablation; the others go to whichever worker is free.
shares_the_ablation = pytest.mark.xdist_group('ablation')


def ablation_config(data_dir, sets=None, **overrides):
  """tiny_config (with a second stage-1 block, so the identity applies) and an ablation."""
  config = tiny_config(
    data_dir, num_train_steps=3, checkpoint_every_steps=2, **{'model.num_blocks': (2, 1, 1, 1)}
  )
  config.ablation = ml_collections.ConfigDict()
  config.ablation.branch_sets = ml_collections.ConfigDict(
    SETS if sets is None else sets, sort_keys=False
  )
  config.ablation.only = ''
  config.ablation.bench_batch_size = 40
  config.ablation.bench_image_size = 0
  config.ablation.bench_runs = 1
  config.ablation.bench_warmup = 0
  config.ablation.seeds = 2
  config.ablation.reference = 'paper'
  return apply_overrides(config, overrides)


@dataclasses.dataclass
class Finished:
  workdir: pathlib.Path
  markdown: str
  first_lines: list[str]  # Progress of the first run, which crashed in 'identity'.
  lines: list[str]  # Progress of the run that finished the ablation.
  trained: list[str]  # Runs (row/seed) that the second run trained.
  first_none: dict  # The record of 'none' after the first run.


class Crash(Exception):
  """Stands for a machine failure."""


@pytest.fixture(scope='module')
def finished(tmp_path_factory, digits_dir):
  """An ablation with two seeds that crashed in its second run, then was run again to the end.

  The first run finishes 'none' with seed 0 and crashes in 'identity' with seed 0
  after the checkpoint of step 2 (of 3). The second run, with the int8 column on,
  only quantizes 'none', continues 'identity' from step 2 and trains the rest:
  'paper', then all three with seed 1.
  """
  workdir = tmp_path_factory.mktemp('ablation')
  first_lines, lines, trained = [], [], []
  save = checkpointing.Checkpoints.save

  def save_then_crash(ckpt, step, *args):
    save(ckpt, step, *args)
    run = ckpt.directory.parent
    if (run.parent.name, run.name, step) == ('identity', 'seed0', 2):
      ckpt.wait()
      raise Crash

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpointing.Checkpoints, 'save', save_then_crash)
    with pytest.raises(Crash):
      ablate.run_ablation(ablation_config(digits_dir), workdir, log=first_lines.append)
  first_none = json.loads((workdir / 'none' / 'seed0' / ablate.ROW_FILE).read_text())
  train = trainer.train_and_evaluate

  def record_training(config, run):
    trained.append(f'{run.parent.name}/{run.name}')
    return train(config, run)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(trainer, 'train_and_evaluate', record_training)
    config = ablation_config(digits_dir, **INT8, **{'ablation.bench_runs': 3})
    text = ablate.run_ablation(config, workdir, log=lines.append)
  return Finished(workdir, text, first_lines, lines, trained, first_none)


def records(workdir, names=SETS, seeds=(0, 1)):
  return {
    name: [json.loads((workdir / name / f'seed{s}' / ablate.ROW_FILE).read_text()) for s in seeds]
    for name in names
  }


@pytest.fixture
def no_training(monkeypatch):
  """Makes any training or measurement of a run fail the test."""

  def fail(*args, **kwargs):
    raise AssertionError('trained or measured a run that should have been reused')

  monkeypatch.setattr(trainer, 'train_and_evaluate', fail)
  monkeypatch.setattr(measure, 'logit_error', fail)


def table_rows(markdown):
  return [line.split(' | ') for line in markdown.splitlines() if line.startswith('| ')][1:]


@shares_the_ablation
def test_reports_have_one_row_per_branch_set_and_every_seed_in_the_csv(finished):
  workdir, text = finished.workdir, finished.markdown
  assert text == (workdir / 'ablation.md').read_text()
  rows = table_rows(text)
  assert [row[0].strip('| ') for row in rows] == list(SETS)
  assert rows[2][1] == 'conv3x3+conv1x1+identity' and rows[2][8] == 'reference'
  assert all(' ± ' in row[5] and ' ± ' in row[6] and ' ± ' in row[7] for row in rows)
  assert '| top-1 int8 (%) | fused top-1 minus paper (pp) |' in text.splitlines()[4]
  assert "on sklearn_digits (train split 'train', eval split 'test'), 3 training steps" in text
  assert 'at a peak learning rate of 0.05 per 256 images, seeds 0, 1;' in text
  with open(workdir / 'ablation.csv') as f:
    lines = list(csv.reader(f))
  assert tuple(lines[0]) == ablation_report.CSV_COLUMNS
  assert [(line[0], line[2]) for line in lines[1:]] == [(n, s) for n in SETS for s in ('0', '1')]
  png = (workdir / 'ablation.png').read_bytes()
  assert png.startswith(b'\x89PNG') and len(png) > 10_000


@shares_the_ablation
def test_the_table_is_the_mean_interval_and_paired_difference_of_the_seeds(finished):
  runs = records(finished.workdir)
  rows = {row[0].strip('| '): row for row in table_rows(finished.markdown)}
  t = 12.706204736  # Student t, 97.5% quantile, 1 degree of freedom (two seeds).
  for name, (a, b) in runs.items():
    values = [100 * a['top1_fused'], 100 * b['top1_fused']]
    mean, half = sum(values) / 2, t * abs(values[0] - values[1]) / 2
    assert rows[name][6] == f'{mean:.2f} ± {half:.2f}'
    if name != 'paper':
      paper = [100 * r['top1_fused'] for r in runs['paper']]
      differences = [values[0] - paper[0], values[1] - paper[1]]
      d_mean, d_half = sum(differences) / 2, t * abs(differences[0] - differences[1]) / 2
      cell = f'{d_mean:+.2f} ± {d_half:.2f}'
      assert rows[name][8] == (f'**{cell}**' if abs(d_mean) > d_half else cell)


@shares_the_ablation
def test_fused_model_matches_and_only_training_time_params_differ(finished):
  runs = records(finished.workdir)
  for name in SETS:
    for run in runs[name]:
      assert abs(run['top1'] - run['top1_fused']) <= 1 / NUM_EVAL
      assert run['logit_rel_error'] < 1e-5
      assert run['summary']['steps'] == 3
  assert runs['none'][0]['seed'] == 0 and runs['none'][1]['seed'] == 1
  assert runs['none'][0]['summary'] != runs['none'][1]['summary']  # Other seed, other run.
  assert len({runs[name][0]['deploy_params'] for name in SETS}) == 1
  train_params = [runs[name][0]['train_params'] for name in SETS]
  assert train_params[0] < train_params[1] < train_params[2]
  assert train_params[0] > runs['none'][0]['deploy_params']  # BatchNorm scales and offsets.


@shares_the_ablation
def test_speeds_come_from_one_round_robin_loop(finished):
  for row in table_rows(finished.markdown):
    for cell in (row[10], row[11]):
      median, q1, q3 = (float(v.replace(',', '')) for v in re.findall(r'[\d,]+', cell))
      assert 0 < q1 <= median <= q3
    assert float(row[12].strip(' |x')) > 0
  assert finished.lines[-1].startswith('Timing the rows round robin (3 rounds')


@shares_the_ablation
def test_interrupted_ablation_continues_where_it_stopped(finished):
  assert [line.split(':')[0] for line in finished.first_lines] == [
    '[1/6] none, seed 0',
    '[1/6] none, seed 0',
    '[2/6] identity, seed 0',
  ]
  assert finished.trained == [
    'identity/seed0',
    'paper/seed0',
    'none/seed1',
    'identity/seed1',
    'paper/seed1',
  ]
  lines = finished.lines
  assert lines[0].startswith('[1/6] none, seed 0: done before, int8 top-1 added')
  assert (
    lines[1].startswith('[2/6] identity, seed 0') and 'continuing from its checkpoint' in lines[1]
  )
  assert lines[3].startswith('[3/6] paper, seed 0') and 'continuing' not in lines[3]
  rows = records(finished.workdir)
  assert rows['none'][0]['train_seconds'] == finished.first_none['train_seconds']
  # 'identity' logged step 2 before the crash, then only step 3.
  metrics = (finished.workdir / 'identity' / 'seed0' / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(line)['step'] for line in metrics if 'train/loss' in line] == [2, 3]


def without_speed_columns(markdown):
  return [line.split(' | ')[:9] for line in markdown.splitlines()]


@shares_the_ablation
def test_rerun_skips_finished_runs(finished, digits_dir, no_training):
  workdir = finished.workdir
  paths = [workdir / name / f'seed{s}' / ablate.ROW_FILE for name in SETS for s in (0, 1)]
  before = [p.stat().st_mtime_ns for p in paths]
  lines = []
  # Logging and checkpoint intervals do not change a run's results.
  config = ablation_config(
    digits_dir,
    log_every_steps=1,
    checkpoint_every_steps=1,
    **INT8,
    **{'ablation.bench_runs': 3},
  )
  markdown = ablate.run_ablation(config, workdir, log=lines.append)
  # Only the speeds, timed anew on every run, may differ.
  assert without_speed_columns(markdown) == without_speed_columns(finished.markdown)
  assert [p.stat().st_mtime_ns for p in paths] == before
  assert len(lines) == 7 and all('done before, skipped' in line for line in lines[:6])
  assert all(', int8 ' in line for line in lines[:6])


@shares_the_ablation
def test_int8_top1_is_in_every_record_as_the_quantize_command_measures_it(finished, tmp_path):
  runs = records(finished.workdir)
  assert all(run['int8_calibration_batches'] == 1 for name in SETS for run in runs[name])
  # 'none' seed 0 finished before the int8 column was asked for, and got it added.
  none = runs['none'][0]
  assert {k: v for k, v in none.items() if 'int8' not in k} == finished.first_none
  for name, seed in (('none', 0), ('paper', 1)):
    meta = quantize_checkpoint.quantize_checkpoint(
      finished.workdir / name / f'seed{seed}', tmp_path / f'{name}{seed}', calibration_batches=1
    )
    assert runs[name][seed]['top1_int8'] == meta['int8_top1']
    assert runs[name][seed]['int8_logit_rel_error'] == meta['logit_relative_error']
    assert meta['fp32_top1'] == runs[name][seed]['top1_fused']
  rows = {row[0].strip('| '): row for row in table_rows(finished.markdown)}
  for name, (a, b) in runs.items():
    mean = 50 * (a['top1_int8'] + b['top1_int8'])
    assert rows[name][7].startswith(f'{mean:.2f} ± ')
  assert 'calibrated on 1 training batches' in finished.markdown
  with open(finished.workdir / 'ablation.csv') as f:
    cells = [float(line['top-1 int8 (%)']) for line in csv.DictReader(f)]
  assert cells == [100 * run['top1_int8'] for name in SETS for run in runs[name]]


@shares_the_ablation
def test_another_int8_calibration_requantizes_and_none_leaves_the_column_out(
  finished, digits_dir, tmp_path, no_training
):
  workdir = tmp_path / 'ablation'
  shutil.copytree(finished.workdir, workdir)
  lines = []
  config = ablation_config(digits_dir, **{'ablation.int8_calibration_batches': 2})
  markdown = ablate.run_ablation(config, workdir, log=lines.append)
  assert all('done before, int8 top-1 added' in line for line in lines[:6])
  assert all(run['int8_calibration_batches'] == 2 for r in records(workdir).values() for run in r)
  assert 'calibrated on 2 training batches' in markdown
  before = records(workdir)
  lines = []
  markdown = ablate.run_ablation(ablation_config(digits_dir), workdir, log=lines.append)
  assert 'int8' not in markdown  # Not asked for: not reported, and kept in the records.
  assert lines and not [line for line in lines if ', int8 ' in line]
  assert len(table_rows(markdown)[0]) == len(ablation_report.COLUMNS) - 1
  with open(workdir / 'ablation.csv') as f:
    assert {line['top-1 int8 (%)'] for line in csv.DictReader(f)} == {''}
  assert records(workdir) == before


@shares_the_ablation
def test_a_run_without_its_fused_model_fails_the_int8_evaluation_in_one_line(
  finished, digits_dir, tmp_path, no_training
):
  workdir = tmp_path / 'ablation'
  shutil.copytree(finished.workdir, workdir)
  shutil.rmtree(workdir / 'paper' / 'seed1' / 'deploy')
  config = ablation_config(digits_dir, **{'ablation.int8_calibration_batches': 2})
  with pytest.raises(ablate.AblationError, match=r'seed1: the int8 evaluation failed: No checkp'):
    ablate.run_ablation(config, workdir, log=lambda line: None)


@shares_the_ablation
def test_only_some_rows_leave_the_difference_out_without_the_reference(finished, digits_dir):
  workdir = finished.workdir
  config = ablation_config(digits_dir, **{'ablation.only': 'none,identity'})
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(trainer, 'train_and_evaluate', lambda *a: pytest.fail('trained'))
    markdown = ablate.run_ablation(config, workdir, log=lambda line: None)
  assert [row[7] for row in table_rows(markdown)] == ['–', '–']
  assert 'int8' not in markdown  # ablation.int8_calibration_batches is 0 here.


@shares_the_ablation
@pytest.mark.parametrize(
  'change,message',
  [
    (
      {'ablation.branch_sets.identity': ('conv3x3', 'conv1x1')},
      r"(?s)Row 'identity \(seed 0\)'.*branches",
    ),
    ({'num_train_steps': 4}, r"(?s)Row 'none \(seed 0\)'.*num_train_steps: 3 -> 4"),
    ({'optimizer.learning_rate': 0.02}, r'optimizer\.learning_rate: 0\.05 -> 0\.02'),
  ],
)
def test_a_run_with_another_config_is_refused(finished, digits_dir, no_training, change, message):
  workdir = finished.workdir
  config = ablation_config(digits_dir, **{'ablation.bench_runs': 2, **change})
  with pytest.raises(ablate.AblationError, match=message) as error:
    ablate.run_ablation(config, workdir)
  assert 'Delete' in str(error.value)


def test_a_workdir_of_the_layout_without_seeds_is_refused(tmp_path, digits_dir, no_training):
  (tmp_path / 'none').mkdir()
  (tmp_path / 'none' / ablate.ROW_FILE).write_text('{}')
  with pytest.raises(ablate.AblationError, match='run by a version without seeds'):
    ablate.run_ablation(ablation_config(digits_dir), tmp_path)


@pytest.mark.parametrize(
  'sets,overrides,message',
  [
    ({'none': ('conv3x3', 'conv9x9')}, {}, r"branch_sets\.none: Unknown branch kind 'conv9x9'"),
    ({}, {}, r'ablation\.branch_sets is empty'),
    ({'none': ('conv3x3',), 'nothing': ()}, {}, r'ablation\.branch_sets\.nothing is empty'),
    ({'paper (both)': branches.PAPER_BRANCHES}, {}, 'cannot name a directory'),
    ({'none': ('identity',)}, {}, 'none of which can change the resolution'),
    (
      {'qa': 'qa-repvgg'},
      {},
      r"branch_sets\.qa is 'qa-repvgg': give a set of branch kinds or a block",
    ),
    (None, {'ablation.only': 'paper,acnet'}, r"unknown rows \['acnet'\]"),
    (None, {'model.dtype': 'float16'}, r"Row 'none': model.dtype must be"),
    (None, {'ablation.seeds': 0}, 'ablation.seeds must be a positive number of seeds, got 0'),
    ({'l2': {'optimizer': {'custom_l2': True}}}, {}, 'branch_sets.l2 is a mapping without'),
    (
      {'l2': {'branches': ('conv3x3',), 'optimizer': {'custom_l3': True}}},
      {},
      r'ablation\.branch_sets\.l2\.optimizer\.custom_l3: the training config has no such',
    ),
    (None, {'ablation.reference': 'both'}, "ablation.reference names the unknown row 'both'"),
    (None, {'model.name': 'RepVGG-Z9'}, "model.name: Unknown model name 'RepVGG-Z9'"),
    (
      {'l2': {'branches': ('conv3x3',), 'optimizer': 0.1}},
      {},
      r'ablation\.branch_sets\.l2\.optimizer: ',
    ),
    (
      {'l2': {'branches': ('conv3x3',), 'optimizer': {'custom_l2': 'yes'}}},
      {},
      r'ablation\.branch_sets\.l2\.optimizer\.custom_l2: ',
    ),
    (
      None,
      {'ablation.int8_calibration_batches': -1},
      r'ablation\.int8_calibration_batches must be a number of batches \(0: no int8',
    ),
  ],
)
def test_bad_config_fails_before_training(tmp_path, no_training, sets, overrides, message):
  config = ablation_config(str(tmp_path / 'tfds'), sets, **overrides)
  with pytest.raises(ablate.AblationError, match=message):
    ablate.run_ablation(config, tmp_path / 'work')
  assert not (tmp_path / 'work').exists()


# A config file's string, and the one-name tuple that the command line makes of it
# (--config.ablation.branch_sets.qa=qarepvgg sets a field that holds a tuple).
@pytest.mark.parametrize('kind', ['qarepvgg', ('qarepvgg',)])
def test_a_block_kind_row_trains_that_kinds_variant(tmp_path, kind):
  config = ablation_config(str(tmp_path / 'tfds'), {'paper': branches.PAPER_BRANCHES, 'qa': kind})
  rows = {name: ablate.row_config(config, row) for name, row in ablate.branch_sets(config).items()}
  assert (rows['qa'].model.name, rows['qa'].model.branches) == ('QARepVGG-A0', None)
  assert rows['paper'].model.name == 'RepVGG-A0'
  assert ablate.row_label(rows['qa']) == 'QARepVGG: conv3x3+conv1x1_identity'
  assert ablate.row_label(rows['paper']) == 'conv3x3+conv1x1+identity'
  params = {name: measure.count_params(trainer.build_model(row), 32) for name, row in rows.items()}
  assert params['qa'] < params['paper']  # No BatchNorm on the 1x1 and the identity.


def test_a_row_may_change_training_settings(tmp_path):
  row = {'branches': branches.PAPER_BRANCHES, 'optimizer': {'custom_l2': True}}
  config = ablation_config(str(tmp_path / 'tfds'), {'paper': branches.PAPER_BRANCHES, 'l2': row})
  rows = ablate.branch_sets(config)
  l2 = ablate.row_config(config, rows['l2'], 3, name='l2')
  assert l2.optimizer.custom_l2 and l2.model.branches == branches.PAPER_BRANCHES and l2.seed == 3
  assert not ablate.row_config(config, rows['paper']).optimizer.custom_l2
  settings = ablation_rows.split_row('l2', rows['l2'])[1]
  assert ablate.row_label(l2, settings) == 'conv3x3+conv1x1+identity optimizer.custom_l2=True'


def test_a_config_without_ablation_is_refused(tmp_path, no_training):
  with pytest.raises(ablate.AblationError, match='no ablation.branch_sets'):
    ablate.run_ablation(tiny_config(str(tmp_path)), tmp_path / 'work')


def test_command_line_reports_a_bad_branch_set(tmp_path):
  proc = run_in_repo(
    '-m',
    'repvgg_jax.ablate',
    '--config',
    'configs/ablation_digits.py',
    f'--workdir={tmp_path / "work"}',
    "--config.ablation.branch_sets.none=('conv9x9',)",
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Unknown branch kind 'conv9x9'" in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'work').exists()


def test_help_lists_the_flags():
  proc = run_in_repo('-m', 'repvgg_jax.ablate', '--help')
  assert proc.returncode == 0, proc.stderr[-3000:]
  for flag in ('--config', '--workdir', '--[no]reuse_host_memory'):
    assert flag in proc.stdout


@pytest.mark.parametrize(
  'name', ['ablation_digits', 'ablation_digits_hard', 'ablation_b0_imagenet']
)
def test_ablation_configs(name):
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config()
  rows = ablate.branch_sets(config)  # Every branch kind is registered.
  assert list(rows) == [
    'none',
    'identity',
    '1x1',
    'paper',
    'acnet',
    'dbb',
    'mobileone',
    'qarepvgg',
    'custom_l2',
  ]
  assert rows['paper'] == branches.PAPER_BRANCHES
  assert config.ablation.reference == 'paper'
  assert config.ablation.seeds == {'ablation_digits': 3, 'ablation_digits_hard': 5}.get(name, 1)
  assert config.ablation.int8_calibration_batches == 8
  assert f'python -m repvgg_jax.ablate --config configs/{name}.py' in module.__doc__
  assert 'ablation.md' in module.__doc__ and 'ablation.png' in module.__doc__
  if name == 'ablation_b0_imagenet':
    assert config.model.name == 'RepVGG-B0' and config.num_epochs == 120
    assert config.batch_size == 256 and config.optimizer.learning_rate == 0.1
    assert 'GPU-hours' in module.__doc__
  if name == 'ablation_digits_hard':  # The digits ablation at the paper's rate, 5 seeds.
    digits = importlib.import_module('configs.ablation_digits').get_config()
    assert digits.optimizer.learning_rate == 0.025 and config.optimizer.learning_rate == 0.1
    with digits.unlocked():
      digits.optimizer.learning_rate = 0.1
      digits.ablation.seeds = 5
    assert config.to_dict() == digits.to_dict()


def test_intervals_and_paired_differences():
  three = stats.interval([1.0, 2.0, 3.0])
  assert three.mean == 2.0 and math.isclose(three.half_width, 4.302652730 / math.sqrt(3))
  assert math.isnan(stats.interval([5.0]).half_width) and not stats.interval([5.0]).excludes_zero
  difference = stats.paired_difference({0: 3.0, 1: 4.0, 2: 9.0}, {0: 1.0, 1: 2.0, 5: 0.0})
  assert (difference.mean, difference.count) == (2.0, 2) and difference.half_width == 0.0
  assert not stats.interval([-1.0, 1.0]).excludes_zero
  assert stats.interval([1.0, 1.1, 0.9]).excludes_zero
  assert stats.quartiles([4, 1, 3, 2, 5]) == (2.0, 3.0, 4.0)
  one_seed = {'row': 'none', 'difference': stats.paired_difference({0: 97.5}, {0: 96.0})}
  assert ablation_report._difference(one_seed, 'paper') == '+1.50'  # No interval to show.


def test_an_image_folder_ablation_takes_its_classes_and_directory(tmp_path):
  """A folder config leaves dataset.num_classes None: every run is measured and saved
  with the folder's number of classes, a rerun reuses it, another folder is refused.
  A row of another width is timed with its own fused model."""
  root = make_folder(tmp_path / 'images', per_class=(6, 2))
  overrides = {
    'dataset.name': 'folder',
    'dataset.data_dir': str(root),
    'dataset.num_classes': None,
    'dataset.in_memory': False,
    'num_train_steps': 2,
    'ablation.seeds': 1,
  }
  wider = {'branches': branches.PAPER_BRANCHES, 'model': {'width_multipliers': (0.5, 0.25)}}
  sets = {'paper': branches.PAPER_BRANCHES, 'wider': wider}
  config = ablation_config(None, sets, **overrides)
  text = ablate.run_ablation(config, tmp_path / 'work', log=lambda line: None)
  assert re.search(r'\| conv3x3\+conv1x1\+identity model\.width_multipliers=.*\| [\d,.]+ ', text)
  record = json.loads((tmp_path / 'work' / 'paper' / 'seed0' / ablate.ROW_FILE).read_text())
  assert record['config']['dataset']['num_classes'] == len(CLASSES)
  assert record['logit_rel_error'] < 1e-5
  assert f'images of {root}' in text
  lines = []
  ablate.run_ablation(config, tmp_path / 'work', log=lines.append)
  assert any('paper, seed 0: done before, skipped' in line for line in lines), lines
  shutil.copytree(root, tmp_path / 'other')
  other = apply_overrides(config, {'dataset.data_dir': str(tmp_path / 'other')})
  with pytest.raises(ablate.AblationError, match=r'dataset\.data_dir: .*images -> .*other'):
    ablate.run_ablation(other, tmp_path / 'work')


@pytest.mark.parametrize(
  ('augment', 'changed'), [('inception_crop', True), ('pad_crop', False), ('none', False)]
)
def test_a_row_saved_before_the_crop_sampler_counts_as_tfs(augment, changed):
  """Rows saved before `dataset.crop_sampler` existed drew inception crops with TF's
  sampler: they differ from a torchvision run, and only where an inception crop ran."""
  current = ablation_rows.as_json(tiny_config(**{'dataset.train_augment': augment}).to_dict())
  saved = json.loads(json.dumps(current))
  del saved['dataset']['crop_sampler']
  changes = ablation_rows.config_changes(saved, current)
  assert changes == (['dataset.crop_sampler: tf -> torchvision'] if changed else [])
  saved['dataset']['crop_sampler'] = 'torchvision'
  assert ablation_rows.config_changes(saved, current) == []


def test_a_diverging_row_lets_the_others_finish_then_names_itself(tmp_path, digits_dir):
  """'wild' diverges (its training loss NaN), 'dead' too (its weights finite, its outputs
  NaN at the final evaluation): neither is saved nor blocks 'paper'."""
  rate = lambda lr: {'branches': ('conv3x3',), 'optimizer': {'learning_rate': lr}}
  sets = {'wild': rate(1e30), 'dead': rate(1e4), 'paper': branches.PAPER_BRANCHES}
  config = ablation_config(digits_dir, sets, **{'ablation.seeds': 1})
  lines = []
  message = r"'wild' \(seed 0\), 'dead' \(seed 0\) diverged; every other run is done.*only=paper\)"
  with pytest.raises(trainer.TrainingDivergedError, match=message):
    ablate.run_ablation(config, tmp_path / 'work', log=lines.append)
  # Only 'dead' kept a checkpoint (of finite weights), which a rerun would resume from.
  with pytest.raises(trainer.TrainingDivergedError, match=r"settings of 'dead', delete its dir"):
    ablate.run_ablation(config, tmp_path / 'work', log=lines.append)
  assert any(line.startswith("[1/3] wild, seed 0: Row 'wild': ") for line in lines), lines
  assert any('dead, seed 0: ' in line and 'evaluation loss is nan' in line for line in lines)
  assert (tmp_path / 'work' / 'paper' / 'seed0' / ablate.ROW_FILE).exists()
  assert not (tmp_path / 'work' / 'wild' / 'seed0' / ablate.ROW_FILE).exists()
  assert not (tmp_path / 'work' / 'ablation.md').exists()

"""The branch-set ablation runner: reports, resumption, refusals and clear errors."""

import csv
import dataclasses
import importlib
import json
import pathlib

import ml_collections
import pytest
from helpers import apply_overrides, run_in_repo, tiny_config

from repvgg_jax.ablate import report as ablation_report
from repvgg_jax.ablate import runner as ablate
from repvgg_jax.data import datasets as data
from repvgg_jax.model import branches
from repvgg_jax.train import checkpointing, trainer

REPO = pathlib.Path(__file__).resolve().parent.parent
SETS = {
  'none': ('conv3x3',),
  'identity': ('conv3x3', 'identity'),
  'paper': branches.PAPER_BRANCHES,
}
NUM_EVAL = 360  # Digits test split.
# One xdist worker runs this file (--dist loadgroup in pyproject.toml): one ablation fixture.
pytestmark = pytest.mark.xdist_group('ablation')


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
  return apply_overrides(config, overrides)


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  data.get_builder(tiny_config(data_dir).dataset)
  return data_dir


@dataclasses.dataclass
class Finished:
  workdir: pathlib.Path
  markdown: str
  first_lines: list[str]  # Progress of the first run, which crashed in 'identity'.
  lines: list[str]  # Progress of the run that finished the ablation.
  trained: list[str]  # Rows that the second run trained.
  first_none: dict  # The record of 'none' after the first run.


class Crash(Exception):
  """Stands for a machine failure."""


@pytest.fixture(scope='module')
def finished(tmp_path_factory, digits_dir):
  """An ablation that crashed in its second row, then was run again to the end.

  The first run finishes 'none' and crashes in 'identity' after the checkpoint of
  step 2 (of 3). The second run, with another benchmark setting, re-times 'none'
  without training it, continues 'identity' from step 2 and trains 'paper'.
  """
  workdir = tmp_path_factory.mktemp('ablation')
  first_lines, lines, trained = [], [], []
  save = checkpointing.Checkpoints.save

  def save_then_crash(ckpt, step, *args):
    save(ckpt, step, *args)
    if ckpt.directory.parent.name == 'identity' and step == 2:
      ckpt.wait()
      raise Crash

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpointing.Checkpoints, 'save', save_then_crash)
    with pytest.raises(Crash):
      ablate.run_ablation(ablation_config(digits_dir), workdir, log=first_lines.append)
  first_none = json.loads((workdir / 'none' / ablate.ROW_FILE).read_text())
  train = trainer.train_and_evaluate
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(trainer, 'train_and_evaluate', lambda c, w: trained.append(w.name) or train(c, w))
    config = ablation_config(digits_dir, **{'ablation.bench_runs': 2})
    text = ablate.run_ablation(config, workdir, log=lines.append)
  return Finished(workdir, text, first_lines, lines, trained, first_none)


def records(workdir, names=SETS):
  return [json.loads((workdir / name / ablate.ROW_FILE).read_text()) for name in names]


@pytest.fixture
def no_training(monkeypatch):
  """Makes any training or measurement fail the test."""

  def fail(*args, **kwargs):
    raise AssertionError('trained or measured a row that should have been reused')

  monkeypatch.setattr(trainer, 'train_and_evaluate', fail)
  monkeypatch.setattr(ablate, 'measure', fail)


def test_reports_have_one_row_per_branch_set(finished):
  workdir, text = finished.workdir, finished.markdown
  assert text == (workdir / 'ablation.md').read_text()
  table = [line for line in text.splitlines() if line.startswith('| ')]
  assert len(table) == 1 + len(SETS)
  assert [row.split(' | ')[0].strip('| ') for row in table[1:]] == list(SETS)
  assert '| paper | conv3x3+conv1x1+identity |' in text
  with open(workdir / 'ablation.csv') as f:
    rows = list(csv.reader(f))
  columns = ablation_report.COLUMNS
  assert tuple(rows[0]) == columns
  assert [row[0] for row in rows[1:]] == list(SETS)
  interleaved = [float(row[columns.index('fused img/s, rows interleaved')]) for row in rows[1:]]
  assert min(interleaved) > 0
  png = (workdir / 'ablation.png').read_bytes()
  assert png.startswith(b'\x89PNG') and len(png) > 10_000


def test_fused_model_matches_and_only_training_time_params_differ(finished):
  rows = records(finished.workdir)
  for row in rows:
    assert abs(row['top1'] - row['top1_fused']) <= 1 / NUM_EVAL
    assert row['logit_rel_error'] < 1e-5
    assert row['unfused_images_per_sec'] > 0 and row['fused_images_per_sec'] > 0
    assert row['summary']['steps'] == 3
  assert len({row['deploy_params'] for row in rows}) == 1
  train_params = [row['train_params'] for row in rows]
  assert train_params[0] < train_params[1] < train_params[2]
  assert train_params[0] > rows[0]['deploy_params']  # BatchNorm scales and offsets.


def test_interrupted_ablation_continues_where_it_stopped(finished):
  assert [line.split(':')[0] for line in finished.first_lines] == [
    '[1/3] none',
    '[1/3] none',
    '[2/3] identity',
  ]
  assert finished.trained == ['identity', 'paper']
  lines = finished.lines
  assert lines[0].startswith('[1/3] none: trained before; timing it again')
  assert lines[1].startswith('[2/3] identity') and 'continuing from its checkpoint' in lines[1]
  assert lines[3].startswith('[3/3] paper') and 'continuing' not in lines[3]
  rows = {row['row']: row for row in records(finished.workdir)}
  assert all(row['bench']['runs'] == 2 for row in rows.values())
  assert rows['none']['train_seconds'] == finished.first_none['train_seconds']
  assert finished.first_none['bench']['runs'] == 1
  # 'identity' logged step 2 before the crash, then only step 3.
  metrics = (finished.workdir / 'identity' / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(line)['step'] for line in metrics if 'train/loss' in line] == [2, 3]


def without_last_column(markdown):
  return [line.rsplit(' | ', 1)[0] for line in markdown.splitlines()]


def test_rerun_skips_finished_rows(finished, digits_dir, no_training):
  workdir = finished.workdir
  paths = [workdir / name / ablate.ROW_FILE for name in SETS]
  before = [p.stat().st_mtime_ns for p in paths]
  lines = []
  # Logging and checkpoint intervals do not change a row's results.
  config = ablation_config(
    digits_dir,
    log_every_steps=1,
    checkpoint_every_steps=1,
    **{'ablation.bench_runs': 2},
  )
  markdown = ablate.run_ablation(config, workdir, log=lines.append)
  # Only the fused models' round-robin timing, redone on every run, may differ.
  assert without_last_column(markdown) == without_last_column(finished.markdown)
  assert [p.stat().st_mtime_ns for p in paths] == before
  assert len(lines) == len(SETS) and all('done before, skipped' in line for line in lines)


@pytest.mark.parametrize(
  'change,message',
  [
    ({'ablation.branch_sets.identity': ('conv3x3', 'conv1x1')}, r"(?s)Row 'identity'.*branches"),
    ({'num_train_steps': 4}, r"(?s)Row 'none'.*num_train_steps: 3 -> 4"),
    ({'optimizer.learning_rate': 0.02}, r'optimizer\.learning_rate: 0\.05 -> 0\.02'),
  ],
)
def test_a_row_run_with_another_config_is_refused(
  finished, digits_dir, no_training, change, message
):
  workdir = finished.workdir
  config = ablation_config(digits_dir, **{'ablation.bench_runs': 2, **change})
  with pytest.raises(ablate.AblationError, match=message) as error:
    ablate.run_ablation(config, workdir)
  assert 'Delete' in str(error.value)


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
  ],
)
def test_bad_config_fails_before_training(tmp_path, no_training, sets, overrides, message):
  config = ablation_config(str(tmp_path / 'tfds'), sets, **overrides)
  with pytest.raises(ablate.AblationError, match=message):
    ablate.run_ablation(config, tmp_path / 'work')
  assert not (tmp_path / 'work').exists()


def test_a_block_kind_row_trains_that_kinds_variant(tmp_path):
  config = ablation_config(
    str(tmp_path / 'tfds'), {'paper': branches.PAPER_BRANCHES, 'qa': 'qarepvgg'}
  )
  rows = {name: ablate.row_config(config, row) for name, row in ablate.branch_sets(config).items()}
  assert (rows['qa'].model.name, rows['qa'].model.branches) == ('QARepVGG-A0', None)
  assert rows['paper'].model.name == 'RepVGG-A0'
  assert ablate.row_label(rows['qa']) == 'QARepVGG: conv3x3+conv1x1_identity'
  assert ablate.row_label(rows['paper']) == 'conv3x3+conv1x1+identity'
  params = {name: ablate.count_params(trainer.build_model(row), 32) for name, row in rows.items()}
  assert params['qa'] < params['paper']  # No BatchNorm on the 1x1 and the identity.


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


@pytest.mark.parametrize('name', ['ablation_digits', 'ablation_b0_imagenet'])
def test_ablation_configs(name):
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config()
  rows = ablate.branch_sets(config)  # Every branch kind is registered.
  assert list(rows) == ['none', 'identity', '1x1', 'paper', 'acnet', 'dbb', 'mobileone', 'qarepvgg']
  assert rows['paper'] == branches.PAPER_BRANCHES
  assert f'python -m repvgg_jax.ablate --config configs/{name}.py' in module.__doc__
  assert 'ablation.md' in module.__doc__ and 'ablation.png' in module.__doc__
  if name == 'ablation_b0_imagenet':
    assert config.model.name == 'RepVGG-B0' and config.num_epochs == 120
    assert config.batch_size == 256 and config.optimizer.learning_rate == 0.1
    assert 'GPU-hours' in module.__doc__

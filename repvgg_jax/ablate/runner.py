"""Branch-set ablation: one model per branch set and seed, trained, fused, evaluated and timed.

  python -m repvgg_jax.ablate --config configs/ablation_digits.py [--workdir DIR]

The config is a training config plus ``config.ablation``: ``branch_sets``, an
ordered mapping of row name -> branch set (it replaces ``config.model.branches``)
or block kind (``'qarepvgg'``: the same variant with QARepVGG's blocks), or a
mapping of ``branches`` and the training settings the row changes
(``{'branches': (...), 'optimizer': {'custom_l2': True}}``),
``seeds`` (each row trains once per seed: ``config.seed``, ``config.seed + 1``,
...), ``reference`` (the row the others are compared with, seed by seed) and the
benchmark settings. Every (row, seed) trains with the same schedule in
``<workdir>/<row>/seed<seed>`` (`trainer.train_and_evaluate`) and is measured:
top-1 of the training-time and fused models over the eval split, trainable
parameters of both, and the largest logit difference between the trained model
and its saved fused model over the eval split. Then the rows' speeds are timed
together, round robin (`repvgg_jax.ablate.measure.time_rows`). The results go to
``<workdir>/ablation.md`` (mean and 95% interval over the seeds, the paired
difference to the reference row), ``ablation.csv`` (every seed) and
``ablation.png`` (`repvgg_jax.ablate.report`, `repvgg_jax.ablate.stats`). The rows
and the config of each run come from `repvgg_jax.ablate.rows`.

Resuming: a finished run's results are kept in
``<workdir>/<row>/seed<seed>/ablation_row.json`` and a rerun skips it; an
unfinished run continues from its last checkpoint. A run whose saved training
config differs from the current one in anything that changes the result (its
branch set, the schedule, ...) is refused with an error that names the
differences, before anything trains: delete its directory to rerun it, or use
another workdir. Speeds are timed anew on every invocation.
"""

from __future__ import annotations

from repvgg_jax.startup import quiet_startup

quiet_startup()  # As in train.py.

import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

from repvgg_jax import checkpointing, jsonfiles, run_files  # noqa: E402
from repvgg_jax.ablate import measure  # noqa: E402
from repvgg_jax.ablate import report as ablation_report  # noqa: E402
from repvgg_jax.ablate.rows import (  # noqa: E402
  AblationError,
  as_json,
  bench_settings,
  branch_sets,
  config_changes,
  int8_batches,
  reference_row,
  row_config,
  row_label,
  seeds,
  split_row,
)
from repvgg_jax.model import variants  # noqa: E402
from repvgg_jax.train import config_checks, trainer  # noqa: E402

ROW_FILE = 'ablation_row.json'
# A run's int8 figures (`measure.int8_results`).
_INT8_KEYS = ('top1_int8', 'int8_logit_rel_error', 'int8_calibration_batches')


class Preempted(RuntimeError):
  """A SIGTERM or a Ctrl-C stopped a row after it saved a checkpoint; ``signal_name``
  says which (``'SIGTERM'``, ``'SIGINT'``)."""

  def __init__(self, message: str, signal_name: str = 'SIGTERM'):
    super().__init__(message)
    self.signal_name = signal_name


def run_dir(workdir: pathlib.Path, name: str, seed: int) -> pathlib.Path:
  """Where one row trains with one seed."""
  return workdir / name / f'seed{seed}'


def _has_checkpoint(row_dir: pathlib.Path) -> bool:
  return bool(checkpointing.saved_steps(row_dir / 'checkpoints'))


def load_row(row_dir: pathlib.Path) -> dict | None:
  """The saved results of a finished row, or None."""
  path = row_dir / ROW_FILE
  return json.loads(path.read_text()) if path.exists() else None


def _check_unchanged(name: str, row_dir: pathlib.Path, current: dict) -> None:
  """Refuses to reuse a row's results or checkpoints made with another config."""
  record = load_row(row_dir)
  if record is not None:
    saved, source = record['config'], row_dir / ROW_FILE
  elif _has_checkpoint(row_dir) and (saved := run_files.read_config(row_dir)) is not None:
    source = row_dir / run_files.CONFIG_FILE
  else:
    return
  changes = config_changes(saved, current)
  if changes:
    raise AblationError(
      f'Row {name!r} was run with another config ({source}); it differs in\n  '
      + '\n  '.join(changes)
      + f'\nDelete {row_dir} to rerun this row with the new config, restore the old '
      'setting, or use another --workdir.'
    )


def check_ablation(config, workdir: pathlib.Path) -> tuple[dict[str, dict[int, object]], dict]:
  """Validates everything before anything trains; returns row -> seed -> run config,
  and row -> its label (`row_label`)."""
  try:  # Rows of a block kind take its variant of this name.
    variants.get_variant(config.model.name)
  except ValueError as error:
    raise AblationError(f'model.name: {error}') from None
  sets = branch_sets(config)
  runs = {
    name: {seed: row_config(config, row, seed, name=name) for seed in seeds(config)}
    for name, row in sets.items()
  }
  reference_row(config, sets)
  bench_settings(config)
  int8_batches(config)
  for name, by_seed in runs.items():
    if (workdir / name / ROW_FILE).exists():
      raise AblationError(
        f'Row {name!r} in {workdir} was run by a version without seeds ({workdir / name}): '
        'use another --workdir, or delete that directory to run the row again.'
      )
    for row in by_seed.values():
      try:
        config_checks.check_config(row)
      except trainer.ConfigError as error:
        raise AblationError(f'Row {name!r}: {error}') from None
  labels = {
    name: row_label(runs[name][config.seed], split_row(name, row)[1]) for name, row in sets.items()
  }
  # Fails at once when the dataset is missing. Every run gets the number of classes
  # that training fills in for an image folder (its saved config holds it), so that
  # the measurements after training build its model and a rerun finds it unchanged.
  num_classes = config_checks.dataset_classes(config)[1].dataset.num_classes
  for name, by_seed in runs.items():
    for seed, row in by_seed.items():
      row.dataset.num_classes = num_classes
      _check_unchanged(
        f'{name} (seed {seed})', run_dir(workdir, name, seed), as_json(row.to_dict())
      )
  return runs, labels


def run_row(
  name: str,
  config,
  directory: pathlib.Path,
  label: str,
  int8_calibration_batches: int = 0,
) -> dict:
  """Trains (or resumes) one row with one seed and measures it; returns its record.
  With ``int8_calibration_batches``, the record has the int8 model's top-1 too
  (`measure.int8_results`).

  Raises:
    Preempted: a SIGTERM or a Ctrl-C stopped the training after a checkpoint.
  """
  start = time.perf_counter()
  try:
    summary = trainer.train_and_evaluate(config, directory)
  except trainer.TrainingDivergedError as error:
    raise trainer.TrainingDivergedError(f'Row {name!r}: {error}') from error
  if summary.get('preempted'):
    raise Preempted(
      f'{summary["preempted"]}: row {name!r} saved its checkpoint at step {summary["steps"]} '
      f'in {directory}; run the same command to continue.',
      summary['preempted'],
    )
  train_seconds = time.perf_counter() - start
  size = config.dataset.image_size
  int8 = {}
  if int8_calibration_batches:
    int8 = measure.int8_results(config, directory, int8_calibration_batches)
  return {
    'row': name,
    'seed': config.seed,
    'branches': label,
    'config': as_json(config.to_dict()),
    'summary': summary,
    'top1': summary['eval_top1'],
    'top1_fused': summary['eval_top1_fused'],
    'train_params': measure.count_params(trainer.build_model(config), size),
    'deploy_params': measure.count_params(trainer.build_model(config, deploy=True), size),
    'train_seconds': train_seconds,
    'logit_rel_error': measure.logit_error(config, directory),
    **int8,
  }


def _done_line(record: dict, with_int8: bool = True) -> str:
  """A finished run's figures; its int8 top-1 where it has one and it is asked for."""
  int8 = f', int8 {record["top1_int8"]:.2%}' if with_int8 and 'top1_int8' in record else ''
  return (
    f'top-1 {record["top1"]:.2%} (fused {record["top1_fused"]:.2%}{int8}), '
    f'logit rel. error {record["logit_rel_error"]:.1e}'
  )


def _ablate_run(
  tag: str, name: str, config, directory: pathlib.Path, label: str, int8: int, log
) -> dict:
  """Reuses or runs one (row, seed), saving its record; logs one line or two. A
  finished run without the int8 top-1 asked for (or with another calibration) gets it."""
  record = load_row(directory)
  if record is not None:
    if int8 and record.get('int8_calibration_batches') != int8:
      record.update(measure.int8_results(config, directory, int8))
      jsonfiles.write_json(directory / ROW_FILE, record)
      log(f'{tag}: done before, int8 top-1 added: {_done_line(record)}')
    else:
      done = _done_line(record, with_int8=bool(int8))  # As the table will show it.
      log(f'{tag}: done before, skipped ({directory / ROW_FILE}): {done}')
    return record
  resume = ' (continuing from its checkpoint)' if _has_checkpoint(directory) else ''
  log(f'{tag}: {label}: training in {directory}{resume}')
  start = time.perf_counter()
  record = run_row(name, config, directory, label, int8)
  log(f'{tag}: {_done_line(record)}; {time.perf_counter() - start:,.0f} s')
  jsonfiles.write_json(directory / ROW_FILE, record)
  return record


def run_ablation(config, workdir: str | pathlib.Path, log: Callable[[str], None] = print) -> str:
  """Runs (or finishes) every row with every seed, times the rows, writes the reports.

  Args:
    config: a training config with ``config.ablation`` (see configs/ablation_digits.py).
    workdir: holds one directory per row (one per seed in it) and the reports.
    log: receives one progress line per run (two when it trains) and one for the timing.

  Returns:
    The markdown of ``<workdir>/ablation.md`` (written with ``ablation.csv`` and
    ``ablation.png``).

  Raises:
    AblationError: a bad ablation config, or runs made with another config
      (checked for all of them before anything trains).
    trainer.ConfigError, data.DatasetNotFoundError: as `trainer.train_and_evaluate`.
    trainer.TrainingDivergedError: runs diverged: raised once every other run is
      done (and kept), naming the rows, before the timing and the reports.
    Preempted: a SIGTERM or a Ctrl-C stopped a run after its checkpoint.
  """
  workdir = pathlib.Path(workdir).absolute()
  runs, labels = check_ablation(config, workdir)
  settings, int8 = bench_settings(config), int8_batches(config)
  workdir.mkdir(parents=True, exist_ok=True)
  count, index, records = sum(len(by_seed) for by_seed in runs.values()), 0, {}
  diverged = {}  # Row -> its seeds that diverged; the other runs still go on.
  for seed in seeds(config):  # Seed by seed: the first seed's rows are all done first.
    for name, by_seed in runs.items():
      index += 1
      tag = f'[{index}/{count}] {name}, seed {seed}'
      directory = run_dir(workdir, name, seed)
      try:
        record = _ablate_run(tag, name, by_seed[seed], directory, labels[name], int8, log)
      except trainer.TrainingDivergedError as error:
        log(f'{tag}: {error}')
        diverged.setdefault(name, []).append(seed)
        continue
      records.setdefault(name, []).append(record)
  if diverged:
    others = ','.join(name for name in runs if name not in diverged)
    which = ', '.join(
      f'{name!r} (seed {", ".join(map(str, row_seeds))})' for name, row_seeds in diverged.items()
    )
    table = f'table the others with --config.ablation.only={others}' if others else 'no row left'
    kept = [
      repr(name)
      for name, row_seeds in diverged.items()
      if any(_has_checkpoint(run_dir(workdir, name, seed)) for seed in row_seeds)
    ]
    advice = (
      f'To change the settings of {", ".join(kept)}, delete '
      f'{"its directory" if len(kept) == 1 else "their directories"} in {workdir} first: '
      'a rerun resumes from the checkpoints kept there.'
      if kept
      else 'None of them saved a checkpoint: change their settings and run again.'
    )
    raise trainer.TrainingDivergedError(
      f'{which} diverged; every other run is done ({table}). {advice}'
    )
  log(f'Timing the rows round robin ({settings["runs"]} rounds of batch {settings["batch"]})')
  first = {name: by_seed[config.seed] for name, by_seed in runs.items()}  # The first seed's.
  directories = {name: run_dir(workdir, name, row.seed) for name, row in first.items()}
  speeds = measure.time_rows(first, directories, settings)
  reference = reference_row(config, runs)
  if not int8:  # Runs quantized by an earlier invocation keep their figures, unreported.
    records = {name: [_without_int8(run) for run in runs] for name, runs in records.items()}
  return ablation_report.write_reports(workdir, records, speeds, reference)


def _without_int8(record: dict) -> dict:
  return {key: value for key, value in record.items() if key not in _INT8_KEYS}

"""The tables and the figure of a branch-set ablation (`repvgg_jax.ablate`), over its seeds."""

from __future__ import annotations

import csv
import io
import math
import os
import pathlib

import numpy as np

from repvgg_jax.ablate import stats
from repvgg_jax.data import folder

COLUMNS = (
  'branch set',
  'branches',
  'train params',
  'deploy params',
  'seeds',
  'top-1 unfused (%)',
  'top-1 fused (%)',
  'top-1 int8 (%)',
  'fused top-1 minus reference (pp)',
  '|fused-unfused| logit rel. error (max)',
  'unfused img/s',
  'fused img/s',
  'fused/unfused',
)
CSV_COLUMNS = (
  'branch set',
  'branches',
  'seed',
  'top-1 unfused (%)',
  'top-1 fused (%)',
  'top-1 int8 (%)',
  '|fused-unfused| logit rel. error',
  'train params',
  'deploy params',
  'unfused img/s (median)',
  'fused img/s (median)',
  'fused/unfused (median)',
)


def branches_label(branches) -> str:
  """``conv3x3+conv1x1``; a per-stage set as ``s0: ...; s1: ...``; a label as it is."""
  if isinstance(branches, str):
    return branches
  if all(isinstance(name, str) for name in branches):
    return '+'.join(branches)
  return '; '.join(f's{stage}: {"+".join(names)}' for stage, names in enumerate(branches))


def summarize(
  records: dict[str, list[dict]], speeds: dict[str, dict], reference: str | None
) -> list[dict]:
  """One summary per row: its runs' top-1s averaged with intervals, the paired
  difference of its fused top-1 to the reference row's, and its speeds."""
  by_seed = lambda runs: {run['seed']: 100 * run['top1_fused'] for run in runs}
  summaries = []
  for name, runs in records.items():
    difference = None
    if reference is not None and name != reference:
      difference = stats.paired_difference(by_seed(runs), by_seed(records[reference]))
    summaries.append(
      {
        'row': name,
        'branches': runs[0]['branches'],
        'train_params': runs[0]['train_params'],
        'deploy_params': runs[0]['deploy_params'],
        'seeds': [run['seed'] for run in runs],
        'top1': stats.interval([100 * run['top1'] for run in runs]),
        'top1_fused': stats.interval([100 * run['top1_fused'] for run in runs]),
        'top1_int8': (
          stats.interval([100 * run['top1_int8'] for run in runs])
          if all('top1_int8' in run for run in runs)
          else None
        ),
        'difference': difference,
        'logit_rel_error': max(run['logit_rel_error'] for run in runs),
        'speed': speeds[name],
        'runs': runs,
      }
    )
  return summaries


def _mean(value: stats.Interval, digits: int = 2) -> str:
  if math.isnan(value.half_width):
    return f'{value.mean:.{digits}f}'
  return f'{value.mean:.{digits}f} ± {value.half_width:.{digits}f}'


def _difference(summary: dict, reference: str | None) -> str:
  difference = summary['difference']
  if difference is None:
    return 'reference' if summary['row'] == reference else '–'
  if math.isnan(difference.half_width):  # One seed: no interval.
    return f'{difference.mean:+.2f}'
  text = f'{difference.mean:+.2f} ± {difference.half_width:.2f}'
  return f'**{text}**' if difference.excludes_zero else text


def _rate(quartiles) -> str:
  q1, median, q3 = quartiles
  return f'{median:,.0f} ({q1:,.0f}-{q3:,.0f})'


def _has_int8(summaries: list[dict]) -> bool:
  return any(s['top1_int8'] is not None for s in summaries)


def markdown_table(summaries: list[dict], reference: str | None) -> str:
  """The table; without the int8 column where no row has all its runs quantized."""
  columns = [c.replace('|', '\\|') for c in COLUMNS]
  columns[COLUMNS.index('fused top-1 minus reference (pp)')] = (
    f'fused top-1 minus {reference or "reference"} (pp)'
  )
  int8 = _has_int8(summaries)
  keep = [int8 or column != 'top-1 int8 (%)' for column in COLUMNS]
  columns = [column for column, kept in zip(columns, keep, strict=True) if kept]
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * 2 + '---:|' * (len(columns) - 2)]
  for s in summaries:
    speed = s['speed']
    cells = [
      s['row'],
      branches_label(s['branches']),
      f'{s["train_params"]:,}',
      f'{s["deploy_params"]:,}',
      str(len(s['seeds'])),
      _mean(s['top1']),
      _mean(s['top1_fused']),
      '–' if s['top1_int8'] is None else _mean(s['top1_int8']),
      _difference(s, reference),
      f'{s["logit_rel_error"]:.1e}',
      _rate(speed['unfused_images_per_sec']),
      _rate(speed['fused_images_per_sec']),
      f'{speed["speedup"]:.2f}x',
    ]
    cells = [cell for cell, kept in zip(cells, keep, strict=True) if kept]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def setup_line(summaries: list[dict], reference: str | None) -> str:
  """How the rows were trained and measured, from the first row's first run."""
  first = summaries[0]['runs'][0]
  summary, config, speed = first['summary'], first['config'], summaries[0]['speed']
  settings = speed['settings']
  seeds = ', '.join(str(seed) for seed in summaries[0]['seeds'])
  compared = (
    f'Minus {reference}: the mean of the seed-by-seed differences of the fused top-1 to '
    f'row {reference!r}, in percentage points, with its 95% interval; bold where the '
    'interval excludes 0. '
    if reference
    else ''
  )
  dataset = config['dataset']
  if dataset.get('name') == folder.NAME:  # An image folder: its train/ and val/.
    splits = f'images of {dataset.get("data_dir")}'
  else:
    splits = f'train split {dataset.get("train_split")!r}, eval split {dataset.get("eval_split")!r}'
  return (
    f'{summary["model"]} on {summary["dataset"]} ({splits}), '
    f'{summary["steps"]} training steps ({summary["epochs"]:.3g} epochs) of batch '
    f'{config["batch_size"]} per run at a peak learning rate of '
    f'{config["optimizer"]["learning_rate"]:g} per 256 images, seeds '
    f'{seeds}; top-1 over the eval split, mean ± half-width of its 95% Student t '
    f'interval over the seeds. {compared}Speed: inference, batch {settings["batch"]} at '
    f'{settings["size"]}x{settings["size"]}, {speed["backend"]} ({speed["device"]}), trained '
    f'variables on random images; median (quartiles) of {settings["runs"]} rounds, each '
    "timing every row's unfused and then its fused model once, so all figures see the same "
    'machine load; fused/unfused is the median of the per-round ratios. Logit error: '
    'max \\|fused - unfused\\| / max \\|unfused\\| over the eval split (the saved deploy '
    'checkpoint against the last training checkpoint, inference mode), the largest over the '
    'seeds.'
    + (
      ' int8: the fused model after post-training quantization (int8 weights, one scale '
      'per output channel; int8 activations, static ranges calibrated on '
      f'{first.get("int8_calibration_batches", "?")} training batches).'
      if _has_int8(summaries)
      else ''
    )
  )


def markdown(summaries: list[dict], reference: str | None) -> str:
  return (
    f'# Branch-set ablation\n\n{setup_line(summaries, reference)}\n\n'
    f'{markdown_table(summaries, reference)}\n'
  )


def csv_text(summaries: list[dict]) -> str:
  """One line per row and seed."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(CSV_COLUMNS)
  for s in summaries:
    speed = s['speed']
    for run in s['runs']:
      writer.writerow(
        (
          s['row'],
          branches_label(s['branches']),
          run['seed'],
          100 * run['top1'],
          100 * run['top1_fused'],
          100 * run['top1_int8'] if 'top1_int8' in run else '',
          run['logit_rel_error'],
          s['train_params'],
          s['deploy_params'],
          speed['unfused_images_per_sec'][1],
          speed['fused_images_per_sec'][1],
          speed['speedup'],
        )
      )
  return out.getvalue()


def plot(path: pathlib.Path, summaries: list[dict]) -> None:
  """Top-1 per branch set with its interval, and the speeds with their quartiles."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  names = [s['row'] for s in summaries]
  x = np.arange(len(names))
  figure = Figure(figsize=(max(10.0, 1.6 * len(names)), 5.0), layout='constrained')
  FigureCanvasAgg(figure)  # The Agg backend, whatever pyplot's default.
  accuracy_axes, speed_axes = figure.subplots(1, 2)

  kinds = [('top1', 'tab:blue', 'training-time (unfused)'), ('top1_fused', 'tab:orange', 'fused')]
  if _has_int8(summaries):
    kinds.append(('top1_int8', 'tab:purple', 'fused, int8'))
  width = 0.8 / len(kinds)
  for index, (key, color, label) in enumerate(kinds):
    values = [s[key] for s in summaries]  # None: a row whose runs were not quantized.
    means = [0.0 if value is None else value.mean for value in values]
    errors = [
      0.0 if value is None or math.isnan(value.half_width) else value.half_width for value in values
    ]
    offset = (index - (len(kinds) - 1) / 2) * width
    bars = accuracy_axes.bar(
      x + offset, means, width, yerr=errors, capsize=3, color=color, label=label
    )
    labels = ['' if value is None else f'{value.mean:.1f}' for value in values]
    accuracy_axes.bar_label(bars, labels=labels, padding=2, fontsize=7, rotation=90)
  accuracy_axes.set_ylim(0, 125)
  accuracy_axes.set_yticks(range(0, 101, 20))
  accuracy_axes.set_ylabel('eval top-1 (%), mean and 95% interval over seeds')
  accuracy_axes.set_title('Accuracy')

  def spread(key):
    quartiles = np.array([s['speed'][key] for s in summaries])  # (rows, 3): q1, median, q3
    return quartiles[:, 1], np.stack(
      [quartiles[:, 1] - quartiles[:, 0], quartiles[:, 2] - quartiles[:, 1]]
    )

  unfused, unfused_err = spread('unfused_images_per_sec')
  fused, fused_err = spread('fused_images_per_sec')
  bars = speed_axes.bar(
    x, unfused, 0.6, yerr=unfused_err, capsize=3, color='tab:gray', label='unfused (training-time)'
  )
  speed_axes.bar_label(bars, fmt='%.0f', label_type='center', fontsize=8, color='white')
  speed_axes.errorbar(
    x, fused, yerr=fused_err, fmt='-o', capsize=3, color='tab:green', label='fused; fused/unfused'
  )
  for i, s in enumerate(summaries):
    speed_axes.annotate(
      f'{s["speed"]["speedup"]:.2f}x',
      (x[i], fused[i]),
      textcoords='offset points',
      xytext=(0, 9),
      ha='center',
      fontsize=8,
      color='tab:green',
    )
  speed_axes.set_ylim(
    0, 1.35 * float(max(np.max(unfused + unfused_err[1]), np.max(fused + fused_err[1])))
  )
  speed_axes.set_ylabel('inference images/s, median and quartiles')
  speed_axes.set_title('Inference speed, rows timed round robin')

  for axes in (accuracy_axes, speed_axes):
    axes.set_xticks(x, names, rotation=25, ha='right')
    axes.set_xlabel('branch set')
    axes.legend(loc='upper left', ncols=2, fontsize=8)
  summary = summaries[0]['runs'][0]['summary']
  seeds = len(summaries[0]['seeds'])
  figure.suptitle(
    f'Branch-set ablation: {summary["model"]} on {summary["dataset"]}, {seeds} seed(s)'
  )
  tmp = path.with_name(path.name + '.tmp')
  figure.savefig(tmp, dpi=120, format='png')
  os.replace(tmp, path)


def _write_text(path: pathlib.Path, text: str) -> None:
  """Writes atomically (a temporary file renamed into place)."""
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


def write_reports(
  workdir: pathlib.Path,
  records: dict[str, list[dict]],
  speeds: dict[str, dict],
  reference: str | None,
) -> str:
  """Writes ``ablation.md``, ``ablation.csv`` and ``ablation.png``; returns the markdown.

  Args:
    workdir: where they go.
    records: row -> its runs' records, one per seed (`runner.run_row`).
    speeds: row -> its speeds (`measure.time_rows`).
    reference: the row the others are compared with, or None.
  """
  summaries = summarize(records, speeds, reference)
  text = markdown(summaries, reference)
  _write_text(workdir / 'ablation.md', text)
  _write_text(workdir / 'ablation.csv', csv_text(summaries))
  plot(workdir / 'ablation.png', summaries)
  return text

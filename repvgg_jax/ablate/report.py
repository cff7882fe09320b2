"""The tables and the figure of a branch-set ablation (`repvgg_jax.ablate`)."""

from __future__ import annotations

import csv
import io
import os
import pathlib

import numpy as np

COLUMNS = (
  'branch set',
  'branches',
  'train params',
  'deploy params',
  'top-1 unfused (%)',
  'top-1 fused (%)',
  '|fused-unfused| logit rel. error',
  'unfused img/s',
  'fused img/s',
  'speed-up',
  'fused img/s, rows interleaved',
)


def branches_label(branches) -> str:
  """``conv3x3+conv1x1``; a per-stage set as ``s0: ...; s1: ...``; a label as it is."""
  if isinstance(branches, str):
    return branches
  if all(isinstance(name, str) for name in branches):
    return '+'.join(branches)
  return '; '.join(f's{stage}: {"+".join(names)}' for stage, names in enumerate(branches))


def _values(record: dict) -> tuple:
  """One row's values in the order of COLUMNS, unformatted."""
  return (
    record['row'],
    branches_label(record['branches']),
    record['train_params'],
    record['deploy_params'],
    100 * record['top1'],
    100 * record['top1_fused'],
    record['logit_rel_error'],
    record['unfused_images_per_sec'],
    record['fused_images_per_sec'],
    record['speedup'],
    record['fused_images_per_sec_interleaved'],
  )


def markdown_table(records: list[dict]) -> str:
  formats = ('{}', '{}', '{:,}', '{:,}', '{:.2f}', '{:.2f}', '{:.1e}', '{:,.0f}', '{:,.0f}')
  lines = [
    '| ' + ' | '.join(column.replace('|', '\\|') for column in COLUMNS) + ' |',
    '|' + '---|' * 2 + '---:|' * (len(COLUMNS) - 2),
  ]
  for record in records:
    *values, speedup, interleaved = _values(record)
    cells = [f.format(v) for f, v in zip(formats, values, strict=True)]
    cells += [f'{speedup:.2f}x', f'{interleaved:,.0f}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def setup_line(records: list[dict]) -> str:
  """How the rows were trained and measured, from the first row's record."""
  first = records[0]
  summary, bench, config = first['summary'], first['bench'], first['config']
  return (
    f'{summary["model"]} on {summary["dataset"]}, {summary["steps"]} training steps '
    f'({summary["epochs"]:.3g} epochs) of batch {config["batch_size"]} per row, seed '
    f'{config["seed"]}; top-1 over the eval split. Speed: inference, batch {bench["batch"]} '
    f'at {bench["size"]}x{bench["size"]}, {bench["dtype"]}, {bench["conv_impl"]} conv, '
    f'{bench["backend"]} ({bench["device"]}), median of {bench["runs"]} runs alternating '
    'unfused and fused, trained variables on random images; the last column times all '
    "rows' fused models again in one round-robin loop, under the same machine load. "
    'Logit error: '
    'max \\|fused - unfused\\| / max \\|unfused\\| over the eval split (the saved deploy '
    'checkpoint against the last training checkpoint, inference mode).'
  )


def markdown(records: list[dict]) -> str:
  return f'# Branch-set ablation\n\n{setup_line(records)}\n\n{markdown_table(records)}\n'


def csv_text(records: list[dict]) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(COLUMNS)
  for record in records:
    writer.writerow(_values(record))
  return out.getvalue()


def plot(path: pathlib.Path, records: list[dict]) -> None:
  """Top-1 per branch set, and unfused speed as bars with the fused speed as a line."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  names = [record['row'] for record in records]
  x = np.arange(len(names))
  figure = Figure(figsize=(max(10.0, 1.6 * len(names)), 5.0), layout='constrained')
  FigureCanvasAgg(figure)  # The Agg backend, whatever pyplot's default.
  accuracy_axes, speed_axes = figure.subplots(1, 2)

  for offset, key, color, label in (
    (-0.2, 'top1', 'tab:blue', 'training-time (unfused)'),
    (0.2, 'top1_fused', 'tab:orange', 'fused'),
  ):
    values = [100 * record[key] for record in records]
    bars = accuracy_axes.bar(x + offset, values, 0.4, color=color, label=label)
    accuracy_axes.bar_label(bars, fmt='%.1f', padding=2, fontsize=7, rotation=90)
  accuracy_axes.set_ylim(0, 125)
  accuracy_axes.set_yticks(range(0, 101, 20))
  accuracy_axes.set_ylabel('eval top-1 (%)')
  accuracy_axes.set_title('Accuracy')

  speeds = [record['unfused_images_per_sec'] for record in records]
  fused_speeds = [record['fused_images_per_sec_interleaved'] for record in records]
  bars = speed_axes.bar(x, speeds, 0.6, color='tab:gray', label='unfused (training-time structure)')
  speed_axes.bar_label(bars, fmt='%.0f', label_type='center', fontsize=8, color='white')
  speed_axes.plot(
    x, fused_speeds, '-o', color='tab:green', label='fused (rows interleaved); speed-up'
  )
  for i, record in enumerate(records):
    speed_axes.annotate(
      f'{record["speedup"]:.2f}x',
      (x[i], fused_speeds[i]),
      textcoords='offset points',
      xytext=(0, 7),
      ha='center',
      fontsize=8,
      color='tab:green',
    )
  speed_axes.set_ylim(0, 1.35 * max(speeds + fused_speeds))
  speed_axes.set_ylabel('inference images/s')
  speed_axes.set_title('Inference speed')

  for axes in (accuracy_axes, speed_axes):
    axes.set_xticks(x, names, rotation=25, ha='right')
    axes.set_xlabel('branch set')
    axes.legend(loc='upper left', ncols=2, fontsize=8)
  summary = records[0]['summary']
  figure.suptitle(f'Branch-set ablation: {summary["model"]} on {summary["dataset"]}')
  tmp = path.with_name(path.name + '.tmp')
  figure.savefig(tmp, dpi=120, format='png')
  os.replace(tmp, path)


def _write_text(path: pathlib.Path, text: str) -> None:
  """Writes atomically (a temporary file renamed into place)."""
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


def write_reports(workdir: pathlib.Path, records: list[dict]) -> str:
  """Writes ``ablation.md``, ``ablation.csv`` and ``ablation.png``; returns the markdown."""
  text = markdown(records)
  _write_text(workdir / 'ablation.md', text)
  _write_text(workdir / 'ablation.csv', csv_text(records))
  plot(workdir / 'ablation.png', records)
  return text

"""Benchmark results as terminal tables (printed, and kept as JSON lines), markdown and the
paper's Figure 1.

Rows are the dicts `repvgg_jax.bench` returns (``kind`` 'roofline', 'infer',
'train' or 'layer'), read back from JSON lines with `jsonfiles.read_jsonl`.
"""

from __future__ import annotations

import pathlib

from repvgg_jax import jsonfiles


def emit(row: dict, text: str, json_path) -> dict:
  """Prints ``text``, appends ``row`` to the JSON-lines file ``json_path`` (if any), returns it."""
  print(text, flush=True)
  if json_path:
    jsonfiles.append_jsonl(json_path, row)
  return row


def _mib(num_bytes) -> str:
  return 'n/a' if num_bytes is None else f'{num_bytes / 2**20:,.1f} MiB'


def _share(value) -> str:
  return 'n/a' if value is None else f'{value:.0%}'


def _best_torch(row: dict, model: str | None = None) -> dict | None:
  entries = [r for r in row.get('torch', {}).values() if model is None or r.get('model') == model]
  return max(entries, key=lambda r: r['images_per_sec']) if entries else None


def _on_device(torch_row: dict) -> str:
  """' (cuda)' for PyTorch timed on a GPU; nothing for the CPU."""
  device = torch_row.get('device', 'cpu')
  return '' if device == 'cpu' else f' ({device})'


def _setup(row: dict) -> str:
  chunks = row.get('chunks') or {}
  chunked = (
    f', {chunks["images"]} images at a time through {chunks["blocks"]} blocks'
    if chunks.get('blocks')
    else ''
  )
  return (
    f'{row["model"]}, batch {row["batch"]}, {row["size"]}x{row["size"]}, {row["dtype"]}, '
    f'{row["conv_impl"]} conv{chunked}, {row["backend"]} ({row["device"]}) '
    f'x{row["num_devices"]}, median of {row["runs"]} runs'
    + (', host memory reused' if row.get('host_memory') == 'reused' else '')
  )


def format_infer(row: dict) -> str:
  lines = [
    _setup(row),
    f'{"model":<36}{"images/s":>10}{"ms/batch":>10}{"GFLOP/s":>9}{"roofline":>9}'
    f'{"temp memory":>13}',
  ]
  for key, label in (('train', 'JAX training-time'), ('deploy', 'JAX fused')):
    r = row[key]
    lines.append(
      f'{label:<36}{r["images_per_sec"]:>10,.1f}{r["seconds_per_batch"] * 1e3:>10,.1f}'
      f'{r["gflops_per_sec"]:>9,.1f}{_share(r["roofline_share"]):>9}{_mib(r["temp_bytes"]):>13}'
    )
  for r in row.get('torch', {}).values():
    label = f'PyTorch {"fused" if r["model"] == "deploy" else "training-time"} {r["layout"]}'
    label += _on_device(r)
    lines.append(
      f'{label:<36}{r["images_per_sec"]:>10,.1f}{row["batch"] / r["images_per_sec"] * 1e3:>10,.1f}'
    )
  lines.append(f'fused / training-time speed: {row["speedup"]:.2f}x')
  for key, ratio in row.get('jax_over_torch', {}).items():
    label = 'fused' if key == 'deploy' else 'training-time'
    lines.append(f'JAX / PyTorch, {label}: {ratio:.2f}x (against the faster PyTorch layout)')
  return '\n'.join(lines)


def format_train(row: dict) -> str:
  count = row.get('steps_per_call', 1)
  frozen = row.get('freeze_stages', 0)
  frozen = f', stages 0-{frozen - 1} frozen' if frozen else ''
  lines = [
    _setup(row) + f', {row["num_classes"]} classes, training step{frozen}',
    f'{"step":<36}{"images/s":>10}{"ms/step":>10}{"GFLOP/s":>9}{"roofline":>9}{"temp memory":>13}',
  ]
  labels = {'jax': 'JAX' if count == 1 else f'JAX, {count} steps per call'}
  labels['jax_single'] = 'JAX, 1 step per call'
  for key, label in labels.items():
    if key not in row:
      continue
    r = row[key]
    lines.append(
      f'{label:<36}{r["images_per_sec"]:>10,.1f}'
      f'{r["seconds_per_batch"] * 1e3:>10,.1f}{r["gflops_per_sec"]:>9,.1f}'
      f'{_share(r["roofline_share"]):>9}{_mib(r["temp_bytes"]):>13}'
    )
  for t in row.get('torch', {}).values():
    label = f'PyTorch eager {t["layout"]}' + _on_device(t)
    lines.append(
      f'{label:<36}{t["images_per_sec"]:>10,.1f}{row["batch"] / t["images_per_sec"] * 1e3:>10,.1f}'
    )
  if 'jax_over_torch' in row:
    lines.append(f'JAX / PyTorch, training step: {row["jax_over_torch"]["train_step"]:.2f}x')
  return '\n'.join(lines)


def format_roofline(row: dict) -> str:
  sizes = ', '.join(f'{n}: {g:,.0f}' for n, g in row['matmul_by_size'].items())
  return (
    f'{row["backend"]} ({row["device"]}), {row["dtype"]}: '
    f'matmul {row["matmul_gflops_per_sec"]:,.1f} '
    f'GFLOP/s (square sides {sizes}); 3x3 conv {row["conv_gflops_per_sec"]:,.1f} GFLOP/s '
    f'(NHWC {row["conv_shape"]})'
    + (
      f"; PyTorch's matmul {row['torch_matmul_gflops_per_sec']:,.1f} GFLOP/s"
      if 'torch_matmul_gflops_per_sec' in row
      else ''
    )
  )


def format_layers(rows: list[dict]) -> str:
  lines = [
    f'{"map":>11}{"channels":>12}{"groups":>7}{"stride":>7}{"XLA ms":>9}{"im2col ms":>10}'
    f'{"Winograd ms":>12}{"dense ms":>9}{"faster":>10}{"auto":>10}'
  ]
  optional = lambda r, key: '-' if r.get(key) is None else f'{r[key]:.2f}'
  for r in rows:
    channels = f'{r["in_channels"]}->{r["features"]}'
    lines.append(
      f'{r["side"]:>5}->{r["out_side"]:<5}{channels:>12}{r["groups"]:>7}{r["stride"]:>7}'
      f'{r["xla_ms"]:>9.2f}{r["im2col_ms"]:>10.2f}{optional(r, "winograd_ms"):>12}'
      f'{optional(r, "dense_ms"):>9}{r["faster"]:>10}{r["auto"]:>10}'
    )
  return '\n'.join(lines)


def markdown(rows: list[dict]) -> str:
  """Markdown tables of every kind of row present, one section each."""
  out = []
  roof = [r for r in rows if r['kind'] == 'roofline']
  if roof:
    out += ['| machine | dtype | matmul GFLOP/s | 3x3 conv GFLOP/s |', '|---|---|---:|---:|']
    for r in roof:
      out.append(
        f'| {r["device"]} | {r["dtype"]} | {r["matmul_gflops_per_sec"]:,.0f} '
        f'| {r["conv_gflops_per_sec"]:,.0f} |'
      )
    out.append('')
  infer = [r for r in rows if r['kind'] == 'infer']
  if infer:
    out += [
      '| model | batch | size | dtype | unfused img/s | fused img/s | fused/unfused '
      '| temp MiB unfused / fused | fused GFLOP/s | roofline | PyTorch fused img/s '
      '| JAX/PyTorch fused |',
      '|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for r in infer:
      torch = _best_torch(r, 'deploy')
      ratio = r.get('jax_over_torch', {}).get('deploy')
      temps = f'{_mib(r["train"]["temp_bytes"])[:-4]} / {_mib(r["deploy"]["temp_bytes"])[:-4]}'
      torch_cells = (
        f'{torch["images_per_sec"]:,.1f} ({torch["layout"]}) | {ratio:.2f}x' if torch else ' | '
      )
      out.append(
        f'| {r["model"]} | {r["batch"]} | {r["size"]} | {r["dtype"]} '
        f'| {r["train"]["images_per_sec"]:,.1f} | {r["deploy"]["images_per_sec"]:,.1f} '
        f'| {r["speedup"]:.2f}x | {temps} | {r["deploy"]["gflops_per_sec"]:,.0f} '
        f'| {_share(r["deploy"]["roofline_share"])} | {torch_cells} |'
      )
    out.append('')
  train = [r for r in rows if r['kind'] == 'train']
  if train:
    out += [
      '| model | batch | size | dtype | devices | JAX img/s | GFLOP/s | roofline '
      '| PyTorch eager img/s '
      '| JAX/PyTorch |',
      '|---|---:|---:|---|---:|---:|---:|---:|---:|---:|',
    ]
    for r in train:
      torch = _best_torch(r)
      torch_cells = (
        f'{torch["images_per_sec"]:,.1f} ({torch["layout"]}) | '
        f'{r["jax_over_torch"]["train_step"]:.2f}x'
        if torch
        else ' | '
      )
      out.append(
        f'| {r["model"]} | {r["batch"]} | {r["size"]} | {r["dtype"]} | {r["num_devices"]} '
        f'| {r["jax"]["images_per_sec"]:,.1f} | {r["jax"]["gflops_per_sec"]:,.0f} '
        f'| {_share(r["jax"]["roofline_share"])} | {torch_cells} |'
      )
    out.append('')
  return '\n'.join(out)


def plot_figure1(rows: list[dict], path) -> pathlib.Path:
  """Images/s against parameters for each variant, fused and unfused (the paper's Figure 1)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  infer = [r for r in rows if r['kind'] == 'infer']
  if not infer:
    raise ValueError('No inference rows to plot.')
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for key, label, marker in (
    ('deploy', 'fused (deploy)', 'o'),
    ('train', 'unfused (training-time)', 's'),
  ):
    xs = [r['deploy']['params'] / 1e6 for r in infer]
    ys = [r[key]['images_per_sec'] for r in infer]
    ax.plot(xs, ys, marker, label=label, alpha=0.8)
  for r in infer:
    ax.annotate(
      r['model'].replace('RepVGG-', ''),
      (r['deploy']['params'] / 1e6, r['deploy']['images_per_sec']),
      fontsize=7,
      xytext=(3, 3),
      textcoords='offset points',
    )
  first = infer[0]
  ax.set_xlabel('parameters of the deployed model (millions)')
  ax.set_ylabel('images / s')
  ax.set_yscale('log')
  ax.set_title(
    f'RepVGG inference, batch {first["batch"]}, {first["size"]}x{first["size"]}, '
    f'{first["dtype"]}, {first["device"]}',
    fontsize=9,
  )
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path

"""``python -m repvgg_jax.bench suite``: the performance tables and Figure 1 of this machine,
and the roofline row (PyTorch's matmul peak beside it where torch is installed) that the
suite and the ``roofline`` command print."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax

from repvgg_jax import jsonfiles
from repvgg_jax.bench import report as bench_report
from repvgg_jax.bench import timing
from repvgg_jax.bench.models import TORCH_LAYOUTS, benchmark, benchmark_train_step
from repvgg_jax.bench.timing import machine, peak_of

SUITE_FILES = ('results.jsonl', 'figure1.jsonl', 'results.md', 'figure1.png')  # In --out.
SUITE_STAGING = '.in_progress'  # The folder in --out that the rows go to until the end.


def roofline(dtype: str = 'float32', runs: int = 5, with_torch: bool | None = None) -> dict:
  """The machine's peaks (`timing.roofline`); on CPUs, with torch (``with_torch``; None:
  when it is installed), PyTorch's float32 matmul peak beside them, for reference only
  (MKL's can beat XLA's)."""
  row = timing.roofline(dtype, runs)
  if (
    row['backend'] == 'cpu'
    and row['dtype'] == 'float32'
    and (torch_available() if with_torch is None else with_torch)
  ):
    from repvgg_jax.bench import torch_side

    sizes = [int(n) for n in row['matmul_by_size']]
    row['torch_matmul_gflops_per_sec'] = max(torch_side.matmul_gflops(sizes, runs).values())
  return row


def torch_available() -> bool:
  """Whether PyTorch can be imported."""
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def suite_plan(on_cpu: bool):
  """What the suite times: ``(infers, trains)``.

  ``infers``: ``(model, batch, size, dtype)``; ``trains``: ``(model, batch,
  size, classes, dtype, PyTorch layouts)``, no layouts for no PyTorch.
  """
  if on_cpu:
    infers = [('A0', 32, 224, 'float32'), ('B0', 32, 224, 'float32'), ('A0', 128, 32, 'float32')]
    trains = [  # PyTorch's channels-last training aborts at 224 (`bench_torch.train_step_fns`).
      ('A0', 128, 32, 1000, 'float32', TORCH_LAYOUTS),
      ('A0', 32, 224, 1000, 'float32', ('nchw',)),
      ('A0', 64, 32, 10, 'float32', TORCH_LAYOUTS),
    ]
  else:
    infers = [(name, 256, 224, dtype) for dtype in ('float32', 'bfloat16') for name in ('A0', 'B0')]
    trains = [('B0', 256, 224, 1000, 'bfloat16', ())]
  return infers, trains


def run_suite(out_dir, runs: int, warmup: int, figure_batch, figure_size: int, models, with_torch):
  """The tables and plot of the README's performance section, for this machine.

  On a CPU: the roofline; A0 and B0 inference at batch 32, 224x224 and A0 at
  batch 128, 32x32; training steps of A0 at batch 128, 32x32, at batch 32,
  224x224 and as the digits config runs it (batch 64, 10 classes), each
  beside PyTorch when ``with_torch``; then Figure 1 over ``models`` at batch
  ``figure_batch`` (None: 8). On a GPU: the float32 and bfloat16 rooflines; A0
  and B0 inference at batch 256 in float32 (beside PyTorch on the GPU) and in
  bfloat16; B0 training in bfloat16 at batch 256, 224x224; then Figure 1
  (``figure_batch`` None: 128, as the paper's). Shares of the roofline are
  taken against the peak of the row's dtype. The files in ``out_dir`` are
  replaced at the end, all together: they describe this one run. Until then the
  rows go to ``out_dir/.in_progress/``, which an interrupted run leaves (its rows so
  far) beside the earlier run's files, untouched.
  """
  out = pathlib.Path(out_dir)
  staging = out / SUITE_STAGING
  if staging.exists():
    shutil.rmtree(staging)  # An interrupted run's rows.
  staging.mkdir(parents=True)
  results = staging / 'results.jsonl'
  on_cpu = jax.default_backend() == 'cpu'
  peaks = {}
  for dtype in ('float32',) if on_cpu else ('float32', 'bfloat16'):
    roof = roofline(dtype, with_torch=with_torch)
    bench_report.emit(roof, bench_report.format_roofline(roof), results)
    peaks[dtype] = peak_of(roof)
  infers, trains = suite_plan(on_cpu)
  for name, batch, size, dtype in infers:
    row = benchmark(
      name,
      batch,
      size,
      runs=runs,
      warmup=warmup,
      dtype=dtype,
      with_torch=with_torch and dtype == 'float32',  # PyTorch's side runs float32.
      peak_gflops=peaks[dtype],
    )
    bench_report.emit(row, bench_report.format_infer(row), results)
  for name, batch, size, classes, dtype, layouts in trains:
    row = benchmark_train_step(
      name,
      batch,
      size,
      runs=runs,
      warmup=warmup,
      num_classes=classes,
      dtype=dtype,
      with_torch=with_torch and bool(layouts),
      torch_layouts=layouts,
      peak_gflops=peaks[dtype],
    )
    bench_report.emit(row, bench_report.format_train(row), results)
  figure_batch = figure_batch or (8 if on_cpu else 128)
  peak = peaks['float32']
  figure_rows = []
  for name in models:
    row = benchmark(name, figure_batch, figure_size, runs=3, warmup=1, peak_gflops=peak)
    row['kind'] = 'infer'
    figure_rows.append(
      bench_report.emit(row, bench_report.format_infer(row), staging / 'figure1.jsonl')
    )
  bench_report.plot_figure1(figure_rows, staging / 'figure1.png')
  rows = jsonfiles.read_jsonl(results)
  (staging / 'results.md').write_text(
    f'Measured on {json.dumps(machine())}\n\n'
    + bench_report.markdown(rows)
    + '\n'
    + f'Figure 1 data (batch {figure_batch}, {figure_size}x{figure_size}):\n\n'
    + bench_report.markdown(figure_rows)
  )
  for name in SUITE_FILES:
    os.replace(staging / name, out / name)
  staging.rmdir()
  print(f'Wrote {", ".join(str(out / name) for name in SUITE_FILES)}.')

"""The GPU checks of docs/performance.md in one run: under 8 minutes on a fresh GPU machine.

  python scripts/gpu_check.py --out DIR [--budget 450]     # on the GPU machine
  python scripts/gpu_check.py --out DIR --smoke           # on a CPU: the same steps, tiny

Writes ``DIR/summary.md`` (every table) and ``DIR/results.jsonl`` (every row),
plus the compiled programs of B2's fused and unfused forward. Each step has a
share of the budget (`main`; what one leaves goes to the next), and within
it skips what no longer fits with a note, so every step gets its turn:

1. Fused against unfused for the 13 variants, batch 128, 224x224, float32
   (TF32 on the GPU) and bfloat16 (`bench.models.benchmark`), the slower
   families first: the ratio that must not fall under 1.5x.
2. The levers, on B2 (the first variant whose fused model was slower), B3g4
   (the slowest) and B1 (under 1.5x) in float32 and B2 in bfloat16: the fused
   model compiled without XLA's cuDNN conv-bias-ReLU fusion (the
   ``cudnn-fused-convolution-rewriter`` pass disabled for that program only),
   with its bias and ReLU kept out of the convolution (an optimization barrier)
   and with NCHW convolutions, beside the fused and unfused models as they are;
   B2's compiled programs (cuDNN's custom calls); B2's blocks one by one, each
   distinct shape unfused and fused, weighted by how often the model has it:
   the layers where the fused model loses its time; then B2 again in child
   processes (flags are read at start-up): XLA's autotuning off, and cuDNN's
   candidate engines and their times for every convolution written to
   ``autotune_b2.txt``.
3. The raised bars: B0's training step at batch 256 in bfloat16 and A0's fused
   inference at batch 256 in bfloat16, against the measured bfloat16 peak, and
   the kernels that take the most device time in a few more calls of each
   (a profiler trace; the programs come from the compilation cache).
4. ``train.py`` end to end on JPEGs in ImageNet's folder layout made here
   (`bench.input.make_jpegs`, on every core; hard links make one epoch longer
   than the run), B0 in bfloat16, against the model-only rate of step 3, and
   ``bench input``'s per-core rate on this machine's cores. Needs
   TensorFlow and the rest of `END_TO_END_NEEDS`; skipped with a note naming
   what to install without them (not requirements.txt on an image with a newer
   JAX: it pins jax 0.10).

Only the model and the bench's timing code are imported for steps 1-3, so
they run on an image that has JAX, Flax and optax but not TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The slower families first: the ones whose fused model lost to the unfused one.
VARIANTS = (
  'B2',
  'B3',
  'B3g4',
  'B2g4',
  'B2g2',
  'B3g2',
  'B1',
  'B1g2',
  'B1g4',
  'B0',
  'A2',
  'A1',
  'A0',
)
# Where the runs of this script keep their scratch files (TMPDIR, else /tmp).
SCRATCH = pathlib.Path(tempfile.gettempdir())
# The levers: (variant, dtype), B2 in float32 first.
LEVER_RUNS = (('B2', 'float32'), ('B3g4', 'float32'), ('B1', 'float32'), ('B2', 'bfloat16'))
# XLA's pass that turns convolution + bias + ReLU into one cuDNN call (a cuDNN graph);
# without it each convolution is a plain cuDNN call and the bias and ReLU an XLA fusion.
CONV_FUSION_OFF = {'xla_disable_hlo_passes': 'cudnn-fused-convolution-rewriter'}
# XLA gives cuDNN NHWC convolutions on Hopper in every float dtype; the other layout, for
# that program only.
CONV_NCHW = {'xla_gpu_force_conv_nchw': True}
# What step 4 needs beyond steps 1-3's JAX, Flax and optax: {module: pip package}.
END_TO_END_NEEDS = {
  'tensorflow': 'tensorflow-cpu',
  'tensorflow_datasets': 'tensorflow-datasets',
  'ml_collections': 'ml-collections',
  'orbax.checkpoint': 'orbax-checkpoint',
  'absl': 'absl-py',
  'qwix': 'qwix',
  'sklearn': 'scikit-learn',
  'tqdm': 'tqdm',
  'importlib_resources': 'importlib_resources',  # tensorflow-datasets 4.9.10's.
}
# Child processes of the B2 levers: {label: XLA_FLAGS added, with {out} the output folder}.
CHILD_FLAGS = {
  'autotune level 0': '--xla_gpu_autotune_level=0',
  'autotune log': '--xla_gpu_dump_autotune_logs_to={out}/autotune_b2.txt',
}


class Run:
  """The output directory, the time budget and the rows so far."""

  def __init__(self, out: pathlib.Path, budget: float, smoke: bool):
    self.out, self.budget, self.smoke = out, budget, smoke
    self.start = time.monotonic()
    self.deadline = self.step_deadline = self.start + budget
    self.out.mkdir(parents=True, exist_ok=True)
    self.lines: list[str] = []

  def left(self) -> float:
    """Seconds left of the whole budget."""
    return self.deadline - time.monotonic()

  def until(self, share: float) -> None:
    """The current step may run until ``share`` of the budget is spent."""
    self.step_deadline = self.start + share * self.budget

  def step_left(self) -> float:
    """Seconds left of the current step's share."""
    return min(self.deadline, self.step_deadline) - time.monotonic()

  def row(self, row: dict) -> None:
    from repvgg_jax import jsonfiles

    jsonfiles.append_jsonl(self.out / 'results.jsonl', row)

  def say(self, *lines: str) -> None:
    for line in lines:
      print(line, flush=True)
    self.lines += lines
    (self.out / 'summary.md').write_text('\n'.join(self.lines) + '\n')


def _sizes(run: Run) -> dict:
  """Batch, image side and runs: the checks' own, or tiny ones for a CPU smoke run."""
  if run.smoke:
    return {'batch': 2, 'size': 64, 'runs': 2, 'warmup': 1, 'big_batch': 2}
  return {'batch': 128, 'size': 224, 'runs': 10, 'warmup': 2, 'big_batch': 256}


def versions(run: Run) -> None:
  import jax

  from repvgg_jax.bench import timing

  packages = {}
  for name in (
    *('jax', 'jaxlib', 'flax', 'optax', 'tensorflow'),
    *('jax-cuda12-plugin', 'jax-cuda13-plugin', 'nvidia-cudnn-cu12', 'nvidia-cudnn-cu13'),
  ):
    try:
      from importlib import metadata

      packages[name] = metadata.version(name)
    except Exception:  # noqa: BLE001 - absent packages are reported as absent.
      packages[name] = None
  row = {'kind': 'machine', **timing.machine(), 'packages': packages, 'devices': str(jax.devices())}
  run.row(row)
  run.say(f'# GPU checks, {row["date"]}', '', f'devices: {row["devices"]}', f'packages: {packages}')
  return jax.default_backend()


def fused_against_unfused(run: Run, names=VARIANTS) -> None:
  from repvgg_jax.bench import models

  sizes = _sizes(run)
  run.say('', '## 1. Fused against unfused', '')
  run.say(
    '| model | dtype | unfused img/s | fused img/s | fused/unfused |', '|---|---|---:|---:|---:|'
  )
  for name in names:
    for dtype in ('float32', 'bfloat16'):
      if run.step_left() < 15:
        run.say(f'| {name} | {dtype} | (skipped: time budget spent) | | |')
        continue
      row = models.benchmark(
        name,
        sizes['batch'],
        sizes['size'],
        sizes['runs'],
        sizes['warmup'],
        dtype=dtype,
        conv_impl='xla',
      )
      run.row(row)
      unfused, fused = row['train']['images_per_sec'], row['deploy']['images_per_sec']
      run.say(f'| {name} | {dtype} | {unfused:,.0f} | {fused:,.0f} | {fused / unfused:.2f}x |')


def _separate_bias_conv():
  """An `nn.Conv`-compatible layer (the same ``kernel`` and ``bias``) whose bias, and the
  block's ReLU after it, cannot be fused into the convolution: an optimization barrier
  stands between them."""
  import flax.linen as nn
  import jax

  from repvgg_jax.perf.conv_kernels import KernelConv

  class SeparateBiasConv(KernelConv):
    @nn.compact
    def __call__(self, x):
      kh, kw = self.kernel_size
      groups = self.feature_group_count
      shape = (kh, kw, x.shape[-1] // groups, self.features)
      kernel = self.param('kernel', self.kernel_init, shape, self.param_dtype)
      bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
      x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
      strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
      y = jax.lax.conv_general_dilated(
        x,
        kernel,
        strides,
        tuple(tuple(p) for p in self.padding),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=groups,
        precision=self.precision,
      )
      return jax.lax.optimization_barrier(y) + bias

  return SeparateBiasConv


def _compile_forms(forms: dict, images) -> tuple[dict, dict]:
  """``{form: (model, variables, compiler options)}`` compiled for ``images``: the
  forward passes, each blocking until its result is ready, and the programs."""
  import jax

  calls, programs = {}, {}
  for form, (model, v, options) in forms.items():
    forward = jax.jit(lambda v, x, m=model: m.apply(v, x), compiler_options=options)
    programs[form] = forward.lower(v, images).compile()
    calls[form] = lambda c=programs[form], v=v: jax.block_until_ready(c(v, images))
  return calls, programs


def levers(run: Run, name: str = 'B2', dtype: str = 'float32', dump: bool = False) -> list[str]:
  """The fused model of ``name`` as it is, without XLA's cuDNN conv fusion, with its
  bias kept apart and with NCHW convolutions, beside the unfused one, timed in the
  same rounds: a table row. With ``dump``, writes the compiled programs and returns
  a line on the convolution calls of each."""
  import jax.numpy as jnp

  from repvgg_jax.bench import timing
  from repvgg_jax.bench.models import randomized_variables
  from repvgg_jax.model import create_model, fuse_params

  sizes = _sizes(run)
  images = jnp.zeros((sizes['batch'], sizes['size'], sizes['size'], 3), jnp.float32)
  training = create_model(name, dtype=jnp.dtype(dtype))
  variables = randomized_variables(training, images)
  deploy_variables = fuse_params(variables)
  deploy = create_model(name, deploy=True, dtype=jnp.dtype(dtype))
  barrier = deploy.clone(conv=_separate_bias_conv())
  calls, programs = _compile_forms(
    {
      'unfused': (training, variables, None),
      'fused': (deploy, deploy_variables, None),
      'fused, no cuDNN conv fusion': (deploy, deploy_variables, CONV_FUSION_OFF),
      'fused, bias apart': (barrier, deploy_variables, None),
      'fused, NCHW': (deploy, deploy_variables, CONV_NCHW),
    },
    images,
  )
  notes = []
  for form, compiled in programs.items():
    if dump and form in ('unfused', 'fused', 'fused, no cuDNN conv fusion'):
      text = compiled.as_text()
      slug = form.replace(', ', '_').replace(' ', '_')
      (run.out / f'hlo_{name.lower()}_{slug}.txt').write_text(text)
      calls_in = [
        line.strip() for line in text.splitlines() if 'custom-call' in line and 'conv' in line
      ]
      example = calls_in[0][:300] if calls_in else ''
      notes.append(f'- {form}: {len(calls_in)} convolution custom calls, e.g. `{example}`')
  medians = timing.interleaved_medians(calls, sizes['runs'], sizes['warmup'])
  flags = os.environ.get('XLA_FLAGS', '')
  rates = {form: sizes['batch'] / seconds for form, (seconds, _) in medians.items()}
  for form, (_, all_seconds) in medians.items():
    run.row(
      {
        'kind': 'lever',
        'model': name,
        'dtype': dtype,
        'form': form,
        'images_per_sec': rates[form],
        'over_unfused': rates[form] / rates['unfused'],
        'all_seconds': all_seconds,
        'xla_flags': flags,
      }
    )
  cells = ' | '.join(f'{rate:,.0f} ({rate / rates["unfused"]:.2f}x)' for rate in rates.values())
  run.say(f'| {name} | {dtype} | {cells} | {flags} |')
  return notes


def per_block(run: Run, name: str = 'B2', dtype: str = 'float32') -> None:
  """Each distinct block of ``name`` alone, in eval mode, unfused and fused (with and
  without XLA's cuDNN conv fusion), at the check's batch and image size, weighted
  by how many such blocks the model has: where the fused model spends its time."""
  import collections

  import jax.numpy as jnp

  from repvgg_jax.bench import timing
  from repvgg_jax.bench.models import randomized_variables
  from repvgg_jax.model import RepVGGBlock, create_model, fuse_block, shapes

  sizes = _sizes(run)
  params = create_model(name, deploy=True).abstract_variables(sizes['size'])['params']
  layers = collections.Counter(
    (side, block.in_channels, block.out_channels, block.groups, block.stride)
    for side, block in shapes.block_layers(params, sizes['size'])
  )
  run.say('', f'{name}, {dtype}, block by block (ms per call of one block; x: blocks alike):', '')
  run.say(
    '| input | channels | groups | stride | x | unfused | fused | fused, no cuDNN conv fusion '
    '| fused/unfused |',
    '|---|---|---:|---:|---:|---:|---:|---:|---:|',
  )
  totals = collections.Counter()
  for (side, in_channels, features, groups, stride), count in layers.items():
    shape = f'| {side}x{side} | {in_channels}->{features} | {groups} | {stride} | {count} |'
    if run.step_left() < 15:
      run.say(f'{shape} (skipped: time budget spent) | | | |')
      continue
    images = jnp.zeros((sizes['batch'], side, side, in_channels), jnp.float32)
    block = RepVGGBlock(features, strides=stride, groups=groups, dtype=jnp.dtype(dtype))
    variables = randomized_variables(block, images)
    fused = {'params': fuse_block(variables['params'], variables['batch_stats'])}
    deploy = block.clone(deploy=True)
    calls, _ = _compile_forms(
      {
        'unfused': (block, variables, None),
        'fused': (deploy, fused, None),
        'fused, no cuDNN conv fusion': (deploy, fused, CONV_FUSION_OFF),
      },
      images,
    )
    medians = timing.interleaved_medians(calls, sizes['runs'], sizes['warmup'])
    ms = {form: seconds * 1e3 for form, (seconds, _) in medians.items()}
    totals.update({form: count * value for form, value in ms.items()})
    run.row(
      {
        'kind': 'block',
        'model': name,
        'dtype': dtype,
        'batch': sizes['batch'],
        'side': side,
        'in_channels': in_channels,
        'features': features,
        'groups': groups,
        'stride': stride,
        'count': count,
        'ms': ms,
      }
    )
    cells = ' | '.join(f'{value:.3f}' for value in ms.values())
    run.say(f'{shape} {cells} | {ms["unfused"] / ms["fused"]:.2f}x |')
  if totals:
    cells = ' | '.join(f'{value:.2f}' for value in totals.values())
    ratio = totals['unfused'] / totals['fused']
    run.say(f'| all blocks (sum of x times ms) | | | | | {cells} | {ratio:.2f}x |')


def all_levers(run: Run) -> None:
  run.say('', '## 2. The levers: images/s (over unfused)', '')
  run.say(
    '| model | dtype | unfused | fused | fused, no cuDNN conv fusion | fused, bias apart '
    '| fused, NCHW | XLA_FLAGS |',
    '|---|---|---:|---:|---:|---:|---:|---|',
  )
  notes = []
  for index, (name, dtype) in enumerate(LEVER_RUNS):
    if run.step_left() < 40:
      run.say(f'| {name} | {dtype} | (skipped: time budget spent) | | | | | |')
      continue
    notes += levers(run, name, dtype, dump=index == 0)  # B2's compiled programs.
  # Written before the children run: one that outlasts its time loses nothing here.
  (run.out / 'hlo_notes.md').write_text('\n'.join(notes) + '\n')
  child_levers(run)
  run.say('', f'{LEVER_RUNS[0][0]}, {LEVER_RUNS[0][1]}, compiled (hlo_*.txt):', '', *notes)
  per_block(run, *LEVER_RUNS[0])


def child_levers(run: Run) -> None:
  """`levers` of B2 in a child process per entry of `CHILD_FLAGS` (flags are read at start)."""
  for label, added in CHILD_FLAGS.items():
    if run.step_left() < 40:
      run.say(f'- {label}: skipped (time budget spent)')
      continue
    flags = f'{os.environ.get("XLA_FLAGS", "")} {added.format(out=run.out)}'.strip()
    child_out = run.out / f'child_{label.replace(" ", "_")}'
    child = [sys.executable, __file__, '--out', str(child_out), '--only', 'levers']
    child += ['--budget', str(int(run.step_left()))] + (['--smoke'] if run.smoke else [])
    try:
      result = subprocess.run(
        child,
        env=dict(os.environ, XLA_FLAGS=flags),
        capture_output=True,
        text=True,
        timeout=max(30, run.step_left()),
      )
    except subprocess.TimeoutExpired:
      run.say(f'- {label}: stopped at the end of its time (its rows so far: {child_out.name}/)')
      continue
    lines = [line for line in result.stdout.splitlines() if line.startswith('| B2')]
    run.say(*lines)
    if result.returncode:
      run.say(f'- {label}: failed: {result.stderr.strip()[-300:]}')


def raised_bars(run: Run) -> None:
  import jax

  from repvgg_jax.bench import models, timing

  sizes = _sizes(run)
  run.say('', '## 3. The raised bars (bfloat16, batch 256)', '')
  peak = timing.roofline('bfloat16', runs=3)
  run.row(peak)
  common = (sizes['big_batch'], sizes['size'], sizes['runs'], sizes['warmup'])
  options = {'dtype': 'bfloat16', 'conv_impl': 'xla', 'peak_gflops': timing.peak_of(peak)}
  train = models.benchmark_train_step('B0', *common, **options)
  infer = models.benchmark('A0', *common, **options)
  run.row(train)
  run.row(infer)
  share = lambda part: f'{part["roofline_share"]:.0%}' if part.get('roofline_share') else '?'
  b0, a0 = train['jax'], infer['deploy']
  run.say(
    f'bfloat16 convolution peak {peak["conv_gflops_per_sec"] / 1e3:,.0f} TFLOP/s',
    f'- B0 training: {b0["images_per_sec"]:,.0f} img/s (goal 15,000; {share(b0)} of the peak)',
    f'- A0 fused: {a0["images_per_sec"]:,.0f} img/s (goal 100,000; {share(a0)} of the peak)',
  )
  run.model_rate = train['jax']['images_per_sec']
  profiles = {  # A0's calls are its unfused and its fused model's.
    'B0 training': ('B0', models.benchmark_train_step),
    'A0 inference': ('A0', models.benchmark),
  }
  for label, (name, bench) in profiles.items():
    if run.step_left() < 20:
      run.say(f'- {label}: kernels not profiled (time budget spent)')
      continue
    trace = SCRATCH / f'gpu_check_trace_{name}'
    shutil.rmtree(trace, ignore_errors=True)
    with jax.profiler.trace(str(trace)):  # The same programs, from the compilation cache.
      bench(name, sizes['big_batch'], sizes['size'], 3, 1, **options)
    total, top = top_kernels(trace)
    run.row({'kind': 'profile', 'model': label, 'device_ns': total, 'top': top})
    run.say(f'- {label}: the kernels that take the most GPU time (a warm-up, 3 timed calls):')
    run.say(*[f'  - {share:.0%} {kernel[:120]}' for kernel, share in top] or ['  (no GPU kernels)'])


def top_kernels(trace_dir: pathlib.Path, count: int = 8) -> tuple[float, list]:
  """The device time of a profiler trace, in ns, and its ``count`` largest kernels
  as ``(name, share of the device time)``: the events on the GPU planes' streams."""
  from jax.profiler import ProfileData

  files = sorted(trace_dir.rglob('*.xplane.pb'))
  if not files:
    return 0.0, []
  totals = {}
  for plane in ProfileData.from_file(str(files[-1])).planes:
    if not plane.name.startswith('/device:GPU'):
      continue
    for line in plane.lines:
      if line.name.startswith('Stream'):
        for event in line.events:
          totals[event.name] = totals.get(event.name, 0.0) + event.duration_ns
  total = sum(totals.values())
  if not total:  # A CPU run: no GPU plane.
    return 0.0, []
  top = sorted(totals.items(), key=lambda item: -item[1])[:count]
  return total, [(name, ns / total) for name, ns in top]


def _installed(module: str) -> bool:
  """Whether ``module`` can be imported (a dotted name's parents included)."""
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


def end_to_end(run: Run) -> None:
  run.say('', '## 4. train.py on JPEGs, end to end', '')
  missing = [name for name in END_TO_END_NEEDS if not _installed(name)]
  if missing:
    # Not requirements.txt on an image with a newer JAX: it would install jax 0.10 beside it.
    packages = ' '.join(END_TO_END_NEEDS[name] for name in missing)
    run.say(f'skipped: {", ".join(missing)} not installed (pip install {packages}).')
    return
  from repvgg_jax.bench import input as bench_input

  classes, train_per_class, val_per_class = (4, 8, 2) if run.smoke else (100, 30, 5)
  root = SCRATCH / 'gpu_check_jpegs'
  workdir = root.parent / 'gpu_check_workdir'
  for old in (root, workdir):  # A fresh run: an old workdir would resume, not train.
    shutil.rmtree(old, ignore_errors=True)
  sizes = _sizes(run)
  steps = 8 if run.smoke else 150
  jpegs = iter(_jpegs_on_every_core(classes * (train_per_class + val_per_class)))
  # Each training JPEG under several names (hard links): one epoch outlasts the run, as
  # ImageNet's 5,000 steps would, not a new tf.data pipeline every few steps.
  copies = -(-steps * sizes['big_batch'] // (classes * train_per_class))
  for split, count in (('train', train_per_class), ('val', val_per_class)):
    for cls in range(classes):
      folder = root / split / f'n{cls:08d}'
      folder.mkdir(parents=True, exist_ok=True)
      for index in range(count):
        first = folder / f'{index}.jpg'
        first.write_bytes(next(jpegs))
        for copy in range(1, copies if split == 'train' else 1):
          os.link(first, folder / f'{index}_{copy}.jpg')
  command = [
    sys.executable,
    str(ROOT / 'train.py'),
    '--config',
    str(ROOT / 'configs' / 'b0.py'),
    f'--workdir={workdir}',
    '--config.dataset.name=folder',
    f'--config.dataset.data_dir={root}',
    f'--config.dataset.num_classes={classes}',
    '--config.model.dtype=bfloat16',
    f'--config.batch_size={sizes["big_batch"]}',
    f'--config.eval_batch_size={sizes["big_batch"]}',
    f'--config.num_train_steps={steps}',
    f'--config.log_every_steps={4 if run.smoke else 25}',  # Rates are logged.
    '--config.eval_every_epochs=0',
    '--config.checkpoint_every_steps=100000',
    '--config.progress_bar=False',
    f'--config.dataset.image_size={sizes["size"]}',
    '--config.model.bn_group_size=0',
  ]
  if run.smoke:
    command += ['--config.model.conv_impl=xla']
  log_path = run.out / 'train_log.txt'  # Written as it runs: kept if it is stopped.
  with open(log_path, 'w') as log:
    try:  # The input bench below keeps ~40 s.
      returncode = subprocess.run(
        command, stdout=log, stderr=subprocess.STDOUT, timeout=max(30, run.step_left() - 40)
      ).returncode
    except subprocess.TimeoutExpired:
      returncode = 'timeout'
  summary = json.loads((workdir / 'summary.json').read_text()) if returncode == 0 else {}
  rate = summary.get('train_images_per_sec')
  run.row({'kind': 'end_to_end', 'returncode': returncode, **summary})
  model_rate = getattr(run, 'model_rate', None)
  if returncode:  # The input bench below still runs: it needs no train.py.
    last = (log_path.read_text().strip().splitlines() or [''])[-1][:300]
    run.say(f'train.py failed (exit {returncode}; train_log.txt): {last}')
  else:
    run.say(
      f'train.py: {rate or 0:,.0f} img/s over {steps} steps (model only: {model_rate or 0:,.0f})'
    )
  # The rate the input pipeline must reach: the model's; the loop's may be the pipeline's.
  goal = model_rate or rate or 1.0
  rows = bench_input.benchmark_input(128 if run.smoke else 512, sizes['size'], 2, goal)
  for row in rows:
    run.row(row)
  run.say('', bench_input.format_input(rows))


def _jpegs_on_every_core(count: int) -> list[bytes]:
  """`bench.input.make_jpegs`' ``count`` JPEGs, made in one process per core (a seed
  each; spawned, as TensorFlow is loaded here)."""
  import concurrent.futures
  import multiprocessing

  from repvgg_jax.bench import input as bench_input

  workers = max(1, min(16, os.cpu_count() or 1, count))
  parts = [count // workers + (index < count % workers) for index in range(workers)]
  context = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    made = pool.map(bench_input.make_jpegs, parts, range(workers))
    return [jpeg for part in made for jpeg in part]


def guarded(run: Run, step, *args) -> None:
  """``step(run, *args)``; an error ends that step only: the device is lent once, so
  the later steps still run. The error is said in one line, its traceback kept in
  ``errors.txt``."""
  try:
    step(run, *args)
  except Exception as error:  # noqa: BLE001 - every step's failure is reported, not raised.
    with open(run.out / 'errors.txt', 'a') as errors:
      errors.write(f'# {step.__name__}\n{traceback.format_exc()}\n')
    message = (str(error).strip().splitlines() or [''])[0][:300]
    run.say('', f'{step.__name__} failed: {type(error).__name__}: {message} (errors.txt)')


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='directory for summary.md and results.jsonl')
  parser.add_argument('--budget', type=float, default=450, help='seconds for all the checks')
  parser.add_argument('--smoke', action='store_true', help='tiny sizes: check the script on a CPU')
  parser.add_argument('--only', choices=['levers'], help=argparse.SUPPRESS)  # Child processes.
  args = parser.parse_args(argv)
  _start_up()
  run = Run(pathlib.Path(args.out), args.budget, args.smoke)
  if args.only == 'levers':  # A child of child_levers: its lines go to the parent.
    levers(run)
    return 0
  if versions(run) not in ('gpu', 'cuda') and not args.smoke:
    run.say('', 'No GPU: JAX runs on the CPU here (check the CUDA plugin); nothing timed.')
    return 1
  variants = VARIANTS[-2:] if args.smoke else VARIANTS
  # Each step with the share of the budget spent when its time ends, and its arguments.
  steps = (
    (0.30, fused_against_unfused, variants),
    (0.58, all_levers),
    (0.72, raised_bars),
    (1.0, end_to_end),
  )
  for share, *step in steps:
    run.until(share)
    if run.left() > 30:
      guarded(run, *step)
  run.say('', f'done with {run.left():.0f} s of the budget left')
  return 0


def _start_up() -> None:
  """Before JAX starts: TensorFlow quiet as in train.py, GPU memory taken as needed
  (the lever children and train.py share the GPU), and a compilation cache so the
  profiled calls and the children reuse what was compiled."""
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  cache = SCRATCH / 'gpu_check_xla_cache'
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(cache))  # Read as JAX is imported:
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  from repvgg_jax.startup import quiet_startup  # ...which this does.

  quiet_startup()


if __name__ == '__main__':
  sys.exit(main())

"""Trains RepVGG: python train.py --config configs/digits.py [--workdir DIR].

A thin entry point: flags, device set-up, then
`repvgg_jax.train.trainer.train_and_evaluate`.
"""

import os
import signal
import sys

from repvgg_jax.perf import host_memory
from repvgg_jax.startup import parse_flags, quiet_startup

quiet_startup()  # Before JAX picks its backend and TensorFlow loads.

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'Training config file, e.g. configs/b0.py.', lock_config=True
)
flags.DEFINE_string(
  'workdir', None, 'Directory for checkpoints and logs (default: workdirs/<config name>).'
)
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host runs).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (default: auto-detect).')
flags.DEFINE_integer('num_processes', None, 'Processes in a multi-host run (default: auto-detect).')
flags.DEFINE_integer('process_id', None, 'This process, 0 ... num_processes - 1.')
flags.DEFINE_string(
  'compilation_cache',
  os.path.join('~', '.cache', 'repvgg_jax', 'xla'),
  "JAX's persistent compilation cache: a rerun or resumed run skips compiling its programs "
  "again ('' turns it off; the JAX_COMPILATION_CACHE_DIR environment variable wins).",
)
flags.DEFINE_bool(
  'reuse_host_memory',
  False,
  'On CPU-only runs under glibc, keep freed host memory for reuse instead of mapping each '
  "step's temporaries afresh (repvgg_jax.perf.host_memory): faster steps, slower compiling; "
  'for long runs (docs/performance.md, "Host memory").',
)
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.reuse_host_memory:
    host_memory.reuse_freed_memory()  # Before JAX's backend and TensorFlow start threads.
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  import jax
  import tensorflow as tf

  # TensorFlow must not take GPU memory that JAX needs.
  tf.config.set_visible_devices([], 'GPU')
  if FLAGS.compilation_cache and not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(FLAGS.compilation_cache))
    if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
      # The fusion compiles in about a second or less: under JAX's default threshold (1 s)
      # it would compile again on every rerun (docs/performance.md, "Where the goals stand").
      jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.1)
  if FLAGS.distributed:
    # Slurm, Open MPI, Kubernetes and Cloud TPU are detected; elsewhere pass the flags.
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from repvgg_jax.train import trainer
  from repvgg_jax.train.reporting import closing_line

  workdir = FLAGS.workdir or os.path.join(
    'workdirs',
    os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS['config'])))[0],
  )
  logging.info(
    'JAX %s: process %d of %d, devices %s',
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.devices(),
  )
  print(
    f'Training {FLAGS.config.model.name} on {FLAGS.config.dataset.name} with '
    f'{jax.device_count()} {jax.default_backend()} device(s); workdir {workdir}',
    flush=True,
  )
  try:
    summary = trainer.train_and_evaluate(FLAGS.config, workdir)
  except trainer.RUN_ERRORS as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:  # A second Ctrl-C, or one before the training loop.
    print(
      f'\nInterrupted: the same command resumes from the last checkpoint in {workdir}.',
      file=sys.stderr,
    )
    return 128 + signal.SIGINT
  if summary.get('preempted'):  # Stopped after saving; the same command resumes.
    return 128 + signal.Signals[summary['preempted']]  # 143 (SIGTERM) or 130 (Ctrl-C).
  print(closing_line(summary, workdir))
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)

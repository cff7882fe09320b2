"""`python -m repvgg_jax.ablate --config CONFIG`: see `repvgg_jax.ablate.runner`."""

import os
import signal
import sys
import time

from repvgg_jax.startup import parse_flags, quiet_startup

quiet_startup()  # Before JAX picks its backend and TensorFlow loads, as in train.py.

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file(
  'config', None, 'Ablation config file, e.g. configs/ablation_digits.py.', lock_config=True
)
flags.DEFINE_string(
  'workdir', None, 'Directory of the rows and the reports (default: workdirs/<config name>).'
)
flags.DEFINE_bool(
  'reuse_host_memory', False, 'As train.py: keep freed host memory for reuse on CPU-only runs.'
)
flags.mark_flags_as_required(['config'])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if flags.FLAGS.reuse_host_memory:
    from repvgg_jax.perf import host_memory

    host_memory.reuse_freed_memory()  # Before JAX's backend and TensorFlow start threads.
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  # Imported once the flags are parsed: --help and a mistyped flag answer at once.
  import jax
  import tensorflow as tf

  from repvgg_jax.ablate.runner import Preempted, run_ablation
  from repvgg_jax.train import trainer

  tf.config.set_visible_devices([], 'GPU')  # TensorFlow must not take GPU memory that JAX needs.
  config = flags.FLAGS.config
  config_file = config_flags.get_config_filename(flags.FLAGS['config'])
  workdir = flags.FLAGS.workdir or os.path.join(
    'workdirs', os.path.splitext(os.path.basename(config_file))[0]
  )
  print(
    f'Ablation of {config.model.name} on {config.dataset.name} with {jax.device_count()} '
    f'{jax.default_backend()} device(s); workdir {workdir}',
    flush=True,
  )
  start = time.perf_counter()
  try:
    table = run_ablation(config, workdir, log=lambda line: print(line, flush=True))
  except trainer.RUN_ERRORS as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  except Preempted as error:
    print(error, file=sys.stderr)
    return 128 + signal.Signals[error.signal_name]
  except KeyboardInterrupt:  # A second Ctrl-C, or one outside a training loop.
    print(
      f'\nInterrupted: the same command continues; finished runs in {workdir} are kept.',
      file=sys.stderr,
    )
    return 128 + signal.SIGINT
  print(f'\n{table}')
  print(
    f'Done in {time.perf_counter() - start:,.0f} s. Wrote {workdir}/ablation.md, '
    f'ablation.csv and ablation.png; each row is in {workdir}/<row>.'
  )
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)

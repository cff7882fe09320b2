"""Trains `helpers.tiny_config` in a fresh process, for tests that need one.

    python tests/train_runner.py WORKDIR DATA_DIR OVERRIDES_JSON [PROCESS_ID NUM_PROCESSES PORT]

The device count comes from the caller's XLA_FLAGS. With the last three
arguments the process joins a multi-process run on loopback (gloo collectives).
With REPVGG_TEST_SECONDS_PER_BATCH set, each training batch is read that much
later, which gives a test that kills the run a wide window between two steps.
With REPVGG_TEST_MAX_FILE_BYTES set, no file may grow past that size (as on a full
disk, writes beyond it fail: EFBIG), and a failed save prints one line as train.py does.
"""

import json
import os
import resource
import signal
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from repvgg_jax.startup import quiet_startup  # noqa: E402

quiet_startup()  # As train.py: TensorFlow's C++ start-up logs off.

import jax  # noqa: E402


def main(argv):
  workdir, data_dir, overrides = argv[1], argv[2], json.loads(argv[3])
  if len(argv) > 4:
    process_id, num_processes, port = (int(a) for a in argv[4:7])
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes, process_id)
  import helpers

  from repvgg_jax import checkpointing
  from repvgg_jax.data import datasets as data
  from repvgg_jax.train import trainer

  delay = float(os.environ.get('REPVGG_TEST_SECONDS_PER_BATCH', 0))
  if delay:

    def read_later(step, batch):
      time.sleep(delay)
      return batch

    data.train_batches = helpers.intercepted_train_batches(read_later)

  config = helpers.tiny_config(data_dir, **overrides)
  max_bytes = int(os.environ.get('REPVGG_TEST_MAX_FILE_BYTES', 0))
  if max_bytes:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Let the write fail rather than kill.
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
  try:
    summary = trainer.train_and_evaluate(config, workdir)
  except checkpointing.CheckpointWriteError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(1)
  print(json.dumps(summary))


if __name__ == '__main__':
  main(sys.argv)

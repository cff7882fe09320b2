"""Quiet start-up for the command-line entry points (train, ablate, bench).

TensorFlow only feeds data here, so its C++ logs and oneDNN kernels are off.
Without an NVIDIA driver the CUDA plugin that ``jax[cuda12]`` installs cannot
start; JAX then uses the CPU after logging a long traceback that helps nobody,
so on such a machine that one message is filtered out. Call `quiet_startup`
before JAX picks its backend and before TensorFlow is imported.
"""

import glob
import logging
import os


def _not_cuda_probe(record: logging.LogRecord) -> bool:
  return 'xla_cuda12' not in record.getMessage()


def quiet_startup() -> None:
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  if not glob.glob('/dev/nvidia[0-9]*'):
    logger = logging.getLogger('jax._src.xla_bridge')
    if _not_cuda_probe not in logger.filters:
      logger.addFilter(_not_cuda_probe)

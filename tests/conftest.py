"""Test set-up: the CPU backend, a compilation cache per session, fast compilation, the
helpers importable."""

import gc
import os
import shutil
import sys
import tempfile

import pytest

# Tests run on the CPU; this also keeps the CUDA plugin from probing for a GPU.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/


def pytest_configure(config):
  _compilation_cache(config)
  _fast_compilation()


def _compilation_cache(config):
  """One persistent compilation cache for the session, new each time.

  On the CPU compiling dominates the tests, and many compile the same programs:
  the interrupted and uninterrupted runs, the two xdist workers, the trainer's
  subprocesses. A cached executable is the one XLA would compile, so no check
  changes; a new directory per session reuses nothing from an earlier run. It is
  set before JAX is imported; xdist workers and subprocesses inherit it.
  """
  if 'JAX_COMPILATION_CACHE_DIR' in os.environ:  # The user's, or (xdist worker) the session's.
    return
  directory = tempfile.mkdtemp(prefix='repvgg-jax-test-compilation-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = directory
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
  config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))


def _fast_compilation():
  """Every program of the tests compiled as `perf.compile_options` compiles the
  trainer's initialisation: XLA's fast-compile preset and LLVM's -O1.

  Much of the suite's time is XLA compiling small programs that then run once;
  these options cut the equivalence checks' time by a third, and they keep their
  tolerances (docs/performance.md, "Compiler options": the outputs agree to float
  rounding). -O1 goes into XLA_FLAGS, which subprocesses inherit. The preset
  cannot: TensorFlow's own XLA (the export tests run TF) dies on a flag it does not
  know, and it reads XLA_FLAGS when it first compiles. JAX's XLA reads XLA_FLAGS
  once, at its first compilation, so this process compiles one program with the
  preset set, then takes it out again. A preset or level of the user's is kept.
  """
  import jax
  import jax.numpy as jnp

  from repvgg_jax.perf import compile_options

  as_flags = lambda options: ' '.join(f'--{name}={value}' for name, value in options.items())
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_backend_optimization_level' not in flags:
    flags = f'{flags} {as_flags(compile_options.CPU_LIGHT_CODEGEN)}'.strip()
    os.environ['XLA_FLAGS'] = flags
  if 'xla_cpu_opt_preset' in flags:
    return
  os.environ['XLA_FLAGS'] = f'{flags} {as_flags(compile_options.CPU_FAST_COMPILE)}'
  try:
    jax.jit(jnp.negative)(1.0).block_until_ready()
  finally:
    os.environ['XLA_FLAGS'] = flags


def pytest_sessionfinish(session):
  """Collects the garbage once and freezes what is left, before xdist reports the
  worker finished (its hook wraps this one).

  As it unconfigures, pytest collects garbage 5 times to surface unraisable
  exceptions; over a worker's heap after a few hundred tests (millions of
  objects, JAX's collection callback on each pass) that outlasted the 5 s execnet
  waits before it sends the worker a SIGINT, and the KeyboardInterrupt inside
  JAX's callback was printed as a PytestUnraisableExceptionWarning above the
  final line. Frozen objects are not traversed again; this collection still
  reports what it finds.
  """
  gc.collect()
  gc.freeze()


def pytest_collection_modifyitems(items):
  # The end-to-end training tests are the longest (subprocesses, several runs): started
  # first, they leave the short tests to fill both xdist workers at the end. Their order,
  # and every other test's, is kept (module fixtures stay shared).
  items.sort(key=lambda item: item.path.name != 'test_train.py')


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  """A tfds data dir with the embedded digits prepared, once per test module."""
  from helpers import tiny_config

  from repvgg_jax.data import datasets as data

  data_dir = str(tmp_path_factory.mktemp('tfds'))
  data.get_builder(tiny_config(data_dir).dataset)
  return data_dir

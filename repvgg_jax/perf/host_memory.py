"""Host memory kept for reuse on long CPU-only runs: glibc's malloc stops unmapping big blocks.

Each call of a compiled program on XLA:CPU allocates its temporary buffers
afresh (94 MB for the digits config's training step). glibc's malloc serves
blocks that big with a new ``mmap`` and returns them with ``munmap``, so the
kernel zero-fills every page again at its first touch in each step. Worker
threads allocate from arenas of their own, which fall back to ``mmap`` for any
block larger than an arena's heap, so forbidding mappings alone does not help:
one arena, no mappings and no trimming (`reuse_freed_memory`) keep freed blocks
in the process instead. The one arena serializes the compiler's threads, so it
is off by default (``train.py --reuse_host_memory`` turns it on), for runs whose
steps outlast their compiling. Measured gains and costs: docs/performance.md,
"Host memory".

Only the process's own malloc changes; the results are bitwise the same. The
settings must be made before JAX starts its backend (the first device query
or computation), while no worker thread has an arena yet: the entry points
call it first thing. Not applied where an accelerator may run the program
(where many host threads that one arena would serialize do the input
pipeline's work, and where this was not measured), nor off glibc. Even with
one arena, the heap grows for some of the first calls, until it holds the
blocks in every order the threads ask for them (the test counts the calls that
fault nothing in).
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys

# mallopt(3) parameters (malloc.h) and the values set.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
SETTINGS = (
  (_M_ARENA_MAX, 1),  # Every thread allocates from the main arena, which grows without bound...
  (_M_MMAP_MAX, 0),  # ...so no block needs a mapping of its own...
  (_M_TRIM_THRESHOLD, 2**31 - 1),  # ...and freed memory at the heap's top stays (up to 2 GiB).
)
# Device files of the accelerators JAX can run on: NVIDIA, AMD, TPU (two kinds).
ACCELERATOR_DEVICES = ('/dev/nvidia[0-9]*', '/dev/kfd', '/dev/accel[0-9]*', '/dev/vfio/[0-9]*')
_applied = False  # Whether this process made the settings (they cannot be undone).


def cpu_only(platforms: str | None = None) -> bool:
  """Whether JAX will run on the CPU: ``JAX_PLATFORMS`` says so, or no accelerator is attached.

  ``platforms`` defaults to the ``JAX_PLATFORMS`` environment variable; its
  first entry is the backend JAX prefers.
  """
  platforms = os.environ.get('JAX_PLATFORMS', '') if platforms is None else platforms
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES)


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed blocks (module docstring) on CPU-only runs.

  Call before JAX starts its backend. Returns whether the settings were made:
  False off Linux's glibc or where an accelerator may run the program.
  """
  if sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc' or not cpu_only():
    return False
  global _applied
  mallopt = ctypes.CDLL(None).mallopt
  _applied = all(mallopt(option, value) == 1 for option, value in SETTINGS)
  return _applied


def state() -> str:
  """'reused' once `reuse_freed_memory` made its settings in this process, else 'default'."""
  return 'reused' if _applied else 'default'

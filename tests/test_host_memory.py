"""host_memory: on CPU-only runs under glibc, a program's big temporaries stop faulting in anew."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from repvgg_jax.perf import host_memory

GLIBC = sys.platform == 'linux' and platform.libc_ver()[0] == 'glibc'

# A program with a 64 MiB temporary (cos(x), which the product with a 1024x64 slice
# of x makes XLA write out), called 40 times in a fresh process; prints whether the
# settings were made and each call's page faults.
FAULTS_PER_CALL = textwrap.dedent(
  """
  import json, resource, sys
  from repvgg_jax.perf import host_memory
  applied = host_memory.reuse_freed_memory() if sys.argv[1] == 'reuse' else False
  import jax, jax.numpy as jnp
  f = jax.jit(lambda x: jnp.sum(jnp.sin(jnp.cos(x) @ x[0, :, :64])))
  x = jnp.ones((16, 1024, 1024))
  faults = []
  for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  print(json.dumps([applied, faults]))
  """
)


def _faults_per_call(mode: str) -> tuple[bool, list[int]]:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  out = subprocess.run(
    [sys.executable, '-c', FAULTS_PER_CALL, mode],
    env=env,
    capture_output=True,
    text=True,
    check=True,
    timeout=300,
  ).stdout
  return tuple(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.skipif(not GLIBC, reason='the settings are glibc malloc options')
def test_big_temporaries_are_reused_not_faulted_in_again():
  """Each call faults in its 64 MiB temporary afresh (16,384 pages), unless reused.

  With reuse the heap still grows for some calls, until it holds the blocks in
  every order the two threads ask for them (up to the 27th call in 13 runs, at most
  one of the last 24): most of the last 24 calls must fault in nothing.
  """
  applied, plain = _faults_per_call('plain')
  assert not applied and min(plain[16:]) > 16_384, plain
  applied, reuse = _faults_per_call('reuse')
  assert applied
  assert sum(count < 1_000 for count in reuse[16:]) >= 16, reuse


@pytest.mark.parametrize(
  'platforms, expected', [('cpu', True), ('cpu,cuda', True), ('cuda', False), ('tpu,cpu', False)]
)
def test_jax_platforms_decides(platforms, expected):
  assert host_memory.cpu_only(platforms) is expected


def test_attached_accelerators_decide_without_jax_platforms(monkeypatch):
  monkeypatch.setattr(host_memory.glob, 'glob', lambda pattern: [])
  assert host_memory.cpu_only('')
  monkeypatch.setattr(
    host_memory.glob, 'glob', lambda pattern: ['/dev/nvidia0'] if 'nvidia' in pattern else []
  )
  assert not host_memory.cpu_only('')


def test_not_applied_where_an_accelerator_may_run(monkeypatch):
  def fail(*args):
    raise AssertionError('mallopt must not be called')

  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  monkeypatch.setattr(host_memory.ctypes, 'CDLL', fail)
  assert host_memory.reuse_freed_memory() is False

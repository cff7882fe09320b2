"""`python -m repvgg_jax.convert`: see `repvgg_jax.interop.convert`."""

import signal
import sys

from repvgg_jax.startup import quiet_startup


def _unwind_on_sigterm() -> None:
  """A SIGTERM raises SystemExit(143) in the main thread, so that the command unwinds:
  its staging directory (a half-written output) is removed rather than left behind."""

  def unwind(signum, frame):
    raise SystemExit(128 + signum)

  signal.signal(signal.SIGTERM, unwind)


def main() -> int:
  quiet_startup()  # Before TensorFlow (the input pipeline, SavedModel export) loads.
  _unwind_on_sigterm()
  from repvgg_jax.interop import convert

  return convert.main()


if __name__ == '__main__':
  sys.exit(main())

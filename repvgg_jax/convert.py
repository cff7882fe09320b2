"""`python -m repvgg_jax.convert`: see `repvgg_jax.interop.convert`."""

import sys

from repvgg_jax.startup import quiet_startup


def main() -> int:
  quiet_startup()  # Before TensorFlow (the input pipeline, SavedModel export) loads.
  from repvgg_jax.interop import convert

  return convert.main()


if __name__ == '__main__':
  sys.exit(main())

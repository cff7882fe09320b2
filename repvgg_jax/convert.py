"""`python -m repvgg_jax.convert`: see `repvgg_jax.interop.convert`."""

import sys

from repvgg_jax.interop import convert

if __name__ == '__main__':
  sys.exit(convert.main())

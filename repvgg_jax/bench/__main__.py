"""`python -m repvgg_jax.bench`: see `repvgg_jax.bench.cli`."""

import sys

from repvgg_jax.bench import cli

sys.exit(cli.main())

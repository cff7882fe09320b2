"""`python -m repvgg_jax.bench`: see `repvgg_jax.bench.cli`."""

import sys

from repvgg_jax.startup import quiet_startup

quiet_startup()  # Before JAX picks its backend and TensorFlow loads (deploy, input).

from repvgg_jax.bench import cli  # noqa: E402

sys.exit(cli.main())

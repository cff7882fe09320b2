"""`python -m repvgg_jax.ablate --config CONFIG`: see `repvgg_jax.ablate.runner`."""

import sys

from absl import app, flags

from repvgg_jax.ablate import runner
from repvgg_jax.startup import parse_flags

runner.define_flags()
flags.adopt_module_key_flags(runner)  # --help lists them.
app.run(lambda argv: sys.exit(runner.main(argv)), flags_parser=parse_flags)

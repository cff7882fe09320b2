"""Branch-set ablations (`python -m repvgg_jax.ablate`): train each row, time its
fused and unfused models, and report."""

"""Interop with the rest of the world: PyTorch layouts and the reference network
in PyTorch, checkpoint conversion (`python -m repvgg_jax.convert`) and export."""

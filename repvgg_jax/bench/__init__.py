"""Benchmarks (`python -m repvgg_jax.bench`): fused against training-time models,
JAX against PyTorch, single layers, the machine's peaks; the PyTorch trainer."""

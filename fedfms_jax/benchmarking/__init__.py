"""Pieces of `python -m fedfms_jax.benchmark`: timing statistics, FLOP counting and device
peaks, the JAX federated round, the PyTorch original-style round, and the report."""

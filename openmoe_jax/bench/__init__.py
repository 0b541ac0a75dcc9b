"""Benchmarks of whole-model training throughput (`python -m openmoe_jax.bench.train_step`)."""

"""Kernels: `from openmoe_jax.kernels import gmm as gmm_lib`."""

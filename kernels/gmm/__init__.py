"""Expert grouped matmul (gmm / tgmm) with Pallas GPU/TPU, jax-triton and reference backends."""
from openmoe_jax.kernels.gmm.ops import BACKENDS, gmm, resolve_backend, tgmm
from openmoe_jax.kernels.gmm.tiling import Tiling

__all__ = ["BACKENDS", "Tiling", "gmm", "resolve_backend", "tgmm"]

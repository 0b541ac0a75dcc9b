"""Expert grouped matmul (gmm / tgmm) with Pallas GPU/TPU, jax-triton and reference backends."""
from openmoe_jax.kernels.gmm.glu import gmm_glu
from openmoe_jax.kernels.gmm.ops import (BACKENDS, gmm, gmm_nodiff, resolve_backend, tgmm,
                                         tgmm_rows)
from openmoe_jax.kernels.gmm.tiling import Tiling

__all__ = ["BACKENDS", "Tiling", "gmm", "gmm_glu", "gmm_nodiff", "resolve_backend", "tgmm",
           "tgmm_rows"]

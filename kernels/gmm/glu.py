"""The expert FFN's first layer with its gated activation fused: `gmm_glu`.

    h[m] = act(x[m] @ w_gate[g]) * (x[m] @ w_up[g]),  w = [w_gate | w_up]  ([G, K, 2F])

Unfused, the grouped matmul writes the [M, 2F] product and XLA reads it back to form the
[M, F] rows. On a Hopper GPU (`pallas_mgpu_ring` with `glu=`, on a ring tile: `fused_tiling`)
each K step loads the gate and the up block of a column tile, each warpgroup keeps two
accumulators, and the kernel writes h only.

The backward recomputes the [M, 2F] product with the plain kernel (nothing [M, 2F] is kept
from the forward), then runs the usual dx / dW kernels on the activation's gradient. So
the fusion pays in forward-only use (evaluation, generation, or a backward that would
recompute the forward under remat anyway) and where K is short next to F (docs/kernels.md
has the measurements); in a training step that keeps the product it adds one grouped
matmul. Elsewhere (CPU, TPU, other GPUs, activations the kernel lacks) the op is the plain
gmm followed by the activation, with the same VJP.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from openmoe_jax.kernels.gmm import ops, tuning
from openmoe_jax.kernels.gmm.tiling import Tiling

DEFAULT_TILING = Tiling(tm=128, tn=256, tk=64, num_warps=8, num_stages=4, group_m=8, ring=2)
AUTO_MAX_K = 2048  # "auto" fuses up to this K (longer K: the product's extra pass is cheap)
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "identity": lambda x: x,
}


def _gated(activation: str, in_MF2):
  """act(gate) * up in float32 from the [M, 2F] product."""
  f = in_MF2.shape[1] // 2
  gate, up = in_MF2[:, :f].astype(jnp.float32), in_MF2[:, f:].astype(jnp.float32)
  return ACTIVATIONS[activation](gate) * up


def fused_tiling(lhs_MK, w_GK2F, activation: str, backend: str,
                 tiling: Tiling | None) -> Tiling | None:
  """The pallas_mgpu ring tile that runs the call fused, or None (unfused). `backend`
  "pallas_mgpu" asks for it; "auto" takes it on a Hopper GPU when K <= AUTO_MAX_K (H100:
  1.19x at K = 768, 1.02x at 2048, 0.98x at 4096; docs/kernels.md). The tile: `tiling`, else
  a measured ring tile of a plain gmm of the same K and 2F (else F) columns, else
  DEFAULT_TILING (the one those measurements used)."""
  m, k = lhs_MK.shape
  resolved = ops.resolve_backend(backend)
  wants = resolved == "pallas_mgpu" or (backend == "auto" and resolved == "pallas_gpu"
                                        and k <= AUTO_MAX_K
                                        and ops._hopper())  # noqa: SLF001 - same package
  if not wants or lhs_MK.dtype not in (jnp.bfloat16, jnp.float16):
    return None
  g, _, f2 = w_GK2F.shape
  t = tiling
  for n in (f2, f2 // 2):
    t = t or tuning.tuned("pallas_mgpu", "gmm", m=m, k=k, n=n, g=g, dtype=lhs_MK.dtype,
                          gather=False)
  if tiling is None and (t is None or not t.ring):
    t = DEFAULT_TILING
  from openmoe_jax.kernels.gmm import pallas_mgpu  # noqa: PLC0415 - GPU-only module
  fits = pallas_mgpu.supports(lhs_MK.dtype, gather=False, k=k, n=f2, t=t, op="gmm",
                              glu=activation)
  return t if fits is None else None


def gmm_glu(lhs_MK: jax.Array, w_GK2F: jax.Array, group_sizes_G: jax.Array, *,
            activation: str = "silu", backend: str = "auto", tiling: Tiling | None = None,
            interpret: bool = False) -> jax.Array:
  """[M, F] in lhs's dtype: act(lhs @ w[..., :F]) * (lhs @ w[..., F:]) per group, rows sorted
  by group, rows past sum(group_sizes) zero. Differentiable in lhs and w."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r}; expected one of {sorted(ACTIVATIONS)}")
  if w_GK2F.ndim != 3 or w_GK2F.shape[2] % 2 or lhs_MK.shape[1] != w_GK2F.shape[1]:
    raise ValueError(f"gmm_glu wants lhs[M, K] and [gate | up] weights w[G, K, 2F]; got "
                     f"{lhs_MK.shape} and {w_GK2F.shape}")
  return _gmm_glu(activation, backend, tiling, interpret, lhs_MK, w_GK2F,
                  group_sizes_G.astype(jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _gmm_glu(activation, backend, tiling, interpret, lhs_MK, w_GK2F, sizes_G):
  t = fused_tiling(lhs_MK, w_GK2F, activation, backend, tiling)
  if t is not None:
    from openmoe_jax.kernels.gmm import pallas_mgpu  # noqa: PLC0415 - GPU-only module
    return pallas_mgpu.gmm(lhs_MK, w_GK2F, sizes_G, tiling=t, interpret=interpret,
                           glu=activation)
  in_MF2 = ops.gmm_nodiff(lhs_MK, w_GK2F, sizes_G, backend=backend, interpret=interpret)
  return _gated(activation, in_MF2).astype(lhs_MK.dtype)


def _gmm_glu_fwd(activation, backend, tiling, interpret, lhs_MK, w_GK2F, sizes_G):
  out = _gmm_glu(activation, backend, tiling, interpret, lhs_MK, w_GK2F, sizes_G)
  return out, (lhs_MK, w_GK2F, sizes_G)


def _gmm_glu_bwd(activation, backend, tiling, interpret, res, dh_MF):
  del tiling
  lhs_MK, w_GK2F, sizes_G = res
  in_MF2 = ops.gmm_nodiff(lhs_MK, w_GK2F, sizes_G, backend=backend, interpret=interpret)
  _, gated_vjp = jax.vjp(functools.partial(_gated, activation), in_MF2)
  (d_in_MF2,) = gated_vjp(dh_MF.astype(jnp.float32))
  d_in_MF2 = d_in_MF2.astype(lhs_MK.dtype)
  dlhs = ops.gmm_nodiff(d_in_MF2, w_GK2F, sizes_G, transpose_rhs=True, backend=backend,
                        interpret=interpret)
  dw = ops.tgmm_rows(lhs_MK, d_in_MF2, sizes_G, backend=backend, interpret=interpret,
                     preferred_element_type=w_GK2F.dtype)
  return dlhs, dw, None


_gmm_glu.defvjp(_gmm_glu_fwd, _gmm_glu_bwd)

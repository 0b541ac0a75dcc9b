"""Rows sorted by group around the grouped-matmul kernel, with cheap permutation gradients.

Every routed computation in the stack (MoE FFN, SwitchHead V/O experts, UMoE experts) has the
same shape: M "natural" rows m, each reading source row m // per_src and belonging to group
group_M[m]. `sort_groups` sorts the rows by group once (one keys-only sort); `gather_gmm`
multiplies the sorted rows with their group's weight, reading the source through the kernel's
fused row gather (the [M, I] permuted copy is never written) and taking its gradient as a
gather-and-sum (each source row is used exactly per_src times, so no scatter-add);
`unsort` puts the [M, O] result back into natural order by a gather whose gradient is the
opposite gather. `combine` sums each output's `per_out` consecutive rows with their weights.

`gmm_sum` is the second half of an expert FFN fused with its combine: the weights are folded
into the (narrow) input rows, so the backward never forms an [M, O] tensor: d(input) is one
kernel call reading dy through the fused row gather, and d(weight) one tgmm reading it the same
way. `grouped_project` takes that path whenever the input is narrower than the output.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def kernels_gmm() -> Any:
  """`openmoe_jax.kernels.gmm`, imported lazily (it is optional for einsum-only models)."""
  try:
    from openmoe_jax.kernels import gmm as gmm_lib  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError(f"grouped matmuls need openmoe_jax.kernels.gmm, which is not importable "
                     f"({e}); reinstall the package (pip install -e .), or for the MoE FFN "
                     "set MoeConfig.dispatch='ragged'") from e
  return gmm_lib


def order_and_sizes(key_M: jax.Array, num_groups: int,
                    num_keys: int | None = None) -> tuple[jax.Array, jax.Array]:
  """(stable argsort of int keys in [0, num_keys), int32 count of each key < num_groups).

  One keys-only sort of key * M + index when that fits int32 (a radix sort on GPU, no
  (key, index) pair sort), else jnp.argsort. The counts are read off the sorted keys by a
  binary search (no scatter-add with thousands of rows per bin); keys >= num_groups (e.g. a
  "dropped" sentinel) sort last and are not counted."""
  m = key_M.shape[0]
  num_keys = num_groups if num_keys is None else num_keys
  key_M = key_M.astype(jnp.int32)
  if num_keys * m < 2 ** 31:
    packed_M = jnp.sort(key_M * m + jnp.arange(m, dtype=jnp.int32))
    order_M, key_sorted_M = packed_M % m, packed_M // m
  else:
    order_M = jnp.argsort(key_M, stable=True).astype(jnp.int32)
    key_sorted_M = key_M[order_M]
  # Unrolled binary search: one fused kernel, not a loop of ~20 tiny launches.
  bounds = jnp.searchsorted(key_sorted_M, jnp.arange(num_groups + 1, dtype=jnp.int32),
                            side="left", method="scan_unrolled")
  return (checkpoint_name(order_M.astype(jnp.int32), "routing"),
          checkpoint_name(jnp.diff(bounds).astype(jnp.int32), "routing"))


def stable_order(key_M: jax.Array, num_keys: int) -> jax.Array:
  """Stable argsort of int keys in [0, num_keys) (see `order_and_sizes`)."""
  return order_and_sizes(key_M, num_keys)[0]


def inverse_permutation(order_M: jax.Array) -> jax.Array:
  """inv with inv[order[i]] = i."""
  m = order_M.shape[0]
  return checkpoint_name(jnp.zeros((m,), jnp.int32).at[order_M].set(
      jnp.arange(m, dtype=jnp.int32), unique_indices=True), "routing")


@jax.custom_vjp
def permute_rows(x_ND: jax.Array, idx_N: jax.Array, inv_N: jax.Array) -> jax.Array:
  """x_ND[idx_N] for a permutation idx_N with inverse inv_N; the VJP is a gather by inv_N
  (not a scatter-add)."""
  return x_ND[idx_N]


def _permute_rows_fwd(x_ND, idx_N, inv_N):
  return x_ND[idx_N], inv_N


def _permute_rows_bwd(inv_N, dy_ND):
  # A kernel of its own: fused into a transposing consumer, the gather ran ~50x slower.
  return jax.lax.optimization_barrier(dy_ND[inv_N]), None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


@jax.custom_vjp
def take_rows(x_ND: jax.Array, index_M: jax.Array, inverse_N: jax.Array) -> jax.Array:
  """`permute_rows` for an injective map that may leave rows out: y_MD = x_ND[index_M], zero
  where index_M is out of range (>= N); inverse_N[j] is the i with index_M[i] == j (>= M if
  none), and the VJP is the gather by it (zero rows where x was not used)."""
  return jnp.take(x_ND, index_M, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(x_ND, index_M, inverse_N):
  return take_rows(x_ND, index_M, inverse_N), inverse_N


def _take_rows_bwd(inverse_N, dy_MD):
  dx_ND = jnp.take(dy_MD, inverse_N, axis=0, mode="fill", fill_value=0)
  return jax.lax.optimization_barrier(dx_ND), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


@jax.custom_vjp
def gather_rows(x_RD: jax.Array, idx_M: jax.Array, positions_RP: jax.Array) -> jax.Array:
  """x_RD[idx_M] where every row r appears exactly P times, at positions_RP[r]; the VJP
  gathers those P rows per source row and sums them (no scatter-add)."""
  return x_RD[idx_M]


def _gather_rows_fwd(x_RD, idx_M, positions_RP):
  return x_RD[idx_M], (positions_RP, jnp.zeros((0,), x_RD.dtype))


def _gather_rows_bwd(res, dy_MD):
  positions_RP, proto = res
  return (jnp.sum(dy_MD[positions_RP].astype(jnp.float32), axis=1).astype(proto.dtype),
          None, None)


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@dataclasses.dataclass(frozen=True)
class SortedGroups:
  """Natural rows sorted by group: sorted row i is natural row order_M[i]; inv_M inverts it."""
  order_M: jax.Array
  inv_M: jax.Array
  sizes_G: jax.Array


def sort_groups(group_M: jax.Array, num_groups: int) -> SortedGroups:
  order_M, sizes_G = order_and_sizes(group_M, num_groups)
  return SortedGroups(order_M, inverse_permutation(order_M), sizes_G)


def gather_gmm(src_RI: jax.Array, w_GIO: jax.Array, sg: SortedGroups, per_src: int,
               backend: str = "auto") -> jax.Array:
  """Sorted rows [M, O]: sorted row i = src[order[i] // per_src] @ w[its group].

  Needs M == R * per_src (every source row used exactly per_src times)."""
  m = sg.order_M.shape[0]
  if src_RI.shape[0] * per_src != m:
    raise ValueError(f"{src_RI.shape[0]} source rows x per_src={per_src} != {m} rows")
  positions_RP = sg.inv_M.reshape(src_RI.shape[0], per_src)
  # Named for the "dots" remat policy, which keeps it (as the MoE FFN's expert hidden).
  return checkpoint_name(
      kernels_gmm().gmm(src_RI.astype(w_GIO.dtype), w_GIO, sg.sizes_G, backend=backend,
                        row_index=sg.order_M // per_src, row_positions=positions_RP),
      "routed_hidden")


def unsort(y_MO: jax.Array, sg: SortedGroups) -> jax.Array:
  """Sorted rows back to natural order."""
  return permute_rows(y_MO, sg.inv_M, sg.order_M)


def _identity(x_MI: jax.Array) -> jax.Array:
  return x_MI


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6))
def _gmm_sum(prologue, inputs, w_GIO, sizes_G, positions_NP, owner_M, backend):
  x_MI = prologue(*inputs).astype(w_GIO.dtype)
  y_MO = kernels_gmm().gmm_nodiff(x_MI, w_GIO, sizes_G, backend=backend)
  return jnp.sum(y_MO[positions_NP].astype(jnp.float32), axis=1)


def _gmm_sum_fwd(prologue, inputs, w_GIO, sizes_G, positions_NP, owner_M, backend):
  return (_gmm_sum(prologue, inputs, w_GIO, sizes_G, positions_NP, owner_M, backend),
          (inputs, w_GIO, sizes_G, owner_M))


def _gmm_sum_bwd(prologue, backend, res, dy_NO):
  inputs, w_GIO, sizes_G, owner_M = res
  lib = kernels_gmm()
  # The rows are recomputed from the prologue's inputs behind a barrier: XLA cannot CSE them
  # with the forward's copy, which would keep that [M, I] tensor alive until the backward.
  x_MI, prologue_vjp = jax.vjp(lambda *a: prologue(*a).astype(w_GIO.dtype),
                               *jax.lax.optimization_barrier(inputs))
  dy_NO = dy_NO.astype(x_MI.dtype)
  # Sorted row i's output went to output row owner[i]: its gradient is dy[owner[i]] @ w[g].T,
  # read through the kernel's row gather (rows past the groups come out zero).
  dx_MI = lib.gmm_nodiff(dy_NO, w_GIO, sizes_G, row_index=owner_M, transpose_rhs=True,
                         backend=backend)
  dw_GOI = lib.tgmm_rows(dy_NO, x_MI, sizes_G, row_index=owner_M, backend=backend,
                         preferred_element_type=w_GIO.dtype)
  return prologue_vjp(dx_MI), jnp.swapaxes(dw_GOI, 1, 2), None, None, None


_gmm_sum.defvjp(_gmm_sum_fwd, _gmm_sum_bwd)


def gmm_sum(x_MI: jax.Array, w_GIO: jax.Array, sizes_G: jax.Array, positions_NP: jax.Array,
            owner_M: jax.Array, backend: str = "auto", *,
            prologue: Callable[..., jax.Array] | None = None) -> jax.Array:
  """float32 [N, O]: out[n] = sum_p x[positions[n, p]] @ w[group of that row], for rows x_MI
  sorted by group (sizes_G; rows past the groups contribute 0). owner_M[i] is the n whose
  positions hold sorted row i (every row belongs to exactly one n).

  With `prologue` (a hashable callable), x_MI is a tuple of arrays and the rows are
  prologue(*x_MI) (e.g. an expert activation and its gate): the backward keeps the inputs and
  recomputes the rows instead of keeping them."""
  inputs = tuple(x_MI) if prologue is not None else (x_MI.astype(w_GIO.dtype),)
  m = jax.eval_shape(prologue, *inputs).shape[0] if prologue is not None else x_MI.shape[0]
  if positions_NP.size != m or owner_M.shape != (m,):
    raise ValueError(f"positions {positions_NP.shape} / owner {owner_M.shape} do not cover the "
                     f"{m} rows")
  return _gmm_sum(prologue or _identity, inputs, w_GIO, sizes_G.astype(jnp.int32),
                  positions_NP.astype(jnp.int32), owner_M.astype(jnp.int32), backend)


def combine(y_MO: jax.Array, weight_M: jax.Array, per_out: int) -> jax.Array:
  """float32 [M / per_out, O]: output n = sum_j weight[n * per_out + j] * y[n * per_out + j]."""
  m, o = y_MO.shape
  y_NPO = y_MO.reshape(m // per_out, per_out, o).astype(jnp.float32)
  w_NP1 = weight_M.reshape(m // per_out, per_out, 1).astype(jnp.float32)
  return jnp.sum(y_NPO * w_NP1, axis=1)


def grouped_project(src_RI: jax.Array, group_M: jax.Array, weight_M: jax.Array,
                    w_GIO: jax.Array, *, per_src: int, per_out: int,
                    backend: str = "auto") -> jax.Array:
  """One routed linear map, float32 [M / per_out, O]:
  out[n] = sum_{m: m // per_out == n} weight[m] * src[m // per_src] @ w[group[m]].

  Narrow inputs (I < O, e.g. SwitchHead's output experts): the weighted input rows are formed
  sorted ([M, I], small) and `gmm_sum` fuses the combine. Wide inputs: the kernel gathers the
  source rows itself and the narrow [M, O] outputs are un-permuted and combined."""
  sg = sort_groups(group_M, w_GIO.shape[0])
  m, (r, i), o = group_M.shape[0], src_RI.shape, w_GIO.shape[-1]
  if i < o:
    x_MI = gather_rows(src_RI.astype(w_GIO.dtype), sg.order_M // per_src,
                       sg.inv_M.reshape(r, per_src))
    w_M1 = permute_rows(weight_M[:, None], sg.order_M, sg.inv_M)  # VJP: a gather, no scatter
    x_MI = x_MI * w_M1.astype(x_MI.dtype)
    return gmm_sum(x_MI, w_GIO, sg.sizes_G, sg.inv_M.reshape(m // per_out, per_out),
                   sg.order_M // per_out, backend)
  y_MO = unsort(gather_gmm(src_RI, w_GIO, sg, per_src, backend), sg)
  return combine(y_MO, weight_M, per_out)

"""Plain-jnp references for the grouped matmul (any dtype, float64 included).

`gmm`:  out[m] = lhs[m] @ rhs[group(m)] for rows m < sum(group_sizes); later rows are zero.
`tgmm`: out[g] = lhs[rows of g].T @ rhs[rows of g]   (the weight-gradient form).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def group_ids(group_sizes_G: jax.Array, m: int) -> jax.Array:
  """Group index of every row, G for rows past sum(group_sizes)."""
  ends_G = jnp.cumsum(group_sizes_G.astype(jnp.int32))
  return jnp.searchsorted(ends_G, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)


def _rows(lhs_XK: jax.Array, row_index_M: jax.Array | None) -> jax.Array:
  return lhs_XK if row_index_M is None else jnp.take(lhs_XK, row_index_M, axis=0)


def _precision(dtype) -> lax.Precision:
  return lax.Precision.HIGHEST


def gmm_loop(lhs_XK, rhs_GKN, group_sizes_G, *, row_index_M=None, transpose_rhs=False,
             out_dtype=None) -> jax.Array:
  """Per-group masked loop: exact, slow (G full matmuls); use with tiny shapes / float64."""
  lhs_MK = _rows(lhs_XK, row_index_M)
  rhs = jnp.swapaxes(rhs_GKN, 1, 2) if transpose_rhs else rhs_GKN
  out_dtype = out_dtype or lhs_MK.dtype
  acc_dtype = jnp.promote_types(jnp.float32, lhs_MK.dtype)
  gid_M = group_ids(group_sizes_G, lhs_MK.shape[0])
  out_MN = jnp.zeros((lhs_MK.shape[0], rhs.shape[2]), acc_dtype)
  for g in range(rhs.shape[0]):
    part_MN = jnp.dot(lhs_MK, rhs[g], precision=_precision(acc_dtype),
                      preferred_element_type=acc_dtype)
    out_MN = jnp.where((gid_M == g)[:, None], part_MN, out_MN)
  return out_MN.astype(out_dtype)


def tgmm_loop(lhs_XK, rhs_MN, group_sizes_G, *, row_index_M=None, out_dtype=None) -> jax.Array:
  """Per-group masked loop for tgmm: out[g] = lhs_rows[g].T @ rhs_rows[g]."""
  lhs_MK = _rows(lhs_XK, row_index_M)
  out_dtype = out_dtype or lhs_MK.dtype
  acc_dtype = jnp.promote_types(jnp.float32, lhs_MK.dtype)
  gid_M = group_ids(group_sizes_G, lhs_MK.shape[0])
  outs = []
  for g in range(group_sizes_G.shape[0]):
    masked_MK = jnp.where((gid_M == g)[:, None], lhs_MK, 0).astype(acc_dtype)
    outs.append(jnp.dot(masked_MK.T, rhs_MN.astype(acc_dtype), precision=_precision(acc_dtype)))
  return jnp.stack(outs).astype(out_dtype)


def gmm(lhs_XK, rhs_GKN, group_sizes_G, *, row_index_M=None, transpose_rhs=False,
        out_dtype=None, tiling=None, interpret=False) -> jax.Array:
  """`jax.lax.ragged_dot` backend (XLA); rows past the end are zero (ragged_dot's rule)."""
  del tiling, interpret
  lhs_MK = _rows(lhs_XK, row_index_M)
  rhs = jnp.swapaxes(rhs_GKN, 1, 2) if transpose_rhs else rhs_GKN
  out_dtype = out_dtype or lhs_MK.dtype
  acc = jnp.promote_types(jnp.float32, lhs_MK.dtype)
  out = lax.ragged_dot(lhs_MK, rhs, group_sizes_G.astype(jnp.int32), precision=_precision(acc),
                       preferred_element_type=acc)
  return out.astype(out_dtype)


def tgmm(lhs_XK, rhs_MN, group_sizes_G, *, row_index_M=None, out_dtype=None, tiling=None,
         interpret=False) -> jax.Array:
  """Weight-gradient form through `ragged_dot_general` (ragged contracting dimension)."""
  del tiling, interpret
  lhs_MK = _rows(lhs_XK, row_index_M)
  out_dtype = out_dtype or lhs_MK.dtype
  acc = jnp.promote_types(jnp.float32, lhs_MK.dtype)
  # Rows past sum(group_sizes) must not contribute: zero them (ragged_dot_general leaves
  # them to no group already, the mask makes that explicit and cheap).
  valid_M = jnp.arange(lhs_MK.shape[0]) < jnp.sum(group_sizes_G)
  rhs_MN = jnp.where(valid_M[:, None], rhs_MN, 0)
  dims = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([0], [0]), ([], [])),
      lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  out = lax.ragged_dot_general(lhs_MK, rhs_MN, group_sizes_G.astype(jnp.int32), dims,
                               precision=_precision(acc), preferred_element_type=acc)
  return out.astype(out_dtype)

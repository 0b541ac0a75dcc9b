"""Grouped matmul in Pallas with the Triton lowering (any NVIDIA GPU; `interpret=True` on CPU).

gmm: a 1-D launch over (work item, column tile) pairs, swizzled in bands of `group_m`
items so programs running together share rhs tiles in L2. A work item is one
(row tile, group) visit from `metadata.make_group_metadata`; its store is masked to the
group's rows, and visits to the tail group store zeros. Optional fused gather: lhs rows are
read through `row_index_M` (MoEUT's CVMM trick), so permuted tokens are never materialised.
tgmm: one program per (k tile, n tile, group) accumulating over the group's row tiles.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from openmoe_jax.kernels.gmm import metadata as md_lib
from openmoe_jax.kernels.gmm.tiling import Tiling

DEFAULT_TILING = Tiling(tm=128, tn=128, tk=64, num_warps=4, num_stages=3, group_m=8)


def _precision(dtype):
  # The Triton lowering maps DEFAULT to tf32 for f32 operands; HIGHEST is exact IEEE f32.
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _swizzle(pid, num_rows: int, num_cols: int, group_m: int):
  """Maps a flat program id to (row, col) walking bands of `group_m` rows column by column."""
  per_band = group_m * num_cols
  band = pid // per_band
  first = band * group_m
  rows_in_band = jnp.minimum(num_rows - first, group_m)
  local = pid % per_band
  return first + local % rows_in_band, local // rows_in_band


def _gmm_kernel(grp_ref, tile_ref, starts_ref, ends_ref, nvalid_ref, *refs, m: int, k: int,
                n: int, num_items: int, num_groups: int, t: Tiling, transpose_rhs: bool,
                gather: bool):
  if gather:
    row_index_ref, lhs_ref, rhs_ref, out_ref = refs
  else:
    lhs_ref, rhs_ref, out_ref = refs
  tm, tn, tk = t.tm, t.tn, t.tk
  item, j = _swizzle(pl.program_id(0), num_items, pl.cdiv(n, tn), min(t.group_m, num_items))

  @pl.when(item < nvalid_ref[0])
  def _visit():
    g = grp_ref[item]
    r0 = tile_ref[item] * tm
    rows = r0 + jnp.arange(tm, dtype=jnp.int32)
    cols = j * tn + jnp.arange(tn, dtype=jnp.int32)
    in_m = rows < m
    in_n = cols < n
    keep = ((rows >= starts_ref[g]) & (rows < ends_ref[g]))[:, None]
    if n % tn:
      keep = keep & in_n[None, :]
    out_view = out_ref.at[pl.ds(r0, tm), pl.ds(j * tn, tn)]

    @pl.when(g == num_groups)
    def _tail():
      plt.store(out_view, jnp.zeros((tm, tn), out_ref.dtype), mask=keep)

    @pl.when(g < num_groups)
    def _matmul():
      if gather:
        src = plt.load(row_index_ref.at[pl.ds(r0, tm)], mask=in_m, other=0)
      # Masks along the contiguous dim stop 16-byte vector loads: only add them when the
      # dim is not a multiple of the tile (static).
      even_k, even_n = k % tk == 0, n % tn == 0

      def body(kk, acc):
        ks = kk * tk + jnp.arange(tk, dtype=jnp.int32)
        in_k = (ks < k) if not even_k else jnp.ones((tk,), jnp.bool_)
        a_mask = in_m[:, None] if even_k else in_m[:, None] & in_k[None, :]
        if gather:
          a = plt.load(lhs_ref.at[src[:, None], ks[None, :]], mask=a_mask, other=0)
        else:
          a = plt.load(lhs_ref.at[pl.ds(r0, tm), pl.ds(kk * tk, tk)], mask=a_mask, other=0)
        if transpose_rhs:
          b = plt.load(rhs_ref.at[g, pl.ds(j * tn, tn), pl.ds(kk * tk, tk)],
                       mask=None if even_k and even_n else in_n[:, None] & in_k[None, :],
                       other=None if even_k and even_n else 0)
          dims = (((1,), (1,)), ((), ()))
        else:
          b = plt.load(rhs_ref.at[g, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)],
                       mask=None if even_k and even_n else in_k[:, None] & in_n[None, :],
                       other=None if even_k and even_n else 0)
          dims = (((1,), (0,)), ((), ()))
        return acc + jax.lax.dot_general(a, b, dims, precision=_precision(a.dtype),
                                         preferred_element_type=jnp.float32)

      acc = jax.lax.fori_loop(0, pl.cdiv(k, tk), body, jnp.zeros((tm, tn), jnp.float32))
      plt.store(out_view, acc.astype(out_ref.dtype), mask=keep)


def gmm(lhs_XK, rhs_GKN, group_sizes_G, *, row_index_M=None, transpose_rhs=False,
        out_dtype=None, tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
  """out[m] = lhs[row(m)] @ rhs[group(m)] (rows past the end zero)."""
  t = tiling or DEFAULT_TILING
  m = lhs_XK.shape[0] if row_index_M is None else row_index_M.shape[0]
  k = lhs_XK.shape[1]
  g = rhs_GKN.shape[0]
  n = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
  out_dtype = out_dtype or lhs_XK.dtype
  meta = md_lib.make_group_metadata(group_sizes_G, m, t.tm)
  if t.interleave:  # L2 reuse of source rows that many groups gather (see interleave_items)
    meta = md_lib.interleave_items(meta, t.tm, t.interleave)
  num_items = meta.item_group.shape[0]
  gather = row_index_M is not None
  kernel = functools.partial(
      _gmm_kernel, m=m, k=k, n=n, num_items=num_items, num_groups=g, t=t,
      transpose_rhs=transpose_rhs, gather=gather)
  operands = [meta.item_group, meta.item_tile, meta.starts, meta.ends, meta.num_items]
  operands += ([row_index_M.astype(jnp.int32)] if gather else []) + [lhs_XK, rhs_GKN]
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(num_items * pl.cdiv(n, t.tn),),
      compiler_params=plt.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
      interpret=interpret,
      name="openmoe_gmm",
  )(*operands)


def _tgmm_kernel(starts_ref, ends_ref, *refs, m: int, k: int, n: int, t: Tiling, gather: bool):
  if gather:
    row_index_ref, lhs_ref, rhs_ref, out_ref = refs
  else:
    lhs_ref, rhs_ref, out_ref = refs
  tm, tn, tk = t.tm, t.tn, t.tk
  num_n = pl.cdiv(n, tn)
  kt, j = pl.program_id(0) // num_n, pl.program_id(0) % num_n
  g = pl.program_id(1)
  start, end = starts_ref[g], ends_ref[g]
  ks = kt * tk + jnp.arange(tk, dtype=jnp.int32)
  cols = j * tn + jnp.arange(tn, dtype=jnp.int32)
  in_k, in_n = ks < k, cols < n

  even_k, even_n = k % tk == 0, n % tn == 0

  def body(rt, acc):
    r0 = rt * tm
    rows = r0 + jnp.arange(tm, dtype=jnp.int32)
    ok = (rows >= start) & (rows < end)
    if gather:
      src = plt.load(row_index_ref.at[pl.ds(r0, tm)], mask=ok, other=0)
      a = plt.load(lhs_ref.at[src[:, None], ks[None, :]], mask=a_mask(ok), other=0)
    else:
      a = plt.load(lhs_ref.at[pl.ds(r0, tm), pl.ds(kt * tk, tk)], mask=a_mask(ok), other=0)
    b = plt.load(rhs_ref.at[pl.ds(r0, tm), pl.ds(j * tn, tn)],
                 mask=ok[:, None] if even_n else ok[:, None] & in_n[None, :], other=0)
    return acc + jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                     precision=_precision(a.dtype),
                                     preferred_element_type=jnp.float32)

  def a_mask(ok):
    return ok[:, None] if even_k else ok[:, None] & in_k[None, :]

  acc = jax.lax.fori_loop(start // tm, pl.cdiv(end, tm), body, jnp.zeros((tk, tn), jnp.float32))
  plt.store(out_ref.at[g, pl.ds(kt * tk, tk), pl.ds(j * tn, tn)], acc.astype(out_ref.dtype),
            mask=None if even_k and even_n else in_k[:, None] & in_n[None, :])


def tgmm(lhs_XK, rhs_MN, group_sizes_G, *, row_index_M=None, out_dtype=None,
         tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
  """out[g] = lhs[rows of g].T @ rhs[rows of g]; empty groups give zeros."""
  t = tiling or DEFAULT_TILING
  m, n = rhs_MN.shape
  k = lhs_XK.shape[1]
  g = group_sizes_G.shape[0]
  out_dtype = out_dtype or lhs_XK.dtype
  meta = md_lib.make_group_metadata(group_sizes_G, m, t.tm, with_tail=False)
  gather = row_index_M is not None
  operands = [meta.starts, meta.ends] + ([row_index_M.astype(jnp.int32)] if gather else [])
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, m=m, k=k, n=n, t=t, gather=gather),
      out_shape=jax.ShapeDtypeStruct((g, k, n), out_dtype),
      grid=(pl.cdiv(k, t.tk) * pl.cdiv(n, t.tn), g),
      compiler_params=plt.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
      interpret=interpret,
      name="openmoe_tgmm",
  )(*operands, lhs_XK, rhs_MN)

"""Megablox-style grouped matmul for TPU (Pallas Mosaic TPU); `interpret=True` runs on CPU.

gmm grid (n, item, k): each work item is one (row tile, group) visit; the k axis is the
reduction into a VMEM f32 accumulator, and the masked store `where(rows in group, acc, out)`
lets consecutive visits of one boundary tile share the resident output block.
tgmm grid (k, n, item): items of one group are consecutive, so the [tk, tn] accumulator
lives across them and is written on the group's last item.
Fused gather is done in XLA here (TPU DMA of scattered rows is not worth it at this size).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from openmoe_jax.kernels.gmm import metadata as md_lib
from openmoe_jax.kernels.gmm.tiling import Tiling, pad_to

DEFAULT_TILING = Tiling(tm=128, tn=128, tk=128)


def _dot_precision(dtype) -> jax.lax.Precision:
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _gmm_kernel(grp_ref, tile_ref, starts_ref, ends_ref, nvalid_ref, lhs_ref, rhs_ref,
                out_ref, acc_ref, *, tm: int, num_groups: int, transpose_rhs: bool):
  i, k = pl.program_id(1), pl.program_id(2)

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))
  acc_ref[...] += jax.lax.dot_general(
      lhs_ref[...], rhs_ref[...], (contract, ((), ())),
      precision=_dot_precision(lhs_ref.dtype), preferred_element_type=jnp.float32)

  @pl.when(k == pl.num_programs(2) - 1)
  def _store():
    g = grp_ref[i]
    rows = tile_ref[i] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    mask = (rows >= starts_ref[g]) & (rows < ends_ref[g]) & (i < nvalid_ref[0])
    val = jnp.where(g == num_groups, 0.0, acc_ref[...])  # tail group writes zeros
    out_ref[...] = jnp.where(mask, val.astype(out_ref.dtype), out_ref[...])


def gmm(lhs_XK, rhs_GKN, group_sizes_G, *, row_index_M=None, transpose_rhs=False,
        out_dtype=None, tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
  """out[m] = lhs[m] @ rhs[group(m)] (rows past the end zero)."""
  lhs_MK = lhs_XK if row_index_M is None else jnp.take(lhs_XK, row_index_M, axis=0)
  t = tiling or DEFAULT_TILING
  m, k = lhs_MK.shape
  g = rhs_GKN.shape[0]
  n = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
  out_dtype = out_dtype or lhs_MK.dtype
  tm, tk, tn = min(t.tm, _ceil8(m)), min(t.tk, _ceil128(k)), min(t.tn, _ceil128(n))
  lhs_p = pad_to(lhs_MK, (tm, tk))
  rhs_p = pad_to(rhs_GKN, (1, tn, tk) if transpose_rhs else (1, tk, tn))
  mp, kp = lhs_p.shape
  np_ = rhs_p.shape[1] if transpose_rhs else rhs_p.shape[2]
  meta = md_lib.make_group_metadata(group_sizes_G, mp, tm)
  num_items = meta.item_group.shape[0]
  grid = (np_ // tn, num_items, kp // tk)

  def rhs_map(j, i, kk, grp, tile, *_):
    gg = jnp.minimum(grp[i], g - 1)
    return (gg, j, kk) if transpose_rhs else (gg, kk, j)

  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  kernel = functools.partial(_gmm_kernel, tm=tm, num_groups=g, transpose_rhs=transpose_rhs)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=grid,
          in_specs=[pl.BlockSpec((tm, tk), lambda j, i, kk, grp, tile, *_: (tile[i], kk)),
                    pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tm, tn), lambda j, i, kk, grp, tile, *_: (tile[i], j)),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
  )(meta.item_group, meta.item_tile, meta.starts, meta.ends, meta.num_items, lhs_p, rhs_p)
  return out[:m, :n]


def _tgmm_kernel(grp_ref, tile_ref, starts_ref, ends_ref, nvalid_ref, lhs_ref, rhs_ref,
                 out_ref, acc_ref, *, tm: int):
  i = pl.program_id(2)
  last = pl.num_programs(2) - 1
  g = grp_ref[i]
  prev_g = grp_ref[jnp.maximum(i - 1, 0)]
  next_g = grp_ref[jnp.minimum(i + 1, last)]

  @pl.when((i == 0) | (prev_g != g))
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  rows = tile_ref[i] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
  mask = (rows >= starts_ref[g]) & (rows < ends_ref[g]) & (i < nvalid_ref[0])
  lhs = jnp.where(mask, lhs_ref[...], 0)
  rhs = jnp.where(mask, rhs_ref[...], 0)
  acc_ref[...] += jax.lax.dot_general(
      lhs, rhs, (((0,), (0,)), ((), ())),
      precision=_dot_precision(lhs_ref.dtype), preferred_element_type=jnp.float32)

  @pl.when((i == last) | (next_g != g))
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs_XK, rhs_MN, group_sizes_G, *, row_index_M=None, out_dtype=None,
         tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
  """out[g] = lhs[rows of g].T @ rhs[rows of g]; empty groups give zeros."""
  lhs_MK = lhs_XK if row_index_M is None else jnp.take(lhs_XK, row_index_M, axis=0)
  t = tiling or DEFAULT_TILING
  m, k = lhs_MK.shape
  n = rhs_MN.shape[1]
  g = group_sizes_G.shape[0]
  out_dtype = out_dtype or lhs_MK.dtype
  tm, tk, tn = min(t.tm, _ceil8(m)), min(t.tk, _ceil128(k)), min(t.tn, _ceil128(n))
  lhs_p = pad_to(lhs_MK, (tm, tk))
  rhs_p = pad_to(rhs_MN, (tm, tn))
  mp, kp = lhs_p.shape
  np_ = rhs_p.shape[1]
  meta = md_lib.make_group_metadata(group_sizes_G, mp, tm, visit_empty=True, with_tail=False)
  grid = (kp // tk, np_ // tn, meta.item_group.shape[0])
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm),
      out_shape=jax.ShapeDtypeStruct((g, kp, np_), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=grid,
          in_specs=[pl.BlockSpec((tm, tk), lambda kk, j, i, grp, tile, *_: (tile[i], kk)),
                    pl.BlockSpec((tm, tn), lambda kk, j, i, grp, tile, *_: (tile[i], j))],
          out_specs=pl.BlockSpec((None, tk, tn), lambda kk, j, i, grp, tile, *_: (grp[i], kk, j)),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(meta.item_group, meta.item_tile, meta.starts, meta.ends, meta.num_items, lhs_p, rhs_p)
  return out[:, :k, :n]


def _ceil8(x: int) -> int:
  return -(-x // 8) * 8


def _ceil128(x: int) -> int:
  return -(-x // 128) * 128

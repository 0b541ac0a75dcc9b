"""The Hopper kernels' work lists (`pallas_mgpu.group_aligned_tiles` for gmm,
`pallas_mgpu.group_row_tiles` for tgmm), each in one small kernel launch.

Built with jnp ops the list costs five to eight tiny XLA kernels (cumulative sums, a
searchsorted, slices), about 15-20 us on an H100 before the matmul can start: 6-15% of a
forward call at the bench shapes. Here one Pallas (Triton lowering) launch builds it: one
program per group (the tail group of unassigned rows last) recomputes the groups' prefix
sums from `group_sizes` (a few hundred values) and writes its own items; the tail program
also writes the unused items past the valid ones, so the arrays are bit-identical to the
jnp version's. tgmm's per-group row tiles take one program.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

ROW_ALIGN = 8   # (pallas_mgpu.ROW_ALIGN) TMA row loads start on the 8-row smem tiling
_BLOCK = 128    # items written per loop step


def num_items(m: int, num_groups: int, tm: int) -> int:
  """Static length of the work list (pallas_mgpu.group_aligned_tiles)."""
  return -(-m // tm) + 2 * (num_groups + 1)


def _kernel(gs_ref, grp_ref, start_ref, end_ref, count_ref, *, g: int, gp: int, m: int,
            tm: int, num: int):
  me = pl.program_id(0)
  idx = jnp.arange(gp, dtype=jnp.int32)
  sizes = plt.load(gs_ref.at[pl.ds(0, gp)], mask=idx < g, other=0)
  sizes = jnp.where(idx == g, m, sizes)  # the tail group ends at row m
  csum = jnp.cumsum(sizes)
  ends = jnp.minimum(csum, m)
  starts = jnp.minimum(csum - sizes, m)
  base = lax.div(starts, ROW_ALIGN) * ROW_ALIGN
  count = jnp.where(ends > starts, lax.div(ends - base + tm - 1, tm), 0)
  cum = jnp.cumsum(count)

  def pick(v):
    return jnp.sum(jnp.where(idx == me, v, 0))

  own = pick(count)
  first = pick(cum) - own
  own_base, own_start, own_end = pick(base), pick(starts), pick(ends)
  # The tail program also fills the unused items (its tiles continue past row m there).
  items = jnp.where(me == g, num - first, own)

  def step(c, carry):
    local = c * _BLOCK + jnp.arange(_BLOCK, dtype=jnp.int32)
    tile0 = own_base + local * tm
    mask = local < items
    at = pl.ds(first + c * _BLOCK, _BLOCK)
    plt.store(grp_ref.at[at], jnp.full((_BLOCK,), me, jnp.int32), mask=mask)
    plt.store(start_ref.at[at], jnp.maximum(tile0, own_start), mask=mask)
    plt.store(end_ref.at[at], jnp.minimum(tile0 + tm, own_end), mask=mask)
    return carry

  lax.fori_loop(0, lax.div(items + _BLOCK - 1, _BLOCK), step, 0)

  @pl.when(me == g)
  def _count():
    count_ref[...] = jnp.full((1,), jnp.sum(count), jnp.int32)


@functools.partial(jax.jit, static_argnames=("m", "tm", "interpret"))
def group_aligned_tiles(group_sizes_G: jax.Array, m: int, tm: int, interpret: bool = False):
  """(group, start, end, count) arrays of `pallas_mgpu.group_aligned_tiles`, in one launch."""
  g = group_sizes_G.shape[0]
  num = num_items(m, g, tm)
  gp = max(16, pl.next_power_of_2(g + 1))
  item = jax.ShapeDtypeStruct((num,), jnp.int32)
  return pl.pallas_call(
      functools.partial(_kernel, g=g, gp=gp, m=m, tm=tm, num=num),
      out_shape=(item, item, item, jax.ShapeDtypeStruct((1,), jnp.int32)),
      grid=(g + 1,),
      compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="openmoe_gmm_tile_list",
  )(group_sizes_G.astype(jnp.int32))


def _rows_kernel(gs_ref, start_ref, end_ref, first_ref, count_ref, *, g: int, gp: int, m: int,
                 tm: int):
  idx = jnp.arange(gp, dtype=jnp.int32)
  sizes = plt.load(gs_ref.at[pl.ds(0, gp)], mask=idx < g, other=0)
  end = jnp.minimum(jnp.cumsum(sizes), m)
  start = jnp.minimum(jnp.cumsum(sizes) - sizes, m)
  first = jnp.minimum(lax.div(start, tm), max(-(-m // tm) - 1, 0))
  count = jnp.maximum(lax.div(end + tm - 1, tm) - lax.div(start, tm), 1)
  count = jnp.where(end > start, count, 1)
  keep = idx < g
  for ref, v in ((start_ref, start), (end_ref, end), (first_ref, first), (count_ref, count)):
    plt.store(ref.at[pl.ds(0, gp)], v, mask=keep)


@functools.partial(jax.jit, static_argnames=("m", "tm", "interpret"))
def group_row_tiles(group_sizes_G: jax.Array, m: int, tm: int, interpret: bool = False):
  """(start, end, first_tile, num_tiles) of `pallas_mgpu.group_row_tiles`, in one launch."""
  g = group_sizes_G.shape[0]
  gp = max(16, pl.next_power_of_2(g))
  per_group = jax.ShapeDtypeStruct((g,), jnp.int32)
  return pl.pallas_call(
      functools.partial(_rows_kernel, g=g, gp=gp, m=m, tm=tm),
      out_shape=(per_group,) * 4,
      grid=(1,),
      compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="openmoe_tgmm_row_tiles",
  )(group_sizes_G.astype(jnp.int32))

"""Parts shared by the hand-written Mosaic-GPU gmm schedules (`pallas_mgpu_pingpong`,
`pallas_mgpu_ring`): a CTA's work items, the memory warpgroup that streams their K steps
through one shared-memory ring, and the main loop that keeps one wgmma in flight.

Step s of a CTA (item j, K step kk: s = j * ksteps + kk) uses ring slot s % num_stages.
A slot's "loaded" barrier completes when both TMA copies of its step have landed; its
"free" barrier when every consumer has released it. Each barrier's phase must be seen by
every thread that waits on it, so the memory warpgroup also waits for the last releases.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from openmoe_jax.kernels.gmm import pallas_mgpu as coop


SMEM_BYTES = 227 * 1024
COMPUTE_REGISTERS = 232  # two compute warpgroups at 232 + one memory at 40 <= 512 per thread
MEMORY_REGISTERS = 40


def launch(kernel, out_type, wgs: int, num_ctas: int, interpret: bool):
  """One persistent CTA per SM (grid axis "sm"), `wgs` compute warpgroups and one memory
  warpgroup (axis "wg"); `interpret` runs Pallas' GPU interpreter instead."""
  return plgpu.kernel(
      kernel, out_type=out_type, grid=(num_ctas,), grid_names=("sm",), num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=plgpu.InterpretGPUParams() if interpret else False)


class Geometry(NamedTuple):
  """Static shape of one hand-written gmm call."""
  m: int          # rows (padded to the 8-row grid)
  g: int          # groups
  tm: int
  tn: int
  tk: int
  stages: int     # ring slots
  ksteps: int     # K steps per item
  grid_n: int     # column tiles
  num_ctas: int   # persistent CTAs (one per SM)
  group_m: int    # items per L2 band of the tile order


def geometry(lhs_MK, rhs, *, n: int, t, interpret: bool) -> Geometry:
  m, k = lhs_MK.shape
  return Geometry(m=m, g=rhs.shape[0], tm=t.tm, tn=t.tn, tk=t.tk, stages=t.num_stages,
                  ksteps=k // t.tk, grid_n=n // t.tn, num_ctas=coop.num_sms(interpret),
                  group_m=t.group_m)


class Item(NamedTuple):
  group: jax.Array   # the item's group (G = the tail of unassigned rows)
  start: jax.Array   # its first own row
  end: jax.Array     # one past its last own row
  row0: jax.Array    # first row of the loaded tile (8-row aligned, row0 + tm <= M)
  col: jax.Array     # its column tile


def local_items(tile_refs, geo: Geometry) -> tuple[jax.Array, Callable[[jax.Array], Item]]:
  """(number of items of this CTA, item(j) -> Item of its local item j) for the
  persistent grid: global item i = cta + j * num_ctas, in L2-banded (planar snake) order."""
  grp_gmem, start_gmem, end_gmem, count_gmem = tile_refs
  m, tm, grid_n, num_ctas = geo.m, geo.tm, geo.grid_n, geo.num_ctas
  cta = lax.axis_index("sm")
  num_valid = count_gmem[0]
  num_local = jnp.maximum(num_valid * grid_n - cta + num_ctas - 1, 0) // num_ctas
  num_items_max = grp_gmem.shape[0]

  def item(j) -> Item:
    idx, ni = plgpu.planar_snake(cta + j * num_ctas, (num_valid, grid_n), 1,
                                 min(geo.group_m, num_items_max))
    start = start_gmem[idx]
    row0 = jnp.minimum(start // coop.ROW_ALIGN * coop.ROW_ALIGN, m - tm)
    return Item(grp_gmem[idx], start, end_gmem[idx], pl.multiple_of(row0, coop.ROW_ALIGN), ni)

  return num_local, item


def ring_smem(geo: Geometry, lhs_dtype, rhs_dtype, transpose_rhs: bool) -> dict:
  """The ring's swizzled buffers as `pl.run_scoped` allocations: a_smem [stages, tm, tk] and
  b_smem [stages, tk, tn] ([stages, tn, tk] when the weights are read transposed)."""
  rhs_block = (geo.tn, geo.tk) if transpose_rhs else (geo.tk, geo.tn)
  return dict(a_smem=plgpu.SMEM((geo.stages, geo.tm, geo.tk), lhs_dtype,
                                transforms=coop.swizzled(geo.tk, lhs_dtype)),
              b_smem=plgpu.SMEM((geo.stages, *rhs_block), rhs_dtype,
                                transforms=coop.swizzled(rhs_block[1], rhs_dtype)))


def load_ring(geo: Geometry, item, num_local, *, transpose_rhs: bool, lhs_gmem, rhs_gmem,
              a_smem, b_smem, loaded: Callable[[jax.Array, jax.Array], object], free,
              glu_cols: int = 0) -> None:
  """The memory warpgroup: TMA-loads every K step of the CTA's items into the ring, waiting
  for a slot to be freed before refilling it; `loaded(j, slot)` is the barrier of item j's
  copies into `slot`. `glu_cols` = n > 0: rhs is [gate | up] ([G, K, 2n]) and column tile
  c loads columns c * tn / 2 of both halves into b_smem[slot, 0] and b_smem[slot, 1]."""
  g, tm, tn, tk, ksteps, stages = geo.g, geo.tm, geo.tn, geo.tk, geo.ksteps, geo.stages

  @pl.loop(0, num_local)
  def _item(j):
    it = item(j)
    rhs_g = rhs_gmem.at[jnp.minimum(it.group, g - 1)]

    @pl.loop(0, ksteps)
    def _step(kk):
      s = j * ksteps + kk
      slot = s % stages

      @pl.when(s >= stages)
      def _wait_free():
        plgpu.barrier_wait(free.at[slot])

      cols = pl.ds(kk * tk, tk)
      barrier = loaded(j, slot)
      plgpu.copy_gmem_to_smem(lhs_gmem.at[pl.ds(it.row0, tm), cols], a_smem.at[slot], barrier)
      if glu_cols:
        half = tn // 2
        for h in range(2):
          plgpu.copy_gmem_to_smem(rhs_g.at[cols, pl.ds(h * glu_cols + it.col * half, half)],
                                  b_smem.at[slot, h], barrier)
      else:
        src = (rhs_g.at[pl.ds(it.col * tn, tn), cols] if transpose_rhs
               else rhs_g.at[cols, pl.ds(it.col * tn, tn)])
        plgpu.copy_gmem_to_smem(src, b_smem.at[slot], barrier)

  # Observe the last releases, so that no barrier phase goes unseen.
  steps = num_local * ksteps

  @pl.loop(jnp.maximum(steps - stages, 0), steps)
  def _drain(s):
    plgpu.barrier_wait(free.at[s % stages])


def ring_mma(acc_ref, s0, count, stages: int, *, operands, loaded, free,
             after: Sequence[tuple[int, Callable[[], None]]] = ()) -> None:
  """wgmma of ring steps s0 .. s0 + count - 1 on this warpgroup with one step's wgmma in
  flight: `operands(r, slot)` gives step r's (A, B) refs (and may first prepare the slot's
  shared memory); `loaded(slot)` is this warpgroup's barrier of the slot. A slot is freed
  once the wgmma after it has been issued, the last one after the final wait. Each `(r, fn)`
  of `after` runs fn while step r's wgmma computes (e.g. part of the previous block's
  epilogue); r is clipped to the last step. `acc_ref` may be a tuple of accumulators;
  `operands` then gives one (A, B) per accumulator, all issued in each step."""
  accs = acc_ref if isinstance(acc_ref, tuple) else (acc_ref,)

  def step(r, _):
    s = s0 + r
    slot = s % stages
    plgpu.barrier_wait(loaded(slot))
    ops = operands(r, slot)
    for acc, (a, b) in zip(accs, ops if isinstance(acc_ref, tuple) else [ops]):
      plgpu.wgmma(acc, a, b)
    plgpu.wgmma_wait(len(accs))  # the previous step's wgmma is done: free its slot

    @pl.when(r > 0)
    def _release():
      plgpu.barrier_arrive(free.at[(s - 1) % stages])

    for at, fn in after:
      pl.when(r == min(at, count - 1))(fn)

  lax.fori_loop(0, count, step, None)
  plgpu.wgmma_wait(0)
  plgpu.barrier_arrive(free.at[(s0 + count - 1) % stages])


def mma_steps(geo: Geometry, acc_ref, j, *, transpose_rhs: bool, a_smem, b_smem,
              loaded: Callable[[jax.Array], object], free, a_rows=None,
              after: Sequence[tuple[int, Callable[[], None]]] = ()) -> None:
  """One gmm item's main loop on this warpgroup (`ring_mma` over its K steps): lhs rows
  `a_rows` of the A tile (all rows if None) against the whole B tile."""
  def operands(_, slot):
    a = a_smem.at[slot] if a_rows is None else a_smem.at[slot].at[a_rows]
    b = b_smem.at[slot]
    if isinstance(acc_ref, tuple):  # GLU: the gate and up halves of the slot
      return [(a, b.at[h]) for h in range(len(acc_ref))]
    return a, (b.transpose((1, 0)) if transpose_rhs else b)

  ring_mma(acc_ref, j * geo.ksteps, geo.ksteps, geo.stages, operands=operands, loaded=loaded,
           free=free, after=after)

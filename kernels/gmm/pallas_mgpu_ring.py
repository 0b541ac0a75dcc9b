"""Ring schedule of the Mosaic-GPU grouped matmul (Hopper): cooperative tiles, one wgmma in
flight, and one shared-memory ring that runs on from tile to tile.

The cooperative schedule of `pallas_mgpu` uses JAX's warp-specialised pipeline. That pipeline
waits for each wgmma to finish before its slot is released; it can only keep one in flight
(`delay_release`) when the tiles of a CTA are not chained into one pipeline. Here the pipeline
is written out by hand, so it has both:
* The memory warpgroup walks the CTA's items and their K steps as one sequence, loading
  step s into slot s % num_stages of a single ring. The next item's loads therefore start
  while the current item computes and stores.
* The compute warpgroups split the tile's rows: warpgroup w owns rows [w * tm / wgs, ...)
  and all tn columns, so each wgmma is a 64-row slab against the whole B tile (less
  shared-memory traffic per flop than a column split). After issuing step s a warpgroup
  waits for step s - 1's wgmma only, and then releases that slot.
* The output is staged in column chunks (two alternating buffers when the tile does not fit
  next to the ring, one for a float32 output), so the ring can be deeper than with a
  whole-tile staging buffer.
* `ring=2` moves the epilogue under the next item's main loop: a warpgroup keeps its block of
  item j - 1 in registers (as the output dtype) and stores its column chunks after the
  wgmmas of item j's K steps 0, ksteps / chunks, ... have been issued. The tensor cores then
  do not wait for the stores, and the CTAs' output writes are spread over the main loop
  instead of arriving in one burst per item (measured on the H100: the forward of the
  bench shapes gains 5-9 points of dense; with ring=1, removing the stores altogether
  would gain 7-22).

Work items, tile alignment to groups, the tail group and the ladder stores of group-edge
tiles are those of `pallas_mgpu` (gmm and the dx form with transposed rhs).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from openmoe_jax.kernels.gmm import mgpu_ring_parts as parts
from openmoe_jax.kernels.gmm import pallas_mgpu as coop
from openmoe_jax.kernels.gmm.tiling import Tiling

class OwnRows(NamedTuple):
  """One compute warpgroup's share of a work item's output block."""
  grp: jax.Array    # the item's group
  lo: jax.Array     # first row of the warpgroup's rows of the tile
  start: jax.Array  # of those, the first of the item's group
  end: jax.Array    # and one past its last
  ni: jax.Array     # column tile


def staging_for(ring_bytes: int, rows: int, tn: int, itemsize: int) -> tuple[int, int] | None:
  """(columns per staged chunk, buffers) of a rows x tn output block next to a ring of
  `ring_bytes`: the whole block in one buffer when it fits, else the widest chunk of
  tn / 2^i columns (>= 64) in two alternating buffers, else (a float32 output) one buffer
  of >= 32 columns; None if not even that fits."""
  room = parts.SMEM_BYTES - 1024 - ring_bytes
  if rows * tn * itemsize <= room:
    return tn, 1
  for bufs, narrowest in ((2, 64), (1, 32)):
    cols = tn // 2
    while cols >= narrowest:
      if bufs * rows * cols * itemsize <= room:
        return cols, bufs
      cols //= 2
  return None


def staging(t: Tiling, itemsize: int = 2, out_itemsize: int | None = None):
  """`staging_for` a gmm tile: a ring of tm x tk and tk x tn stages, a tm x tn block."""
  ring_bytes = t.num_stages * (t.tm * t.tk + t.tk * t.tn) * itemsize
  return staging_for(ring_bytes, t.tm, t.tn, out_itemsize or itemsize)


def unfit_for(t: Tiling, out_rows: int, staged: bool) -> str | None:
  """Why a ring tiling whose output block has `out_rows` rows (split between the compute
  warpgroups) and t.tn columns cannot run, else None; `staged`: the output staging fits next
  to the ring (for a float32 output too)."""
  wgs = t.num_warps // 4
  if t.ring not in (1, 2):
    return "ring: 1 (epilogue after the main loop) or 2 (under the next item's main loop)"
  if t.num_warps % 4 or wgs not in (1, 2):
    return "ring: num_warps 4 or 8 (one or two compute warpgroups)"
  rows = out_rows // wgs
  if out_rows % wgs or rows % 64 or rows * t.tn > 64 * 256 or t.tn % 64:
    return ("ring tiles: output rows / warpgroups a multiple of 64, tn a multiple of 64 and at "
            "most 64 x 256 f32 accumulators per warpgroup (registers)")
  if t.cluster != 1 or t.pingpong or t.ctas_per_sm != 1:
    return "ring: one CTA per SM, no cluster, no ping-pong"
  if not staged:
    return "ring of num_stages leaves no room for an output staging buffer"
  return None


def unfit(t: Tiling, itemsize: int = 2) -> str | None:
  """Why a tiling cannot run the ring gmm (its output block is tm x tn), else None."""
  return unfit_for(t, t.tm, staging(t, itemsize, 4) is not None)


GLU_ACTIVATIONS = ("silu", "relu", "identity")


def _activate(name: str, x):
  if name == "silu":
    return x * jax.nn.sigmoid(x)
  if name == "relu":
    return jnp.maximum(x, 0.0)
  return x


def gmm_call(tiles: coop.TileList, lhs_MK, rhs, *, n: int, transpose_rhs: bool, out_dtype,
             t: Tiling, interpret: bool, glu: str | None = None):
  """The ring gmm. With `glu` (an activation of GLU_ACTIVATIONS), rhs holds [gate | up]
  weights [G, K, 2n] and the output is act(lhs @ gate) * (lhs @ up) [M, n]: each item's K
  steps load a tk x tn / 2 block of both halves, each warpgroup keeps two accumulators, and
  the epilogue multiplies them, so the [M, 2n] product is never written."""
  geo = parts.geometry(lhs_MK, rhs, n=2 * n if glu else n, t=t, interpret=interpret)
  m, g, tm, tn, stages = geo.m, geo.g, geo.tm, geo.tn, geo.stages
  wgs = t.num_warps // 4
  rows_wg = tm // wgs
  ow = tn // 2 if glu else tn  # output columns of an item
  en, bufs = staging_for(stages * (tm * t.tk + t.tk * tn) * jnp.dtype(lhs_MK.dtype).itemsize,
                         tm, ow, jnp.dtype(out_dtype).itemsize)
  smem = parts.ring_smem(geo, lhs_MK.dtype, rhs.dtype, transpose_rhs)
  if glu:  # the gate and up halves of a column tile, one wgmma operand each
    smem["b_smem"] = plgpu.SMEM((stages, 2, t.tk, ow), rhs.dtype,
                                transforms=coop.swizzled(ow, rhs.dtype))

  def kernel(*refs):
    *tile_refs, lhs_gmem, rhs_gmem, out_gmem = refs  # the TileList, then the operands
    wg = lax.axis_index("wg")
    num_local, item = parts.local_items(tile_refs, geo)

    @functools.partial(
        pl.run_scoped, **smem,
        out_smem=plgpu.RefUnion(
            plgpu.SMEM((wgs, bufs, rows_wg, en), out_dtype,
                       transforms=coop.swizzled(en, out_dtype)),
            plgpu.SMEM((wgs, bufs, rows_wg, en), out_dtype)),
        produced=plgpu.Barrier(num_arrivals=3 if glu else 2, num_barriers=stages),
        consumed=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
        collective_axes="wg")
    def _scope(a_smem, b_smem, out_smem, produced, consumed):
      swz_smem, plain_smem = out_smem

      @pl.when(wg == wgs)
      def _memory_warpgroup():
        if wgs == 2:
          plgpu.set_max_registers(parts.MEMORY_REGISTERS, action="decrease")
        parts.load_ring(geo, item, num_local, transpose_rhs=transpose_rhs, lhs_gmem=lhs_gmem,
                        rhs_gmem=rhs_gmem, a_smem=a_smem, b_smem=b_smem,
                        loaded=lambda j, slot: produced.at[slot], free=consumed,
                        glu_cols=n if glu else 0)

      @pl.when(wg < wgs)
      def _compute_warpgroup():
        if wgs == 2:
          plgpu.set_max_registers(parts.COMPUTE_REGISTERS, action="increase")
        own = pl.ds(pl.multiple_of(wg * rows_wg, 64), rows_wg)

        def own_rows(j) -> OwnRows:
          """Item j's block as this warpgroup sees it: its rows of the tile, and of them
          those of the item's group."""
          grp, start, end, row0, ni = item(j)
          lo = row0 + wg * rows_wg
          own_start = jnp.clip(start, lo, lo + rows_wg)
          own_end = jnp.clip(end, own_start, lo + rows_wg)
          return OwnRows(grp, lo, own_start, own_end, ni)

        chunks = ow // en

        def store_chunk(block, o: OwnRows, c: int):
          """Stages and stores columns [c * en, (c + 1) * en) of this warpgroup's block."""
          o = o._replace(lo=pl.multiple_of(o.lo, coop.ROW_ALIGN))  # lost in a loop carry
          if c == 0:  # the last block's stores have read their buffers
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          elif c >= bufs:  # the store that used this buffer has read it
            plgpu.wait_smem_to_gmem(bufs - 1, wait_read_only=True)
          buf = c % bufs
          coop.store_tile(block[:, c * en:(c + 1) * en].astype(out_dtype),
                          swz_smem.at[wg, buf], plain_smem.at[wg, buf],
                          out_gmem.at[pl.ds(o.lo, rows_wg), pl.ds(o.ni * ow + c * en, en)],
                          group=o.grp, num_groups=g, start=o.start, end=o.end, row0=o.lo)

        def store(block, o: OwnRows):
          for c in range(chunks):
            store_chunk(block, o, c)

        def multiply(j, after=()):
          def main_loop(*acc_refs):
            parts.mma_steps(geo, acc_refs if glu else acc_refs[0], j,
                            transpose_rhs=transpose_rhs, a_smem=a_smem, b_smem=b_smem,
                            loaded=lambda slot: produced.at[slot], free=consumed, a_rows=own,
                            after=after)
            if glu:
              return _activate(glu, acc_refs[0][...]) * acc_refs[1][...]
            return acc_refs[0][...]
          accs = [plgpu.ACC((rows_wg, ow), jnp.float32)] * (2 if glu else 1)
          return pl.run_scoped(main_loop, *accs)

        if t.ring == 1:
          @pl.loop(0, num_local)
          def _item(j):
            store(multiply(j), own_rows(j))
        else:
          # Epilogue under the next item's main loop: the block of item j - 1 is kept in
          # registers (as out_dtype), and its column chunks are stored while item j's wgmmas
          # compute, spread over its K steps (so the CTAs' output writes do not come in
          # bursts that stall the ring's loads).
          def item_with_last(j, carry):
            last, last_o = carry
            pending = last_o.end > last_o.start

            def chunk_of_last(c):
              return lambda: pl.when(pending)(lambda: store_chunk(last, last_o, c))

            after = [(c * geo.ksteps // chunks, chunk_of_last(c)) for c in range(chunks)]
            return multiply(j, after).astype(out_dtype), own_rows(j)

          nothing = OwnRows(*(jnp.int32(0),) * 5)
          last, last_o = lax.fori_loop(
              0, num_local, item_with_last, (jnp.zeros((rows_wg, ow), out_dtype), nothing))

          @pl.when(last_o.end > last_o.start)
          def _store_last():
            store(last, last_o)

      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  call = parts.launch(kernel, jax.ShapeDtypeStruct((m, n), out_dtype), wgs, geo.num_ctas, interpret)
  return call(tiles.group, tiles.start, tiles.end, tiles.count, lhs_MK, rhs)

"""Ping-pong schedule of the Mosaic-GPU grouped matmul (Hopper): the epilogue leaves the
tensor cores' critical path.

The cooperative kernel (`pallas_mgpu`) has both compute warpgroups work on one output tile,
so while they convert and store it the tensor cores idle. Here each compute warpgroup owns
whole tiles: a CTA's work items alternate between warpgroup 0 and 1, and their main loops
take turns (a barrier pair hands the tensor cores over), so one warpgroup's epilogue runs
under the other's main loop. On the H100 this wins where K is short (K = 768: 79-80% of a
dense matmul against 74-75% cooperative) and loses on long K, where a warpgroup's 128 x 128
tile needs a third more L2 -> shared-memory traffic per flop than a CTA's 256 x 128.

One memory warpgroup feeds both: it walks the CTA's items in order, loading each K step
into the next slot of one `num_stages`-deep ring, so the next item's loads start while the
current one computes. A slot's "loaded" barrier is per owner (a barrier's phase is tracked
per waiting thread, so a warpgroup must see every phase of the barriers it waits on, and it
only waits on its own steps); its "free" barrier is shared (each use is released once).
Inside a main loop one wgmma stays in flight: a slot is released when the wgmma after it
has been issued.

Work items, tile alignment to groups, the tail group and the ladder stores of group-edge
tiles are those of `pallas_mgpu` (gmm and the dx form with transposed rhs; tgmm stays
cooperative there).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from openmoe_jax.kernels.gmm import mgpu_ring_parts as parts
from openmoe_jax.kernels.gmm import pallas_mgpu as coop
from openmoe_jax.kernels.gmm.tiling import Tiling

SMEM_BYTES = parts.SMEM_BYTES


def epilogue_cols(t: Tiling, itemsize: int = 2) -> int:
  """Output columns staged per store: the whole tile when it fits next to the input ring,
  else halves or quarters (each staged after the previous store has read its bytes)."""
  ring = t.num_stages * (t.tm * t.tk + t.tk * t.tn) * itemsize
  cols = t.tn
  while cols > 64 and ring + 2 * t.tm * cols * itemsize > SMEM_BYTES - 1024:
    cols //= 2
  return cols


def unfit(t: Tiling, itemsize: int = 2) -> str | None:
  """Why a tiling cannot run ping-pong (registers or shared memory), else None."""
  if t.num_warps != 8:
    return "ping-pong needs num_warps=8 (two compute warpgroups)"
  if t.tm * t.tn > 128 * 128 or t.tm % 64 or t.tn % 64:
    return "ping-pong tiles: tm, tn multiples of 64 with tm * tn <= 128 * 128 (f32 registers)"
  ring = t.num_stages * (t.tm * t.tk + t.tk * t.tn) * itemsize
  if ring + 2 * t.tm * epilogue_cols(t, itemsize) * itemsize > SMEM_BYTES - 1024:
    return f"ping-pong ring of {ring} bytes leaves no room for the output staging"
  return None


def gmm_call(tiles: coop.TileList, lhs_MK, rhs, *, n: int, transpose_rhs: bool, out_dtype,
             t: Tiling, interpret: bool):
  geo = parts.geometry(lhs_MK, rhs, n=n, t=t, interpret=interpret)
  m, g, tm, tn, stages = geo.m, geo.g, geo.tm, geo.tn, geo.stages
  en = epilogue_cols(t, jnp.dtype(out_dtype).itemsize)

  def kernel(*refs):
    *tile_refs, lhs_gmem, rhs_gmem, out_gmem = refs  # the TileList, then the operands
    wg = lax.axis_index("wg")
    num_local, item = parts.local_items(tile_refs, geo)

    @functools.partial(
        pl.run_scoped, **parts.ring_smem(geo, lhs_MK.dtype, rhs.dtype, transpose_rhs),
        out_smem=plgpu.RefUnion(
            plgpu.SMEM((2, tm, en), out_dtype, transforms=coop.swizzled(en, out_dtype)),
            plgpu.SMEM((2, tm, en), out_dtype)),
        produced=plgpu.Barrier(num_arrivals=2, num_barriers=2 * stages),
        consumed=plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        mma_done=plgpu.Barrier(num_arrivals=1, num_barriers=2),
        collective_axes="wg")
    def _scope(a_smem, b_smem, out_smem, produced, consumed, mma_done):
      swz_smem, plain_smem = out_smem

      @pl.when(wg == 2)
      def _memory_warpgroup():
        plgpu.set_max_registers(parts.MEMORY_REGISTERS, action="decrease")
        # A slot's "loaded" barrier is per owner: warpgroup j % 2 computes item j.
        parts.load_ring(geo, item, num_local, transpose_rhs=transpose_rhs, lhs_gmem=lhs_gmem,
                        rhs_gmem=rhs_gmem, a_smem=a_smem, b_smem=b_smem,
                        loaded=lambda j, slot: produced.at[(j % 2) * stages + slot],
                        free=consumed)

      @pl.when(wg < 2)
      def _compute_warpgroup():
        plgpu.set_max_registers(parts.COMPUTE_REGISTERS, action="increase")

        @pl.loop(0, (num_local - wg + 1) // 2)
        def _item(i):
          j = wg + 2 * i
          grp, start, end, row0, ni = item(j)

          @pl.when(j > 0)
          def _take_turn():  # the other warpgroup's main loop has finished
            plgpu.barrier_wait(mma_done.at[1 - wg])

          def main_loop(acc_ref):
            parts.mma_steps(geo, acc_ref, j, transpose_rhs=transpose_rhs, a_smem=a_smem,
                            b_smem=b_smem,
                            loaded=lambda slot: produced.at[wg * stages + slot], free=consumed)
            plgpu.barrier_arrive(mma_done.at[wg])
            return acc_ref[...]

          acc = pl.run_scoped(main_loop, plgpu.ACC((tm, tn), jnp.float32))
          for c in range(tn // en):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the staging buffer is free
            coop.store_tile(acc[:, c * en:(c + 1) * en].astype(out_dtype), swz_smem.at[wg],
                            plain_smem.at[wg],
                            out_gmem.at[pl.ds(row0, tm), pl.ds(ni * tn + c * en, en)],
                            group=grp, num_groups=g, start=start, end=end, row0=row0)

        # The other warpgroup's last turn hand-over, when no item of ours followed it.
        mine, theirs = (num_local - wg + 1) // 2, (num_local - (1 - wg) + 1) // 2
        waited = jnp.maximum(mine - (wg == 0), 0)  # warpgroup 0 skips the wait on item 0

        @pl.when(theirs > waited)
        def _last_turn():
          plgpu.barrier_wait(mma_done.at[1 - wg])

      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  call = parts.launch(kernel, jax.ShapeDtypeStruct((m, n), out_dtype), 2, geo.num_ctas,
                      interpret)
  return call(tiles.group, tiles.start, tiles.end, tiles.count, lhs_MK, rhs)

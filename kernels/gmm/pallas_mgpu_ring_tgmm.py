"""Ring schedule of the Mosaic-GPU weight-gradient form `tgmm` (Hopper).

out[g, K tile, N tile] = lhs[rows of g, K tile].T @ rhs[rows of g, N tile]. A work item is one
(group, K tile, N tile) output block; its steps are the group's `tm`-row tiles (aligned to
`tm`; at least one, so an empty group writes zeros). As in `pallas_mgpu_ring`:
* The memory warpgroup walks the CTA's items and their steps as one sequence through one
  ring of `num_stages` slots; a step's slot is its running index (items have different step
  counts, so every warpgroup carries that index from item to item) modulo the stages.
* The compute warpgroups split the output block's rows: warpgroup w owns K columns
  [w * tk / wgs, ...) of the lhs tile, i.e. rows of the block, and all tn columns. A
  group-edge step zeroes the other groups' rows of its own lhs columns in shared memory
  before the wgmma (each warpgroup touches only its own columns).
* One wgmma stays in flight; a slot is freed once the wgmma after it has been issued.
* The block is staged in column chunks (`pallas_mgpu_ring.staging_for`) and TMA-stored.
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
from openmoe_jax.kernels.gmm import pallas_mgpu_ring as ring
from openmoe_jax.kernels.gmm.tiling import Tiling


def _staging(t: Tiling, in_itemsize: int, out_itemsize: int):
  ring_bytes = t.num_stages * t.tm * (t.tk + t.tn) * in_itemsize
  return ring.staging_for(ring_bytes, t.tk, t.tn, out_itemsize)


def unfit(t: Tiling, itemsize: int = 2) -> str | None:
  """Why a tiling cannot run the ring tgmm (registers or shared memory), else None."""
  if t.ring != 1:
    return "ring tgmm: ring=1 (ring=2, the overlapped epilogue, is gmm only)"
  if t.tm % 64:
    return "ring tgmm tiles: tm (reduction rows per step) a multiple of 64"
  return ring.unfit_for(t, t.tk, _staging(t, itemsize, 4) is not None)


def tgmm_call(rows: coop.GroupRowTiles, lhs_MK, rhs_MN, *, out_dtype, t: Tiling,
              interpret: bool):
  m, k = lhs_MK.shape
  n = rhs_MN.shape[1]
  g = rows.start.shape[0]
  tm, tn, tk, stages = t.tm, t.tn, t.tk, t.num_stages
  wgs = t.num_warps // 4
  tk_wg = tk // wgs
  grid_k, grid_n = k // tk, n // tn
  num_items = g * grid_k * grid_n
  num_ctas = coop.num_sms(interpret)
  en, bufs = _staging(t, jnp.dtype(lhs_MK.dtype).itemsize, jnp.dtype(out_dtype).itemsize)

  def kernel(start_gmem, end_gmem, first_gmem, count_gmem, lhs_gmem, rhs_gmem, out_gmem):
    wg = lax.axis_index("wg")
    cta = lax.axis_index("sm")
    num_local = (num_items - cta + num_ctas - 1) // num_ctas

    def item(j):
      """(group, K tile, N tile, first row tile, row tiles) of this CTA's item j."""
      i = cta + j * num_ctas
      gi = i // (grid_k * grid_n)
      ki, ni = plgpu.planar_snake(i % (grid_k * grid_n), (grid_k, grid_n), 1,
                                  min(t.group_m, grid_k))
      return gi, ki, ni, first_gmem[gi], count_gmem[gi]

    @functools.partial(
        pl.run_scoped,
        a_smem=plgpu.SMEM((stages, tm, tk), lhs_MK.dtype,
                          transforms=coop.swizzled(tk, lhs_MK.dtype)),
        b_smem=plgpu.SMEM((stages, tm, tn), rhs_MN.dtype,
                          transforms=coop.swizzled(tn, rhs_MN.dtype)),
        out_smem=plgpu.SMEM((wgs, bufs, tk_wg, en), out_dtype,
                            transforms=coop.swizzled(en, out_dtype)),
        produced=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        consumed=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
        collective_axes="wg")
    def _scope(a_smem, b_smem, out_smem, produced, consumed):
      @pl.when(wg == wgs)
      def _memory_warpgroup():
        if wgs == 2:
          plgpu.set_max_registers(parts.MEMORY_REGISTERS, action="decrease")

        def load_item(j, s0):
          _, ki, ni, first, count = item(j)

          @pl.loop(0, count)
          def _step(r):
            s = s0 + r
            slot = s % stages

            @pl.when(s >= stages)
            def _wait_free():
              plgpu.barrier_wait(consumed.at[slot])

            tile_rows = pl.ds(pl.multiple_of((first + r) * tm, tm), tm)
            plgpu.copy_gmem_to_smem(lhs_gmem.at[tile_rows, pl.ds(ki * tk, tk)],
                                    a_smem.at[slot], produced.at[slot])
            plgpu.copy_gmem_to_smem(rhs_gmem.at[tile_rows, pl.ds(ni * tn, tn)],
                                    b_smem.at[slot], produced.at[slot])
          return s0 + count

        steps = lax.fori_loop(0, num_local, load_item, jnp.int32(0))

        @pl.loop(jnp.maximum(steps - stages, 0), steps)  # observe the last releases
        def _drain(s):
          plgpu.barrier_wait(consumed.at[s % stages])

      @pl.when(wg < wgs)
      def _compute_warpgroup():
        if wgs == 2:
          plgpu.set_max_registers(parts.COMPUTE_REGISTERS, action="increase")
        own = pl.ds(pl.multiple_of(wg * tk_wg, 64), tk_wg)

        def compute_item(j, s0):
          gi, ki, ni, first, count = item(j)
          start, end = start_gmem[gi], end_gmem[gi]

          def operands(r, slot):
            a_own = a_smem.at[slot].at[:, own]

            @pl.when((r == 0) | (r == count - 1))
            def _mask_other_groups():
              row = plgpu.broadcasted_iota(jnp.int32, (tm, tk_wg), 0,
                                           layout=plgpu.Layout.WGMMA) + (first + r) * tm
              keep = (row >= start) & (row < end)
              a_own[...] = jnp.where(keep, a_own[...], jnp.zeros_like(a_own[...]))
              plgpu.commit_smem()

            return a_own.transpose((1, 0)), b_smem.at[slot]

          def main_loop(acc_ref):
            parts.ring_mma(acc_ref, s0, count, stages, operands=operands,
                           loaded=lambda slot: produced.at[slot], free=consumed)
            return acc_ref[...]

          acc = pl.run_scoped(main_loop, plgpu.ACC((tk_wg, tn), jnp.float32))
          out_rows = pl.ds(ki * tk + wg * tk_wg, tk_wg)
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last item's stores read
          for c in range(tn // en):
            if c >= bufs:  # the store that used this buffer has read it
              plgpu.wait_smem_to_gmem(bufs - 1, wait_read_only=True)
            buf = out_smem.at[wg, c % bufs]
            buf[...] = acc[:, c * en:(c + 1) * en].astype(out_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(buf, out_gmem.at[gi, out_rows, pl.ds(ni * tn + c * en, en)])
          return s0 + count

        lax.fori_loop(0, num_local, compute_item, jnp.int32(0))

      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  call = parts.launch(kernel, jax.ShapeDtypeStruct((g, k, n), out_dtype), wgs, num_ctas,
                      interpret)
  return call(rows.start, rows.end, rows.first_tile, rows.num_tiles, lhs_MK, rhs_MN)

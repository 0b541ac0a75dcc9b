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

from openmoe_jax.kernels.gmm import pallas_mgpu as coop
from openmoe_jax.kernels.gmm.tiling import Tiling

SMEM_BYTES = 227 * 1024
_COMPUTE_REGISTERS = 232  # two compute warpgroups at 232 + one memory at 40 <= 512 per thread
_MEMORY_REGISTERS = 40


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
  m, k = lhs_MK.shape
  g = rhs.shape[0]
  tm, tn, tk, stages = t.tm, t.tn, t.tk, t.num_stages
  ksteps, grid_n = k // tk, n // tn
  en = epilogue_cols(t, jnp.dtype(out_dtype).itemsize)
  num_items_max = tiles.group.shape[0]
  num_ctas = coop.num_sms(interpret)
  rhs_block = (tn, tk) if transpose_rhs else (tk, tn)

  def kernel(grp_gmem, start_gmem, end_gmem, count_gmem, lhs_gmem, rhs_gmem, out_gmem):
    wg = lax.axis_index("wg")
    cta = lax.axis_index("sm")
    num_valid = count_gmem[0]
    num_local = jnp.maximum(num_valid * grid_n - cta + num_ctas - 1, 0) // num_ctas

    def item(j):
      """(group, first own row, end row, loaded row0, column tile) of local item j."""
      idx, ni = plgpu.planar_snake(cta + j * num_ctas, (num_valid, grid_n), 1,
                                   min(t.group_m, num_items_max))
      grp, start, end = grp_gmem[idx], start_gmem[idx], end_gmem[idx]
      row0 = jnp.minimum(start // coop.ROW_ALIGN * coop.ROW_ALIGN, m - tm)
      return grp, start, end, pl.multiple_of(row0, coop.ROW_ALIGN), ni

    @functools.partial(
        pl.run_scoped,
        a_smem=plgpu.SMEM((stages, tm, tk), lhs_MK.dtype,
                          transforms=coop.swizzled(tk, lhs_MK.dtype)),
        b_smem=plgpu.SMEM((stages, *rhs_block), rhs.dtype,
                          transforms=coop.swizzled(rhs_block[1], rhs.dtype)),
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
        plgpu.set_max_registers(_MEMORY_REGISTERS, action="decrease")

        @pl.loop(0, num_local)
        def _item(j):
          grp, _, _, row0, ni = item(j)
          owner = j % 2
          rhs_g = rhs_gmem.at[jnp.minimum(grp, g - 1)]

          @pl.loop(0, ksteps)
          def _step(kk):
            s = j * ksteps + kk
            slot = s % stages

            @pl.when(s >= stages)
            def _wait_free():
              plgpu.barrier_wait(consumed.at[slot])

            cols = pl.ds(kk * tk, tk)
            loaded = produced.at[owner * stages + slot]
            plgpu.copy_gmem_to_smem(lhs_gmem.at[pl.ds(row0, tm), cols], a_smem.at[slot], loaded)
            src = (rhs_g.at[pl.ds(ni * tn, tn), cols] if transpose_rhs
                   else rhs_g.at[cols, pl.ds(ni * tn, tn)])
            plgpu.copy_gmem_to_smem(src, b_smem.at[slot], loaded)

        # Observe the last releases, so that no barrier phase goes unseen.
        steps = num_local * ksteps

        @pl.loop(jnp.maximum(steps - stages, 0), steps)
        def _drain(s):
          plgpu.barrier_wait(consumed.at[s % stages])

      @pl.when(wg < 2)
      def _compute_warpgroup():
        plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")

        @pl.loop(0, (num_local - wg + 1) // 2)
        def _item(i):
          j = wg + 2 * i
          grp, start, end, row0, ni = item(j)

          @pl.when(j > 0)
          def _take_turn():  # the other warpgroup's main loop has finished
            plgpu.barrier_wait(mma_done.at[1 - wg])

          def main_loop(acc_ref):
            def step(kk, _):
              s = j * ksteps + kk
              plgpu.barrier_wait(produced.at[wg * stages + s % stages])
              b = b_smem.at[s % stages]
              plgpu.wgmma(acc_ref, a_smem.at[s % stages],
                          b.transpose((1, 0)) if transpose_rhs else b)
              plgpu.wgmma_wait(1)  # the previous step's wgmma is done: free its slot

              @pl.when(kk > 0)
              def _release():
                plgpu.barrier_arrive(consumed.at[(s - 1) % stages])

            lax.fori_loop(0, ksteps, step, None)
            plgpu.wgmma_wait(0)
            plgpu.barrier_arrive(consumed.at[(j * ksteps + ksteps - 1) % stages])
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

  call = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((m, n), out_dtype), grid=(num_ctas,),
      grid_names=("sm",), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=plgpu.InterpretGPUParams() if interpret else False)
  return call(tiles.group, tiles.start, tiles.end, tiles.count, lhs_MK, rhs)

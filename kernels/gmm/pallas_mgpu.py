"""Grouped matmul in Pallas Mosaic GPU for Hopper: TMA loads, wgmma, warp specialisation.

`ctas_per_sm` persistent CTAs per SM (1, or 2 small-tile CTAs whose epilogues overlap each
other's main loops) walk a work list. Each CTA runs one memory warpgroup (TMA loads
into a `num_stages`-deep shared-memory ring) and `num_warps // 4` compute warpgroups, each
owning `tn / wgs` output columns of the tile and issuing wgmma on the shared tiles.
With `cluster=2`, CTA pairs take adjacent column tiles of the same rows and the lhs tile is
loaded once for both (TMA multicast), which cuts L2 traffic by a sixth at 128 x 256 tiles.
`pingpong=1` (gmm only) runs the schedule of `pallas_mgpu_pingpong` instead, `ring=1` that of
`pallas_mgpu_ring` (gmm) or `pallas_mgpu_ring_tgmm` (tgmm), `ring=2` (gmm only) the ring with
each block stored under the next block's wgmmas.

gmm: a work item is `tm` rows of one group, starting at the group's first row (tiles are
aligned to groups, not to the row grid, so a group of s rows costs ceil(s / tm) tiles and a
group boundary never doubles a tile). A tile whose rows would run past M is shifted back to
end at M; its store writes only the group's rows, through a ladder of power-of-two TMA
stores. Rows past sum(group_sizes) form a tail group whose tiles store zeros.
tgmm: a work item is one (group, K tile, N tile) output block, reducing over the group's
row tiles (aligned to `tm`); the first and last tiles zero the other groups' rows in
shared memory before the wgmma. On the GPU both work lists come from one small Triton
launch each (`tile_list`), not from a chain of tiny XLA kernels.

No fused row gather (Hopper's TMA cannot gather rows) and no exact float32 (wgmma rounds
to tf32): `ops` routes those calls to the Triton-lowered kernel. `interpret=True` runs the
kernels in Pallas' GPU interpreter on CPU.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from openmoe_jax.kernels.gmm import tile_list
from openmoe_jax.kernels.gmm.tiling import Tiling

DEFAULT_TILING = Tiling(tm=128, tn=256, tk=64, num_warps=8, num_stages=3, group_m=8)
DEFAULT_TGMM_TILING = Tiling(tm=64, tn=256, tk=128, num_warps=8, num_stages=3, group_m=8)
_MEMORY_REGISTERS = 40
ROW_ALIGN = tile_list.ROW_ALIGN  # row starts of TMA tile loads: multiples of the 8-row smem tiling


def supports(lhs_dtype, *, gather: bool, k: int, n: int, t: Tiling, op: str,
             glu: str | None = None) -> str | None:
  """None when this backend runs the call, else why it cannot (ops then uses pallas_gpu).
  With `glu`, n is the width of the [gate | up] weights (2F)."""
  if gather:
    return "fused row gather (TMA has no row gather on Hopper)"
  if glu:
    from openmoe_jax.kernels.gmm import pallas_mgpu_ring  # noqa: PLC0415 - imports us
    if glu not in pallas_mgpu_ring.GLU_ACTIVATIONS:
      return f"glu activation {glu!r} (fused: {pallas_mgpu_ring.GLU_ACTIVATIONS})"
    if op != "gmm" or not t.ring or t.tn % 128 or n % 2 or (n // 2) % (t.tn // 2):
      return (f"glu with tiling {t} (a ring tile of the plain gmm whose tn / 2 is a multiple "
              "of 64 and divides each half of the weights)")
  if jnp.dtype(lhs_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(lhs_dtype).name} (wgmma is exact for 16-bit operands only)"
  wgs = t.num_warps // 4
  if t.num_warps % 4 or wgs not in (1, 2) or t.tn % (64 * wgs):
    return f"tiling {t} (num_warps 4 or 8; tn / warpgroups a multiple of 64)"
  red, out_rows = (t.tm, t.tk) if op == "tgmm" else (t.tk, t.tm)
  if t.tm & (t.tm - 1) or t.tm < 64 or t.tk % 64:
    return f"tiling {t} (tm a power of two >= 64, tk a multiple of 64)"
  if op == "tgmm" and k % t.tk:
    return f"K={k} not a multiple of tk={t.tk}"
  if op != "tgmm" and k % red:
    return f"K={k} not a multiple of tk={red}"
  if n % t.tn:
    return f"N={n} not a multiple of tn={t.tn}"
  if t.cluster not in (1, 2) or (t.cluster == 2 and t.pingpong and op != "tgmm"):
    return f"tiling {t} (clusters of 1 or 2 CTAs, not with ping-pong)"
  if n % (t.tn * t.cluster):
    return f"N={n} not a multiple of tn * cluster={t.tn * t.cluster}"
  del out_rows
  if t.ring and op == "tgmm":
    from openmoe_jax.kernels.gmm import pallas_mgpu_ring_tgmm  # noqa: PLC0415 - imports us
    return pallas_mgpu_ring_tgmm.unfit(t, jnp.dtype(lhs_dtype).itemsize)
  if t.ring:
    from openmoe_jax.kernels.gmm import pallas_mgpu_ring  # noqa: PLC0415 - imports us
    return pallas_mgpu_ring.unfit(t, jnp.dtype(lhs_dtype).itemsize)
  if t.pingpong and op != "tgmm":
    from openmoe_jax.kernels.gmm import pallas_mgpu_pingpong  # noqa: PLC0415 - imports us
    return pallas_mgpu_pingpong.unfit(t, jnp.dtype(lhs_dtype).itemsize)
  return None


def num_sms(interpret: bool) -> int:
  if interpret:
    return 4
  return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def swizzled(minor_elems: int, dtype) -> tuple:
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(minor_elems * itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _launch(kernel, out_type, t: Tiling, interpret: bool):
  """Persistent launch: ctas_per_sm CTAs per SM, each one memory + num_warps/4 compute
  warpgroups (axis "wg"), in clusters of t.cluster CTAs (axis "cluster"; grid axis "sm"
  counts clusters); `interpret` runs Pallas' GPU interpreter instead."""
  cluster = dict(cluster=(t.cluster,), cluster_names=("cluster",)) if t.cluster > 1 else {}
  return plgpu.kernel(
      kernel, out_type=out_type, grid=(num_sms(interpret) * t.ctas_per_sm // t.cluster,),
      grid_names=("sm",), num_threads=t.num_warps // 4 + 1, thread_name="wg", **cluster,
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=plgpu.InterpretGPUParams() if interpret else False)


class TileList(NamedTuple):
  group: jax.Array   # int32[I]: group of each item (G = the tail of unassigned rows)
  start: jax.Array   # int32[I]: first row of the item
  end: jax.Array     # int32[I]: one past its last row (start < end <= start + tm)
  count: jax.Array   # int32[1]: number of valid items


def group_aligned_tiles(group_sizes_G: jax.Array, m: int, tm: int) -> TileList:
  """Work list of group-aligned row tiles: group g's rows [s, e) cut into tiles of tm rows
  starting at s rounded down to a multiple of 8 (TMA tile loads want 8-row aligned starts);
  a tile's own rows are its span clipped to [s, e)."""
  sizes = group_sizes_G.astype(jnp.int32)
  ends = jnp.minimum(jnp.cumsum(sizes), m)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  starts = jnp.concatenate([starts, ends[-1:]])               # the tail group
  ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
  base = starts // ROW_ALIGN * ROW_ALIGN
  count = jnp.where(ends > starts, (ends - base + tm - 1) // tm, 0)
  cum = jnp.cumsum(count)
  num = -(-m // tm) + 2 * (sizes.shape[0] + 1)
  item = jnp.arange(num, dtype=jnp.int32)
  grp = jnp.searchsorted(cum, item, side="right", method="compare_all").astype(jnp.int32)
  grp = jnp.minimum(grp, starts.shape[0] - 1)
  local = item - (cum[grp] - count[grp])
  tile0 = base[grp] + local * tm
  start = jnp.maximum(tile0, starts[grp])
  end = jnp.minimum(tile0 + tm, ends[grp])
  return TileList(grp, start, end, cum[-1:].astype(jnp.int32))


def _accumulating(shape: tuple[int, int], epilogue):
  """Pipeline compute context: a float32 wgmma accumulator of `shape`, zeroed, filled by the
  pipeline, then handed to `epilogue` once this warpgroup's previous TMA store has finished
  reading its staging buffer."""
  def context(run):
    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(shape, jnp.float32))
    def _acc(acc_ref):
      run(acc_ref)
      plgpu.wgmma_wait(0)  # a pipeline with delayed release leaves the last wgmma in flight
      acc = acc_ref[...]
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      epilogue(acc)
  return context


def ladder_store(src_smem, dst_gmem, row_offset, num_rows, max_rows: int):
  """TMA-stores src_smem[row_offset : row_offset + num_rows] (num_rows <= max_rows, a
  run-time value) to the same rows of dst_gmem, as power-of-two row blocks."""
  done = row_offset
  size = max_rows
  while size >= 1:
    @pl.when(num_rows & size != 0)
    def _store(size=size, done=done):
      plgpu.copy_smem_to_gmem(src_smem.at[pl.ds(done, size)], dst_gmem.at[pl.ds(done, size)])
    done = done + (num_rows & size)
    size //= 2


def store_tile(part, swz_smem, plain_smem, out_view, *, group, num_groups: int, start, end,
               row0) -> None:
  """Stores one staged output block (`part`, rows row0 .. row0 + tm of out_view) of a gmm
  work item: a full tile through the swizzled buffer in one TMA store; a group-edge tile
  through the plain view of the same bytes, only rows [start, end), as a ladder of stores;
  the tail group's rows (group == num_groups) as zeros."""
  tm = part.shape[0]
  full = (group < num_groups) & (start == row0) & (end == row0 + tm)

  @pl.when(full)
  def _full_tile():
    swz_smem[...] = part
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(swz_smem, out_view)

  @pl.when(jnp.logical_not(full))
  def _edge_tile():
    @pl.when(group < num_groups)
    def _product():
      plain_smem[...] = part

    @pl.when(group >= num_groups)
    def _tail():
      plain_smem[...] = jnp.zeros(part.shape, part.dtype)

    plgpu.commit_smem()
    ladder_store(plain_smem, out_view, start - row0, end - start, tm)


def _gmm_call(tiles: TileList, lhs_MK, rhs, *, n: int, transpose_rhs: bool, out_dtype,
              t: Tiling, interpret: bool):
  m, k = lhs_MK.shape
  g = rhs.shape[0]
  tm, tn, tk = t.tm, t.tn, t.tk
  wgs = t.num_warps // 4
  tn_wg = tn // wgs
  grid_nc = n // tn // t.cluster  # column tiles of a cluster
  num_items_max = tiles.group.shape[0]
  lhs_tr = swizzled(tk, lhs_MK.dtype)
  rhs_block = (tn, tk) if transpose_rhs else (tk, tn)
  rhs_tr = swizzled(rhs_block[1], rhs.dtype)
  # Consecutive tiles of a CTA form one pipeline (the memory warpgroup loads the next tile
  # while the compute warpgroups finish this one) when the ring divides the K steps.
  chained = (k // tk) % t.num_stages == 0
  # Otherwise a slot may be released one step late, so one wgmma stays in flight across
  # steps (`delay_release`; JAX's pipeline allows it only for unchained pipelines).
  delay = 1 if t.delay_release and not chained else 0

  def pipeline(body, context, state=None):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k // tk,), memory_registers=_MEMORY_REGISTERS,
        # In a cluster, the CTAs take adjacent column tiles of the same rows: the lhs tile
        # is loaded once (each CTA fetches part of it) and multicast to both.
        in_specs=[plgpu.BlockSpec((tm, tk), lambda kk: (0, kk), transforms=lhs_tr,
                                  collective_axes=("cluster",) if t.cluster > 1 else (),
                                  delay_release=delay),
                  plgpu.BlockSpec(rhs_block, (lambda kk: (0, kk)) if transpose_rhs
                                  else (lambda kk: (kk, 0)), transforms=rhs_tr,
                                  delay_release=delay)],
        wg_axis="wg", num_compute_wgs=wgs, max_concurrent_steps=t.num_stages,
        compute_context=context, pipeline_state=state)

  def kernel(grp_gmem, start_gmem, end_gmem, count_gmem, lhs_gmem, rhs_gmem, out_gmem):
    wg = lax.axis_index("wg")
    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(lhs_gmem, rhs_gmem),
        # Full tiles stage their output swizzled (conflict-free stores, one TMA store);
        # group-edge tiles use a plain view of the same bytes for row-granular stores.
        out_smem=plgpu.RefUnion(
            plgpu.SMEM((wgs, tm, tn_wg), out_dtype, transforms=swizzled(tn_wg, out_dtype)),
            plgpu.SMEM((wgs, tm, tn_wg), out_dtype)),
        collective_axes="wg")
    def _scope(allocs, out_smem):
      swz_smem, plain_smem = out_smem
      num_valid = count_gmem[0]

      @plgpu.nd_loop((num_valid * grid_nc,), collective_axes="sm")
      def _loop(info):
        item, nc = plgpu.planar_snake(info.index[0], (num_valid, grid_nc), 1,
                                      min(t.group_m, num_items_max))
        ni = nc * t.cluster + (lax.axis_index("cluster") if t.cluster > 1 else 0)
        grp, start, end = grp_gmem[item], start_gmem[item], end_gmem[item]
        row0 = pl.multiple_of(jnp.minimum(start // ROW_ALIGN * ROW_ALIGN, m - tm), ROW_ALIGN)
        col0 = ni * tn + wg * tn_wg
        out_view = out_gmem.at[pl.ds(row0, tm), pl.ds(col0, tn_wg)]

        def epilogue(acc):
          store_tile(acc.astype(out_dtype), swz_smem.at[wg], plain_smem.at[wg], out_view,
                     group=grp, num_groups=g, start=start, end=end, row0=row0)

        def mma(_, a_smem, b_smem, acc_ref):
          if transpose_rhs:
            b = b_smem.at[pl.ds(wg * tn_wg, tn_wg), :].transpose((1, 0))
          else:
            b = b_smem.at[:, pl.ds(wg * tn_wg, tn_wg)]
          plgpu.wgmma(acc_ref, a_smem, b)
          plgpu.wgmma_wait(delay)
          return acc_ref

        state = None
        if chained:
          last = info.num_local_steps - 1
          state = jnp.where(info.local_index == 0, int(plgpu.PipelinePipeline.START),
                            jnp.where(info.local_index == last,
                                      int(plgpu.PipelinePipeline.STOP),
                                      int(plgpu.PipelinePipeline.STEADY)))
        rhs_g = rhs_gmem.at[jnp.minimum(grp, g - 1)]
        rhs_view = (rhs_g.at[pl.ds(ni * tn, tn), :] if transpose_rhs
                    else rhs_g.at[:, pl.ds(ni * tn, tn)])
        pipeline(mma, _accumulating((tm, tn_wg), epilogue), state)(
            lhs_gmem.at[pl.ds(row0, tm), :], rhs_view, allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  call = _launch(kernel, jax.ShapeDtypeStruct((m, n), out_dtype), t, interpret)
  return call(tiles.group, tiles.start, tiles.end, tiles.count, lhs_MK, rhs)


def gmm(lhs_XK, rhs_GKN, group_sizes_G, *, row_index_M=None, transpose_rhs=False,
        out_dtype=None, tiling: Tiling | None = None, interpret: bool = False,
        glu: str | None = None) -> jax.Array:
  """out[m] = lhs[m] @ rhs[group(m)] (rows past the end zero). See `supports`.

  `glu` (an activation of `pallas_mgpu_ring.GLU_ACTIVATIONS`; ring tiles only): rhs is
  [gate | up] ([G, K, 2F]) and out[m] = act(lhs[m] @ gate) * (lhs[m] @ up) [M, F]."""
  if row_index_M is not None:
    raise NotImplementedError("pallas_mgpu has no fused row gather; ops routes it elsewhere")
  t = tiling or DEFAULT_TILING
  m, k = lhs_XK.shape
  n = rhs_GKN.shape[1] if transpose_rhs else rhs_GKN.shape[2]
  why = supports(lhs_XK.dtype, gather=False, k=k, n=n, t=t, op="gmm", glu=glu)
  if why:
    raise ValueError(f"pallas_mgpu gmm cannot run this call: {why}")
  out_dtype = out_dtype or lhs_XK.dtype
  m_pad = max(t.tm, -(-m // ROW_ALIGN) * ROW_ALIGN)
  lhs = lhs_XK if m_pad == m else jnp.pad(lhs_XK, ((0, m_pad - m), (0, 0)))
  if interpret:
    tiles = group_aligned_tiles(group_sizes_G, m_pad, t.tm)
  else:  # the same list in one kernel launch instead of several small XLA kernels
    tiles = TileList(*tile_list.group_aligned_tiles(group_sizes_G, m_pad, t.tm))
  call = _gmm_call
  if t.ring:
    from openmoe_jax.kernels.gmm import pallas_mgpu_ring  # noqa: PLC0415 - imports us
    call = pallas_mgpu_ring.gmm_call
  elif t.pingpong:
    from openmoe_jax.kernels.gmm import pallas_mgpu_pingpong  # noqa: PLC0415 - imports us
    call = pallas_mgpu_pingpong.gmm_call
  if glu:
    out = call(tiles, lhs, rhs_GKN, n=n // 2, transpose_rhs=False, out_dtype=out_dtype, t=t,
               interpret=interpret, glu=glu)
  else:
    out = call(tiles, lhs, rhs_GKN, n=n, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
               t=t, interpret=interpret)
  return out[:m]


class GroupRowTiles(NamedTuple):
  start: jax.Array      # int32[G]: first row of each group
  end: jax.Array        # int32[G]: one past its last row
  first_tile: jax.Array  # int32[G]: first tm-aligned row tile the group touches
  num_tiles: jax.Array  # int32[G]: tiles it touches (at least 1, so empty groups write zeros)


def group_row_tiles(group_sizes_G: jax.Array, m: int, tm: int) -> GroupRowTiles:
  sizes = group_sizes_G.astype(jnp.int32)
  end = jnp.minimum(jnp.cumsum(sizes), m)
  start = jnp.concatenate([jnp.zeros((1,), jnp.int32), end[:-1]])
  first = jnp.minimum(start // tm, max(-(-m // tm) - 1, 0))
  count = jnp.maximum((end + tm - 1) // tm - start // tm, 1)
  count = jnp.where(end > start, count, 1)
  return GroupRowTiles(start, end, first.astype(jnp.int32), count.astype(jnp.int32))


def _tgmm_call(rows: GroupRowTiles, lhs_MK, rhs_MN, *, out_dtype, t: Tiling, interpret: bool):
  m, k = lhs_MK.shape
  n = rhs_MN.shape[1]
  g = rows.start.shape[0]
  tm, tn, tk = t.tm, t.tn, t.tk
  wgs = t.num_warps // 4
  tn_wg = tn // wgs
  grid_k, grid_nc = k // tk, n // tn // t.cluster
  lhs_tr = swizzled(tk, lhs_MK.dtype)
  rhs_tr = swizzled(tn, rhs_MN.dtype)

  def pipeline(body, context, num_steps):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(num_steps,), memory_registers=_MEMORY_REGISTERS,
        in_specs=[plgpu.BlockSpec((tm, tk), lambda r: (r, 0), transforms=lhs_tr,
                                  collective_axes=("cluster",) if t.cluster > 1 else ()),
                  plgpu.BlockSpec((tm, tn), lambda r: (r, 0), transforms=rhs_tr)],
        wg_axis="wg", num_compute_wgs=wgs, max_concurrent_steps=t.num_stages,
        compute_context=context)

  def kernel(start_gmem, end_gmem, first_gmem, count_gmem, lhs_gmem, rhs_gmem, out_gmem):
    wg = lax.axis_index("wg")
    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore, t.num_stages).get_allocations(lhs_gmem, rhs_gmem),
        out_smem=plgpu.SMEM((wgs, tk, tn_wg), out_dtype),
        collective_axes="wg")
    def _scope(allocs, out_smem):
      @plgpu.nd_loop((g, grid_k * grid_nc), collective_axes="sm")
      def _loop(info):
        gi = info.index[0]
        ki, nc = plgpu.planar_snake(info.index[1], (grid_k, grid_nc), 1,
                                    min(t.group_m, grid_k))
        ni = nc * t.cluster + (lax.axis_index("cluster") if t.cluster > 1 else 0)
        start, end = start_gmem[gi], end_gmem[gi]
        first, count = first_gmem[gi], count_gmem[gi]
        col0 = ni * tn + wg * tn_wg

        def epilogue(acc):
          out_smem[wg] = acc.astype(out_dtype)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(
              out_smem.at[wg], out_gmem.at[gi, pl.ds(ki * tk, tk), pl.ds(col0, tn_wg)])

        def mma(idx, a_smem, b_smem, acc_ref):
          (r,) = idx
          b_wg = b_smem.at[:, pl.ds(wg * tn_wg, tn_wg)]
          row0 = (first + r) * tm

          @pl.when((r == 0) | (r == count - 1))
          def _mask_edges():
            rows = plgpu.broadcasted_iota(jnp.int32, (tm, tn_wg), 0,
                                          layout=plgpu.Layout.WGMMA) + row0
            keep = (rows >= start) & (rows < end)
            b_wg[...] = jnp.where(keep, b_wg[...], jnp.zeros_like(b_wg[...]))
            plgpu.commit_smem()

          plgpu.wgmma(acc_ref, a_smem.transpose((1, 0)), b_wg)
          plgpu.wgmma_wait(0)
          return acc_ref

        pipeline(mma, _accumulating((tk, tn_wg), epilogue), count)(
            lhs_gmem.at[pl.ds(first * tm, m), pl.ds(ki * tk, tk)],
            rhs_gmem.at[pl.ds(first * tm, m), pl.ds(ni * tn, tn)], allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  call = _launch(kernel, jax.ShapeDtypeStruct((g, k, n), out_dtype), t, interpret)
  return call(rows.start, rows.end, rows.first_tile, rows.num_tiles, lhs_MK, rhs_MN)


def tgmm(lhs_XK, rhs_MN, group_sizes_G, *, row_index_M=None, out_dtype=None,
         tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
  """out[g] = lhs[rows of g].T @ rhs[rows of g] -> [G, K, N]; empty groups give zeros."""
  if row_index_M is not None:
    raise NotImplementedError("pallas_mgpu has no fused row gather; ops routes it elsewhere")
  t = tiling or DEFAULT_TGMM_TILING
  m, n = rhs_MN.shape
  k = lhs_XK.shape[1]
  why = supports(lhs_XK.dtype, gather=False, k=k, n=n, t=t, op="tgmm")
  if why:
    raise ValueError(f"pallas_mgpu tgmm cannot run this call: {why}")
  out_dtype = out_dtype or lhs_XK.dtype
  pad = (-m) % t.tm
  if pad:  # row tiles are tm-aligned and must stay inside the arrays
    lhs_XK = jnp.pad(lhs_XK, ((0, pad), (0, 0)))
    rhs_MN = jnp.pad(rhs_MN, ((0, pad), (0, 0)))
  if interpret:
    rows = group_row_tiles(group_sizes_G, m, t.tm)
  else:  # one kernel launch instead of several small XLA kernels
    rows = GroupRowTiles(*tile_list.group_row_tiles(group_sizes_G, m, t.tm))
  call = _tgmm_call
  if t.ring:
    from openmoe_jax.kernels.gmm import pallas_mgpu_ring_tgmm  # noqa: PLC0415 - imports us
    call = pallas_mgpu_ring_tgmm.tgmm_call
  return call(rows, lhs_XK, rhs_MN.astype(lhs_XK.dtype), out_dtype=out_dtype, t=t,
                    interpret=interpret)

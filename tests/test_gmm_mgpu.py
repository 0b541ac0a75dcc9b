"""The Hopper Mosaic-GPU grouped matmul (kernels/gmm/pallas_mgpu) on CPU.

The kernels run in Pallas' GPU interpreter (shared memory, TMA, barriers and warpgroups
simulated; an out-of-bounds copy or a barrier misuse raises). Every output element is
compared with a float64 numpy reference, so an element the kernel never wrote fails too.
They are also lowered to Mosaic GPU for a CUDA target, which catches layout and
shared-memory errors that the interpreter does not model.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openmoe_jax.kernels import gmm as gmm_lib
from openmoe_jax.kernels.gmm import pallas_mgpu as mg
from openmoe_jax.kernels.gmm.tiling import Tiling

# tm 64 rows, 2 compute warpgroups of 64 columns; K = 192 is 3 steps of 64, so with 3
# stages a CTA's tiles form one chained pipeline.
GMM_T = Tiling(tm=64, tn=128, tk=64, num_warps=8, num_stages=3, group_m=2)
TGMM_T = Tiling(tm=64, tn=128, tk=64, num_warps=8, num_stages=2, group_m=2)
M, K, N = 520, 192, 128
SIZES = {
    "ragged": [37, 0, 200, 64, 150],   # empty group, group edges off the 8-row grid, tail rows
    "aligned": [128, 64, 0, 192, 136],  # full tiles (one swizzled TMA store each)
}


def _np_gmm(lhs, rhs, gs):
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out, start = np.zeros((lhs.shape[0], rhs.shape[2])), 0
  for g, size in enumerate(gs):
    out[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return out


def _np_tgmm(lhs, dy, gs):
  lhs, dy = np.asarray(lhs, np.float64), np.asarray(dy, np.float64)
  out, start = np.zeros((len(gs), lhs.shape[1], dy.shape[1])), 0
  for g, size in enumerate(gs):
    out[g] = lhs[start:start + size].T @ dy[start:start + size]
    start += size
  return out


def _inputs(seed):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(k1, (M, K), jnp.float32).astype(jnp.bfloat16)
  rhs = (jax.random.normal(k2, (5, K, N), jnp.float32) / np.sqrt(K)).astype(jnp.bfloat16)
  dy = jax.random.normal(k3, (M, N), jnp.float32).astype(jnp.bfloat16)
  return lhs, rhs, dy


def _rel(x, ref):
  x = np.asarray(x, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


@pytest.fixture(autouse=True)
def _fresh_interpreter():
  yield
  # After a failed interpreted kernel the interpreter's state must be reset.
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # noqa: PLC0415
  interpret_pallas_call.reset_gpu_interpret_mode_state()


# Ping-pong: each compute warpgroup owns whole tiles; 4 stages over 3 K steps per tile, so
# ring slots carry over from one tile to the next. Cluster: CTA pairs on adjacent column
# tiles share the lhs tile (multicast).
SCHEDULES = {
    "cooperative": GMM_T,
    "pingpong": Tiling(tm=64, tn=128, tk=64, num_warps=8, num_stages=4, group_m=2, pingpong=1),
    "cluster": Tiling(tm=64, tn=64, tk=64, num_warps=4, num_stages=3, group_m=2, cluster=2),
    # 2 stages do not divide the 3 K steps: unchained tiles, slots released one step late
    "delayed": Tiling(tm=64, tn=128, tk=64, num_warps=8, num_stages=2, group_m=2,
                      delay_release=1),
    # 6 stages of 128 x 128 tiles leave room to stage only half a tile: two stores per tile
    "pingpong_halves": Tiling(tm=128, tn=128, tk=64, num_warps=8, num_stages=6, group_m=2,
                              pingpong=1),
    # Hand-written ring: the two warpgroups take 64 rows each; 4 stages over 3 K steps per
    # tile, so slots carry over from one tile to the next.
    "ring": Tiling(tm=128, tn=128, tk=64, num_warps=8, num_stages=4, group_m=2, ring=1),
    # ring=2: each block's epilogue runs under the next block's first wgmma
    "ring_overlap": Tiling(tm=128, tn=128, tk=64, num_warps=8, num_stages=4, group_m=2, ring=2),
    "ring_one_warpgroup": Tiling(tm=64, tn=128, tk=64, num_warps=4, num_stages=2, group_m=2,
                                 ring=1),
}


# With 64-row tiles the ragged groups already have full and edge tiles: the cluster and
# delayed schedules skip the aligned case (CI time).
CASES = [(s, c) for s in sorted(SCHEDULES) for c in sorted(SIZES)
         if (s, c) not in (("cluster", "aligned"), ("delayed", "aligned"),
                           ("ring_one_warpgroup", "aligned"))]


@pytest.mark.parametrize("schedule,case", CASES)
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gmm_matches_float64(case, transpose_rhs, schedule):
  gs = SIZES[case]
  lhs, rhs, _ = _inputs(1)
  w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
  t = SCHEDULES[schedule]
  if t.pingpong:
    from openmoe_jax.kernels.gmm import pallas_mgpu_pingpong as pp  # noqa: PLC0415
    assert (pp.epilogue_cols(t) < t.tn) == (schedule == "pingpong_halves")
  out = mg.gmm(lhs, w, jnp.array(gs, jnp.int32), transpose_rhs=transpose_rhs,
               tiling=t, interpret=True)
  ref = _np_gmm(lhs, rhs, gs)
  assert out.shape == (M, N) and out.dtype == jnp.bfloat16
  assert _rel(out, ref) <= 1e-2
  np.testing.assert_array_equal(np.asarray(out[sum(gs):], np.float32), 0.0)  # tail rows


@pytest.mark.parametrize("ring_kind", [1, 2])
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_ring_stages_the_output_in_column_chunks(transpose_rhs, ring_kind):
  """A 128 x 256 tile with 4 stages leaves room for two 64-column staging buffers only: the
  epilogue stores each warpgroup's rows in four chunks, alternating the buffers (ring=2:
  under the next item's K steps 0, 0, 1 and 2 of 3, so two chunks share a step)."""
  from openmoe_jax.kernels.gmm import pallas_mgpu_ring as ring  # noqa: PLC0415
  t = Tiling(tm=128, tn=256, tk=64, num_warps=8, num_stages=4, group_m=2, ring=ring_kind)
  assert ring.staging(t) == (64, 2)
  assert ring.staging(dataclasses.replace(t, num_stages=3)) == (256, 1)
  gs = SIZES["ragged"]
  lhs, _, _ = _inputs(3)
  rhs = (jax.random.normal(jax.random.key(4), (5, K, 256), jnp.float32) / np.sqrt(K)
         ).astype(jnp.bfloat16)
  w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
  out = mg.gmm(lhs, w, jnp.array(gs, jnp.int32), transpose_rhs=transpose_rhs, tiling=t,
               interpret=True)
  assert _rel(out, _np_gmm(lhs, rhs, gs)) <= 1e-2
  np.testing.assert_array_equal(np.asarray(out[sum(gs):], np.float32), 0.0)


# tgmm schedules: [tk, tn] is the output block, tm the reduction rows per step. The ring
# splits tk between warpgroups (64 rows each), so its two-warpgroup case reads K = 128.
TGMM_SCHEDULES = {
    "cooperative": TGMM_T,
    "cluster": Tiling(tm=64, tn=64, tk=64, num_warps=4, num_stages=2, group_m=2, cluster=2),
    # 3 slots over items of 1-4 steps: the ring's slot index carries from item to item
    "ring": Tiling(tm=64, tn=128, tk=128, num_warps=8, num_stages=3, group_m=2, ring=1),
    "ring_one_warpgroup": Tiling(tm=64, tn=128, tk=64, num_warps=4, num_stages=2, group_m=2,
                                 ring=1),
}


@pytest.mark.parametrize("schedule", sorted(TGMM_SCHEDULES))
def test_tgmm_matches_float64(schedule):
  gs = SIZES["ragged"]
  lhs, _, dy = _inputs(2)
  t = TGMM_SCHEDULES[schedule]
  lhs = lhs[:, :K // t.tk * t.tk]
  out = mg.tgmm(lhs, dy, jnp.array(gs, jnp.int32), tiling=t, interpret=True,
                out_dtype=jnp.float32)
  ref = _np_tgmm(lhs, dy, gs)
  assert _rel(out, ref) <= 1e-2
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)  # the empty group


@pytest.mark.parametrize("out_dtype,chunks", [(jnp.bfloat16, (64, 2)), (jnp.float32, (64, 1))])
def test_ring_tgmm_stages_the_block_in_column_chunks(out_dtype, chunks):
  """A 128 x 256 output block next to 4 stages of 64 x (128 + 256): bf16 is staged in two
  alternating 64-column buffers, float32 in one 64-column buffer (four stores per block)."""
  from openmoe_jax.kernels.gmm import pallas_mgpu_ring_tgmm as ring_tgmm  # noqa: PLC0415
  t = Tiling(tm=64, tn=256, tk=128, num_warps=8, num_stages=4, group_m=2, ring=1)
  assert ring_tgmm._staging(t, 2, jnp.dtype(out_dtype).itemsize) == chunks
  gs = SIZES["ragged"]
  lhs, _, _ = _inputs(6)
  dy = jax.random.normal(jax.random.key(7), (M, 256), jnp.float32).astype(jnp.bfloat16)
  out = mg.tgmm(lhs[:, :128], dy, jnp.array(gs, jnp.int32), tiling=t, interpret=True,
                out_dtype=out_dtype)
  assert out.dtype == out_dtype
  assert _rel(out, _np_tgmm(lhs[:, :128], dy, gs)) <= 1e-2
  np.testing.assert_array_equal(np.asarray(out[1], np.float32), 0.0)


@pytest.mark.parametrize("m", [44, 100])
def test_row_counts_off_the_tile_grid(m):
  """M below one tile (44) or not a multiple of 8 (100): the wrappers pad rows (gmm to the
  8-row grid and at least one tile, tgmm to whole tiles) and slice the padding off."""
  lhs, rhs, dy = (a[:m] if a.ndim == 2 else a for a in _inputs(5))
  gs = [m // 3, 0, m // 3, 5, 0]
  out = mg.gmm(lhs, rhs, jnp.array(gs, jnp.int32), tiling=GMM_T, interpret=True)
  assert out.shape == (m, N) and _rel(out, _np_gmm(lhs, rhs, gs)) <= 1e-2
  np.testing.assert_array_equal(np.asarray(out[sum(gs):], np.float32), 0.0)
  dw = mg.tgmm(lhs, dy, jnp.array(gs, jnp.int32), tiling=TGMM_T, interpret=True,
               out_dtype=jnp.float32)
  assert _rel(dw, _np_tgmm(lhs, dy, gs)) <= 1e-2


def test_group_aligned_tiles_cover_each_row_once():
  gs = jnp.array([37, 0, 200, 64, 150, 9], jnp.int32)
  m, tm = 540, 64
  tiles = mg.group_aligned_tiles(gs, m, tm)
  n = int(tiles.count[0])
  grp, start, end = (np.asarray(a)[:n] for a in (tiles.group, tiles.start, tiles.end))
  cover = np.zeros(m, int)
  owner = np.full(m, -1)
  for g_, s, e in zip(grp, start, end):
    assert s < e and e - s <= tm and e - (s // 8 * 8) <= tm  # fits one aligned tile load
    cover[s:e] += 1
    owner[s:e] = g_
  np.testing.assert_array_equal(cover, 1)
  bounds = np.concatenate([[0], np.cumsum(np.asarray(gs))])
  expect = np.searchsorted(bounds, np.arange(m), side="right") - 1
  expect = np.where(np.arange(m) >= bounds[-1], len(gs), expect)  # tail group G
  np.testing.assert_array_equal(owner, expect)


def test_ops_routes_and_differentiates():
  """backend="pallas_mgpu" through the custom VJP: bf16 plain calls use the Mosaic kernels,
  a fused gather goes to the Triton-lowered kernel; gradients match float64."""
  gs = SIZES["ragged"]
  lhs, rhs, dy = _inputs(3)
  gs_j = jnp.array(gs, jnp.int32)
  f = lambda a, b: gmm_lib.gmm(a, b, gs_j, backend="pallas_mgpu", interpret=True)
  y, vjp = jax.vjp(f, lhs, rhs)
  dlhs, drhs = vjp(dy)
  w64 = np.asarray(rhs, np.float64)
  assert _rel(y, _np_gmm(lhs, rhs, gs)) <= 1e-2
  assert _rel(dlhs, _np_gmm(dy, np.swapaxes(w64, 1, 2), gs)) <= 1e-2
  assert _rel(drhs, _np_tgmm(lhs, dy, gs)) <= 1e-2
  ri = jax.random.permutation(jax.random.key(4), M)
  out = gmm_lib.gmm(lhs, rhs, gs_j, backend="pallas_mgpu", interpret=True, row_index=ri)
  assert _rel(out, _np_gmm(np.asarray(lhs, np.float64)[np.asarray(ri)], rhs, gs)) <= 1e-2


def test_supports_explains_refusals():
  ok = dict(gather=False, k=1024, n=256, op="gmm")
  assert mg.supports(jnp.bfloat16, t=GMM_T, **ok) is None
  assert "gather" in mg.supports(jnp.bfloat16, t=GMM_T, **{**ok, "gather": True})
  assert "float32" in mg.supports(jnp.float32, t=GMM_T, **ok)
  assert "N=200" in mg.supports(jnp.bfloat16, t=GMM_T, **{**ok, "n": 200})
  assert "tn * cluster" in mg.supports(jnp.bfloat16, t=SCHEDULES["cluster"], **{**ok, "n": 192})
  big_ring = Tiling(128, 128, 128, 8, 4, pingpong=1)  # 4 x 64 KiB of stages
  assert "ring" in mg.supports(jnp.bfloat16, t=big_ring, **ok)
  assert "registers" in mg.supports(jnp.bfloat16, t=Tiling(128, 256, 64, 8, 2, pingpong=1), **ok)
  assert "registers" in mg.supports(jnp.bfloat16, t=Tiling(256, 256, 64, 8, 2, ring=1), **ok)
  assert "no room" in mg.supports(jnp.bfloat16, t=Tiling(128, 256, 128, 8, 3, ring=1), **ok)
  assert "no cluster" in mg.supports(jnp.bfloat16, t=Tiling(128, 128, 64, 8, 3, ring=1,
                                                            cluster=2), **ok)
  tg = {**ok, "op": "tgmm"}
  assert mg.supports(jnp.bfloat16, t=Tiling(64, 256, 128, 8, 4, ring=1), **tg) is None
  assert "registers" in mg.supports(jnp.bfloat16, t=Tiling(64, 256, 64, 8, 3, ring=1), **tg)
  assert "no room" in mg.supports(jnp.bfloat16, t=Tiling(128, 256, 128, 8, 3, ring=1), **tg)
  assert "gmm only" in mg.supports(jnp.bfloat16, t=Tiling(64, 256, 128, 8, 4, ring=2), **tg)
  assert mg.supports(jnp.bfloat16, t=Tiling(128, 256, 64, 8, 4, ring=2), **ok) is None
  assert "ring: 1" in mg.supports(jnp.bfloat16, t=Tiling(128, 256, 64, 8, 4, ring=3), **ok)
  with pytest.raises(ValueError, match="cannot run"):
    mg.gmm(jnp.zeros((64, 100), jnp.bfloat16), jnp.zeros((2, 100, 128), jnp.bfloat16),
           jnp.array([32, 32]), tiling=GMM_T, interpret=True)


@pytest.mark.parametrize("op,tiling", [
    ("gmm", Tiling(128, 256, 64, 8, 3)), ("gmm", Tiling(128, 256, 64, 8, 3, cluster=2)),
    ("gmm", Tiling(128, 128, 64, 8, 6, pingpong=1)), ("gmm_t", Tiling(128, 256, 64, 8, 3)),
    ("gmm", Tiling(128, 256, 64, 8, 3, cluster=2, delay_release=1)),  # 32 K steps: unchained
    ("gmm_t", Tiling(128, 128, 64, 8, 4, pingpong=1)), ("tgmm", Tiling(64, 256, 128, 8, 3)),
    ("gmm", Tiling(128, 256, 64, 8, 4, ring=1)), ("gmm_t", Tiling(128, 128, 128, 8, 3, ring=1)),
    ("gmm", Tiling(64, 128, 128, 4, 4, ring=1)), ("tgmm", Tiling(64, 256, 128, 8, 4, ring=1)),
    ("tgmm", Tiling(64, 128, 128, 8, 4, ring=1)), ("gmm", Tiling(128, 256, 64, 8, 4, ring=2)),
    ("gmm_t", Tiling(128, 128, 128, 8, 3, ring=2))])
def test_lowers_to_mosaic_gpu_at_bench_shapes(op, tiling, monkeypatch):
  """The kinds of H100 tiles shipped in tuned.json lower for a CUDA target (layouts, 227 KiB
  of shared memory, clusters) without a GPU; so do the work-list kernels (Triton), told
  they target an H100."""
  from jax._src.pallas.triton import gpu_info, pallas_call_registration  # noqa: PLC0415
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info",
                      lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
  s = jax.ShapeDtypeStruct
  m, k, n, g = 32768, 2048, 8192, 32
  if op == "tgmm":
    fn = functools.partial(mg.tgmm, tiling=tiling)
    args = (s((m, k), jnp.bfloat16), s((m, n), jnp.bfloat16))
  else:
    fn = functools.partial(mg.gmm, transpose_rhs=op == "gmm_t", tiling=tiling)
    args = (s((m, k), jnp.bfloat16),
            s((g, n, k) if op == "gmm_t" else (g, k, n), jnp.bfloat16))
  lowered = jax.jit(fn).trace(*args, s((g,), jnp.int32)).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "@mosaic_gpu" in text
  assert ("openmoe_gmm_tile_list" in text) == (op != "tgmm")
  assert ("openmoe_tgmm_row_tiles" in text) == (op == "tgmm")


def test_auto_prefers_mgpu_on_hopper_where_a_tile_was_measured(monkeypatch, tmp_path):
  """backend="auto" on a Hopper GPU: a plain call whose op and widths have a measured
  pallas_mgpu tile goes to pallas_mgpu with that tile; a call without one, a gathered call
  and an explicit backend keep pallas_gpu."""
  from openmoe_jax.kernels.gmm import ops, tuning  # noqa: PLC0415
  monkeypatch.setenv("OPENMOE_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(tuning, "_MEMO", {})
  monkeypatch.setattr(ops, "_hopper", lambda: True)
  monkeypatch.setattr(ops, "resolve_backend", lambda b="auto": "pallas_gpu")
  pp = Tiling(128, 128, 64, 8, 4, pingpong=1)
  tuning.store(tuning.key("pallas_mgpu", "gmm", m=4096, k=128, n=1024, g=40,
                          dtype=jnp.bfloat16, gather=False), pp)
  monkeypatch.setattr(tuning, "_MEMO", None)
  call = dict(m=8192, k=128, n=1024, g=64, dtype=jnp.bfloat16)  # nearest of the tuned entry
  st = ops._static("auto", jnp.bfloat16, None, False)
  assert st.prefer_mgpu
  routed, t = ops._routed(st, "gmm", gather=False, **call)
  assert (routed.backend, t) == ("pallas_mgpu", pp)
  assert ops._routed(st, "gmm", gather=True, **call)[0].backend == "pallas_gpu"
  assert ops._routed(st, "gmm_t", gather=False, **call)[0].backend == "pallas_gpu"  # untuned op
  assert ops._routed(st, "gmm", gather=False, **{**call, "k": 256})[0].backend == "pallas_gpu"
  explicit = ops._static("pallas_gpu", jnp.bfloat16, None, False)
  assert not explicit.prefer_mgpu
  assert ops._routed(explicit, "gmm", gather=False, **call)[0].backend == "pallas_gpu"


def test_auto_on_another_hopper_card_runs_mgpu_with_the_reference_cards_tile(monkeypatch,
                                                                             tmp_path):
  """An H200 with no tiles of its own: backend="auto" still sends a plain call with a tile
  measured on the H100 to pallas_mgpu (without the fallback it stayed on pallas_gpu)."""
  from openmoe_jax.kernels.gmm import ops, tuning  # noqa: PLC0415
  monkeypatch.setenv("OPENMOE_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(tuning, "_MEMO", {})
  monkeypatch.setattr(ops, "_hopper", lambda: True)
  monkeypatch.setattr(ops, "resolve_backend", lambda b="auto": "pallas_gpu")
  monkeypatch.setattr(tuning, "_device_kind", lambda: "NVIDIA_H200")
  monkeypatch.setattr(tuning, "_compute_capability", lambda: "9.0")
  ring = Tiling(128, 128, 64, 8, 4, ring=2)
  tuning.store(tuning.key("pallas_mgpu", "gmm", m=4096, k=128, n=1024, g=40, dtype=jnp.bfloat16,
                          gather=False, device="NVIDIA_H100_80GB_HBM3"), ring)
  st = ops._static("auto", jnp.bfloat16, None, False)
  routed, t = ops._routed(st, "gmm", m=8192, k=128, n=1024, g=64, dtype=jnp.bfloat16,
                          gather=False)
  assert (routed.backend, t) == ("pallas_mgpu", ring)


def _np_glu(lhs, w_gate_up, gs, act):
  f = w_gate_up.shape[2] // 2
  h = _np_gmm(lhs, w_gate_up, gs)
  g, u = h[:, :f], h[:, f:]
  a = g / (1 + np.exp(-g)) if act == "silu" else np.maximum(g, 0) if act == "relu" else g
  return a * u


@pytest.mark.parametrize("ring_kind,act", [(1, "silu"), (2, "silu"), (2, "relu")])
@pytest.mark.parametrize("case", sorted(SIZES))
def test_glu_epilogue_matches_float64(case, ring_kind, act):
  """`glu`: the ring kernel loads the gate and up halves of each column tile, keeps two
  accumulators per warpgroup and writes act(gate) * up [M, F] only; every element (the tail
  rows' zeros too) is compared with float64."""
  gs = SIZES[case]
  lhs, _, _ = _inputs(4)
  w = (jax.random.normal(jax.random.key(5), (5, K, 2 * N), jnp.float32)
       / np.sqrt(K)).astype(jnp.bfloat16)
  t = Tiling(tm=128, tn=128, tk=64, num_warps=8, num_stages=4, group_m=2, ring=ring_kind)
  out = mg.gmm(lhs, w, jnp.array(gs, jnp.int32), tiling=t, interpret=True, glu=act)
  assert out.shape == (M, N) and out.dtype == jnp.bfloat16
  assert _rel(out, _np_glu(lhs, w, gs, act)) <= 1e-2
  np.testing.assert_array_equal(np.asarray(out[sum(gs):], np.float32), 0.0)


def test_glu_rejects_what_it_cannot_fuse():
  ok = dict(gather=False, k=K, n=2 * N, op="gmm")
  ring = Tiling(tm=128, tn=128, tk=64, num_warps=8, num_stages=4, ring=2)
  assert mg.supports(jnp.bfloat16, t=ring, glu="silu", **ok) is None
  assert "glu activation" in mg.supports(jnp.bfloat16, t=ring, glu="gelu", **ok)
  assert "ring tile" in mg.supports(jnp.bfloat16, t=GMM_T, glu="silu", **ok)
  assert "ring tile" in mg.supports(jnp.bfloat16, t=ring, glu="silu", **{**ok, "n": 2 * N + 64})


@pytest.mark.parametrize("tiling", [Tiling(128, 256, 64, 8, 4, ring=2),
                                    Tiling(64, 128, 128, 4, 4, ring=1)])
def test_glu_lowers_to_mosaic_gpu(tiling, monkeypatch):
  """The fused GLU epilogue lowers for a CUDA target at a bench shape (two accumulators per
  warpgroup, a [2, tk, tn / 2] weight slot, the activation on the accumulators)."""
  from jax._src.pallas.triton import gpu_info, pallas_call_registration  # noqa: PLC0415
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info",
                      lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
  s = jax.ShapeDtypeStruct
  m, k, f, g = 32768, 768, 3072, 32
  fn = functools.partial(mg.gmm, tiling=tiling, glu="silu")
  lowered = jax.jit(fn).trace(s((m, k), jnp.bfloat16), s((g, k, 2 * f), jnp.bfloat16),
                              s((g,), jnp.int32)).lower(lowering_platforms=("cuda",))
  assert "@mosaic_gpu" in lowered.as_text()

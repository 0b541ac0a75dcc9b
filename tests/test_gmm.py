"""Grouped matmul (kernels/gmm): reference, interpret-mode Pallas kernels, gradients, switch.

Interpret mode fills every output with NaN before the kernel runs (Pallas' uninitialized
value), so `isfinite(out)` is the poison test: every output element was written.
"""
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from openmoe_jax.kernels import gmm as gmm_lib
from openmoe_jax.kernels.gmm import metadata, reference, tuning
from openmoe_jax.kernels.gmm.tiling import Tiling

TOL = {jnp.bfloat16: 1e-2, jnp.float32: 1e-5}
# Small tiles so tiny shapes still cover boundary tiles, partial tiles and several k steps.
TILING = {"pallas_gpu": Tiling(tm=16, tn=16, tk=16, group_m=2),
          "pallas_tpu": Tiling(tm=8, tn=128, tk=128),
          "reference": None}
KERNELS = ["reference", "pallas_gpu", "pallas_tpu"]
# (M, K, N, group_sizes): empty groups, M not a multiple of the tile, rows past the end.
CASES = [(40, 32, 48, [7, 0, 20, 13]),
         (37, 24, 20, [5, 0, 0, 25]),      # partial tiles in every dim, 7 tail rows
         (24, 16, 16, [0, 0, 0, 0]),       # everything is tail: all zeros
         (33, 40, 24, [33, 0, 0, 0])]


def _rel(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _inputs(seed, m, k, n, g, dtype, rows=None):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  lhs = jax.random.normal(k1, (rows or m, k), jnp.float32).astype(dtype)
  rhs = (jax.random.normal(k2, (g, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
  dy = jax.random.normal(k3, (m, n), jnp.float32).astype(dtype)
  ri = jax.random.randint(k4, (m,), 0, rows or m)
  return lhs, rhs, dy, ri


def _f64(*xs):
  return [np.asarray(x, np.float64) for x in xs]


def _np_gmm(lhs, rhs, gs, ri=None, transpose=False):
  """Independent float64 numpy reference."""
  lhs, rhs = _f64(lhs, rhs)
  if ri is not None:
    lhs = lhs[np.asarray(ri)]
  if transpose:
    rhs = rhs.transpose(0, 2, 1)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for g, size in enumerate(np.asarray(gs)):
    out[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return out


def _np_tgmm(lhs, dy, gs, ri=None):
  lhs, dy = _f64(lhs, dy)
  if ri is not None:
    lhs = lhs[np.asarray(ri)]
  outs, start = [], 0
  for size in np.asarray(gs):
    outs.append(lhs[start:start + size].T @ dy[start:start + size])
    start += size
  return np.stack(outs)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_and_grads(backend, dtype, case):
  m, k, n, sizes = CASES[case]
  gs = jnp.array(sizes, jnp.int32)
  lhs, rhs, dy, _ = _inputs(case, m, k, n, len(sizes), dtype)
  kw = dict(backend=backend, tiling=TILING[backend], interpret=True)

  @jax.jit  # one compile instead of dozens of eager ops
  def fwd_bwd(a, b, d):
    out, vjp = jax.vjp(lambda x, w: gmm_lib.gmm(x, w, gs, **kw), a, b)
    return (out, *vjp(d))

  out, dlhs, drhs = fwd_bwd(lhs, rhs, dy)
  assert out.shape == (m, n) and out.dtype == dtype
  for got in (out, dlhs, drhs):
    assert bool(jnp.all(jnp.isfinite(got.astype(jnp.float32)))), "unwritten (NaN) elements"
  total = int(sum(sizes))
  assert bool(jnp.all(out[total:] == 0)) and bool(jnp.all(dlhs[total:] == 0))
  if total:
    assert _rel(out, _np_gmm(lhs, rhs, gs)) <= TOL[dtype]
    assert _rel(dlhs, _np_gmm(dy, rhs, gs, transpose=True)) <= TOL[dtype]
    assert _rel(drhs, _np_tgmm(lhs, dy, gs)) <= TOL[dtype]
  empty = np.asarray(sizes) == 0
  assert bool(jnp.all(drhs[empty] == 0)), "empty groups must get zero weight gradients"


@pytest.mark.parametrize("backend", KERNELS)
def test_fused_gather(backend):
  """row_index gathers lhs rows inside the kernel; dlhs scatter-adds (repeated rows too)."""
  m, k, n, sizes = 37, 24, 20, [9, 0, 21, 3]
  gs = jnp.array(sizes, jnp.int32)
  lhs, rhs, dy, ri = _inputs(7, m, k, n, 4, jnp.float32, rows=19)  # rows repeat
  kw = dict(backend=backend, tiling=TILING[backend], interpret=True, row_index=ri)

  @jax.jit
  def fwd_bwd(a, b, d):
    out, vjp = jax.vjp(lambda x, w: gmm_lib.gmm(x, w, gs, **kw), a, b)
    return (out, *vjp(d))

  out, dlhs, drhs = fwd_bwd(lhs, rhs, dy)
  assert _rel(out, _np_gmm(lhs, rhs, gs, ri)) <= 1e-5
  valid = np.arange(m) < sum(sizes)
  ref_dlhs = np.zeros(lhs.shape)
  np.add.at(ref_dlhs, np.asarray(ri)[valid], _np_gmm(dy, rhs, gs, transpose=True)[valid])
  assert _rel(dlhs, ref_dlhs) <= 1e-5
  assert _rel(drhs, _np_tgmm(lhs, dy, gs, ri)) <= 1e-5


@pytest.mark.parametrize("backend", KERNELS)
def test_tgmm_public(backend):
  m, k, n, sizes = 40, 32, 48, [7, 0, 20, 10]   # 3 rows past the end must not count
  gs = jnp.array(sizes, jnp.int32)
  lhs, _, dy, _ = _inputs(3, m, k, n, 4, jnp.float32)
  out = jax.jit(lambda a, d: gmm_lib.tgmm(a, d, gs, backend=backend, tiling=TILING[backend],
                                          interpret=True))(lhs.T, dy)
  assert out.shape == (4, k, n)
  assert _rel(out, _np_tgmm(lhs, dy, gs)) <= 1e-5


def test_check_grads_reference_f64():
  with jax.enable_x64(True):
    gs = jnp.array([3, 0, 4], jnp.int32)
    lhs, rhs, _, _ = _inputs(1, 9, 5, 4, 3, jnp.float64)
    f = jax.jit(lambda a, b: gmm_lib.gmm(a, b, gs, backend="reference"))
    check_grads(f, (lhs, rhs), order=1, modes=["rev"])
    src, _, _, ri = _inputs(2, 9, 5, 4, 3, jnp.float64, rows=6)  # 6 source rows, 9 gathered
    g = jax.jit(lambda a, b: gmm_lib.gmm(a, b, gs, backend="reference", row_index=ri))
    check_grads(g, (src, rhs), order=1, modes=["rev"])


def test_check_grads_pallas_gpu_interpret():
  gs = jnp.array([2, 0, 5], jnp.int32)
  lhs, rhs, _, _ = _inputs(2, 8, 16, 16, 3, jnp.float32)
  f = jax.jit(lambda a, b: gmm_lib.gmm(a, b, gs, backend="pallas_gpu", interpret=True,
                                       tiling=TILING["pallas_gpu"]))
  check_grads(f, (lhs, rhs), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


def test_reference_float64_exact():
  with jax.enable_x64(True):
    gs = jnp.array([4, 0, 6, 1], jnp.int32)
    lhs, rhs, dy, _ = _inputs(5, 13, 6, 5, 4, jnp.float64)
    assert _rel(reference.gmm(lhs, rhs, gs), _np_gmm(lhs, rhs, gs)) < 1e-12
    assert _rel(reference.gmm_loop(lhs, rhs, gs), _np_gmm(lhs, rhs, gs)) < 1e-12
    assert _rel(reference.tgmm(lhs, dy, gs), _np_tgmm(lhs, dy, gs)) < 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_metadata_covers_every_row_once(seed):
  rng = np.random.default_rng(seed)
  g, tm = int(rng.integers(1, 6)), int(rng.choice([4, 8]))
  sizes = rng.integers(0, 12, g) * rng.integers(0, 2, g)
  m = int(sizes.sum() + rng.integers(1, 9))
  md = metadata.make_group_metadata(jnp.array(sizes, jnp.int32), m, tm)
  hits = np.zeros(m, int)
  for i in range(int(md.num_items[0])):
    grp, tile = int(md.item_group[i]), int(md.item_tile[i])
    rows = np.arange(tile * tm, min(tile * tm + tm, m))
    hits[rows[(rows >= int(md.starts[grp])) & (rows < int(md.ends[grp]))]] += 1
  assert np.all(hits == 1)
  assert int(md.num_items[0]) <= md.item_group.shape[0]
  mi = metadata.interleave_items(md, tm)  # a reordering of the valid items, nothing else
  n = int(md.num_items[0])
  pairs = lambda d: sorted(zip(np.asarray(d.item_group)[:n].tolist(),
                               np.asarray(d.item_tile)[:n].tolist()))
  assert pairs(mi) == pairs(md)


def test_interleaved_items_gather_by_relative_position():
  """Items run in order of their relative position inside their group: the first tiles of
  all groups, then the second ones...; the gathered gmm still matches the reference."""
  sizes = [16, 32, 0, 48, 9]
  md = metadata.interleave_items(metadata.make_group_metadata(jnp.array(sizes), 120, 16), 16)
  n = int(md.num_items[0])
  grp, tile = np.asarray(md.item_group)[:n], np.asarray(md.item_tile)[:n]
  starts, ends = np.asarray(md.starts), np.asarray(md.ends)
  first = starts[grp] // 16
  frac = (tile - first + 0.5) / np.maximum((ends[grp] + 15) // 16 - first, 1)
  assert np.all(np.diff(frac) >= 0)
  assert grp[:3].tolist() == [3, 1, 5]  # 1/6 into group 3, 1/4 into group 1 and the tail
  # Blocks of 2 groups ({0, 1}, {2, 3}, {4, tail}) run one after the other, each interleaved.
  mb = metadata.interleave_items(metadata.make_group_metadata(jnp.array(sizes), 120, 16), 16, 2)
  assert int(mb.num_items[0]) == n
  grp_b, tile_b = np.asarray(mb.item_group)[:n], np.asarray(mb.item_tile)[:n]
  assert sorted(zip(grp_b, tile_b)) == sorted(zip(grp, tile))
  assert np.all(np.diff(grp_b // 2) >= 0)
  first_b = starts[grp_b] // 16
  frac_b = (tile_b - first_b + 0.5) / np.maximum((ends[grp_b] + 15) // 16 - first_b, 1)
  for blk in range(3):
    assert np.all(np.diff(frac_b[grp_b // 2 == blk]) >= 0)
  assert grp_b[:3].tolist() == [1, 0, 1]
  m, k, n_out = 120, 24, 20
  gs = jnp.array(sizes, jnp.int32)
  lhs, rhs, _, ri = _inputs(9, m, k, n_out, len(sizes), jnp.float32, rows=30)
  for il in (1, 2):
    t = dataclasses.replace(TILING["pallas_gpu"], interleave=il)
    out = gmm_lib.gmm(lhs, rhs, gs, backend="pallas_gpu", tiling=t, interpret=True, row_index=ri)
    assert _rel(out, _np_gmm(lhs, rhs, gs, ri)) <= 1e-5


def test_backend_switch(monkeypatch):
  assert gmm_lib.resolve_backend("auto") == "reference"  # CPU
  monkeypatch.setenv("OPENMOE_JAX_GMM_BACKEND", "pallas_tpu")
  assert gmm_lib.resolve_backend("auto") == "pallas_tpu"
  assert gmm_lib.resolve_backend("reference") == "reference"
  with pytest.raises(ValueError, match="cuda_magic"):
    gmm_lib.resolve_backend("cuda_magic")
  assert set(gmm_lib.BACKENDS) >= {"reference", "pallas_gpu", "pallas_tpu", "triton"}


def test_bad_inputs_raise():
  lhs, rhs = jnp.ones((4, 3)), jnp.ones((2, 5, 6))
  with pytest.raises(ValueError, match="contracting"):
    gmm_lib.gmm(lhs, rhs, jnp.array([2, 2]))
  with pytest.raises(ValueError, match="group_sizes"):
    gmm_lib.gmm(lhs, jnp.ones((2, 3, 6)), jnp.array([4]))
  with pytest.raises(ValueError, match="tm"):
    Tiling(tm=0)


def test_tuning_cache_roundtrip(tmp_path, monkeypatch):
  monkeypatch.setenv("OPENMOE_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(tuning, "_MEMO", None)
  key = tuning.key("pallas_gpu", "gmm", m=64, k=32, n=16, g=2, dtype=jnp.float32, gather=False)
  calls = []

  def make_fn(t):
    calls.append(t)
    return lambda: jnp.zeros(()) + t.tm

  best = tuning.autotune(key, make_fn, [Tiling(16, 16, 16), Tiling(32, 16, 16)], iters=1)
  assert len(calls) == 2 and (tmp_path / "gmm_tiling.json").exists()
  monkeypatch.setattr(tuning, "_MEMO", None)  # a fresh process reads the file
  assert tuning.lookup("pallas_gpu", "gmm", m=64, k=32, n=16, g=2, dtype=jnp.float32,
                       gather=False) == best


def _as_card(monkeypatch, kind: str, capability: str) -> None:
  monkeypatch.setattr(tuning, "_device_kind", lambda: kind)
  monkeypatch.setattr(tuning, "_compute_capability", lambda: capability)


def test_tuning_other_card_of_the_architecture_reads_the_reference_cards_tiles(tmp_path,
                                                                               monkeypatch):
  """An H200 with no entries of its own takes the H100's (exact, else nearest M / G); an entry
  of its own for the same widths wins; another architecture (an A100) takes none of them."""
  monkeypatch.setenv("OPENMOE_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(tuning, "_MEMO", {})
  kw = {"k": 1024, "n": 128, "dtype": jnp.bfloat16, "gather": False}
  h100, h200 = Tiling(128, 128, 64, 8, 4, ring=2), Tiling(64, 128, 128, 4, 4)
  tuning.store(tuning.key("pallas_mgpu", "gmm", m=131072, g=128, device="NVIDIA_H100_80GB_HBM3",
                          **kw), h100)
  _as_card(monkeypatch, "NVIDIA_H200", "9.0")
  assert tuning.device_kinds() == ("NVIDIA_H200", "NVIDIA_H100_80GB_HBM3")
  assert tuning.tuned("pallas_mgpu", "gmm", m=131072, g=128, **kw) == h100
  assert tuning.tuned("pallas_mgpu", "gmm", m=1 << 20, g=387, **kw) == h100  # nearest
  assert tuning.tuned("pallas_mgpu", "gmm", m=131072, g=128, **{**kw, "n": 256}) is None
  tuning.store(tuning.key("pallas_mgpu", "gmm", m=4096, g=8, **kw), h200)  # this card's own
  assert tuning.tuned("pallas_mgpu", "gmm", m=131072, g=128, **kw) == h200
  _as_card(monkeypatch, "NVIDIA_A100-SXM4-80GB", "8.0")
  assert tuning.device_kinds() == ("NVIDIA_A100-SXM4-80GB",)
  assert tuning.tuned("pallas_mgpu", "gmm", m=131072, g=128, **kw) is None
  _as_card(monkeypatch, "NVIDIA_H100_80GB_HBM3", "9.0")  # the reference card reads only its own
  assert tuning.device_kinds() == ("NVIDIA_H100_80GB_HBM3",)


def test_shipped_tiles_serve_every_hopper_card(tmp_path, monkeypatch):
  """The shipped H100 entries (tuned.json) reach an H200 through the same lookup the model's
  calls use: MoEUT-244M's gathered first layer gets its measured tile, not the default."""
  monkeypatch.setenv("OPENMOE_JAX_CACHE", str(tmp_path))  # an empty user cache
  monkeypatch.setattr(tuning, "_MEMO", None)
  shipped = json.loads((pathlib.Path(tuning.__file__).with_name("tuned.json")).read_text())
  call = dict(m=1048576, k=1024, n=128, g=387, dtype=jnp.bfloat16, gather=True)
  want = Tiling(**shipped["NVIDIA_H100_80GB_HBM3|pallas_gpu|gmm_t|m1048576|k1024|n128|g387|"
                          "bfloat16|gather"])
  plain = {k: v for k, v in call.items() if k != "gather"}
  assert want != tuning.default_tiling("pallas_gpu", "gmm_t", **plain)  # the lookup matters
  _as_card(monkeypatch, "NVIDIA_H200", "9.0")
  assert tuning.lookup("pallas_gpu", "gmm_t", **call) == want
  _as_card(monkeypatch, "cpu", "")
  assert tuning.tuned("pallas_gpu", "gmm_t", **call) is None


def test_tuning_lookup_uses_nearest_rows_and_groups(tmp_path, monkeypatch):
  """An untuned M / G takes the tile of the entry with the same op, K, N and dtype nearest in
  log M and log G; another K or N falls back to the heuristic."""
  monkeypatch.setenv("OPENMOE_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(tuning, "_MEMO", {})
  near, far = Tiling(256, 128, 64), Tiling(64, 64, 32)
  kw = {"k": 1024, "n": 128, "dtype": jnp.bfloat16}
  tuning.store(tuning.key("pallas_gpu", "gmm", m=131072, g=128, gather=False, **kw), near)
  tuning.store(tuning.key("pallas_gpu", "gmm", m=1024, g=4, gather=False, **kw), far)
  assert tuning.lookup("pallas_gpu", "gmm", m=1 << 20, g=387, gather=True, **kw) == near
  assert tuning.lookup("pallas_gpu", "gmm", m=2048, g=8, gather=False, **kw) == far
  other = tuning.lookup("pallas_gpu", "gmm", m=1 << 20, g=387, gather=True, k=512, n=128,
                        dtype=jnp.bfloat16)
  assert other == tuning.default_tiling("pallas_gpu", "gmm", m=1 << 20, k=512, n=128, g=387,
                                        dtype=jnp.bfloat16)

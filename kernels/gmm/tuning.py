"""Tile autotuning with a persistent JSON cache ($OPENMOE_JAX_CACHE or ~/.cache/openmoe_jax).

`lookup` is called at trace time and only reads the cache (falling back to a shape-based
default); `autotune` times candidate tilings on real inputs and writes the winner.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from openmoe_jax.kernels.gmm.tiling import Tiling

_MEMO: dict[str, dict] | None = None


def cache_path() -> pathlib.Path:
  root = os.environ.get("OPENMOE_JAX_CACHE") or os.path.expanduser("~/.cache/openmoe_jax")
  return pathlib.Path(root) / "gmm_tiling.json"


def _device_kind() -> str:
  try:
    return jax.devices()[0].device_kind.replace(" ", "_")
  except Exception:  # pragma: no cover - no devices at all
    return "unknown"


def _compute_capability() -> str:
  try:
    return str(getattr(jax.devices()[0], "compute_capability", "") or "")
  except Exception:  # pragma: no cover - no devices at all
    return ""


# The shipped entries were measured on one card per architecture. A card of that architecture
# with no entry of its own for a call (an H200, an H100 PCIe, a GH200) takes the reference
# card's: same instructions and shared memory, so its tiles beat the generic defaults by far,
# and without a measured tile `backend="auto"` would not run the Hopper kernel at all.
ARCH_REFERENCE = {"9.0": "NVIDIA_H100_80GB_HBM3"}
_BORROWED: set[str] = set()  # reference cards already announced in this process


def device_kinds() -> tuple[str, ...]:
  """The cache's device names to read, in order: this card's, then its architecture's
  reference card's (when that is another card)."""
  own, ref = _device_kind(), ARCH_REFERENCE.get(_compute_capability())
  return (own,) if ref in (None, own) else (own, ref)


def key(backend: str, op: str, *, m: int, k: int, n: int, g: int, dtype, gather: bool,
        device: str | None = None) -> str:
  """The cache key of one call on `device` (default: this card)."""
  return (f"{device or _device_kind()}|{backend}|{op}|m{m}|k{k}|n{n}|g{g}|"
          f"{jnp.dtype(dtype).name}|{'gather' if gather else 'plain'}")


_SHIPPED = pathlib.Path(__file__).with_name("tuned.json")  # entries measured on the lent H100


def _read(path: pathlib.Path) -> dict[str, dict]:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}


def _load() -> dict[str, dict]:
  """Shipped entries overlaid by the user's cache (the user's win)."""
  global _MEMO
  if _MEMO is None:
    _MEMO = {**_read(_SHIPPED), **_read(cache_path())}
  return _MEMO


def store(cache_key: str, tiling: Tiling) -> None:
  _load()[cache_key] = tiling.to_dict()
  path = cache_path()
  entries = {**_read(path), cache_key: tiling.to_dict()}
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".tmp{os.getpid()}")
  tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
  tmp.replace(path)  # atomic: concurrent writers never leave a torn file


def default_tiling(backend: str, op: str, *, m: int, k: int, n: int, g: int, dtype) -> Tiling:
  """Shape heuristic used when the cache has no entry."""
  f32 = jnp.dtype(dtype) == jnp.float32
  if backend == "pallas_tpu":
    return Tiling(tm=128, tn=128, tk=128)
  if backend == "pallas_mgpu":  # wgmma tiles: two compute warpgroups of tn / 2 columns
    if op == "tgmm":
      return Tiling(tm=64, tn=256 if n % 256 == 0 else 128, tk=128, num_warps=8, num_stages=3)
    return Tiling(tm=128, tn=256 if n % 256 == 0 else 128, tk=64, num_warps=8, num_stages=3)
  tk = 32 if f32 else 64
  if op == "tgmm":
    return Tiling(tm=64 if f32 else 128, tn=64 if f32 else 128, tk=64 if f32 else 128,
                  num_warps=4, num_stages=3)
  tn = 128 if n >= 128 else max(16, 1 << (n - 1).bit_length())
  tm = 64 if f32 else 128
  return Tiling(tm=tm, tn=tn, tk=tk, num_warps=4 if f32 else 8, num_stages=3 if f32 else 4)


def _parse(cache_key: str) -> tuple[tuple[str, ...], dict[str, int], str] | None:
  """(device, backend, op, k, n, dtype) identity, {m, g}, gather flag of a cache key."""
  parts = cache_key.split("|")
  if len(parts) != 9:
    return None
  dev, backend, op, m, k, n, g, dtype, gather = parts
  try:
    sizes = {"m": int(m[1:]), "g": int(g[1:])}
  except ValueError:
    return None
  return (dev, backend, op, k, n, dtype), sizes, gather


def nearest(cache_key: str) -> dict | None:
  """The entry for the same device, backend, op, K, N and dtype whose row count M and group
  count G are nearest on a log scale (a tile tuned for 131k rows serves 1M rows of the same
  widths far better than the generic default); an exact gather / plain match wins ties."""
  want = _parse(cache_key)
  if want is None:
    return None
  best, best_d = None, float("inf")
  for other, entry in _load().items():
    got = _parse(other)
    if got is None or got[0] != want[0]:
      continue
    d = sum(abs(math.log2(max(got[1][s], 1)) - math.log2(max(want[1][s], 1))) for s in "mg")
    d += 0.0 if got[2] == want[2] else 0.5
    if d < best_d:
      best, best_d = entry, d
  return best


def tuned(backend: str, op: str, *, m: int, k: int, n: int, g: int, dtype,
          gather: bool) -> Tiling | None:
  """The measured tile for this call (exact entry, else the nearest of the same op, K, N and
  dtype on this device kind, else the same two on the architecture's reference card), or None
  when nothing of that op and width was ever tuned."""
  kinds = device_kinds()
  for device in kinds:
    cache_key = key(backend, op, m=m, k=k, n=n, g=g, dtype=dtype, gather=gather, device=device)
    entry = _load().get(cache_key) or nearest(cache_key)
    if entry is None:
      continue
    if device != kinds[0] and device not in _BORROWED:
      _BORROWED.add(device)
      print(f"openmoe_jax.kernels: no grouped-matmul tiles measured on {kinds[0]}; using those "
            f"of {device} (same architecture). `python -m openmoe_jax.bench.tune_model` "
            "measures this card's own.", file=sys.stderr)
    return Tiling(**entry)
  return None


def lookup(backend: str, op: str, *, m: int, k: int, n: int, g: int, dtype, gather: bool) -> Tiling:
  t = tuned(backend, op, m=m, k=k, n=n, g=g, dtype=dtype, gather=gather)
  return t or default_tiling(backend, op, m=m, k=k, n=n, g=g, dtype=dtype)


def candidates(op: str, dtype, backend: str = "pallas_gpu") -> list[Tiling]:
  """A small search space (compile time dominates autotuning on GPU)."""
  if backend == "pallas_mgpu" and jnp.dtype(dtype) != jnp.float32:
    # All fit Hopper's 227 KiB of shared memory: stages x (A + B tile) + output staging.
    if op == "tgmm":  # tm: reduction rows; [tk, tn]: output block, tn split over warpgroups
      return [Tiling(64, 256, 128, 8, 3), Tiling(64, 128, 128, 8, 4), Tiling(128, 128, 128, 8, 3),
              Tiling(64, 128, 128, 4, 4), Tiling(64, 256, 64, 8, 4),
              Tiling(64, 128, 128, 8, 2, ctas_per_sm=2), Tiling(64, 128, 64, 8, 3, ctas_per_sm=2),
              # hand-written ring across items, one wgmma in flight, tk split between warpgroups
              Tiling(64, 256, 128, 8, 3, ring=1), Tiling(64, 256, 128, 8, 4, ring=1),
              Tiling(64, 128, 256, 8, 3, ring=1), Tiling(64, 128, 128, 8, 4, ring=1)]
    # gmm chains the tiles of a CTA into one pipeline when num_stages divides K / tk.
    return [Tiling(128, 256, 64, 8, 3), Tiling(128, 256, 64, 8, 2), Tiling(128, 128, 64, 8, 4),
            Tiling(128, 128, 64, 4, 4), Tiling(64, 256, 64, 8, 4), Tiling(128, 128, 128, 8, 3),
            Tiling(256, 128, 64, 8, 3), Tiling(256, 128, 64, 8, 2),
            # two CTAs per SM, each under half the shared memory
            Tiling(128, 128, 64, 8, 2, ctas_per_sm=2), Tiling(64, 128, 64, 8, 3, ctas_per_sm=2),
            # CTA pairs sharing the lhs tile (multicast); ping-pong warpgroups (short K)
            Tiling(128, 256, 64, 8, 3, cluster=2), Tiling(256, 128, 64, 8, 3, cluster=2),
            Tiling(128, 128, 64, 8, 6, pingpong=1), Tiling(128, 128, 64, 8, 4, pingpong=1),
            # one wgmma in flight across K steps (takes effect where the tiles are unchained)
            Tiling(128, 256, 64, 8, 3, cluster=2, delay_release=1),
            Tiling(256, 128, 64, 8, 3, delay_release=1),
            # hand-written ring across tiles, one wgmma in flight, rows split between warpgroups
            Tiling(128, 256, 64, 8, 4, ring=1), Tiling(128, 128, 64, 8, 6, ring=1),
            Tiling(128, 128, 64, 8, 4, ring=1), Tiling(128, 128, 128, 8, 3, ring=1),
            Tiling(64, 128, 128, 4, 4, ring=1),
            # the same with each block stored under the next block's wgmmas
            Tiling(128, 256, 64, 8, 4, ring=2), Tiling(128, 128, 64, 8, 6, ring=2),
            Tiling(128, 128, 128, 8, 3, ring=2), Tiling(64, 128, 128, 4, 4, ring=2)]
  if jnp.dtype(dtype) == jnp.float32:
    return [Tiling(64, 64, 32, 4, 3), Tiling(64, 128, 32, 4, 3), Tiling(128, 64, 32, 8, 3)]
  if op == "tgmm":  # tm is the reduction here, [tk, tn] the output tile
    return [Tiling(128, 128, 128, 8, 3), Tiling(64, 128, 128, 4, 4), Tiling(64, 256, 128, 8, 3),
            Tiling(128, 128, 64, 4, 4)]
  return [Tiling(128, 128, 64, 8, 4), Tiling(128, 256, 64, 8, 3), Tiling(256, 128, 64, 8, 3),
          Tiling(128, 128, 128, 8, 3), Tiling(64, 128, 64, 4, 4), Tiling(256, 128, 64, 8, 4),
          # items by relative position in their group: L2 reuse of gathered rows (pays when
          # the groups' weights fit in L2: SwitchHead's 40 experts; the FFN's 387 experts
          # gain a little when interleaved in blocks of 32)
          Tiling(256, 128, 64, 8, 3, interleave=1), Tiling(128, 128, 64, 8, 4, interleave=1),
          Tiling(256, 128, 64, 8, 4, interleave=32)]


def time_fn(fn: Callable[[], jax.Array], iters: int = 10) -> float:
  """Median per-call seconds of fn(): `iters` back-to-back dispatches per sample (one sync
  at the end, so host dispatch overlaps the kernels), 5 samples, after a warm-up. A sync
  per call would add ~0.1 ms of host latency and hide the difference between tilings of
  short kernels."""
  jax.block_until_ready(fn())
  samples = []
  for _ in range(5):
    t0 = time.perf_counter()
    out = None
    for _ in range(iters):
      out = fn()
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / iters)
  return sorted(samples)[len(samples) // 2]


def autotune(cache_key: str, make_fn: Callable[[Tiling], Callable[[], jax.Array]],
             cands: Sequence[Tiling], iters: int = 10, verbose: bool = False) -> Tiling:
  """Times each candidate (skipping ones that fail to compile) and stores the fastest."""
  best, best_t = None, float("inf")
  for t in cands:
    try:
      sec = time_fn(make_fn(t), iters)
    except Exception as e:  # noqa: BLE001 - a tiling that does not compile is just skipped
      if verbose:
        print(f"  tiling {t} failed: {type(e).__name__}: {str(e)[:120]}")
      continue
    if verbose:
      print(f"  tiling {t}: {sec * 1e3:.3f} ms")
    if sec < best_t:
      best, best_t = t, sec
  if best is None:
    raise RuntimeError(f"no tiling compiled for {cache_key}")
  store(cache_key, best)
  return best

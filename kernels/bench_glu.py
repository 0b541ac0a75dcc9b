"""The gated first layer of an expert FFN, fused against unfused, on the bench shapes.

    python -m openmoe_jax.kernels.bench_glu [--shapes 0,1,3] [--activation silu]

For each shape (T, D, F, E, K) of `kernels.bench.SHAPES` with [gate | up] weights
[E, D, 2F] and routed group sizes, it times in one process, alternating, best of `--reps`
medians:
- fused: `gmm_glu` on pallas_mgpu (the ring kernel's GLU epilogue; writes [M, F] only);
- gmm + XLA: the plain kernel writing [M, 2F], then the activation and product in XLA;
- dense: a [T*K, D] @ [D, 2F] matmul (same FLOPs), the best of three operand placements.
Correctness first: the fused rows of a few groups against float32, and the tail rows zero.
Both Mosaic calls use the shape's tuned forward tile (a ring tile). Hopper GPUs only.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from openmoe_jax.kernels import bench
from openmoe_jax.kernels.gmm import glu, pallas_mgpu, tuning


def glu_ref_err(y, x, w, gs, activation: str, num_groups: int = 3) -> float:
  """Relative error of fused rows of a few non-empty groups against float32, plus the tail
  rows (which must be zero)."""
  sizes = np.asarray(gs)
  starts = np.concatenate([[0], np.cumsum(sizes)])
  picks = np.flatnonzero(sizes)[:: max(1, len(np.flatnonzero(sizes)) // num_groups)]
  num = den = 0.0
  for g in picks[:num_groups]:
    rows = slice(int(starts[g]), int(starts[g + 1]))
    h = jnp.dot(x[rows].astype(jnp.float32), w[g].astype(jnp.float32),
                precision=jax.lax.Precision.HIGHEST)
    ref = glu._gated(activation, h)  # noqa: SLF001 - same package
    num += float(jnp.sum((y[rows].astype(jnp.float32) - ref) ** 2))
    den += float(jnp.sum(ref ** 2))
  num += float(jnp.sum(y[int(starts[-1]):].astype(jnp.float32) ** 2))
  return (num / den) ** 0.5


def bench_shape(i: int, activation: str, reps: int, key) -> list[str]:
  t_, d, f, e, k = bench.SHAPES[i]
  m = t_ * k
  k1, k2, k3 = jax.random.split(key, 3)
  gs = bench.routed_group_sizes(k1, t_, e, k)
  x = jax.random.normal(k2, (m, d), jnp.bfloat16)
  w = (jax.random.normal(k3, (e, d, 2 * f), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16)
  t = tuning.lookup("pallas_mgpu", "gmm", m=m, k=d, n=f, g=e, dtype=jnp.bfloat16, gather=False)
  if not t.ring:
    t = dataclasses.replace(t, ring=2)
  gated = functools.partial(glu._gated, activation)  # noqa: SLF001 - same package
  calls = {
      "fused (gmm_glu)": jax.jit(lambda a, b, g: glu.gmm_glu(
          a, b, g, activation=activation, backend="pallas_mgpu", tiling=t)),
      "gmm + XLA": jax.jit(lambda a, b, g: gated(pallas_mgpu.gmm(a, b, g, tiling=t))
                           .astype(a.dtype)),
  }
  y = calls["fused (gmm_glu)"](x, w, gs)
  err = glu_ref_err(y, x, w, gs, activation)
  diff = bench.rel_err(y, calls["gmm + XLA"](x, w, gs))
  dense = bench.dense_baseline({"fwd": jax.jit(lambda a, b: a @ b)}, {"fwd": (x, w[0])})["fwd"]
  best = {n: float("inf") for n in calls}
  for _ in range(reps):
    for n, fn in calls.items():
      best[n] = min(best[n], bench.time_call(fn, x, w, gs))
  flops = 2 * m * d * 2 * f
  head = (f"  {str(bench.SHAPES[i])}: dense {dense * 1e3:.3f} ms; rel err {err:.1e}, fused vs "
          f"unfused {diff:.1e}; tile {t.tm}x{t.tn}x{t.tk} {t.num_stages} stages ring={t.ring}")
  rows = [f"    {n:20s} {best[n] * 1e3:7.3f} ms {flops / best[n] / 1e12:6.1f} TF "
          f"{100 * dense / best[n]:4.0f}%" for n in calls]
  rows.append(f"    fused / unfused: {best['gmm + XLA'] / best['fused (gmm_glu)']:.2f}x")
  return [head] + rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default="0,1,3")
  p.add_argument("--activation", default="silu", choices=["silu", "relu"])
  p.add_argument("--reps", type=int, default=4)
  args = p.parse_args(argv)
  print(f"jax {jax.__version__} devices {jax.devices()}", flush=True)
  key = jax.random.key(0)
  lines = []
  for i in (int(s) for s in args.shapes.split(",")):
    lines += bench_shape(i, args.activation, args.reps, jax.random.fold_in(key, i))
  print(f"\nfirst layer with {args.activation} gating; % of a dense [T*K, D] @ [D, 2F] matmul:")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())

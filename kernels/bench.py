"""Benchmark + correctness check of the expert grouped matmul backends.

    python -m openmoe_jax.kernels.bench [--shapes 0,1,2,3] [--backends pallas_gpu,triton]
                                         [--autotune] [--check-only]

Prints, per shape (T, D, F, E, K) with M = T*K routed rows: a dense bf16 matmul of equal
FLOPs, jax.lax.ragged_dot, JAX's ragged_dot_mgpu (Hopper) and our backends, each for
forward (out = x @ W[e]), backward (dx and dW) and forward+backward, as TFLOP/s and % of the
dense-equivalent of the same phase. Each time is the better of two medians; the dense
baseline is timed before and after the backends of its shape, each time on three copies of
its operands at different addresses, and the best counts.
Correctness (relative Frobenius error against a float32
reference, NaN-poisoned outputs, tail rows zero) runs first on reduced shapes.
"""
from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from openmoe_jax.kernels.gmm import ops, reference, tuning
from openmoe_jax.kernels.gmm.tiling import Tiling

DENSE_PLACEMENTS = 3  # operand copies the dense baseline is timed on (best counts)
SHAPES = [(16384, 768, 3072, 32, 2), (16384, 2048, 8192, 32, 2), (16384, 1024, 128, 128, 8),
          (8192, 4096, 14336, 8, 2)]
TOL = {jnp.bfloat16: 1e-2, jnp.float32: 1e-5}


def routed_group_sizes(key, tokens: int, experts: int, k: int) -> jax.Array:
  """Group sizes of random top-k routing (every token to k distinct experts)."""
  logits = jax.random.normal(key, (tokens, experts))
  _, idx = jax.lax.top_k(logits, k)
  return jnp.bincount(idx.reshape(-1), length=experts).astype(jnp.int32)


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if not np.all(np.isfinite(x)):
    return float("nan")
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def time_call(fn, *args, budget_s: float = 0.4) -> float:
  """Median per-call seconds over back-to-back async dispatches (after a warm-up)."""
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  one = time.perf_counter() - t0
  reps = int(max(3, min(50, budget_s / max(one, 1e-6))))
  samples = []
  for _ in range(5):
    t0 = time.perf_counter()
    out = None
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / reps)
  return float(np.median(samples))


# ---------------------------------------------------------------------------------- ops
def dense_fns():
  f = lambda x, w: jnp.dot(x, w)
  return f


def _dense_fwdbwd(a, b, dy):
  y, vjp = jax.vjp(lambda p, q: p @ q, a, b)
  return y, vjp(dy)


def make_phase_fns(gmm_fn):
  """fwd(x, w, gs), bwd(x, w, gs, dy) -> (dx, dw), fwdbwd(x, w, gs, dy) -> (dx, dw)."""
  fwd = jax.jit(gmm_fn)

  def _bwd(x, w, gs, dy):
    _, vjp = jax.vjp(lambda a, b: gmm_fn(a, b, gs), x, w)
    return vjp(dy)

  def _fwdbwd(x, w, gs, dy):
    y, vjp = jax.vjp(lambda a, b: gmm_fn(a, b, gs), x, w)
    return y, vjp(dy.astype(y.dtype))  # returning y keeps the forward live, adds no pass

  return fwd, jax.jit(_bwd), jax.jit(_fwdbwd)


def mgpu_gmm_fn(cfg_fwd: dict, cfg_dx: dict, cfg_dw: dict):
  """JAX's Hopper ragged_dot_mgpu with a VJP assembled from its two kernels."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as rd
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as trd

  @jax.custom_vjp
  def f(x, w, gs):
    return rd.ragged_dot(x, w, group_sizes=gs, **cfg_fwd)

  def f_fwd(x, w, gs):
    return f(x, w, gs), (x, w, gs)

  def f_bwd(res, dy):
    x, w, gs = res
    dx = rd.ragged_dot(dy, w, group_sizes=gs, transpose_rhs=True, **cfg_dx)
    dw = trd.transposed_ragged_dot(x, dy, group_sizes=gs, **cfg_dw)
    return dx, dw, None

  f.defvjp(f_fwd, f_bwd)
  return f


MGPU_CFGS = [dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1),
             dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=8),
             dict(block_m=64, block_n=128, block_k=64, max_concurrent_steps=5, grid_block_n=4),
             dict(block_m=128, block_n=256, block_k=64, max_concurrent_steps=3, grid_block_n=1)]
MGPU_DW = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def best_mgpu(x, w, gs, dy) -> tuple[str, object]:
  """Sweeps a few ragged_dot_mgpu tiles for fwd and dx; returns the best composed fn."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as rd
  best = {}
  for name, (a, b, kw) in {"fwd": (x, w, {}), "dx": (dy, w, {"transpose_rhs": True})}.items():
    n = b.shape[1] if kw else b.shape[2]
    for cfg in MGPU_CFGS:
      if n % (cfg["block_n"] * cfg["grid_block_n"]) or a.shape[1] % cfg["block_k"]:
        continue
      try:
        fn = jax.jit(functools.partial(rd.ragged_dot, group_sizes=gs, **cfg, **kw))
        sec = time_call(fn, a, b, budget_s=0.15)
      except Exception as e:  # noqa: BLE001
        print(f"    mgpu {name} {cfg}: {type(e).__name__} {str(e)[:100]}")
        continue
      if sec < best.get(name, (None, 1e9))[1]:
        best[name] = (cfg, sec)
  if "fwd" not in best or "dx" not in best:
    raise RuntimeError("no ragged_dot_mgpu tile compiled")
  return f"fwd {best['fwd'][0]}", mgpu_gmm_fn(best["fwd"][0], best["dx"][0], MGPU_DW)


# -------------------------------------------------------------------------- correctness
def check_backend(backend: str, dtype, key) -> list[str]:
  """Fresh random inputs on reduced shapes; fwd, dx, dW vs float32 loop reference."""
  fails = []
  for (t, d, f, e, k) in [(256, 256, 384, 8, 2), (96, 128, 128, 16, 8), (130, 192, 320, 5, 2)]:
    key, k1, k2, k3, k4, k5 = jax.random.split(key, 6)
    m = t * k
    gs = routed_group_sizes(k1, t, e, k).at[0].set(0)  # an empty group
    gs = gs.at[-1].set(jnp.maximum(gs[-1] - 7, 0))      # tail rows past sum(gs)
    x = jax.random.normal(k2, (m, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(k3, (e, d, f), jnp.float32) / np.sqrt(d)).astype(dtype)
    dy = jax.random.normal(k4, (m, f), jnp.float32).astype(dtype)
    ri = jax.random.permutation(k5, m)
    for gather in (False, True):
      rix = ri if gather else None
      fn = lambda a, b: ops.gmm(a, b, gs, backend=backend, row_index=rix)
      # poison: a freed NaN buffer of the output's size is likely reused by the allocator
      jax.block_until_ready(jnp.full((m, f), jnp.nan, dtype)).delete()
      y, vjp = jax.vjp(fn, x, w)
      dx, dw = vjp(dy)
      x32, w32, dy32 = (a.astype(jnp.float32) for a in (x, w, dy))
      ry = reference.gmm_loop(x32, w32, gs, row_index_M=rix)
      rdrows = reference.gmm_loop(dy32, w32, gs, transpose_rhs=True)
      rdx = rdrows if rix is None else jnp.zeros_like(x32).at[rix].add(rdrows)
      rdw = reference.tgmm_loop(x32, dy32, gs, row_index_M=rix)
      tail = int(jnp.sum(gs))
      errs = {"fwd": rel_err(y, ry), "dx": rel_err(dx, rdx), "dw": rel_err(dw, rdw)}
      tail_ok = bool(jnp.all(y[tail:] == 0))
      ok = all(v <= TOL[dtype] for v in errs.values()) and tail_ok
      line = (f"  check {backend:11s} {jnp.dtype(dtype).name:8s} T={t} D={d} F={f} E={e} "
              f"K={k} gather={gather!s:5s} " + " ".join(f"{a}={v:.2e}" for a, v in errs.items())
              + f" tail_zero={tail_ok} {'OK' if ok else 'FAIL'}")
      print(line)
      if not ok:
        fails.append(line)
  return fails


# ---------------------------------------------------------------------------- benchmark
def sampled_fwd_err(y, x, w, gs, num_groups: int = 4) -> float:
  """Relative error of y = gmm(x, w, gs) on the rows of a few groups (first, last and evenly
  spaced non-empty ones; each one float32 matmul) and on the tail rows, which must be zero.
  A full float32 reference would not fit on the device at the bench shapes."""
  sizes = np.asarray(gs)
  starts = np.concatenate([[0], np.cumsum(sizes)])
  nonempty = np.flatnonzero(sizes)
  picks = nonempty[np.unique(np.linspace(0, len(nonempty) - 1, num_groups).astype(int))]
  num, den = 0.0, 0.0
  for g in picks:
    rows = slice(int(starts[g]), int(starts[g + 1]))
    ref = jnp.dot(x[rows].astype(jnp.float32), w[g].astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST)
    num += float(jnp.sum((y[rows].astype(jnp.float32) - ref) ** 2))
    den += float(jnp.sum(ref ** 2))
  num += float(jnp.sum(y[int(starts[-1]):].astype(jnp.float32) ** 2))
  return float(np.sqrt(num / max(den, 1e-30)))


def mgpu_unfit(t: Tiling, op: str, m: int, k: int, n: int) -> bool:
  from openmoe_jax.kernels.gmm import pallas_mgpu  # noqa: PLC0415 - GPU-only module
  return pallas_mgpu.supports(jnp.bfloat16, gather=False, k=k, n=n, t=t, op=op.split("_")[0]) is not None


def autotune_shape(backend, x, w, gs, dy):
  """Tunes gmm (fwd), gmm_t (dx) and tgmm (dW) tiles for this shape into the cache."""
  m, d = x.shape
  e, _, f = w.shape
  mod = ops._module(backend)
  specs = {"gmm": (lambda t: lambda a, b, g: mod.gmm(a, b, g, tiling=t), (x, w, gs), m, d, f),
           "gmm_t": (lambda t: lambda a, b, g: mod.gmm(a, b, g, transpose_rhs=True, tiling=t),
                     (dy, w, gs), m, f, d),
           "tgmm": (lambda t: lambda a, b, g: mod.tgmm(a, b, g, tiling=t), (x, dy, gs), m, d, f)}
  for op, (make, op_args, mm, kk, nn) in specs.items():
    ck = tuning.key(backend, op, m=mm, k=kk, n=nn, g=e, dtype=x.dtype, gather=False)
    make_fn = lambda t, make=make, op_args=op_args: functools.partial(jax.jit(make(t)), *op_args)
    cands = [c for c in tuning.candidates(op, x.dtype, backend)
             if backend != "pallas_mgpu" or not mgpu_unfit(c, op, mm, kk, nn)]
    best = tuning.autotune(ck, make_fn, cands, iters=5)
    print(f"    autotuned {backend} {op}: {best}", flush=True)


def bench_shape(shape, backends, key, args) -> list[tuple]:
  t, d, f, e, k = shape
  m = t * k
  k1, k2, k3, k4 = jax.random.split(key, 4)
  gs = routed_group_sizes(k1, t, e, k)
  x = jax.random.normal(k2, (m, d), jnp.bfloat16)
  w = (jax.random.normal(k3, (e, d, f), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16)
  dy = jax.random.normal(k4, (m, f), jnp.bfloat16)
  flops = {"fwd": 2 * m * d * f, "bwd": 4 * m * d * f, "fwd+bwd": 6 * m * d * f}
  wd = w[0]
  dense = {"fwd": jax.jit(lambda a, b: a @ b),
           "bwd": jax.jit(lambda a, b, g: jax.vjp(lambda p, q: p @ q, a, b)[1](g)),
           "fwd+bwd": jax.jit(lambda a, b, g: _dense_fwdbwd(a, b, g))}
  dense_args = {"fwd": (x, wd), "bwd": (x, wd, dy), "fwd+bwd": (x, wd, dy)}
  # Timed again after the kernels (the best of both counts): the GPU's clock drifts as it
  # heats, and the baseline should not be the only number taken on a cool device.
  base = dense_baseline(dense, dense_args)
  rows = [("dense bf16", "", base)]
  impls = []
  if "ragged_dot" in backends:
    impls.append(("jax.lax.ragged_dot", "", lambda a, b, g: jax.lax.ragged_dot(a, b, g)))
  if "ragged_dot_mgpu" in backends:
    try:
      note, fn = best_mgpu(x, w, gs, dy)
      impls.append(("ragged_dot_mgpu", note, fn))
    except Exception as ex:  # noqa: BLE001
      print(f"  ragged_dot_mgpu unavailable: {type(ex).__name__}: {str(ex)[:200]}")
  for b in backends:
    if b in ("ragged_dot", "ragged_dot_mgpu"):
      continue
    if b in args.autotune.split(","):
      try:
        autotune_shape(b, x, w, gs, dy)
      except Exception as ex:  # noqa: BLE001
        print(f"  autotune {b} failed: {type(ex).__name__}: {str(ex)[:300]}")
    impls.append((b, "", functools.partial(ops.gmm, backend=b)))
  for name, note, fn in impls:
    fwd, bwd, fb = make_phase_fns(fn)
    res = {}
    for phase, (pf, pa) in {"fwd": (fwd, (x, w, gs)), "bwd": (bwd, (x, w, gs, dy)),
                            "fwd+bwd": (fb, (x, w, gs, dy))}.items():
      try:
        res[phase] = min(time_call(pf, *pa), time_call(pf, *pa))
      except Exception as ex:  # noqa: BLE001
        msg = str(ex).splitlines()[0][:160] if str(ex) else ""
        print(f"  {name} {phase} failed: {type(ex).__name__}: {msg}")
        res[phase] = float("nan")
    if name not in ("jax.lax.ragged_dot",) and not np.isnan(res["fwd"]):
      note = (note + f" fwd_rel_err={sampled_fwd_err(fwd(x, w, gs), x, w, gs):.1e}").strip()
    rows.append((name, note, res))
    print_rows(shape, flops, base, rows[-1:])
  after = dense_baseline(dense, dense_args)
  for p in dense:
    base[p] = min(base[p], after[p])
  state = gpu_state()
  if state:  # the board's clock falls under its power limit: say where it stood
    print(f"  gpu after this shape: {state}", flush=True)
  return [(shape, flops, base, rows)]


_SMI_QUERY = "clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit"


def gpu_state(smi_output: str | None = None) -> str:
  """'SM clock / max, temperature, power / limit' of GPU 0 from nvidia-smi ('' without it)."""
  if smi_output is None:
    try:
      smi_output = subprocess.run(
          ["nvidia-smi", f"--query-gpu={_SMI_QUERY}", "--format=csv,noheader,nounits"],
          capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
      return ""
  fields = [f.strip() for f in smi_output.strip().splitlines()[0].split(",")] if smi_output.strip() else []
  if len(fields) != 5:
    return ""
  clock, max_clock, temp, power, limit = fields
  return f"SM clock {clock}/{max_clock} MHz, {temp} C, {power}/{limit} W"


def dense_baseline(dense: dict, dense_args: dict, placements: int = DENSE_PLACEMENTS) -> dict:
  """Per phase, the best time of the dense matmul over `placements` copies of its operands
  at different device addresses. cuBLAS's time depends on where its operands sit: on the
  lent H100 the same [32768, 768] x [768, 3072] product took 0.212 ms on one pair of
  buffers and 0.236-0.241 ms on copies of them (fourteenth session, docs/kernels.md), while
  the grouped kernels moved by < 1%. The best placement is the baseline, so a lucky or
  unlucky allocation does not move the percentages."""
  best = {p: float("inf") for p in dense}
  keep = []
  for i in range(placements):
    if i:  # a spacer of an odd size, then fresh copies: the copies land elsewhere
      keep.append(jnp.zeros((i * 3 * 1024 * 1024 + i * 4096 + 256,), jnp.uint8))
    args = {p: tuple(jnp.array(a, copy=True) for a in dense_args[p]) if i else dense_args[p]
            for p in dense}
    for p in dense:
      best[p] = min(best[p], time_call(dense[p], *args[p]))
  return best


def print_rows(shape, flops, base, rows):
  for name, note, res in rows:
    cells = []
    for phase in ("fwd", "bwd", "fwd+bwd"):
      sec = res[phase]
      if np.isnan(sec):
        cells.append(f"{'n/a':>22s}")
      else:
        cells.append(f"{sec * 1e3:8.3f}ms {flops[phase] / sec / 1e12:6.1f}TF {100 * base[phase] / sec:4.0f}%")
    print(f"  {str(shape):28s} {name:20s} " + " | ".join(cells) + (f"  [{note}]" if note else ""),
          flush=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default="0,1,2,3")
  p.add_argument("--backends", default="ragged_dot,ragged_dot_mgpu,pallas_gpu,triton,pallas_mgpu")
  p.add_argument("--autotune", default="", help="comma list of backends to autotune first")
  p.add_argument("--check-only", action="store_true")
  p.add_argument("--no-check", action="store_true")
  args = p.parse_args(argv)
  print(f"jax {jax.__version__} devices {jax.devices()}", flush=True)
  backends = args.backends.split(",")
  key = jax.random.key(int(time.time()))  # fresh inputs every run
  fails = []
  if not args.no_check:
    for b in backends:
      if b in ("ragged_dot", "ragged_dot_mgpu"):
        continue
      for dtype in (jnp.bfloat16, jnp.float32):
        try:
          fails += check_backend(b, dtype, jax.random.fold_in(key, hash(b) % 1000))
        except Exception as ex:  # noqa: BLE001
          traceback.print_exc(limit=3)
          fails.append(f"{b} {jnp.dtype(dtype).name}: {type(ex).__name__}: {str(ex)[:300]}")
    print("correctness:", "ALL OK" if not fails else f"{len(fails)} FAILED", flush=True)
  if args.check_only:
    return 1 if fails else 0
  x = jax.random.normal(key, (8192, 8192), jnp.bfloat16)
  sec = time_call(jax.jit(lambda a: a @ a), x)
  print(f"dense bf16 8192^3: {2 * 8192 ** 3 / sec / 1e12:.1f} TFLOP/s", flush=True)
  del x
  results = []
  print("\ncolumns: fwd | bwd (dx+dW) | fwd+bwd ; each: time, TFLOP/s, % of dense bf16 "
        "matmul [T*K, D] @ [D, F] of the same phase", flush=True)
  for i in [int(s) for s in args.shapes.split(",")]:
    print(f"shape (T, D, F, E, K) = {SHAPES[i]}", flush=True)
    results += bench_shape(SHAPES[i], backends, jax.random.fold_in(key, i), args)
  print("\n==== summary ====")
  for shape, flops, base, rows in results:
    print_rows(shape, flops, base, rows)
  for line in fails:
    print("FAILED:", line)
  return 1 if fails else 0


if __name__ == "__main__":
  sys.exit(main())

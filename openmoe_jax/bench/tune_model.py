"""Autotunes the grouped-matmul kernels for the exact calls of a model's training step.

    python -m openmoe_jax.bench.tune_model --preset moeut-244m --batch 64 --seq 1024 \
        [--attention_impl pallas --remat dots ...] [--backends pallas_gpu,pallas_mgpu]

It traces the real train step (nothing is compiled or run), collecting each distinct
grouped-matmul call (`kernels.gmm.ops.record_calls`). Then, for each call and backend, it
times the candidate tiles on random inputs of that shape (routing-like group sizes, a sorted
row index for gathered calls) next to the tile the cache gives today, and stores the fastest
in the tuning cache ($OPENMOE_JAX_CACHE, default ~/.cache/openmoe_jax). `backend="auto"`
then uses those tiles, and on a Hopper GPU it sends a plain call whose op and widths have a
measured pallas_mgpu tile to pallas_mgpu. Gathered and float32 calls are tuned for
pallas_gpu only (pallas_mgpu has no row gather and no exact float32).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from openmoe_jax import sharding
from openmoe_jax import train_step as ts
from openmoe_jax.bench import train_step as bts
from openmoe_jax.config import MeshConfig, ModelConfig, OptimConfig
from openmoe_jax.kernels.gmm import ops, tuning
from openmoe_jax.kernels.gmm.tiling import Tiling


def collect_calls(cfg: ModelConfig, batch: int, seq: int) -> list[ops.Call]:
  """The distinct kernel calls of one training step of `cfg` on [batch, seq] tokens, in
  first-use order (traced on abstract values: any device, no memory)."""
  mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
  optim = OptimConfig(name="adamw", learning_rate=1e-3, warmup_steps=0, schedule="constant")
  setup = ts.make_setup(cfg, optim, total_steps=10, seed=0, mesh=mesh,
                        rules=sharding.RULES["data_parallel"])
  state = jax.eval_shape(lambda: ts.init_state(setup, seed=0))
  host = bts.synthetic_batch(batch, seq, cfg.vocab_size, seed=0)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host.items()}
  with ops.record_calls() as calls:
    ts.jit_train_step(setup, spec).trace(state, spec)
  return list(dict.fromkeys(calls))


def call_inputs(call: ops.Call, seed: int = 0) -> tuple[jax.Array, ...]:
  """(lhs, rhs, group_sizes, row_index or None) of the call's shapes: group sizes of a random
  uniform routing of the m rows, a sorted row index into `rows` lhs rows when gathered."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  rng = np.random.default_rng(seed)
  sizes = jnp.asarray(rng.multinomial(call.m, np.full(call.g, 1.0 / call.g)), jnp.int32)
  dtype = jnp.dtype(call.dtype)
  lhs = jax.random.normal(k1, (call.rows, call.k), jnp.float32).astype(dtype)
  if call.op == "tgmm":
    rhs = jax.random.normal(k2, (call.m, call.n), jnp.float32).astype(dtype)
  else:
    shape = (call.g, call.n, call.k) if call.op == "gmm_t" else (call.g, call.k, call.n)
    rhs = (jax.random.normal(k2, shape, jnp.float32) / np.sqrt(call.k)).astype(dtype)
  index = jnp.sort(jax.random.randint(k3, (call.m,), 0, call.rows)) if call.gather else None
  return lhs, rhs, sizes, index


def _runner(call: ops.Call, backend: str, args, interpret: bool
            ) -> Callable[[Tiling], Callable[[], jax.Array]]:
  mod = importlib.import_module(f"openmoe_jax.kernels.gmm.{backend}")
  lhs, rhs, sizes, index = args
  if call.op == "tgmm":
    fn = lambda t: (lambda a, b, s, r: mod.tgmm(a, b, s, row_index_M=r, tiling=t,
                                                 interpret=interpret))
  else:
    fn = lambda t: (lambda a, b, s, r: mod.gmm(a, b, s, row_index_M=r, tiling=t,
                                                transpose_rhs=call.op == "gmm_t",
                                                interpret=interpret))
  return lambda t: functools.partial(jax.jit(fn(t)), lhs, rhs, sizes, index)


def backends_for(call: ops.Call, wanted: Sequence[str]) -> list[str]:
  plain16 = not call.gather and call.dtype in ("bfloat16", "float16")
  return [b for b in wanted if b != "pallas_mgpu" or plain16]


def candidates(call: ops.Call, backend: str) -> list[Tiling]:
  cands = tuning.candidates(call.op, jnp.dtype(call.dtype), backend)
  if backend == "pallas_mgpu":
    from openmoe_jax.kernels.gmm import pallas_mgpu  # noqa: PLC0415 - GPU-only module
    cands = [c for c in cands if pallas_mgpu.supports(
        jnp.dtype(call.dtype), gather=False, k=call.k, n=call.n, t=c,
        op=call.op.split("_")[0]) is None]
  return cands


def tune_call(call: ops.Call, backend: str, cands: Sequence[Tiling] | None = None,
              iters: int = 5, interpret: bool = False) -> tuple[Tiling, float, float]:
  """Times the tile in use today and the candidates whose output matches it (relative
  error <= 1e-2 in 16-bit, 1e-5 in float32); stores the fastest. Returns (tile, its
  seconds, the seconds of the tile in use before)."""
  key = dict(m=call.m, k=call.k, n=call.n, g=call.g, dtype=jnp.dtype(call.dtype),
             gather=call.gather)
  before = tuning.lookup(backend, call.op, **key)
  run = _runner(call, backend, call_inputs(call), interpret)
  reference = run(before)().astype(jnp.float32)
  tol = 1e-2 if jnp.dtype(call.dtype).itemsize == 2 else 1e-5

  def make(t: Tiling) -> Callable[[], jax.Array]:
    """The candidate's call, after checking that it gives the tile in use's result (a fast
    but wrong tiling is refused: autotune skips candidates that raise)."""
    fn = run(t)
    out = fn().astype(jnp.float32)
    err = float(jnp.linalg.norm(out - reference) / jnp.maximum(jnp.linalg.norm(reference), 1e-30))
    if not err <= tol:
      raise ValueError(f"tiling {t} differs from the tile in use: relative error {err:.2e}")
    return fn

  before_s = tuning.time_fn(run(before), iters)
  cands = list(candidates(call, backend) if cands is None else cands)
  best = tuning.autotune(tuning.key(backend, call.op, **key), make, [before, *cands], iters,
                         verbose=True)
  best_s = before_s if best == before else tuning.time_fn(run(best), iters)
  return best, best_s, before_s


def main(argv: Sequence[str] | None = None) -> list[tuple]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", required=True)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--attention_impl", default=None)
  p.add_argument("--remat", default=None)
  p.add_argument("--dispatch", default=None)
  p.add_argument("--backends", default="pallas_gpu,pallas_mgpu",
                 help="comma list; pallas_mgpu is skipped off Hopper")
  a = p.parse_args(argv)
  if jax.default_backend() != "gpu":
    raise SystemExit(f"tune_model times GPU kernels; this machine runs {jax.default_backend()}")
  cfg = bts.apply_overrides(bts.resolve_preset(a.preset), seq=a.seq,
                            attention_impl=a.attention_impl, remat=a.remat, dispatch=a.dispatch)
  if cfg.vocab_size <= 0:
    cfg = dataclasses.replace(cfg, vocab_size=32128)
  calls = collect_calls(cfg, a.batch, a.seq)
  wanted = [b for b in a.backends.split(",") if b and (b != "pallas_mgpu" or ops._hopper())]
  print(f"{len(calls)} distinct grouped-matmul calls; tuning {wanted} into {tuning.cache_path()}")
  rows = []
  for call in calls:
    for backend in backends_for(call, wanted):
      best, best_s, before_s = tune_call(call, backend)
      rows.append((call, backend, best, best_s, before_s))
      print(f"  {call.op:5s} m={call.m} k={call.k} n={call.n} g={call.g} {call.dtype} "
            f"gather={call.gather!s:5s} {backend:11s} {before_s * 1e3:8.3f} ms -> "
            f"{best_s * 1e3:8.3f} ms  {best}", flush=True)
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])

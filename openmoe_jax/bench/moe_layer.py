"""Micro-benchmark: one MoE layer (`moe.MoeFFN`) forward + backward, lean vs legacy dispatch.

    python -m openmoe_jax.bench.moe_layer [--tokens 4096 --d_model 128 --experts 64
        --d_expert 64 --top_k 8 --dtype float32 --dispatch ragged --capacity_factor 0]

"legacy" is the previous ragged / gmm path ([M, E] one-hot group sizes, [G, A, E] one-hot
router slots, float32 scatter-add combine of all M rows, two input matmuls), kept here only as
the baseline; both run in the same process on the same parameters and inputs, and the script
prints ms/step of each, their ratio, and the max difference of outputs and gradients.
Imports only jax / flax / numpy and openmoe_jax model code, so it runs on any platform.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from openmoe_jax import grouped
from openmoe_jax import layers
from openmoe_jax import moe
from openmoe_jax import router as router_lib
from openmoe_jax.config import ModelConfig, MoeConfig


# ------------------------------------------------------------------ legacy baseline

def _legacy_slots_GA(expert_GA, routed_GA, num_experts):
  onehot_GAE = jax.nn.one_hot(expert_GA, num_experts, dtype=jnp.int32) * routed_GA[..., None]
  before_GAE = jnp.cumsum(onehot_GAE, axis=1) - onehot_GAE
  return jnp.sum(before_GAE * onehot_GAE, axis=-1).astype(jnp.int32)


def _legacy_expert_load(routing, num_experts):
  routed_GA = routing.routed_GA.astype(jnp.float32)
  count_E = jnp.einsum("GAE,GA->E", jax.nn.one_hot(routing.expert_GA, num_experts), routed_GA)
  return jax.lax.stop_gradient(count_E / jnp.maximum(jnp.sum(routed_GA), 1.0))


def _legacy_sorted(self, x_GSD, routing, backend):
  g, s, d = x_GSD.shape
  e = self.moe.num_experts
  w_gate, w_up, w_out = self._weights()
  x_TD = x_GSD.reshape(g * s, d)
  token_M = (routing.token_GA + s * jnp.arange(g, dtype=jnp.int32)[:, None]).reshape(-1)
  expert_M, kept_M = routing.expert_GA.reshape(-1), routing.kept_GA.reshape(-1)
  weight_M = routing.combine_weight_GA().reshape(-1)
  sizes_E = jnp.sum(jax.nn.one_hot(expert_M, e, dtype=jnp.int32) * kept_M[:, None], axis=0)
  order_M = jnp.argsort(jnp.where(kept_M, expert_M, e), stable=True)
  token_M, kept_M, weight_M = token_M[order_M], kept_M[order_M], weight_M[order_M]
  if backend == "ragged":
    x_MD = x_TD[token_M]

    def mm(lhs_MK, rhs_EKN, gather=False):
      return jax.lax.ragged_dot(x_MD if gather else lhs_MK, rhs_EKN, sizes_E)
  else:
    gmm_lib = grouped.kernels_gmm()

    def mm(lhs_MK, rhs_EKN, gather=False):
      return gmm_lib.gmm(lhs_MK, rhs_EKN, sizes_E, backend=self.moe.gmm_backend,
                         row_index=token_M if gather else None)
  gate_MF = mm(x_TD, w_gate, gather=True)
  up_MF = None if w_up is None else mm(x_TD, w_up, gather=True)
  h_MF = layers.activate(self.moe.activation, gate_MF, up_MF)
  out_MD = mm(h_MF, w_out)
  out_MD = jnp.where(kept_M[:, None], out_MD.astype(jnp.float32) * weight_M[:, None], 0.0)
  y_TD = jnp.zeros((g * s, d), jnp.float32).at[token_M].add(out_MD)
  return y_TD.reshape(g, s, d)


@contextlib.contextmanager
def legacy():
  saved = (moe.MoeFFN._sorted, router_lib._slots_GA, router_lib.expert_load)  # pylint: disable=protected-access
  moe.MoeFFN._sorted = _legacy_sorted  # pylint: disable=protected-access
  router_lib._slots_GA = _legacy_slots_GA  # pylint: disable=protected-access
  router_lib.expert_load = _legacy_expert_load
  try:
    yield
  finally:
    moe.MoeFFN._sorted, router_lib._slots_GA, router_lib.expert_load = saved  # pylint: disable=protected-access


# ------------------------------------------------------------------ benchmark

def _step_fn(cfg):
  m = moe.MoeFFN(cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(m)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params)(x)
    return jnp.sum(y.astype(jnp.float32) ** 2) + aux["aux_loss"]

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def _time(fn, args, iters):
  out = jax.block_until_ready(fn(*args))  # compile + warm-up
  best = float("inf")
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best * 1e3, out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--seq", type=int, default=1024, help="routing group (sequence) length")
  p.add_argument("--d_model", type=int, default=128)
  p.add_argument("--experts", type=int, default=64)
  p.add_argument("--d_expert", type=int, default=64)
  p.add_argument("--top_k", type=int, default=8)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--dispatch", default="ragged", choices=("ragged", "gmm"))
  p.add_argument("--gmm_backend", default="auto")
  p.add_argument("--capacity_factor", type=float, default=0.0, help="<= 0: dropless")
  p.add_argument("--iters", type=int, default=5)
  a = p.parse_args(argv)
  dropless = a.capacity_factor <= 0
  cfg = ModelConfig(vocab_size=32, d_model=a.d_model, n_layers=1, n_heads=2, d_ff=a.d_expert,
                    dtype=a.dtype, moe=MoeConfig(
                        num_experts=a.experts, top_k=a.top_k, d_expert=a.d_expert,
                        dispatch=a.dispatch, gmm_backend=a.gmm_backend, dropless=dropless,
                        capacity_factor_train=a.capacity_factor,
                        capacity_factor_eval=a.capacity_factor))
  x = jax.random.normal(jax.random.key(1), (a.tokens // a.seq, a.seq, a.d_model),
                        layers.dtype_of(a.dtype))
  print(f"MoE layer fwd+bwd on {jax.devices()[0].platform}: T={a.tokens} D={a.d_model} "
        f"E={a.experts} F={a.d_expert} k={a.top_k} {a.dtype} dispatch={a.dispatch} "
        f"{'dropless' if dropless else f'cf={a.capacity_factor}'}")
  with legacy():
    fn_old, params = _step_fn(cfg)
    ms_old, out_old = _time(fn_old, (params, x), a.iters)
  fn_new, params = _step_fn(cfg)
  ms_new, out_new = _time(fn_new, (params, x), a.iters)
  diff = max(float(jnp.max(jnp.abs(jnp.asarray(u, jnp.float32) - jnp.asarray(v, jnp.float32))))
             for u, v in zip(jax.tree.leaves(out_old), jax.tree.leaves(out_new)))
  print(f"legacy {ms_old:9.2f} ms/step")
  print(f"lean   {ms_new:9.2f} ms/step")
  print(f"speedup legacy/lean: {ms_old / ms_new:.2f}x   max |diff| loss+grads: {diff:.3g}")
  return ms_old, ms_new


if __name__ == "__main__":
  main()

"""The LM head + cross-entropy over chunks of the sequence: the [B, L, V] logits never exist
whole (ModelConfig.loss_chunk_len).

Two forms, same values:
* `chunked_cross_entropy`: a scan over chunks whose bodies are rematerialised in the backward
  (the head matmul runs again; the kept per-token log-partition spares the reductions over V).
  Any use: forward-only evaluation, or any objective built from the sums.
* `fused_chunked_objective`: the training form. Each chunk's gradient (d hidden, d head weight)
  is formed in the forward pass, where the chunk's logits are at hand, for the objective
  `loss_sum + z_loss_sum`; the backward only scales them by the incoming cotangent. Three head
  matmuls per chunk, as without chunking, instead of four.

Chunks run along L, so a batch sharded over B stays sharded.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from openmoe_jax import losses

SUM_KEYS = ("loss_sum", "z_loss_sum", "correct_sum", "weight_sum")


def num_chunks(length: int, chunk_len: int) -> int:
  """Chunks of `chunk_len` positions in `length` (1 when chunking is off or moot)."""
  if chunk_len <= 0 or chunk_len >= length:
    return 1
  if length % chunk_len:
    raise ValueError(f"loss chunk length {chunk_len} does not divide the sequence length "
                     f"{length}; pick a divisor (ModelConfig.loss_chunk_len)")
  return length // chunk_len


def _split(a: jax.Array, n: int) -> jax.Array:
  """[B, L, ...] -> [n, B, L / n, ...]."""
  b, length = a.shape[:2]
  return jnp.swapaxes(a.reshape(b, n, length // n, *a.shape[2:]), 0, 1)


def _merge(a: jax.Array) -> jax.Array:
  """[n, B, C, ...] -> [B, n * C, ...] (inverse of _split)."""
  n, b, c = a.shape[:3]
  return jnp.swapaxes(a, 0, 1).reshape(b, n * c, *a.shape[3:])


def _zero_sums(shape: tuple[int, ...] = ()) -> dict[str, jax.Array]:
  return {k: jnp.zeros(shape, jnp.float32) for k in SUM_KEYS}


def chunked_cross_entropy(x_BLD: jax.Array, logits_fn: Callable[[jax.Array], jax.Array],
                          targets_BL: jax.Array, weights_BL: jax.Array, chunk_len: int,
                          z_loss: float = 0.0) -> dict[str, jax.Array]:
  """`losses.cross_entropy(logits_fn(x_BLD), ...)` over chunks of `chunk_len` positions
  (weights [B, L] or [B, L, J], as there).

  Each chunk is rematerialised in the backward (`jax.checkpoint` keeping only the named
  per-token log-partition), so one [B, chunk_len, V] block of logits exists at a time.
  `logits_fn` must be a pure function of its argument; closing over the head weight is fine
  (its gradient accumulates over the chunks in the weight's dtype).
  """
  n = num_chunks(x_BLD.shape[1], chunk_len)
  if n == 1:
    return losses.cross_entropy(logits_fn(x_BLD), targets_BL, weights_BL, z_loss)

  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.save_only_these_names(
      losses.LOG_Z_NAME))
  def chunk_sums(x_BCD, t_BC, w_BC):
    return losses.cross_entropy(logits_fn(x_BCD), t_BC, w_BC, z_loss)

  def body(acc, chunk):
    return jax.tree.map(jnp.add, acc, chunk_sums(*chunk)), None

  sums, _ = jax.lax.scan(body, _zero_sums(weights_BL.shape[2:]),
                         (_split(x_BLD, n), _split(targets_BL, n), _split(weights_BL, n)))
  return sums


def fused_chunked_objective(head_fn: Callable[[jax.Array, jax.Array], jax.Array],
                            x_BLD: jax.Array, weight: Any, targets_BL: jax.Array,
                            weights_BL: jax.Array, chunk_len: int, z_loss: float = 0.0
                            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(objective, sums): objective = loss_sum + z_loss_sum, differentiable in `x_BLD` and
  `weight`; `sums` are `losses.cross_entropy`'s metrics, without gradient.

  `head_fn(x_BCD, weight)` gives a chunk's logits (e.g. `partial(transformer.head_logits,
  cfg)`; it must be hashable and free of traced values). `weight` is an array or a pytree of
  them (a head with a bias: `(weight, bias)`). The forward computes the gradient
  of the objective for a unit cotangent chunk by chunk (a float32 accumulator for the
  weight's, the hidden states' in their dtype); the backward scales both by the cotangent.
  """
  objective, sums = _fused(head_fn, chunk_len, z_loss, x_BLD, weight, targets_BL, weights_BL)
  return objective, jax.lax.stop_gradient(sums)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(head_fn, chunk_len, z_loss, x_BLD, weight, targets_BL, weights_BL):
  (objective, sums), _ = _fused_fwd(head_fn, chunk_len, z_loss, x_BLD, weight, targets_BL,
                                    weights_BL)
  return objective, sums


def _fused_fwd(head_fn, chunk_len, z_loss, x_BLD, weight, targets_BL, weights_BL):
  n = num_chunks(x_BLD.shape[1], chunk_len)

  def body(carry, chunk):
    acc, dweight_acc = carry
    x_BCD, t_BC, w_BC = chunk
    logits_BCV, head_vjp = jax.vjp(head_fn, x_BCD, weight)

    def objective_fn(lg_BCV):
      s = losses.cross_entropy(lg_BCV, t_BC, w_BC, z_loss)
      return s["loss_sum"] + s["z_loss_sum"], s

    objective, ce_vjp, s = jax.vjp(objective_fn, logits_BCV, has_aux=True)
    (dlogits_BCV,) = ce_vjp(jnp.ones_like(objective))
    dx_BCD, dweight = head_vjp(dlogits_BCV)
    dweight_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), dweight_acc, dweight)
    return (jax.tree.map(jnp.add, acc, s), dweight_acc), dx_BCD

  init = (_zero_sums(), jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), weight))
  (sums, dweight), dx_nBCD = jax.lax.scan(
      body, init, (_split(x_BLD, n), _split(targets_BL, n), _split(weights_BL, n)))
  objective = sums["loss_sum"] + sums["z_loss_sum"]
  dweight = jax.tree.map(lambda g, w: g.astype(w.dtype), dweight, weight)
  return (objective, sums), (_merge(dx_nBCD), dweight)


def _fused_bwd(head_fn, chunk_len, z_loss, res, cts):
  del head_fn, chunk_len, z_loss
  dx_BLD, dweight = res
  g_objective, _ = cts  # the sums are metrics: their cotangents are dropped
  return ((g_objective * dx_BLD).astype(dx_BLD.dtype),
          jax.tree.map(lambda g: (g_objective * g).astype(g.dtype), dweight), None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)

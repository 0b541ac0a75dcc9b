"""Pure routing functions: ST-MoE top-k (softmax), sigma-MoE (sigmoid), expert choice; aux losses.

Shape letters (openmoe_jax.axes) plus one local letter:
  G routing groups, S tokens per group, D model dim, E experts, K top-k, C expert capacity,
  A routing *assignments* per group: (token, expert) pairs; A = K*S for token choice (k-major
    priority order, see `top_k_routing`) and A = E*C for expert choice.

Every router returns the same `Routing` record (per-assignment token, expert, slot, gate, flags),
so every dispatch backend in `moe.py` consumes one format: the one-hot einsum builds a
[G, S, E, C] dispatch mask from it, the ragged / gmm backends sort its kept assignments by expert.
Router maths is float32 throughout (ST-MoE: bf16 router logits are unstable).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from openmoe_jax import layers
from openmoe_jax.kernels import topk as topk_lib

ROUTER_PAD = 64  # wide routers are padded to a multiple of this many experts (router_logits)


class Routing(NamedTuple):
  """Per-assignment routing decisions; every field is [G, A]."""

  token_GA: jax.Array  # int32: index of the token inside its group (0..S-1)
  expert_GA: jax.Array  # int32: expert of the assignment (0..E-1)
  position_GA: jax.Array  # int32: slot in the expert's buffer (0..C-1 where kept)
  gate_GA: jax.Array  # float32: combine weight of the assignment (whether kept or not)
  routed_GA: jax.Array  # bool: a real (unmasked) token chose / was chosen by this expert
  kept_GA: jax.Array  # bool: routed and within capacity, i.e. processed by the expert

  def combine_weight_GA(self) -> jax.Array:
    """float32 [G, A]: the gate where the assignment is processed, else 0."""
    return jnp.where(self.kept_GA, self.gate_GA, 0.0)


def expert_capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int = 0) -> int:
  """C = ceil(S * k * cf / E), at least `min_capacity`, at most S (a token picks an expert once).

  `capacity_factor <= 0` means dropless: C = S, so no assignment can overflow.
  """
  if group_size <= 0 or num_experts <= 0 or top_k <= 0:
    raise ValueError(f"expert_capacity: group_size={group_size}, num_experts={num_experts}, "
                     f"top_k={top_k}; expected positive values")
  if capacity_factor <= 0:
    return group_size
  c = math.ceil(group_size * top_k * capacity_factor / num_experts)
  return max(1, min(group_size, max(c, min_capacity)))


def router_logits(x_GSD: jax.Array, w_DE: jax.Array, *, jitter: float = 0.0,
                  rng: jax.Array | None = None, dtype: str = "float32") -> jax.Array:
  """float32 logits [G, S, E] of x_GSD @ w_DE, with operands in `dtype` (accumulation f32).

  `jitter` > 0 with an `rng` multiplies the router input by U(1 - jitter, 1 + jitter) noise
  (Switch/ST-MoE "jitter"); without an rng (evaluation) there is no noise.

  E >= 128 that is not a multiple of 64 (MoEUT's 387) is padded with zero columns for the
  matmul and sliced off (`layers.lowp_einsum`: the backward also runs in `dtype`): on an H100 the [65536, 1024] x [1024, 387] product took 1.36 ms
  forward + backward, padded to 448 0.95 ms (narrower E got slower when padded).
  """
  x32 = x_GSD.astype(jnp.float32)
  if jitter > 0.0 and rng is not None:
    x32 = x32 * jax.random.uniform(rng, x32.shape, jnp.float32, 1.0 - jitter, 1.0 + jitter)
  e = w_DE.shape[1]
  pad = (-e) % ROUTER_PAD if e >= 128 else 0
  w_DE = jnp.pad(w_DE, ((0, 0), (0, pad)))  # the weight gradient stays in its own dtype
  # Backward in `dtype` too (a float32 cotangent made both backward matmuls float32).
  logits_GSE = layers.lowp_einsum("GSD,DE->GSE", x32.astype(dtype), w_DE, dtype)
  # Named for the "dots" remat policy: the backward needs the logits (gates, aux losses), and
  # as a custom-VJP output they are not a dot it would keep.
  return checkpoint_name(logits_GSE[..., :e] if pad else logits_GSE, "router_logits")


def _slots_GA(expert_GA: jax.Array, routed_GA: jax.Array, num_experts: int) -> jax.Array:
  """Slot of each assignment in its expert's buffer: number of earlier routed ones to it.

  One stable sort per group of the expert ids (unrouted ones last) instead of an [G, A, E]
  one-hot cumsum: slot = rank in the sorted order - start of the expert's run. Unrouted -> 0.
  """
  g, a = expert_GA.shape
  key_GA = jnp.where(routed_GA, expert_GA, num_experts).astype(jnp.int32)
  order_GA = jnp.argsort(key_GA, axis=1, stable=True).astype(jnp.int32)
  sorted_GA = jnp.take_along_axis(key_GA, order_GA, axis=1)
  count_GE = jax.vmap(lambda k: jnp.bincount(k, length=num_experts + 1))(key_GA)
  start_GE = (jnp.cumsum(count_GE, axis=1) - count_GE).astype(jnp.int32)
  slot_sorted_GA = (jnp.arange(a, dtype=jnp.int32)[None, :]
                    - jnp.take_along_axis(start_GE, sorted_GA, axis=1))
  rows_G1 = jnp.arange(g, dtype=jnp.int32)[:, None]
  slot_GA = jnp.zeros((g, a), jnp.int32).at[rows_G1, order_GA].set(
      slot_sorted_GA, unique_indices=True)
  return jnp.where(routed_GA, slot_GA, 0)


def top_k_routing(logits_GSE: jax.Array, mask_GS: jax.Array, *, top_k: int,
                  capacity: int | None, gate: str = "softmax", renormalize: bool = False,
                  batch_prioritized: bool = False,
                  selection_mask_GSE: jax.Array | None = None) -> Routing:
  """Token choice: every real token picks its top-k experts; experts keep the first C.

  gate="softmax" (ST-MoE / OpenMoE): gates are softmax probabilities, optionally renormalised
  over the k chosen. gate="sigmoid" (sigma-MoE / MoEUT): gates are the raw sigmoid values of
  the top-k logits, never renormalised. `selection_mask_GSE` (False = expert unavailable; MoEUT
  expert dropout) affects the choice only, not the gate values.

  Priority for capacity follows T5X: all first choices before any second choice (k-major); within
  one k, tokens in sequence order, or by descending top-1 probability when `batch_prioritized`.
  Masked tokens (mask_GS == 0) are not routed and take no capacity. capacity=None is dropless.
  Returns a Routing with A = K * S.
  """
  g, s, e = logits_GSE.shape
  if not 1 <= top_k <= e:
    raise ValueError(f"top_k={top_k}; expected 1..{e}")
  if gate not in ("softmax", "sigmoid"):
    raise ValueError(f"gate={gate!r}; expected 'softmax' or 'sigmoid'")
  logits_GSE = logits_GSE.astype(jnp.float32)
  probs_GSE = (jax.nn.softmax(logits_GSE, axis=-1) if gate == "softmax"
               else jax.nn.sigmoid(logits_GSE))
  select_GSE = probs_GSE
  if selection_mask_GSE is not None:
    select_GSE = jnp.where(selection_mask_GSE, probs_GSE, -jnp.inf)
  expert_GSK = checkpoint_name(topk_lib.top_k_indices(select_GSE, top_k), "routing")
  gate_GSK = jnp.take_along_axis(probs_GSE, expert_GSK, axis=-1)
  if renormalize and gate == "softmax":
    gate_GSK = gate_GSK / jnp.sum(gate_GSK, axis=-1, keepdims=True)
  real_GS = mask_GS.astype(bool)

  if batch_prioritized:  # most confident tokens first (V-MoE BPR); padding last
    score_GS = jnp.where(real_GS, jnp.max(probs_GSE, axis=-1), -1.0)
    order_GS = jnp.argsort(-score_GS, axis=-1, stable=True).astype(jnp.int32)
  else:
    order_GS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (g, s))

  def k_major(v_GSK: jax.Array) -> jax.Array:  # [G, S, K] in priority order -> [G, K*S]
    v_GSK = jnp.take_along_axis(v_GSK, order_GS[..., None], axis=1)
    return jnp.swapaxes(v_GSK, 1, 2).reshape(g, top_k * s)

  token_GA = k_major(jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], (g, s, top_k)))
  expert_GA = k_major(expert_GSK).astype(jnp.int32)
  gate_GA = k_major(gate_GSK)
  routed_GA = k_major(jnp.broadcast_to(real_GS[..., None], (g, s, top_k)))
  if selection_mask_GSE is not None:  # an expert dropped for every choice cannot take a token
    routed_GA = routed_GA & jnp.isfinite(k_major(jnp.take_along_axis(select_GSE, expert_GSK, -1)))
  position_GA = _slots_GA(expert_GA, routed_GA, e)
  kept_GA = routed_GA if capacity is None else routed_GA & (position_GA < capacity)
  return Routing(token_GA, expert_GA, position_GA, gate_GA, routed_GA, kept_GA)


def expert_choice_routing(logits_GSE: jax.Array, mask_GS: jax.Array, *,
                          capacity: int) -> Routing:
  """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens of the group by
  softmax probability; gates are those probabilities. Non-causal: a token's routing depends on
  the other tokens of its group (future ones included). Masked tokens are never chosen.
  Returns a Routing with A = E * C (assignments expert-major, slot = rank).
  """
  g, s, e = logits_GSE.shape
  c = min(capacity, s)
  probs_GSE = jax.nn.softmax(logits_GSE.astype(jnp.float32), axis=-1)
  score_GES = jnp.swapaxes(jnp.where(mask_GS.astype(bool)[..., None], probs_GSE, -1.0), 1, 2)
  top_GEC, token_GEC = jax.lax.top_k(score_GES, c)
  token_GA = token_GEC.reshape(g, e * c).astype(jnp.int32)
  expert_GA = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32)[:, None], (e, c)).reshape(-1)
  expert_GA = jnp.broadcast_to(expert_GA, (g, e * c))
  position_GA = jnp.broadcast_to(jnp.tile(jnp.arange(c, dtype=jnp.int32), e), (g, e * c))
  routed_GA = top_GEC.reshape(g, e * c) >= 0.0
  gate_GA = jnp.maximum(top_GEC.reshape(g, e * c), 0.0)
  return Routing(token_GA, expert_GA, position_GA, gate_GA, routed_GA, routed_GA)


def dispatch_combine(routing: Routing, group_size: int, num_experts: int, capacity: int
                     ) -> tuple[jax.Array, jax.Array]:
  """T5X-style float32 dispatch mask and combine weights, both [G, S, E, C], from a Routing.

  dispatch[g, s, e, c] = 1 iff token s of group g sits in slot c of expert e.
  """
  kept_GA = routing.kept_GA.astype(jnp.float32)
  tok_GAS = jax.nn.one_hot(routing.token_GA, group_size, dtype=jnp.float32) * kept_GA[..., None]
  exp_GAE = jax.nn.one_hot(routing.expert_GA, num_experts, dtype=jnp.float32)
  pos_GAC = jax.nn.one_hot(routing.position_GA, capacity, dtype=jnp.float32)
  dispatch_GSEC = jnp.einsum("GAS,GAE,GAC->GSEC", tok_GAS, exp_GAE, pos_GAC)
  combine_GSEC = jnp.einsum("GAS,GAE,GAC->GSEC", tok_GAS * routing.gate_GA[..., None],
                            exp_GAE, pos_GAC)
  return dispatch_GSEC, combine_GSEC


# --------------------------------------------------------------------------- losses, metrics

def load_balance_loss(probs_GSE: jax.Array, routing: Routing, mask_GS: jax.Array,
                      load_E: jax.Array | None = None) -> jax.Array:
  """E * sum_e(fraction of routed assignments to e * mean router probability of e).

  Both statistics are over the real tokens of all groups; equals 1 at perfect balance (uniform
  probabilities and uniform assignments) for any k. Gradient flows through the probabilities.
  `load_E`: `expert_load(routing, E)` when the caller has it already.
  """
  e = probs_GSE.shape[-1]
  mask_GS = mask_GS.astype(jnp.float32)
  mean_prob_E = (jnp.einsum("GSE,GS->E", probs_GSE, mask_GS) /
                 jnp.maximum(jnp.sum(mask_GS), 1.0))
  load_E = expert_load(routing, e) if load_E is None else load_E
  return e * jnp.sum(load_E * mean_prob_E)


def expert_load(routing: Routing, num_experts: int) -> jax.Array:
  """float32 [E]: fraction of routed assignments (before capacity) that went to each expert."""
  routed_A = routing.routed_GA.reshape(-1)
  ids_A = jnp.where(routed_A, routing.expert_GA.reshape(-1), num_experts)  # sentinel: dropped
  # Exact int counts off the sorted ids (a radix sort and a binary search): a bincount of
  # ~1M ids into a few hundred bins is a contended scatter-add (0.2 ms on an H100).
  bounds = jnp.searchsorted(jnp.sort(ids_A.astype(jnp.int32)),
                            jnp.arange(num_experts + 1, dtype=jnp.int32), side="left",
                            method="scan_unrolled")
  count_E = jnp.diff(bounds).astype(jnp.float32)
  total = jnp.sum(routed_A.astype(jnp.int32)).astype(jnp.float32)
  return jax.lax.stop_gradient(count_E / jnp.maximum(total, 1.0))


def z_loss(logits_GSE: jax.Array, mask_GS: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)^2."""
  mask_GS = mask_GS.astype(jnp.float32)
  lse_GS = jax.nn.logsumexp(logits_GSE.astype(jnp.float32), axis=-1)
  return jnp.sum(lse_GS ** 2 * mask_GS) / jnp.maximum(jnp.sum(mask_GS), 1.0)


def entropy_regularizer(logits_BL_E: jax.Array, token_mask_BL: jax.Array) -> jax.Array:
  """MoEUT's entropy regulariser (sigma-MoE and SwitchHead): log(E) - H(p), with p the softmax
  of the selection logits [B, L, ..., E] averaged over the real tokens of each sequence, then
  averaged over sequences (those with a real token) and any axes between L and E (heads).

  Per sequence, as MoEUT does: a batch whose sequences each use one expert, a different one
  each, is penalised (its batch-wide marginal could be uniform). The constant log(E) makes the
  value >= 0 with 0 at a uniform marginal; the gradients are those of -H.
  """
  e = logits_BL_E.shape[-1]
  inner = (None,) * (logits_BL_E.ndim - 2)  # the axes between L and E
  mask_BL = token_mask_BL.astype(jnp.float32)
  n_B = jnp.sum(mask_BL, axis=1)
  probs_BL_E = jax.nn.softmax(logits_BL_E.astype(jnp.float32), axis=-1)
  mean_B_E = (jnp.sum(probs_BL_E * mask_BL[(...,) + inner], axis=1) /
              jnp.maximum(n_B, 1.0)[(...,) + inner])
  entropy_B_ = -jnp.sum(mean_B_E * jnp.log(jnp.maximum(mean_B_E, 1e-20)), axis=-1)
  per_seq_B = jnp.log(float(e)) - entropy_B_.reshape(entropy_B_.shape[0], -1).mean(axis=1)
  valid_B = (n_B > 0).astype(jnp.float32)
  return jnp.sum(per_seq_B * valid_B) / jnp.maximum(jnp.sum(valid_B), 1.0)


def router_entropy(logits_GSE: jax.Array, mask_GS: jax.Array) -> jax.Array:
  """Mean over real tokens of the entropy of the per-token softmax (a confidence metric)."""
  mask_GS = mask_GS.astype(jnp.float32)
  logp_GSE = jax.nn.log_softmax(logits_GSE.astype(jnp.float32), axis=-1)
  h_GS = -jnp.sum(jnp.exp(logp_GSE) * logp_GSE, axis=-1)
  return jax.lax.stop_gradient(jnp.sum(h_GS * mask_GS) / jnp.maximum(jnp.sum(mask_GS), 1.0))


def dropped_fraction(routing: Routing, mask_GS: jax.Array, expert_choice: bool = False
                     ) -> jax.Array:
  """Token choice: fraction of routed assignments not processed (over capacity).
  Expert choice: fraction of real tokens that no expert picked."""
  if expert_choice:
    g, s = mask_GS.shape
    hits_GS = jnp.zeros((g, s), jnp.float32).at[
        jnp.arange(g)[:, None], routing.token_GA].add(routing.kept_GA.astype(jnp.float32))
    real_GS = mask_GS.astype(jnp.float32)
    return jnp.sum((hits_GS == 0) * real_GS) / jnp.maximum(jnp.sum(real_GS), 1.0)
  routed = jnp.sum(routing.routed_GA.astype(jnp.float32))
  kept = jnp.sum(routing.kept_GA.astype(jnp.float32))
  return 1.0 - kept / jnp.maximum(routed, 1.0)

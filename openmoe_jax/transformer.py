"""Decoder-only transformer: blocks, repeated units (scan + remat, optional layer sharing), LM head.

Layer layout. The n_layers blocks are built from *units* of P consecutive blocks:
  - no sharing: P = MoE layer period (dense, dense, dense, MoE for OpenMoE) and n_layers / P
    units with their own parameters, stacked on a leading "layers" axis and scanned;
  - Universal-Transformer sharing (MoEUT), order "abab": one unit of G distinct blocks applied
    n_layers / G times with the same parameters;
  - sharing, order "aabb": G units of one block, each applied n_layers / G times in place.
Each of these is a `Segment`; the model runs its segments in order.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from openmoe_jax import attention as attn_lib
from openmoe_jax import axes as ax
from openmoe_jax import layers
from openmoe_jax import sharding
from openmoe_jax.config import ModelConfig

Aux = dict[str, Any]
# "dots" keeps matmul outputs and the named outputs of kernels that XLA does not see as dots
# (Pallas grouped matmuls and attention): attention / routed-expert outputs and expert hiddens,
# the int32 routing decisions (top-k choices, sort orders, group sizes), so the backward
# does not redo the top-k and the sorts, and the float32 router logits.
SAVED_NAMES = ("attention_out", "attention_lse", "routed_out", "routed_hidden", "routing",
               "router_logits")
REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES)),
    "full": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class BlockInputs:
  """Per-call tensors every block needs besides the residual stream."""
  positions_BL: jax.Array
  mask_BLS: jax.Array
  token_mask_BL: jax.Array  # 1 for real tokens (routers ignore padding)
  cache_index: jax.Array | None
  deterministic: bool
  rng: jax.Array | None


def make_attention(cfg: ModelConfig, rngs: nnx.Rngs, out_std_scale: float) -> nnx.Module:
  if cfg.attention == "dense":
    return attn_lib.Attention(cfg, rngs, out_std_scale)
  if cfg.attention == "switchhead":
    from openmoe_jax import switchhead  # pylint: disable=import-outside-toplevel
    return switchhead.SwitchHeadAttention(cfg, rngs, out_std_scale)
  raise ValueError(f"ModelConfig.attention={cfg.attention!r} is not built by Block")


class DenseFFN(nnx.Module):
  """The dense MLP with the MoE FFN's call signature."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, out_std_scale: float):
    self.mlp = layers.MLP(cfg, rngs, out_std_scale=out_std_scale)

  def __call__(self, x_BLD: jax.Array, *, router_input_BLD: jax.Array | None = None,
               token_mask_BL: jax.Array | None = None, rng: jax.Array | None = None,
               deterministic: bool = True) -> tuple[jax.Array, Aux]:
    del token_mask_BL, rng, deterministic
    return self.mlp(x_BLD if router_input_BLD is None else router_input_BLD), {}


def make_ffn(cfg: ModelConfig, is_moe: bool, rngs: nnx.Rngs, out_std_scale: float) -> nnx.Module:
  if not is_moe:
    return DenseFFN(cfg, rngs, out_std_scale)
  from openmoe_jax import moe  # pylint: disable=import-outside-toplevel
  return moe.MoeFFN(cfg, rngs, out_std_scale)


def moeut_init(cfg: ModelConfig, is_moe: bool) -> tuple[ModelConfig, float, float]:
  """MoEUT's reset_parameters as (sub-module config, attention out-scale, FFN out-scale).

  MoEUT draws every projection from N(0, sqrt(2 / n_layers) / sqrt(fan_in)). Input projections
  (Q, K, V, routers, expert keys) have fan_in = d_model: that is `init_std`. Output projections
  get it through `out_std_scale`: O has fan_in H*K, the sigma-MoE values E*F (MoEUT's choice).
  """
  d = cfg.d_model
  sub_cfg = dataclasses.replace(cfg, init_std=(2.0 / cfg.n_layers) ** 0.5 / d ** 0.5)
  attn_fan_in = cfg.n_heads * cfg.resolved_head_dim
  ffn_fan_in = (cfg.moe.num_experts * (cfg.moe.d_expert or cfg.d_ff) if is_moe else cfg.d_ff)
  return sub_cfg, (d / attn_fan_in) ** 0.5, (d / ffn_fan_in) ** 0.5


class Block(nnx.Module):
  """One transformer layer: attention then FFN, pre-LN or MoEUT peri-LN residual scheme."""

  def __init__(self, cfg: ModelConfig, is_moe: bool, rngs: nnx.Rngs):
    out_scale = 1.0 / (2.0 * cfg.n_layers) ** 0.5  # GPT-2 style scaled residual outputs
    sub_cfg, attn_scale, ffn_scale = cfg, out_scale, out_scale
    if cfg.init_scheme == "moeut":
      sub_cfg, attn_scale, ffn_scale = moeut_init(cfg, is_moe)
    self.peri = cfg.norm_scheme == "peri"
    self.attn_norm = layers.make_norm(cfg, rngs)
    self.ffn_norm = layers.make_norm(cfg, rngs)
    self.attn = make_attention(sub_cfg, rngs, attn_scale)
    self.ffn = make_ffn(sub_cfg, is_moe, rngs, ffn_scale)
    # OpenMoE: every MoE layer also runs a dense MLP *after* the experts, with its own pre-norm
    # and residual (ModelConfig.extra ("moe_extra_mlp", "sequential"); see convert/openmoe.py).
    extra_mlp = is_moe and cfg.option("moe_extra_mlp") == "sequential"
    self.extra_norm = layers.make_norm(cfg, rngs) if extra_mlp else None
    self.extra_mlp = layers.MLP(cfg, rngs, out_std_scale=out_scale) if extra_mlp else None
    self.dtype = layers.dtype_of(cfg.dtype)

  def __call__(self, x_BLD: jax.Array, inputs: BlockInputs, cache: Any,
               rng: jax.Array | None) -> tuple[jax.Array, Any, Aux]:
    x_BLD = sharding.constrain(x_BLD, (ax.BATCH, ax.LENGTH, ax.ACT_EMBED))
    h_BLD = self.attn_norm(x_BLD)
    if self.peri:  # V reads the raw stream, Q/K the normalised one
      a_BLD, new_cache, attn_aux = self.attn(x_BLD, inputs.positions_BL, inputs.mask_BLS, cache,
                                             inputs.cache_index, qk_input_BLD=h_BLD,
                                             token_mask_BL=inputs.token_mask_BL)
    else:
      a_BLD, new_cache, attn_aux = self.attn(h_BLD, inputs.positions_BL, inputs.mask_BLS, cache,
                                             inputs.cache_index, token_mask_BL=inputs.token_mask_BL)
    x_BLD = x_BLD + a_BLD.astype(x_BLD.dtype)
    h_BLD = self.ffn_norm(x_BLD)
    rng_ffn = None if rng is None else jax.random.fold_in(rng, 1)
    if self.peri:
      f_BLD, ffn_aux = self.ffn(x_BLD, router_input_BLD=h_BLD, token_mask_BL=inputs.token_mask_BL,
                                rng=rng_ffn, deterministic=inputs.deterministic)
    else:
      f_BLD, ffn_aux = self.ffn(h_BLD, token_mask_BL=inputs.token_mask_BL, rng=rng_ffn,
                                deterministic=inputs.deterministic)
    x_BLD = x_BLD + f_BLD.astype(x_BLD.dtype)
    if self.extra_mlp is not None:
      x_BLD = x_BLD + self.extra_mlp(self.extra_norm(x_BLD)).astype(x_BLD.dtype)
    aux = {**{f"attn_{k}": v for k, v in attn_aux.items()}, **ffn_aux}
    return x_BLD, new_cache, aux


def make_block(cfg: ModelConfig, is_moe: bool, rngs: nnx.Rngs) -> nnx.Module:
  """A Block, or a UMoE block (its attention and FFN share one set of experts)."""
  if cfg.attention == "umoe":
    from openmoe_jax import umoe  # pylint: disable=import-outside-toplevel
    return umoe.UmoeBlock(cfg, rngs)
  return Block(cfg, is_moe, rngs)


class Unit(nnx.Module):
  """P consecutive blocks; `first_layer` is the model-level index of block 0 (for MoE placement)."""

  def __init__(self, cfg: ModelConfig, first_layer: int, size: int, rngs: nnx.Rngs):
    def is_moe(i: int) -> bool:
      return cfg.moe is not None and cfg.moe.is_moe_layer(first_layer + i)
    self.blocks = nnx.List([make_block(cfg, is_moe(i), rngs) for i in range(size)])

  def __call__(self, x_BLD: jax.Array, inputs: BlockInputs, caches: Any,
               rng: jax.Array | None) -> tuple[jax.Array, Any, Aux]:
    new_caches, aux = [], {}
    for i, block in enumerate(self.blocks):
      block_rng = None if rng is None else jax.random.fold_in(rng, i)
      x_BLD, cache_i, aux_i = block(x_BLD, inputs, None if caches is None else caches[i],
                                    block_rng)
      new_caches.append(cache_i)
      if aux_i:
        aux[f"block{i}"] = aux_i
    return x_BLD, (None if caches is None else new_caches), aux


class Segment(nnx.Module):
  """A unit applied `repeats` times: stacked parameters (shared=False) or one copy (True)."""

  def __init__(self, cfg: ModelConfig, first_layer: int, unit_size: int, repeats: int,
               shared: bool, rngs: nnx.Rngs):
    self.repeats, self.shared = repeats, shared
    self.scan, self.remat = cfg.scan_layers, cfg.remat
    self.cse_repeats = repeats if cfg.remat_cse_repeats < 0 else cfg.remat_cse_repeats
    if shared:
      self.unit = Unit(cfg, first_layer, unit_size, rngs)
    else:
      @nnx.split_rngs(splits=repeats)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: ax.LAYERS})
      def create(r: nnx.Rngs) -> Unit:
        return Unit(cfg, first_layer, unit_size, r)
      self.unit = create(rngs)

  def __call__(self, x_BLD: jax.Array, inputs: BlockInputs, caches: Any,
               rng: jax.Array | None) -> tuple[jax.Array, Any, Aux]:
    """`caches`: per-block caches stacked on a leading repeats axis (or None)."""
    graphdef, state = nnx.split(self.unit)
    shared = self.shared

    def body(x, xs):
      unit_state, cache_r, r = xs
      unit = nnx.merge(graphdef, state if shared else unit_state)
      unit_rng = None if rng is None else jax.random.fold_in(rng, r)
      x, new_cache, aux = unit(x, inputs, cache_r, unit_rng)
      return x, (new_cache, aux)

    bodies = [body, body]  # [repeats that prevent CSE, repeats that allow it]
    if self.remat != "none":
      bodies = [jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=prevent)
                for prevent in (True, False)]
    xs = (None if shared else state, caches, jnp.arange(self.repeats))
    if self.scan:  # a scan body is never CSE'd with its backward: no need to prevent it
      x_BLD, (new_caches, aux) = jax.lax.scan(bodies[1], x_BLD, xs)
      return x_BLD, new_caches, aux
    outs = []
    for r in range(self.repeats):
      x_BLD, out = bodies[r < self.cse_repeats](x_BLD, jax.tree.map(lambda a, r=r: a[r], xs))
      outs.append(out)
    new_caches, aux = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return x_BLD, new_caches, aux


def segment_plan(cfg: ModelConfig) -> list[tuple[int, int, int, bool]]:
  """[(first_layer, unit_size, repeats, shared)] covering all n_layers blocks in order."""
  if cfg.n_shared_groups:
    g, r = cfg.n_shared_groups, cfg.n_layers // cfg.n_shared_groups
    if cfg.share_order == "abab":
      return [(0, g, r, True)]
    return [(i, 1, r, True) for i in range(g)]
  period = cfg.moe.layer_period if cfg.moe is not None else 1
  if cfg.n_layers % period:
    raise ValueError(f"ModelConfig.n_layers={cfg.n_layers} not divisible by "
                     f"MoeConfig.layer_period={period}")
  return [(0, period, cfg.n_layers // period, False)]


class Transformer(nnx.Module):
  """Token ids -> logits, with optional KV cache and MoE auxiliary outputs."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    if cfg.vocab_size <= 0:
      raise ValueError("ModelConfig.vocab_size must be set (>0) before building the model")
    self.cfg = cfg
    self.embed = layers.Embed(cfg, rngs, std=cfg.d_model ** -0.5 if cfg.init_scheme == "moeut"
                              else 1.0)
    self.segments = nnx.List([Segment(cfg, first, size, reps, shared, rngs)
                              for first, size, reps, shared in segment_plan(cfg)])
    self.final_norm = layers.make_norm(cfg, rngs)
    # MoEUT never resets its lm_head: torch's nn.Linear default, U(+-1/sqrt(d)), bias too.
    moeut = cfg.init_scheme == "moeut"
    head_init = (layers.symmetric_uniform(cfg.d_model ** -0.5) if moeut
                 else layers.normal(cfg.d_model ** -0.5))
    self.head_DV = None if cfg.tie_embeddings else layers.param(
        rngs, head_init, (cfg.d_model, cfg.vocab_size), (ax.EMBED, ax.VOCAB), cfg.param_dtype)
    bias_init = head_init if moeut else jax.nn.initializers.zeros
    self.head_bias_V = layers.param(rngs, bias_init, (cfg.vocab_size,), (ax.VOCAB,),
                                    cfg.param_dtype) if cfg.head_bias else None

  def __call__(self, tokens_BL: jax.Array, *, positions_BL: jax.Array | None = None,
               segment_ids_BL: jax.Array | None = None, prefix_BL: jax.Array | None = None,
               cache: dict[str, Any] | None = None, rng: jax.Array | None = None,
               deterministic: bool = True,
               return_hidden: bool = False) -> tuple[jax.Array, Aux, dict[str, Any] | None]:
    """Returns (logits [B, L, V] in cfg.logits_dtype, aux, updated cache or None).

    Without `segment_ids_BL` every token is real; without `prefix_BL` attention is causal.
    With cfg.attention_mask = "causal", training calls ignore segments, prefixes and
    positions: each row is one causal stream.
    With `cache` (from `generate.init_cache`), the chunk is written at `cache["index"]`.
    `return_hidden` returns the final-normed hidden states [B, L, D] instead of the logits
    (`head_weight` and `head_logits` turn them into logits, e.g. chunk by chunk).
    """
    cfg = self.cfg
    b, l = tokens_BL.shape
    seg_BL = jnp.ones((b, l), jnp.int32) if segment_ids_BL is None else segment_ids_BL
    prefix_BL = jnp.zeros((b, l), jnp.int32) if prefix_BL is None else prefix_BL
    if cache is None and cfg.attention_mask == "causal":  # one causal stream per row
      pos_BL = jnp.broadcast_to(jnp.arange(l), (b, l))
      mask_BLS = attn_lib.sequence_mask(jnp.ones_like(seg_BL), jnp.zeros_like(prefix_BL))
      index, new_cache = None, None
    elif cache is None:
      pos_BL = (jnp.broadcast_to(jnp.arange(l), (b, l)) if positions_BL is None
                else positions_BL)
      mask_BLS = attn_lib.sequence_mask(seg_BL, prefix_BL)
      index, new_cache = None, None
    else:
      index = cache["index"]
      pos_BL = cache["next_pos_B"][:, None] + jnp.cumsum(seg_BL != 0, axis=1) - 1 \
          if positions_BL is None else positions_BL
      k_seg_BS = jax.lax.dynamic_update_slice(cache["seg_BS"], seg_BL, (0, index))
      k_prefix_BS = jax.lax.dynamic_update_slice(cache["prefix_BS"], prefix_BL, (0, index))
      q_slot_BL = jnp.broadcast_to(index + jnp.arange(l), (b, l))
      mask_BLS = attn_lib.attention_mask(q_slot_BL, seg_BL, prefix_BL, k_seg_BS, k_prefix_BS)
      new_cache = {"seg_BS": k_seg_BS, "prefix_BS": k_prefix_BS, "index": index + l,
                   "next_pos_B": jnp.max(pos_BL, axis=1) + 1, "layers": []}
    inputs = BlockInputs(pos_BL, mask_BLS, (seg_BL != 0).astype(jnp.int32), index,
                         deterministic, rng)
    x_BLD = self.embed(tokens_BL)
    aux: Aux = {}
    for s, segment in enumerate(self.segments):
      seg_rng = None if rng is None else jax.random.fold_in(rng, s)
      seg_cache = None if cache is None else cache["layers"][s]
      x_BLD, seg_cache, seg_aux = segment(x_BLD, inputs, seg_cache, seg_rng)
      if seg_aux:
        aux[f"segment{s}"] = seg_aux
      if new_cache is not None:
        new_cache["layers"].append(seg_cache)
    x_BLD = self.final_norm(x_BLD)
    if return_hidden:
      return x_BLD, aux, new_cache
    return head_logits(cfg, x_BLD, self.head_weight()), aux, new_cache

  def head_weight(self) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The output projection's parameters: [D, V], or the tied embedding table [V, D]; with
    cfg.head_bias the pair (that weight, bias [V])."""
    weight = self.embed.embedding_VD[...] if self.head_DV is None else self.head_DV[...]
    return weight if self.head_bias_V is None else (weight, self.head_bias_V[...])


def head_logits(cfg: ModelConfig, x_BLD: jax.Array, weight: jax.Array) -> jax.Array:
  """Logits [B, L, V] in cfg.logits_dtype from final-normed hidden states and
  `Transformer.head_weight()` (a pure function, so it can run inside scan / checkpoint)."""
  bias_V = None
  if cfg.head_bias:
    weight, bias_V = weight
  if cfg.tie_embeddings:
    # Embeddings are initialised with unit variance, so scale logits back to O(1).
    logits_BLV = jnp.einsum("BLD,VD->BLV", x_BLD * x_BLD.shape[-1] ** -0.5,
                            weight.astype(x_BLD.dtype))
  else:
    logits_BLV = jnp.einsum("BLD,DV->BLV", x_BLD, weight.astype(x_BLD.dtype))
  if bias_V is not None:
    logits_BLV = logits_BLV + bias_V.astype(logits_BLV.dtype)
  return sharding.constrain(logits_BLV.astype(cfg.logits_dtype),
                            (ax.BATCH, ax.LENGTH, ax.ACT_VOCAB))


def total_aux_loss(aux: Aux) -> jax.Array:
  """Sum of every `aux_loss` leaf (already weighted by its coefficient) in the aux tree, also
  under a prefix (`attn_aux_loss`: Block prefixes the attention's aux keys with "attn_")."""
  total = jnp.zeros((), jnp.float32)
  for path, leaf in jax.tree_util.tree_flatten_with_path(aux)[0]:
    key = str(getattr(path[-1], "key", ""))
    if key == "aux_loss" or key.endswith("_aux_loss"):
      total = total + jnp.sum(leaf)
  return total

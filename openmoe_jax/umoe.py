"""UMoE (Yang et al. 2025, "Unifying Attention and FFN with Shared Experts"): one set of experts
serves both the attention and the FFN sub-layer of a block.

Attention is reformulated as "pre-mixing": each token picks top-k experts with a softmax router;
every chosen expert e contributes one query (low rank: q = (h @ A_e) @ B_e, plus a shared
full-rank residual query), all queries attend over ONE key per token with the normalised hidden
states themselves as values, and each mixed vector goes through its expert's FFN:
  attn(t) = sum_{e in topk_att(t)} g_e(t) * FFN_e(softmax(q_e(t) . K) H) + FFN_shared(mix_shared(t))
The FFN sub-layer routes the (normalised) stream to the same FFN_e with its own router and top-k
plus its own shared expert: ffn(t) = sum_{e in topk_ffn(t)} g'_e(t) FFN_e(h(t)) + FFN'_shared(h(t)).
`one_head=True` (one_head_attention_moe): one query, one mixed vector fed to all top-k experts.
Experts are plain act(x W1) W2 MLPs (DeepSeek VanillaMLP, SiLU); gates are softmax probabilities
(not renormalised); each router adds DeepSeek's per-sequence balance loss. Layer sharing
(`share_layer_repeat_num`) is `share_layer_config`: consecutive layers share one block ("aabb").
The KV cache holds the key [B, S, 1, Q] and the value = normalised hidden state [B, S, 1, D].
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from openmoe_jax import attention as attn_lib
from openmoe_jax import axes as ax
from openmoe_jax import grouped
from openmoe_jax import layers
from openmoe_jax import sharding
from openmoe_jax.config import ModelConfig, UmoeConfig

Aux = dict[str, Any]
_ACT = {"silu": jax.nn.silu, "relu": jax.nn.relu, "gelu": jax.nn.gelu}


def share_layer_config(cfg: ModelConfig, repeat_num: int) -> ModelConfig:
  """UMoE's share_layer / share_layer_repeat_num: each run of `repeat_num` consecutive layers
  uses one block ("layer 0 and layer 1 use the same" for 2), i.e. our "aabb" sharing."""
  if repeat_num < 1 or cfg.n_layers % repeat_num:
    raise ValueError(f"share_layer_repeat_num={repeat_num}; expected a divisor of "
                     f"n_layers={cfg.n_layers}")
  if repeat_num == 1:
    return dataclasses.replace(cfg, n_shared_groups=0)
  return dataclasses.replace(cfg, n_shared_groups=cfg.n_layers // repeat_num, share_order="aabb")


def route(logits_BLE: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Softmax scores [B, L, E] and greedy top-k (indices, gates) [B, L, k]; no renormalisation."""
  scores_BLE = jax.nn.softmax(logits_BLE.astype(jnp.float32), axis=-1)
  gate_BLk, idx_BLk = jax.lax.top_k(scores_BLE, top_k)
  return scores_BLE, idx_BLk.astype(jnp.int32), gate_BLk


def balance_loss(scores_BLE: jax.Array, idx_BLk: jax.Array, token_mask_BL: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """DeepSeek seq_aux balance loss (mean over sequences of sum_e f_e * P_e, f normalised to 1
  at uniform load) and the expert load [E] (fraction of selections), over real tokens."""
  e, k = scores_BLE.shape[-1], idx_BLk.shape[-1]
  mask_BL = token_mask_BL.astype(jnp.float32)
  n_B = jnp.sum(mask_BL, axis=1)
  count_BE = jnp.einsum("BLkE,BL->BE", jax.nn.one_hot(idx_BLk, e, dtype=jnp.float32), mask_BL)
  f_BE = count_BE / jnp.maximum(n_B * k / e, 1e-9)[:, None]
  p_BE = jnp.einsum("BLE,BL->BE", scores_BLE, mask_BL) / jnp.maximum(n_B, 1.0)[:, None]
  valid_B = (n_B > 0).astype(jnp.float32)
  loss = jnp.sum(jnp.sum(f_BE * p_BE, axis=-1) * valid_B) / jnp.maximum(jnp.sum(valid_B), 1.0)
  load_E = jnp.sum(count_BE, axis=0) / jnp.maximum(jnp.sum(count_BE), 1.0)
  return loss, jax.lax.stop_gradient(load_E)


class Experts(nnx.Module):
  """E routed experts [E, D, F] -> [E, F, D] plus the attention's and the FFN's shared experts."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    u: UmoeConfig = cfg.umoe
    d, e, f, pdt = cfg.d_model, u.num_experts, u.d_expert, cfg.param_dtype
    std = cfg.init_std  # DeepSeek / HF init: N(0, initializer_range) for every matrix
    self.act = _ACT[u.activation]
    self.dtype = layers.dtype_of(cfg.dtype)
    self.w_in_EDF = layers.param(rngs, layers.normal(std), (e, d, f),
                                 (ax.EXPERT, ax.EMBED, ax.EXPERT_MLP), pdt)
    self.w_out_EFD = layers.param(rngs, layers.normal(std), (e, f, d),
                                  (ax.EXPERT, ax.EXPERT_MLP, ax.EMBED), pdt)
    s = u.num_shared_experts * f

    def shared() -> tuple[nnx.Param, nnx.Param]:
      return (layers.param(rngs, layers.normal(std), (d, s), (ax.EMBED, ax.MLP), pdt),
              layers.param(rngs, layers.normal(std), (s, d), (ax.MLP, ax.EMBED), pdt))
    self.shared_attn = nnx.List(shared()) if s else None
    self.shared_ffn = nnx.List(shared()) if s and u.separate_ffn_shared else None

  def routed(self, src_RD: jax.Array, expert_M: jax.Array, gate_M: jax.Array, *,
             per_src: int, per_out: int) -> jax.Array:
    """float32 [M / per_out, D]: out[n] = sum_{m: m // per_out == n} gate[m] *
    FFN_{expert[m]}(src[m // per_src]), as two grouped matmuls over the rows sorted once."""
    m = expert_M.shape[0]
    sg = grouped.sort_groups(expert_M, self.w_in_EDF.shape[0])
    h_MF = grouped.gather_gmm(src_RD, self.w_in_EDF[...].astype(self.dtype), sg, per_src)
    # Gates folded into the hidden rows; the output matmul is fused with the combine.
    h_MF = (self.act(h_MF).astype(jnp.float32) *
            gate_M[sg.order_M].astype(jnp.float32)[:, None]).astype(self.dtype)
    return grouped.gmm_sum(h_MF, self.w_out_EFD[...].astype(self.dtype), sg.sizes_G,
                           sg.inv_M.reshape(m // per_out, per_out), sg.order_M // per_out)

  def shared(self, x_BLD: jax.Array, for_ffn: bool) -> jax.Array | None:
    pair = self.shared_attn if not for_ffn or self.shared_ffn is None else self.shared_ffn
    if pair is None:
      return None
    w1, w2 = pair[0][...].astype(self.dtype), pair[1][...].astype(self.dtype)
    return jnp.einsum("BLF,FD->BLD", self.act(jnp.einsum("BLD,DF->BLF", x_BLD, w1)), w2)

  def token_choice(self, x_BLD: jax.Array, idx_BLk: jax.Array, gate_BLk: jax.Array
                   ) -> jax.Array:
    """FFN-style use: every token's own vector through its top-k experts; [B, L, D] float32."""
    b, l, d = x_BLD.shape
    k = idx_BLk.shape[-1]
    y_TD = self.routed(x_BLD.reshape(b * l, d), idx_BLk.reshape(-1), gate_BLk.reshape(-1),
                       per_src=k, per_out=k)
    return y_TD.reshape(b, l, d)


class UmoeAttention(nnx.Module):
  """Pre-mixing attention whose value/output maps are the block's experts (see module doc)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    u: UmoeConfig = cfg.umoe
    d, e, q, r, pdt = cfg.d_model, u.num_experts, u.qk_dim, u.q_lora_rank, cfg.param_dtype
    std = cfg.init_std
    self.u, self.d_model = u, d
    self.dtype = layers.dtype_of(cfg.dtype)
    self.rope = (q, cfg.rope_fraction, cfg.rope_theta)

    def w(shape, names):
      return layers.param(rngs, layers.normal(std), shape, names, pdt)
    self.w_router_DE = w((d, e), (ax.EMBED, None))
    self.w_k_DQ = w((d, q), (ax.EMBED, ax.HEAD_DIM))
    self.w_q_DQ = w((d, q), (ax.EMBED, ax.HEAD_DIM)) if u.one_head else None
    multi = not u.one_head
    self.w_qa_EDR = w((e, d, r), (ax.EXPERT, ax.EMBED, None)) if multi and r else None
    self.w_qb_ERQ = w((e, r, q), (ax.EXPERT, None, ax.HEAD_DIM)) if multi and r else None
    self.w_q_EDQ = w((e, d, q), (ax.EXPERT, ax.EMBED, ax.HEAD_DIM)) if multi and not r else None
    self.w_qres_DQ = w((d, q), (ax.EMBED, ax.HEAD_DIM)) if multi and r and u.res_query else None
    self.w_qshared_DQ = (w((d, q), (ax.EMBED, ax.HEAD_DIM))
                         if multi and u.num_shared_experts else None)

  def init_cache(self, batch: int, length: int) -> attn_lib.KVCache:
    return {"k_BSNK": jnp.zeros((batch, length, 1, self.u.qk_dim), self.dtype),
            "v_BSNK": jnp.zeros((batch, length, 1, self.d_model), self.dtype)}

  def _queries(self, h_BLD: jax.Array, idx_BLk: jax.Array) -> jax.Array:
    """[B, L, H, Q]: one query per routed expert (+ one for the shared expert), or one head."""
    dt, (b, l, d), k = self.dtype, h_BLD.shape, idx_BLk.shape[-1]
    if self.w_q_DQ is not None:
      return jnp.einsum("BLD,DQ->BLQ", h_BLD, self.w_q_DQ[...].astype(dt))[:, :, None]
    ones_M = jnp.ones((b * l * k,), jnp.float32)
    if self.w_qa_EDR is not None:  # low rank: the E small A_e for all experts, then gathered B_e
      a_BLER = jnp.einsum("BLD,EDR->BLER", h_BLD, self.w_qa_EDR[...].astype(dt))
      a_MR = jnp.take_along_axis(a_BLER, idx_BLk[..., None], axis=2).reshape(b * l * k, -1)
      q_MQ = grouped.grouped_project(a_MR, idx_BLk.reshape(-1), ones_M,
                                     self.w_qb_ERQ[...].astype(dt), per_src=1, per_out=1)
    else:
      q_MQ = grouped.grouped_project(h_BLD.reshape(b * l, d), idx_BLk.reshape(-1), ones_M,
                                     self.w_q_EDQ[...].astype(dt), per_src=k, per_out=1)
    q_BLkQ = q_MQ.reshape(b, l, k, -1).astype(dt)
    if self.w_qres_DQ is not None:
      q_BLkQ = q_BLkQ + jnp.einsum("BLD,DQ->BLQ", h_BLD, self.w_qres_DQ[...].astype(dt))[:, :, None]
    if self.w_qshared_DQ is not None:  # the shared expert's query comes first
      shared_BL1Q = jnp.einsum("BLD,DQ->BLQ", h_BLD, self.w_qshared_DQ[...].astype(dt))[:, :, None]
      q_BLkQ = jnp.concatenate([shared_BL1Q, q_BLkQ], axis=2)
    return q_BLkQ

  def __call__(self, h_BLD: jax.Array, positions_BL: jax.Array, mask_BLS: jax.Array,
               cache: attn_lib.KVCache | None, cache_index: jax.Array | None, *,
               experts: Experts, token_mask_BL: jax.Array
               ) -> tuple[jax.Array, attn_lib.KVCache | None, Aux]:
    """h_BLD is the normalised stream (queries, key, values and router all read it); the
    balance loss and the expert load count the real tokens, `token_mask_BL`."""
    u, dt = self.u, self.dtype
    b, l, d = h_BLD.shape
    h_BLD = h_BLD.astype(dt)
    logits_BLE = jnp.einsum("BLD,DE->BLE", h_BLD.astype(jnp.float32),
                            self.w_router_DE[...].astype(jnp.float32))
    scores_BLE, idx_BLk, gate_BLk = route(logits_BLE, u.attn_top_k)
    inv_freq = layers.rope_frequencies(*self.rope)
    q_BLHQ = layers.apply_rope(self._queries(h_BLD, idx_BLk), positions_BL, inv_freq)
    k_BL1Q = layers.apply_rope(jnp.einsum("BLD,DQ->BLQ", h_BLD, self.w_k_DQ[...].astype(dt))
                               [:, :, None], positions_BL, inv_freq)
    v_BL1D = h_BLD[:, :, None]
    if cache is None:
      keys_BS1Q, values_BS1D, new_cache = k_BL1Q, v_BL1D, None
    else:
      new_cache = attn_lib.update_cache(cache, k_BL1Q, v_BL1D, cache_index)
      keys_BS1Q, values_BS1D = new_cache["k_BSNK"].astype(dt), new_cache["v_BSNK"].astype(dt)
    scores_BHLS = jnp.einsum("BLHQ,BSQ->BHLS", q_BLHQ, keys_BS1Q[:, :, 0],
                             preferred_element_type=jnp.float32) * (u.qk_dim ** -0.5)
    visible_B1LS = mask_BLS[:, None]
    probs_BHLS = jax.nn.softmax(jnp.where(visible_B1LS, scores_BHLS, -1e30), axis=-1)
    probs_BHLS = jnp.where(visible_B1LS, probs_BHLS, 0.0)
    mix_BLHD = jnp.einsum("BHLS,BSD->BLHD", probs_BHLS.astype(dt), values_BS1D[:, :, 0])
    mix_BLHD = sharding.constrain(mix_BLHD, (ax.BATCH, ax.LENGTH, None, ax.ACT_EMBED))
    n_shared = 1 if self.w_qshared_DQ is not None else 0
    if u.one_head:  # one mixed vector per token, fed to all its experts (and the shared one)
      y_BLD = experts.token_choice(mix_BLHD[:, :, 0], idx_BLk, gate_BLk)
      shared_in_BLD = mix_BLHD[:, :, 0]
    else:
      k = u.attn_top_k
      routed_MD = mix_BLHD[:, :, n_shared:].reshape(b * l * k, d)
      y_BLD = experts.routed(routed_MD, idx_BLk.reshape(-1), gate_BLk.reshape(-1), per_src=1,
                             per_out=k).reshape(b, l, d)
      shared_in_BLD = mix_BLHD[:, :, 0] if n_shared else None
    if shared_in_BLD is not None:
      shared_BLD = experts.shared(shared_in_BLD, for_ffn=False)
      y_BLD = y_BLD if shared_BLD is None else y_BLD + shared_BLD.astype(jnp.float32)
    lb, load_E = balance_loss(scores_BLE, idx_BLk, token_mask_BL)
    aux = {"aux_loss": u.aux_loss_weight * lb, "load_balance_loss": lb, "expert_load_E": load_E}
    return y_BLD.astype(dt), new_cache, aux


class UmoeBlock(nnx.Module):
  """Pre-LN block: x + UMoE attention(norm x), then x + shared-expert FFN(norm x)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    if cfg.umoe is None:
      raise ValueError("UmoeBlock needs ModelConfig.umoe (got None)")
    if cfg.norm_scheme != "pre":
      raise ValueError(f"UMoE is a pre-LN model; ModelConfig.norm_scheme={cfg.norm_scheme!r} "
                       "is not supported with attention='umoe'")
    self.u = cfg.umoe
    self.attn_norm = layers.make_norm(cfg, rngs)
    self.ffn_norm = layers.make_norm(cfg, rngs)
    self.experts = Experts(cfg, rngs)
    self.attn = UmoeAttention(cfg, rngs)
    self.w_router_ffn_DE = (layers.param(rngs, layers.normal(cfg.init_std),
                                         (cfg.d_model, cfg.umoe.num_experts), (ax.EMBED, None),
                                         cfg.param_dtype)
                            if cfg.umoe.separate_ffn_router else None)

  def __call__(self, x_BLD: jax.Array, inputs: Any, cache: Any, rng: jax.Array | None
               ) -> tuple[jax.Array, Any, Aux]:
    """The transformer.Block contract: (x, new cache, aux); `inputs` is a BlockInputs."""
    del rng  # UMoE has no stochastic routing
    x_BLD = sharding.constrain(x_BLD, (ax.BATCH, ax.LENGTH, ax.ACT_EMBED))
    a_BLD, new_cache, attn_aux = self.attn(self.attn_norm(x_BLD), inputs.positions_BL,
                                           inputs.mask_BLS, cache, inputs.cache_index,
                                           experts=self.experts,
                                           token_mask_BL=inputs.token_mask_BL)
    x_BLD = x_BLD + a_BLD.astype(x_BLD.dtype)
    h_BLD = self.ffn_norm(x_BLD)
    w_DE = self.w_router_ffn_DE if self.w_router_ffn_DE is not None else self.attn.w_router_DE
    logits_BLE = jnp.einsum("BLD,DE->BLE", h_BLD.astype(jnp.float32), w_DE[...].astype(
        jnp.float32))
    scores_BLE, idx_BLk, gate_BLk = route(logits_BLE, self.u.ffn_top_k)
    f_BLD = self.experts.token_choice(h_BLD, idx_BLk, gate_BLk)
    shared_BLD = self.experts.shared(h_BLD, for_ffn=True)
    if shared_BLD is not None:
      f_BLD = f_BLD + shared_BLD.astype(jnp.float32)
    x_BLD = x_BLD + f_BLD.astype(x_BLD.dtype)
    lb, load_E = balance_loss(scores_BLE, idx_BLk, inputs.token_mask_BL)
    aux = {**{f"attn_{k}": v for k, v in attn_aux.items()},
           "aux_loss": self.u.aux_loss_weight * lb, "load_balance_loss": lb,
           "expert_load_E": load_E}
    return x_BLD, new_cache, aux


def param_count(cfg: ModelConfig) -> int:
  """Parameters of one UmoeBlock (for openmoe_jax.params)."""
  u, d = cfg.umoe, cfg.d_model
  e, f, q, r, s = u.num_experts, u.d_expert, u.qk_dim, u.q_lora_rank, u.num_shared_experts
  n = 2 * layers.norm_params(cfg) + e * 2 * d * f + d * e + d * q  # norms, experts, router, key
  n += 2 * d * s * f * (2 if s and u.separate_ffn_shared else 1)
  n += d * e if u.separate_ffn_router else 0
  if u.one_head:
    return n + d * q
  n += e * (d * r + r * q) if r else e * d * q
  n += d * q if r and u.res_query else 0
  return n + (d * q if s else 0)

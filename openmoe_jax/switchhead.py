"""SwitchHead attention (MoEUT, Csordas et al. 2024): dense Q and K, expert V and O per head.

Per head h, a sigma-MoE gate (sigmoid, top-k of the raw sigmoid values, no renormalisation)
picks `top_k` of `num_experts` value projections by the *source* token and `top_k` output
projections by the *destination* token:
  v[s, h] = sum_{e in topk_v(s, h)} g_v[s, h, e] * x[s] @ W_v[h, e]
  y[t]    = sum_h sum_{e in topk_o(t, h)} g_o[t, h, e] * attn[t, h] @ W_o[h, e]
Selections read the normalised stream (peri-LN `qk_input_BLD`), V reads the raw one, as MoEUT.
With num_experts == 1 it is dense attention whose heads are scaled by a learned sigmoid gate
sigmoid(x @ w_sel_o) before the output projection (MoEUT's att_n_experts=1 path).
Expert projections run as grouped matmuls (`openmoe_jax.grouped`, the gmm kernel with a fused
row gather) over the (head, expert) groups of the k * H selections per token, like MoEUT's CVMM
kernel; the KV cache stores post-expert V.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from flax import nnx

from openmoe_jax import attention as attn_lib
from openmoe_jax import axes as ax
from openmoe_jax import grouped
from openmoe_jax import layers
from openmoe_jax import router as router_lib
from openmoe_jax import sharding
from openmoe_jax.config import ModelConfig
from openmoe_jax.kernels import topk as topk_lib

Aux = dict[str, jax.Array]


def sigma_select(logits_BLHE: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
  """sigma-MoE selection: indices and gates (raw sigmoid values) of the top-k, both [B, L, H, k]."""
  probs = jax.nn.sigmoid(logits_BLHE.astype(jnp.float32))
  idx_BLHk = checkpoint_name(topk_lib.top_k_indices(probs, top_k), "routing")
  e = probs.shape[-1]
  if e > 64:
    return idx_BLHk, jnp.take_along_axis(probs, idx_BLHk, axis=-1)
  # Few experts: the gates as a masked sum over E, whose gradient is elementwise (the
  # take_along_axis gradient, a scatter-add, took ~1.5 ms per call at [65536, 4, 10]).
  hit_BLHkE = idx_BLHk[..., None] == jnp.arange(e, dtype=jnp.int32)
  return idx_BLHk, jnp.sum(jnp.where(hit_BLHkE, probs[..., None, :], 0.0), axis=-1)


def param_count(cfg: ModelConfig) -> int:
  """Parameters of one SwitchHeadAttention (for openmoe_jax.params)."""
  d, h, k, e = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim, cfg.switchhead.num_experts
  if e == 1:
    return 4 * d * h * k + d * h
  return 2 * d * h * k + 2 * h * e * d * k + 2 * d * h * e


class SwitchHeadAttention(nnx.Module):
  """SwitchHead with RoPE on `rope_fraction` of each head; the attention module contract."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, out_std_scale: float = 1.0):
    if cfg.switchhead is None:
      raise ValueError("SwitchHeadAttention needs ModelConfig.switchhead (got None)")
    if cfg.resolved_kv_heads != cfg.n_heads:
      raise ValueError(f"SwitchHead has one key per query head; ModelConfig.n_kv_heads="
                       f"{cfg.n_kv_heads} must be 0 or n_heads={cfg.n_heads}")
    sh = cfg.switchhead
    d, h, k, e = cfg.d_model, cfg.n_heads, cfg.resolved_head_dim, sh.num_experts
    self.dims = (h, k, e, sh.top_k)
    self.dtype = layers.dtype_of(cfg.dtype)
    self.rope = (k, cfg.rope_fraction, cfg.rope_theta)
    self.impl = cfg.attention_impl
    self.causal = cfg.attention_mask == "causal"
    self.gmm_backend = cfg.moe.gmm_backend if cfg.moe is not None else "auto"
    self.selection_dtype = sh.selection_dtype
    repeats = cfg.n_layers // cfg.n_shared_groups if cfg.n_shared_groups else 1
    self.aux_scale = sh.entropy_weight / repeats
    std, o_std, pdt = cfg.init_std, cfg.init_std * out_std_scale, cfg.param_dtype
    self.w_q_DHK = layers.param(rngs, layers.normal(std), (d, h, k),
                                (ax.EMBED, ax.HEADS, ax.HEAD_DIM), pdt)
    self.w_k_DHK = layers.param(rngs, layers.normal(std), (d, h, k),
                                (ax.EMBED, ax.HEADS, ax.HEAD_DIM), pdt)
    if e == 1:
      self.w_v_DHK = layers.param(rngs, layers.normal(std), (d, h, k),
                                  (ax.EMBED, ax.HEADS, ax.HEAD_DIM), pdt)
      self.w_o_HKD = layers.param(rngs, layers.normal(o_std), (h, k, d),
                                  (ax.HEADS, ax.HEAD_DIM, ax.EMBED), pdt)
      self.w_gate_DH = layers.param(rngs, layers.normal(std), (d, h), (ax.EMBED, ax.HEADS), pdt)
    else:
      # The per-head expert axis stays unsharded: E rarely divides a mesh axis (MoEUT: 8-13).
      self.w_v_HEDK = layers.param(rngs, layers.normal(std), (h, e, d, k),
                                   (ax.HEADS, None, ax.EMBED, ax.HEAD_DIM), pdt)
      self.w_o_HEKD = layers.param(rngs, layers.normal(o_std), (h, e, k, d),
                                   (ax.HEADS, None, ax.HEAD_DIM, ax.EMBED), pdt)
      self.w_sel_v_DHE = layers.param(rngs, layers.normal(std), (d, h, e),
                                      (ax.EMBED, ax.HEADS, None), pdt)
      self.w_sel_o_DHE = layers.param(rngs, layers.normal(std), (d, h, e),
                                      (ax.EMBED, ax.HEADS, None), pdt)

  def init_cache(self, batch: int, length: int) -> attn_lib.KVCache:
    h, k, _, _ = self.dims
    return attn_lib.init_cache(batch, length, h, k, self.dtype)

  def _selection_logits(self, qk_BLD: jax.Array, w_DHE: nnx.Param) -> jax.Array:
    dt = self.selection_dtype
    # Kept by the "dots" remat policy (a custom-VJP output is not a dot it would keep).
    return checkpoint_name(layers.lowp_einsum("BLD,DHE->BLHE", qk_BLD.astype(dt), w_DHE[...], dt),
                           "router_logits")

  def _groups(self, idx_BLHk: jax.Array) -> jax.Array:
    """Group h * E + expert of every selection, in natural (token, head, choice) order."""
    h, _, e, _ = self.dims
    return (jnp.arange(h, dtype=jnp.int32)[:, None] * e + idx_BLHk).reshape(-1)

  def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array, mask_BLS: jax.Array,
               cache: attn_lib.KVCache | None = None, cache_index: jax.Array | None = None,
               qk_input_BLD: jax.Array | None = None, token_mask_BL: jax.Array | None = None
               ) -> tuple[jax.Array, attn_lib.KVCache | None, Aux]:
    """(y [B, L, D], updated cache or None, {"aux_loss", "entropy_loss"}).

    The entropy loss averages over the real tokens, `token_mask_BL` (default: the queries that
    see a key; with ModelConfig.attention_mask="causal" padding does too, so pass it)."""
    h, k, e, top_k = self.dims
    dt = self.dtype
    b, l, d = x_BLD.shape
    x_BLD = x_BLD.astype(dt)
    qk_BLD = x_BLD if qk_input_BLD is None else qk_input_BLD.astype(dt)
    if token_mask_BL is None:
      token_mask_BL = jnp.any(mask_BLS, axis=-1)  # a real query sees at least itself
    q_BLHK = jnp.einsum("BLD,DHK->BLHK", qk_BLD, self.w_q_DHK[...].astype(dt))
    k_BLHK = jnp.einsum("BLD,DHK->BLHK", qk_BLD, self.w_k_DHK[...].astype(dt))
    inv_freq = layers.rope_frequencies(*self.rope)
    q_BLHK = layers.apply_rope(q_BLHK, positions_BL, inv_freq)
    k_BLHK = layers.apply_rope(k_BLHK, positions_BL, inv_freq)
    q_BLHK = sharding.constrain(q_BLHK, (ax.BATCH, ax.LENGTH, ax.ACT_HEADS, None))
    aux: Aux = {}
    if e == 1:
      v_BLHK = jnp.einsum("BLD,DHK->BLHK", x_BLD, self.w_v_DHK[...].astype(dt))
    else:
      logits_v_BLHE = self._selection_logits(qk_BLD, self.w_sel_v_DHE)
      logits_o_BLHE = self._selection_logits(qk_BLD, self.w_sel_o_DHE)
      idx_v, gate_v = sigma_select(logits_v_BLHE, top_k)
      # Natural rows (token, head, choice): source row = token, output row = (token, head).
      v_TH_K = grouped.grouped_project(
          x_BLD.reshape(b * l, d), self._groups(idx_v), gate_v.reshape(-1),
          self.w_v_HEDK[...].astype(dt).reshape(h * e, d, k), per_src=h * top_k,
          per_out=top_k, backend=self.gmm_backend)
      v_BLHK = checkpoint_name(v_TH_K.reshape(b, l, h, k).astype(dt), "routed_out")
      # MoEUT pools the repeats of a shared layer into one average; here each application gets
      # its own term and aux_scale divides their sum by the repeats (their mean).
      ent = (router_lib.entropy_regularizer(logits_v_BLHE, token_mask_BL) +
             router_lib.entropy_regularizer(logits_o_BLHE, token_mask_BL))
      aux = {"aux_loss": self.aux_scale * ent, "entropy_loss": ent}
    if cache is None:
      keys_BSHK, values_BSHK, new_cache = k_BLHK, v_BLHK, None
    else:
      new_cache = attn_lib.update_cache(cache, k_BLHK, v_BLHK, cache_index)
      keys_BSHK = new_cache["k_BSNK"].astype(dt)
      values_BSHK = new_cache["v_BSNK"].astype(dt)
    impl = self.impl if cache is None else "xla"
    out_BLHK = attn_lib.dot_product_attention(q_BLHK, keys_BSHK, values_BSHK, mask_BLS, impl,
                                              causal=self.causal and cache is None)
    if e == 1:
      gate_BLH = jax.nn.sigmoid(jnp.einsum("BLD,DH->BLH", qk_BLD.astype(jnp.float32),
                                           self.w_gate_DH[...].astype(jnp.float32)))
      out_BLHK = out_BLHK * gate_BLH[..., None].astype(dt)
      y_BLD = jnp.einsum("BLHK,HKD->BLD", out_BLHK, self.w_o_HKD[...].astype(dt))
      return y_BLD, new_cache, aux
    idx_o, gate_o = sigma_select(logits_o_BLHE, top_k)
    # Natural rows (token, head, choice): source row = (token, head), output row = token.
    y_TD = grouped.grouped_project(
        out_BLHK.reshape(b * l * h, k), self._groups(idx_o), gate_o.reshape(-1),
        self.w_o_HEKD[...].astype(dt).reshape(h * e, k, d), per_src=top_k,
        per_out=h * top_k, backend=self.gmm_backend)
    return checkpoint_name(y_TD.reshape(b, l, d).astype(dt), "routed_out"), new_cache, aux

"""Causal / prefix-LM multi-head attention with grouped KV heads, RoPE and a KV cache.

Masks follow t5x's decoder rule: query q sees key k iff both are in the same non-padding segment
and (k <= q, or both lie in the bidirectional prefix). The same rule drives training (keys = the
sequence itself) and cached decoding (keys = cache slots carrying their segment and prefix bits).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from flax import nnx

from openmoe_jax import axes as ax
from openmoe_jax import layers
from openmoe_jax import sharding
from openmoe_jax.config import ModelConfig

KVCache = dict[str, jax.Array]  # {"k_BSNK", "v_BSNK"} per layer


def attention_mask(q_slot_BL: jax.Array, q_seg_BL: jax.Array, q_prefix_BL: jax.Array,
                   k_seg_BS: jax.Array, k_prefix_BS: jax.Array) -> jax.Array:
  """Boolean mask [B, L, S]; keys sit at slots 0..S-1, queries at slots `q_slot_BL`."""
  k_slot_S = jnp.arange(k_seg_BS.shape[1])
  same_BLS = (q_seg_BL[:, :, None] == k_seg_BS[:, None, :]) & (q_seg_BL[:, :, None] != 0)
  causal_BLS = k_slot_S[None, None, :] <= q_slot_BL[:, :, None]
  both_prefix_BLS = (q_prefix_BL[:, :, None] != 0) & (k_prefix_BS[:, None, :] != 0)
  return same_BLS & (causal_BLS | both_prefix_BLS)


def sequence_mask(segment_ids_BL: jax.Array, prefix_BL: jax.Array) -> jax.Array:
  """The training mask of a (packed) sequence attending to itself: [B, L, L]."""
  slot_BL = jnp.broadcast_to(jnp.arange(segment_ids_BL.shape[1]), segment_ids_BL.shape)
  return attention_mask(slot_BL, segment_ids_BL, prefix_BL, segment_ids_BL, prefix_BL)


def dot_product_attention(q_BLHK: jax.Array, k_BSNK: jax.Array, v_BSNK: jax.Array,
                          mask_BLS: jax.Array, impl: str = "xla",
                          causal: bool = False) -> jax.Array:
  """Softmax attention in float32 with H query heads sharing N kv heads (H % N == 0).

  `impl` (ModelConfig.attention_impl): "xla" einsums below; "cudnn" the fused cuDNN kernel
  (GPU only; the boolean mask becomes a constant bias); "pallas" the flash kernel of
  `openmoe_jax.flash_attention`. All give zeros on query rows that see no key. The output is
  named "attention_out" for the "dots" remat policy (kept, not recomputed).
  `causal` promises that mask_BLS is the plain causal mask (ModelConfig.attention_mask =
  "causal"): cuDNN then runs its causal kernel and never reads the mask.
  """
  return checkpoint_name(_attention(q_BLHK, k_BSNK, v_BSNK, mask_BLS, impl, causal),
                         "attention_out")


def _attention(q_BLHK: jax.Array, k_BSNK: jax.Array, v_BSNK: jax.Array, mask_BLS: jax.Array,
               impl: str, causal: bool = False) -> jax.Array:
  if impl == "cudnn" and causal:  # on an H100, ~1.8x the Pallas kernel (docs/performance.md)
    return jax.nn.dot_product_attention(q_BLHK, k_BSNK, v_BSNK, is_causal=True,
                                        implementation="cudnn")
  if impl == "cudnn":
    out_BLHK = jax.nn.dot_product_attention(q_BLHK, k_BSNK, v_BSNK, mask=mask_BLS[:, None],
                                            implementation="cudnn")
    return out_BLHK * jnp.any(mask_BLS, axis=-1)[:, :, None, None].astype(out_BLHK.dtype)
  if impl == "pallas":
    from openmoe_jax import flash_attention  # pylint: disable=import-outside-toplevel
    return flash_attention.flash_attention(q_BLHK, k_BSNK, v_BSNK, mask_BLS)
  if impl != "xla":
    raise ValueError(f"attention impl={impl!r}; expected 'xla', 'cudnn' or 'pallas'")
  b, l, h, k = q_BLHK.shape
  n = k_BSNK.shape[2]
  q_BLNGK = q_BLHK.reshape(b, l, n, h // n, k)
  scores_BNGLS = jnp.einsum("BLNGK,BSNK->BNGLS", q_BLNGK, k_BSNK,
                            preferred_element_type=jnp.float32) * (k ** -0.5)
  scores_BNGLS = jnp.where(mask_BLS[:, None, None], scores_BNGLS, -1e30)
  probs_BNGLS = jax.nn.softmax(scores_BNGLS, axis=-1)
  # Rows with no visible key (padding queries) give zeros, not a uniform average.
  probs_BNGLS = jnp.where(mask_BLS[:, None, None], probs_BNGLS, 0.0)
  out_BLNGK = jnp.einsum("BNGLS,BSNK->BLNGK", probs_BNGLS.astype(v_BSNK.dtype), v_BSNK)
  return out_BLNGK.reshape(b, l, h, k)


def update_cache(cache: KVCache, k_BLNK: jax.Array, v_BLNK: jax.Array,
                 index: jax.Array) -> KVCache:
  """Writes this chunk's keys/values at slots index..index+L-1."""
  start = (0, index, 0, 0)
  return {
      "k_BSNK": jax.lax.dynamic_update_slice(cache["k_BSNK"], k_BLNK.astype(
          cache["k_BSNK"].dtype), start),
      "v_BSNK": jax.lax.dynamic_update_slice(cache["v_BSNK"], v_BLNK.astype(
          cache["v_BSNK"].dtype), start),
  }


def init_cache(batch: int, length: int, n_kv_heads: int, head_dim: int,
               dtype: Any) -> KVCache:
  shape = (batch, length, n_kv_heads, head_dim)
  return {"k_BSNK": jnp.zeros(shape, dtype), "v_BSNK": jnp.zeros(shape, dtype)}


class Attention(nnx.Module):
  """Dense multi-head attention (MHA / GQA) with RoPE on a fraction of each head."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, out_std_scale: float = 1.0):
    d, h, n, k = cfg.d_model, cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
    self.dtype = layers.dtype_of(cfg.dtype)
    self.rope = (k, cfg.rope_fraction, cfg.rope_theta)
    self.impl = cfg.attention_impl
    self.causal = cfg.attention_mask == "causal"
    self.cache_dims = (n, k)
    std = cfg.init_std
    self.w_q_DHK = layers.param(rngs, layers.normal(std), (d, h, k),
                                (ax.EMBED, ax.HEADS, ax.HEAD_DIM), cfg.param_dtype)
    self.w_k_DNK = layers.param(rngs, layers.normal(std), (d, n, k),
                                (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM), cfg.param_dtype)
    self.w_v_DNK = layers.param(rngs, layers.normal(std), (d, n, k),
                                (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM), cfg.param_dtype)
    self.w_o_HKD = layers.param(rngs, layers.normal(std * out_std_scale), (h, k, d),
                                (ax.HEADS, ax.HEAD_DIM, ax.EMBED), cfg.param_dtype)

  def init_cache(self, batch: int, length: int) -> KVCache:
    return init_cache(batch, length, *self.cache_dims, self.dtype)

  def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array, mask_BLS: jax.Array,
               cache: KVCache | None = None, cache_index: jax.Array | None = None,
               qk_input_BLD: jax.Array | None = None, token_mask_BL: jax.Array | None = None
               ) -> tuple[jax.Array, KVCache | None, dict[str, jax.Array]]:
    """Attends x to itself (no cache) or to the cache after writing this chunk into it.

    `qk_input_BLD` (peri-layernorm) feeds Q and K from a normalised input while V reads `x_BLD`.
    `token_mask_BL` (real tokens) is for attentions with routers; dense attention has none.
    """
    del token_mask_BL
    dt = self.dtype
    x_BLD = x_BLD.astype(dt)
    qk_BLD = x_BLD if qk_input_BLD is None else qk_input_BLD.astype(dt)
    q_BLHK = jnp.einsum("BLD,DHK->BLHK", qk_BLD, self.w_q_DHK[...].astype(dt))
    k_BLNK = jnp.einsum("BLD,DNK->BLNK", qk_BLD, self.w_k_DNK[...].astype(dt))
    v_BLNK = jnp.einsum("BLD,DNK->BLNK", x_BLD, self.w_v_DNK[...].astype(dt))
    inv_freq = layers.rope_frequencies(*self.rope)
    q_BLHK = layers.apply_rope(q_BLHK, positions_BL, inv_freq)
    k_BLNK = layers.apply_rope(k_BLNK, positions_BL, inv_freq)
    q_BLHK = sharding.constrain(q_BLHK, (ax.BATCH, ax.LENGTH, ax.ACT_HEADS, None))
    if cache is None:
      keys_BSNK, values_BSNK, new_cache = k_BLNK, v_BLNK, None
    else:
      new_cache = update_cache(cache, k_BLNK, v_BLNK, cache_index)
      keys_BSNK = new_cache["k_BSNK"].astype(dt)
      values_BSNK = new_cache["v_BSNK"].astype(dt)
    # Fused kernels serve training; cached decoding (a few queries) keeps the XLA path.
    impl = self.impl if cache is None else "xla"
    out_BLHK = dot_product_attention(q_BLHK, keys_BSNK, values_BSNK, mask_BLS, impl,
                                     causal=self.causal and cache is None)
    y_BLD = jnp.einsum("BLHK,HKD->BLD", out_BLHK, self.w_o_HKD[...].astype(dt))
    return y_BLD, new_cache, {}

"""Analytical parameter counts (total, active per token, embedding) of a ModelConfig.

Matches the parameters `transformer.Transformer` creates (tests/test_presets.py checks this
against `nnx.eval_shape`); "active" counts one copy of every shared parameter plus the top-k
routed experts of each MoE layer (what one token touches), embeddings included.
"""
from __future__ import annotations

from openmoe_jax import layers
from openmoe_jax.config import ModelConfig


def _mlp(d: int, f: int, activation: str) -> int:
  up = d * f if layers.is_gated(activation) else 0
  return d * layers.gate_width(activation, f) + up + f * d


def _attention(cfg: ModelConfig) -> int:
  if cfg.attention == "switchhead":
    from openmoe_jax import switchhead  # pylint: disable=import-outside-toplevel
    return switchhead.param_count(cfg)
  if cfg.attention != "dense":
    raise NotImplementedError(f"count_params: attention={cfg.attention!r} is not counted yet")
  d, h, n, k = cfg.d_model, cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
  return 2 * d * h * k + 2 * d * n * k


def _block(cfg: ModelConfig, layer: int) -> tuple[int, int]:
  """(total, active) parameters of block `layer`."""
  d = cfg.d_model
  if cfg.attention == "umoe":  # experts shared by attention and FFN; active: attn_k + ffn_k
    from openmoe_jax import umoe  # pylint: disable=import-outside-toplevel
    u = cfg.umoe
    total = umoe.param_count(cfg)
    idle = max(u.num_experts - u.attn_top_k - u.ffn_top_k, 0) * 2 * d * u.d_expert
    if not u.one_head:  # per-expert queries of the experts attention did not pick
      idle += (u.num_experts - u.attn_top_k) * (
          d * u.q_lora_rank + u.q_lora_rank * u.qk_dim if u.q_lora_rank else d * u.qk_dim)
    return total, total - idle
  norm = layers.norm_params(cfg)
  base = 2 * norm + _attention(cfg)  # two norms + attention
  m = cfg.moe
  if m is None or not m.is_moe_layer(layer):
    ffn = _mlp(d, cfg.d_ff, cfg.activation)
    return base + ffn, base + ffn
  f = m.d_expert or cfg.d_ff
  expert = _mlp(d, f, m.activation)
  fixed = d * m.num_experts + (_mlp(d, m.num_shared_experts * f, m.activation)
                               if m.num_shared_experts else 0)
  if cfg.option("moe_extra_mlp") == "sequential":  # OpenMoE's dense MLP after the experts
    fixed += norm + _mlp(d, cfg.d_ff, cfg.activation)
  return base + fixed + m.num_experts * expert, base + fixed + m.top_k * expert


def count_params(cfg: ModelConfig) -> dict[str, int]:
  """{"total", "active", "embedding"}: embedding = input table + untied output head."""
  v, d = cfg.vocab_size, cfg.d_model
  embedding = v * d * (1 if cfg.tie_embeddings else 2)
  unique_layers = cfg.n_shared_groups or cfg.n_layers  # shared groups sit at layers 0..G-1
  total = active = embedding + layers.norm_params(cfg) + (v if cfg.head_bias else 0)
  for layer in range(unique_layers):
    t, a = _block(cfg, layer)
    total, active = total + t, active + a
  return {"total": total, "active": active, "embedding": embedding}

"""Model FLOPs per token of a ModelConfig, for MFU (`openmoe_jax.bench.train_step`).

Model FLOPs per token (training = forward + backward = 3 x forward):
    6 * N_active  +  6 * n_layers * H * K * L_ctx
  - N_active: parameters of every matrix a token goes through, counted once per application.
    Expert weights (a leading expert axis, e.g. [E, D, F]) count k / E of their size (k = experts
    chosen per token), weights of a layer shared by Universal-Transformer repeats count once per
    repeat, the output head counts, the input embedding lookup does not (unless tied, where it
    is the head). Routers count fully; norm scales (vectors) are ignored.
  - attention: QK^T and PV cost 2 * 2 * H * K multiply-adds per (query, key) pair; with a causal
    mask a query sees on average L/2 keys (masked-out half not counted), so the forward costs
    2 * H * K * L per token per layer. Prefix-LM rows see a little more; not counted.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
from flax import nnx

from openmoe_jax import axes as ax
from openmoe_jax import train_step as ts
from openmoe_jax import transformer
from openmoe_jax.config import ModelConfig


def _names(leaf: nnx.Variable) -> tuple[str | None, ...]:
  meta = leaf.get_metadata()
  names = meta.get("out_sharding") or ()
  return tuple(names)


def _expert_top_k(cfg: ModelConfig, path: Sequence[str]) -> int:
  """Experts a token uses in the expert weight at `path` (attention experts vs FFN experts)."""
  if any(p.startswith("attn") for p in path):
    if cfg.switchhead is not None:
      return cfg.switchhead.top_k
    for key in ("att_k", "attn_k", "attention_top_k", "switchhead_k", "att_top_k"):
      if cfg.option(key) is not None:
        return int(cfg.option(key))
    return 2  # SwitchHead / MoEUT default
  if cfg.moe is None:
    raise ValueError(f"expert-shaped parameter {'/'.join(path)} in a model without MoeConfig")
  return cfg.moe.top_k


def _expert_axis(name: str, names: tuple[str | None, ...]) -> int | None:
  """The expert axis of a parameter: its `expert` logical axis, else the `E` of its shape
  suffix (SwitchHead's w_v_HEDK keeps its expert axis replicated, so it has no logical name);
  a leading scan (layers) axis is skipped."""
  if ax.EXPERT in names:
    return names.index(ax.EXPERT)
  suffix = name.rsplit("_", 1)[-1]
  dims = [i for i, n in enumerate(names) if n != ax.LAYERS]  # scan stacks a leading layer axis
  # An `E` that is the last letter is a router's output (w_sel_v_DHE), not an expert axis.
  if ("_" in name and suffix.isupper() and len(suffix) == len(dims) and "E" in suffix[:-1]):
    return dims[suffix.index("E")]
  return None


def active_params_per_token(cfg: ModelConfig) -> float:
  """N_active of the module docstring, from the abstract model (no allocation)."""
  model = nnx.eval_shape(lambda: ts.build_model(cfg, 0))
  params = nnx.state(model, nnx.Param)
  plan = transformer.segment_plan(cfg)
  total = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    keys = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
    shape = tuple(leaf.get_value().shape)
    names = _names(leaf)
    if len(names) != len(shape):
      names = (None,) * len(shape)
    dims = [d for d, n in zip(shape, names) if n != ax.LAYERS]
    if len(dims) < 2:
      continue  # norm scales, biases
    if "embed" in keys and not cfg.tie_embeddings:
      continue  # an embedding lookup is a gather, not a matmul
    size = float(math.prod(shape))
    e_axis = _expert_axis(keys[-1], names)
    if e_axis is not None and len(dims) >= 3:  # [E, D, F]-like; a router [D, E] is dense
      size *= _expert_top_k(cfg, keys) / shape[e_axis]
    if "segments" in keys:
      seg = int(keys[keys.index("segments") + 1])
      _, _, repeats, shared = plan[seg]
      if shared:
        size *= repeats
    total += size
  return total


def model_flops_per_token(cfg: ModelConfig, seq: int) -> tuple[float, float, float]:
  """(total, 6 * N_active, attention) training FLOPs per token; formula in the docstring."""
  n_active = active_params_per_token(cfg)
  dense = 6.0 * n_active
  attn = 6.0 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * seq
  return dense + attn, dense, attn

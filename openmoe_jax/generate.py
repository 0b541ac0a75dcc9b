"""Autoregressive generation with a KV cache: prefix-LM prompts, batched, sampled or greedy.

A prompt becomes [BOS=0, prompt...] (the seqio decoder convention: inputs are shifted right) and,
with `prefix_lm`, attends bidirectionally over itself, exactly as the UL2 prefix-LM was trained.
Prompts of different lengths are left-padded with segment id 0, so padding is never attended.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from openmoe_jax import transformer


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen."""
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # keep the k most likely tokens; 0 = all
  top_p: float = 1.0  # nucleus sampling mass; 1 = all
  max_new_tokens: int = 32  # tokens generated after the prompt
  stop_tokens: tuple[int, ...] = ()  # generation of a row ends after one of these
  prefix_lm: bool = True  # bidirectional attention over the prompt

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature}; expected >= 0")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k}; expected >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p}; expected (0, 1]")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens}; expected >= 1")


def init_cache(model: transformer.Transformer, batch: int, length: int) -> dict[str, Any]:
  """An empty cache for `length` slots: per segment, per block, stacked over repeats."""
  layers = []
  for segment in model.segments:
    per_block = []
    for block in segment.unit.blocks:
      one = block.attn.init_cache(batch, length)
      per_block.append(jax.tree.map(
          lambda a, r=segment.repeats: jnp.broadcast_to(a, (r, *a.shape)), one))
    layers.append(per_block)
  return {"layers": layers, "seg_BS": jnp.zeros((batch, length), jnp.int32),
          "prefix_BS": jnp.zeros((batch, length), jnp.int32), "index": jnp.zeros((), jnp.int32),
          "next_pos_B": jnp.zeros((batch,), jnp.int32)}


def sample_logits(logits_BV: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Greedy, or temperature sampling restricted by top-k and top-p."""
  if cfg.temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / cfg.temperature
  if cfg.top_k:
    kth_B1 = jax.lax.top_k(logits_BV, cfg.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if cfg.top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # The smallest logit still inside the nucleus (always keep the top token).
    cutoff_idx_B1 = jnp.sum(cum_BV < cfg.top_p, axis=-1, keepdims=True)
    cutoff_B1 = jnp.take_along_axis(sorted_BV, cutoff_idx_B1, axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def pad_prompts(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads [BOS] + prompt; returns (tokens [B, L], segment ids [B, L])."""
  if not prompts:
    raise ValueError("no prompts given")
  rows = [[0, *p] for p in prompts]
  length = max(len(r) for r in rows)
  tokens = np.zeros((len(rows), length), np.int32)
  seg = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    tokens[i, length - len(r):] = r
    seg[i, length - len(r):] = 1
  return tokens, seg


def _generate(graphdef: Any, params: Any, tokens_BL: jax.Array, seg_BL: jax.Array,
              rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
  model = nnx.merge(graphdef, params)
  b, l = tokens_BL.shape
  cache = init_cache(model, b, l + cfg.max_new_tokens)
  prefix_BL = seg_BL if cfg.prefix_lm else jnp.zeros_like(seg_BL)
  logits_BLV, _, cache = model(tokens_BL, segment_ids_BL=seg_BL, prefix_BL=prefix_BL,
                               cache=cache)
  stops = jnp.asarray(cfg.stop_tokens or (-1,), jnp.int32)

  def step(i, carry):
    cache, last_logits_BV, done_B, out_BT = carry
    token_B = sample_logits(last_logits_BV, jax.random.fold_in(rng, i), cfg)
    token_B = jnp.where(done_B, 0, token_B)
    out_BT = out_BT.at[:, i].set(token_B)
    done_B = done_B | jnp.isin(token_B, stops)
    ones_B1 = jnp.ones((b, 1), jnp.int32)
    logits_B1V, _, cache = model(token_B[:, None], segment_ids_BL=ones_B1,
                                 prefix_BL=jnp.zeros_like(ones_B1), cache=cache)
    return cache, logits_B1V[:, -1], done_B, out_BT

  init = (cache, logits_BLV[:, -1], jnp.zeros((b,), bool),
          jnp.zeros((b, cfg.max_new_tokens), jnp.int32))
  return jax.lax.fori_loop(0, cfg.max_new_tokens, step, init)[3]


_generate_jit = jax.jit(_generate, static_argnames=("graphdef", "cfg"))


def generate(graphdef: Any, params: Any, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
             rng: jax.Array | None = None) -> list[list[int]]:
  """New tokens per prompt (stop token included, nothing after it)."""
  tokens_BL, seg_BL = pad_prompts(prompts)
  model_cfg = nnx.merge(graphdef, params).cfg
  if tokens_BL.shape[1] + cfg.max_new_tokens > model_cfg.max_seq_len:
    raise ValueError(f"[BOS] + the longest prompt ({tokens_BL.shape[1]} tokens) + "
                     f"max_new_tokens={cfg.max_new_tokens} exceed the model's "
                     f"ModelConfig.max_seq_len={model_cfg.max_seq_len}")
  if cfg.top_k > model_cfg.vocab_size:
    raise ValueError(f"top_k={cfg.top_k}; expected <= the vocabulary size "
                     f"{model_cfg.vocab_size} (or 0 = all)")
  rng = jax.random.PRNGKey(0) if rng is None else rng
  out_BT = np.asarray(_generate_jit(graphdef, params, jnp.asarray(tokens_BL),
                                    jnp.asarray(seg_BL), rng, cfg))
  results = []
  for row in out_BT.tolist():
    cut = next((i + 1 for i, t in enumerate(row) if t in cfg.stop_tokens), len(row))
    results.append(row[:cut])
  return results

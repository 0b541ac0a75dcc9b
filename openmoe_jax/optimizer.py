"""Optimisers (AdamW, Adafactor) and learning-rate schedules, from OptimConfig."""
from __future__ import annotations

import jax
import optax
from flax import nnx

from openmoe_jax import axes as ax
from openmoe_jax.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine to min_lr_ratio, rsqrt decay, or constant."""
  peak, warm = cfg.learning_rate, cfg.warmup_steps
  if cfg.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif cfg.schedule == "cosine":
    decay = max((cfg.decay_steps or total_steps) - warm, 1)
    after = optax.cosine_decay_schedule(peak, decay, alpha=cfg.min_lr_ratio)
  else:  # rsqrt: peak * sqrt(warmup / step) after warmup (T5 / OpenMoE style)
    base = max(warm, 1)
    after = lambda step: peak * jax.lax.rsqrt((step + base) / base)  # noqa: E731
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def _is_matrix(leaf) -> bool:
  """Two or more dimensions besides the stacked-layer axis that scanned / shared layer groups
  add: a norm scale or bias stacked over layers ([R, D]) is still a vector."""
  if isinstance(leaf, nnx.Variable):
    names = leaf.get_metadata().get("out_sharding") or ()
    ndim = leaf.get_value().ndim
    if len(names) == ndim:
      return sum(name != ax.LAYERS for name in names) >= 2
    return ndim >= 2
  return leaf.ndim >= 2


def _decay_mask(params: nnx.State) -> nnx.State:
  """Weight decay on matrices only (not on norm scales or biases)."""
  return jax.tree.map(
      lambda leaf: leaf.replace(_is_matrix(leaf)) if isinstance(leaf, nnx.Variable)
      else _is_matrix(leaf), params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  lr = schedule(cfg, total_steps)
  if cfg.name == "adamw":
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mask=_decay_mask)
  else:
    # Adafactor's factored second moments (decay exponent 0.8, T5X's; not Adam's beta2), with
    # momentum b1 (0 = none), no update clipping and no parameter-scale steps. The decay is
    # added before the learning rate, as in AdamW: optax.adafactor adds it after, so its
    # weight_decay_rate=0.1 took 10% of every matrix per step whatever the learning rate.
    parts = [optax.scale_by_factored_rms(decay_rate=0.8)]
    if cfg.b1:
      parts.append(optax.ema(cfg.b1, debias=False))
    if cfg.weight_decay:
      parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask))
    opt = optax.chain(*parts, optax.scale_by_learning_rate(lr))
  if cfg.clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
  return opt

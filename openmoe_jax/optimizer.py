"""Optimisers (AdamW, Adafactor) and learning-rate schedules, from OptimConfig."""
from __future__ import annotations

import jax
import optax
from flax import nnx

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


def _decay_mask(params: nnx.State) -> nnx.State:
  """Weight decay on matrices only (not norm scales)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  lr = schedule(cfg, total_steps)
  if cfg.name == "adamw":
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mask=_decay_mask)
  else:  # Adafactor with factored second moments, as OpenMoE / T5X trained
    # decay_rate is Adafactor's second-moment exponent (0.8 in T5X), not Adam's beta2.
    opt = optax.adafactor(lr, decay_rate=0.8, momentum=cfg.b1 or None,
                          multiply_by_parameter_scale=False, clipping_threshold=None,
                          weight_decay_rate=cfg.weight_decay or None,
                          weight_decay_mask=_decay_mask)
  if cfg.clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
  return opt

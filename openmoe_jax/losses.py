"""Token cross-entropy with loss weights, output z-loss and accuracy (all in float32)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array,
                  z_loss: float = 0.0) -> dict[str, jax.Array]:
  """Weighted sums (not means) so that micro-batches and hosts can be added before dividing.

  Returns {"loss_sum", "z_loss_sum", "correct_sum", "weight_sum"} as float32 scalars.
  Logits may be bfloat16 (ModelConfig.logits_dtype): every reduction upcasts on the fly, so
  no float32 copy of the [B, L, V] logits is written.
  """
  weights_BL = weights_BL.astype(jnp.float32)
  max_BL = jax.lax.stop_gradient(jnp.max(logits_BLV, axis=-1).astype(jnp.float32))
  shifted_BLV = logits_BLV.astype(jnp.float32) - max_BL[..., None]
  log_z_BL = max_BL + jnp.log(jnp.sum(jnp.exp(shifted_BLV), axis=-1))
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None],
                                        axis=-1)[..., 0].astype(jnp.float32)
  nll_BL = log_z_BL - target_logit_BL
  correct_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
  return {
      "loss_sum": jnp.sum(nll_BL * weights_BL),
      "z_loss_sum": z_loss * jnp.sum(jnp.square(log_z_BL) * weights_BL),
      "correct_sum": jnp.sum(correct_BL * weights_BL),
      "weight_sum": jnp.sum(weights_BL),
  }


def summarize(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Means from weighted sums: loss, perplexity and token accuracy."""
  denom = jnp.maximum(sums["weight_sum"], 1.0)
  loss = sums["loss_sum"] / denom
  return {"loss": loss, "perplexity": jnp.exp(jnp.minimum(loss, 50.0)),
          "accuracy": sums["correct_sum"] / denom, "tokens": sums["weight_sum"]}

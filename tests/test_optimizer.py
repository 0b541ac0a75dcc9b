"""Optimisers: decoupled weight decay scales with the learning rate (AdamW and Adafactor alike)
and reaches matrices only, not the norm scales that scanned layer groups stack to [R, D]."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from openmoe_jax import optimizer, presets, train_step as ts
from openmoe_jax.config import OptimConfig


def _apply(params, updates):
  return jax.tree.map(lambda p, u: p + u, params, updates)


def _params():
  cfg = dataclasses.replace(presets.get("tiny-openmoe"), vocab_size=64, norm_type="layer")
  return nnx.split(ts.build_model(cfg, 0), nnx.Param)[1]


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_zero_gradients_only_decay_matrices_by_lr_times_rate(name):
  cfg = OptimConfig(name=name, learning_rate=1e-2, warmup_steps=3, weight_decay=0.1,
                    schedule="constant")
  tx, lr = optimizer.make(cfg, 10), optimizer.schedule(cfg, 10)
  params = _params()
  state = tx.init(params)
  new = params
  for _ in range(6):
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, new), state, new)
    new = _apply(new, updates)
  shrink = np.prod([1.0 - float(lr(i)) * cfg.weight_decay for i in range(6)])
  flat_old = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  flat_new = dict(jax.tree_util.tree_flatten_with_path(new)[0])
  kinds = set()
  for path, old in flat_old.items():
    name_ = jax.tree_util.keystr(path)
    got = np.asarray(flat_new[path])
    if "norm" in name_:  # [R, D] scales and biases of the stacked blocks, and the final norm
      kinds.add("norm")
      np.testing.assert_array_equal(got, np.asarray(old), err_msg=name_)
    else:
      kinds.add("matrix")
      np.testing.assert_allclose(got, np.asarray(old) * shrink, rtol=1e-5, err_msg=name_)
  assert kinds == {"norm", "matrix"} and 0.99 < shrink < 1.0

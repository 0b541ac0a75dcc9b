"""MoEUT state dict import: safetensors reading, sigma-MoE mapping onto our MoeFFN (same function),
and a clear refusal (no output) for the forward differences our model cannot express yet."""
import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from openmoe_jax import moe
from openmoe_jax.config import ModelConfig, MoeConfig
from openmoe_jax.convert import moeut

V, D, H, K, E, F, TOPK, G = 64, 16, 2, 8, 6, 8, 2, 2
CFG = ModelConfig(vocab_size=V, d_model=D, n_layers=4, n_heads=H, head_dim=K, d_ff=F,
                  dtype="float32", activation="relu", n_shared_groups=G, norm_scheme="peri",
                  moe=MoeConfig(num_experts=E, top_k=TOPK, d_expert=F, router="sigma",
                                activation="relu", capacity_factor_eval=0.0, load_balance_weight=0.0))


def _state(rng):
  s = {"embedding.weight": rng.normal(size=(V, D)), "lm_head.weight": rng.normal(size=(V, D)),
       "lm_head.bias": np.zeros(V), "out_norm.weight": np.ones(D), "out_norm.bias": np.zeros(D)}
  for g in range(G):
    p = f"transformer.layers.{g}."
    s.update({p + "ln1.weight": np.ones(D), p + "ln1.bias": np.zeros(D),
              p + "ffn.keys": rng.normal(size=(E, D, F)), p + "ffn.values": rng.normal(size=(E, F, D)),
              p + "ffn.expert_sel": rng.normal(size=(E, D)),
              p + "attention.q.weight": rng.normal(size=(H * K, D))})
  return {k: np.asarray(v, np.float32) for k, v in s.items()}


def test_sigma_moe_maps_onto_moe_ffn(tmp_path):
  state = _state(np.random.default_rng(0))
  path = str(tmp_path / "moeut.safetensors")
  save_file(state, path)
  read = moeut.read_state_dict(path)
  assert read.keys() == state.keys() and moeut.group_size(read) == G
  ffn = moe.MoeFFN(CFG, nnx.Rngs(0))
  for name, value in moeut.ffn_params(read, 1).items():
    getattr(ffn, name)[...] = jnp.asarray(value)
  x = np.random.default_rng(1).normal(size=(1, 5, D)).astype(np.float32)
  ours, _ = ffn(jnp.asarray(x))
  # MoEUT SigmaMoE.forward: sigmoid scores, top-k (no renormalisation), relu(x @ keys) @ values
  p = "transformer.layers.1.ffn."
  sel = 1 / (1 + np.exp(-(x @ state[p + "expert_sel"].T)))
  want = np.zeros_like(x)
  for t in range(5):
    for e in np.argsort(-sel[0, t])[:TOPK]:
      want[0, t] += sel[0, t, e] * (np.maximum(x[0, t] @ state[p + "keys"][e], 0)
                                    @ state[p + "values"][e])
  np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-4, atol=1e-4)


def test_convert_refuses_forward_differences_and_bad_shapes(tmp_path):
  state = _state(np.random.default_rng(0))
  path = str(tmp_path / "moeut.safetensors")
  save_file(state, path)
  with pytest.raises(NotImplementedError, match="LayerNorm"):
    moeut.convert(path, str(tmp_path / "work"), CFG)
  wrong = dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, num_experts=E + 1))
  with pytest.raises(ValueError, match=r"ffn.keys' has shape \(6, 16, 8\).*\(7, 16, 8\)"):
    moeut.convert(path, str(tmp_path / "work"), wrong)
  assert not os.path.exists(tmp_path / "work")

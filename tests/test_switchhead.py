"""SwitchHead attention against a float64 NumPy reference (expert V by source token, expert O by
destination token, sigma-MoE gates), its single-expert gated form, peri-LN wiring, gradients,
the entropy regulariser, RoPE on an odd rotated half-dimension (MoEUT-44M) and MoEUT's init."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from openmoe_jax import attention as attn_lib
from openmoe_jax import layers, router, switchhead, transformer
from openmoe_jax.config import ModelConfig, MoeConfig, SwitchHeadConfig

CFG = ModelConfig(vocab_size=50, d_model=24, n_layers=4, n_heads=3, head_dim=10, d_ff=32,
                  dtype="float32", attention="switchhead", rope_fraction=0.5,
                  switchhead=SwitchHeadConfig(num_experts=5, top_k=2), n_shared_groups=2,
                  norm_scheme="peri")


def _rope_ref(x, pos, head_dim, fraction, theta=10000.0):
  """MoEUT's RotaryPosEncoding on the first n_rotate dims: x * cos + rotate_half(x) * sin."""
  r = int(fraction * head_dim)
  r -= r % 2
  inv = 1.0 / theta ** (np.arange(0, r, 2) / r)
  ang = pos[..., None].astype(np.float64) * inv
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
  cos, sin = cos[:, :, None], sin[:, :, None]
  xr = x[..., :r]
  rot = np.concatenate([-xr[..., r // 2:], xr[..., :r // 2]], -1)
  return np.concatenate([xr * cos + rot * sin, x[..., r:]], -1)


def _sigma_topk(logits, k):
  sig = 1.0 / (1.0 + np.exp(-logits))
  idx = np.argsort(-sig, axis=-1)[..., :k]
  return idx, np.take_along_axis(sig, idx, -1)


def _reference(m, cfg, x, qk, pos, mask):
  p = {str(k): np.asarray(v[...], np.float64) for k, v in nnx.state(m, nnx.Param).items()}
  h, kd, e, top = cfg.n_heads, cfg.resolved_head_dim, cfg.switchhead.num_experts, \
      cfg.switchhead.top_k
  x, qk = x.astype(np.float64), qk.astype(np.float64)
  q = _rope_ref(np.einsum("bld,dhk->blhk", qk, p["w_q_DHK"]), pos, kd, cfg.rope_fraction)
  k = _rope_ref(np.einsum("bld,dhk->blhk", qk, p["w_k_DHK"]), pos, kd, cfg.rope_fraction)
  b, l, _ = x.shape
  if e == 1:
    v = np.einsum("bld,dhk->blhk", x, p["w_v_DHK"])
  else:
    idx, g = _sigma_topk(np.einsum("bld,dhe->blhe", qk, p["w_sel_v_DHE"]), top)
    v = np.zeros((b, l, h, kd))
    for bi, li, hi, j in np.ndindex(b, l, h, top):
      v[bi, li, hi] += g[bi, li, hi, j] * x[bi, li] @ p["w_v_HEDK"][hi, idx[bi, li, hi, j]]
  s = np.einsum("blhk,bshk->bhls", q, k) / math.sqrt(kd)
  s = np.where(mask[:, None], s, -np.inf)
  w = np.exp(s - np.max(np.where(mask[:, None], s, -1e30), -1, keepdims=True))
  w = np.where(mask[:, None], w, 0.0)
  w = w / np.maximum(w.sum(-1, keepdims=True), 1e-30)
  att = np.einsum("bhls,bshk->blhk", w, v)
  if e == 1:
    gate = 1.0 / (1.0 + np.exp(-np.einsum("bld,dh->blh", qk, p["w_gate_DH"])))
    return np.einsum("blhk,hkd->bld", att * gate[..., None], p["w_o_HKD"])
  idx, g = _sigma_topk(np.einsum("bld,dhe->blhe", qk, p["w_sel_o_DHE"]), top)
  y = np.zeros((b, l, cfg.d_model))
  for bi, li, hi, j in np.ndindex(b, l, h, top):
    y[bi, li] += g[bi, li, hi, j] * att[bi, li, hi] @ p["w_o_HEKD"][hi, idx[bi, li, hi, j]]
  return y


def _inputs(seed=0, b=2, l=7, d=24):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, l, d)).astype(np.float32)
  qk = rng.normal(size=(b, l, d)).astype(np.float32)
  seg = np.ones((b, l), np.int32)
  seg[-1, :2] = 0  # left padding
  prefix = np.zeros((b, l), np.int32)
  prefix[:, :4] = seg[:, :4]
  pos = np.maximum(np.cumsum(seg, 1) - 1, 0).astype(np.int32)
  mask = np.asarray(attn_lib.sequence_mask(jnp.asarray(seg), jnp.asarray(prefix)))
  return x, qk, pos, mask


@pytest.mark.parametrize("experts", [5, 1])
def test_forward_matches_float64_reference(experts):
  cfg = dataclasses.replace(CFG, switchhead=SwitchHeadConfig(num_experts=experts,
                                                             top_k=min(2, experts)))
  m = switchhead.SwitchHeadAttention(cfg, nnx.Rngs(1), out_std_scale=0.5)
  x, qk, pos, mask = _inputs()
  y, cache, aux = nnx.jit(lambda mod, *a: mod(*a, qk_input_BLD=qk))(
      m, jnp.asarray(x), jnp.asarray(pos), jnp.asarray(mask))
  assert cache is None and (("aux_loss" in aux) == (experts > 1))
  np.testing.assert_allclose(np.asarray(y), _reference(m, cfg, x, qk, pos, mask), atol=2e-5,
                             rtol=1e-4)


def test_values_read_the_raw_stream_and_selections_the_normalised_one():
  """Peri-LN: with the selection/QK input fixed, the output is linear in the V input."""
  m = switchhead.SwitchHeadAttention(CFG, nnx.Rngs(2))
  x, qk, pos, mask = _inputs(1)
  f = lambda xx: np.asarray(m(jnp.asarray(xx), jnp.asarray(pos), jnp.asarray(mask),
                              qk_input_BLD=jnp.asarray(qk))[0])
  np.testing.assert_allclose(f(3.0 * x), 3.0 * f(x), atol=1e-5, rtol=1e-4)
  assert not np.allclose(f(x), np.asarray(m(jnp.asarray(x), jnp.asarray(pos), jnp.asarray(mask),
                                            qk_input_BLD=jnp.asarray(2.0 * qk))[0]))


def test_unselected_experts_get_zero_gradient():
  cfg = dataclasses.replace(CFG, switchhead=SwitchHeadConfig(num_experts=8, top_k=1,
                                                             entropy_weight=0.0))
  m = switchhead.SwitchHeadAttention(cfg, nnx.Rngs(3))
  x, qk, pos, mask = _inputs(2, b=1, l=5)  # tokens 0, 1 are padding: never attended

  def loss(mod):
    return jnp.sum(mod(jnp.asarray(x), jnp.asarray(pos), jnp.asarray(mask),
                       qk_input_BLD=jnp.asarray(qk))[0] ** 2)
  grads = nnx.jit(nnx.grad(loss))(m)
  p = {str(k): np.asarray(v[...]) for k, v in nnx.state(m, nnx.Param).items()}
  idx_v, _ = _sigma_topk(np.einsum("bld,dhe->blhe", qk, p["w_sel_v_DHE"]), 1)
  g_v = np.asarray(grads["w_v_HEDK"][...])
  used = np.zeros((cfg.n_heads, 8), bool)
  for li, hi in np.ndindex(5, cfg.n_heads):
    used[hi, idx_v[0, li, hi, 0]] |= li >= 2
  norms = np.abs(g_v).sum(axis=(2, 3))
  assert np.all(norms[~used] == 0) and np.all(norms[used] > 0)


def test_entropy_regulariser_and_its_aux_loss():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 3, 4))
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  want = []
  for b in range(2):
    mean = p[b][mask[b] == 1].mean(0)  # [H, E]
    want.append(np.mean(np.log(4) + np.sum(mean * np.log(mean), -1)))
  got = router.entropy_regularizer(jnp.asarray(logits), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), np.mean(want), rtol=1e-5)
  assert abs(float(router.entropy_regularizer(jnp.zeros((1, 3, 2, 4)), jnp.ones((1, 3))))) < 1e-6
  # In a model: weight / repeats * (H_v + H_o) per block, and the same for a sigma-MoE FFN's
  # entropy (MoEUT: one term per shared module, its repeats pooled), summed by total_aux_loss.
  moe = MoeConfig(num_experts=6, top_k=2, d_expert=8, router="sigma", dropless=True,
                  dispatch="gmm", load_balance_weight=0.0, z_loss_weight=0.0,
                  entropy_weight=0.01)
  cfg = dataclasses.replace(CFG, moe=moe)
  model = transformer.Transformer(cfg, nnx.Rngs(0))
  _, aux, _ = model(jnp.asarray(rng.integers(1, 50, (2, 6))))
  blocks = aux["segment0"]
  repeats = cfg.n_layers // cfg.n_shared_groups
  want = sum(cfg.switchhead.entropy_weight / repeats * float(jnp.sum(b["attn_entropy_loss"])) +
             moe.entropy_weight / repeats * float(jnp.sum(b["entropy_loss"]))
             for b in blocks.values())
  assert all(float(jnp.min(b["entropy_loss"])) > 0 for b in blocks.values())
  np.testing.assert_allclose(float(transformer.total_aux_loss(aux)), want, rtol=1e-5)


def test_rope_odd_rotated_half_dimension_moeut_44m():
  """head_dim 82, fraction 0.5: 41 dims would have to be rotated; 40 are (pairs), 42.. pass."""
  inv = layers.rope_frequencies(82, 0.5, 10000.0)
  assert inv.shape == (20,)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 6, 2, 82)).astype(np.float32)
  pos = np.array([[0, 1, 2, 5, 9, 40]], np.int32)
  y = np.asarray(layers.apply_rope(jnp.asarray(x), jnp.asarray(pos), inv))
  np.testing.assert_allclose(y, _rope_ref(x.astype(np.float64), pos, 82, 0.5), atol=1e-4)
  np.testing.assert_array_equal(y[..., 40:], x[..., 40:])
  # Relative positions: <R(p) q, R(p') k> depends on p - p' only.
  q, k = rng.normal(size=(1, 1, 1, 82)), rng.normal(size=(1, 1, 1, 82))

  def dot(pq, pk):
    rq = layers.apply_rope(jnp.asarray(q, jnp.float32), jnp.asarray([[pq]]), inv)
    rk = layers.apply_rope(jnp.asarray(k, jnp.float32), jnp.asarray([[pk]]), inv)
    return float(jnp.sum(rq * rk))
  assert abs(dot(7, 3) - dot(14, 10)) < 1e-3 and abs(dot(7, 3) - dot(3, 7)) > 1e-3


def test_moeut_init_scales_and_param_count():
  cfg = ModelConfig(vocab_size=300, d_model=256, n_layers=8, n_heads=4, head_dim=64, d_ff=32,
                    dtype="float32", attention="switchhead",
                    switchhead=SwitchHeadConfig(num_experts=4), n_shared_groups=2,
                    norm_scheme="peri", init_scheme="moeut", head_bias=True,
                    moe=MoeConfig(num_experts=16, top_k=2, d_expert=32, router="sigma",
                                  dropless=True, dispatch="ragged", activation="relu"))
  model = transformer.Transformer(cfg, nnx.Rngs(0))
  scale = math.sqrt(2 / 8)
  block = model.segments[0].unit.blocks[0]
  checks = {"q": (block.attn.w_q_DHK, scale / 16), "v": (block.attn.w_v_HEDK, scale / 16),
            "o": (block.attn.w_o_HEKD, scale / 16), "ffn keys": (block.ffn.w_gate_EDF, scale / 16),
            "ffn values": (block.ffn.w_out_EFD, scale / math.sqrt(16 * 32)),
            "embedding": (model.embed.embedding_VD, 1 / 16)}
  for name, (w, want) in checks.items():
    assert abs(float(jnp.std(w[...])) / want - 1) < 0.05, name
  # Router: every expert's selection vector has one norm (renorm_keep_std), std kept.
  router = np.asarray(block.ffn.w_router_DE[...])
  norms = np.linalg.norm(router, axis=-2)  # [repeats, E]
  np.testing.assert_allclose(norms, norms.flat[0], rtol=1e-5)
  assert abs(router.std() / (scale / 16) - 1) < 0.1
  # Head: never reset in MoEUT, so torch's nn.Linear default U(+-1/sqrt(d)) (std 1/sqrt(3d)).
  head = np.asarray(model.head_DV[...])
  assert np.abs(head).max() <= 1 / 16 and abs(head.std() * math.sqrt(3 * 256) - 1) < 0.05
  bias = np.asarray(model.head_bias_V[...])
  assert np.abs(bias).max() <= 1 / 16 and abs(bias.std() * math.sqrt(3 * 256) - 1) < 0.2
  from openmoe_jax import params  # pylint: disable=import-outside-toplevel
  built = sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert params.count_params(cfg)["total"] == built
  one = dataclasses.replace(cfg, switchhead=SwitchHeadConfig(num_experts=1, top_k=1))
  shapes = nnx.eval_shape(lambda: transformer.Transformer(one, nnx.Rngs(0)))
  built = sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(shapes, nnx.Param)))
  assert params.count_params(one)["total"] == built


def test_config_errors():
  with pytest.raises(ValueError, match="needs ModelConfig.switchhead"):
    dataclasses.replace(CFG, switchhead=None)
  with pytest.raises(ValueError, match="top_k=3"):
    SwitchHeadConfig(num_experts=2, top_k=3)
  with pytest.raises(ValueError, match="n_kv_heads"):
    switchhead.SwitchHeadAttention(dataclasses.replace(CFG, n_kv_heads=1), nnx.Rngs(0))

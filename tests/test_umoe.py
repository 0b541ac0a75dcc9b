"""UMoE blocks against a float64 NumPy reference (pre-mixing attention through the shared experts,
then the FFN through the same experts), the one-head variant, the balance loss, layer sharing
(share_layer_repeat_num) and parameter counts."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from openmoe_jax import attention as attn_lib
from openmoe_jax import params, transformer, umoe
from openmoe_jax.config import ModelConfig, UmoeConfig

UCFG = UmoeConfig(num_experts=6, d_expert=12, attn_top_k=2, ffn_top_k=3, qk_dim=8,
                  q_lora_rank=3)
CFG = ModelConfig(vocab_size=40, d_model=16, n_layers=4, n_heads=2, d_ff=32, dtype="float32",
                  attention="umoe", umoe=UCFG, init_std=0.2)


def _np(p):
  return np.asarray(p[...], np.float64)


def _rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _rope(x, pos, theta=10000.0):  # full rotation, rotate-half form
  r = x.shape[-1]
  ang = pos[..., None] * (1.0 / theta ** (np.arange(0, r, 2) / r))
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
  rot = np.concatenate([-x[..., r // 2:], x[..., :r // 2]], -1)
  return x * cos[:, :, None] + rot * sin[:, :, None]


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _topk_softmax(logits, k):
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  idx = np.argsort(-p, -1)[..., :k]
  return idx, np.take_along_axis(p, idx, -1)


def _reference(block, u, x, pos, mask, eps):
  ex, at = block.experts, block.attn
  w1, w2 = _np(ex.w_in_EDF), _np(ex.w_out_EFD)
  ffn = lambda v, e: _silu(v @ w1[e]) @ w2[e]
  shared = lambda v, pair: _silu(v @ _np(pair[0])) @ _np(pair[1])
  b, l, _ = x.shape
  h = _rms(x, _np(block.attn_norm.scale), eps)
  idx, g = _topk_softmax(h @ _np(at.w_router_DE), u.attn_top_k)
  if u.one_head:
    q = (h @ _np(at.w_q_DQ))[:, :, None]
  else:
    q = np.zeros((b, l, u.attn_top_k, u.qk_dim))
    for bi, li, j in np.ndindex(b, l, u.attn_top_k):
      e = idx[bi, li, j]
      q[bi, li, j] = (h[bi, li] @ _np(at.w_qa_EDR)[e] @ _np(at.w_qb_ERQ)[e] if u.q_lora_rank
                      else h[bi, li] @ _np(at.w_q_EDQ)[e])
      if u.q_lora_rank and u.res_query:
        q[bi, li, j] += h[bi, li] @ _np(at.w_qres_DQ)
    if u.num_shared_experts:
      q = np.concatenate([(h @ _np(at.w_qshared_DQ))[:, :, None], q], 2)
  q, k = _rope(q, pos), _rope((h @ _np(at.w_k_DQ))[:, :, None], pos)[:, :, 0]
  s = np.einsum("blhq,bsq->bhls", q, k) / math.sqrt(u.qk_dim)
  s = np.where(mask[:, None], s, -1e30)
  w = np.where(mask[:, None], np.exp(s - s.max(-1, keepdims=True)), 0.0)
  mix = np.einsum("bhls,bsd->blhd", w / np.maximum(w.sum(-1, keepdims=True), 1e-30), h)
  a = np.zeros_like(x)
  n_sh = 1 if (u.num_shared_experts and not u.one_head) else 0
  for bi, li, j in np.ndindex(b, l, u.attn_top_k):
    a[bi, li] += g[bi, li, j] * ffn(mix[bi, li, 0 if u.one_head else n_sh + j], idx[bi, li, j])
  if u.num_shared_experts:
    a += shared(mix[:, :, 0], ex.shared_attn)
  x = x + a
  h = _rms(x, _np(block.ffn_norm.scale), eps)
  router = block.w_router_ffn_DE if u.separate_ffn_router else at.w_router_DE
  idx, g = _topk_softmax(h @ _np(router), u.ffn_top_k)
  f = np.zeros_like(x)
  for bi, li, j in np.ndindex(b, l, u.ffn_top_k):
    f[bi, li] += g[bi, li, j] * ffn(h[bi, li], idx[bi, li, j])
  if u.num_shared_experts:
    f += shared(h, ex.shared_ffn if u.separate_ffn_shared else ex.shared_attn)
  return x + f


VARIANTS = {
    "lowrank-res-shared": UCFG,
    "fullrank-noshared-onerouter": dataclasses.replace(UCFG, q_lora_rank=0, num_shared_experts=0,
                                                       separate_ffn_router=False),
    "onehead-sharedffn": dataclasses.replace(UCFG, one_head=True, separate_ffn_shared=False),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_block_matches_float64_reference(name):
  u = VARIANTS[name]
  cfg = dataclasses.replace(CFG, umoe=u)
  block = umoe.UmoeBlock(cfg, nnx.Rngs(0))
  rng = np.random.default_rng(1)
  b, l = 2, 6
  x = rng.normal(size=(b, l, cfg.d_model)).astype(np.float32)
  seg = np.ones((b, l), np.int32)
  seg[1, :2] = 0
  prefix = np.zeros_like(seg)
  prefix[:, :3] = seg[:, :3]
  pos = np.maximum(np.cumsum(seg, 1) - 1, 0).astype(np.int32)
  mask = np.asarray(attn_lib.sequence_mask(jnp.asarray(seg), jnp.asarray(prefix)))
  inputs = transformer.BlockInputs(jnp.asarray(pos), jnp.asarray(mask), jnp.asarray(seg), None,
                                   True, None)
  y, cache, aux = nnx.jit(lambda m, xx: m(xx, inputs, None, None))(block, jnp.asarray(x))
  assert cache is None
  want = _reference(block, u, x.astype(np.float64), pos, mask, cfg.norm_eps)
  real = seg.astype(bool)
  np.testing.assert_allclose(np.asarray(y)[real], want[real], atol=5e-5, rtol=1e-4)
  for key in ("expert_load_E", "attn_expert_load_E"):
    np.testing.assert_allclose(float(jnp.sum(aux[key])), 1.0, rtol=1e-6)
  assert params.count_params(cfg)["total"] - 2 * cfg.vocab_size * cfg.d_model - cfg.d_model \
      == 4 * umoe.param_count(cfg)
  n = sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(block, nnx.Param)))
  assert n == umoe.param_count(cfg)


def test_balance_loss_reference():
  rng = np.random.default_rng(0)
  scores = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 5, 4))), -1)
  idx = jnp.asarray(rng.integers(0, 4, (2, 5, 2)))
  mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
  want = []
  for b in range(2):
    real = mask[b] == 1
    counts = np.bincount(np.asarray(idx[b])[real].ravel(), minlength=4)
    f = counts / (real.sum() * 2 / 4)
    want.append(np.sum(f * np.asarray(scores[b])[real].mean(0)))
  loss, load = umoe.balance_loss(scores, idx, jnp.asarray(mask))
  np.testing.assert_allclose(float(loss), np.mean(want), rtol=1e-5)
  np.testing.assert_allclose(float(jnp.sum(load)), 1.0, rtol=1e-6)
  uniform, _ = umoe.balance_loss(jnp.full((1, 4, 4), 0.25),
                                 jnp.asarray([[[0, 1], [2, 3], [0, 1], [2, 3]]]), jnp.ones((1, 4)))
  np.testing.assert_allclose(float(uniform), 1.0, rtol=1e-6)


def test_share_layer_repeat_num_equals_unshared_model_with_repeated_blocks():
  shared_cfg = umoe.share_layer_config(CFG, 2)
  assert (shared_cfg.n_shared_groups, shared_cfg.share_order) == (2, "aabb")
  shared = transformer.Transformer(shared_cfg, nnx.Rngs(0))
  plain = transformer.Transformer(CFG, nnx.Rngs(1))
  s0, s1 = (nnx.state(seg.unit, nnx.Param) for seg in shared.segments)
  nnx.update(plain.segments[0].unit, jax.tree.map(lambda a, b: jnp.stack([a, a, b, b]), s0, s1))
  for name in ("embed", "final_norm"):
    nnx.update(getattr(plain, name), nnx.state(getattr(shared, name)))
  plain.head_DV[...] = shared.head_DV[...]
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 40, (2, 7)))
  forward = nnx.jit(lambda m, t: m(t)[0])
  np.testing.assert_allclose(np.asarray(forward(shared, tokens)),
                             np.asarray(forward(plain, tokens)), atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="share_layer_repeat_num=3"):
    umoe.share_layer_config(CFG, 3)


def test_config_errors():
  with pytest.raises(ValueError, match="needs ModelConfig.umoe"):
    dataclasses.replace(CFG, umoe=None)
  with pytest.raises(ValueError, match="ffn_top_k=7"):
    dataclasses.replace(UCFG, ffn_top_k=7)
  with pytest.raises(ValueError, match="pre-LN"):
    umoe.UmoeBlock(dataclasses.replace(CFG, norm_scheme="peri"), nnx.Rngs(0))

"""MoeFFN: every dispatch backend equals a slow float64 per-token reference, in forward and
gradient; dropped and padding tokens get nothing from the experts; placement in the model."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from openmoe_jax import moe, router, transformer
from openmoe_jax.config import ModelConfig, MoeConfig

from test_router import reference_routing  # pylint: disable=wrong-import-order

D, F, E = 16, 24, 4


def _has_gmm() -> bool:
  try:
    from openmoe_jax.kernels import gmm as gmm_lib  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return hasattr(gmm_lib, "gmm")


# shard_map (expert parallelism) runs its single-device path here; sharded == unsharded is
# tests/test_sharding.py and tests/test_expert_parallel.py.
BACKENDS = ["einsum", "ragged"] + (["gmm"] if _has_gmm() else []) + ["shard_map"]


def _cfg(dispatch="einsum", **moe_kw):
  kw = dict(num_experts=E, top_k=2, d_expert=F, dispatch=dispatch, gmm_backend="reference",
            capacity_factor_train=1.0, capacity_factor_eval=1.0, z_loss_weight=0.01)
  kw.update(moe_kw)
  if dispatch == "einsum":
    kw["dropless"] = False
  if dispatch == "shard_map" and kw.get("router") != "expert_choice":
    kw["dropless"] = True  # token choice: dropless only (the reference then drops nothing)
  return ModelConfig(vocab_size=32, d_model=D, n_layers=2, n_heads=2, d_ff=32, dtype="float32",
                     moe=MoeConfig(**kw))


def _act(name, gate, up):
  silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
  if name == "swiglu":
    return silu(gate) * up
  if name == "openmoe_swiglu":  # OpenMoE: a 2F-wide gate, first half gated by SiLU of the second
    f = up.shape[-1]
    return gate[..., :f] * silu(gate[..., f:]) * up
  if name == "relu":
    return np.maximum(gate, 0)
  raise NotImplementedError(name)


def reference_moe(m: moe.MoeFFN, x, mask, *, deterministic=True):
  """Per-token float64 loop: sum over processed (expert, weight) of weight * expert(x)."""
  cfg = m.moe
  x = np.asarray(x, np.float64)
  b, l, d = x.shape
  g, s = moe.groups(b * l, l, cfg)
  xg = x.reshape(g, s, d)
  logits = xg @ np.asarray(m.w_router_DE[...], np.float64)
  cf = cfg.capacity_factor_eval if deterministic else cfg.capacity_factor_train
  ec = cfg.router == "expert_choice"
  dropless = (cfg.dropless or cf <= 0) and not ec
  c = router.expert_capacity(s, cfg.num_experts, cfg.top_k, cf, cfg.min_capacity)
  routes = reference_routing(logits, np.asarray(mask).reshape(g, s), top_k=cfg.top_k,
                             capacity=None if dropless else c,
                             gate="sigmoid" if cfg.router == "sigma" else "softmax",
                             renormalize=cfg.renormalize, batch_prioritized=cfg.batch_prioritized,
                             expert_choice=ec)
  wg = np.asarray(m.w_gate_EDF[...], np.float64)
  wu = None if m.w_up_EDF is None else np.asarray(m.w_up_EDF[...], np.float64)
  wo = np.asarray(m.w_out_EFD[...], np.float64)
  y = np.zeros_like(xg)
  for (gi, si), experts in routes.items():
    for e, w in experts.items():
      h = _act(cfg.activation, xg[gi, si] @ wg[e], None if wu is None else xg[gi, si] @ wu[e])
      y[gi, si] += w * (h @ wo[e])
  return y.reshape(b, l, d), routes


def _x_mask(seed=0, b=2, l=12, pad=True):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, l, D)).astype(np.float32)
  mask = (rng.random((b, l)) > 0.2).astype(np.int32) if pad else np.ones((b, l), np.int32)
  return jnp.asarray(x), jnp.asarray(mask)


CASES = {
    "topk_capacity": dict(),
    "topk_tight_bpr_renorm": dict(capacity_factor_eval=0.5, batch_prioritized=True,
                                  renormalize=True),
    "relu_top1": dict(activation="relu", top_k=1, min_capacity=2),
    "dropless": dict(dropless=True),
    "openmoe_swiglu": dict(activation="openmoe_swiglu"),
    "sigma": dict(router="sigma", top_k=2, capacity_factor_eval=0.0, entropy_weight=0.01),
    "expert_choice": dict(router="expert_choice", top_k=1),
    "group_size": dict(group_size=8),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dispatch", BACKENDS)
def test_backend_matches_reference(case, dispatch):
  kw = CASES[case]
  if dispatch == "einsum" and kw.get("dropless"):
    pytest.skip("einsum needs a capacity (config rejects dropless)")
  m = moe.MoeFFN(_cfg(dispatch, **kw), nnx.Rngs(0))
  # Router weights large enough to make routing decisive (no near-ties vs the f64 reference).
  m.w_router_DE[...] = m.w_router_DE[...] * 50
  x, mask = _x_mask()
  y, aux = m(x, token_mask_BL=mask)
  want, routes = reference_moe(m, x, mask)
  np.testing.assert_allclose(np.asarray(y), want, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(y)[np.asarray(mask) == 0], 0.0)  # padding: nothing
  assert set(aux) >= {"aux_loss", "expert_load_E", "dropped_fraction", "router_entropy",
                      "load_balance_loss", "z_loss"}
  assert aux["expert_load_E"].shape == (E,)
  assert abs(float(aux["expert_load_E"].sum()) - 1) < 1e-5
  if kw.get("dropless") or case == "sigma":
    assert float(aux["dropped_fraction"]) == 0.0


def _loss_and_grads(cfg, x, mask, ct):
  m = moe.MoeFFN(cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(m)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params)(x, token_mask_BL=mask)
    return jnp.sum(y * ct) + aux["aux_loss"]

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("case", ["topk_tight_bpr_renorm", "sigma", "expert_choice",
                                  "openmoe_swiglu"])
def test_backends_agree_in_gradient(case):
  x, mask = _x_mask(1)
  ct = jax.random.normal(jax.random.key(3), x.shape)
  results = {d: _loss_and_grads(_cfg(d, **CASES[case]), x, mask, ct) for d in BACKENDS}
  # shard_map is dropless only under token choice: its peer is ragged with dropless=True (itself
  # checked against the float64 reference above), not the capacity-dropping einsum.
  peers = {d: "einsum" for d in BACKENDS[1:]}
  if "shard_map" in results and case != "expert_choice":
    kw = {**CASES[case], "dropless": True}
    results["ragged_dropless"] = _loss_and_grads(_cfg("ragged", **kw), x, mask, ct)
    peers["shard_map"] = "ragged_dropless"
  (_, (gp0, _)) = results["einsum"]
  for d, peer in peers.items():
    (v, (gp, gx)), (v0, (gp_ref, gx0)) = results[d], results[peer]
    np.testing.assert_allclose(float(v), float(v0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(gx0), atol=1e-5)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gp_ref)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert float(jnp.abs(jax.tree.leaves(gp0)[0]).sum()) > 0


def test_dropped_tokens_get_zero_and_shared_expert_adds():
  cfg = _cfg("einsum", top_k=1, capacity_factor_eval=0.25)
  m = moe.MoeFFN(cfg, nnx.Rngs(0))
  x, mask = _x_mask(2, pad=False)
  y, aux = m(x, token_mask_BL=mask)
  _, routes = reference_moe(m, x, mask)
  dropped = [(g, s) for g in range(2) for s in range(12) if (g, s) not in routes]
  assert dropped and float(aux["dropped_fraction"]) > 0
  for g, s in dropped:
    np.testing.assert_allclose(np.asarray(y)[g, s], 0.0)
  cfg_s = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_shared_experts=2))
  ms = moe.MoeFFN(cfg_s, nnx.Rngs(0))
  ys, _ = ms(x, token_mask_BL=mask)
  routed_only = np.asarray(ys) - np.asarray(ms.shared(x))
  want, _ = reference_moe(ms, x, mask)
  np.testing.assert_allclose(routed_only, want, atol=2e-5)
  assert ms.shared.w_gate_DF.shape == (D, 2 * F)


def test_padding_does_not_change_real_tokens():
  m = moe.MoeFFN(_cfg("einsum", capacity_factor_eval=0.75), nnx.Rngs(0))
  x, mask = _x_mask(4)
  y1, _ = m(x, token_mask_BL=mask)
  x2 = jnp.where(mask[..., None] == 0, 100.0, x)  # garbage in padding slots
  y2, _ = m(x2, token_mask_BL=mask)
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), atol=1e-6)


def test_train_vs_eval_capacity_and_jitter():
  cfg = _cfg("einsum", capacity_factor_train=0.25, capacity_factor_eval=2.0, jitter=0.5)
  m = moe.MoeFFN(cfg, nnx.Rngs(0))
  x, mask = _x_mask(5, pad=False)
  _, aux_eval = m(x, token_mask_BL=mask, rng=jax.random.key(0), deterministic=True)
  _, aux_train = m(x, token_mask_BL=mask, rng=jax.random.key(0), deterministic=False)
  assert float(aux_eval["dropped_fraction"]) == 0.0
  assert float(aux_train["dropped_fraction"]) > 0.0
  y_a, _ = m(x, rng=jax.random.key(0), deterministic=False)
  y_b, _ = m(x, rng=jax.random.key(1), deterministic=False)
  assert not np.allclose(np.asarray(y_a), np.asarray(y_b))  # jitter noise in training


def test_router_input_is_separate_from_expert_input():
  m = moe.MoeFFN(_cfg("ragged", dropless=True), nnx.Rngs(0))
  x, _ = _x_mask(6, pad=False)
  r = jax.random.normal(jax.random.key(9), x.shape)
  y1, aux1 = m(x, router_input_BLD=r)
  y2, aux2 = m(x * 2, router_input_BLD=r)
  np.testing.assert_allclose(np.asarray(aux1["expert_load_E"]), np.asarray(aux2["expert_load_E"]))
  assert not np.allclose(np.asarray(y1), np.asarray(y2))


def test_gmm_missing_gives_clear_error(monkeypatch):
  import builtins  # pylint: disable=import-outside-toplevel
  real_import = builtins.__import__

  def fake(name, *a, **k):
    if name == "openmoe_jax.kernels" or name.startswith("openmoe_jax.kernels."):
      raise ImportError(name)
    return real_import(name, *a, **k)
  monkeypatch.setattr(builtins, "__import__", fake)
  m = moe.MoeFFN(_cfg("gmm"), nnx.Rngs(0))
  with pytest.raises(ValueError, match="dispatch='ragged'"):
    m(_x_mask()[0])


def test_layer_period_placement_and_aux_in_model():
  cfg = ModelConfig(vocab_size=32, d_model=D, n_layers=4, n_heads=2, d_ff=32, dtype="float32",
                    moe=MoeConfig(num_experts=E, top_k=2, layer_period=2, layer_offset=1))
  model = transformer.Transformer(cfg, nnx.Rngs(0))
  kinds = [type(b.ffn).__name__ for b in model.segments[0].unit.blocks]
  assert kinds == ["DenseFFN", "MoeFFN"]
  toks = jax.random.randint(jax.random.key(0), (2, 8), 1, 32)
  logits, aux, _ = model(toks)
  assert logits.shape == (2, 8, 32)
  assert aux["segment0"]["block1"]["expert_load_E"].shape == (2, E)  # 2 repeats of the unit
  assert float(transformer.total_aux_loss(aux)) > 0
  # Layer sharing: "abab" keeps the rule (layers 1 and 3 are the MoE group's two repeats);
  # "aabb" repeats a layer in place, so alternating FFNs cannot exist and are refused.
  shared = dataclasses.replace(cfg, n_shared_groups=2)
  model = transformer.Transformer(shared, nnx.Rngs(0))
  assert [type(b.ffn).__name__ for b in model.segments[0].unit.blocks] == ["DenseFFN", "MoeFFN"]
  with pytest.raises(ValueError, match="share_order='aabb'"):
    dataclasses.replace(shared, share_order="aabb")


@pytest.mark.parametrize("fields, message", [
    (dict(router="sigma", renormalize=True), "renormalise"),
    (dict(router="expert_choice", renormalize=True), "renormalise"),
    (dict(router="expert_choice", dropless=True, dispatch="gmm"), "dropless"),
])
def test_options_a_router_would_ignore_are_refused(fields, message):
  with pytest.raises(ValueError, match=message):
    MoeConfig(**fields)


@pytest.mark.skipif(not _has_gmm(), reason="needs the gmm kernels package")
@pytest.mark.parametrize("case", ["topk_capacity", "dropless", "sigma"])
def test_fused_glu_equals_the_two_step_first_layer(case, monkeypatch):
  """MoeConfig.fused_glu (gathered rows, one gmm_glu call, gates applied before the output
  matmul): the same loss and gradients as the default gmm path, and the same output as the
  float64 reference."""
  from openmoe_jax.kernels import gmm as gmm_lib  # noqa: PLC0415
  calls = []
  real = gmm_lib.gmm_glu
  monkeypatch.setattr(gmm_lib, "gmm_glu", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
  x, mask = _x_mask(2)
  ct = jax.random.normal(jax.random.key(4), x.shape)
  cfg = _cfg("gmm", **CASES[case])
  fused = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, fused_glu=True))
  v0, (gp0, gx0) = _loss_and_grads(cfg, x, mask, ct)
  assert not calls
  v1, (gp1, gx1) = _loss_and_grads(fused, x, mask, ct)
  assert calls and calls[0]["activation"] == "silu"  # the fused path ran
  np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gx1), np.asarray(gx0), atol=1e-5)
  for a, b in zip(jax.tree.leaves(gp1), jax.tree.leaves(gp0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  m = moe.MoeFFN(fused, nnx.Rngs(0))
  m.w_router_DE[...] = m.w_router_DE[...] * 50
  y, _ = m(x, token_mask_BL=mask)
  np.testing.assert_allclose(np.asarray(y), reference_moe(m, x, mask)[0], atol=2e-5, rtol=1e-4)


def test_fused_glu_needs_gmm_dispatch_and_a_gated_activation():
  with pytest.raises(ValueError, match="fused_glu"):
    MoeConfig(num_experts=4, dispatch="ragged", fused_glu=True)
  with pytest.raises(ValueError, match="fused_glu"):
    MoeConfig(num_experts=4, dispatch="gmm", activation="relu", fused_glu=True)

"""Routing invariants, property-tested on random logits against a slow per-token reference."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpr_walk
from openmoe_jax import router

SEEDS = range(6)


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  p = np.exp(z)
  return p / p.sum(-1, keepdims=True)


def reference_routing(logits, mask, *, top_k, capacity, gate="softmax", renormalize=False,
                      batch_prioritized=False, expert_choice=False):
  """Slow float64 loop: {(g, s): {expert: combine weight}} of the processed assignments."""
  logits = np.asarray(logits, np.float64)
  g_n, s_n, e_n = logits.shape
  out = {}
  for g in range(g_n):
    probs = _softmax(logits[g]) if gate == "softmax" else 1 / (1 + np.exp(-logits[g]))
    real = [s for s in range(s_n) if mask[g, s]]
    if expert_choice:
      for e in range(e_n):
        for s in sorted(real, key=lambda t: -probs[t, e])[:min(capacity, s_n)]:
          out.setdefault((g, s), {})[e] = probs[s, e]
      continue
    choice = {s: list(np.argsort(-probs[s], kind="stable")[:top_k]) for s in real}
    order = sorted(real, key=lambda t: -probs[t].max()) if batch_prioritized else real
    count = np.zeros(e_n, int)
    for j in range(top_k):
      for s in order:
        e = choice[s][j]
        if capacity is not None and count[e] >= capacity:
          continue
        count[e] += 1
        w = probs[s, e]
        if renormalize and gate == "softmax":
          w = w / probs[s, choice[s]].sum()
        out.setdefault((g, s), {})[e] = w
  return out


def routing_as_dict(r: router.Routing):
  out = {}
  tok, exp, kept, w = (np.asarray(a) for a in (r.token_GA, r.expert_GA, r.kept_GA,
                                                 r.combine_weight_GA()))
  for g in range(tok.shape[0]):
    for a in range(tok.shape[1]):
      if kept[g, a]:
        slot = out.setdefault((g, int(tok[g, a])), {})
        assert int(exp[g, a]) not in slot, "token routed twice to one expert"
        slot[int(exp[g, a])] = float(w[g, a])
  return out


def _inputs(seed, g=2, s=16, e=4, pad=True):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(g, s, e)).astype(np.float32) * 2
  mask = (rng.random((g, s)) > 0.25).astype(np.int32) if pad else np.ones((g, s), np.int32)
  return jnp.asarray(logits), jnp.asarray(mask)


def _assert_same(got, want):
  assert set(got) == set(want)
  for key in want:
    assert set(got[key]) == set(want[key]), key
    for e, w in want[key].items():
      assert abs(got[key][e] - w) < 1e-5, (key, e)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_k,cf,bpr,renorm", [(1, 1.0, False, False), (2, 1.0, False, True),
                                                 (2, 0.5, True, False), (3, 1.25, False, False)])
def test_top_k_matches_reference(seed, top_k, cf, bpr, renorm):
  logits, mask = _inputs(seed)
  g, s, e = logits.shape
  c = router.expert_capacity(s, e, top_k, cf)
  r = router.top_k_routing(logits, mask, top_k=top_k, capacity=c, renormalize=renorm,
                           batch_prioritized=bpr)
  got = routing_as_dict(r)  # also asserts: never twice to one expert
  _assert_same(got, reference_routing(np.asarray(logits), np.asarray(mask), top_k=top_k,
                                      capacity=c, renormalize=renorm, batch_prioritized=bpr))
  # Capacity respected, slots distinct and inside [0, C).
  kept, exp, pos = (np.asarray(a) for a in (r.kept_GA, r.expert_GA, r.position_GA))
  for gi in range(g):
    for ei in range(e):
      slots = pos[gi][kept[gi] & (exp[gi] == ei)]
      assert len(slots) <= c and len(set(slots)) == len(slots) and (slots < c).all()
  # Padding is never routed.
  for (gi, si) in got:
    assert mask[gi, si]


@pytest.mark.parametrize("seed", SEEDS)
def test_dropless_drops_nothing(seed):
  logits, mask = _inputs(seed, s=32, e=8)
  r = router.top_k_routing(logits, mask, top_k=2, capacity=None)
  assert np.array_equal(np.asarray(r.kept_GA), np.asarray(r.routed_GA))
  assert int(np.asarray(r.routed_GA).sum()) == 2 * int(np.asarray(mask).sum())
  assert float(router.dropped_fraction(r, mask)) == 0.0
  # Dropless capacity (cf <= 0) = S: the capacity-limited path then keeps everything too.
  c = router.expert_capacity(32, 8, 2, 0.0)
  r2 = router.top_k_routing(logits, mask, top_k=2, capacity=c)
  assert np.array_equal(np.asarray(r2.kept_GA), np.asarray(r.kept_GA))


@pytest.mark.parametrize("seed", SEEDS)
def test_padding_takes_no_capacity(seed):
  """Real tokens get the same decisions whether padding sits between them or not at all."""
  logits, mask = _inputs(seed, g=1, s=16)
  real = np.flatnonzero(np.asarray(mask)[0])
  compact = np.zeros_like(np.asarray(logits))
  compact[0, :len(real)] = np.asarray(logits)[0, real]
  cmask = np.zeros((1, 16), np.int32)
  cmask[0, :len(real)] = 1
  c = 3
  a = routing_as_dict(router.top_k_routing(logits, mask, top_k=2, capacity=c))
  b = routing_as_dict(router.top_k_routing(jnp.asarray(compact), jnp.asarray(cmask), top_k=2,
                                           capacity=c))
  assert {(0, int(real[s])): v for (_, s), v in b.items()} == a


@pytest.mark.parametrize("seed", SEEDS)
def test_sigma_moe_gates_are_raw_sigmoids(seed):
  logits, mask = _inputs(seed, e=8)
  r = router.top_k_routing(logits, mask, top_k=3, capacity=None, gate="sigmoid",
                           renormalize=True)  # renormalize is ignored for sigmoid gates
  got = routing_as_dict(r)
  _assert_same(got, reference_routing(np.asarray(logits), np.asarray(mask), top_k=3,
                                      capacity=None, gate="sigmoid"))
  assert any(abs(sum(v.values()) - 1) > 1e-3 for v in got.values())  # not renormalised


def test_expert_dropout_mask_only_affects_selection():
  logits, mask = _inputs(0, e=4, pad=False)
  sel = np.ones(logits.shape, bool)
  sel[..., 0] = False  # expert 0 dropped everywhere
  r = router.top_k_routing(logits, mask, top_k=2, capacity=None, gate="sigmoid",
                           selection_mask_GSE=jnp.asarray(sel))
  got = routing_as_dict(r)
  sig = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  for (g, s), v in got.items():
    assert 0 not in v
    for e, w in v.items():
      assert abs(w - sig[g, s, e]) < 1e-5


@pytest.mark.parametrize("seed", SEEDS)
def test_expert_choice_matches_reference(seed):
  logits, mask = _inputs(seed, s=16, e=4)
  c = router.expert_capacity(16, 4, 1, 1.0)
  r = router.expert_choice_routing(logits, mask, capacity=c)
  got = routing_as_dict(r)
  want = reference_routing(np.asarray(logits), np.asarray(mask), top_k=1, capacity=c,
                           expert_choice=True)
  _assert_same(got, want)
  per_expert = np.bincount(np.asarray(r.expert_GA)[np.asarray(r.kept_GA)], minlength=4)
  assert (per_expert <= 2 * c).all()  # 2 groups, at most C each
  dropped = float(router.dropped_fraction(r, mask, expert_choice=True))
  n_real = int(np.asarray(mask).sum())
  assert abs(dropped - (n_real - len(got)) / n_real) < 1e-6


def test_combine_weights_and_dispatch_mask():
  logits, mask = _inputs(3, s=12, e=4)
  c = router.expert_capacity(12, 4, 2, 1.0)
  r = router.top_k_routing(logits, mask, top_k=2, capacity=c)
  dispatch, combine = (np.asarray(a) for a in router.dispatch_combine(r, 12, 4, c))
  assert set(np.unique(dispatch)) <= {0.0, 1.0}
  assert (dispatch.sum(axis=1) <= 1).all()  # one token per expert slot
  assert (dispatch.sum(axis=3) <= 1).all()  # a token at most once per expert
  got = routing_as_dict(r)
  for g in range(2):
    for s in range(12):
      for e in range(4):
        assert abs(combine[g, s, e].sum() - got.get((g, s), {}).get(e, 0.0)) < 1e-6


def test_capacity_formula():
  assert router.expert_capacity(256, 8, 2, 1.25) == math.ceil(256 * 2 * 1.25 / 8)
  assert router.expert_capacity(8, 16, 2, 1.0, min_capacity=4) == 4
  assert router.expert_capacity(8, 2, 2, 4.0) == 8  # never above S
  assert router.expert_capacity(8, 2, 2, 0.0) == 8  # dropless
  with pytest.raises(ValueError):
    router.expert_capacity(0, 2, 1, 1.0)


def test_load_balance_loss_is_one_at_perfect_balance():
  e, s = 4, 16
  # Uniform probabilities: 1 whatever the assignment.
  logits = jnp.zeros((1, s, e))
  mask = jnp.ones((1, s), jnp.int32)
  r = router.top_k_routing(logits, mask, top_k=2, capacity=None)
  lb = router.load_balance_loss(jax.nn.softmax(logits, -1), r, mask)
  assert abs(float(lb) - 1.0) < 1e-6
  # Uniform assignments (token s prefers experts s, s+1 mod E), any probabilities: 1.
  eye = np.stack([np.eye(e)[i % e] * 3 + np.eye(e)[(i + 1) % e] * 2 for i in range(s)])
  logits = jnp.asarray(eye[None], jnp.float32)
  r = router.top_k_routing(logits, mask, top_k=2, capacity=None)
  assert np.allclose(np.asarray(router.expert_load(r, e)), 1 / e)
  lb = router.load_balance_loss(jax.nn.softmax(logits, -1), r, mask)
  assert abs(float(lb) - 1.0) < 1e-5
  # Collapsed routing is penalised (-> E as the router gets confident).
  logits = jnp.zeros((1, s, e)).at[..., 0].set(20.0)
  r = router.top_k_routing(logits, mask, top_k=1, capacity=None)
  assert float(router.load_balance_loss(jax.nn.softmax(logits, -1), r, mask)) > e - 0.01


def test_z_loss_entropy_definitions():
  logits, mask = _inputs(5)
  lg, m = np.asarray(logits, np.float64), np.asarray(mask).astype(bool)
  lse = np.log(np.exp(lg).sum(-1))
  assert abs(float(router.z_loss(logits, mask)) - (lse[m] ** 2).mean()) < 1e-4
  p = _softmax(lg)[m]
  h_tok = -(p * np.log(p)).sum(-1).mean()
  assert abs(float(router.router_entropy(logits, mask)) - h_tok) < 1e-5
  # MoEUT's sigma-MoE regulariser: the softmax averaged over each sequence's real tokens.
  p_GSE = _softmax(lg)
  want = np.mean([np.log(4) + (pbar * np.log(pbar)).sum()
                  for pbar in (p_GSE[i][m[i]].mean(0) for i in range(len(m)))])
  assert abs(float(router.entropy_regularizer(logits, mask)) - want) < 1e-5
  assert float(router.entropy_regularizer(jnp.zeros((1, 4, 4)), jnp.ones((1, 4)))) < 1e-6
  # Each sequence collapsed onto its own expert: the batch-wide marginal is uniform, but the
  # per-sequence one is not, so the regulariser is at its maximum log(E) and has a gradient.
  collapsed = jnp.asarray(np.repeat(np.eye(4)[:, None, :] * 20.0, 3, axis=1), jnp.float32)
  ones = jnp.ones((4, 3), jnp.int32)
  assert float(router.entropy_regularizer(collapsed, ones)) > np.log(4) - 0.01
  # A sequence without a real token does not count.
  padded = jnp.concatenate([jnp.zeros((1, 3, 4)), collapsed[:1]], axis=0)
  np.testing.assert_allclose(
      float(router.entropy_regularizer(padded, jnp.asarray([[1, 1, 1], [0, 0, 0]]))), 0.0,
      atol=1e-6)


def test_jitter_only_with_rng():
  x = jax.random.normal(jax.random.key(0), (1, 4, 8))
  w = jax.random.normal(jax.random.key(1), (8, 4))
  clean = router.router_logits(x, w, jitter=0.1, rng=None)
  noisy = router.router_logits(x, w, jitter=0.1, rng=jax.random.key(2))
  assert np.array_equal(np.asarray(clean), np.asarray(router.router_logits(x, w)))
  assert not np.allclose(np.asarray(clean), np.asarray(noisy))
  assert clean.dtype == jnp.float32


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_expert_load_counts_routed_assignments(seed):
  """expert_load = per-expert count of routed (real-token) choices / their total, as bincount."""
  g, s, e, k = 3, 40, 7, 2
  logits = jax.random.normal(jax.random.key(seed), (g, s, e))
  mask = np.asarray(jax.random.bernoulli(jax.random.key(seed + 50), 0.8, (g, s)))
  r = router.top_k_routing(logits, jnp.asarray(mask), top_k=k, capacity=3)
  ids = np.asarray(r.expert_GA)[np.asarray(r.routed_GA)]
  want = np.bincount(ids, minlength=e) / ids.size
  np.testing.assert_allclose(np.asarray(router.expert_load(r, e)), want, rtol=1e-6)
  assert ids.size == k * mask.sum()  # over capacity still counts: load is before dropping


@pytest.mark.parametrize("e", [10, 387])
def test_router_logits_backward_runs_in_router_dtype(e):
  """bf16 router: logits and gradients match a float64 reference of the same bf16 operands,
  and no matmul of the gradient takes a float32 operand (the cotangent is rounded first)."""
  kx, kw, kc = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, (2, 16, 64)).astype(jnp.bfloat16)
  w = jax.random.normal(kw, (64, e)) * 0.1
  ct = jax.random.normal(kc, (2, 16, e))
  f = lambda x, w: jnp.sum(router.router_logits(x, w, dtype="bfloat16") * ct)
  dx, dw = jax.grad(f, argnums=(0, 1))(x, w)
  x64 = np.asarray(x, np.float64)
  w64 = np.asarray(w.astype(jnp.bfloat16), np.float64)
  ct64 = np.asarray(ct.astype(jnp.bfloat16), np.float64)
  np.testing.assert_allclose(np.asarray(router.router_logits(x, w, dtype="bfloat16")),
                             np.einsum("gsd,de->gse", x64, w64), rtol=1e-5, atol=1e-5)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(dx, np.float64), np.einsum("gse,de->gsd", ct64, w64),
                             rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(np.asarray(dw), np.einsum("gsd,gse->de", x64, ct64),
                             rtol=1e-4, atol=1e-4)
  jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, w)
  # every dot_general, inside custom_vjp / pjit sub-jaxprs too
  dots = [[v.aval.dtype for v in eqn.invars] for eqn in jaxpr_walk.equations(jaxpr)
          if eqn.primitive.name == "dot_general"]
  assert len(dots) >= 3, dots
  assert all(d == jnp.bfloat16 for ops in dots for d in ops), dots


def test_lowp_einsum_float32_is_plain_einsum():
  from openmoe_jax import layers
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))
  w = jax.random.normal(jax.random.key(1), (8, 2, 4))
  f = lambda x, w: jnp.sum(jnp.sin(layers.lowp_einsum("BLD,DHE->BLHE", x, w, "float32")))
  g = lambda x, w: jnp.sum(jnp.sin(jnp.einsum("BLD,DHE->BLHE", x, w)))
  for a, b in zip(jax.grad(f, (0, 1))(x, w), jax.grad(g, (0, 1))(x, w)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="summed over in one operand"):
    layers.lowp_einsum("BLD,DHE->BLH", x, w, "bfloat16")

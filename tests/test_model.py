"""Model properties: causality, prefix visibility, packing isolation, scan == unrolled, jit."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from openmoe_jax import attention, presets, transformer
from openmoe_jax.config import ModelConfig

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  dtype="float32")


def _model(cfg=CFG, seed=0):
  return transformer.Transformer(cfg, nnx.Rngs(params=seed))


def _tokens(shape=(2, 12), seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 1, CFG.vocab_size)


def test_mask_matches_definition():
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  prefix = jnp.array([[1, 1, 0, 1, 0, 0]])
  mask = np.asarray(attention.sequence_mask(seg, prefix))[0]
  for q in range(6):
    for k in range(6):
      same = seg[0, q] == seg[0, k] and seg[0, q] != 0
      ok = same and (k <= q or (prefix[0, q] and prefix[0, k]))
      assert mask[q, k] == ok, (q, k)


def test_causal_no_future_leak():
  m, toks = _model(), _tokens()
  logits, _, _ = m(toks)
  changed = toks.at[:, 7].set((toks[:, 7] + 1) % CFG.vocab_size)
  logits2, _, _ = m(changed)
  np.testing.assert_allclose(logits[:, :7], logits2[:, :7], atol=1e-6)
  assert np.abs(np.asarray(logits[:, 7:] - logits2[:, 7:])).max() > 1e-4


def test_prefix_is_bidirectional_and_targets_causal():
  m, toks = _model(), _tokens()
  prefix = jnp.array([[1] * 5 + [0] * 7] * 2)
  logits, _, _ = m(toks, prefix_BL=prefix)
  # Changing a later prefix token changes earlier prefix positions...
  changed = toks.at[:, 4].set((toks[:, 4] + 1) % CFG.vocab_size)
  logits2, _, _ = m(changed, prefix_BL=prefix)
  assert np.abs(np.asarray(logits[:, 0] - logits2[:, 0])).max() > 1e-4
  # ...but a target-side token never affects positions before it.
  changed = toks.at[:, 9].set((toks[:, 9] + 1) % CFG.vocab_size)
  logits3, _, _ = m(changed, prefix_BL=prefix)
  np.testing.assert_allclose(logits[:, :9], logits3[:, :9], atol=1e-6)


def test_packed_segments_are_isolated():
  """A packed row computes each segment exactly as if it were alone."""
  m = _model()
  a, b = _tokens((1, 5), 3), _tokens((1, 7), 4)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.array([[1] * 5 + [2] * 7])
  pos = jnp.array([list(range(5)) + list(range(7))])
  logits, _, _ = m(packed, segment_ids_BL=seg, positions_BL=pos)
  alone_a, _, _ = m(a)
  alone_b, _, _ = m(b)
  np.testing.assert_allclose(logits[:, :5], alone_a, atol=1e-5)
  np.testing.assert_allclose(logits[:, 5:], alone_b, atol=1e-5)


def _switchhead_cfg(**kw):
  return dataclasses.replace(presets.get("moeut-tiny"), vocab_size=CFG.vocab_size,
                             dtype="float32", **kw)


@pytest.mark.parametrize("make_cfg", [lambda **kw: dataclasses.replace(CFG, **kw),
                                      _switchhead_cfg], ids=["dense", "switchhead"])
def test_causal_attention_mask_is_one_stream_per_row(make_cfg):
  """attention_mask="causal" equals the packed mask on rows of one segment, and ignores a
  batch's segments, prefixes and positions (each row one causal stream)."""
  causal, packed = _model(make_cfg(attention_mask="causal")), _model(make_cfg())
  toks = _tokens()
  np.testing.assert_allclose(causal(toks)[0], packed(toks)[0], rtol=1e-5, atol=1e-6)
  seg = jnp.array([[1] * 5 + [2] * 7, [1] * 12])
  prefix = jnp.zeros_like(seg).at[0, 5:8].set(1)
  pos = jnp.array([list(range(5)) + list(range(7)), list(range(12))])
  kw = dict(segment_ids_BL=seg, prefix_BL=prefix, positions_BL=pos)
  np.testing.assert_allclose(causal(toks, **kw)[0], causal(toks)[0], rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(packed(toks, **kw)[0][0, 5:] - packed(toks)[0][0, 5:])).max() > 1e-4


@pytest.mark.parametrize("preset", ["moeut-tiny", "umoe-tiny"])
def test_causal_mask_routes_no_padding(preset):
  """attention_mask="causal" attends over padding (segment 0), but padding is still not routed:
  no router loss or statistic, of the attention's routers either, changes when only the
  padding tokens do (real tokens precede it, so their states do not see it)."""
  cfg = dataclasses.replace(presets.get(preset), vocab_size=CFG.vocab_size, dtype="float32",
                            attention_mask="causal")
  m, toks = _model(cfg), _tokens()
  seg = jnp.array([[1] * 8 + [0] * 4, [1] * 12])
  changed = toks.at[0, 8:].set((toks[0, 8:] + 7) % CFG.vocab_size + 1)
  _, aux, _ = m(toks, segment_ids_BL=seg)
  _, aux_changed, _ = m(changed, segment_ids_BL=seg)
  assert float(transformer.total_aux_loss(aux)) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               aux, aux_changed)


def test_causal_cudnn_call_has_no_mask(monkeypatch):
  """With the causal promise, the cuDNN path asks for is_causal and passes no mask (the
  kernel itself is JAX's; here jax.nn's XLA implementation stands in for it on CPU)."""
  calls, real = [], jax.nn.dot_product_attention

  def stand_in(q, k, v, **kw):
    calls.append(kw)
    return real(q, k, v, **{**kw, "implementation": "xla"})

  monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 8, 4, 16)) for i in range(3))
  mask = attention.sequence_mask(jnp.ones((2, 8), jnp.int32), jnp.zeros((2, 8), jnp.int32))
  got = attention.dot_product_attention(q, k, v, mask, "cudnn", causal=True)
  np.testing.assert_allclose(got, attention.dot_product_attention(q, k, v, mask, "xla"),
                             rtol=1e-5, atol=1e-6)
  assert calls == [{"is_causal": True, "implementation": "cudnn"}]


@pytest.mark.parametrize("n_shared_groups,order", [(0, "abab"), (2, "abab"), (2, "aabb")])
def test_scan_equals_unrolled(n_shared_groups, order):
  base = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, d_ff=64, dtype="float32",
                     n_shared_groups=n_shared_groups, share_order=order)
  toks = _tokens()
  outs = []
  for scan in (True, False):
    cfg = ModelConfig(**{**base.__dict__, "scan_layers": scan})
    logits, _, _ = _model(cfg)(toks)
    outs.append(logits)
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_layer_sharing_reuses_parameters():
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=6, n_heads=4, d_ff=64,
                    n_shared_groups=2)
  unshared = ModelConfig(**{**cfg.__dict__, "n_shared_groups": 0})
  count = lambda c: sum(x.size for x in jax.tree.leaves(nnx.state(_model(c), nnx.Param)))
  per_block = (count(unshared) - count(ModelConfig(**{**unshared.__dict__, "n_layers": 1}))) // 5
  assert count(unshared) - count(cfg) == 4 * per_block


def test_remat_and_jit_match_eager():
  toks = _tokens()
  eager, _, _ = _model()(toks)
  cfg = ModelConfig(**{**CFG.__dict__, "remat": "full"})
  graphdef, params = nnx.split(_model(cfg), nnx.Param)

  @jax.jit
  def loss(p):
    logits, _, _ = nnx.merge(graphdef, p)(toks)
    return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

  (_, jitted), grads = jax.value_and_grad(loss, has_aux=True)(params)
  np.testing.assert_allclose(eager, jitted, atol=1e-5)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_remat_cse_repeats_leave_values_and_gradients_unchanged():
  """Letting XLA CSE the rematerialised forward (some or all repeats of an unrolled segment)
  is an optimisation only: same loss and gradients as preventing it, and as no remat."""
  toks = _tokens()
  base = ModelConfig(**{**CFG.__dict__, "n_layers": 4, "scan_layers": False})
  results = []
  for remat, cse in [("none", 0), ("dots", 0), ("dots", 1), ("dots", -1)]:
    cfg = ModelConfig(**{**base.__dict__, "remat": remat, "remat_cse_repeats": cse})
    graphdef, params = nnx.split(_model(cfg), nnx.Param)

    @jax.jit
    def loss(p, graphdef=graphdef):
      logits, _, _ = nnx.merge(graphdef, p)(toks)
      return jnp.mean(jax.nn.logsumexp(logits, -1))

    results.append(jax.value_and_grad(loss)(params))
  (v0, g0) = results[0]
  for v, g in results[1:]:
    np.testing.assert_allclose(v, v0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="remat_cse_repeats"):
    ModelConfig(**{**base.__dict__, "remat_cse_repeats": -2})


def test_rope_matches_complex_rotation_reference():
  from openmoe_jax import layers
  x = np.random.default_rng(0).normal(size=(1, 3, 2, 8))
  pos = np.array([[0, 1, 5]])
  inv = np.asarray(layers.rope_frequencies(8, 1.0, 10000.0))
  out = np.asarray(layers.apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), inv))
  z = x[..., :4] + 1j * x[..., 4:]
  ref = z * np.exp(1j * pos[..., None, None] * inv)
  np.testing.assert_allclose(out, np.concatenate([ref.real, ref.imag], -1), atol=1e-5)


def test_config_errors_name_the_value():
  with pytest.raises(ValueError, match="n_kv_heads=3"):
    ModelConfig(n_heads=4, n_kv_heads=3)
  with pytest.raises(ValueError, match="dtype='float8'"):
    ModelConfig(dtype="float8")
  with pytest.raises(ValueError, match="n_layers=5"):
    ModelConfig(n_layers=5, n_shared_groups=2)

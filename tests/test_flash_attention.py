"""Pallas flash attention (interpreted on CPU) == the XLA reference, forward and gradients."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openmoe_jax import attention
from openmoe_jax.flash_attention import Blocks, flash_attention

SMALL = Blocks(fwd_q=16, fwd_k=8, bwd_q=8, bwd_k=16)  # several tiles per row and column


def _masks(b, l, seed):
  rng = np.random.default_rng(seed)
  seg = np.ones((b, l), np.int32)
  prefix = np.zeros((b, l), np.int32)
  # row 0: causal; row 1: two packed prefix-LM segments and a padded tail (empty query rows)
  seg[1, 13:27], seg[1, 27:] = 2, 0
  prefix[1, :5], prefix[1, 13:20] = 1, 1
  packed = attention.sequence_mask(jnp.asarray(seg), jnp.asarray(prefix))
  dense = jnp.asarray(rng.random((b, l, l)) < 0.3)  # arbitrary (rows may be empty)
  # 8 x 8 tiles that are full, empty or partial at random: full tiles on both sides of
  # masked ones, so the kernels switch between their masked and unmasked loops.
  kind_T = rng.integers(0, 3, (b, l // 8, l // 8))
  tile = np.repeat(np.repeat(kind_T, 8, axis=1), 8, axis=2)
  blocky = jnp.asarray((tile == 2) | ((tile == 1) & (rng.random((b, l, l)) < 0.5)))
  return {"t5x": packed, "random": dense, "blocky": blocky}


def _inputs(b=2, l=32, h=4, n=2, k=16, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, l, h, k), dtype)
  kk = jax.random.normal(keys[1], (b, l, n, k), dtype)
  v = jax.random.normal(keys[2], (b, l, n, k), dtype)
  dout = jax.random.normal(keys[3], (b, l, h, k), dtype)
  return q, kk, v, dout


def _rel(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  assert np.all(np.isfinite(x))
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("kind,h,n", [("t5x", 4, 2), ("random", 2, 2), ("blocky", 2, 1)])
def test_forward_and_grads_match_reference(kind, h, n):
  q, k, v, dout = _inputs(h=h, n=n, seed=hash((kind, h)) % 100)
  mask = _masks(2, 32, 1)[kind]

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * dout)

  flash = lambda q, k, v: flash_attention(q, k, v, mask, SMALL)  # noqa: E731
  ref = lambda q, k, v: attention.dot_product_attention(q, k, v, mask)  # noqa: E731
  assert _rel(flash(q, k, v), ref(q, k, v)) < 1e-5
  got = jax.grad(loss(flash), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    assert _rel(g, w) < 1e-5


def test_rows_without_keys_give_zero_output_and_gradient():
  q, k, v, _ = _inputs(b=1, l=16, h=2, n=2, k=8, seed=3)
  mask = jnp.tril(jnp.ones((16, 16), bool))[None].at[:, 10:].set(False)
  out = flash_attention(q, k, v, mask, Blocks(8, 8, 8, 8))
  assert np.all(np.asarray(out[:, 10:]) == 0)
  dq = jax.grad(lambda q: jnp.sum(flash_attention(q, k, v, mask, Blocks(8, 8, 8, 8))))(q)
  assert np.all(np.asarray(dq[:, 10:]) == 0) and np.abs(np.asarray(dq[:, :10])).max() > 0


def test_bfloat16_close_to_float32_reference():
  q, k, v, _ = _inputs(seed=5)
  mask = _masks(2, 32, 2)["t5x"]
  ref = attention.dot_product_attention(q, k, v, mask)
  out = flash_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask, SMALL)
  assert out.dtype == jnp.bfloat16 and _rel(out, ref) < 2e-2


def test_model_with_pallas_impl_matches_xla():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from openmoe_jax import transformer  # pylint: disable=import-outside-toplevel
  from openmoe_jax.config import ModelConfig  # pylint: disable=import-outside-toplevel
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                    dtype="float32")
  toks = jax.random.randint(jax.random.key(0), (1, 16), 1, 64)
  prefix = jnp.zeros((1, 16), jnp.int32).at[:, :5].set(1)
  outs = []
  for impl in ("xla", "pallas"):
    m = transformer.Transformer(dataclasses.replace(cfg, attention_impl=impl),
                                nnx.Rngs(params=0))
    outs.append(m(toks, prefix_BL=prefix)[0])
  assert _rel(outs[1], outs[0]) < 1e-5


def test_bad_shapes_raise():
  q, k, v, _ = _inputs(l=24)
  with pytest.raises(ValueError, match="power-of-two"):
    flash_attention(q, k, v, jnp.ones((2, 24, 24), bool), Blocks(16, 16, 16, 16))
  with pytest.raises(ValueError, match="mask"):
    flash_attention(q, k, v, jnp.ones((2, 24, 23), bool))


def test_batch_sharded_jit_matches_and_keeps_sequences_on_their_devices():
  """Under jit with the batch sharded over the 8 test devices, forward and gradients equal the
  unsharded call and the compiled step moves no sequence between devices (the kernels are
  wrapped per batch slice; a bare Pallas call would all-gather its operands)."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  n_dev = len(jax.devices())
  b = 2 * n_dev
  q, k, v, dout = _inputs(b=b, l=16, h=2, n=2, k=8, seed=3)
  mask = jnp.asarray(np.tril(np.ones((16, 16), bool))[None].repeat(b, 0))
  mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", *([None] * (x.ndim - 1)))))  # noqa: E731
  blocks = Blocks(fwd_q=8, fwd_k=8, bwd_q=8, bwd_k=8)

  def step(q, k, v, mask, dout):
    out, vjp = jax.vjp(lambda a, b_, c: flash_attention(a, b_, c, mask, blocks), q, k, v)
    return (out, *vjp(dout))

  args = (q, k, v, mask, dout)
  want = step(*args)
  f = jax.jit(step)
  got = f(*map(put, args))
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
  assert got[0].sharding.spec[0] == "data"
  hlo = f.lower(*map(put, args)).compile().as_text()
  assert n_dev == 1 or "all-gather" not in hlo


@pytest.mark.parametrize("kind", ["t5x", "random", "blocky"])
def test_tile_ranges_cover_visible_tiles_and_full_runs_are_full(kind):
  from openmoe_jax.flash_attention import _tile_ranges
  mask = np.asarray(_masks(2, 32, 3)[kind])
  for bq, bk in [(8, 8), (16, 8), (8, 16)]:
    q_r, k_r = (np.asarray(r) for r in _tile_ranges(jnp.asarray(mask), bq, bk))
    t = mask.reshape(2, 32 // bq, bq, 32 // bk, bk)
    any_, all_ = t.any(axis=(2, 4)), t.all(axis=(2, 4))
    for ranges, a, f in [(q_r, any_, all_), (k_r, any_.transpose(0, 2, 1),
                                              all_.transpose(0, 2, 1))]:
      for b in range(2):
        for i in range(a.shape[1]):
          lo, hi, flo, fhi = ranges[b, i]
          assert lo <= flo <= fhi <= hi
          assert not a[b, i, :lo].any() and not a[b, i, hi:].any()  # nothing visible missed
          assert f[b, i, flo:fhi].all()  # the unmasked loop only sees full tiles
          if f[b, i].any():  # and it starts at the first full tile
            assert flo == np.argmax(f[b, i]) and fhi > flo

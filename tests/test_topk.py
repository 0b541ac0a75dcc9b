"""The router top-k kernel (kernels/topk.py) against jax.lax.top_k, in Pallas' interpreter."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openmoe_jax.kernels import topk


def _logits(shape, seed=0, dtype=jnp.float32):
  x = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
  return x.astype(dtype)


@pytest.mark.parametrize("shape,k", [((70, 387), 16), ((3, 41, 10), 2), ((9, 16), 16),
                                     ((5, 3), 1), ((33, 200), 32)])
def test_matches_lax_top_k(shape, k):
  x = _logits(shape, seed=k)
  got = topk.top_k_indices(x, k, interpret=True)
  assert got.shape == (*shape[:-1], k) and got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.lax.top_k(x, k)[1]))


def test_ties_infinities_and_nan_rank_as_lax_top_k():
  """Ties go to the lowest index; +inf, -inf rows, NaN (above +inf) and -0.0 (below +0.0)
  rank as in lax.top_k."""
  x = _logits((6, 50), seed=3, dtype=jnp.bfloat16)  # bf16 rows also hold exact ties
  x = x.at[0, :8].set(jnp.inf).at[1, 7].set(jnp.nan).at[2].set(-jnp.inf)
  x = x.at[3].set(1.0).at[4, ::3].set(2.0).at[5, :20].set(0.0).at[5, 1:20:2].set(-0.0)
  got = topk.top_k_indices(x, 12, interpret=True)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.lax.top_k(x, 12)[1]))
  assert len(set(np.asarray(got[2]).tolist())) == 12  # all -inf: still k distinct indices


def test_gradients_flow_through_the_gathered_values():
  x = _logits((8, 30), seed=5)

  def f(x):
    idx = topk.top_k_indices(x, 4, interpret=True)
    return jnp.sum(jnp.take_along_axis(x, idx, -1) ** 2)

  def ref(x):
    return jnp.sum(jax.lax.top_k(x, 4)[0] ** 2)

  np.testing.assert_allclose(jax.grad(f)(x), jax.grad(ref)(x), rtol=1e-6)


def test_backend_choice_and_errors():
  x = _logits((4, 10))
  np.testing.assert_array_equal(topk.top_k_indices(x, 3, backend="xla"),
                                jax.lax.top_k(x, 3)[1])
  with pytest.raises(ValueError, match="backend"):
    topk.top_k_indices(x, 3, backend="cuda")
  with pytest.raises(ValueError, match="k=11"):
    topk.top_k_indices(x, 11)
  with pytest.raises(ValueError, match="pallas_gpu top-k needs"):
    topk.top_k_indices(_logits((2, 64)), topk.MAX_K + 1, backend="pallas_gpu")
  assert topk.kernel_fits(387, 16) and not topk.kernel_fits(387, 33)


def test_rows_stay_sharded_under_jit():
  """With rows sharded over devices each device ranks its own rows: the kernel is wrapped in
  custom_partitioning (a bare Pallas call makes XLA gather every row onto every device)."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  n = len(jax.devices())
  mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x = _logits((2 * n, 24, 50), seed=11)
  xs = jax.device_put(x, NamedSharding(mesh, P("data", None, None)))
  f = jax.jit(lambda x: topk.top_k_indices(x, 5, interpret=True))
  out = f(xs)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.lax.top_k(x, 5)[1]))
  assert out.sharding.spec[0] == "data"
  hlo = f.lower(xs).compile().as_text()
  assert "all-gather" not in hlo or n == 1
  bare = jax.jit(lambda x: topk._pallas_top_k(x.reshape(-1, 50), 5, interpret=True))
  assert n == 1 or "all-gather" in bare.lower(xs).compile().as_text()  # what the wrap avoids

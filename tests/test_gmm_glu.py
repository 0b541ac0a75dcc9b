"""`gmm_glu` (kernels/gmm/glu.py): act(x @ w_gate) * (x @ w_up) per group, with the Hopper
kernel's fused epilogue (run in Pallas' GPU interpreter) and the unfused path, against a
float64 reference; its VJP against the gradient of a plain jnp composition."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openmoe_jax.kernels import gmm as gmm_lib
from openmoe_jax.kernels.gmm import glu
from openmoe_jax.kernels.gmm.tiling import Tiling

M, K, F = 264, 128, 64
SIZES = [37, 0, 120, 64, 20]   # an empty group, edges off the 8-row grid, 23 tail rows
RING = Tiling(tm=128, tn=128, tk=64, num_warps=8, num_stages=4, group_m=2, ring=2)


def _inputs(dtype, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, (M, K), jnp.float32).astype(dtype)
  w = (jax.random.normal(k2, (len(SIZES), K, 2 * F), jnp.float32) / np.sqrt(K)).astype(dtype)
  return x, w


def _np_glu(x, w, act):
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  out, start = np.zeros((M, F)), 0
  for g, size in enumerate(SIZES):
    h = x[start:start + size] @ w[g]
    gate, up = h[:, :F], h[:, F:]
    a = {"silu": gate / (1 + np.exp(-gate)), "relu": np.maximum(gate, 0),
         "identity": gate}[act]
    out[start:start + size] = a * up
    start += size
  return out


def _rel(x, ref):
  x = np.asarray(x, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("act", ["silu", "relu"])
def test_fused_epilogue_in_the_interpreter_matches_float64(act):
  x, w = _inputs(jnp.bfloat16)
  gs = jnp.array(SIZES, jnp.int32)
  assert glu.fused_tiling(x, w, act, "pallas_mgpu", RING) == RING
  out = gmm_lib.gmm_glu(x, w, gs, activation=act, backend="pallas_mgpu", tiling=RING,
                        interpret=True)
  assert out.shape == (M, F) and out.dtype == jnp.bfloat16
  assert _rel(out, _np_glu(x, w, act)) <= 1e-2
  np.testing.assert_array_equal(np.asarray(out[sum(SIZES):], np.float32), 0.0)


@pytest.mark.parametrize("act", ["silu", "gelu", "identity"])
def test_unfused_path_matches_float64_in_float32(act):
  """CPU ("auto" resolves to the reference backend): the plain gmm then the activation;
  gelu has no fused form and always takes this path."""
  x, w = _inputs(jnp.float32)
  assert glu.fused_tiling(x, w, act, "auto", None) is None
  out = gmm_lib.gmm_glu(x, w, jnp.array(SIZES, jnp.int32), activation=act)
  if act == "gelu":
    h = np.asarray(gmm_lib.gmm(x, w, jnp.array(SIZES, jnp.int32)), np.float64)
    gate = h[:, :F]
    ref = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate ** 3)))
    ref = ref * h[:, F:]
  else:
    ref = _np_glu(x, w, act)
  assert _rel(out, ref) <= 1e-5


def test_gradients_match_the_plain_composition():
  """The custom VJP (recomputed product, dx and dW kernels) equals jax.grad of
  act(ragged_dot(x, w_gate)) * ragged_dot(x, w_up), in float32."""
  x, w = _inputs(jnp.float32, seed=1)
  gs = jnp.array(SIZES, jnp.int32)
  dy = jax.random.normal(jax.random.key(2), (M, F), jnp.float32)
  valid = (jnp.arange(M) < sum(SIZES))[:, None]

  def plain(x, w):
    gate = jax.lax.ragged_dot(x, w[:, :, :F], gs)
    up = jax.lax.ragged_dot(x, w[:, :, F:], gs)
    return jnp.where(valid, jax.nn.silu(gate) * up, 0.0)

  want = jax.grad(lambda x, w: jnp.sum(plain(x, w) * dy), argnums=(0, 1))(x, w)
  glu_sum = lambda x, w: jnp.sum(gmm_lib.gmm_glu(x, w, gs) * dy)
  got = jax.grad(glu_sum, argnums=(0, 1))(x, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


def test_bad_inputs_fail_clearly():
  x, w = _inputs(jnp.float32)
  gs = jnp.array(SIZES, jnp.int32)
  with pytest.raises(ValueError, match="activation"):
    gmm_lib.gmm_glu(x, w, gs, activation="tanh")
  with pytest.raises(ValueError, match="w\\[G, K, 2F\\]"):
    gmm_lib.gmm_glu(x, w[:, :, 1:], gs)


def test_bench_error_check_sees_wrong_rows_and_tail():
  """kernels.bench_glu's check: ~0 for the exact product, large for a corrupted group row or
  a non-zero tail row (it runs on the GPU only; its check is plain jnp)."""
  from openmoe_jax.kernels import bench_glu  # noqa: PLC0415
  x, w = _inputs(jnp.float32)
  gs = jnp.array(SIZES, jnp.int32)
  y = jnp.asarray(_np_glu(x, w, "silu"), jnp.float32)
  assert bench_glu.glu_ref_err(y, x, w, gs, "silu") < 1e-5
  assert bench_glu.glu_ref_err(y.at[0].add(10.0), x, w, gs, "silu") > 0.1
  assert bench_glu.glu_ref_err(y.at[M - 1].set(1.0), x, w, gs, "silu") > 1e-3

"""Cross-entropy sums and their gradients against a float64 reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openmoe_jax import losses


def _reference(logits, targets, weights, z_loss):
  x = np.asarray(logits, np.float64)
  m = x.max(-1, keepdims=True)
  log_z = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
  tgt = np.take_along_axis(x, np.asarray(targets)[..., None], -1)[..., 0]
  w = np.asarray(weights, np.float64)
  loss = ((log_z - tgt) * w).sum() + z_loss * (log_z ** 2 * w).sum()
  # d loss / d x = w * (softmax * (1 + 2 z log_z) - onehot)
  p = np.exp(x - log_z[..., None])
  onehot = np.eye(x.shape[-1])[np.asarray(targets)]
  grad = w[..., None] * (p * (1 + 2 * z_loss * log_z)[..., None] - onehot)
  return loss, grad


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_loss_and_logit_gradient_match_float64(dtype, tol, z_loss):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  logits = (jax.random.normal(k1, (2, 5, 37)) * 3).astype(dtype)
  targets = jax.random.randint(k2, (2, 5), 0, 37)
  weights = (jax.random.uniform(k3, (2, 5)) > 0.3).astype(jnp.float32)

  def total(lg):
    s = losses.cross_entropy(lg, targets, weights, z_loss)
    return s["loss_sum"] + s["z_loss_sum"]

  val, grad = jax.value_and_grad(total)(logits)
  want_val, want_grad = _reference(logits, targets, weights, z_loss)
  assert grad.dtype == dtype
  np.testing.assert_allclose(float(val), want_val, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad, np.float64), want_grad, atol=tol, rtol=tol)


def test_accuracy_and_weights():
  logits = jnp.array([[[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [1.0, 1.0, 0.0]]])
  s = losses.cross_entropy(logits, jnp.array([[1, 1, 0]]), jnp.array([[1.0, 1.0, 0.0]]))
  assert float(s["correct_sum"]) == 1.0 and float(s["weight_sum"]) == 2.0
  m = losses.summarize(s)
  assert abs(float(m["accuracy"]) - 0.5) < 1e-7


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_accuracy_splits_ties_between_the_maxima(dtype):
  """A target tied with m - 1 other maxima counts 1/m; a target below the max counts 0."""
  logits = jnp.array([[[2.0, 2.0, 1.0, 2.0], [5.0, 5.0, 0.0, 0.0], [1.0, 3.0, 3.0, 0.0],
                       [0.0, 1.0, 2.0, 3.0]]], dtype)
  targets = jnp.array([[3, 0, 0, 3]])
  s = losses.cross_entropy(logits, targets, jnp.ones((1, 4)))
  np.testing.assert_allclose(float(s["correct_sum"]), 1 / 3 + 1 / 2 + 0 + 1, rtol=1e-6)
  rng = np.random.default_rng(0)  # no ties: the argmax accuracy
  x = rng.normal(size=(3, 7, 50)).astype(np.float32)
  t = rng.integers(0, 50, (3, 7))
  s = losses.cross_entropy(jnp.asarray(x), jnp.asarray(t), jnp.ones((3, 7)))
  assert float(s["correct_sum"]) == float((x.argmax(-1) == t).sum())


@pytest.mark.parametrize("chunk_len", [0, 4])
def test_stacked_weights_equal_separate_calls(chunk_len):
  """[B, L, J] weights give the J sums of J separate [B, L] calls (evaluation groups)."""
  from openmoe_jax import chunked_loss  # pylint: disable=import-outside-toplevel
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(3), 4)
  x_BLD = jax.random.normal(k1, (2, 8, 16))
  head_DV = jax.random.normal(k2, (16, 32))
  targets_BL = jax.random.randint(k3, (2, 8), 0, 32)
  weights_BLJ = (jax.random.uniform(k4, (2, 8, 3)) > 0.4).astype(jnp.float32)
  sums = chunked_loss.chunked_cross_entropy(x_BLD, lambda h: h @ head_DV, targets_BL,
                                            weights_BLJ, chunk_len, z_loss=1e-3)
  for j in range(3):
    one = chunked_loss.chunked_cross_entropy(x_BLD, lambda h: h @ head_DV, targets_BL,
                                             weights_BLJ[..., j], chunk_len, z_loss=1e-3)
    for k, v in one.items():
      assert sums[k].shape == (3,)
      np.testing.assert_allclose(sums[k][j], v, rtol=1e-6, err_msg=k)

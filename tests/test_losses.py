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


def _head_problem(b=2, length=24, d=8, v=37, seed=1):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (b, length, d))
  w = jax.random.normal(ks[1], (d, v))
  targets = jax.random.randint(ks[2], (b, length), 0, v)
  weights = (jax.random.uniform(ks[3], (b, length)) > 0.3).astype(jnp.float32)
  return x, w, targets, weights


@pytest.mark.parametrize("chunk", [4, 8, 12])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_loss_equals_whole_in_value_and_gradient(chunk, z_loss):
  """Chunking the head + loss over L changes nothing: the sums and the gradients of both the
  hidden states and the (closed-over) head weight match the one-pass loss and float64."""
  x, w, targets, weights = _head_problem()

  def total(x, w, chunk_len):
    s = losses.chunked_cross_entropy(x, lambda h: h @ w, targets, weights, chunk_len, z_loss)
    return s["loss_sum"] + s["z_loss_sum"], s

  (whole, s_whole), g_whole = jax.value_and_grad(total, (0, 1), has_aux=True)(x, w, 0)
  (chunked, s_chunk), g_chunk = jax.value_and_grad(total, (0, 1), has_aux=True)(x, w, chunk)
  want, want_dlogits = _reference(np.asarray(x, np.float64) @ np.asarray(w, np.float64),
                                  targets, weights, z_loss)
  np.testing.assert_allclose(float(chunked), want, rtol=1e-5)
  np.testing.assert_allclose(float(whole), want, rtol=1e-5)
  for key in s_whole:
    np.testing.assert_allclose(float(s_chunk[key]), float(s_whole[key]), rtol=1e-5)
  want_dx = want_dlogits @ np.asarray(w, np.float64).T
  want_dw = np.einsum("bld,blv->dv", np.asarray(x, np.float64), want_dlogits)
  np.testing.assert_allclose(np.asarray(g_chunk[0]), want_dx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_chunk[1]), want_dw, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_whole[1]), want_dw, rtol=1e-4, atol=1e-5)


def test_chunked_loss_never_holds_the_whole_logits():
  """The compiled gradient of the chunked loss needs far less scratch memory than the size
  of the [B, L, V] float32 logits; the one-pass loss needs at least that much."""
  x, w, targets, weights = _head_problem(b=2, length=512, d=16, v=4096)
  logits_bytes = 2 * 512 * 4096 * 4

  def temp_bytes(chunk_len):
    def total(x, w):
      s = losses.chunked_cross_entropy(x, lambda h: h @ w, targets, weights, chunk_len)
      return s["loss_sum"]
    compiled = jax.jit(jax.grad(total, (0, 1))).lower(x, w).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  whole, chunked = temp_bytes(0), temp_bytes(32)
  assert whole >= logits_bytes, (whole, logits_bytes)
  assert chunked < logits_bytes / 4, (chunked, logits_bytes)


def _count_primitives(closed_jaxpr, names):
  counts = dict.fromkeys(names, 0)

  def walk(jp):  # scan / checkpoint / custom_vjp / pjit sub-jaxprs too
    for eqn in jp.eqns:
      if eqn.primitive.name in counts:
        counts[eqn.primitive.name] += 1
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (list, tuple)) else [p]):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)

  walk(closed_jaxpr.jaxpr)
  return counts


def test_chunked_backward_redoes_the_matmul_but_not_the_reductions_over_v():
  """The rematerialised chunk keeps the per-token log-partition: its gradient program has one
  more head matmul than the one-pass loss and no second max or exp-sum pass."""
  x, w, targets, weights = _head_problem(length=32)

  def grad_jaxpr(chunk_len):
    def total(x, w):
      s = losses.chunked_cross_entropy(x, lambda h: h @ w, targets, weights, chunk_len)
      return s["loss_sum"]
    return jax.make_jaxpr(jax.grad(total, (0, 1)))(x, w)

  names = ("dot_general", "reduce_max", "exp")
  whole, chunked = (_count_primitives(grad_jaxpr(c), names) for c in (0, 8))
  assert whole["reduce_max"] == chunked["reduce_max"] == 1, (whole, chunked)
  assert chunked["exp"] == whole["exp"], (whole, chunked)
  assert chunked["dot_general"] == whole["dot_general"] + 1, (whole, chunked)


def test_chunk_that_does_not_divide_the_length_is_refused():
  x, w, targets, weights = _head_problem(length=24)
  with pytest.raises(ValueError, match="loss_chunk_len"):
    losses.chunked_cross_entropy(x, lambda h: h @ w, targets, weights, 5)

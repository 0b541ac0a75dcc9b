"""The head + loss over chunks (chunked_loss) against the one-pass loss and float64."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpr_walk
from openmoe_jax import chunked_loss
from test_losses import _reference


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
    s = chunked_loss.chunked_cross_entropy(x, lambda h: h @ w, targets, weights, chunk_len, z_loss)
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
      s = chunked_loss.chunked_cross_entropy(x, lambda h: h @ w, targets, weights, chunk_len)
      return s["loss_sum"]
    compiled = jax.jit(jax.grad(total, (0, 1))).lower(x, w).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  whole, chunked = temp_bytes(0), temp_bytes(32)
  assert whole >= logits_bytes, (whole, logits_bytes)
  assert chunked < logits_bytes / 4, (chunked, logits_bytes)


def _count_primitives(closed_jaxpr, names):
  counts = dict.fromkeys(names, 0)
  for eqn in jaxpr_walk.equations(closed_jaxpr):
    if eqn.primitive.name in counts:
      counts[eqn.primitive.name] += 1
  return counts


def test_chunked_backward_redoes_the_matmul_but_not_the_reductions_over_v():
  """The rematerialised chunk keeps the per-token log-partition: its gradient program has one
  more head matmul than the one-pass loss and no second max or exp-sum pass."""
  x, w, targets, weights = _head_problem(length=32)

  def grad_jaxpr(chunk_len):
    def total(x, w):
      s = chunked_loss.chunked_cross_entropy(x, lambda h: h @ w, targets, weights, chunk_len)
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
    chunked_loss.chunked_cross_entropy(x, lambda h: h @ w, targets, weights, 5)


def _matmul_head(x, w):
  return x @ w


@pytest.mark.parametrize("chunk", [4, 8, 24])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_fused_objective_equals_whole_in_value_and_gradient(chunk, z_loss):
  """The fused form (gradients formed in the forward) gives the one-pass loss's value, sums
  and gradients, scaled by the incoming cotangent; its sums carry no gradient."""
  x, w, targets, weights = _head_problem()

  def fused(x, w):
    obj, s = chunked_loss.fused_chunked_objective(_matmul_head, x, w, targets, weights, chunk,
                                                  z_loss)
    return 0.37 * obj + s["loss_sum"], s  # the metric adds value, never gradient

  def whole(x, w):
    s = chunked_loss.chunked_cross_entropy(x, lambda h: h @ w, targets, weights, 0, z_loss)
    return 0.37 * (s["loss_sum"] + s["z_loss_sum"]), s

  (v_f, s_f), g_f = jax.value_and_grad(fused, (0, 1), has_aux=True)(x, w)
  (v_w, s_w), g_w = jax.value_and_grad(whole, (0, 1), has_aux=True)(x, w)
  np.testing.assert_allclose(float(v_f), float(v_w) + float(s_w["loss_sum"]), rtol=1e-5)
  for key in s_w:
    np.testing.assert_allclose(float(s_f[key]), float(s_w[key]), rtol=1e-5)
  _, want_dlogits = _reference(np.asarray(x, np.float64) @ np.asarray(w, np.float64),
                               targets, weights, z_loss)
  want_dx = 0.37 * want_dlogits @ np.asarray(w, np.float64).T
  want_dw = 0.37 * np.einsum("bld,blv->dv", np.asarray(x, np.float64), want_dlogits)
  np.testing.assert_allclose(np.asarray(g_f[0]), want_dx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_f[1]), want_dw, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_f[1]), np.asarray(g_w[1]), rtol=1e-4, atol=1e-5)


def test_fused_objective_takes_a_head_weight_pytree():
  """A head with a bias ((weight, bias), `ModelConfig.head_bias`): both gradients match the
  float64 reference (d bias = the sum of d logits over positions)."""
  x, w, targets, weights = _head_problem()
  bias = jax.random.normal(jax.random.key(7), (w.shape[1],)) * 0.5

  def head(h, wb):
    return h @ wb[0] + wb[1]

  obj, _ = chunked_loss.fused_chunked_objective(head, x, (w, bias), targets, weights, 8)
  g_x, (g_w, g_b) = jax.grad(lambda x, wb: chunked_loss.fused_chunked_objective(
      head, x, wb, targets, weights, 8)[0], (0, 1))(x, (w, bias))
  logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(bias, np.float64)
  want_loss, want_dlogits = _reference(logits, targets, weights, 0.0)
  np.testing.assert_allclose(float(obj), want_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g_b), want_dlogits.sum((0, 1)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_w), np.einsum("bld,blv->dv", np.asarray(x, np.float64),
                                                        want_dlogits), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_x), want_dlogits @ np.asarray(w, np.float64).T,
                             rtol=1e-4, atol=1e-5)


def test_fused_objective_runs_three_head_matmuls_per_chunk():
  """Forward logits, d hidden and d weight: no rematerialised fourth matmul, one max pass."""
  x, w, targets, weights = _head_problem(length=32)

  def total(x, w):
    return chunked_loss.fused_chunked_objective(_matmul_head, x, w, targets, weights, 8)[0]

  counts = _count_primitives(jax.make_jaxpr(jax.grad(total, (0, 1)))(x, w),
                             ("dot_general", "reduce_max"))
  assert counts == {"dot_general": 3, "reduce_max": 1}, counts


def test_fused_objective_keeps_bf16_hidden_and_f32_weight_gradients():
  x, w, targets, weights = _head_problem()
  head = functools.partial(_cast_head, jnp.bfloat16)
  g = jax.grad(lambda x, w: chunked_loss.fused_chunked_objective(
      head, x, w, targets, weights, 8)[0], (0, 1))(x.astype(jnp.bfloat16), w)
  assert g[0].dtype == jnp.bfloat16 and g[1].dtype == jnp.float32
  g_ref = jax.grad(lambda x, w: chunked_loss.fused_chunked_objective(
      head, x, w, targets, weights, 0)[0], (0, 1))(x.astype(jnp.bfloat16), w)
  np.testing.assert_allclose(np.asarray(g[1]), np.asarray(g_ref[1]), rtol=2e-2, atol=2e-2)


def _cast_head(dtype, x, w):
  return x @ w.astype(dtype)

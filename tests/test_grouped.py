"""openmoe_jax.grouped: sorted routed matmuls against plain per-row float64 references.

Forward and gradients of `grouped_project` (narrow-input path through `gmm_sum` and wide-input
path through the gathered gmm), `gmm_sum` with rows outside every group (dropped tokens),
gmm's gather-sum backward (`row_positions`) against its scatter-add backward, and the raw
kernel calls it is built from (transposed rhs + row gather, gathered tgmm) in interpret mode.
With JAX_PLATFORMS=cuda the same tests run the GPU kernels ("auto" backend).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openmoe_jax import grouped
from openmoe_jax.kernels import gmm as gmm_lib

jax.config.update("jax_enable_x64", False)
HI = jax.lax.Precision.HIGHEST


def _rel(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _project_ref(src_RI, group_M, weight_M, w_GIO, per_src, per_out):
  """Per natural row, no sorting: sum_{m in n} weight[m] * src[m // per_src] @ w[group[m]]."""
  m = group_M.shape[0]
  rows_MI = src_RI[jnp.arange(m) // per_src]
  y_MO = jnp.einsum("MI,MIO->MO", rows_MI, w_GIO[group_M], precision=HI)
  y_MO = y_MO * weight_M[:, None]
  return y_MO.reshape(m // per_out, per_out, -1).sum(axis=1)


@pytest.mark.parametrize("r,i,o,g,per_src,per_out", [
    (6, 8, 24, 5, 4, 2),    # narrow input (I < O): gate folded in, gmm_sum
    (12, 8, 16, 3, 2, 4),   # narrow input, output sums rows of several sources
    (6, 24, 8, 5, 4, 2),    # wide input (I > O): gathered gmm, un-permute, combine
    (16, 16, 16, 4, 1, 1),  # I == O, one row per source and output
])
def test_grouped_project_matches_reference(r, i, o, g, per_src, per_out):
  ks = jax.random.split(jax.random.key(r * 100 + i), 5)
  m = r * per_src
  src = jax.random.normal(ks[0], (r, i), jnp.float32)
  group = jax.random.randint(ks[1], (m,), 0, g)
  group = group.at[: m // 3].set(1)  # an uneven load, possibly empty groups
  weight = jax.random.uniform(ks[2], (m,), jnp.float32, 0.1, 1.0)
  w = jax.random.normal(ks[3], (g, i, o), jnp.float32) / np.sqrt(i)
  cot = jax.random.normal(ks[4], (m // per_out, o), jnp.float32)

  def loss(fn, src, weight, w):
    return jnp.sum(fn(src, group, weight, w) * cot)

  ours = lambda s, gr, wt, ww: grouped.grouped_project(s, gr, wt, ww, per_src=per_src,
                                                       per_out=per_out)
  ref = lambda s, gr, wt, ww: _project_ref(s, gr, wt, ww, per_src, per_out)
  np.testing.assert_allclose(jax.jit(ours)(src, group, weight, w),
                             ref(src, group, weight, w), rtol=1e-5, atol=1e-5)
  got = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2)))(src, weight, w)
  want = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(src, weight, w)
  for a, b in zip(got, want):
    assert _rel(a, b) < 1e-5


def test_gmm_sum_skips_rows_outside_groups_and_matches_reference():
  """Rows keyed past the last group (dropped tokens) give and get nothing."""
  n, p, i, o, g = 10, 3, 8, 12, 4
  ks = jax.random.split(jax.random.key(1), 4)
  key_M = jax.random.randint(ks[0], (n * p,), 0, g + 1)  # key g = dropped
  order = grouped.stable_order(key_M, g + 1)
  inv = grouped.inverse_permutation(order)
  sizes = jnp.bincount(key_M, length=g).astype(jnp.int32)
  x_nat = jax.random.normal(ks[1], (n * p, i), jnp.float32)
  w = jax.random.normal(ks[2], (g, i, o), jnp.float32)
  cot = jax.random.normal(ks[3], (n, o), jnp.float32)
  kept = (key_M < g).astype(jnp.float32)

  def ours(x_nat, w):
    return grouped.gmm_sum(x_nat[order], w, sizes, inv.reshape(n, p), order // p)

  def ref(x_nat, w):
    y = jnp.einsum("MI,MIO->MO", x_nat, w[jnp.minimum(key_M, g - 1)], precision=HI)
    return (y * kept[:, None]).reshape(n, p, o).sum(axis=1)

  np.testing.assert_allclose(jax.jit(ours)(x_nat, w), ref(x_nat, w), rtol=1e-5, atol=1e-5)
  got = jax.grad(lambda *a: jnp.sum(ours(*a) * cot), argnums=(0, 1))(x_nat, w)
  want = jax.grad(lambda *a: jnp.sum(ref(*a) * cot), argnums=(0, 1))(x_nat, w)
  for a, b in zip(got, want):
    assert _rel(a, b) < 1e-5
  assert np.all(np.asarray(got[0])[np.asarray(key_M) == g] == 0.0)


@pytest.mark.parametrize("activation,split", [("relu", 0), ("swiglu", 8)])
def test_gmm_sum_prologue_equals_precomputed_rows(activation, split):
  """A prologue (activation and gate folded in) gives the value and gradients of gmm_sum on
  rows formed beforehand; the backward recomputes them behind a barrier."""
  from openmoe_jax.moe import GatedActivation
  n, p, f, o, g = 10, 3, 8, 12, 4
  ks = jax.random.split(jax.random.key(4), 5)
  key_M = jax.random.randint(ks[0], (n * p,), 0, g)
  order = grouped.stable_order(key_M, g)
  inv = grouped.inverse_permutation(order)
  sizes = jnp.bincount(key_M, length=g).astype(jnp.int32)
  in_MF = jax.random.normal(ks[1], (n * p, f + split), jnp.float32)
  gate_M = jax.random.uniform(ks[2], (n * p,), jnp.float32)
  w = jax.random.normal(ks[3], (g, f, o), jnp.float32)
  cot = jax.random.normal(ks[4], (n, o), jnp.float32)
  act = GatedActivation(activation, split)
  args = (sizes, inv.reshape(n, p), order // p)

  def fused(in_MF, gate_M, w):
    return grouped.gmm_sum((in_MF, gate_M), w, *args, prologue=act)

  def plain(in_MF, gate_M, w):
    return grouped.gmm_sum(act(in_MF, gate_M), w, *args)

  np.testing.assert_allclose(jax.jit(fused)(in_MF, gate_M, w), plain(in_MF, gate_M, w),
                             rtol=1e-6, atol=1e-6)
  got = jax.grad(lambda *a: jnp.sum(fused(*a) * cot), argnums=(0, 1, 2))(in_MF, gate_M, w)
  want = jax.grad(lambda *a: jnp.sum(plain(*a) * cot), argnums=(0, 1, 2))(in_MF, gate_M, w)
  for a, b in zip(got, want):
    assert _rel(a, b) < 1e-6


def test_gmm_row_positions_gradient_equals_scatter_gradient():
  t, k, d, f, g = 9, 3, 8, 16, 4
  ks = jax.random.split(jax.random.key(2), 4)
  x = jax.random.normal(ks[0], (t, d), jnp.float32)
  w = jax.random.normal(ks[1], (g, d, f), jnp.float32)
  group_M = jax.random.randint(ks[2], (t * k,), 0, g)
  sg = grouped.sort_groups(group_M, g)
  cot = jax.random.normal(ks[3], (t * k, f), jnp.float32)

  def loss(x, positions):
    out = gmm_lib.gmm(x, w, sg.sizes_G, row_index=sg.order_M // k, row_positions=positions)
    return jnp.sum(out * cot)

  with_pos = jax.grad(loss)(x, sg.inv_M.reshape(t, k))
  scatter = jax.grad(loss)(x, None)
  np.testing.assert_allclose(with_pos, scatter, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="row_positions"):
    gmm_lib.gmm(x, w, sg.sizes_G, row_index=sg.order_M // k, row_positions=sg.inv_M[:, None])


def test_gather_rows_gradient_is_sum_over_uses():
  x = jax.random.normal(jax.random.key(3), (5, 4), jnp.float32)
  idx = jnp.array([2, 0, 4, 1, 3, 0, 2, 1, 4, 3], jnp.int32)
  # Each source row is used twice; a stable argsort of the indices lists its two uses.
  pos_RP = jnp.argsort(idx, stable=True).reshape(5, 2).astype(jnp.int32)
  cot = jax.random.normal(jax.random.key(4), (10, 4), jnp.float32)
  got = jax.grad(lambda x: jnp.sum(grouped.gather_rows(x, idx, pos_RP) * cot))(x)
  want = jax.grad(lambda x: jnp.sum(x[idx] * cot))(x)
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu", "pallas_tpu"])
def test_raw_kernel_calls_transposed_gather_and_gathered_tgmm(backend):
  """gmm_nodiff(transpose_rhs, row_index) and tgmm_rows(row_index) against float64 numpy."""
  if backend != "reference" and jax.default_backend() != "cpu":
    pytest.skip("interpret mode is for CPU runs")
  m, n_src, k, n, g = 37, 11, 24, 20, 4
  sizes = jnp.array([9, 0, 17, 6], jnp.int32)  # 5 tail rows
  ks = jax.random.split(jax.random.key(5), 4)
  src = jax.random.normal(ks[0], (n_src, n), jnp.float32)
  w = jax.random.normal(ks[1], (g, k, n), jnp.float32)
  ri = jax.random.randint(ks[2], (m,), 0, n_src)
  rows = jax.random.normal(ks[3], (m, k), jnp.float32)
  interp = backend != "reference"
  out = gmm_lib.gmm_nodiff(src, w, sizes, row_index=ri, transpose_rhs=True, backend=backend,
                           interpret=interp)
  tg = gmm_lib.tgmm_rows(src, rows, sizes, row_index=ri, backend=backend, interpret=interp)
  s_np, w_np, r_np = (np.asarray(a, np.float64) for a in (src, w, rows))
  want_out, want_tg = np.zeros((m, k)), np.zeros((g, n, k))
  start = 0
  for gi, size in enumerate(np.asarray(sizes)):
    sel = np.asarray(ri)[start:start + size]
    want_out[start:start + size] = s_np[sel] @ w_np[gi].T
    want_tg[gi] = s_np[sel].T @ r_np[start:start + size]
    start += size
  assert np.all(np.isfinite(np.asarray(out)))
  assert _rel(out, want_out) < 1e-5 and _rel(tg, want_tg) < 1e-5
  assert np.all(np.asarray(out)[start:] == 0.0)


def test_take_rows_matches_a_gather_in_value_and_gradient():
  """An injective index with out-of-range entries (zero rows) and unused source rows."""
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
  index = jnp.array([4, 6, 0, 2, 9, 5], jnp.int32)  # 6 and 9: out of range; rows 1, 3 unused
  inverse = jnp.full((6,), 6, jnp.int32).at[jnp.array([4, 0, 2, 5])].set(jnp.array([0, 2, 3, 5]))
  cot = jax.random.normal(jax.random.PRNGKey(1), (6, 3))

  def plain(x):
    return jnp.where((index < 6)[:, None], x[jnp.clip(index, 0, 5)], 0.0)

  want, want_vjp = jax.vjp(plain, x)
  got, got_vjp = jax.vjp(lambda x: grouped.take_rows(x, index, inverse), x)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got_vjp(cot)[0], want_vjp(cot)[0])
  assert not np.any(np.asarray(got_vjp(cot)[0])[[1, 3]])

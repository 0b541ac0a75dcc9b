"""kernels/bench.py phase functions on CPU (the timing itself runs on the device machine)."""
import jax
import jax.numpy as jnp
import numpy as np

from openmoe_jax.kernels import bench
from openmoe_jax.kernels import gmm as gmm_lib


def test_phase_fns_compute_the_same_products():
  gs = bench.routed_group_sizes(jax.random.key(0), 64, 4, 2)
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(k1, (128, 32), jnp.float32)
  w = jax.random.normal(k2, (4, 32, 16), jnp.float32)
  dy = jax.random.normal(k3, (128, 16), jnp.float32)
  fwd, bwd, fwdbwd = bench.make_phase_fns(lambda a, b, g: gmm_lib.gmm(a, b, g, backend="reference"))
  y = fwd(x, w, gs)
  dx, dw = bwd(x, w, gs, dy)
  y2, (dx2, dw2) = fwdbwd(x, w, gs, dy)  # fwd+bwd returns the forward too (keeps it live)
  np.testing.assert_allclose(y2, y, rtol=1e-6)
  np.testing.assert_allclose(dx2, dx, rtol=1e-6)
  np.testing.assert_allclose(dw2, dw, rtol=1e-6)
  ref = jax.lax.ragged_dot(x, w, gs, precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  assert int(gs.sum()) == 128


def test_sampled_fwd_err_sees_wrong_rows_and_tail():
  """The bench's forward check (a few groups' rows against float32, tail rows zero) is
  small for a correct result and large when a checked row or a tail row is wrong."""
  k1, k2 = jax.random.split(jax.random.key(0))
  gs = jnp.array([5, 0, 17, 9, 3], jnp.int32)
  x = jax.random.normal(k1, (40, 16), jnp.bfloat16)
  w = jax.random.normal(k2, (5, 16, 8), jnp.bfloat16)
  y = gmm_lib.gmm(x, w, gs, backend="reference")
  assert bench.sampled_fwd_err(y, x, w, gs) < 1e-2
  assert bench.sampled_fwd_err(y.at[20].add(3.0), x, w, gs) > 5e-2  # a row of group 2
  assert bench.sampled_fwd_err(y.at[39].set(1.0), x, w, gs) > 1e-2  # a tail row


def test_dense_baseline_times_equal_operands_at_distinct_addresses(monkeypatch):
  """The dense baseline is the best over copies of its operands placed elsewhere in device
  memory: every placement sees the same values, at addresses no other placement used."""
  monkeypatch.setattr(bench, "time_call", lambda fn, *args, budget_s=0.4: fn(*args))
  x = jax.random.normal(jax.random.key(0), (16, 8), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (8, 4), jnp.float32)
  seen = []

  def fake_timing(a, b):  # "time" = the placement's index, so the best is the first one
    seen.append((a.unsafe_buffer_pointer(), b.unsafe_buffer_pointer()))
    np.testing.assert_array_equal(a, x)
    np.testing.assert_array_equal(b, w)
    return 1.0 + len(seen)

  best = bench.dense_baseline({"fwd": fake_timing}, {"fwd": (x, w)}, placements=3)
  assert best == {"fwd": 2.0}
  assert len(seen) == 3 and len(set(seen)) == 3
  assert len({p for pair in seen for p in pair}) == 6


def test_gpu_state_reads_nvidia_smi_csv():
  assert (bench.gpu_state("1455, 1980, 59, 666.13, 700.00\n") ==
          "SM clock 1455/1980 MHz, 59 C, 666.13/700.00 W")
  assert bench.gpu_state("") == "" and bench.gpu_state("garbled\n") == ""

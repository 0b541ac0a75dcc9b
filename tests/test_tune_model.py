"""openmoe_jax.bench.tune_model on CPU: the calls of a tiny MoE step are found by tracing, and
tuning one of them (Pallas GPU kernels in interpret mode) stores a timed candidate."""
import jax
import jax.numpy as jnp
import numpy as np

from openmoe_jax.bench import train_step as bts
from openmoe_jax.bench import tune_model as tm
from openmoe_jax.kernels.gmm import ops, tuning
from openmoe_jax.kernels.gmm.tiling import Tiling


def _tiny(dispatch="gmm"):
  return bts.apply_overrides(bts.resolve_preset("bench-tiny-moe"), seq=32, dispatch=dispatch)


def test_collect_calls_finds_the_expert_matmuls_of_a_step():
  cfg = _tiny()
  calls = tm.collect_calls(cfg, batch=4, seq=32)
  rows = 4 * 32 * cfg.moe.top_k  # routed rows: every token to top_k experts
  ops_seen = {c.op for c in calls}
  assert {"gmm", "gmm_t", "tgmm"} <= ops_seen  # forward, dx and dW of the expert matmuls
  assert len(calls) == len(set(calls))  # distinct
  for c in calls:
    assert c.g == cfg.moe.num_experts and c.m == rows
    assert {c.k, c.n} <= {cfg.d_model, cfg.moe.d_expert, 2 * cfg.moe.d_expert}
  assert tm.collect_calls(_tiny("einsum"), batch=4, seq=32) == []  # no grouped matmul at all


def test_call_inputs_match_the_call():
  call = ops.Call("gmm_t", m=96, k=32, n=48, g=5, dtype="bfloat16", gather=True, rows=40)
  lhs, rhs, sizes, index = tm.call_inputs(call)
  assert lhs.shape == (40, 32) and rhs.shape == (5, 48, 32) and lhs.dtype == jnp.bfloat16
  assert int(sizes.sum()) == 96 and sizes.shape == (5,)
  idx = np.asarray(index)
  assert idx.shape == (96,) and idx.min() >= 0 and idx.max() < 40 and np.all(np.diff(idx) >= 0)


def test_tune_call_stores_the_fastest_candidate(monkeypatch, tmp_path):
  monkeypatch.setenv("OPENMOE_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(tuning, "_MEMO", {})
  call = ops.Call("gmm", m=64, k=32, n=32, g=3, dtype="float32", gather=True, rows=20)
  cands = [Tiling(16, 16, 16, 4, 2), Tiling(32, 32, 16, 4, 2)]
  best, best_s, before_s = tm.tune_call(call, "pallas_gpu", cands, iters=1, interpret=True)
  assert best_s > 0 and before_s > 0
  monkeypatch.setattr(tuning, "_MEMO", None)  # read the cache file back
  stored = tuning.tuned("pallas_gpu", "gmm", m=64, k=32, n=32, g=3, dtype=jnp.float32,
                        gather=True)
  assert stored == best
  assert tm.backends_for(call, ["pallas_gpu", "pallas_mgpu"]) == ["pallas_gpu"]  # gathered


def test_tune_call_refuses_a_fast_wrong_candidate(monkeypatch, tmp_path):
  """A candidate whose output differs from the tile in use is never stored, however fast."""
  monkeypatch.setenv("OPENMOE_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(tuning, "_MEMO", {})
  right, wrong = Tiling(32, 32, 16, 4, 2), Tiling(16, 16, 16, 4, 2)
  data = jax.random.normal(jax.random.key(0), (1 << 20,))
  slow_right = jax.jit(lambda x: jnp.sort(x)[-64:].reshape(8, 8))

  def runner(call, backend, args, interpret):
    def make(t):
      if t == wrong:
        return lambda: jnp.zeros((8, 8), jnp.float32)  # instant, and wrong
      return lambda: slow_right(data)
    return make

  monkeypatch.setattr(tm, "_runner", runner)
  monkeypatch.setattr(tuning, "lookup", lambda *a, **k: right)
  call = ops.Call("gmm", m=8, k=8, n=8, g=1, dtype="float32", gather=False, rows=8)
  best, _, _ = tm.tune_call(call, "pallas_gpu", [wrong], iters=1)
  assert best == right

"""Dropless shard_map expert parallelism == a dense per-expert reference (forward and gradients),
for several meshes, both exchanges (dense all_to_all; ragged all-to-all emulated on CPU), with
and without capacity drops; clear errors for shapes the mesh cannot split."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from openmoe_jax import expert_parallel as ep
from openmoe_jax import layers
from openmoe_jax import router as router_lib
from openmoe_jax import sharding
from openmoe_jax.config import MeshConfig, MoeConfig

G, S, D, F, E, K = 8, 6, 8, 12, 8, 2


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name):
  """ragged_all_to_all's documented semantics from all_gathers (XLA:CPU lacks the op)."""
  del recv_sizes
  n = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  ops_nMD = jax.lax.all_gather(operand, axis_name)
  in_nn, send_nn, out_nn = (jax.lax.all_gather(v, axis_name)
                            for v in (input_offsets, send_sizes, output_offsets))
  rows = jnp.arange(output.shape[0])
  for s in range(n):
    lo, cnt = out_nn[s, me], send_nn[s, me]
    hit = (rows >= lo) & (rows < lo + cnt)
    src = jnp.clip(in_nn[s, me] + rows - lo, 0, operand.shape[0] - 1)
    output = jnp.where(hit[:, None], ops_nMD[s][src], output)
  return output


def _problem(seed=0, capacity=None, batch_prioritized=False):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  x = jax.random.normal(ks[0], (G, S, D))
  logits = jax.random.normal(ks[1], (G, S, E)) * 2
  mask = (jax.random.uniform(ks[2], (G, S)) > 0.15).astype(jnp.int32)
  routing = router_lib.top_k_routing(logits, mask, top_k=K, capacity=capacity,
                                     batch_prioritized=batch_prioritized)
  w = (jax.random.normal(ks[3], (E, D, F)) * 0.3, jax.random.normal(ks[4], (E, D, F)) * 0.3,
       jax.random.normal(ks[5], (E, F, D)) * 0.3)
  return x, routing, w


def _reference(x, routing, w_gate, w_up, w_out, gates):
  """Every expert on every token, then the kept assignments' weighted sum."""
  h = layers.activate("swiglu", jnp.einsum("GSD,EDF->GSEF", x, w_gate),
                      jnp.einsum("GSD,EDF->GSEF", x, w_up))
  y_GSED = jnp.einsum("GSEF,EFD->GSED", h, w_out)
  onehot_GASE = (jax.nn.one_hot(routing.token_GA, S)[..., None] *
                 jax.nn.one_hot(routing.expert_GA, E)[:, :, None, :])
  coef_GSE = jnp.einsum("GASE,GA->GSE", onehot_GASE,
                        jnp.where(routing.kept_GA, gates, 0.0))
  return jnp.einsum("GSED,GSE->GSD", y_GSED, coef_GSE)


def _loss_and_grads(fn, x, routing, w, gates):
  cot = jax.random.normal(jax.random.PRNGKey(9), x.shape)

  def loss(x, gates, *w):
    return jnp.sum(fn(x, routing, *w, gates) * cot)

  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(x, gates, *w)


def _sharded(mesh, rules, exchange, slack=1.25, chunks=1, top_k=K):
  def fn(x, routing, w_gate, w_up, w_out, gates):
    with sharding.activate(mesh, rules):
      return ep.moe_ffn(x, routing.token_GA, routing.expert_GA, routing.kept_GA, gates, w_gate,
                        w_up, w_out, activation="swiglu", gmm_backend="reference",
                        exchange=exchange, slack=slack, chunks=chunks, top_k=top_k)
  return fn


def _assert_close(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-4, atol=2e-5)


CASES = [  # (mesh, rules, exchange, top_k: 0 = the scatter-add combine of any layout)
    (MeshConfig(data=1, expert=8), "fsdp_expert", "dense", 0),
    (MeshConfig(data=1, expert=8), "fsdp_expert", "dense", K),
    (MeshConfig(data=2, expert=4), "fsdp_expert", "ragged", K),
    (MeshConfig(data=1, fsdp=2, expert=2, tensor=2), "fsdp_expert_tensor", "dense", K),
    (MeshConfig(data=1, fsdp=2, expert=2, tensor=2), "fsdp_expert_tensor", "ragged", 0),
    (MeshConfig(data=8), "data_parallel", "dense", K),  # one expert shard: local per shard
]


@pytest.mark.parametrize("mesh_cfg,rules,exchange,top_k", CASES)
def test_shard_map_matches_reference(mesh_cfg, rules, exchange, top_k, monkeypatch):
  if exchange == "ragged":
    monkeypatch.setattr(ep, "_ragged_all_to_all", _emulated_ragged_all_to_all)
  x, routing, w = _problem()
  gates = routing.gate_GA
  want = _loss_and_grads(jax.jit(_reference), x, routing, w, gates)
  mesh = sharding.make_mesh(mesh_cfg)
  got = _loss_and_grads(jax.jit(_sharded(mesh, sharding.RULES[rules], exchange, top_k=top_k)),
                        x, routing, w, gates)
  _assert_close(got, want)
  assert float(jnp.abs(want[1][2]).sum()) > 0  # the expert weights do get gradients


@pytest.mark.parametrize("backend,flags,want", [
    ("cpu", "", "dense"), ("tpu", "", "ragged"), ("gpu", "", "dense"),
    ("gpu", "--xla_gpu_unsupported_enable_ragged_all_to_all_decomposer=true", "ragged")])
def test_auto_exchange_avoids_xlas_in_process_ragged_kernel(backend, flags, want, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  monkeypatch.setenv("XLA_FLAGS", flags)
  assert ep.resolve_exchange("auto") == want
  assert ep.resolve_exchange("ragged") == "ragged"


def test_exchange_capacity():
  assert ep.exchange_capacity(24, 4, 1.25) == 8      # ceil(7.5) -> 8 rows
  assert ep.exchange_capacity(1000, 2, 1.25) == 632  # ceil(625) rounded up to 8
  assert ep.exchange_capacity(24, 4, 0.0) == 24      # worst case
  assert ep.exchange_capacity(24, 1, 1.25) == 24     # nothing to exchange
  assert ep.exchange_capacity(24, 2, 4.0) == 24      # never above the worst case


def _max_pair_rows(routing, shards: int, n: int) -> int:
  """The largest number of kept rows one source device sends to one destination device."""
  expert = np.asarray(routing.expert_GA).reshape(shards, -1)
  kept = np.asarray(routing.kept_GA).reshape(shards, -1)
  dest = expert // (E // n)
  return max(int(np.sum(kept[s] & (dest[s] == d))) for s in range(shards) for d in range(n))


@pytest.mark.parametrize("exchange", ["dense", "ragged"])
@pytest.mark.parametrize("skewed", [False, True])
def test_small_exchange_buffers_and_their_fallback(exchange, skewed, monkeypatch):
  """Buffers of slack x the balanced share when every device pair fits; when one pair does not
  (all rows routed to the first device's experts), the worst-case branch gives the same result."""
  if exchange == "ragged":
    monkeypatch.setattr(ep, "_ragged_all_to_all", _emulated_ragged_all_to_all)
  x, routing, w = _problem(seed=3)
  if skewed:
    routing = routing._replace(expert_GA=routing.expert_GA % 2)  # experts 0, 1: device 0
  slack = 2.0
  m, n = G * S * K // 4, 4  # assignments per device on a (data=1, expert=4) mesh
  cap = ep.exchange_capacity(m, n, slack)
  assert cap < m
  assert (_max_pair_rows(routing, 4, n) > cap) == skewed  # which branch runs
  gates = routing.gate_GA
  want = _loss_and_grads(jax.jit(_reference), x, routing, w, gates)
  mesh = sharding.make_mesh(MeshConfig(data=1, expert=4), jax.devices()[:4])
  got = _loss_and_grads(jax.jit(_sharded(mesh, sharding.RULES["fsdp_expert"], exchange, slack)),
                        x, routing, w, gates)
  _assert_close(got, want)


@pytest.mark.parametrize("exchange", ["dense", "ragged"])
def test_chunked_exchange_matches_reference(exchange, monkeypatch):
  """Each device's 4 groups in 2 independent pieces (own sort, exchange, FFN)."""
  if exchange == "ragged":
    monkeypatch.setattr(ep, "_ragged_all_to_all", _emulated_ragged_all_to_all)
  x, routing, w = _problem(seed=4)
  gates = routing.gate_GA
  want = _loss_and_grads(jax.jit(_reference), x, routing, w, gates)
  mesh = sharding.make_mesh(MeshConfig(data=1, expert=2), jax.devices()[:2])
  rules = sharding.RULES["fsdp_expert"]
  _assert_close(_loss_and_grads(jax.jit(_sharded(mesh, rules, exchange, chunks=2)), x, routing,
                                w, gates), want)
  with pytest.raises(ValueError, match="exchange_chunks=3 does not divide the 4"):
    _sharded(mesh, rules, exchange, chunks=3)(x, routing, *w, gates)


@pytest.mark.parametrize("batch_prioritized", [False, True])
def test_capacity_drops_are_honoured_and_local_path_matches(batch_prioritized):
  """Dropped assignments give nothing; with batch-prioritized routing each block of S
  assignments holds the tokens in confidence order (the gather combine must follow it)."""
  x, routing, w = _problem(seed=1, capacity=2, batch_prioritized=batch_prioritized)
  assert not bool(jnp.all(routing.kept_GA == routing.routed_GA))  # some assignments dropped
  gates = routing.gate_GA
  want = _loss_and_grads(jax.jit(_reference), x, routing, w, gates)
  local = functools.partial(ep.moe_ffn, activation="swiglu", gmm_backend="reference", top_k=K)

  def no_mesh(x, routing, w_gate, w_up, w_out, gates):
    return local(x, routing.token_GA, routing.expert_GA, routing.kept_GA, gates, w_gate, w_up,
                 w_out)

  _assert_close(_loss_and_grads(jax.jit(no_mesh), x, routing, w, gates), want)
  mesh = sharding.make_mesh(MeshConfig(data=2, expert=4))
  _assert_close(_loss_and_grads(jax.jit(_sharded(mesh, sharding.RULES["fsdp_expert"], "dense")),
                                x, routing, w, gates), want)


def test_sharded_inputs_and_outputs_stay_sharded():
  x, routing, w = _problem()
  mesh = sharding.make_mesh(MeshConfig(data=2, expert=4))
  x = jax.device_put(x, NamedSharding(mesh, P(sharding.BATCH_MESH_AXES)))
  y = jax.jit(_sharded(mesh, sharding.RULES["fsdp_expert"], "dense"))(x, routing, *w,
                                                                     routing.gate_GA)
  assert y.sharding.spec[0] == sharding.BATCH_MESH_AXES


def test_errors_name_the_bad_values():
  x, routing, w = _problem()
  mesh = sharding.make_mesh(MeshConfig(data=1, expert=8))
  fn = _sharded(mesh, sharding.RULES["fsdp_expert"], "dense")
  w6 = tuple(a[:6] for a in w)
  with pytest.raises(ValueError, match="num_experts=6 is not divisible"):
    fn(x, routing._replace(expert_GA=routing.expert_GA % 6), *w6, routing.gate_GA)
  with pytest.raises(ValueError, match="6 routing groups are not divisible"):
    fn(x[:6], jax.tree.map(lambda a: a[:6], routing), *w, routing.gate_GA[:6])
  with pytest.raises(ValueError, match="exchange='bogus'"):
    ep.resolve_exchange("bogus")
  with pytest.raises(ValueError, match="MoeConfig.exchange"):
    MoeConfig(num_experts=8, exchange="bogus")

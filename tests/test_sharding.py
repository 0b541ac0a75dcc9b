"""Every sharding preset on 8 fake CPU devices gives the loss and gradients of one device (dense
and MoE layers, GSPMD einsum and shard_map expert parallelism); start-up validation errors."""
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from openmoe_jax import axes as ax
from openmoe_jax import gin_setup, sharding
from openmoe_jax import train_step as ts
from openmoe_jax.config import MeshConfig, ModelConfig, MoeConfig, OptimConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, L, V = 8, 16, 64


def model_cfg(dispatch: str = "einsum") -> ModelConfig:
  moe = MoeConfig(num_experts=8, top_k=2, layer_period=2, layer_offset=1, dispatch=dispatch,
                  gmm_backend="reference", capacity_factor_train=1.0,
                  dropless=dispatch == "shard_map")
  return ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=64, dtype="float32",
                     moe=moe)


def batch() -> dict[str, jax.Array]:
  rng = np.random.default_rng(0)
  seg = np.ones((B, L), np.int32)
  seg[:, L - 3:] = 0  # some padding: masked tokens are not routed
  return {"decoder_input_tokens": jnp.asarray(rng.integers(1, V, (B, L)), jnp.int32),
          "decoder_target_tokens": jnp.asarray(rng.integers(1, V, (B, L)), jnp.int32),
          "decoder_loss_weights": jnp.asarray(seg, jnp.float32),
          "decoder_segment_ids": jnp.asarray(seg),
          "decoder_positions": jnp.asarray(np.tile(np.arange(L), (B, 1)), jnp.int32),
          "decoder_causal_attention": jnp.zeros((B, L), jnp.int32)}


def loss_and_grads(cfg: ModelConfig, mesh, rules) -> tuple[float, dict, object]:
  """The train objective's value and parameter gradients, jitted with explicit shardings."""
  setup = ts.make_setup(cfg, OptimConfig(), 10, 0, mesh, rules)
  params = ts.init_state(setup, 0)["params"]
  data = batch()
  weight = jnp.sum(data["decoder_loss_weights"])

  def objective(params, data):
    with sharding.activate(mesh, rules):
      sums, _ = ts._forward_sums(  # pylint: disable=protected-access
          setup, params, data, None, deterministic=False)
    return (sums["loss_sum"] + sums["z_loss_sum"]) / weight + sums["aux_loss"]

  fn = jax.jit(jax.value_and_grad(objective),
               in_shardings=(setup.state_shardings["params"],
                             ts.batch_shardings(setup, data)),
               out_shardings=(NamedSharding(mesh, P()), setup.state_shardings["params"]))
  value, grads = fn(params, data)
  return float(value), grads, setup


PRESETS = [
    ("data_parallel", MeshConfig(data=8)),
    ("fsdp", MeshConfig(data=2, fsdp=4)),
    ("fsdp_expert", MeshConfig(data=1, fsdp=2, expert=4)),
    ("fsdp_expert_tensor", MeshConfig(data=1, fsdp=2, expert=2, tensor=2)),
]
CASES = [(r, m, "einsum") for r, m in PRESETS] + [
    ("fsdp_expert_tensor", MeshConfig(data=1, fsdp=2, expert=2, tensor=2), "shard_map")]
_REFERENCE: dict[str, tuple] = {}


def reference(dispatch: str) -> tuple:
  if dispatch not in _REFERENCE:
    one = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    _REFERENCE[dispatch] = loss_and_grads(model_cfg(dispatch), one, sharding.RULES["data_parallel"])
  return _REFERENCE[dispatch]


@pytest.mark.parametrize("rules,mesh_cfg,dispatch", CASES)
def test_preset_matches_one_device(rules, mesh_cfg, dispatch):
  want_loss, want_grads, _ = reference(dispatch)
  mesh = sharding.make_mesh(mesh_cfg)
  loss, grads, setup = loss_and_grads(model_cfg(dispatch), mesh, sharding.RULES[rules])
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want_grads)[0])
  flat_got = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert len(flat_got) == len(flat_want)
  for path, g in flat_got:
    np.testing.assert_allclose(np.asarray(g), np.asarray(flat_want[path]), rtol=2e-4, atol=2e-6,
                               err_msg=jax.tree_util.keystr(path))
  # The preset really shards: expert weights over "expert", embed over "fsdp" where asked.
  specs = {jax.tree_util.keystr(p): s.spec for p, s in
           jax.tree_util.tree_flatten_with_path(setup.state_shardings["params"])[0]}
  w_gate = next(s for k, s in specs.items() if "w_gate_EDF" in k)
  table = dict(sharding.RULES[rules])
  assert tuple(w_gate) == (table[ax.LAYERS], table[ax.EXPERT], table[ax.EMBED],
                               table[ax.EXPERT_MLP])


def test_validation_reports_uncovered_names_and_bad_axes():
  mesh = sharding.make_mesh(MeshConfig(data=8))
  rules = tuple((n, t) for n, t in sharding.RULES["fsdp"] if n != ax.VOCAB)
  with pytest.raises(ValueError, match="without a rule: \\['vocab'\\]"):
    sharding.validate_rules(rules, mesh)
  with pytest.raises(ValueError, match="'pipeline': not a mesh axis"):
    sharding.validate_rules(sharding.RULES["fsdp"] + (("extra", "pipeline"),), mesh)
  with pytest.raises(ValueError, match="more than one rule: \\['embed'\\]"):
    sharding.validate_rules(sharding.RULES["fsdp"] + ((ax.EMBED, None),), mesh)
  with pytest.raises(ValueError, match="mesh axis 'expert' is used by both 'batch' and"):
    sharding.spec((ax.BATCH, ax.ACT_EXPERT), sharding.RULES["fsdp_expert"])
  with pytest.raises(ValueError, match="rules='nope'"):
    sharding.rules_for("nope")


def test_validation_reports_non_dividing_dimensions():
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, expert=2))

  def setup(d_model, num_experts):
    cfg = ModelConfig(vocab_size=V, d_model=d_model, n_layers=2, n_heads=2, d_ff=64,
                      dtype="float32", moe=MoeConfig(num_experts=num_experts, layer_period=2,
                                                     layer_offset=1))
    return ts.make_setup(cfg, OptimConfig(), 10, 0, mesh, sharding.RULES["fsdp_expert"])

  with pytest.raises(ValueError, match="not divisible by their mesh axes") as err:
    setup(32, 3)
  assert "w_gate_EDF" in str(err.value) and "size 3 over mesh axes ('expert',)" in str(err.value)
  with pytest.raises(ValueError, match="size 30 over mesh axes \\('fsdp',\\) \\(size 4\\)"):
    setup(30, 4)
  setup(32, 4)  # divisible: fine
  with pytest.raises(ValueError, match="batch size 12 is not divisible by the 8 batch shards"):
    sharding.check_batch(12, mesh)


def test_mesh_sizes_and_errors():
  assert dict(sharding.make_mesh(MeshConfig(data=2, fsdp=-1)).shape) == {
      "data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
  with pytest.raises(ValueError, match="not divisible by the fixed axes' product 3"):
    sharding.make_mesh(MeshConfig(data=-1, expert=3))
  with pytest.raises(ValueError, match="need 16 devices; 8 available"):
    sharding.make_mesh(MeshConfig(data=2, fsdp=8))
  sub = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, num_devices=2))
  assert dict(sub.shape) == {"data": 1, "fsdp": 2, "expert": 1, "tensor": 1}
  assert list(sub.devices.flat) == jax.devices()[:2]
  with pytest.raises(ValueError, match="num_devices=9; only 8 devices"):
    sharding.make_mesh(MeshConfig(num_devices=9))
  with pytest.raises(ValueError, match="MeshConfig.num_devices=-1"):
    MeshConfig(num_devices=-1)


@pytest.mark.parametrize("name", sorted(sharding.RULES))
def test_gin_preset_builds_a_valid_mesh(name):
  gin_setup.register()
  gin.clear_config()
  try:
    gin_setup.parse([os.path.join(REPO, "gin", "sharding", f"{name}.gin")])
    cfg = gin_setup.configured("MeshConfig")()
  finally:
    gin.clear_config()
  assert cfg.rules == name
  mesh = sharding.make_mesh(cfg)
  assert mesh.devices.size == 8
  sharding.validate_rules(sharding.rules_for(cfg.rules), mesh)


def test_multi_host_mesh_puts_the_host_boundary_on_data_or_fsdp(monkeypatch):
  """Fake GPU devices of 2 processes: the slow (DCN) split lands on data, else fsdp."""
  import dataclasses  # pylint: disable=import-outside-toplevel

  @dataclasses.dataclass(frozen=True)
  class FakeGpu:
    id: int
    process_index: int
    platform: str = "gpu"
    device_kind: str = "fake"

  devices = [FakeGpu(i, i // 4) for i in range(8)]
  monkeypatch.setattr(sharding, "Mesh", lambda arr, names: arr)
  proc = np.vectorize(lambda d: d.process_index)
  arr = sharding.make_mesh(MeshConfig(data=2, fsdp=2, expert=2), devices)
  assert (proc(arr) == np.arange(2).reshape(2, 1, 1, 1)).all()
  arr = sharding.make_mesh(MeshConfig(data=1, fsdp=4, expert=2), devices)
  assert (proc(arr) == np.repeat(np.arange(2), 2).reshape(1, 4, 1, 1)).all()
  with pytest.raises(ValueError, match="2 slices/hosts must divide one of"):
    sharding.make_mesh(MeshConfig(data=1, fsdp=1, expert=8), devices)

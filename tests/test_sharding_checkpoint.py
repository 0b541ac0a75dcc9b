"""A train state saved sharded on a (data=2, fsdp=4) mesh restores bit-exactly on (8, 1) and on
one device, lands in the new run's shardings, and the next step's loss agrees everywhere."""
import jax
import numpy as np

from openmoe_jax import checkpoint as ckpt_lib
from openmoe_jax import sharding
from openmoe_jax import train_step as ts
from openmoe_jax.config import MeshConfig, OptimConfig

from test_sharding import batch, model_cfg  # pylint: disable=wrong-import-order


def _setup(mesh_cfg, devices=None):
  mesh = sharding.make_mesh(mesh_cfg, devices)
  return ts.make_setup(model_cfg("einsum"), OptimConfig(warmup_steps=0), 10, 0, mesh,
                       sharding.RULES["fsdp"])


def test_checkpoint_moves_between_meshes(tmp_path):
  data = batch()
  src = _setup(MeshConfig(data=2, fsdp=4))
  state = ts.init_state(src, 0)
  step = ts.jit_train_step(src, data)
  state, _ = step(state, data)
  # Parameters really are split over fsdp on the source mesh.
  emb = state["params"]["embed"]["embedding_VD"]
  assert emb.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=1, every=1)
  ckpt.save(1, state, {"position": 7}, force=True)
  ckpt.wait()
  want = jax.tree.map(np.asarray, state)
  _, want_metrics = step(state, data)  # donates `state`; `want` holds host copies

  for mesh_cfg, devices in ((MeshConfig(data=8), None), (MeshConfig(data=1), jax.devices()[:1])):
    dst = _setup(mesh_cfg, devices)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                            jax.eval_shape(lambda dst=dst: ts.init_state(dst, 0)))
    restored, data_state = ckpt.restore(abstract, dst.state_shardings)
    assert data_state == {"position": 7}
    for (path, a), b, s in zip(jax.tree_util.tree_flatten_with_path(restored)[0],
                               jax.tree.leaves(want), jax.tree.leaves(dst.state_shardings)):
      np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))
      assert a.sharding.is_equivalent_to(s, a.ndim), jax.tree_util.keystr(path)
      assert len(a.sharding.device_set) == dst.mesh.devices.size
    _, metrics = ts.jit_train_step(dst, data)(restored, data)
    np.testing.assert_allclose(float(metrics["loss"]), float(want_metrics["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(want_metrics["grad_norm"]),
                               rtol=1e-4)
  ckpt.close()

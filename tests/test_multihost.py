"""Two CPU processes x 4 devices joined by `distributed.initialize` (explicit coordinator) train
one step on a global (data=2, fsdp=4) mesh from per-host batch rows, and save an orbax checkpoint
together; the loss, the gradient norm and the updated parameters equal one process with 8
devices, and one process restores the checkpoint on a single device bit-exactly (against the
two hosts' own state, gathered)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _setup(mesh_cfg, devices=None):
  from openmoe_jax import sharding, train_step as ts  # pylint: disable=import-outside-toplevel
  from openmoe_jax.config import OptimConfig  # pylint: disable=import-outside-toplevel
  from test_sharding import model_cfg  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(mesh_cfg, devices)
  return ts.make_setup(model_cfg("shard_map"), OptimConfig(warmup_steps=0), 10, 0, mesh,
                       sharding.RULES["fsdp"])


def _worker(workdir: str) -> None:
  """One host: 4 local devices of 8, its 4 batch rows, one step, a shared checkpoint."""
  from openmoe_jax import distributed  # pylint: disable=import-outside-toplevel
  assert distributed.initialize()  # JAX_COORDINATOR_ADDRESS & co. from the parent
  import jax  # pylint: disable=import-outside-toplevel
  from openmoe_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from openmoe_jax import sharding, train_step as ts  # pylint: disable=import-outside-toplevel
  from openmoe_jax.config import MeshConfig  # pylint: disable=import-outside-toplevel
  from test_sharding import batch  # pylint: disable=import-outside-toplevel
  host, hosts = jax.process_index(), jax.process_count()
  assert (hosts, jax.device_count(), jax.local_device_count()) == (2, 8, 4)
  setup = _setup(MeshConfig(data=2, fsdp=4))
  rows = 8 // hosts
  local = {k: np.asarray(v)[host * rows:(host + 1) * rows] for k, v in batch().items()}
  data = {k: jax.make_array_from_process_local_data(sharding.batch_sharding(setup.mesh, v.ndim), v)
          for k, v in local.items()}
  state, metrics = ts.jit_train_step(setup, data)(ts.init_state(setup, 0), data)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "ckpt"), keep=1, every=1)
  ckpt.save(1, state, {"host_count": hosts}, force=True)
  ckpt.close()
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  leaves = [np.asarray(x) for x in
            jax.tree.leaves(multihost_utils.process_allgather(state, tiled=True))]
  if host == 0:
    np.savez(os.path.join(workdir, "state.npz"), *leaves)
  with open(os.path.join(workdir, f"host{host}.json"), "w", encoding="utf-8") as f:
    json.dump({"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}, f)


def _eval_worker(workdir: str) -> None:
  """One host of a full-pass evaluation: its shard of the validation split; the hosts' shards
  end after different numbers of batches."""
  from openmoe_jax import distributed  # pylint: disable=import-outside-toplevel
  assert distributed.initialize()
  import jax  # pylint: disable=import-outside-toplevel
  from openmoe_jax import evaluation  # pylint: disable=import-outside-toplevel
  from openmoe_jax.config import MeshConfig  # pylint: disable=import-outside-toplevel
  summary = evaluation.run(workdir, batches=0, mesh=MeshConfig(), write=False, progress=False)
  with open(os.path.join(workdir, f"eval{jax.process_index()}.json"), "w",
            encoding="utf-8") as f:
    json.dump(summary, f)


def _run_two_hosts(tmp_path, *args) -> None:
  env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}",
         "JAX_NUM_PROCESSES": "2", "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
  procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path), *args],
                            env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=240)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)


def test_full_pass_evaluation_on_two_hosts_covers_both_shards(tmp_path):
  from openmoe_jax import train  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from openmoe_jax.config import DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
  from openmoe_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "run"
  train.run(str(workdir), model=ModelConfig(vocab_size=0, d_model=32, n_layers=1, n_heads=2,
                                            d_ff=64, dtype="float32"),
            data=DataConfig(), optim=OptimConfig(), mesh=MeshConfig(num_devices=1),
            train=TrainConfig(steps=1, batch_size=8, seq_len=128, eval_batches=1,
                              sample_tokens=0), progress=False)
  _run_two_hosts(workdir, "eval")
  got = [json.loads((workdir / f"eval{i}.json").read_text()) for i in range(2)]
  assert got[0] == got[1]
  # Each host reads 4 rows a batch from its shard; the shorter shard pads with empty batches.
  counts = []
  for shard in range(2):
    it = pipeline.make_iterator(DataConfig(), "validation", 4, 128, 0, shard_index=shard,
                                num_shards=2, num_epochs=1)
    counts.append([float(b["decoder_loss_weights"].sum()) for b in it])
  assert len(counts[0]) != len(counts[1])  # the padding path runs
  assert got[0]["batches"] == max(map(len, counts))
  assert got[0]["results"]["all"]["tokens"] == sum(map(sum, counts))


def test_two_processes_match_one_and_checkpoint_restores(tmp_path):
  _run_two_hosts(tmp_path)
  got = [json.loads((tmp_path / f"host{i}.json").read_text()) for i in range(2)]
  assert got[0] == got[1]

  import jax  # pylint: disable=import-outside-toplevel
  from openmoe_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from openmoe_jax import train_step as ts  # pylint: disable=import-outside-toplevel
  from openmoe_jax.config import MeshConfig  # pylint: disable=import-outside-toplevel
  from test_sharding import batch  # pylint: disable=import-outside-toplevel
  setup = _setup(MeshConfig(data=2, fsdp=4))
  data = batch()
  want_state, want = ts.jit_train_step(setup, data)(ts.init_state(setup, 0), data)
  np.testing.assert_allclose(got[0]["loss"], float(want["loss"]), rtol=1e-5)
  np.testing.assert_allclose(got[0]["grad_norm"], float(want["grad_norm"]), rtol=1e-4)

  one = _setup(MeshConfig(data=1), jax.devices()[:1])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                          jax.eval_shape(lambda: ts.init_state(one, 0)))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), keep=1, every=1)
  restored, data_state = ckpt.restore(abstract, one.state_shardings)
  ckpt.close()
  assert data_state == {"host_count": 2}
  saved = np.load(tmp_path / "state.npz")
  hosts_state = [saved[f"arr_{i}"] for i in range(len(saved.files))]
  restored = jax.tree.leaves(restored)
  assert len(restored) == len(hosts_state)
  for a, b in zip(restored, hosts_state):  # the restore is exact
    np.testing.assert_array_equal(np.asarray(a), b)
  # Two hosts sum gradients in another order than one. Adam divides by sqrt(v), so a parameter
  # whose gradient is ~0 can move differently by up to the learning rate (seen: 1.3e-6 on 1 of
  # 2048). So at most 0.1% of a leaf's elements (or one) may differ by more than 1e-6: an update
  # applied to the wrong shard, or not at all, moves far more. (Wrong gradient values are
  # caught by the gradient norm above; Adam's first step barely depends on their scale.)
  for a, b in zip(hosts_state, jax.tree.leaves(want_state)):
    b = np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    if np.issubdtype(a.dtype, np.floating) and a.size:
      off = np.abs(a.astype(np.float64) - b) > 1e-6 + 1e-5 * np.abs(b)
      assert off.sum() <= max(1, 1e-3 * a.size), (a.shape, int(off.sum()))
    else:
      np.testing.assert_array_equal(a, b)


if __name__ == "__main__":
  (_eval_worker if sys.argv[2:] == ["eval"] else _worker)(sys.argv[1])

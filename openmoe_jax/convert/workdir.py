"""Write converted parameters as a training workdir: orbax checkpoint + config.json, atomically.

The result is what `train.run` writes itself (checkpoints/<step>/{state, data} with the flat
"params/..." state and a fresh optimizer state, plus config.json), so `inference.load(workdir)`
samples from it and `train.run(workdir, <same configs>)` fine-tunes from it. Everything is
written into a sibling temporary directory that is renamed into place only when complete, so a
failure leaves no partial output.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp

from openmoe_jax import checkpoint as ckpt_lib
from openmoe_jax import optimizer as optim_lib
from openmoe_jax import train as train_lib
from openmoe_jax.config import DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig


def initial_data_state(data: DataConfig, train: TrainConfig) -> dict[str, Any]:
  """The state of a fresh training iterator (what train.run would checkpoint before step 1)."""
  from openmoe_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  it = pipeline.make_iterator(data, "train", train.batch_size // jax.process_count(),
                              train.seq_len, data.seed)
  return it.get_state()


def check_output_dir(out_workdir: str) -> None:
  if os.path.exists(out_workdir) and os.listdir(out_workdir):
    raise FileExistsError(f"{out_workdir} exists and is not empty; choose a new output workdir")


def write(out_workdir: str, model: ModelConfig, params: Any, *, source: dict[str, Any],
          optim: OptimConfig, data: DataConfig, train: TrainConfig, mesh: MeshConfig,
          data_state: dict[str, Any] | None, step: int = 0) -> str:
  """Saves `params` (an nnx.State of the model built from `model`) as a workdir at `step`.

  data_state None: the fresh-iterator state of `data` (needed for `train.run` to resume).
  `source` (what was converted, from where) is recorded in config.json.
  """
  out_workdir = os.path.abspath(out_workdir)
  check_output_dir(out_workdir)
  if data_state is None:
    data_state = initial_data_state(data, train)
  tmp = f"{out_workdir}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    os.makedirs(tmp)
    tx = optim_lib.make(optim, train.steps)
    state = {"step": jnp.asarray(step, jnp.int32), "params": params,
             "opt_state": tx.init(params), "rng": jax.random.PRNGKey(train.seed + 1)}
    ckpt = ckpt_lib.Checkpointer(os.path.join(tmp, "checkpoints"), train.keep_checkpoints,
                                 train.checkpoint_every)
    ckpt.save(step, state, data_state, force=True)
    ckpt.close()
    config = train_lib.resolved_config(model, data, optim, train, mesh)
    record = {**config, "git_sha": train_lib._git_sha(),  # pylint: disable=protected-access
              "argv": sys.argv, "converted_from": source}
    with open(os.path.join(tmp, train_lib.CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(record, f, indent=2, default=str)
    if os.path.isdir(out_workdir):  # an empty directory may stand in the way
      os.rmdir(out_workdir)
    os.rename(tmp, out_workdir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_workdir

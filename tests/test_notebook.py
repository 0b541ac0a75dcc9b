"""examples/inference.ipynb runs headless (nbclient) on a checkpoint written by a training run.

The run is tiny_moeut.gin for a few steps, so this is also the test that the MoEUT family trains
from its gin file (tests/test_moeut.py trains UMoE from its own)."""
import os

import nbformat
import numpy as np
from nbclient import NotebookClient

from openmoe_jax import gin_setup, metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT_RUN = ["TrainConfig.steps = 6", "TrainConfig.batch_size = 8", "TrainConfig.seq_len = 64",
             "TrainConfig.eval_every = 0", "TrainConfig.eval_batches = 1",
             "TrainConfig.checkpoint_every = 0", "TrainConfig.log_every = 1",
             "TrainConfig.sample_tokens = 0", "OptimConfig.warmup_steps = 2",
             "MeshConfig.num_devices = 2"]  # sharded, at a fraction of 8 devices' compile time


def train_from_gin(experiment: str, workdir: str) -> list[float]:
  """A short run of gin/experiments/<experiment>; returns the logged training losses."""
  gin_setup.clear()
  gin_setup.parse([f"experiments/{experiment}"], SHORT_RUN)
  try:
    gin_setup.configured("run")(workdir=workdir, progress=False)
  finally:
    gin_setup.clear()
  return [r["train/loss"] for r in metrics.read_jsonl(workdir) if "train/loss" in r]


def test_notebook_runs_on_a_trained_moeut_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  losses = train_from_gin("tiny_moeut.gin", workdir)
  assert len(losses) == 6 and all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < losses[0] - 0.5, losses
  assert os.path.isdir(os.path.join(workdir, "checkpoints"))

  monkeypatch.setenv("OPENMOE_WORKDIR", workdir)
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders PNGs
  nb = nbformat.read(os.path.join(REPO, "examples", "inference.ipynb"), as_version=4)
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": REPO}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert "step 6:" in text and "attention=switchhead" in text
  assert text.count("greedy :") == 3 and "max / uniform load per layer" in text
  assert any("image/png" in o.get("data", {}) for o in outputs)  # the expert-load plot
  assert "validation split, 2 batches" in text and "| all |" in text

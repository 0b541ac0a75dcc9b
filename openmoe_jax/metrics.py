"""Metric logging: TensorBoard scalars / histograms / images and a metrics.jsonl per run."""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np


def flatten_moe(aux: Any) -> dict[str, np.ndarray]:
  """{"segment0/block3/expert_load_E": array [repeats, ...]} -> per-layer named arrays."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(aux)[0]:
    out["/".join(str(getattr(p, "key", p)) for p in path)] = np.asarray(leaf)
  return out


def moe_summary(aux: Any) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Scalars averaged over MoE layers, and per-layer expert loads stacked as [layers, E]."""
  flat = flatten_moe(aux)
  scalars: dict[str, list[float]] = {}
  loads = []
  for name, value in sorted(flat.items()):
    metric = name.rsplit("/", 1)[-1]
    if metric.endswith("_E"):
      loads.append(value.reshape(-1, value.shape[-1]))
    else:
      scalars.setdefault(metric, []).append(float(np.mean(value)))
  mean = {f"moe/{k}": float(np.mean(v)) for k, v in scalars.items()}
  return mean, ({"expert_load_LE": np.concatenate(loads)} if loads else {})


class Writer:
  """Writes scalars to TensorBoard (tensorboardX, no TensorFlow needed) and metrics.jsonl."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": step, **{f"{prefix}/{k}": float(v) for k, v in values.items()}}
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in values.items():
      self.tb.add_scalar(f"{prefix}/{k}", float(v), step)

  def expert_load(self, step: int, load_LE: np.ndarray) -> None:
    """Expert load per MoE layer as a histogram and a [layers, experts] heat-map image."""
    if not self.enabled:
      return
    self.tb.add_histogram("moe/expert_load", load_LE.reshape(-1), step)
    norm = load_LE / max(float(load_LE.max()), 1e-9)
    self.tb.add_image("moe/expert_load_heatmap", norm[None].astype(np.float32), step,
                      dataformats="CHW")

  def text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      self.tb.add_text(tag, text, step)

  def close(self) -> None:
    """Flushes and stops TensorBoard's writer thread (idempotent)."""
    if self.tb is not None:
      self.tb.flush()
      self.tb.close()
      self.tb = None


def read_jsonl(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]

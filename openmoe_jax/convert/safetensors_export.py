"""Export the parameters of a workdir's checkpoint to one .safetensors file.

Tensor names are our parameter paths with "." separators (e.g.
"segments.0.unit.blocks.1.ffn.w_gate_EDF"); stacked layers keep their leading repeat axis
(layer = repeat * unit_size + block, see transformer.segment_plan). The model config
(config.json's "model") and the checkpoint step are stored in the file's metadata.
"""
from __future__ import annotations

import json
import os

import numpy as np

from openmoe_jax import checkpoint as ckpt_lib


def export(workdir: str, out_path: str, step: int | None = None, dtype: str = "float32") -> str:
  """Writes `out_path` (atomically) from checkpoint `step` (default latest) of `workdir`."""
  from openmoe_jax import inference  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype={dtype!r}; expected float32, bfloat16 or float16")
  session = inference.load(workdir, step)
  np_dtype = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(__import__("ml_dtypes").bfloat16)
  tensors = {}
  for key, value in ckpt_lib.flatten(session.params).items():
    name = (key[:-len("/value")] if key.endswith("/value") else key).replace("/", ".")
    tensors[name] = np.ascontiguousarray(np.asarray(value).astype(np_dtype))
  metadata = {"format": "openmoe_jax", "step": str(session.step),
              "model_config": json.dumps(inference.load_config(workdir)["model"])}
  tmp = f"{out_path}.tmp-{os.getpid()}"
  try:
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, out_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out_path

"""Import of the official MoEUT PyTorch state dict (github.com/RobertCsordas/moeut, moeut/moeut.py).

State dict names (MoEUTLM): embedding.weight [V, D], lm_head.{weight [V, D], bias [V]},
out_norm.{weight, bias}, and per shared layer g (group_size layers, applied n_layers/group_size
times, "abab"): transformer.layers.g.
  ln1.{weight,bias}, ln2.{weight,bias}             torch LayerNorm (mean-centred, with bias)
  attention.q.weight, attention.k.weight [H*K, D]  SwitchHead (sigmoid-selected V/O experts):
  attention.v [H*Ea, D, K], attention.o [H*Ea, K, D], attention.sel_v / sel_o [H*Ea, D]
  ffn.keys [E, D, F], ffn.values [E, F, D], ffn.expert_sel [E, D]   sigma-MoE, ReLU, top-k sigmoid
Read with safetensors (no torch needed) or, for .pt/.pth files, torch.load where torch is
installed. The sigma-MoE FFN maps exactly onto our MoeFFN (router="sigma", activation="relu").
Three parts of MoEUT's forward have no exact counterpart in our model yet, so `convert` refuses
with NotImplementedError naming them (and writes nothing) instead of producing a different model:
LayerNorm (our norms are RMSNorm), the lm_head bias, and SwitchHead attention when
openmoe_jax.switchhead is not available.
"""
from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

import numpy as np

from openmoe_jax.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: float32 array} from a .safetensors file or a torch checkpoint (torch optional)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    state = load_file(path)
  else:
    if importlib.util.find_spec("torch") is None:
      raise ImportError(f"reading {path} needs torch (pip install torch), or convert it to "
                        ".safetensors first")
    import torch  # pylint: disable=import-outside-toplevel
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    loaded = loaded.get("model", loaded) if isinstance(loaded, dict) else loaded
    state = {k: v.float().numpy() for k, v in loaded.items()}
  state = {re.sub(r"^(module\.|model\.)", "", k): np.asarray(v, np.float32)
           for k, v in state.items()}
  if "embedding.weight" not in state:
    raise ValueError(f"{path}: no 'embedding.weight'; not a MoEUTLM state dict "
                     f"(keys e.g. {sorted(state)[:5]})")
  return state


def group_size(state: dict[str, np.ndarray]) -> int:
  return 1 + max(int(m.group(1)) for k in state if (m := _LAYER.match(k)))


def ffn_params(state: dict[str, np.ndarray], group: int) -> dict[str, np.ndarray]:
  """Our MoeFFN parameters (router="sigma", activation="relu") of shared layer `group`."""
  pre = f"transformer.layers.{group}.ffn."
  return {"w_router_DE": state[pre + "expert_sel"].T, "w_gate_EDF": state[pre + "keys"],
          "w_out_EFD": state[pre + "values"]}


def unsupported_differences(state: dict[str, np.ndarray]) -> list[str]:
  """MoEUT forward features our model cannot express (empty = exact conversion possible)."""
  out = []
  if any(k.endswith(("ln1.weight", "ln2.weight")) for k in state) or "out_norm.weight" in state:
    out.append("MoEUT uses torch LayerNorm (mean-centred, with bias); our norms are RMSNorm")
  if np.any(state.get("lm_head.bias", np.zeros(1)) != 0):
    out.append("MoEUT's lm_head has a non-zero bias; our head has none")
  if (any(".attention.sel_v" in k for k in state)
      and importlib.util.find_spec("openmoe_jax.switchhead") is None):
    out.append("MoEUT uses SwitchHead attention; openmoe_jax.switchhead is not available")
  return out


def check_shapes(state: dict[str, np.ndarray], cfg: ModelConfig) -> None:
  """Refuses a state dict whose shapes disagree with `cfg`, naming the parameter."""
  if cfg.moe is None:
    raise ValueError("MoEUT import needs ModelConfig.moe (sigma-MoE FFN)")
  d, e, f = cfg.d_model, cfg.moe.num_experts, cfg.moe.d_expert or cfg.d_ff
  groups = cfg.n_shared_groups or cfg.n_layers
  if group_size(state) != groups:
    raise ValueError(f"state dict has {group_size(state)} shared layers; ModelConfig."
                     f"n_shared_groups={cfg.n_shared_groups} (n_layers={cfg.n_layers})")
  want = {"embedding.weight": (cfg.vocab_size or state["embedding.weight"].shape[0], d)}
  for g in range(groups):
    pre = f"transformer.layers.{g}.ffn."
    want.update({pre + "keys": (e, d, f), pre + "values": (e, f, d), pre + "expert_sel": (e, d)})
  for name, shape in want.items():
    if name not in state:
      raise ValueError(f"MoEUT state dict lacks parameter {name!r}")
    if state[name].shape != shape:
      raise ValueError(f"shape mismatch: MoEUT parameter {name!r} has shape "
                       f"{state[name].shape}, the model needs {shape}")


def convert(path: str, out_workdir: str, model_cfg: ModelConfig, *,
            optim: OptimConfig = OptimConfig(), data: DataConfig = DataConfig(),
            train: TrainConfig = TrainConfig(),
            data_state: dict[str, Any] | None = None) -> tuple[str, ModelConfig]:
  """Checks the state dict against `model_cfg`; refuses forward differences (see module doc)."""
  del optim, data, train, data_state  # used once every difference below is supported
  from openmoe_jax.convert import workdir  # pylint: disable=import-outside-toplevel
  workdir.check_output_dir(out_workdir)
  state = read_state_dict(path)
  check_shapes(state, model_cfg)
  differences = unsupported_differences(state)
  if differences:
    raise NotImplementedError("MoEUT conversion would change the model's function: " +
                              "; ".join(differences))
  raise NotImplementedError("MoEUT conversion: writing the workdir is not implemented")

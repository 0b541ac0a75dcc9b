"""Import of the official MoEUT PyTorch state dict (github.com/RobertCsordas/moeut, moeut/moeut.py).

State dict names (MoEUTLM): embedding.weight [V, D], lm_head.{weight [V, D], bias [V]},
out_norm.{weight, bias}, and per shared layer g (group_size layers, applied n_layers/group_size
times, "abab"): transformer.layers.g.
  ln1.{weight,bias}, ln2.{weight,bias}             torch LayerNorm (mean-centred, with bias)
  attention.q.weight, attention.k.weight [H*K, D]  SwitchHead: dense Q and K
  attention.v [H*Ea, D, K], attention.o [H*Ea, K, D], attention.sel_v / sel_o [H*Ea, D]
    (att_n_experts = 1: v [H*K, D], o [D, H*K], sel_o [H, D], the per-head output gate)
  ffn.keys [E, D, F], ffn.values [E, F, D], ffn.expert_sel [E, D]   sigma-MoE, ReLU, top-k sigmoid
Read with safetensors (no torch needed) or, for .pt/.pth files, torch.load where torch is
installed.

MoEUT's forward maps exactly onto our model with `norm_type="layer"` (eps 1e-5, torch's default),
`head_bias=True`, the peri-LN scheme, SwitchHead attention and the sigma-MoE FFN; its q and k are
each scaled by K**-1/4 and attend at scale 1, which equals our 1/sqrt(K) logits. The top-k sizes
and n_layers are not in a state dict: they come from the preset given (e.g. moeut-244m), which
must otherwise be MoEUT's (anything else is refused with NotImplementedError naming it).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any, Callable, NamedTuple

import numpy as np
from flax import nnx

from openmoe_jax import checkpoint as ckpt_lib
from openmoe_jax import train_step as ts
from openmoe_jax.config import DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig

_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.")
MOEUT_NORM_EPS, MOEUT_ROPE_THETA, MOEUT_ROPE_FRACTION = 1e-5, 10000.0, 0.5


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
  layers = [int(m.group(1)) for k in state if (m := _LAYER.match(k))]
  if not layers:
    raise ValueError("MoEUT state dict has no transformer.layers.* parameters")
  return 1 + max(layers)


def _unsupported(what: str) -> None:
  raise NotImplementedError(f"MoEUT conversion: {what}; the converted model would not compute "
                            "MoEUT's function")


def moeut_model_config(cfg: ModelConfig, state: dict[str, np.ndarray]) -> ModelConfig:
  """`cfg` as the exact MoEUTLM forward: refuses every difference, sets the norms and head bias."""
  m, sh = cfg.moe, cfg.switchhead
  if m is None or m.router != "sigma" or m.activation != "relu" or m.renormalize:
    _unsupported("the FFN must be a sigma-MoE (MoeConfig router='sigma', activation='relu', "
                 "no renormalisation)")
  if not m.dropless or m.num_shared_experts or m.layer_period != 1:
    _unsupported(f"dropless={m.dropless}, num_shared_experts={m.num_shared_experts}, "
                 f"layer_period={m.layer_period}; MoEUT drops no token and has experts only, "
                 "in every layer")
  if cfg.attention != "switchhead" or sh is None:
    _unsupported(f"attention={cfg.attention!r}; MoEUT uses SwitchHead")
  if cfg.norm_scheme != "peri" or cfg.share_order != "abab" or cfg.tie_embeddings:
    _unsupported(f"norm_scheme={cfg.norm_scheme!r}, share_order={cfg.share_order!r}, "
                 f"tie_embeddings={cfg.tie_embeddings}; MoEUT is peri-LN, 'abab', untied")
  if cfg.rope_theta != MOEUT_ROPE_THETA or cfg.rope_fraction != MOEUT_ROPE_FRACTION:
    _unsupported(f"rope_theta={cfg.rope_theta}, rope_fraction={cfg.rope_fraction}; MoEUT "
                 f"rotates {MOEUT_ROPE_FRACTION} of each head with base {MOEUT_ROPE_THETA}")
  groups = group_size(state)
  if cfg.n_shared_groups != groups:
    raise ValueError(f"the state dict has {groups} shared layers (transformer.layers.*); "
                     f"ModelConfig.n_shared_groups={cfg.n_shared_groups}")
  vocab = state["embedding.weight"].shape[0]
  if cfg.vocab_size not in (0, vocab):
    raise ValueError(f"ModelConfig.vocab_size={cfg.vocab_size} but MoEUT's embedding.weight "
                     f"has {vocab} rows")
  return dataclasses.replace(cfg, vocab_size=vocab, norm_type="layer", norm_eps=MOEUT_NORM_EPS,
                             head_bias=True)


class Dims(NamedTuple):
  d: int   # d_model
  v: int   # vocabulary
  h: int   # heads
  k: int   # head dim
  ea: int  # SwitchHead experts per head
  e: int   # sigma-MoE experts
  f: int   # expert size


# Ours (key suffix) -> (MoEUT name, its torch shape, torch layout -> ours). Block names are
# relative to transformer.layers.<g>.
_Rule = tuple[str, Callable[[Dims], tuple[int, ...]], Callable[[np.ndarray, Dims], np.ndarray]]
_SAME = lambda a, x: a
_VEC_D = lambda x: (x.d,)
_DHK = lambda a, x: a.reshape(x.h, x.k, x.d).transpose(2, 0, 1)      # [H*K, D] -> [D, H, K]
_DHE = lambda a, x: a.reshape(x.h, x.ea, x.d).transpose(2, 0, 1)     # [H*Ea, D] -> [D, H, Ea]
TOP_RULES: dict[str, _Rule] = {
    "embed/embedding_VD": ("embedding.weight", lambda x: (x.v, x.d), _SAME),
    "head_DV": ("lm_head.weight", lambda x: (x.v, x.d), lambda a, x: a.T),
    "head_bias_V": ("lm_head.bias", lambda x: (x.v,), _SAME),
    "final_norm/scale": ("out_norm.weight", _VEC_D, _SAME),
    "final_norm/bias": ("out_norm.bias", _VEC_D, _SAME),
}
BLOCK_RULES: dict[str, _Rule] = {
    "attn_norm/scale": ("ln1.weight", _VEC_D, _SAME),
    "attn_norm/bias": ("ln1.bias", _VEC_D, _SAME),
    "ffn_norm/scale": ("ln2.weight", _VEC_D, _SAME),
    "ffn_norm/bias": ("ln2.bias", _VEC_D, _SAME),
    "attn/w_q_DHK": ("attention.q.weight", lambda x: (x.h * x.k, x.d), _DHK),
    "attn/w_k_DHK": ("attention.k.weight", lambda x: (x.h * x.k, x.d), _DHK),
    "attn/w_v_HEDK": ("attention.v", lambda x: (x.h * x.ea, x.d, x.k),
                      lambda a, x: a.reshape(x.h, x.ea, x.d, x.k)),
    "attn/w_o_HEKD": ("attention.o", lambda x: (x.h * x.ea, x.k, x.d),
                      lambda a, x: a.reshape(x.h, x.ea, x.k, x.d)),
    "attn/w_sel_v_DHE": ("attention.sel_v", lambda x: (x.h * x.ea, x.d), _DHE),
    "attn/w_sel_o_DHE": ("attention.sel_o", lambda x: (x.h * x.ea, x.d), _DHE),
    # att_n_experts = 1: dense V and O, and a sigmoid output gate per head
    "attn/w_v_DHK": ("attention.v", lambda x: (x.h * x.k, x.d), _DHK),
    "attn/w_o_HKD": ("attention.o", lambda x: (x.d, x.h * x.k),
                     lambda a, x: a.T.reshape(x.h, x.k, x.d)),
    "attn/w_gate_DH": ("attention.sel_o", lambda x: (x.h, x.d), lambda a, x: a.T),
    "ffn/w_router_DE": ("ffn.expert_sel", lambda x: (x.e, x.d), lambda a, x: a.T),
    "ffn/w_gate_EDF": ("ffn.keys", lambda x: (x.e, x.d, x.f), _SAME),
    "ffn/w_out_EFD": ("ffn.values", lambda x: (x.e, x.f, x.d), _SAME),
}


def convert_params(state: dict[str, np.ndarray], cfg: ModelConfig) -> tuple[ModelConfig, Any]:
  """(converted ModelConfig, nnx.State of parameters) from a MoEUTLM state dict."""
  cfg = moeut_model_config(cfg, state)
  dims = Dims(cfg.d_model, cfg.vocab_size, cfg.n_heads, cfg.resolved_head_dim,
              cfg.switchhead.num_experts, cfg.moe.num_experts, cfg.moe.d_expert or cfg.d_ff)
  abstract = nnx.eval_shape(lambda: ts.build_model(cfg, 0))
  _, abstract_params = nnx.split(abstract, nnx.Param)
  used: set[str] = set()
  flat: dict[str, np.ndarray] = {}
  for key, leaf in ckpt_lib.flatten(abstract_params).items():
    our = key[:-len("/value")] if key.endswith("/value") else key
    parts = our.split("/")  # segments/0/unit/blocks/<g>/<suffix> for the shared layers
    if our in TOP_RULES:
      (name, shape_fn, to_ours), prefix = TOP_RULES[our], ""
    elif parts[:4] == ["segments", "0", "unit", "blocks"] and "/".join(parts[5:]) in BLOCK_RULES:
      (name, shape_fn, to_ours) = BLOCK_RULES["/".join(parts[5:])]
      prefix = f"transformer.layers.{parts[4]}."
    else:
      raise ValueError(f"model parameter {our} has no MoEUT counterpart")
    name = prefix + name
    if name not in state:
      raise ValueError(f"MoEUT state dict lacks parameter {name!r} (needed for {our})")
    want = shape_fn(dims)
    if state[name].shape != want:
      raise ValueError(f"shape mismatch: MoEUT parameter {name!r} has shape "
                       f"{state[name].shape}, the model ({our} {tuple(leaf.shape)}) needs "
                       f"{want}")
    used.add(name)
    flat[key] = np.ascontiguousarray(to_ours(state[name], dims)).astype(np.dtype(leaf.dtype))
  unused = sorted(set(state) - used)
  if unused:
    raise ValueError(f"{len(unused)} MoEUT parameters have no place in the model (wrong preset?), "
                     f"e.g. {unused[:5]}")
  return cfg, ckpt_lib.unflatten(flat, abstract_params)


# MoEUT trains causal LMs (no bidirectional prefix): sampling and fine-tuning the converted
# model go on that way (inference.Session.complete reads DataConfig.ul2).
CAUSAL_LM_DATA = DataConfig(mixture="stdlib_lm", ul2=False)


def convert(path: str, out_workdir: str, model_cfg: ModelConfig, *,
            optim: OptimConfig = OptimConfig(), data: DataConfig = CAUSAL_LM_DATA,
            train: TrainConfig = TrainConfig(), mesh: MeshConfig = MeshConfig(),
            data_state: dict[str, Any] | None = None) -> tuple[str, ModelConfig]:
  """Converts a MoEUTLM state dict into a new workdir at step 0; returns (workdir, config).

  `inference.load(out_workdir)` samples from it; `train.run(out_workdir, <the returned model
  config>, data, optim, train, mesh)` fine-tunes it. Nothing is written unless every parameter
  converts.
  """
  from openmoe_jax.convert import workdir  # pylint: disable=import-outside-toplevel
  workdir.check_output_dir(out_workdir)
  cfg, params = convert_params(read_state_dict(path), model_cfg)
  source = {"format": "moeut", "path": os.path.abspath(path)}
  out = workdir.write(out_workdir, cfg, params, source=source, optim=optim, data=data,
                      train=train, mesh=mesh, data_state=data_state)
  return out, cfg

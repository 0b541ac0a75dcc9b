"""OpenMoE / OpenLLaMA T5X checkpoints (flaxformer decoder-only) -> openmoe_jax parameters.

T5X parameter tree (names as in ColossalAI's examples/language/openmoe convert_openmoe_ckpt.py):
  token_embedder/embedding [V, D]                     decoder/decoder_norm/scale [D]
  decoder/logits_dense/kernel [D, V] (untied head)    decoder/layers_i/...:
    pre_self_attention_layer_norm/scale [D]           self_attention/{query,key,value}/kernel [D, H*K]
    self_attention/out/kernel [H*K, D]                pre_mlp_layer_norm/scale [D]
    dense layer: mlp/wi_0/kernel [D, 2F], mlp/wi_1/kernel [D, F], mlp/wo/kernel [F, D]
    MoE layer ((i + 1) % interval == 0): mlp/router/router_weights/w/kernel [D, E],
      mlp/expert/wi_0/kernel [E, D, 2F], mlp/expert/wi_1/kernel [E, D, F],
      mlp/expert/wo/kernel [E, F, D], pre_extra_mlp_layer_norm/scale [D],
      extra_mlp/{wi_0,wi_1,wo}/kernel (a dense MLP)
Differences of OpenMoE's forward from ours, and how they are handled:
  - attention logits are not scaled by 1/sqrt(K) (T5 convention): the query kernel is
    multiplied by sqrt(K) (RoPE is linear, so scaling before it is the same);
  - the dense "extra MLP" of MoE layers runs *after* the experts with its own norm and residual:
    the model is built with ModelConfig.extra ("moe_extra_mlp", "sequential"); a config that
    models it as a parallel shared expert (presets' num_shared_experts=1) is rewritten to it;
  - every MLP is OpenMoE's SwiGLU: wi_0 is twice as wide and computes g1 * silu(g2) from its
    halves, times wi_1 (flaxformer fork's dense.py, ColossalAI's OpenMoeMLP, whose converter
    loads wi_0 into a [2F, D] gate_proj strictly): the model's activation "openmoe_swiglu";
  - RoPE (half-split, theta 1e4, whole head), RMSNorm eps 1e-6, top-2 softmax gates without
    renormalisation, untied unscaled head: the same as ours; configs that differ raise
    NotImplementedError naming the difference.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np
from flax import nnx

from openmoe_jax import checkpoint as ckpt_lib
from openmoe_jax import train_step as ts
from openmoe_jax import transformer
from openmoe_jax.config import DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from openmoe_jax.convert import t5x_reader, workdir

# our per-block parameter (without the stacking axis) -> (T5X name under decoder/layers_i, kind)
BLOCK_MAP: dict[str, tuple[str, str]] = {
    "attn/w_q_DHK": ("self_attention/query/kernel", "query"),
    "attn/w_k_DNK": ("self_attention/key/kernel", "heads_in"),
    "attn/w_v_DNK": ("self_attention/value/kernel", "heads_in"),
    "attn/w_o_HKD": ("self_attention/out/kernel", "heads_out"),
    "attn_norm/scale": ("pre_self_attention_layer_norm/scale", "copy"),
    "ffn_norm/scale": ("pre_mlp_layer_norm/scale", "copy"),
    "ffn/mlp/w_gate_DF": ("mlp/wi_0/kernel", "copy"),
    "ffn/mlp/w_up_DF": ("mlp/wi_1/kernel", "copy"),
    "ffn/mlp/w_out_FD": ("mlp/wo/kernel", "copy"),
    "ffn/w_router_DE": ("mlp/router/router_weights/w/kernel", "copy"),
    "ffn/w_gate_EDF": ("mlp/expert/wi_0/kernel", "copy"),
    "ffn/w_up_EDF": ("mlp/expert/wi_1/kernel", "copy"),
    "ffn/w_out_EFD": ("mlp/expert/wo/kernel", "copy"),
    "extra_norm/scale": ("pre_extra_mlp_layer_norm/scale", "copy"),
    "extra_mlp/w_gate_DF": ("extra_mlp/wi_0/kernel", "copy"),
    "extra_mlp/w_up_DF": ("extra_mlp/wi_1/kernel", "copy"),
    "extra_mlp/w_out_FD": ("extra_mlp/wo/kernel", "copy"),
}
TOP_MAP: dict[str, tuple[str, ...]] = {  # alternatives in order of preference
    "embed/embedding_VD": ("token_embedder/embedding", "decoder/token_embedder/embedding"),
    "final_norm/scale": ("decoder/decoder_norm/scale",),
    "head_DV": ("decoder/logits_dense/kernel",),
}
ROUTER_BIAS = "mlp/router/router_weights/w/bias"
OPENMOE_NORM_EPS, OPENMOE_ROPE_THETA = 1e-6, 10000.0


def _unsupported(what: str) -> None:
  raise NotImplementedError(f"OpenMoE conversion: {what}; the converted model would not "
                            "compute OpenMoE's function")


def openmoe_model_config(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
  """`cfg` as the exact OpenMoE forward: checks every difference, sets the sequential extra MLP."""
  if cfg.attention != "dense" or cfg.norm_scheme != "pre" or cfg.n_shared_groups:
    _unsupported(f"attention={cfg.attention!r}, norm_scheme={cfg.norm_scheme!r}, "
                 f"n_shared_groups={cfg.n_shared_groups}; OpenMoE is dense pre-LN, unshared")
  if cfg.rope_fraction != 1.0 or cfg.rope_theta != OPENMOE_ROPE_THETA:
    _unsupported(f"rope_fraction={cfg.rope_fraction}, rope_theta={cfg.rope_theta}; OpenMoE "
                 f"rotates whole heads with theta {OPENMOE_ROPE_THETA}")
  if cfg.norm_eps != OPENMOE_NORM_EPS:
    _unsupported(f"norm_eps={cfg.norm_eps}; OpenMoE's RMSNorm uses {OPENMOE_NORM_EPS}")
  if cfg.activation != "openmoe_swiglu":
    _unsupported(f"activation={cfg.activation!r}; OpenMoE's MLPs are its own SwiGLU "
                 "('openmoe_swiglu': wi_0 [D, 2F], g1 * silu(g2) * (x @ wi_1))")
  if cfg.vocab_size not in (0, vocab_size):
    raise ValueError(f"ModelConfig.vocab_size={cfg.vocab_size} but the checkpoint's "
                     f"token_embedder/embedding has {vocab_size} rows")
  cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
  m = cfg.moe
  if m is None:
    return cfg
  if m.router != "topk_softmax" or m.renormalize or m.activation != "openmoe_swiglu":
    _unsupported(f"router={m.router!r}, renormalize={m.renormalize}, expert activation="
                 f"{m.activation!r}; OpenMoE uses top-k softmax gates, not renormalised, and "
                 "its SwiGLU ('openmoe_swiglu')")
  if m.layer_offset != m.layer_period - 1:
    raise ValueError(f"MoeConfig.layer_offset={m.layer_offset}; OpenMoE's MoE layers are those "
                     f"with (i + 1) % {m.layer_period} == 0, i.e. layer_offset={m.layer_period - 1}")
  if m.num_shared_experts > 1:
    _unsupported(f"num_shared_experts={m.num_shared_experts}; OpenMoE has one extra dense MLP")
  extra = dict(cfg.extra)
  extra["moe_extra_mlp"] = "sequential"
  return dataclasses.replace(cfg, moe=dataclasses.replace(m, num_shared_experts=0),
                             extra=tuple(sorted(extra.items())))


def _fit(kind: str, t5x_name: str, arr: np.ndarray, want: tuple[int, ...],
         our_key: str) -> np.ndarray:
  """T5X layout -> ours (joined heads split, query rescaled); refuses any other shape."""
  joined = {"query": (want[0], math.prod(want[1:])), "heads_in": (want[0], math.prod(want[1:])),
            "heads_out": (math.prod(want[:-1]), want[-1])}.get(kind)
  if arr.shape != want and (joined is None or arr.shape != joined):
    raise ValueError(f"shape mismatch: T5X parameter {t5x_name!r} has shape {arr.shape}, but "
                     f"the model's {our_key} needs {want}" +
                     (f" (or {joined} with heads joined)" if joined else ""))
  arr = arr.astype(np.float32).reshape(want)
  if kind == "query":  # T5-style attention has no 1/sqrt(K) on the logits; ours does
    arr = arr * np.float32(math.sqrt(want[-1]))
  return arr


def convert_params(ckpt: t5x_reader.T5xCheckpoint, cfg: ModelConfig,
                   progress: Callable[[str], None] | None = None) -> tuple[ModelConfig, Any]:
  """(converted ModelConfig, nnx.State of parameters) from an open T5X checkpoint."""
  names = set(ckpt.names())
  emb = next((n for n in TOP_MAP["embed/embedding_VD"] if n in names), None)
  if emb is None:
    raise ValueError(f"T5X checkpoint {ckpt.directory} lacks parameter "
                     f"'{TOP_MAP['embed/embedding_VD'][0]}'")
  cfg = openmoe_model_config(cfg, ckpt.shape(emb)[0])
  abstract = nnx.eval_shape(lambda: ts.build_model(cfg, 0))
  _, abstract_params = nnx.split(abstract, nnx.Param)
  flat_abstract = ckpt_lib.flatten(abstract_params)
  used: set[str] = set()

  def read(t5x_name: str, our_key: str) -> np.ndarray:
    if t5x_name not in names:
      raise ValueError(f"T5X checkpoint {ckpt.directory} lacks parameter {t5x_name!r} "
                       f"(needed for {our_key})")
    used.add(t5x_name)
    if progress:
      progress(t5x_name)
    return ckpt.read(t5x_name)

  plan = transformer.segment_plan(cfg)
  flat: dict[str, np.ndarray] = {}
  for key, leaf in flat_abstract.items():
    our = key[:-len("/value")] if key.endswith("/value") else key
    dtype = np.dtype(leaf.dtype)
    if our in TOP_MAP:
      alts = [n for n in TOP_MAP[our] if n in names] or [TOP_MAP[our][0]]
      if our == "head_DV" and cfg.tie_embeddings:
        continue
      flat[key] = _fit("copy", alts[0], read(alts[0], our), tuple(leaf.shape), our).astype(dtype)
      continue
    parts = our.split("/")  # segments/s/unit/blocks/i/<suffix>
    if parts[:1] != ["segments"] or parts[2:4] != ["unit", "blocks"]:
      raise ValueError(f"model parameter {our} has no OpenMoE counterpart")
    first, size, repeats, _ = plan[int(parts[1])]
    block, suffix = int(parts[4]), "/".join(parts[5:])
    if suffix not in BLOCK_MAP:
      raise ValueError(f"model parameter {our} has no OpenMoE counterpart")
    t5x_rel, kind = BLOCK_MAP[suffix]
    layers = []
    for r in range(repeats):
      name = f"decoder/layers_{first + r * size + block}/{t5x_rel}"
      layers.append(_fit(kind, name, read(name, our), tuple(leaf.shape[1:]), our))
    flat[key] = np.stack(layers).astype(dtype)

  for layer in range(cfg.n_layers):  # a router bias our router cannot express must be zero
    bias = f"decoder/layers_{layer}/{ROUTER_BIAS}"
    if bias in names:
      if np.any(ckpt.read(bias) != 0):
        _unsupported(f"{bias} is non-zero; our router has no bias")
      used.add(bias)
  if cfg.tie_embeddings and TOP_MAP["head_DV"][0] in names:
    raise ValueError("ModelConfig.tie_embeddings=True but the checkpoint has an untied head "
                     f"{TOP_MAP['head_DV'][0]!r}")
  unused = sorted(names - used)
  if unused:
    raise ValueError(f"{len(unused)} T5X parameters have no place in the model (wrong preset or "
                     f"n_layers / layer_period?), e.g. {unused[:5]}")
  return cfg, ckpt_lib.unflatten(flat, abstract_params)


def convert(t5x_dir: str, out_workdir: str, model_cfg: ModelConfig, *,
            optim: OptimConfig = OptimConfig(), data: DataConfig = DataConfig(),
            train: TrainConfig = TrainConfig(), mesh: MeshConfig = MeshConfig(),
            data_state: dict[str, Any] | None = None,
            progress: Callable[[str], None] | None = None) -> tuple[str, ModelConfig]:
  """Converts T5X `checkpoint_N/` into a new workdir at step 0; returns (workdir, model config).

  `train.run(out_workdir, <the returned model config>, data, optim, train, mesh)` then
  fine-tunes from it (fresh optimizer state) and `inference.load(out_workdir)` samples from it.
  Nothing is written unless every parameter converts.
  """
  workdir.check_output_dir(out_workdir)
  ckpt = t5x_reader.T5xCheckpoint(t5x_dir)
  cfg, params = convert_params(ckpt, model_cfg, progress)
  source = {"format": "t5x", "path": ckpt.directory, "step": ckpt.step}
  path = workdir.write(out_workdir, cfg, params, source=source, optim=optim, data=data,
                       train=train, mesh=mesh, data_state=data_state)
  return path, cfg

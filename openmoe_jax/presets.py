"""Model presets: one registry of config constructors, each mirrored by a gin/models file
(`gin_file(name)`: the name with "-" -> "_", e.g. gin/models/tiny_openmoe.gin).

Sources of the real shapes:
  OpenMoE (base / 8B / 34B): the released configs in ColossalAI
    examples/language/openmoe/model/openmoe_{base,8b,34b}_config.json and its
    modeling_openmoe.py: layer i is MoE iff (i + 1) % moe_layer_interval == 0; experts have the
    dense FFN width (intermediate_size); every MoE layer *also* has a dense "extra_mlp" of that
    width, applied after the experts with its own norm and residual
    (ModelConfig.extra ("moe_extra_mlp", "sequential"), the function convert/openmoe.py proves).
    umT5 vocabulary 256384, untied head, RoPE, 2K context, router z-loss 1e-4,
    balance loss 0.01, capacity 1.25 train / 2.0 eval with min capacity 4, output z-loss 0.01.
    Every MLP (dense, expert, extra) is OpenMoE's SwiGLU ("openmoe_swiglu"): gate_proj of width
    2 * intermediate_size, split in halves, g1 * silu(g2), times up_proj (OpenMoeMLP, and the
    T5X wi_0 kernels are [D, 2F]); not the Llama SwiGLU silu(gate) * up.
  openllama-base: "dense counterpart of openmoe-base" (OpenMoE README): the same without experts.
  open_lm-moe: open_lm MOE.md (--moe-freq 2 --moe-num-experts 8 --moe-top-k 2
    --moe-capacity-factor 1.25 --moe-loss-weight 0.1) on open_lm_410m.json (d 1024, 24 layers,
    16 heads, vocab 50432); dense layers SwiGLU of width 256*ceil(8d/3/256) = 2816, MoE layers
    at layer_id % 2 == 0 with megablocks experts (GELU-tanh, width 4d, not gated).
Published totals are in PUBLISHED (tests/test_presets.py prints ours next to them).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from openmoe_jax.config import ModelConfig, MoeConfig


def _openmoe(d_model: int, n_layers: int, n_heads: int, head_dim: int, d_ff: int,
             num_experts: int, interval: int) -> ModelConfig:
  return ModelConfig(
      vocab_size=256384, d_model=d_model, n_layers=n_layers, n_heads=n_heads, head_dim=head_dim,
      d_ff=d_ff, activation="openmoe_swiglu", norm_eps=1e-6, tie_embeddings=False, rope_theta=10000.0,
      max_seq_len=2048, z_loss=0.01, extra=(("moe_extra_mlp", "sequential"),),
      moe=MoeConfig(num_experts=num_experts, top_k=2, router="topk_softmax",
                    capacity_factor_train=1.25, capacity_factor_eval=2.0, min_capacity=4,
                    load_balance_weight=0.01, z_loss_weight=1e-4, num_shared_experts=0,
                    layer_period=interval, layer_offset=interval - 1,
                    activation="openmoe_swiglu"))


def openmoe_base() -> ModelConfig:
  return _openmoe(768, 12, 12, 64, 2048, num_experts=16, interval=4)


def openllama_base() -> ModelConfig:
  return dataclasses.replace(openmoe_base(), moe=None, extra=())


def openmoe_8b() -> ModelConfig:
  return _openmoe(2048, 24, 24, 128, 8192, num_experts=32, interval=6)


def openmoe_34b() -> ModelConfig:
  return _openmoe(3072, 32, 24, 128, 12288, num_experts=32, interval=4)


def open_lm_moe() -> ModelConfig:
  return ModelConfig(
      vocab_size=50432, d_model=1024, n_layers=24, n_heads=16, d_ff=2816, activation="swiglu",
      norm_eps=1e-5, tie_embeddings=False, max_seq_len=2048,
      moe=MoeConfig(num_experts=8, top_k=2, d_expert=4096, activation="gelu",
                    capacity_factor_train=1.25, capacity_factor_eval=1.25,
                    load_balance_weight=0.1, z_loss_weight=0.0, layer_period=2, layer_offset=0))


def tiny_openmoe() -> ModelConfig:
  """CPU-sized OpenMoE: 4 layers, MoE at layers 1 and 3 (12 experts of width 256, top-2)."""
  return ModelConfig(
      vocab_size=0, d_model=128, n_layers=4, n_heads=4, d_ff=512, dtype="float32",
      max_seq_len=512,
      moe=MoeConfig(num_experts=12, top_k=2, d_expert=256, capacity_factor_train=1.25,
                    capacity_factor_eval=2.0, load_balance_weight=0.01, z_loss_weight=1e-3,
                    layer_period=2, layer_offset=1))


def tiny_dense() -> ModelConfig:
  """Dense counterpart of tiny-openmoe with the same active parameter count: its two MoE
  layers touch 2 * (2 * 3*128*256 + 128*12) = 2 * 3*128*512 + 3072 parameters per token, so
  d_ff = 512 + 3072 / (4 * 3*128) = 514."""
  return ModelConfig(vocab_size=0, d_model=128, n_layers=4, n_heads=4, d_ff=514, dtype="float32",
                     max_seq_len=512)


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "openmoe-base": openmoe_base,
    "openllama-base": openllama_base,
    "openmoe-8b": openmoe_8b,
    "openmoe-34b": openmoe_34b,
    "open_lm-moe": open_lm_moe,
    "tiny-openmoe": tiny_openmoe,
    "tiny-dense": tiny_dense,
}

# Published parameter counts (total, active; None = not published), with their sources.
PUBLISHED: dict[str, tuple[float | None, float | None, str]] = {
    "openmoe-base": (637e6, None, "HF OrionZheng/openmoe-base README: 637M"),
    "openmoe-8b": (8e9, None, "HF README / paper: 'OpenMoE-8B' (rounded name, counting the "
                   "MLPs as Llama SwiGLU)"),
    "openmoe-34b": (34e9, None, "HF README / paper: 'OpenMoE-34B' (rounded name, counting the "
                    "MLPs as Llama SwiGLU)"),
    "open_lm-moe": (1.1e9, 509.2e6, "open_lm MOE.md, 410M x 8 experts: 1.1B / 509.2M"),
}


def gin_file(name: str) -> str:
  """File name under gin/models/ of preset `name`."""
  return name.replace("-", "_") + ".gin"


def get(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
  return PRESETS[name]()


# Registers the MoEUT / UMoE presets (kept in their own file) into PRESETS and PUBLISHED.
from openmoe_jax import presets_moeut  # noqa: E402,F401 pylint: disable=wrong-import-position
